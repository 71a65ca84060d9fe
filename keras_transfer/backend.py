"""The Keras backend that trains, and TensorFlow imported only where it is the tool.

The training core (models, phases, probe, feature cache, NumPy data path)
runs on any Keras 3 backend. TensorFlow is the tool for four things only:
`tf.data` and TFDS inputs, `tf.distribute` strategies and SavedModel
export. Modules import it through `tensorflow(purpose)`, which says what
to do when it is missing or when Keras runs on another backend.

On the TensorFlow backend the data path is `tf.data` (its pipelines shard
across workers and feed TPUs); on the others it is `keras.utils.PyDataset`
(`batches.py`).
"""

from __future__ import annotations

import importlib.util
import sys

import keras

from keras_transfer.errors import BackendError


def name() -> str:
    """The Keras backend: `"tensorflow"`, `"jax"`, `"torch"` or `"numpy"`."""
    return keras.backend.backend()


def is_tensorflow() -> bool:
    """Whether Keras runs on TensorFlow (then the data path is `tf.data`)."""
    return name() == "tensorflow"


def tensorflow(purpose: str):
    """Imports TensorFlow for `purpose`, or says what to do.

    Args:
        purpose: str. What needs it, for the message (`"SavedModel export"`).

    Returns:
        The `tensorflow` module.

    Raises:
        BackendError: TensorFlow is not installed, or Keras runs on another
            backend (TensorFlow ops cannot take that backend's tensors).

    Example:
        >>> tf = tensorflow("tf.data inputs")  # on the TensorFlow backend
        >>> tf.__name__
        'tensorflow'
    """
    if not is_tensorflow():
        raise BackendError(
            f"{purpose} needs the TensorFlow backend; Keras runs on {name()!r}. Set "
            "KERAS_BACKEND=tensorflow before importing Keras, or, on this backend, pass "
            "NumPy arrays, an image folder or a list of texts (and save a .keras file to "
            "export it with `keras-transfer export` where TensorFlow is installed).")
    # Once imported, no look-up: this runs inside tf.data functions too, where
    # AutoGraph would try (and fail, with a warning) to convert `find_spec`.
    if sys.modules.get("tensorflow") is not None:
        return sys.modules["tensorflow"]
    if importlib.util.find_spec("tensorflow") is None:
        raise BackendError(f"{purpose} needs TensorFlow, which is not installed: "
                           "pip install tensorflow.")
    import tensorflow as tf  # lazy: TensorFlow is optional (Keras on JAX)

    return tf


def is_tf_dataset(value) -> bool:
    """Whether `value` is a `tf.data.Dataset`, without importing TensorFlow."""
    return any(cls.__module__.startswith("tensorflow") and cls.__name__.endswith("Dataset")
               for cls in type(value).__mro__)


def is_tf_strategy(value) -> bool:
    """Whether `value` is a `tf.distribute.Strategy`, without importing TensorFlow."""
    return any(cls.__module__.startswith("tensorflow") and cls.__name__ == "Strategy"
               for cls in type(value).__mro__)

