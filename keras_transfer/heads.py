"""Head builders: what goes on top of a frozen backbone's feature map.

The classic head is Flatten -> Dense. Global average or max pooling keeps
the head small and independent of the input size. Optional hidden Dense
layers and dropout sit between pooling and the output layer.
"""

from __future__ import annotations

import keras

TASKS = ("classification", "multilabel", "regression")
POOLINGS = ("flatten", "avg", "max")

_OUTPUT_ACTIVATION = {
    "classification": "softmax",
    "multilabel": "sigmoid",
    "regression": "linear",
}


def check_task(task: str, num_classes) -> None:
    """Raises a clear `ValueError` for an unknown task or a bad class count."""
    if task not in TASKS:
        raise ValueError(f"Received task={task!r}; expected one of {TASKS}.")
    minimum = 2 if task == "classification" else 1
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < minimum:
        what = "number of outputs" if task == "regression" else "number of classes"
        raise ValueError(
            f"Received num_classes={num_classes!r} for task '{task}'; expected "
            f"an int >= {minimum} (the {what})."
        )


def build_head(
    num_classes: int,
    task: str = "classification",
    pooling: str = "flatten",
    hidden_units=(),
    dropout: float = 0.0,
    name: str = "head",
) -> keras.Sequential:
    """Builds the trainable head.

    Args:
        num_classes: int. The number of classes (or regression outputs).
        task: str. `"classification"` (softmax), `"multilabel"` (sigmoid)
            or `"regression"` (linear).
        pooling: str. `"flatten"` (the classic), `"avg"` or `"max"`.
        hidden_units: sequence of int. Hidden Dense layers (ReLU).
        dropout: float. Dropout rate before each Dense layer.
        name: str. Layer name.

    Returns:
        A `keras.Sequential` mapping a feature map (or vector) to outputs.

    Example:
        >>> head = build_head(5, pooling="avg", hidden_units=(128,), dropout=0.2)
    """
    check_task(task, num_classes)
    if pooling not in POOLINGS:
        raise ValueError(f"Received pooling={pooling!r}; expected one of {POOLINGS}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"Received dropout={dropout!r}; expected a rate in [0, 1).")
    layers = [{
        "flatten": keras.layers.Flatten(),
        "avg": keras.layers.GlobalAveragePooling2D(keepdims=False),
        "max": keras.layers.GlobalMaxPooling2D(keepdims=False),
    }[pooling]]
    for units in hidden_units:
        if dropout:
            layers.append(keras.layers.Dropout(dropout))
        layers.append(keras.layers.Dense(int(units), activation="relu"))
    if dropout:
        layers.append(keras.layers.Dropout(dropout))
    # float32 output keeps softmax stable under mixed precision.
    layers.append(keras.layers.Dense(
        num_classes, activation=_OUTPUT_ACTIVATION[task], dtype="float32",
        name="predictions"))
    return keras.Sequential(layers, name=name)


def default_loss(task: str) -> str:
    """The loss that matches the head's output activation."""
    return {
        "classification": "sparse_categorical_crossentropy",
        "multilabel": "binary_crossentropy",
        "regression": "mean_squared_error",
    }[task]


def default_metrics(task: str) -> list:
    """Metrics reported in the history for each task."""
    return {
        "classification": ["accuracy"],
        "multilabel": [keras.metrics.BinaryAccuracy(name="binary_accuracy")],
        "regression": [keras.metrics.MeanAbsoluteError(name="mae")],
    }[task]
