"""The PyTorch checkpoint reader, on files the tests write byte by byte (torch_pickles.py)."""

import collections
import struct
import sys
import zipfile

import numpy as np
import pytest
from torch_pickles import Build, Call, Global, Tensor, dumps, write_legacy, write_zip

from keras_transfer.errors import WeightsError
from keras_transfer.torch_checkpoint import load_torch_checkpoint, load_torch_state_dict

WRITERS = {"legacy": write_legacy, "zip": write_zip}

# --- a checkpoint with views, shared storages, offsets and several dtypes -----------

BASE = np.arange(30, dtype=np.float32) * 0.5 - 3.0  # storage "0", seen as (5, 6)
STORAGES = {
    "0": BASE,
    "1": np.array([1.5, -2.25, 65504.0], np.float16),
    "2": np.array([7], np.int64),
    "3": np.arange(6, dtype=np.uint8),
    "4": np.array([True, False, True, True]),
    "5": np.array([[1e300, -1e-300]], np.float64).ravel(),
}
STATE = collections.OrderedDict([
    ("conv.weight", Tensor("0", 0, (5, 6), (6, 1))),
    ("conv.weight_t", Tensor("0", 0, (6, 5), (1, 6))),        # shared, non-contiguous
    ("conv.tail", Tensor("0", 12, (3, 6), (6, 1))),           # shared, offset
    ("conv.strided", Tensor("0", 1, (3, 3), (12, 2))),        # offset and strides
    ("conv.broadcast", Tensor("0", 4, (2, 3), (0, 1))),       # stride 0
    ("bn.half", Tensor("1", 0, (3,), (1,))),
    ("bn.num_batches_tracked", Tensor("2", 0, (), ())),       # scalar
    ("bytes", Tensor("3", 2, (2, 2), (1, 2))),
    ("mask", Tensor("4", 0, (4,), (1,))),
    ("double", Tensor("5", 0, (2,), (1,))),
])
GRID = BASE.reshape(5, 6)
EXPECTED = {
    "conv.weight": GRID,
    "conv.weight_t": GRID.T,
    "conv.tail": GRID[2:],
    "conv.strided": np.array([[BASE[1 + 12 * i + 2 * j] for j in range(3)] for i in range(3)]),
    "conv.broadcast": np.stack([BASE[4:7], BASE[4:7]]),
    "bn.half": STORAGES["1"],
    "bn.num_batches_tracked": np.array(7, np.int64),
    "bytes": np.array([[2, 4], [3, 5]], np.uint8),
    "mask": STORAGES["4"],
    "double": STORAGES["5"],
}


@pytest.mark.parametrize("layout", ["legacy", "zip"])
def test_reads_known_arrays_of_both_formats(tmp_path, layout):
    path = tmp_path / "state.pth"
    WRITERS[layout](path, STATE, STORAGES)
    state = load_torch_state_dict(path)
    assert list(state) == list(EXPECTED)
    for name, want in EXPECTED.items():
        got = state[name]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("layout", ["legacy", "zip"])
def test_tensors_on_a_shared_storage_are_independent_arrays(tmp_path, layout):
    path = tmp_path / "state.pth"
    WRITERS[layout](path, STATE, STORAGES)
    state = load_torch_state_dict(path)
    state["conv.weight"][0, 0] = 100.0
    assert state["conv.weight_t"][0, 0] == BASE[0]
    assert state["conv.tail"][0, 0] == BASE[12]


@pytest.mark.parametrize("layout", ["legacy", "zip"])
def test_nested_state_dict_keys_and_other_entries(tmp_path, layout):
    path = tmp_path / "checkpoint.pth"
    checkpoint = {"epoch": 12, "model": {"state_dict": STATE}, "best": 0.75,
                  "history": [1, 2]}
    WRITERS[layout](path, checkpoint, STORAGES)
    raw = load_torch_checkpoint(path)
    assert raw["epoch"] == 12 and raw["best"] == 0.75 and raw["history"] == [1, 2]
    assert isinstance(raw["model"]["state_dict"], collections.OrderedDict)
    assert list(load_torch_state_dict(path)) == list(EXPECTED)
    # An explicit key gives that entry, flattened with dots.
    flat = load_torch_state_dict(path, key="model")
    assert list(flat) == [f"state_dict.{name}" for name in EXPECTED]
    with pytest.raises(WeightsError, match="key='optimizer'.*'epoch'"):
        load_torch_state_dict(path, key="optimizer")


def _evil_state(marker):
    # A tensor that is in fact `os.system("touch marker")`.
    return {"weight": Call(Global("os", "system"), (f"touch {marker}",))}


@pytest.mark.parametrize("layout", ["legacy", "zip"])
def test_a_forbidden_global_is_refused_and_never_runs(tmp_path, layout):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    WRITERS[layout](path, _evil_state(marker), {})
    with pytest.raises(WeightsError, match=r"'os\.system'"):
        load_torch_state_dict(path)
    assert not marker.exists()
    # Control: the same bytes through a plain unpickler do run the command.
    if layout == "zip":
        import pickle

        with zipfile.ZipFile(path) as z:
            pickle.loads(z.read("archive/data.pkl"))
        assert marker.exists()


def test_a_forbidden_module_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    module = tmp_path / "kt_side_effect_module.py"
    module.write_text(f"open({str(marker)!r}, 'w').close()\nvalue = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "evil.pth"
    write_zip(path, {"weight": Global("kt_side_effect_module", "value")}, {})
    with pytest.raises(WeightsError, match="kt_side_effect_module.value"):
        load_torch_checkpoint(path)
    assert not marker.exists() and "kt_side_effect_module" not in sys.modules


@pytest.mark.parametrize("state", [{"stride": (-6, 1)}, (None, {"offset": 10**9})])
def test_a_tensor_cannot_be_rewritten_after_its_checks(tmp_path, state):
    # BUILD on a checked tensor could otherwise give it a stride that reads
    # memory outside its storage.
    path = tmp_path / "state.pth"
    write_zip(path, {"w": Build(Tensor("0", 0, (5, 6), (6, 1)), state)}, {"0": BASE})
    with pytest.raises(WeightsError, match="Could not read"):
        load_torch_state_dict(path)


def test_a_storage_larger_than_the_file_is_refused_before_allocating(tmp_path):
    class Claimed:  # a storage header claiming 4 TiB of float32, then 120 bytes
        dtype, size = np.dtype(np.float32), 1 << 40

        def tobytes(self):
            return BASE.tobytes()

    path = tmp_path / "state.pth"
    write_legacy(path, {"w": Tensor("0", 0, (1 << 40,), (1,))}, {"0": Claimed()})
    with pytest.raises(WeightsError, match="truncated.*needs 4398046511104 bytes.*only 120"):
        load_torch_state_dict(path)


@pytest.mark.parametrize("layout", ["legacy", "zip"])
@pytest.mark.parametrize("keep", [0.3, 0.9, -7])
def test_a_truncated_file_is_refused_clearly(tmp_path, layout, keep):
    path = tmp_path / "state.pth"
    WRITERS[layout](path, STATE, STORAGES)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)] if keep > 0 else data[:keep])
    with pytest.raises(WeightsError, match="truncated"):
        load_torch_state_dict(path)


def test_the_legacy_storage_size_must_match_its_tensors(tmp_path):
    path = tmp_path / "state.pth"
    write_legacy(path, STATE, STORAGES)
    data = bytearray(path.read_bytes())
    # The size header of the first storage ("0", 30 floats) is just after the key list.
    header = data.index(struct.pack("<q", BASE.size) + BASE.tobytes()[:8])
    data[header:header + 8] = struct.pack("<q", BASE.size + 1)
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="storage '0'"):
        load_torch_state_dict(path)


def test_a_view_outside_its_storage_is_refused(tmp_path):
    # as_strided on such a view would read memory after the buffer.
    path = tmp_path / "state.pth"
    write_zip(path, {"w": Tensor("0", 20, (3, 6), (6, 1))}, {"0": BASE})
    with pytest.raises(WeightsError, match="reaches element 37.*holds 30"):
        load_torch_state_dict(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        load_torch_checkpoint(path)
    with pytest.raises(WeightsError, match="not a file"):
        load_torch_checkpoint(tmp_path / "missing.pth")
    path.write_bytes(dumps({"a": 1}))  # a pickle, but not torch.save's
    with pytest.raises(WeightsError, match="magic number"):
        load_torch_checkpoint(path)
