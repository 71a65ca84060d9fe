"""EfficientNet-Lite0: the Keras network against an independent NumPy forward pass."""

import numpy as np
import pytest

import keras_transfer as kt
from efficientnet_lite_reference import BLOCKS, lite0_logits
from keras_transfer.efficientnet_lite import efficientnet_lite0, lite0_checkpoint
from keras_transfer.errors import WeightsError


def random_state(seed=0):
    """A state dict in the checkpoint's naming with random values (shapes from the reference)."""
    rng = np.random.default_rng(seed)
    state = {}

    def conv(name, out, inp, k):
        state[name + ".weight"] = rng.standard_normal((out, inp, k, k)) * np.sqrt(2 / (inp * k * k))

    def bn(name, c):
        state.update({name + ".weight": rng.uniform(0.5, 1.5, c), name + ".bias": rng.normal(0, .1, c),
                      name + ".running_mean": rng.normal(0, .1, c),
                      name + ".running_var": rng.uniform(0.5, 1.5, c)})

    conv("_conv_stem", 32, 3, 3)
    bn("_bn0", 32)
    channels = 32
    for i, (kernel, _, expansion, out) in enumerate(BLOCKS):
        p, hidden = f"_blocks.{i}.", channels * expansion
        if expansion != 1:
            conv(p + "_expand_conv", hidden, channels, 1)
            bn(p + "_bn0", hidden)
        conv(p + "_depthwise_conv", hidden, 1, kernel)
        bn(p + "_bn1", hidden)
        conv(p + "_project_conv", out, hidden, 1)
        bn(p + "_bn2", out)
        channels = out
    conv("_conv_head", 1280, channels, 1)
    bn("_bn1", 1280)
    state["_fc.weight"] = rng.standard_normal((1000, 1280)) * 0.03
    state["_fc.bias"] = rng.normal(0, 0.1, 1000)
    return {k: v.astype(np.float32) for k, v in state.items()}


def test_lite0_matches_numpy_reference_on_a_small_image():
    # Even sides: each stride-2 "same" convolution pads one pixel more at the end.
    state = random_state()
    model = efficientnet_lite0((32, 32, 3), include_top=True, weights=state,
                               classifier_activation=None)
    image = np.random.default_rng(1).uniform(0, 255, (32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(model(image[None]))[0], lite0_logits(state, image),
                               atol=1e-4)


def test_lite0_refuses_a_missing_checkpoint(tmp_path):
    with pytest.raises(WeightsError, match="neither 'imagenet', None"):
        efficientnet_lite0((32, 32, 3), weights=str(tmp_path / "missing.pth"))


@pytest.mark.large
def test_lite0_imagenet_matches_numpy_reference_on_chelsea():
    import skimage.data

    from keras_transfer.torch_checkpoint import load_torch_state_dict

    spec = kt.get_backbone_spec("efficientnet_lite0_torch")
    assert spec.build((224, 224, 3), weights="imagenet").output_shape == (None, 7, 7, 1280)
    model = efficientnet_lite0(include_top=True, weights="imagenet", classifier_activation=None)
    image = np.asarray(kt.torchvision_eval_crop(skimage.data.chelsea()), np.float32)
    logits = np.asarray(model(image[None]))[0]
    reference = lite0_logits(load_torch_state_dict(lite0_checkpoint()), image)
    np.testing.assert_allclose(logits, reference, atol=1e-4)
    top5 = [name for _, name, _ in kt.imagenet_top_k(np.exp(logits) / np.exp(logits).sum(), 5)]
    assert top5[0] in {"tiger_cat", "Egyptian_cat", "tabby"}, top5
