"""Reading PyTorch weight files (``torch.save`` of a state dict) without PyTorch.

A ``.pth`` file is one of two containers around a pickle:

* the zip format (torch ≥ 1.6): ``<name>/data.pkl`` is the pickled object, and every tensor's
  raw bytes are a separate entry ``<name>/data/<key>`` (``<name>/byteorder`` says the byte
  order);
* the legacy format (older files, torchvision's original ImageNet weights among them): five
  pickles in a row — a magic number, a protocol version, system information, the object, the
  list of storage keys — followed by each storage as an 8-byte element count and its bytes.

In both, a tensor is pickled as a call ``torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, ...)`` whose ``storage`` is a *persistent id* ``('storage', FloatStorage, key,
location, numel)`` that the loader resolves to the bytes.  We read the pickle with an
unpickler that knows exactly the few globals a state dict uses (OrderedDict, the tensor and
parameter rebuilders, the storage types) and refuses anything else, since unpickling an
arbitrary global can run arbitrary code.  Tensors come back as NumPy arrays.
"""
import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np

# the storage classes a tensor names, and the dtype of their elements
STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class _Storage:
    """A storage named by a persistent id; its bytes are attached once read."""

    def __init__(self, kind, key, numel):
        self.kind, self.key, self.numel = kind, str(key), int(numel)
        self.array = None


class _TensorRef:
    """What the tensor rebuilder returns: a view of a storage, made an array afterwards."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)


class _StorageType:
    def __init__(self, name):
        self.name = name


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
    return data


class _Unpickler(pickle.Unpickler):
    """Only what a state dict holds; anything else is refused before it is built."""

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise ValueError(f"{self.path!r} holds a pickled {module}.{name}, which is not part of "
                         f"a state dict of tensors; refusing to unpickle it (save "
                         f"model.state_dict(), not the model)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise ValueError(f"{self.path!r}: unexpected persistent id {pid!r:.80}")
        _, kind, key, _location, numel = pid[:5]
        if len(pid) > 5 and pid[5] is not None:
            raise ValueError(f"{self.path!r}: storage views (very old torch files) are not "
                             "supported; load and re-save it with a recent torch")
        if str(key) not in self.storages:
            self.storages[str(key)] = _Storage(kind.name, key, numel)
        return self.storages[str(key)]


def _bytes_to_array(raw, kind, numel, path):
    dtype = STORAGE_DTYPES[kind]
    if dtype == "bfloat16":  # the upper half of a float32
        half = np.frombuffer(raw, "<u2", count=numel)
        return (half.astype(np.uint32) << 16).view(np.float32)
    array = np.frombuffer(raw, np.dtype(dtype).newbyteorder("<"), count=numel)
    return array.astype(np.dtype(dtype).newbyteorder("="), copy=False)


def _materialise(obj, path):
    """Replace every _TensorRef in the unpickled object by a NumPy array (a copy)."""
    if isinstance(obj, _TensorRef):
        base = obj.storage.array
        itemsize = base.itemsize
        if all(n > 0 for n in obj.size):  # (a 0-d tensor has size () and one element)
            last = obj.offset + sum((n - 1) * s for n, s in zip(obj.size, obj.stride))
            if obj.offset < 0 or last >= base.size or any(s < 0 for s in obj.stride):
                raise ValueError(f"{path!r}: a tensor reaches outside its storage "
                                 f"{obj.storage.key}; the file is damaged")
        else:
            return np.zeros(obj.size, base.dtype)
        view = np.lib.stride_tricks.as_strided(
            base[obj.offset:], obj.size, tuple(s * itemsize for s in obj.stride))
        return np.array(view)
    if isinstance(obj, dict):
        return collections.OrderedDict((k, _materialise(v, path)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v, path) for v in obj)
    return obj


def _load_zip(path):
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pickles = [n for n in names if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path!r} is a zip file but not a torch.save file (no data.pkl)")
        prefix = pickles[0][:-len("data.pkl")]
        if f"{prefix}byteorder" in names and z.read(f"{prefix}byteorder") != b"little":
            raise ValueError(f"{path!r} was written on a big-endian machine; not supported")
        unpickler = _Unpickler(io.BytesIO(z.read(pickles[0])), path)
        obj = unpickler.load()
        for storage in unpickler.storages.values():
            entry = f"{prefix}data/{storage.key}"
            if entry not in names:
                raise ValueError(f"{path!r} lacks the tensor data {entry!r}; the file is "
                                 "damaged")
            raw = z.read(entry)
            itemsize = 2 if STORAGE_DTYPES[storage.kind] == "bfloat16" else \
                np.dtype(STORAGE_DTYPES[storage.kind]).itemsize
            if len(raw) < storage.numel * itemsize:
                raise ValueError(f"{path!r}: tensor data {entry!r} is shorter than its "
                                 "tensors; the file is damaged")
            storage.array = _bytes_to_array(raw, storage.kind, storage.numel, path)
    return _materialise(obj, path)


def _load_legacy(path):
    with open(path, "rb") as f:
        try:
            magic = pickle.load(f)
        except Exception:
            magic = None
        if magic != LEGACY_MAGIC:
            raise ValueError(f"{path!r} is not a PyTorch weights file (neither a zip nor "
                             "torch's legacy format)")
        if pickle.load(f) != LEGACY_PROTOCOL:
            raise ValueError(f"{path!r}: unknown legacy torch protocol version")
        _Unpickler(f, path).load()  # system information (byte order, sizes): plain values
        unpickler = _Unpickler(f, path)
        obj = unpickler.load()
        keys = _Unpickler(f, path).load()
        for key in keys:
            header = f.read(8)
            if len(header) < 8:
                raise ValueError(f"{path!r} ends before its tensor data; the file is "
                                 "truncated")
            (numel,) = struct.unpack("<q", header)
            storage = unpickler.storages.get(str(key))
            kind = storage.kind if storage is not None else "ByteStorage"
            itemsize = 2 if STORAGE_DTYPES[kind] == "bfloat16" else \
                np.dtype(STORAGE_DTYPES[kind]).itemsize
            raw = f.read(numel * itemsize)
            if len(raw) < numel * itemsize:
                raise ValueError(f"{path!r} ends inside its tensor data; the file is "
                                 "truncated")
            if storage is not None:
                storage.array = _bytes_to_array(raw, kind, numel, path)
    missing = [s.key for s in unpickler.storages.values() if s.array is None]
    if missing:
        raise ValueError(f"{path!r} lacks the data of storages {missing[:5]}; the file is "
                         "damaged")
    return _materialise(obj, path)


def load(path):
    """The object ``torch.save`` wrote to ``path``, tensors as NumPy arrays; only state-dict
    contents (dicts, lists, numbers, strings, tensors) are accepted."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # a zip whose directory (at its end) is missing
                raise ValueError(f"{path!r} is not a readable PyTorch weights file: a zip "
                                 "that ends early (truncated download?)")
        return _load_legacy(path)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # a truncated zip or pickle, an unpickling error
        raise ValueError(f"{path!r} is not a readable PyTorch weights file "
                         f"({type(e).__name__}: {e})") from None


def state_dict(path):
    """A state dict (name -> array) from a ``.pth`` file: the file's dict itself, or the one
    under a ``state_dict`` or ``model`` key (training checkpoints); a ``module.`` prefix
    (DataParallel) is dropped."""
    obj = load(path)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{os.fspath(path)!r} holds no state dict (a dict of tensors)")
    arrays = {}
    for k, v in obj.items():
        if isinstance(v, np.ndarray):
            arrays[k[7:] if k.startswith("module.") else k] = v
    if not arrays:
        raise ValueError(f"{os.fspath(path)!r} holds no tensors")
    return arrays


def save(path, arrays):
    """Write a state dict of arrays as a ``.pth`` file with PyTorch (which must be installed);
    atomically."""
    try:
        import torch
    except ImportError:
        raise ImportError("writing a .pth file needs PyTorch (pip install torch); write .npz "
                          "instead") from None
    from .models import atomic_write

    state = collections.OrderedDict((k, torch.from_numpy(np.array(v, order="C")))
                                    for k, v in arrays.items())
    with atomic_write(path) as f:
        torch.save(state, f)
