"""Extraction: running a frozen network over the data and writing its outputs in shards.

`feature_cache.extract_features` decides whether an entry exists and where a
new one goes; this module runs the network once over the batches (a traced
`tf.function` on TensorFlow, a compiled Keras prediction elsewhere, split
across replicas under a `tf.distribute` strategy) and writes what it returns
with `ShardWriter`, hashing the inputs again as it goes.
"""

from __future__ import annotations

import math
import time

import keras
import numpy as np

from keras_transfer import backend
from keras_transfer.batches import is_batches
from keras_transfer.cache_key import _DataFingerprint
from keras_transfer.distribute import is_multi_worker, is_tpu, strategy_of
from keras_transfer.errors import DataError
from keras_transfer.shard_writer import ShardWriter

# The manifest's format: a change makes older entries misses.
FORMAT_VERSION = 2


class _FeatureModel(keras.Model):
    """The backbone in inference mode (after augmentation) as a model Keras compiles.

    Off TensorFlow, `predict_on_batch` of this model is the compiled
    feature function (a `jax.jit` on JAX), with the augmentation's random
    state carried between calls.
    """

    def __init__(self, backbone, augmentation=None):
        super().__init__(name="feature_extractor")
        self.backbone = backbone
        self.augmentation = augmentation

    def call(self, inputs):
        if self.augmentation is not None:
            inputs = self.augmentation(inputs, training=True)
        return self.backbone(inputs, training=False)


def _feature_function(model, spec, augmentation=None, network=None):
    """One compiled function: a raw input batch -> the features the heads take.

    `network` (default: the model's backbone component) always runs in
    inference mode; `fine_tune_cache` passes the frozen bottom of a
    fine-tuned network instead. On TensorFlow the function
    is traced once for any batch size (the batch dimension of `spec` is left
    open); elsewhere Keras compiles `_FeatureModel`'s prediction. It is kept
    on the model, so the training and validation data share it.
    """
    network = model.backbone if network is None else network
    key = ("_feature_functions", id(augmentation), id(network))
    functions = model.__dict__.setdefault("_feature_functions", {})
    if key not in functions and not backend.is_tensorflow():
        functions[key] = _FeatureModel(network, augmentation).predict_on_batch
    if key not in functions:
        tf = backend.tensorflow("tf.function")

        def features(inputs):
            if augmentation is not None:
                inputs = augmentation(inputs, training=True)
            return network(inputs, training=False)

        signature = tf.nest.map_structure(
            lambda s: tf.TensorSpec((None, *s.shape[1:]), s.dtype), spec)
        functions[key] = tf.function(features, input_signature=[signature])
    return functions[key]


def _replicated(model, function, batch_size: int):
    """`function` (a batch -> features) with every replica computing a share of the batch.

    Under a strategy with several replicas (devices, workers or TPU cores)
    each batch is padded to `batch_size` rows (one shape: TPUs compile for
    it), cut into one equal slice per replica, run with `strategy.run`, and
    the slices gathered back in order on every worker. Without one,
    `function` itself.
    """
    strategy = strategy_of(model)
    if strategy is None or not backend.is_tensorflow() or (strategy.num_replicas_in_sync == 1
                            and not (is_tpu(strategy) or is_multi_worker(strategy))):
        return function
    tf = backend.tensorflow("tf.distribute strategies")
    replicas = strategy.num_replicas_in_sync
    share = math.ceil(batch_size / replicas)

    @tf.function
    def step(values):
        # A plain function for `run`: each replica calls the traced one on its slice.
        return strategy.gather(strategy.run(lambda v: function(v), args=(values,)), axis=0)

    def run(inputs):
        rows = tf.shape(tf.nest.flatten(inputs)[0])[0]

        def pad(t):
            padding = [[0, share * replicas - rows]] + [[0, 0]] * (len(t.shape) - 1)
            return tf.pad(t, padding)

        padded = tf.nest.map_structure(pad, inputs)
        values = strategy.experimental_distribute_values_from_function(
            lambda context: tf.nest.map_structure(
                lambda t: t[context.replica_id_in_sync_group * share:
                            (context.replica_id_in_sync_group + 1) * share], padded))
        return step(values)[:rows]

    return run


def write_features(model, dataset, folder, shard_size, augment, copies, key, count,
                   has_labels, batch_size, network=None, rehash: bool = True) -> dict:
    """The extraction pass(es): writes shards into `folder`, returns the manifest.

    Args:
        model: the `TransferModel`.
        dataset: batches of `(inputs, labels)`, the same on every pass.
        folder: str. The entry's temporary folder.
        shard_size: int or None. Rows per shard.
        augment: callable or None. With `copies` > 1: each copy is of
            freshly augmented inputs.
        copies: int. Copies of the data to store.
        key: dict. The entry's key; its data fingerprint is replaced by
            that of what was really extracted.
        count: int. Examples the first pass counted.
        has_labels: bool.
        batch_size: int. Rows per backbone call.
        network: callable, optional. What runs instead of `model.backbone`.
        rehash: bool. Hash the batches again as they are extracted, so that
            data that changed since `key` was computed (a shuffled
            `tf.data.Dataset`) is cached under what was really extracted.
            False where the data cannot change (arrays in memory): hashing
            the float images again took about a tenth of the extraction.

    Returns:
        The manifest (not yet written).
    """
    spec = None if is_batches(dataset) else dataset.element_spec[0]
    plain = _replicated(model, _feature_function(model, spec, network=network), batch_size)
    augmented = None if augment is None else _replicated(
        model, _feature_function(model, spec, augment, network), batch_size)
    shards: list[dict] = []
    fingerprint = _DataFingerprint()
    feature_info = label_info = None
    for copy in range(copies):
        writer = ShardWriter(folder, count, shard_size, copy)
        for inputs, labels in dataset:
            if copy == 0 and rehash:
                fingerprint.update(inputs, labels)
            features = (augmented or plain)(inputs)
            if keras.tree.is_nested(features):
                raise DataError(
                    "The backbone returns several outputs "
                    f"({[tuple(t.shape) for t in keras.tree.flatten(features)]}); feature "
                    "caching needs the one tensor the heads take. Cut the backbone at one "
                    "layer (cut_layer=).")
            features = keras.ops.convert_to_numpy(features)
            if features.dtype not in (np.float16, np.float32, np.float64):
                features = features.astype(np.float32)  # e.g. bfloat16
            labels = np.asarray(labels)
            writer.write(features, labels)
            feature_info = (features.dtype, features.shape[1:])
            label_info = (labels.dtype, labels.shape[1:])
        shards.extend(writer.finish())
    if rehash:
        key = dict(key, data=fingerprint.hexdigest(), num_examples=fingerprint.count)
    return {
        "format": FORMAT_VERSION,
        "complete": True,
        "key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backbone_name": key["model"]["backbone"],
        "num_examples": key["num_examples"],
        "copies": copies,
        "has_labels": has_labels,
        "feature_shape": [int(d) for d in feature_info[1]],
        "feature_dtype": np.dtype(feature_info[0]).newbyteorder("<").str,
        "label_shape": [int(d) for d in label_info[1]],
        "label_dtype": np.dtype(label_info[0]).newbyteorder("<").str,
        "shards": shards,
    }
