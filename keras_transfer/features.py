"""Feature extraction: run the frozen backbone once, cache its outputs, train the head on them.

The second way of transfer learning (the first being a frozen backbone inside
`fit`): pass the data through the preprocessing and the frozen backbone once,
write the features to disk, and train the model's own `head` on them. The
backbone does not run again while the head trains, so each epoch costs only
the head. The head is the same object the `TransferModel` calls, so after
training, `model.predict` and `model.export` use the trained head with no
extra step.

The cache on disk::

    <root>/<backbone>-<key digest>/
        manifest.json            written last: key parts, shards, counts, checksums
        features-00000.npy       float features, one record per example
        labels-00000.npy         the labels of the same examples
        ...

`<root>` is `cache_dir`, else the environment variable `KERAS_TRANSFER_CACHE`,
else `~/.cache/keras_transfer/features`.

How a cache is found. The key is made of: the backbone (registry name, and a
digest of its architecture with layer names left out, so that two builds of
the same network match), a digest of every backbone and preprocessing
weight, the preprocessing mode and configuration, the input size, the dtype
policy and a fingerprint of the data. The data fingerprint is computed by a
cheap first pass over the input pipeline that hashes the batches' bytes and
labels without running the backbone (hashing costs a small fraction of a
backbone pass). With the key known up front, a hit costs one pass over the
inputs and no backbone call, and a miss can name its final directory before
it writes anything. The extraction pass hashes the inputs again as it goes
and checks that they are the ones the lookup saw: a source that yields other
data on a second pass (a shuffled `tf.data.Dataset`) is detected, its cache
is stored under the fingerprint of what was really extracted, and a warning
says it cannot be reused. (The alternative, writing first and comparing at
the end, cannot tell a hit before the backbone has already run.)

How a half-written cache is never used. Features are written into a
temporary directory (`.tmp-...`) beside the final one, batch by batch, in
`.npy` shards whose size does not depend on the dataset; the manifest is
written last and the directory is then renamed into place in one step. A
directory without a complete manifest, with a key that does not match, or
with a shard of the wrong size is ignored and rebuilt. Temporary directories
left by killed processes are removed by the next extraction.

Reading back streams: every shard is a `.npy` file with a fixed-size header,
read record by record by `tf.data.FixedLengthRecordDataset`, shuffled in a
buffer bounded in bytes, so neither extraction nor training holds the whole
dataset in memory (and `np.load` still opens every shard).

Example:
    >>> model = kt.ImageTransferModel("mobilenet_v2", num_classes=10)
    >>> record, history = train_head_on_features(model, x, y, epochs=10)
    >>> model.predict(x_test)        # backbone + trained head
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import socket
import time
import uuid

import keras
import numpy as np
import tensorflow as tf

from keras_transfer import heads, training
from keras_transfer.errors import DataError

logger = logging.getLogger("keras_transfer")

FORMAT_VERSION = 1
CACHE_ENV_VAR = "KERAS_TRANSFER_CACHE"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "keras_transfer", "features")
MANIFEST = "manifest.json"
# Shards are cut at about this many bytes of features, whatever the dataset size.
DEFAULT_SHARD_BYTES = 64 * 1024 * 1024
# The shuffle buffer of `FeatureCache.dataset` holds at most this many bytes.
DEFAULT_SHUFFLE_BYTES = 64 * 1024 * 1024
_TMP_PREFIX = ".tmp-"
_NPY_MAGIC = b"\x93NUMPY\x01\x00"


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """The root folder of feature caches.

    Args:
        cache_dir: str, optional. Wins when given.

    Returns:
        `cache_dir`, else `$KERAS_TRANSFER_CACHE`, else
        `~/.cache/keras_transfer/features`, with `~` expanded.
    """
    root = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV_VAR)
    return os.path.abspath(os.path.expanduser(os.fspath(root or DEFAULT_CACHE_DIR)))


# --------------------------------------------------------------- the key
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
        A JSON-ready dict: backbone, architecture, weights, preprocessing,
        preprocessor, input_size, dtype_policy, extra.
    """
    spec = getattr(model, "spec", None)
    extra = {name: getattr(model, name) for name in ("text_pooling", "sequence_length")
             if hasattr(model, name)}
    input_size = getattr(model, "input_shape_", None)
    return {
        "backbone": spec.name if spec is not None else "custom",
        "architecture": _config_digest(model.backbone),
        "weights": weights_digest(model.backbone, model.preprocessor),
        "preprocessing": getattr(model, "preprocessing", None),
        "preprocessor": _config_digest(model.preprocessor),
        "input_size": list(input_size) if input_size is not None else None,
        "dtype_policy": model.backbone.dtype_policy.name,
        "extra": extra,
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
    for tensor in tf.nest.flatten(structure):
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
        self.count += int(tf.nest.flatten(labels)[0].shape[0])

    def hexdigest(self) -> str:
        return _digest(self.inputs.hexdigest(), self.labels.hexdigest(), self.count,
                       sorted(self.layouts))


def _plain_dataset(model, x, y, batch_size):
    """The model's own pipeline, unshuffled and unaugmented, and its source."""
    return model.make_dataset(x, y, batch_size=batch_size, training=False,
                              augmentation=None, seed=None)


def data_fingerprint(dataset: tf.data.Dataset) -> tuple[str, int]:
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


def _entry_name(key: dict) -> str:
    digest = _digest(json.dumps(key, sort_keys=True))[:24]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in key["model"]["backbone"])
    return f"{slug}-{digest}"


# ------------------------------------------------------- writing shards
def _npy_header(dtype: np.dtype, shape: tuple, size: int) -> bytes:
    """A version 1.0 `.npy` header padded to exactly `size` bytes."""
    text = (f"{{'descr': {np.lib.format.dtype_to_descr(dtype)!r}, "
            f"'fortran_order': False, 'shape': {tuple(shape)!r}, }}")
    room = size - len(_NPY_MAGIC) - 2
    if len(text) + 1 > room:
        raise ValueError(f"Received a feature shape {shape} too long for a {size}-byte header.")
    text = text.ljust(room - 1) + "\n"
    return _NPY_MAGIC + room.to_bytes(2, "little") + text.encode("latin1")


def _header_size(item_shape: tuple) -> int:
    """Header bytes (a multiple of 64) that fit any row count up to 10**15."""
    text = f"{{'descr': '<f8', 'fortran_order': False, 'shape': {(10**15, *item_shape)!r}, }}"
    return int(math.ceil((len(_NPY_MAGIC) + 2 + len(text) + 1) / 64.0) * 64)


class _NpyStreamWriter:
    """Writes one `.npy` file batch by batch, so memory holds only a batch.

    The header has a fixed size and is rewritten with the real row count when
    the file is closed; the data part is hashed as it is written.
    """

    def __init__(self, path: str, dtype: np.dtype, item_shape: tuple):
        self.path = path
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.item_shape = tuple(int(d) for d in item_shape)
        self.header_bytes = _header_size(self.item_shape)
        self.count = 0
        self.sha256 = hashlib.sha256()
        self._file = open(path, "wb")
        self._file.write(b"\0" * self.header_bytes)

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.item_shape:
            raise DataError(
                f"Received a batch of shape {rows.shape[1:]} where earlier batches had "
                f"{self.item_shape}; features must have one shape. Give the model "
                "inputs of one size.")
        data = rows.tobytes()
        self._file.write(data)
        self.sha256.update(data)
        self.count += len(rows)

    def close(self) -> dict:
        self._file.seek(0)
        self._file.write(_npy_header(self.dtype, (self.count, *self.item_shape),
                                     self.header_bytes))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return {"file": os.path.basename(self.path), "count": self.count,
                "header_bytes": self.header_bytes,
                "bytes": os.path.getsize(self.path), "sha256": self.sha256.hexdigest()}

    def abort(self) -> None:
        self._file.close()


class _ShardWriter:
    """Cuts the stream of (features, labels) rows into shards of `shard_size` rows."""

    def __init__(self, folder: str, shard_size: int | None, copy: int):
        self.folder = folder
        self.shard_size = shard_size
        self.copy = copy
        self.shards: list[dict] = []
        self._open = None

    def _name(self, kind: str) -> str:
        prefix = f"copy{self.copy:02d}-" if self.copy else ""
        return os.path.join(self.folder, f"{prefix}{kind}-{len(self.shards):05d}.npy")

    def write(self, features: np.ndarray, labels: np.ndarray) -> None:
        if self.shard_size is None:  # decided by the first batch: about DEFAULT_SHARD_BYTES
            row_bytes = max(features[0].nbytes, 1)
            self.shard_size = max(1, DEFAULT_SHARD_BYTES // row_bytes)
        start = 0
        while start < len(features):
            if self._open is None:
                self._open = (
                    _NpyStreamWriter(self._name("features"), features.dtype, features.shape[1:]),
                    _NpyStreamWriter(self._name("labels"), labels.dtype, labels.shape[1:]))
            feature_writer, label_writer = self._open
            take = min(self.shard_size - feature_writer.count, len(features) - start)
            feature_writer.write(features[start:start + take])
            label_writer.write(labels[start:start + take])
            start += take
            if feature_writer.count == self.shard_size:
                self._close_shard()

    def _close_shard(self) -> None:
        feature_writer, label_writer = self._open
        self._open = None
        self.shards.append({"copy": self.copy, "count": feature_writer.count,
                            "features": feature_writer.close(),
                            "labels": label_writer.close()})

    def finish(self) -> list[dict]:
        if self._open is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        if self._open is not None:
            for writer in self._open:
                writer.abort()
            self._open = None


# ---------------------------------------------------------- the cache
@dataclasses.dataclass
class FeatureCache:
    """Backbone features of one dataset, stored in shards on disk.

    Attributes:
        path: str. The cache directory.
        manifest: dict. The parsed `manifest.json`.
        reused: bool. True when an existing cache was found and the backbone
            did not run.
        class_names: list of str, or None. What the data source named the
            classes (a folder's subfolders), read on this call.
    """

    path: str
    manifest: dict
    reused: bool = False
    class_names: list | None = None

    @property
    def num_examples(self) -> int:
        """Examples in one copy of the data."""
        return int(self.manifest["num_examples"])

    @property
    def feature_shape(self) -> tuple:
        """Shape of one example's features, e.g. `(1, 1, 1280)`."""
        return tuple(self.manifest["feature_shape"])

    @property
    def feature_dtype(self) -> str:
        return self.manifest["feature_dtype"]

    @property
    def copies(self) -> int:
        """Stored copies of the data: 1, or K augmented copies."""
        return int(self.manifest["copies"])

    @property
    def has_labels(self) -> bool:
        return bool(self.manifest["has_labels"])

    @property
    def key(self) -> dict:
        return self.manifest["key"]

    def _shards(self, copy: int) -> list[dict]:
        return [s for s in self.manifest["shards"] if s["copy"] == copy]

    def dataset(self, batch_size: int = 32, shuffle: bool = False, seed: int | None = None,
                copy: int | None = None,
                shuffle_buffer_bytes: int = DEFAULT_SHUFFLE_BYTES) -> tf.data.Dataset:
        """Streams `(features, labels)` batches from the shards.

        Args:
            batch_size: int. Examples per batch.
            shuffle: bool. Shuffle shard order and examples, anew each pass.
                The shuffle buffer holds at most `shuffle_buffer_bytes`
                (the whole dataset when it fits).
            seed: int, optional. Shuffle seed.
            copy: int, optional. Which augmented copy to read. By default a
                cache of K copies gives copy `i % K` on its i-th pass, so
                epoch i of `fit` trains on copy `i % K`.
            shuffle_buffer_bytes: int. Memory bound of the shuffle buffer.

        Returns:
            A `tf.data.Dataset` of `(features, labels)` batches with a known
            number of batches.

        Example:
            >>> cache = extract_features(model, x, y)
            >>> head.fit(cache.dataset(32, shuffle=True), epochs=5)
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"Received batch_size={batch_size!r}; expected a positive int.")
        manifest = self.manifest
        if copy is not None and not 0 <= copy < self.copies:
            raise ValueError(f"Received copy={copy}; this cache holds copies 0..{self.copies - 1}.")
        feature_dtype = np.dtype(manifest["feature_dtype"])
        label_dtype = np.dtype(manifest["label_dtype"])
        feature_shape = tuple(manifest["feature_shape"])
        label_shape = tuple(manifest["label_shape"])
        feature_record = int(np.prod(feature_shape, dtype=np.int64)) * feature_dtype.itemsize
        label_record = int(np.prod(label_shape, dtype=np.int64)) * label_dtype.itemsize

        def files(copy_index):
            shards = self._shards(copy_index)
            return ([os.path.join(self.path, s["features"]["file"]) for s in shards],
                    [os.path.join(self.path, s["labels"]["file"]) for s in shards],
                    np.array([s["features"]["header_bytes"] for s in shards], np.int64),
                    np.array([s["labels"]["header_bytes"] for s in shards], np.int64))

        if copy is not None or self.copies == 1:
            shard_files = tf.data.Dataset.from_tensor_slices(files(copy or 0))
        else:
            passes = itertools.count()  # a new pass (an epoch) takes the next copy

            def next_copy():
                yield from zip(*files(next(passes) % self.copies))

            spec = (tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.string),
                    tf.TensorSpec((), tf.int64), tf.TensorSpec((), tf.int64))
            shard_files = tf.data.Dataset.from_generator(next_copy, output_signature=spec)
        num_shards = len(self._shards(copy or 0))
        if shuffle:
            shard_files = shard_files.shuffle(max(num_shards, 1), seed=seed,
                                              reshuffle_each_iteration=True)

        def records(feature_file, label_file, feature_header, label_header):
            return tf.data.Dataset.zip((
                tf.data.FixedLengthRecordDataset(feature_file, feature_record, feature_header),
                tf.data.FixedLengthRecordDataset(label_file, label_record, label_header)))

        # Reading two shards at once mixes them when shuffling; one at a time keeps order.
        cycle = min(2, max(num_shards, 1)) if shuffle else 1
        dataset = shard_files.interleave(records, cycle_length=cycle, block_length=1)
        if shuffle:
            buffer = max(1, min(self.num_examples,
                                shuffle_buffer_bytes // max(feature_record + label_record, 1)))
            dataset = dataset.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
        dataset = dataset.batch(batch_size)

        def decode(feature_bytes, label_bytes):
            features = tf.reshape(tf.io.decode_raw(feature_bytes, feature_dtype),
                                  (-1, *feature_shape))
            labels = tf.reshape(tf.io.decode_raw(label_bytes, label_dtype), (-1, *label_shape))
            return features, labels

        dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
        batches = math.ceil(self.num_examples / batch_size)
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(batches))
        return dataset.prefetch(tf.data.AUTOTUNE)

    def load(self, copy: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Reads one copy into memory: `(features, labels)` numpy arrays.

        Meant for small caches and inspection; `dataset()` streams instead.
        """
        shards = self._shards(copy)
        features = [np.load(os.path.join(self.path, s["features"]["file"])) for s in shards]
        labels = [np.load(os.path.join(self.path, s["labels"]["file"])) for s in shards]
        return np.concatenate(features), np.concatenate(labels)

    def verify(self) -> None:
        """Checks every shard against the checksums of the manifest.

        Raises:
            DataError: naming the first shard that differs.
        """
        for shard in self.manifest["shards"]:
            for part in (shard["features"], shard["labels"]):
                path = os.path.join(self.path, part["file"])
                h = hashlib.sha256()
                with open(path, "rb") as file:
                    file.seek(part["header_bytes"])
                    for block in iter(lambda: file.read(1 << 20), b""):
                        h.update(block)
                if h.hexdigest() != part["sha256"]:
                    raise DataError(
                        f"The feature cache shard {path} does not match its checksum: "
                        f"it was changed or damaged. Delete {self.path} and run again.")


def _check_complete(path: str, key: dict) -> tuple[dict | None, str]:
    """Reads a cache directory's manifest: `(manifest, "")` or `(None, why not)`."""
    manifest_path = os.path.join(path, MANIFEST)
    try:
        with open(manifest_path, encoding="utf-8") as file:
            manifest = json.load(file)
    except FileNotFoundError:
        return None, "it has no manifest (an extraction did not finish)"
    except (OSError, ValueError) as error:
        return None, f"its manifest cannot be read ({error})"
    if manifest.get("format") != FORMAT_VERSION or not manifest.get("complete"):
        return None, "its manifest is incomplete or of another format"
    if manifest.get("key") != key:
        return None, "its key differs"
    for shard in manifest.get("shards", []):
        for part in (shard["features"], shard["labels"]):
            file = os.path.join(path, part["file"])
            if not os.path.isfile(file) or os.path.getsize(file) != part["bytes"]:
                return None, f"the shard {part['file']} is missing or has the wrong size"
    return manifest, ""


def find_cache(key: dict, cache_dir: str | None = None) -> FeatureCache | None:
    """The complete cache stored under `key`, or None.

    Args:
        key: dict. `{"model": model_key(model), "data": ..., ...}` as
            `extract_features` builds it.
        cache_dir: str, optional. The cache root (see `default_cache_dir`).

    Returns:
        A `FeatureCache` with `reused=True`, or None when there is none or
        the one there is incomplete or damaged.
    """
    path = os.path.join(default_cache_dir(cache_dir), _entry_name(key))
    if not os.path.isdir(path):
        return None
    manifest, why = _check_complete(path, key)
    if manifest is None:
        logger.warning("Ignoring the feature cache at %s: %s. It will be rebuilt.", path, why)
        return None
    return FeatureCache(path, manifest, reused=True)


def _remove_stale_temporaries(root: str, max_age_s: float = 24 * 3600) -> None:
    """Removes temporary directories of extractions whose process is gone."""
    host = socket.gethostname()
    try:
        entries = os.listdir(root)
    except FileNotFoundError:
        return
    for entry in entries:
        if not entry.startswith(_TMP_PREFIX):
            continue
        path = os.path.join(root, entry)
        try:
            with open(os.path.join(path, "owner.json"), encoding="utf-8") as file:
                owner = json.load(file)
            alive = owner["host"] != host or _pid_alive(int(owner["pid"]))
        except (OSError, ValueError, KeyError):
            alive = True  # being created right now, or unreadable: judge by age
        try:
            old = time.time() - os.path.getmtime(path) > max_age_s
        except OSError:
            continue
        if not alive or old:
            logger.info("Removing the unfinished feature cache %s (its process is gone).", path)
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _feature_function(model, augmentation=None):
    """A compiled function: raw input batch -> the features the head takes.

    The backbone always runs in inference mode; `model.head_inputs` says
    what the head takes (pooled token outputs for text models).
    """

    def features(inputs):
        if augmentation is not None:
            inputs = augmentation(inputs, training=True)
        return model.head_inputs(inputs, training=False)

    return tf.function(features, reduce_retracing=True)


def _say(message: str, verbose) -> None:
    logger.info(message)
    if verbose:
        print(message)


def extract_features(model, x, y=None, *, batch_size: int = 32, cache_dir=None,
                     augmentation=None, augmented_copies: int = 0,
                     shard_size: int | None = None, verbose=0) -> FeatureCache:
    """Runs the frozen backbone over the data once and caches the features.

    The cache is reused when the backbone (architecture and weights), the
    preprocessing, the input size and the data (bytes and labels) all match
    an existing one; otherwise it is computed and written in shards.

    Args:
        model: a `TransferModel` (image or text) whose `backbone` is frozen.
        x: the data, as for `model.fit`: arrays, a `tf.data.Dataset` of
            `(input, label)` pairs, a folder, or `"tfds:<name>"`. It must
            yield the same examples in the same order on every pass.
        y: labels when `x` is an array; None for unlabeled data.
        batch_size: int. Examples per backbone call. Does not change the key.
        cache_dir: str, optional. The cache root; defaults to
            `$KERAS_TRANSFER_CACHE`, else `~/.cache/keras_transfer/features`.
        augmentation: Keras layer(s), optional. Only used with
            `augmented_copies`: the copies are of augmented inputs.
        augmented_copies: int. With `augmentation`, store this many
            augmented copies of the data (each a fresh random draw).
        shard_size: int, optional. Examples per shard file; by default
            about 64 MiB of features per shard.
        verbose: print what happens (it is always logged to the
            `keras_transfer` logger).

    Returns:
        A `FeatureCache`; `.reused` says whether the backbone ran.

    Example:
        >>> cache = extract_features(model, x_train, y_train, batch_size=64)
        >>> cache.num_examples, cache.feature_shape, cache.reused
        (1797, (1, 1, 1280), False)
    """
    _check_model(model)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"Received batch_size={batch_size!r}; expected a positive int.")
    if (not isinstance(augmented_copies, int) or isinstance(augmented_copies, bool)
            or augmented_copies < 0):
        raise ValueError(f"Received augmented_copies={augmented_copies!r}; expected an int >= 0.")
    if augmented_copies and augmentation is None:
        raise ValueError(f"Received augmented_copies={augmented_copies} without augmentation; "
                         "pass augmentation= (e.g. kt.default_augmentation()) or leave "
                         "augmented_copies at 0.")
    if augmentation is not None and not augmented_copies:
        raise ValueError(
            "Received augmentation without augmented_copies: cached features of random "
            "augmentations would be the same every epoch. Pass augmented_copies=K to "
            "cache K augmented copies, or use train_head_on_features, which recomputes "
            "the features of freshly augmented inputs every epoch.")
    if shard_size is not None and (not isinstance(shard_size, int) or shard_size < 1):
        raise ValueError(f"Received shard_size={shard_size!r}; expected a positive int or None.")

    root = default_cache_dir(cache_dir)
    augment = None
    if augmentation is not None:
        from keras_transfer.data import _as_augmentation

        augment = _as_augmentation(augmentation)
    started = time.perf_counter()
    # One pipeline, iterated twice on a miss: hashed first, then extracted.
    dataset, source = _plain_dataset(model, x, y, batch_size)
    class_names = getattr(source, "class_names", None)
    fingerprint, count = data_fingerprint(dataset)
    if count == 0:
        raise DataError("Received data that yields no examples; nothing to extract.")
    key = {"format": FORMAT_VERSION, "model": model_key(model), "data": fingerprint,
           "num_examples": count, "augmentation": _augmentation_key(augment, augmented_copies)}
    cache = find_cache(key, root)
    if cache is not None:
        cache.class_names = class_names
        _say(f"Feature cache: reusing {cache.num_examples:,} cached backbone features "
             f"x {cache.copies} cop{'ies' if cache.copies > 1 else 'y'} from {cache.path} "
             f"(looked up in {time.perf_counter() - started:.1f} s; the backbone does not run).",
             verbose)
        return cache

    os.makedirs(root, exist_ok=True)
    _remove_stale_temporaries(root)
    final = os.path.join(root, _entry_name(key))
    temporary = os.path.join(root, f"{_TMP_PREFIX}{os.path.basename(final)}-{uuid.uuid4().hex[:8]}")
    os.makedirs(temporary)
    with open(os.path.join(temporary, "owner.json"), "w", encoding="utf-8") as file:
        json.dump({"host": socket.gethostname(), "pid": os.getpid()}, file)
    what = (f"{augmented_copies} augmented copies" if augmented_copies else "the data")
    _say(f"Feature cache: extracting backbone features of {count:,} examples ({what}) "
         f"into {final}.", verbose)
    try:
        manifest = _extract(model, dataset, source, temporary, shard_size,
                            augment, max(augmented_copies, 1), key)
        if manifest["key"] != key:
            logger.warning(
                "The data changed between two passes over it (a shuffled tf.data.Dataset?): "
                "the features are cached under what was really extracted, but this cache "
                "cannot be reused. Give a dataset that yields the same order every pass.")
            final = os.path.join(root, _entry_name(manifest["key"]))
        _write_manifest(temporary, manifest)
        final = _move_into_place(temporary, final, manifest["key"])
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    manifest, why = _check_complete(final, manifest["key"])
    if manifest is None:  # pragma: no cover - only if someone damages it right now
        raise DataError(f"The feature cache just written at {final} is unusable: {why}.")
    cache = FeatureCache(final, manifest, reused=False, class_names=class_names)
    _say(f"Feature cache: wrote {cache.num_examples:,} x {cache.copies} feature rows of shape "
         f"{cache.feature_shape} in {len(manifest['shards'])} shard(s) "
         f"({time.perf_counter() - started:.1f} s).", verbose)
    return cache


def _extract(model, dataset, source, folder, shard_size, augment, copies, key) -> dict:
    """The extraction pass(es): writes shards into `folder`, returns the manifest."""
    plain = _feature_function(model)
    augmented = _feature_function(model, augment) if augment is not None else None
    shards: list[dict] = []
    fingerprint = _DataFingerprint()
    feature_info = label_info = None
    for copy in range(copies):
        writer = _ShardWriter(folder, shard_size, copy)
        try:
            for inputs, labels in dataset:
                if copy == 0:
                    fingerprint.update(inputs, labels)
                features = (augmented or plain)(inputs)
                if tf.nest.is_nested(features):
                    raise DataError(
                        "The backbone returns several outputs "
                        f"({[tuple(t.shape) for t in tf.nest.flatten(features)]}); feature "
                        "caching needs the one tensor the head takes. Define "
                        "model.head_inputs(inputs) to say which.")
                features = keras.ops.convert_to_numpy(features)
                if features.dtype not in (np.float16, np.float32, np.float64):
                    features = features.astype(np.float32)  # e.g. bfloat16
                labels = np.asarray(labels)
                writer.write(features, labels)
                feature_info = (features.dtype, features.shape[1:])
                label_info = (labels.dtype, labels.shape[1:])
        except BaseException:
            writer.abort()
            raise
        shards.extend(writer.finish())
    key = dict(key, data=fingerprint.hexdigest(), num_examples=fingerprint.count)
    return {
        "format": FORMAT_VERSION,
        "complete": True,
        "key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backbone_name": getattr(model, "backbone_name", model.backbone.name),
        "num_examples": fingerprint.count,
        "copies": copies,
        "has_labels": bool(getattr(source, "has_labels", True)),
        "feature_shape": [int(d) for d in feature_info[1]],
        "feature_dtype": np.dtype(feature_info[0]).newbyteorder("<").str,
        "label_shape": [int(d) for d in label_info[1]],
        "label_dtype": np.dtype(label_info[0]).newbyteorder("<").str,
        "shards": shards,
    }


def _write_manifest(folder: str, manifest: dict) -> None:
    partial = os.path.join(folder, MANIFEST + ".partial")
    with open(partial, "w", encoding="utf-8") as file:
        json.dump(manifest, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, os.path.join(folder, MANIFEST))
    os.remove(os.path.join(folder, "owner.json"))


def _move_into_place(temporary: str, final: str, key: dict) -> str:
    """Renames the finished temporary directory to `final` in one step."""
    if os.path.isdir(final):
        manifest, _ = _check_complete(final, key)
        if manifest is not None:  # another process finished the same cache first
            shutil.rmtree(temporary, ignore_errors=True)
            return final
        shutil.rmtree(final)  # an incomplete or damaged one: replace it
    try:
        os.rename(temporary, final)
    except OSError:
        if _check_complete(final, key)[0] is None:
            raise
        shutil.rmtree(temporary, ignore_errors=True)  # lost a race to an identical cache
    return final


# ------------------------------------------------------- head training
def _check_model(model) -> None:
    missing = [name for name in ("backbone", "head", "preprocessor", "make_dataset", "task")
               if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f"Received a {type(model).__name__}, which lacks {missing}; feature extraction "
            "needs a keras_transfer TransferModel (e.g. kt.ImageTransferModel).")


def use_feature_cache(feature_cache, augmentation=None, augmented_copies: int = 0) -> bool:
    """Whether `fit`'s head phase goes through `train_head_on_features`.

    Args:
        feature_cache: `"auto"` (yes: `train_head_on_features` caches the
            features when nothing random happens to the inputs, or K
            augmented copies, and otherwise runs the frozen backbone every
            epoch, and logs which), `True` (the same, but random
            augmentation without `augmented_copies` is an error, since its
            features cannot be cached) or `False` (no: the backbone runs
            inside `fit` every epoch).
        augmentation: the `augmentation` given to `fit`.
        augmented_copies: int. The `augmented_copies` given to `fit`.

    Returns:
        bool.
    """
    if feature_cache is False:
        return False
    if feature_cache is True:
        if augmentation is not None and not augmented_copies:
            raise ValueError(
                "Received feature_cache=True with random augmentation and "
                "augmented_copies=0: features of freshly augmented inputs change every "
                "epoch and cannot be cached. Pass augmented_copies=K to cache K augmented "
                "copies, or feature_cache='auto' to recompute them every epoch.")
        return True
    if feature_cache == "auto":
        return True
    raise ValueError(f"Received feature_cache={feature_cache!r}; expected True, False or 'auto'.")


def train_head_on_features(model, x, y=None, *, validation_data=None, epochs: int = 5,
                           batch_size: int = 32, learning_rate: float = 1e-3,
                           callbacks=None, early_stopping: int | None = None,
                           cache_dir=None, augmentation=None, augmented_copies: int = 0,
                           shuffle: bool = True, seed: int | None = None,
                           initial_epoch: int = 0, shard_size: int | None = None,
                           verbose="auto"):
    """Trains `model.head` on cached backbone features (the head phase).

    With no augmentation, the features of the training and validation data
    are extracted once (or found in the cache) and the head trains on them
    alone; the backbone never runs during the epochs. With augmentation and
    `augmented_copies=0` (the default) every epoch needs new random inputs,
    so the frozen backbone runs inside `fit` every epoch (nothing is
    cached); with `augmented_copies=K` K augmented copies are cached and
    epoch i trains on copy `i % K`. The log says which of the three happens.

    The head is the model's own, so afterwards `model.predict` and
    `model.export` use it. Callbacks see `model.head` when features are
    cached (a checkpoint then saves the head), the whole model otherwise.

    Args:
        model: a `TransferModel`; its backbone is frozen.
        x, y: the training data, as for `model.fit`.
        validation_data: `(x, y)` or anything `x` can be; it gets its own
            (never augmented) cache.
        epochs: int. Epochs of head training.
        batch_size: int.
        learning_rate: float. Adam learning rate.
        callbacks: list of Keras callbacks.
        early_stopping: int, optional. Patience in epochs, on the
            validation loss (or the loss); the best weights are restored.
        cache_dir: str, optional. The cache root (see `extract_features`).
        augmentation: Keras layer(s), optional. Random augmentation of the
            training inputs.
        augmented_copies: int. With augmentation: cache this many augmented
            copies instead of recomputing every epoch.
        shuffle: bool. Shuffle the training features every epoch.
        seed: int, optional. Shuffle seed.
        initial_epoch: int. Epochs already run, so numbering continues.
        shard_size: int, optional. Examples per shard (see
            `extract_features`).
        verbose: as for `keras.Model.fit`; also prints the cache decision.

    Returns:
        `(PhaseRecord, keras.callbacks.History)`, ready for
        `TransferHistory.extend`. The record counts the backbone's weights
        as frozen, as the usual head phase does.

    Example:
        >>> model = kt.ImageTransferModel("vgg16", num_classes=10, input_shape=(32, 32, 3))
        >>> record, history = train_head_on_features(
        ...     model, x_train, y_train, validation_data=(x_val, y_val), epochs=10)
        >>> model.predict(x_test)
    """
    _check_model(model)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"Received epochs={epochs!r}; expected an int >= 1.")
    training.freeze(model.backbone)
    model.train_batchnorm = False
    loss, metrics = heads.default_loss(model.task), heads.default_metrics(model.task)
    callbacks = list(callbacks or [])
    vx, vy = (validation_data if isinstance(validation_data, tuple)
              else (validation_data, None))

    if augmentation is not None and not augmented_copies:
        _say("Feature cache: not used for the head phase: augmentation is random and "
             "augmented_copies=0, so the frozen backbone recomputes the features of "
             "freshly augmented inputs every epoch. Pass augmented_copies=K to cache K "
             "augmented copies instead.", verbose)
        train, source = model.make_dataset(x, y, batch_size=batch_size, training=shuffle,
                                           augmentation=augmentation, seed=seed)
        _adopt_class_names(model, getattr(source, "class_names", None))
        validation = None
        if validation_data is not None:
            validation, _ = model.make_dataset(vx, vy, batch_size=batch_size)
        with model.distribute_strategy.scope():
            optimizer = keras.optimizers.Adam(learning_rate)
        return training.run_phase(
            model, "head", train, validation, epochs, optimizer, loss, metrics, callbacks,
            early_stopping, initial_epoch=initial_epoch, verbose=verbose,
            peak_learning_rate=learning_rate)

    cache = extract_features(model, x, y, batch_size=batch_size, cache_dir=cache_dir,
                             augmentation=augmentation, augmented_copies=augmented_copies,
                             shard_size=shard_size, verbose=verbose)
    if not cache.has_labels:
        raise DataError("Received training data without labels; the head needs labels. "
                        "Pass y=, or a dataset of (input, label) pairs.")
    _adopt_class_names(model, cache.class_names)
    validation = None
    if validation_data is not None:
        validation_cache = extract_features(model, vx, vy, batch_size=batch_size,
                                            cache_dir=cache_dir, shard_size=shard_size,
                                            verbose=verbose)
        validation = validation_cache.dataset(batch_size)
    if cache.copies > 1:
        how = (f"{cache.copies} cached augmented copies; epoch i trains on copy i % "
               f"{cache.copies}")
    else:
        how = "cached features, no augmentation"
    _say(f"Feature cache: training the head for {epochs} epochs on {how} "
         f"({cache.path}); the backbone does not run.", verbose)
    head = model.head
    with head.distribute_strategy.scope():
        optimizer = keras.optimizers.Adam(learning_rate)
    record, history = training.run_phase(
        head, "head", cache.dataset(batch_size, shuffle=shuffle, seed=seed), validation,
        epochs, optimizer, loss, metrics, callbacks, early_stopping,
        initial_epoch=initial_epoch, verbose=verbose, peak_learning_rate=learning_rate)
    # Count as the usual head phase does: the model's weights outside the head are frozen.
    trainable, frozen = training.count_params(model)
    record.trainable_params, record.frozen_params = trainable, frozen
    return record, history


def _adopt_class_names(model, class_names) -> None:
    adopt = getattr(model, "_adopt_class_names", None)
    if adopt is not None and class_names is not None:
        adopt(class_names)
