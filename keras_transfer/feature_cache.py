"""The feature cache: a frozen backbone's outputs, computed once and kept on disk.

The second way of transfer learning (the first being a frozen backbone
inside `fit`): pass the data through the preprocessing and the frozen
backbone once, write the features to disk, and train the heads on them
(`phases.HeadPhase` does this by itself). This module holds the lookup and
the reader; the key is in `cache_key`, the extraction pass in
`feature_extraction` (its shards written by `shard_writer`), the entries on
disk (atomic publish, locks, the size limit and least-recently-used
eviction, `keras-transfer cache list|clear`) in `cache_store`; nothing about
training.

The cache on disk::

    <root>/<backbone>-<key digest>/
        manifest.json            written last: key parts, shards, counts, checksums
        features-00000.npy       float features, one record per example
        labels-00000.npy         the labels of the same examples
        ...
        .lock, .last_used        held by readers; the last use (see `cache_store`)

`<root>` is `cache_dir`, else the environment variable `KERAS_TRANSFER_CACHE`,
else `~/.cache/keras_transfer/features`. It is kept under
`$KERAS_TRANSFER_CACHE_MAX` (10 GiB by default): least recently used
entries not in use by any process are removed first.

How a cache is found. The key is made of what the backbone component says
its features depend on (backbone name, preprocessing, input size, text
pooling and sequence length), a digest of the network's architecture with
layer names left out (two builds of the same network match), a digest of
every network weight, the preprocessor's configuration, the dtype policy and
a fingerprint of the data. The data fingerprint is computed by a cheap first
pass over the input pipeline that hashes the batches' bytes and labels
without running the backbone. With the key known up front, a hit costs one
pass over the inputs and no backbone call, and a miss can name its final
directory before it writes anything. The extraction pass hashes the inputs
again as it goes and checks that they are the ones the lookup saw: a source
that yields other data on a second pass (a shuffled `tf.data.Dataset`) is
detected, its cache is stored under the fingerprint of what was really
extracted, and a warning says it cannot be reused.

How a half-written or damaged cache is never used. Features are written
into a temporary directory (`.tmp-...`) beside the final one, in `.npy`
shards whose size does not depend on the dataset; the manifest, with a
SHA-256 of every shard, is written last and the directory is then renamed
into place in one step. A directory without a complete manifest, with a key
that does not match, or with a shard of the wrong size or checksum is
ignored and rebuilt. Temporary directories left by killed processes are
removed by the next extraction.

Reading back streams: every shard is a `.npy` file read record by record by
`tf.data.FixedLengthRecordDataset`, shuffled in a buffer bounded in bytes,
so neither extraction nor training holds the whole dataset in memory.

Example:
    >>> model = kt.ImageTransferModel("mobilenet_v2", num_classes=10, weights=None,
    ...                               input_shape=(32, 32, 3))
    >>> cache = kt.extract_features(model, x, y)
    >>> features, labels = cache.load()
    >>> features.shape, labels.shape
    ((24, 1, 1, 1280), (24,))
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import shutil
import time

import keras
import numpy as np

from keras_transfer import backend
from keras_transfer.batches import ExampleBatches, is_batches
from keras_transfer.cache_store import (  # noqa: F401 - the cache root's names live there
    CACHE_ENV_VAR,
    DEFAULT_CACHE_DIR,
    MANIFEST,
    cache_limit,
    check_complete,
    default_cache_dir,
    make_room,
    move_into_place,
    new_temporary,
    open_entry,
    remove_stale_temporaries,
    verify_shards,
    write_manifest,
)
from keras_transfer.cache_key import _augmentation_key, _entry_name, data_fingerprint, model_key
from keras_transfer.data import EpochSeed, as_written, shuffle_each_epoch
from keras_transfer.distribute import all_workers_agree, strategy_of
from keras_transfer.errors import DataError
from keras_transfer.feature_extraction import FORMAT_VERSION, write_features
from keras_transfer.image_data import as_augmentation

logger = logging.getLogger("keras_transfer")

# Shards are cut at about this many bytes of features, whatever the dataset size.
# The shuffle buffer of `FeatureCache.dataset` holds at most this many bytes.
DEFAULT_SHUFFLE_BYTES = 64 * 1024 * 1024
# The backbone runs on batches of at least this many examples while extracting.
MIN_EXTRACTION_BATCH = 64


# ---------------------------------------------------------- the cache
@dataclasses.dataclass
class FeatureCache:
    """Backbone features of one dataset, stored in shards on disk.

    Attributes:
        path: str. The cache directory.
        manifest: dict. The parsed `manifest.json`.
        reused: bool. True when an existing cache was found and the backbone
            did not run.
    """

    path: str
    manifest: dict
    reused: bool = False
    # The entry's shared lock (cache_store.open_entry): held while this object lives.
    _lock: object = dataclasses.field(default=None, repr=False, compare=False)

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

    def dataset(self, batch_size: int = 32, shuffle: bool = False, seed=None,
                copy: int | None = None,
                shuffle_buffer_bytes: int = DEFAULT_SHUFFLE_BYTES,
                drop_remainder: bool = False, rows=None):
        """Streams `(features, labels)` batches from the shards.

        Args:
            batch_size: int. Examples per batch.
            shuffle: bool. Shuffle shard order and examples, anew each pass.
                The shuffle buffer holds at most `shuffle_buffer_bytes`
                (the whole dataset when it fits).
            seed: int or `data.EpochSeed`, optional. Shuffle seed.
            copy: int, optional. Which augmented copy to read. By default a
                cache of K copies gives copy `i % K` on its i-th pass (with
                an `EpochSeed`, on epoch i), so epoch i of `fit` trains on
                copy `i % K`.
            shuffle_buffer_bytes: int. Memory bound of the shuffle buffer.
            drop_remainder: bool. Drop a last partial batch.
            rows: optional 1-D array of example indices: read only these
                examples (e.g. a held-out split), in this order unless
                shuffled. On TensorFlow the copy read must fit
                `shuffle_buffer_bytes` (see `fits_in_memory`).

        Returns:
            `(features, labels)` batches with a known number of batches: a
            `tf.data.Dataset` on TensorFlow, a `batches.ExampleBatches` of
            memory-mapped shards elsewhere.

        Example:
            >>> cache = extract_features(model, x, y)
            >>> for features, labels in cache.dataset(16, shuffle=True).take(1):
            ...     print(features.shape, labels.shape)
            (16, 1, 1, 1280) (16,)
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"Received batch_size={batch_size!r}; expected a positive int.")
        manifest = self.manifest
        if copy is not None and not 0 <= copy < self.copies:
            raise ValueError(f"Received copy={copy}; this cache holds copies 0..{self.copies - 1}.")
        if rows is not None:
            rows = self._check_rows(rows)
        if not backend.is_tensorflow():
            return self._numpy_batches(batch_size, shuffle, seed, copy, drop_remainder, rows)
        tf = backend.tensorflow("tf.data pipelines")
        feature_dtype = np.dtype(manifest["feature_dtype"])
        label_dtype = np.dtype(manifest["label_dtype"])
        feature_shape = tuple(manifest["feature_shape"])
        label_shape = tuple(manifest["label_shape"])
        feature_record, label_record = self._record_bytes("feature"), self._record_bytes("label")

        def files(copy_index):
            shards = self._shards(copy_index)
            return ([os.path.join(self.path, s["features"]["file"]) for s in shards],
                    [os.path.join(self.path, s["labels"]["file"]) for s in shards],
                    np.array([s["features"]["header_bytes"] for s in shards], np.int64),
                    np.array([s["labels"]["header_bytes"] for s in shards], np.int64))

        if (copy is not None or self.copies == 1) and \
                self.fits_in_memory(shuffle_buffer_bytes):
            return self._in_memory(batch_size, shuffle, seed, copy or 0, drop_remainder, rows)
        if rows is not None:
            raise ValueError(
                f"Received rows= for a cache that is streamed from its shards ("
                f"{self.num_examples:,} examples x {self.copies} copies, over "
                f"shuffle_buffer_bytes={shuffle_buffer_bytes:,} per copy); rows can be chosen "
                "in one copy that fits in memory: pass copy= and a larger "
                "shuffle_buffer_bytes.")
        if copy is not None or self.copies == 1:
            shard_files = tf.data.Dataset.from_tensor_slices(files(copy or 0))
        else:
            passes = itertools.count()  # a new pass (an epoch) takes the next copy

            def next_copy():
                epoch = seed.epoch_number if isinstance(seed, EpochSeed) else next(passes)
                yield from zip(*files(epoch % self.copies))

            spec = (tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.string),
                    tf.TensorSpec((), tf.int64), tf.TensorSpec((), tf.int64))
            shard_files = tf.data.Dataset.from_generator(next_copy, output_signature=spec)
        num_shards = len(self._shards(copy or 0))
        if shuffle:
            shard_files = shuffle_each_epoch(shard_files, max(num_shards, 1), seed)

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
            dataset = shuffle_each_epoch(dataset, buffer, seed)
        dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)

        def decode(feature_bytes, label_bytes):
            features = tf.reshape(tf.io.decode_raw(feature_bytes, feature_dtype),
                                  (-1, *feature_shape))
            labels = tf.reshape(tf.io.decode_raw(label_bytes, label_dtype), (-1, *label_shape))
            return features, labels

        dataset = dataset.map(as_written(decode), num_parallel_calls=tf.data.AUTOTUNE)
        return self._counted(dataset, batch_size, drop_remainder)

    def fits_in_memory(self, budget_bytes: int = DEFAULT_SHUFFLE_BYTES) -> bool:
        """Whether one copy's features and labels take at most `budget_bytes`."""
        record = self._record_bytes("feature") + self._record_bytes("label")
        return self.num_examples * record <= budget_bytes

    def _record_bytes(self, part: str) -> int:
        """Bytes of one example's "feature" or "label" in the shards."""
        return (int(np.prod(self.manifest[f"{part}_shape"], dtype=np.int64))
                * np.dtype(self.manifest[f"{part}_dtype"]).itemsize)

    def _check_rows(self, rows) -> np.ndarray:
        indices = np.asarray(rows)
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer) or \
                (indices.size and (indices.min() < 0 or indices.max() >= self.num_examples)):
            raise ValueError(
                f"Received rows of shape {indices.shape} and dtype {indices.dtype}; expected "
                f"a 1-D array of example indices in [0, {self.num_examples}).")
        return indices.astype(np.int64)

    def _numpy_batches(self, batch_size, shuffle, seed, copy, drop_remainder, rows=None):
        """`dataset()` off TensorFlow: rows gathered from the memory-mapped shards.

        The whole cache is shuffled (reading rows of a memory map in any
        order costs what reading them in order does once they are in the
        page cache); epoch i reads copy `i % copies` unless `copy` is given.
        """
        batches = _CacheBatches(self, copy, batch_size, rows=rows, shuffle=shuffle, seed=seed,
                                drop_remainder=drop_remainder)
        if len(batches) == 0:
            self._no_full_batch(batch_size)
        return batches

    def _no_full_batch(self, batch_size):
        raise DataError(f"Received batch_size={batch_size} with drop_remainder for a cache "
                        f"of {self.num_examples} examples: no full batch. Lower the "
                        "batch size.")

    def _in_memory(self, batch_size, shuffle, seed, copy, drop_remainder, rows=None):
        """`dataset()` for a copy that fits the shuffle budget: read once, batches gathered.

        The shuffle buffer would hold all of it anyway; shuffling indices and
        gathering whole batches costs a few operations a batch instead of a
        few a record, which is most of a head epoch on cached features.
        """
        tf = backend.tensorflow("tf.data pipelines")
        features, labels = (tf.constant(part) for part in self.load(copy))
        if rows is None:
            order = tf.data.Dataset.range(self.num_examples)
        else:
            order = tf.data.Dataset.from_tensor_slices(rows)
        count = self.num_examples if rows is None else len(rows)
        if shuffle:
            order = shuffle_each_epoch(order, max(count, 1), seed)
        dataset = order.batch(batch_size, drop_remainder=drop_remainder).map(
            as_written(lambda index: (tf.gather(features, index), tf.gather(labels, index))))
        return self._counted(dataset, batch_size, drop_remainder, count)

    def _counted(self, dataset, batch_size, drop_remainder, count=None):
        """The batches with their number asserted (Keras needs it), prefetched."""
        tf = backend.tensorflow("tf.data pipelines")
        count = self.num_examples if count is None else count
        batches = count // batch_size if drop_remainder else math.ceil(count / batch_size)
        if batches == 0:
            self._no_full_batch(batch_size)
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
        verify_shards(self.path, self.manifest)

    def close(self) -> None:
        """Releases the entry (its shared lock): the cache may remove it once unused."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __del__(self):
        self.close()


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
    lock = open_entry(path)  # held by the cache returned: the entry is in use
    if lock is None:
        return None  # removed while we waited
    manifest, why = check_complete(path, key, FORMAT_VERSION)
    if manifest is None:
        lock.close()
        logger.warning("Ignoring the feature cache at %s: %s. It will be rebuilt.", path, why)
        return None
    cache = FeatureCache(path, manifest, reused=True, _lock=lock)
    try:
        cache.verify()  # a shard changed in place keeps its size: check its bytes
    except DataError as error:
        cache.close()
        logger.warning("Ignoring the feature cache at %s: %s It will be rebuilt.", path, error)
        return None
    return cache


class _ShardRows:
    """The rows of one copy's shards, memory-mapped, gathered by example index."""

    def __init__(self, folder: str, shards: list[dict]):
        def mapped(part):
            return [np.load(os.path.join(folder, s[part]["file"]), mmap_mode="r")
                    for s in shards]

        self.features, self.labels = mapped("features"), mapped("labels")
        self.starts = np.cumsum([0] + [len(f) for f in self.features])

    def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        parts = []
        for values in (self.features, self.labels):
            out = np.empty((len(indices), *values[0].shape[1:]), values[0].dtype)
            for s in np.unique(shard):
                where = shard == s
                out[where] = values[s][indices[where] - self.starts[s]]
            parts.append(out)
        return tuple(parts)


class _CacheBatches(ExampleBatches):
    """`FeatureCache.dataset` off TensorFlow: batches of example indices, rows gathered.

    Epoch e reads copy `e % copies` of the cache unless `copy` is given.
    """

    def __init__(self, cache: FeatureCache, copy: int | None, batch_size: int, rows=None,
                 **options):
        rows = np.arange(cache.num_examples) if rows is None else rows
        super().__init__((rows,), batch_size, **options)
        self.cache, self.copy = cache, copy
        self._rows = {}

    def batch(self, index, epoch):
        (chosen,) = super().batch(index, epoch)
        copy = self.copy if self.copy is not None else epoch % self.cache.copies
        if copy not in self._rows:
            self._rows[copy] = _ShardRows(self.cache.path, self.cache._shards(copy))
        return self._rows[copy].take(chosen)


def _say(message: str, verbose) -> None:
    logger.info(message)
    if verbose:
        print(message)


def extract_features(model, x, y=None, *, head: str | None = None, batch_size: int = 32,
                     cache_dir=None, augmentation=None, augmented_copies: int = 0,
                     shard_size: int | None = None, verbose=0, bottom=None) -> FeatureCache:
    """Runs the frozen backbone over the data once and caches the features.

    The cache is reused when the backbone (architecture and weights), the
    preprocessing, the input size and the data (bytes and labels) all match
    an existing one; otherwise it is computed and written in shards.

    Args:
        model: a `TransferModel` (image or text); its backbone runs in
            inference mode.
        x: the data, as for `model.fit` with one head: arrays, a list of
            texts, a `tf.data.Dataset` of `(input, label)` pairs, a folder, a
            CSV file or `"tfds:<name>"`. It must yield the same examples in the
            same order on every pass.
        y: labels when `x` is an array or a list; None for unlabelled arrays.
        head: str, optional. The head whose labels these are (needed with
            several heads; it decides how labels are read).
        batch_size: int. Examples per batch of the input pipeline; the
            backbone runs on batches of at least 64. Does not change the key.
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
        bottom: `fine_tune_cache.FrozenBottom`, optional. Cache the outputs
            of this frozen bottom of the network (keyed by its own
            `cache_key()`) instead of the backbone's features.

    Returns:
        A `FeatureCache`; `.reused` says whether the backbone ran.

    Example:
        >>> cache = extract_features(model, x_train, y_train)
        >>> cache.num_examples, cache.feature_shape, cache.reused
        (16, (1, 1, 1280), False)
    """
    for name, value, minimum in (("batch_size", batch_size, 1),
                                 ("augmented_copies", augmented_copies, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"Received {name}={value!r}; expected an int >= {minimum}.")
    if augmented_copies and augmentation is None:
        raise ValueError(f"Received augmented_copies={augmented_copies} without augmentation; "
                         "pass augmentation= (e.g. kt.default_augmentation()) or leave "
                         "augmented_copies at 0.")
    if augmentation is not None and not augmented_copies:
        raise ValueError(
            "Received augmentation without augmented_copies: cached features of random "
            "augmentations would be the same every epoch. Pass augmented_copies=K to "
            "cache K augmented copies, or train with HeadPhase(feature_cache='auto'), "
            "which recomputes the features of freshly augmented inputs every epoch.")
    if shard_size is not None and (not isinstance(shard_size, int) or shard_size < 1):
        raise ValueError(f"Received shard_size={shard_size!r}; expected a positive int or None.")
    root = default_cache_dir(cache_dir)
    cache_limit()  # a bad $KERAS_TRANSFER_CACHE_MAX fails before anything runs
    augment = None
    if augmentation is not None:
        augment = as_augmentation(augmentation)
    started = time.perf_counter()
    # One pipeline, iterated twice on a miss: hashed first, then extracted.
    batch_size = max(batch_size, MIN_EXTRACTION_BATCH)
    dataset, has_labels = _plain_dataset(model, x, y, head, batch_size)
    fingerprint, count = data_fingerprint(dataset)
    if count == 0:
        raise DataError("Received data that yields no examples; nothing to extract.")
    model_part = model_key(model) if bottom is None else bottom.cache_key()
    key = {"format": FORMAT_VERSION, "model": model_part, "data": fingerprint,
           "num_examples": count, "augmentation": _augmentation_key(augment, augmented_copies)}
    cache = find_cache(key, root)
    # Several workers extract together (each a share): all reuse, or none does.
    if not all_workers_agree(strategy_of(model), cache is not None):
        cache = None
    if cache is not None:
        _say(f"Feature cache: reusing {cache.num_examples:,} cached backbone features "
             f"x {cache.copies} cop{'ies' if cache.copies > 1 else 'y'} from {cache.path} "
             f"(looked up in {time.perf_counter() - started:.1f} s; the backbone does not run).",
             verbose)
        return cache
    final = os.path.join(root, _entry_name(key))
    try:
        os.makedirs(root, exist_ok=True)
        remove_stale_temporaries(root)
        make_room(root, needed=0 if bottom is not None else
                  _expected_bytes(model, count, max(augmented_copies, 1)))
        temporary, lock = new_temporary(root, os.path.basename(final))
    except OSError as error:
        raise CacheUnwritableError(
            f"Cannot write the feature cache under {root}: {error}. Pass cache_dir= (or set "
            f"${CACHE_ENV_VAR}) to a writable folder.") from error
    what = (f"{augmented_copies} augmented copies" if augmented_copies else "the data")
    _say(f"Feature cache: extracting backbone features of {count:,} examples ({what}) "
         f"into {final}.", verbose)
    try:
        manifest = write_features(model, dataset, temporary, shard_size, augment,
                                  max(augmented_copies, 1), key, count, has_labels, batch_size,
                                  network=bottom, rehash=not _in_memory(x))
        if manifest["key"] != key:
            logger.warning(
                "The data changed between two passes over it (a shuffled tf.data.Dataset?): "
                "the features are cached under what was really extracted, but this cache "
                "cannot be reused. Give a dataset that yields the same order every pass.")
            final = os.path.join(root, _entry_name(manifest["key"]))
        write_manifest(temporary, manifest)
        final = move_into_place(temporary, final, manifest["key"], FORMAT_VERSION)
    except BaseException:
        lock.close()
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    published = open_entry(final)  # taken before the temporary's: locked throughout
    lock.close()
    manifest, why = check_complete(final, manifest["key"], FORMAT_VERSION)
    if manifest is None:  # pragma: no cover - only if someone damages it right now
        raise DataError(f"The feature cache just written at {final} is unusable: {why}.")
    cache = FeatureCache(final, manifest, reused=False, _lock=published)
    make_room(root, keep=[final])
    _say(f"Feature cache: wrote {cache.num_examples:,} x {cache.copies} feature rows of shape "
         f"{cache.feature_shape} in {len(manifest['shards'])} shard(s) "
         f"({time.perf_counter() - started:.1f} s).", verbose)
    return cache


def _in_memory(x) -> bool:
    """Whether `x` is arrays or texts in memory: every pass over them yields the same batches."""
    return isinstance(x, (np.ndarray, list, tuple, dict))


def _expected_bytes(model, count: int, copies: int) -> int:
    """About the bytes an extraction will write (0 when the feature shape is not known)."""
    shape = getattr(model.backbone, "feature_shape", None)
    if not shape or any(not isinstance(d, int) for d in shape):
        return 0
    return count * copies * (int(np.prod(shape)) * 4 + 8)


class CacheUnwritableError(DataError, OSError):
    """The cache folder cannot be written; training can go on without a cache."""


def _plain_dataset(model, x, y, head, batch_size):
    """The model's own pipeline for `x`, unshuffled and unaugmented, and whether it has labels."""
    if not hasattr(model, "head_dataset"):
        raise TypeError(f"Received a {type(model).__name__}; feature extraction needs a "
                        "keras_transfer TransferModel (e.g. kt.ImageTransferModel).")
    head = model.resolve_head(head, "whose labels these are")
    labels_inside = isinstance(x, (str, os.PathLike)) or backend.is_tf_dataset(x)
    if y is None and not labels_inside:
        dataset = model.backbone.predict_dataset(x, batch_size=batch_size)
        if is_batches(dataset):
            return dataset.map(lambda inputs: (inputs, np.full(
                len(keras.tree.flatten(inputs)[0]), -1, np.int64))), False
        tf = backend.tensorflow("tf.data pipelines")
        return dataset.map(lambda inputs: (inputs, tf.fill(
            tf.shape(tf.nest.flatten(inputs)[0])[:1], tf.constant(-1, tf.int64)))), False
    return model.head_dataset(head, x, y, batch_size=batch_size), True
