"""Choosing and using a `tf.distribute` strategy.

A Keras model must be built and compiled inside the scope of the strategy it
trains with. Transfer models take `strategy=` at construction, build every
layer in its scope, and compile each training phase in it again.
"""

from __future__ import annotations

import contextlib

import tensorflow as tf

STRATEGY_NAMES = ("default", "auto", "mirrored", "cpu", "tpu")


def get_strategy(strategy=None) -> tf.distribute.Strategy | None:
    """Resolves a strategy argument.

    Args:
        strategy: None (no distribution), a `tf.distribute.Strategy`, or a
            name: `"auto"` (TPU if one is attached, else every local GPU
            with `MirroredStrategy`, else the default), `"mirrored"`,
            `"cpu"` (one CPU device) or `"tpu"`.

    Returns:
        A `tf.distribute.Strategy`, or None for the default.

    Example:
        >>> model = kt.ImageTransferModel("resnet50", 10, strategy="auto")
    """
    if strategy is None or isinstance(strategy, tf.distribute.Strategy):
        return strategy
    if strategy == "default":
        return None
    if strategy == "cpu":
        return tf.distribute.OneDeviceStrategy("/cpu:0")
    if strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    if strategy == "tpu":
        return _tpu_strategy()
    if strategy == "auto":
        try:
            return _tpu_strategy()
        except (ValueError, RuntimeError, tf.errors.NotFoundError):
            pass
        if len(tf.config.list_logical_devices("GPU")) > 1:
            return tf.distribute.MirroredStrategy()
        return None
    raise ValueError(
        f"Received strategy={strategy!r}; expected a tf.distribute.Strategy, "
        f"None, or one of {STRATEGY_NAMES}."
    )


def _tpu_strategy():
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def scope(strategy):
    """The strategy's scope, or a no-op context for None."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def model_scope(model):
    """The scope of the strategy `model` was built in (a no-op off TensorFlow)."""
    strategy = getattr(model, "distribute_strategy", None)
    return strategy.scope() if strategy is not None else contextlib.nullcontext()
