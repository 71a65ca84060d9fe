"""Reading PyTorch checkpoints without PyTorch.

`torch.save` writes pickles, and a pickle is a program: unpickling an untrusted
checkpoint with `pickle` (or `torch.load(weights_only=False)`) can run any
code. This module reads the two formats of `torch.save` into NumPy arrays with
an unpickler that admits only what tensors are made of: the functions that
rebuild tensors and parameters, the storage types, `collections.OrderedDict`
and `torch.Size`. Any other global in the file is refused before anything is
imported or called.

The two formats:

- *zip* (torch >= 1.6): a zip archive holding `<name>/data.pkl` (the object
  pickle, tensors referring to storages by key) and one raw record
  `<name>/data/<key>` per storage.
- *legacy* (torch < 1.6, or `_use_new_zipfile_serialization=False`): five
  pickles in a row (magic number, protocol version, system info, the object,
  the sorted storage keys), then every storage as its element count (int64)
  followed by its raw bytes.

Each storage is read once into memory and each tensor that covers a whole
storage alone uses that memory without a copy, so loading needs about the
file's size. Views (shared storages, offsets, strides) are bounds-checked
and copied.

Example:

```python
from keras_transfer.torch_checkpoint import load_torch_state_dict
state = load_torch_state_dict("resnet50.pth")
state["conv1.weight"].shape        # (64, 3, 7, 7)
```
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import tarfile
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from keras_transfer.errors import WeightsError

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # first pickle of a legacy file
PROTOCOL_VERSION = 1001  # second pickle of a legacy file

# The keys under which training scripts commonly nest the state dict.
NESTED_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


def _bfloat16():
    # lazy: only bfloat16 storages need it (a dependency of Keras, not of this module)
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


# torch storage type -> NumPy dtype (a callable for the optional ones).
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": _bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexDoubleStorage": np.complex128,
    "ComplexFloatStorage": np.complex64,
    "UntypedStorage": np.uint8,
}

# torch dtypes that appear as globals (`torch.uint16`) in `_rebuild_tensor_v3`,
# which torch uses for dtypes that have no storage type of their own.
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64,
    "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16,
    "bfloat16": _bfloat16,
    "int64": np.int64, "long": np.int64,
    "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16,
    "int8": np.int8, "uint8": np.uint8,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "bool": np.bool_,
    "complex128": np.complex128, "complex64": np.complex64,
}


# The stand-ins below are frozen and slotted: a pickle's BUILD opcode could
# otherwise rewrite their attributes (a stride, an offset) after they were checked.


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
    """Stands for `torch.FloatStorage` etc. while unpickling."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True, slots=True)
class _Dtype:
    """Stands for `torch.float32` etc. while unpickling."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class _Storage:
    """A storage named by the pickle; its bytes are read afterwards.

    A legacy storage *view* (`base` set) is the slice `[offset, offset+numel)`
    of another storage, in elements.
    """

    key: str
    dtype: np.dtype
    numel: int
    base: _Storage | None = None
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def root(self) -> _Storage:
        return self if self.base is None else self.base.root


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class _TensorRef:
    """A tensor made by a rebuild function: a view of a storage."""

    storage: _Storage
    offset: int
    shape: tuple
    stride: tuple
    dtype: np.dtype | None = None  # only `_rebuild_tensor_v3` gives one


def _tensor_ref(storage, storage_offset, size, stride, dtype=None) -> _TensorRef:
    """Checks what a pickle passed to a rebuild function, then records the view."""
    if not isinstance(storage, _Storage):
        raise WeightsError(f"Received a tensor whose storage is {type(storage).__name__}, "
                           "not a storage: the checkpoint is malformed.")
    size, stride = tuple(size), tuple(stride)
    values = (storage_offset, *size, *stride)
    if len(size) != len(stride) or not all(isinstance(v, int) and v >= 0 for v in values):
        raise WeightsError(f"Received a tensor with offset {storage_offset!r}, size {size!r} "
                           f"and stride {stride!r}: expected non-negative integers, one "
                           "stride per dimension. The checkpoint is malformed.")
    return _TensorRef(storage, storage_offset, size, stride, dtype)


# Safe stand-ins for torch's rebuild functions: they only record the view.
def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor_ref(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _tensor_ref(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    if not isinstance(dtype, _Dtype):
        raise WeightsError(f"Received a tensor of dtype {dtype!r}: the checkpoint is malformed.")
    return _tensor_ref(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, _TensorRef):
        raise WeightsError(f"Received a parameter holding {type(data).__name__}, not a "
                           "tensor: the checkpoint is malformed.")
    return data


def _size(*args):
    return tuple(*args)


def _allowed_global(module: str, name: str):
    """The object standing for the global `module.name`, or None if refused."""
    if module == "torch._utils":
        return {
            "_rebuild_tensor": _rebuild_tensor,
            "_rebuild_tensor_v2": _rebuild_tensor_v2,
            "_rebuild_tensor_v3": _rebuild_tensor_v3,
            "_rebuild_parameter": _rebuild_parameter,
            "_rebuild_parameter_with_state": _rebuild_parameter,
        }.get(name)
    if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
    if module == "torch" and name == "Size":
        return _size
    # Checkpoints saved from a GPU by old versions name torch.cuda.FloatStorage.
    if module in ("torch", "torch.cuda", "torch.storage") and name in _STORAGE_DTYPES:
        return _StorageType(name, _as_dtype(_STORAGE_DTYPES[name]))
    if module == "torch" and name in _TORCH_DTYPES:
        return _Dtype(name, _as_dtype(_TORCH_DTYPES[name]))
    return None


def _as_dtype(dtype) -> np.dtype:
    return dtype() if callable(dtype) and not isinstance(dtype, type) else np.dtype(dtype)


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves no global outside `_allowed_global`.

    `find_class` is the only way a pickle reaches a callable (the opcodes
    GLOBAL, STACK_GLOBAL, INST and EXT* all go through it), so refusing there
    means nothing is imported and nothing outside the allow-list is called.
    """

    def __init__(self, file, path, persistent_load=None):
        super().__init__(file, encoding="utf-8")
        self._path = path
        self._persistent = persistent_load

    def find_class(self, module, name):
        found = _allowed_global(module, name)
        if found is None:
            raise WeightsError(
                f"{self._path!r} refers to the Python global '{module}.{name}', which this "
                "reader does not run: a checkpoint is a program, and only tensors, storages "
                "and (ordered) dicts are read from it. Save a state dict of tensors "
                "(torch.save(model.state_dict(), path)) rather than a whole model or other "
                "Python objects.")
        return found

    def persistent_load(self, pid):
        if self._persistent is None:
            raise WeightsError(f"{self._path!r} holds a storage reference where none may be.")
        return self._persistent(pid)


def _unpickle(file, path, persistent_load=None):
    return _RestrictedUnpickler(file, path, persistent_load).load()


class _Reader:
    """Collects the storages a pickle names, then turns tensors into arrays."""

    def __init__(self, path: str, zip_format: bool):
        self.path = path
        self.zip_format = zip_format
        self.storages: dict[str, _Storage] = {}
        self.views: dict[str, _Storage] = {}
        self.data: dict[str, np.ndarray] = {}  # root storage key -> its elements, 1-D

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise WeightsError(
                f"{self.path!r} holds the persistent reference {str(pid)[:80]!r}; only "
                "storages are read (a 'module' reference means a whole model was saved: "
                "save its state_dict() instead).")
        expected = 5 if self.zip_format else 6
        if len(pid) != expected:
            raise WeightsError(f"{self.path!r} holds a malformed storage reference {pid!r}.")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise WeightsError(f"{self.path!r} holds a malformed storage reference {pid!r}.")
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, storage_type.dtype, numel)
        elif storage.dtype != storage_type.dtype or storage.numel != numel:
            raise WeightsError(
                f"{self.path!r} names storage {key!r} twice with different types or sizes "
                f"({storage.dtype}[{storage.numel}] and {storage_type.dtype}[{numel}]).")
        view = None if self.zip_format else pid[5]
        if view is None:
            return storage
        # Storage views: only written by very old (pre-0.4) versions of torch.
        view_key, offset, view_numel = view
        view_key = str(view_key)
        if view_key not in self.views:
            if not (isinstance(offset, int) and isinstance(view_numel, int)
                    and 0 <= offset and 0 <= view_numel and offset + view_numel <= numel):
                raise WeightsError(f"{self.path!r} holds a storage view {view!r} outside "
                                   f"its storage of {numel} elements.")
            self.views[view_key] = _Storage(view_key, storage.dtype, view_numel, storage, offset)
        return self.views[view_key]

    def to_arrays(self, obj):
        """Replaces every tensor in `obj` (nested dicts, lists, tuples) by an array."""
        refs: list[_TensorRef] = []
        _collect(obj, refs, set())
        users = collections.Counter(ref.storage.root.key for ref in refs)
        arrays = {id(ref): self._array(ref, users[ref.storage.root.key] == 1) for ref in refs}
        return _replace(obj, arrays)

    def _storage_array(self, storage: _Storage) -> np.ndarray:
        if storage.base is None:
            return self.data[storage.key]
        return self._storage_array(storage.base)[storage.offset:storage.offset + storage.numel]

    def _array(self, ref: _TensorRef, alone: bool) -> np.ndarray:
        data = self._storage_array(ref.storage)
        if ref.dtype is not None and ref.dtype != data.dtype:
            if data.nbytes % ref.dtype.itemsize:
                raise WeightsError(
                    f"{self.path!r}: storage {ref.storage.key!r} of {data.nbytes} bytes cannot "
                    f"hold {ref.dtype} elements.")
            data = data.view(ref.dtype)
        count = int(np.prod(ref.shape))
        if count == 0:
            return np.zeros(ref.shape, data.dtype)
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
        if last >= data.size:
            raise WeightsError(
                f"{self.path!r}: a tensor of shape {ref.shape}, stride {ref.stride} and offset "
                f"{ref.offset} reaches element {last} of storage {ref.storage.key!r}, which "
                f"holds {data.size}. The checkpoint is malformed.")
        if ref.stride == _contiguous_strides(ref.shape):
            array = data[ref.offset:ref.offset + count].reshape(ref.shape)
            # A tensor alone on its whole storage keeps the storage's memory.
            return array if alone and count == data.size else array.copy()
        strided = np.lib.stride_tricks.as_strided(
            data[ref.offset:], shape=ref.shape,
            strides=[s * data.itemsize for s in ref.stride], writeable=False)
        return strided.copy()

    def read_storage(self, storage: _Storage, file, nbytes: int, byteorder: str,
                     available: int):
        """Reads `nbytes` from `file`; `available` bounds them before any allocation."""
        if nbytes != storage.nbytes:
            raise WeightsError(
                f"{self.path!r}: storage {storage.key!r} holds {nbytes} bytes, but the "
                f"checkpoint's tensors describe {storage.nbytes} ({storage.numel} x "
                f"{storage.dtype}). The file is corrupt.")
        buffer = bytearray(nbytes) if nbytes <= available else None
        got = file.readinto(buffer) if buffer else min(nbytes, available)
        if got != nbytes:
            raise WeightsError(
                f"{self.path!r} is truncated: storage {storage.key!r} needs {nbytes} bytes "
                f"and the file holds only {got} of them. Download or copy it again.")
        dtype = storage.dtype.newbyteorder("<" if byteorder == "little" else ">")
        data = np.frombuffer(buffer, dtype)
        self.data[storage.key] = data if dtype.isnative or dtype.itemsize == 1 else data.astype(
            storage.dtype)


def _contiguous_strides(shape) -> tuple:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _collect(obj, refs, seen):
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, _TensorRef):
        refs.append(obj)
    elif isinstance(obj, Mapping):
        for value in obj.values():
            _collect(value, refs, seen)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _collect(value, refs, seen)


def _replace(obj, arrays):
    if isinstance(obj, _TensorRef):
        return arrays[id(obj)]
    if isinstance(obj, _Storage):
        raise WeightsError("The checkpoint holds a bare storage outside any tensor; only "
                           "tensors are read.")
    if isinstance(obj, Mapping):
        return type(obj)((key, _replace(value, arrays)) for key, value in obj.items())
    if isinstance(obj, list):
        return [_replace(value, arrays) for value in obj]
    if isinstance(obj, tuple):
        return tuple(_replace(value, arrays) for value in obj)
    return obj


def _load_zip(path: str):
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise WeightsError(
            f"{path!r} starts like a zip checkpoint (torch >= 1.6) but cannot be opened as "
            f"one ({error}): it is probably truncated ({os.path.getsize(path)} bytes). "
            "Download or copy it again.") from error
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise WeightsError(
                f"{path!r} is a zip archive without a single '<name>/data.pkl' record "
                f"(found {pickles}): not a checkpoint written by torch.save.")
        prefix = pickles[0][: -len("data.pkl")]
        names = set(archive.namelist())
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode("ascii").strip()
        reader = _Reader(path, zip_format=True)
        with archive.open(pickles[0]) as file:
            obj = _unpickle(file, path, reader.persistent_load)
        for key, storage in reader.storages.items():
            record = f"{prefix}data/{key}"
            if record not in names:
                raise WeightsError(f"{path!r} lacks the record {record!r} of a storage its "
                                   "tensors use: the archive is incomplete.")
            info = archive.getinfo(record)
            # torch stores records uncompressed: one cannot be larger than the file.
            available = (os.path.getsize(path) if info.compress_type == zipfile.ZIP_STORED
                         else info.file_size)
            with archive.open(record) as file:
                reader.read_storage(storage, file, info.file_size, byteorder, available)
        return reader.to_arrays(obj)


def _load_legacy(path: str):
    reader = _Reader(path, zip_format=False)
    with open(path, "rb") as file:
        magic = _unpickle(file, path)
        if magic != MAGIC_NUMBER:
            raise WeightsError(f"{path!r} is not a PyTorch checkpoint (its first pickle is "
                               f"{str(magic)[:40]!r}, not torch's magic number).")
        protocol = _unpickle(file, path)
        if protocol != PROTOCOL_VERSION:
            raise WeightsError(f"{path!r} has legacy protocol version {protocol!r}; only "
                               f"{PROTOCOL_VERSION} is read.")
        sys_info = _unpickle(file, path)
        little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
        byteorder = "little" if little else "big"
        obj = _unpickle(file, path, reader.persistent_load)
        keys = _unpickle(file, path)
        if not isinstance(keys, list) or set(map(str, keys)) != set(reader.storages):
            raise WeightsError(f"{path!r}: the list of stored storages does not match the "
                               "storages its tensors use. The file is corrupt.")
        for key in keys:
            storage = reader.storages[str(key)]
            header = file.read(8)
            if len(header) != 8:
                raise WeightsError(
                    f"{path!r} is truncated: it ends before storage {str(key)!r}. "
                    "Download or copy it again.")
            numel = int.from_bytes(header, byteorder, signed=True)
            available = os.fstat(file.fileno()).st_size - file.tell()
            reader.read_storage(storage, file, numel * storage.dtype.itemsize, byteorder,
                                available)
    return reader.to_arrays(obj)


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
    """Reads a file written by `torch.save`, every tensor as a NumPy array.

    Both formats are read (zip, torch >= 1.6, and legacy). Only tensors,
    parameters, storages, dicts, ordered dicts, lists, tuples and plain
    values are admitted; any other Python global in the file raises
    `WeightsError` before it is imported or called.

    Args:
        path: str. A `.pth`/`.pt` file.

    Returns:
        The saved object with tensors replaced by `np.ndarray`s (containers
        keep their type; a tensor on its own whole storage shares its memory,
        views are copies). bfloat16 tensors come back as `ml_dtypes.bfloat16`.

    Raises:
        WeightsError: for a missing, truncated, corrupt or unsafe file.

    Example:
        >>> checkpoint = load_torch_checkpoint("checkpoint.pth")
        >>> checkpoint["epoch"], checkpoint["state_dict"]["fc.bias"].shape
        (90, (10,))
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"Received checkpoint path {path!r}, which is not a file. Pass the "
                           "path of a file written by torch.save (.pth, .pt).")
    with open(path, "rb") as file:
        head = file.read(4)
    try:
        if head.startswith(b"PK\x03\x04"):
            return _load_zip(path)
        if head[:1] == b"\x80":
            return _load_legacy(path)
        if tarfile.is_tarfile(path):
            raise WeightsError(
                f"{path!r} is a tar archive, the format of torch < 0.4: load it with an old "
                "torch and save it again with torch.save(state_dict, path).")
    except WeightsError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
            AttributeError, IndexError, UnicodeDecodeError, zipfile.BadZipFile,
            io.UnsupportedOperation) as error:
        raise WeightsError(
            f"Could not read {path!r} as a PyTorch checkpoint: {type(error).__name__}: "
            f"{error}. A file that ends early is truncated: download or copy it again."
        ) from error
    raise WeightsError(f"{path!r} is not a PyTorch checkpoint (it starts with {head!r}). Pass "
                       "a file written by torch.save.")


def load_torch_state_dict(path: str | os.PathLike, key: str | None = None
                          ) -> dict[str, np.ndarray]:
    """Reads the state dict of a PyTorch checkpoint as `{name: array}`.

    The state dict is the checkpoint itself, or what it holds under `key`,
    or else under the first of `NESTED_STATE_DICT_KEYS` (`"state_dict"`,
    `"model_state_dict"`, `"model"`) that is a dict, repeatedly (so
    `{"model": {"state_dict": ...}}` works). Nested dicts inside it are
    flattened with dots; entries that are not tensors (an epoch counter) are
    left out.

    Args:
        path: str. A file written by `torch.save`, in either format.
        key: str, optional. The key of the state dict inside the checkpoint.

    Returns:
        An insertion-ordered `dict[str, np.ndarray]`.

    Raises:
        WeightsError: for an unreadable or unsafe file, a missing `key`, or
            a checkpoint without tensors.

    Example:
        >>> state = load_torch_state_dict("mobilenet_v2-b0353104.pth")
        >>> state["features.0.0.weight"].shape
        (32, 3, 3, 3)
    """
    obj = load_torch_checkpoint(path)
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            keys = list(obj)[:12] if isinstance(obj, Mapping) else type(obj).__name__
            raise WeightsError(f"Received key={key!r}, which {os.fspath(path)!r} lacks; it "
                               f"holds {keys}.")
        obj = obj[key]
    else:
        while isinstance(obj, Mapping):
            nested = next((obj[k] for k in NESTED_STATE_DICT_KEYS
                           if isinstance(obj.get(k), Mapping)), None)
            if nested is None:
                break
            obj = nested
    state: dict[str, np.ndarray] = {}
    _flatten(obj, "", state)
    if not state:
        raise WeightsError(
            f"{os.fspath(path)!r} holds no tensors where a state dict was expected (found "
            f"{type(obj).__name__}). Pass key= naming the entry that holds the state dict.")
    return state


def _flatten(obj, prefix, out):
    if isinstance(obj, np.ndarray):
        out[prefix] = obj
    elif isinstance(obj, Mapping):
        for name, value in obj.items():
            _flatten(value, f"{prefix}.{name}" if prefix else str(name), out)
