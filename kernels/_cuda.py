"""``numba.cuda`` for the CUDA kernel modules, with one compatibility fix.

numba-cuda 0.30 (its last release: the project is in maintenance mode) registers a typing
overload for ``np.row_stack`` when it compiles its first kernel.  NumPy 2.5 removed that
function (it was always another name for ``np.vstack``), so with NumPy 2.5 or newer every
kernel launch on a GPU fails with ``AttributeError: module 'numpy' has no attribute
'row_stack'`` (NVIDIA/numba-cuda issue 907).  Putting the old name back before the first
compilation lets numba-cuda load; nothing in tinydeeplab calls it.  The CUDA kernel modules
import ``cuda`` from here, and they are imported only when a CUDA kernel is first used.
"""
import numpy as np

if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack

from numba import cuda  # noqa: E402  (after the fix above)

__all__ = ["cuda"]
