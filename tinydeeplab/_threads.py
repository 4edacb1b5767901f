"""How tinydeeplab's CPU thread pools share a few cores (imported first, before NumPy).

A training step alternates two kinds of parallel work a few hundred times: Numba loops (im2col,
batch norm, pooling) and OpenBLAS GEMMs.  Each library keeps its own worker threads, and what a
worker does when its job ends decides whether the *other* library gets the cores:

* OpenBLAS workers spin (polling for the next GEMM, calling sched_yield) for 2^28 CPU cycles —
  about 0.1 s — before they sleep.  A Numba loop started in that window shares the cores with
  spinning threads.
* Numba's ``workqueue`` layer never spins, but waking its workers costs ~50 µs per parallel
  loop; its ``tbb`` layer (Intel oneTBB, pip package ``tbb``) ~8 µs; its ``omp`` layer (GNU
  OpenMP) ~3 µs, but GNU OpenMP kills a forked child that runs a parallel loop
  ("fork() called from a process already using GNU OpenMP"), and multiprocessing forks by
  default on Linux — so it is never chosen here.

Measured on 2 cores (benchmarks/RESULTS.md), tiny-DeepLab training step against PyTorch's:
workqueue with spinning OpenBLAS 1.6-1.9×; tbb with OpenBLAS workers that sleep at once
1.14-1.17×.
So, unless you chose otherwise:

1. before NumPy (and so OpenBLAS) is first imported, set ``OPENBLAS_THREAD_TIMEOUT=4``
   (2^4 cycles: its workers go to sleep right after a GEMM); the variable is removed again once
   NumPy has loaded, so child processes and other libraries see your environment unchanged;
2. use Numba's ``tbb`` layer when the ``tbb`` package is installed (a dependency on Linux
   x86-64), otherwise ``workqueue``.  Also when NumPy was imported first and OpenBLAS's workers
   spin: measured then (machine C, tiny step, six processes each in turns) tbb took 46-80 ms a
   step (median of medians 59) against workqueue's 54-65 (62), and a CRF-layer gradcheck on
   2 × 3 × 7 × 9 — hundreds of small kernel calls — 1.6-2.2 s against 16-17 s.

Your own NUMBA_THREADING_LAYER and OPENBLAS_THREAD_TIMEOUT win.  ``describe()`` says what was
chosen (the benchmarks print it).  Every layer gives bit-identical results: they only decide
which thread runs which iterations of loops whose iterations write disjoint outputs.
"""
import os
import sys

_USER_SET_TIMEOUT = "OPENBLAS_THREAD_TIMEOUT" in os.environ
_NUMPY_WAS_LOADED = "numpy" in sys.modules
BLAS_WORKERS_SLEEP = _USER_SET_TIMEOUT or not _NUMPY_WAS_LOADED
if not _NUMPY_WAS_LOADED and not _USER_SET_TIMEOUT:
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"
    try:
        import numpy  # noqa: F401  loads OpenBLAS, which reads the variable now
    finally:
        del os.environ["OPENBLAS_THREAD_TIMEOUT"]

_choice = "your NUMBA_THREADING_LAYER"


def _load_tbb():
    """Load pip's oneTBB library by its path, so that Numba's TBB layer can link to it.

    The ``tbb`` wheel puts libtbb.so.12 in <prefix>/lib, which is not on the dynamic loader's
    search path outside conda; once loaded by full path, the loader reuses it for Numba's
    tbbpool extension.  Returns whether it was found."""
    import ctypes
    from importlib import metadata

    try:
        files = metadata.files("tbb") or []
    except metadata.PackageNotFoundError:
        return False
    for f in files:
        if f.name in ("libtbb.so.12", "libtbb.12.dylib"):
            try:
                ctypes.CDLL(str(f.locate()), mode=ctypes.RTLD_GLOBAL)
                return True
            except OSError:
                return False
    return False


def configure_numba():
    """Pick Numba's threading layer (called by tinydeeplab.kernels before any kernel runs)."""
    global _choice
    import numba

    if "NUMBA_THREADING_LAYER" in os.environ:
        return
    if not _load_tbb():
        numba.config.THREADING_LAYER = "workqueue"
        _choice = "workqueue (the tbb package is not installed)"
        return
    numba.config.THREADING_LAYER_PRIORITY = ["tbb", "workqueue", "omp"]
    numba.config.THREADING_LAYER = "default"  # the first that loads: tbb, else workqueue
    _choice = "tbb if it loads, else workqueue"


SPINNING_BLAS_NOTE = (
    "NumPy was imported before tinydeeplab, so OpenBLAS's threads spin after each GEMM and "
    "a CPU training step runs up to ~2x slower: import tinydeeplab before NumPy, or set "
    "OPENBLAS_THREAD_TIMEOUT=4 in the environment")


def blas_workers_spin():
    """True when OpenBLAS's workers busy-wait between GEMMs (NumPy was imported first and
    OPENBLAS_THREAD_TIMEOUT was not set): training on the CPU then loses up to half its speed."""
    return not BLAS_WORKERS_SLEEP


def describe():
    """One line for benchmark headers: the Numba layer in use and how OpenBLAS waits."""
    import numba

    try:
        from numba.np.ufunc.parallel import _launch_threads

        _launch_threads()  # start the pool now (the first kernel would), so the layer is known
        layer = numba.threading_layer()
    except Exception:  # noqa: BLE001  a private Numba function: report rather than fail
        layer = "not loaded yet"
    blas = ("OPENBLAS_THREAD_TIMEOUT=" + os.environ["OPENBLAS_THREAD_TIMEOUT"]
            if _USER_SET_TIMEOUT else "OpenBLAS workers sleep after each call (timeout 2^4)"
            if BLAS_WORKERS_SLEEP else "OpenBLAS workers spin (NumPy imported first)")
    return f"Numba threading layer {layer} ({_choice}); {blas}"


def usable_cores():
    """The cores this process may run on (its CPU affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class LoadAdapter:
    """Keep the worker threads to the cores that other processes leave free.

    Numba's parallel loops and OpenBLAS's GEMMs split their work statically among their
    threads and wait at the end for the slowest.  On a machine busy with other work, a
    descheduled worker stalls the whole loop — a training step makes hundreds of such loops —
    and two or three threads per core fight over every time slice.  So, once a second, this
    reads how busy the machine was (``/proc/stat``) less what this process used
    (``os.times``), and sets both pools to ``cores − busy cores of others`` threads (at least
    one): all cores when alone, fewer when shared — after two readings in a row agree, so a
    short burst of other work changes nothing.  ``TDL_ADAPT_THREADS=0`` turns it off; so does
    a machine without ``/proc/stat`` or with one core.

    Numba's thread count never changes a result (our kernels split work so that every output
    is summed in one order); OpenBLAS's can, in the last bits, for GEMMs it splits along their
    inner dimension (weight gradients).  So a run alone is bit-identical to one with the
    adaptation off, while a run that shared the machine may differ from it in rounding; set
    ``TDL_ADAPT_THREADS=0`` for bit-reproducible runs on a busy machine."""

    def __init__(self, every=1.0):
        import time

        self.every, self._clock = every, time.monotonic
        self.cores = usable_cores()
        self.enabled = (os.environ.get("TDL_ADAPT_THREADS", "1") != "0" and self.cores > 1
                        and self._busy() is not None)
        self.threads, self._limits, self._pending = self.cores, None, None
        self.history = []  # (time, others' busy cores, threads) at each change
        if self.enabled:
            self._last = (self._clock(), self._busy(), self._own())

    @staticmethod
    def _busy():
        """Seconds of CPU time the whole machine has spent busy since boot."""
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()
        except OSError:
            return None
        if not fields or fields[0] != "cpu":
            return None
        ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own():
        t = os.times()
        return t.user + t.system

    def update(self):
        """Call often (every training iteration); acts at most once per ``every`` seconds."""
        if not self.enabled:
            return self.threads
        now = self._clock()
        if now - self._last[0] < self.every:
            return self.threads
        busy, own = self._busy(), self._own()
        others = ((busy - self._last[1]) - (own - self._last[2])) / (now - self._last[0])
        self._last = (now, busy, own)
        # a core counts as taken once others keep it busy three quarters of the time
        wanted = max(1, min(self.cores, self.cores - int(others + 0.25)))
        if wanted != self.threads and wanted == self._pending:  # two readings agree
            self._set(wanted)
            self.history.append((now, round(others, 2), wanted))
        self._pending = wanted
        return self.threads

    def _set(self, n):
        import numba
        from threadpoolctl import threadpool_limits

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
        if self._limits is not None:
            self._limits.restore_original_limits()
        self._limits = threadpool_limits(limits=n, user_api="blas")
        self.threads = n

    def close(self):
        """Give both pools back their full size."""
        if self.enabled and self.threads != self.cores:
            import numba

            numba.set_num_threads(min(self.cores, numba.config.NUMBA_NUM_THREADS))
            if self._limits is not None:
                self._limits.restore_original_limits()
                self._limits = None
            self.threads = self.cores
