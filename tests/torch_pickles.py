"""Writing PyTorch checkpoints byte by byte, as torch.save does, without torch (for tests).

Pickles are written opcode by opcode (protocol 2): tensors are calls of
`torch._utils._rebuild_tensor_v2` on storages named by persistent ids.
"""

import collections
import dataclasses
import struct
import zipfile

import numpy as np

from keras_transfer.torch_checkpoint import MAGIC_NUMBER, PROTOCOL_VERSION


@dataclasses.dataclass(frozen=True)
class Global:
    module: str
    name: str


@dataclasses.dataclass(frozen=True)
class Call:
    function: Global
    args: tuple


@dataclasses.dataclass(frozen=True)
class PersistentId:
    pid: tuple


@dataclasses.dataclass(frozen=True)
class Build:
    """The BUILD opcode: `obj.__setstate__(state)`, or its `__dict__` updated."""

    obj: object
    state: object


@dataclasses.dataclass(frozen=True)
class Tensor:
    key: str
    offset: int
    shape: tuple
    stride: tuple


STORAGE_TYPES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
                 np.dtype(np.float64): "DoubleStorage", np.dtype(np.int64): "LongStorage",
                 np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage"}


def opcodes(obj, storages, legacy) -> bytes:
    """The pickle opcodes that build `obj` (protocol 2)."""
    def enc(value):
        return opcodes(value, storages, legacy)

    if isinstance(obj, Tensor):
        data = storages[obj.key]
        pid = ("storage", Global("torch", STORAGE_TYPES[data.dtype]), obj.key, "cpu", data.size)
        if legacy:
            pid += (None,)
        return enc(Call(Global("torch._utils", "_rebuild_tensor_v2"),
                        (PersistentId(pid), obj.offset, obj.shape, obj.stride, False,
                         collections.OrderedDict())))
    if isinstance(obj, Global):
        return b"c" + f"{obj.module}\n{obj.name}\n".encode()
    if isinstance(obj, Call):
        return enc(obj.function) + enc(obj.args) + b"R"
    if isinstance(obj, Build):
        return enc(obj.obj) + enc(obj.state) + b"b"
    if isinstance(obj, PersistentId):
        return enc(obj.pid) + b"Q"
    if obj is None:
        return b"N"
    if isinstance(obj, bool):
        return b"\x88" if obj else b"\x89"
    if isinstance(obj, int):
        if 0 <= obj < 2**31:
            return b"J" + struct.pack("<i", obj)
        raw = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
        return b"\x8a" + bytes([len(raw)]) + raw
    if isinstance(obj, float):
        return b"G" + struct.pack(">d", obj)
    if isinstance(obj, str):
        raw = obj.encode()
        return b"X" + struct.pack("<I", len(raw)) + raw
    if isinstance(obj, tuple):
        return b"(" + b"".join(map(enc, obj)) + b"t"
    if isinstance(obj, list):
        return b"](" + b"".join(map(enc, obj)) + b"e"
    if isinstance(obj, collections.OrderedDict):
        items = b"".join(enc(k) + enc(v) for k, v in obj.items())
        return enc(Call(Global("collections", "OrderedDict"), ())) + b"(" + items + b"u"
    if isinstance(obj, dict):
        return b"}(" + b"".join(enc(k) + enc(v) for k, v in obj.items()) + b"u"
    raise TypeError(obj)


def dumps(obj, storages=None, legacy=False) -> bytes:
    return b"\x80\x02" + opcodes(obj, storages or {}, legacy) + b"."


def write_legacy(path, obj, storages):
    """The layout of torch.save(..., _use_new_zipfile_serialization=False)."""
    sys_info = {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    keys = sorted(storages)
    with open(path, "wb") as f:
        for part in (MAGIC_NUMBER, PROTOCOL_VERSION, sys_info):
            f.write(dumps(part))
        f.write(dumps(obj, storages, legacy=True))
        f.write(dumps(keys))
        for key in keys:
            f.write(struct.pack("<q", storages[key].size) + storages[key].tobytes())


def write_zip(path, obj, storages):
    """The layout of torch.save in torch >= 1.6 (records stored, not compressed)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", dumps(obj, storages))
        z.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data.tobytes())
        z.writestr("archive/version", "3\n")

