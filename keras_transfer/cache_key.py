"""The feature cache's key: what a frozen backbone's features depend on.

A cache entry is named by a digest of its key: the backbone component's own
description of its features, digests of the network's architecture (layer
names left out) and of every weight, the dtype policy, the augmentation of
augmented copies, and a fingerprint of the data (its batches' bytes and
labels, hashed without running the backbone). `feature_cache` looks caches
up and writes them under this name.
"""

from __future__ import annotations

import hashlib
import json

import keras
import numpy as np


def _digest(*parts) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
    return h.hexdigest()


_STATE_KEYS = ("trainable", "build_config", "compile_config")
_TRAINING_ONLY = ("_initializer", "_regularizer", "_constraint")


def _canonical_config(config):
    """A layer or model config with its layer names replaced by their order.

    Two builds of the same network in one process get different automatic
    names (`input_layer`, `input_layer_2`); the architecture is the same, so
    every name is mapped to `L<i>` (i = order of first appearance), which
    keeps the wiring between layers and drops the accidental names. State
    that is not architecture (`trainable`, which freezing flips, and the
    build and compile records, which appear once a layer is called) is left
    out too, and so are initializers, regularizers and constraints, which
    shape training but not what a layer computes (the weights digest covers
    the values they led to).
    """
    names: dict[str, str] = {}

    def collect(node):
        if isinstance(node, dict):
            inner = node.get("config")
            if ("class_name" in node and isinstance(inner, dict)
                    and isinstance(inner.get("name"), str)):
                names.setdefault(inner["name"], f"L{len(names)}")
            if isinstance(node.get("name"), str) and "class_name" not in node:
                names.setdefault(node["name"], f"L{len(names)}")  # the top-level config
            for value in node.values():
                collect(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                collect(value)

    def rename(node):
        if isinstance(node, dict):
            return {key: rename(value) for key, value in node.items()
                    if key not in _STATE_KEYS and not key.endswith(_TRAINING_ONLY)}
        if isinstance(node, (list, tuple)):
            return [rename(value) for value in node]
        if isinstance(node, str):
            return names.get(node, node)
        return node

    collect(config)
    return rename(config)


def _config_digest(obj) -> str:
    """Digest of a Keras object's configuration, layer names left out."""
    try:
        config = keras.saving.serialize_keras_object(obj)
    except Exception:  # noqa: BLE001 - not serializable: fall back to its type
        config = {"class_name": type(obj).__qualname__, "module": type(obj).__module__}
    return _digest(json.dumps(_canonical_config(config), sort_keys=True, default=str))


def weights_digest(*layers) -> str:
    """A digest of the values of every weight of `layers`, in order.

    Args:
        *layers: Keras layers or models.

    Returns:
        A hex digest; it changes whenever any weight value, shape or dtype
        changes.
    """
    h = hashlib.blake2b(digest_size=16)
    for layer in layers:
        for weight in layer.weights:
            value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
            h.update(f"{value.dtype.str}{value.shape}".encode())
            h.update(value.tobytes())
    return h.hexdigest()


def model_key(model) -> dict:
    """The parts of the cache key that come from the model.

    Args:
        model: a `TransferModel`.

    Returns:
        A JSON-ready dict: what the backbone component says its features
        depend on (backbone name, preprocessing, input size, pooling, ...),
        digests of the network's architecture and weights and of the
        preprocessor's configuration, and the dtype policy.
    """
    backbone = model.backbone
    return {
        **backbone.cache_key(),
        "architecture": _config_digest(backbone.network),
        "weights": weights_digest(backbone.network),
        "preprocessor": _config_digest(backbone.preprocessor),
        "dtype_policy": backbone.network.dtype_policy.name,
    }


def _augmentation_key(augmentation, copies: int) -> dict | None:
    if augmentation is None or not copies:
        return None
    if isinstance(augmentation, keras.layers.Layer):
        digest = _config_digest(augmentation)
    else:  # a plain function: only its name can be seen
        module = getattr(augmentation, "__module__", "?")
        digest = f"{module}.{getattr(augmentation, '__qualname__', repr(augmentation))}"
    return {"augmentation": digest, "copies": int(copies)}


def _update_hash(h, structure) -> str:
    """Feeds the bytes of every tensor of a (nested) batch into `h`.

    Only the bytes go in, so the digest of a stream of batches does not
    depend on the batch size. Returns the dtypes and row shapes, which the
    caller hashes once.
    """
    layout = []
    for tensor in keras.tree.flatten(structure):
        value = tensor.numpy() if hasattr(tensor, "numpy") else np.asarray(tensor)
        if value.dtype == object:  # strings: length-prefixed, so "ab","c" != "a","bc"
            for item in value.reshape(-1):
                item = item if isinstance(item, bytes) else str(item).encode()
                h.update(len(item).to_bytes(8, "little") + item)
        else:
            h.update(np.ascontiguousarray(value).tobytes())
        layout.append(f"{value.dtype.str}{value.shape[1:]}")
    return ";".join(layout)


class _DataFingerprint:
    """Streams the input and label batches into digests and counts examples."""

    def __init__(self):
        self.inputs = hashlib.blake2b(digest_size=16)
        self.labels = hashlib.blake2b(digest_size=16)
        self.layouts: set[str] = set()
        self.count = 0

    def update(self, inputs, labels) -> None:
        layout = _update_hash(self.inputs, inputs) + "|" + _update_hash(self.labels, labels)
        self.layouts.add(layout)
        self.count += int(keras.tree.flatten(labels)[0].shape[0])

    def hexdigest(self) -> str:
        return _digest(self.inputs.hexdigest(), self.labels.hexdigest(), self.count,
                       sorted(self.layouts))


def data_fingerprint(dataset) -> tuple[str, int]:
    """Hashes the inputs and labels the backbone would see, without running it.

    Args:
        dataset: batches of `(inputs, labels)` (a model's `make_dataset`
            with `training=False`). The batch size does not change the result.

    Returns:
        `(hex digest, number of examples)`.
    """
    fingerprint = _DataFingerprint()
    for inputs, labels in dataset:
        fingerprint.update(inputs, labels)
    return fingerprint.hexdigest(), fingerprint.count


def fit_data_fingerprints(model, train: dict, validation: dict | None) -> dict:
    """Fingerprints of a fit's training and validation data, head by head.

    A backup records them, so a run resumed with other data is refused
    (`backup.RunBackup.check_settings`).

    Args:
        model: the `TransferModel`.
        train: `{head: (x, y)}`.
        validation: `{head: (x, y)}` or None.

    Returns:
        `{"train": {head: digest}, "validation": {head: digest} or None}`.
    """
    def fingerprints(data):
        if data is None:
            return None
        return {name: data_fingerprint(model.head_dataset(name, x, y, batch_size=64))[0]
                for name, (x, y) in sorted(data.items())}

    return {"train": fingerprints(train), "validation": fingerprints(validation)}


def _entry_name(key: dict) -> str:
    digest = _digest(json.dumps(key, sort_keys=True))[:24]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in key["model"]["backbone"])
    return f"{slug}-{digest}"
