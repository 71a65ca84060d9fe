"""Pieces of the plain-Keras models the throughput benchmarks compare with (any backend)."""

from __future__ import annotations

import keras
import numpy as np


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
