"""The plain-Keras models the throughput benchmarks compare with (any backend).

The keras.io transfer-learning recipe written out by hand: the backbone's own
preprocessing with `keras.ops`, the `keras.applications` network without its
top (called in inference mode, so BatchNormalization keeps its statistics),
global average pooling; then every weight but BatchNormalization's trains.
Only the constructor name and the preprocessing mode come from the
keras_transfer registry.
"""

from __future__ import annotations

import keras
import numpy as np

import keras_transfer as kt


def flat_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's layers, nested models flattened."""
    out = []
    for layer in model.layers:
        out.extend(flat_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return out


def preprocess(x, mode: str):
    """Maps raw 0-255 pixels to what the backbone expects, with `keras.ops`.

    Args:
        x: a float32 KerasTensor of images.
        mode: str. `"tf"`, `"torch"`, `"caffe"` or `"none"`, as named by
            `keras.applications.imagenet_utils`.

    Returns:
        The preprocessed KerasTensor.
    """
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "torch":
        mean = np.array([0.485, 0.456, 0.406], "float32")
        std = np.array([0.229, 0.224, 0.225], "float32")
        return (x / 255.0 - mean) / std
    if mode == "caffe":
        return keras.ops.flip(x, axis=-1) - np.array([103.939, 116.779, 123.68], "float32")
    return x


def pooled_features(backbone: str, pixels):
    """The pooled features of a `keras.applications` backbone for 0-255 `pixels`.

    Args:
        backbone: str. A keras_transfer registry name, e.g. `"mobilenet_v2"`.
        pixels: a KerasTensor `(None, H, W, 3)` of 0-255 images (any dtype).

    Returns:
        The pooled KerasTensor; the backbone network in it is unfrozen except
        its BatchNormalization layers.
    """
    spec = kt.get_backbone_spec(backbone)
    constructor = getattr(keras.applications, spec.constructor)
    kwargs = {"include_preprocessing": True} if spec.builtin_preprocessing_arg else {}
    base = constructor(include_top=False, weights=None, input_shape=tuple(pixels.shape[1:]),
                       **kwargs)
    x = preprocess(keras.ops.cast(pixels, "float32"), spec.preprocessing)
    x = base(x, training=False)
    base.trainable = True
    for layer in flat_layers(base):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return keras.layers.GlobalAveragePooling2D()(x)
