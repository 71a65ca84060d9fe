"""Heads: what goes on top of a backbone's features, and how each is trained.

A `Head` is a spec: the number of classes, the kind of problem, its loss
weight among several heads, its class names and its shape (pooling, hidden
Dense layers, dropout). `Head.build` makes the Keras layers. The classic head
is Flatten -> Dense; global average or max pooling keeps it small and
independent of the input size.

Heads output logits (regression: the values themselves). Losses take logits
(`from_logits=True`, stable on every backend), and the softmax or sigmoid is
applied for `predict`, metrics and serving (`Head.activate`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re

import keras

KINDS = ("classification", "multilabel", "regression")
POOLINGS = ("flatten", "avg", "max")
SINGLE = "head"  # the key of the one head of a single-task model


def check_kind(kind: str, num_classes) -> None:
    """Raises a clear `ValueError` for an unknown kind or a bad class count."""
    if kind not in KINDS:
        raise ValueError(f"Received kind={kind!r}; expected one of {KINDS}.")
    minimum = 2 if kind == "classification" else 1
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < minimum:
        what = "number of outputs" if kind == "regression" else "number of classes"
        raise ValueError(
            f"Received num_classes={num_classes!r} for kind '{kind}'; expected "
            f"an int >= {minimum} (the {what})."
        )


@dataclasses.dataclass
class Head:
    """One head of a `TransferModel`: its outputs, loss and layers.

    Args:
        num_classes: int. The number of classes to predict (outputs for
            regression).
        kind: str. `"classification"` (softmax, integer labels),
            `"multilabel"` (sigmoid, 0/1 targets of shape `(N, num_classes)`)
            or `"regression"` (linear, targets of shape `(N,)` or
            `(N, num_classes)`).
        loss_weight: float. Weight of this head's loss in the total loss.
        class_names: list of str, optional. Names of the classes, in order.
        pooling: str. How an image feature map becomes a vector:
            `"flatten"` (the classic), `"avg"` or `"max"`. Text features are
            already vectors.
        hidden_units: sequence of int. Hidden Dense layers (ReLU).
        dropout: float. Dropout rate before each Dense layer.

    Example:
        >>> kt.Head(num_classes=1, kind="regression", loss_weight=0.5)
        Head(num_classes=1, kind='regression', loss_weight=0.5, class_names=None,
             pooling='flatten', hidden_units=(), dropout=0.0)
    """

    num_classes: int
    kind: str = "classification"
    loss_weight: float = 1.0
    class_names: list | None = None
    pooling: str = "flatten"
    hidden_units: tuple = ()
    dropout: float = 0.0

    def __post_init__(self):
        check_kind(self.kind, self.num_classes)
        if self.pooling not in POOLINGS:
            raise ValueError(f"Received pooling={self.pooling!r}; expected one of {POOLINGS}.")
        if isinstance(self.loss_weight, bool) or not isinstance(self.loss_weight, (int, float)) \
                or not math.isfinite(self.loss_weight) or self.loss_weight < 0:
            raise ValueError(f"Received loss_weight={self.loss_weight!r}; expected a "
                             "finite number >= 0.")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Received dropout={self.dropout!r}; expected a rate in [0, 1).")
        self.loss_weight = float(self.loss_weight)
        self.dropout = float(self.dropout)
        self.hidden_units = tuple(_positive_int(u, "hidden_units") for u in self.hidden_units)
        if self.class_names is not None:
            self.class_names = [str(c) for c in self.class_names]
            if self.kind != "regression" and len(self.class_names) != self.num_classes:
                raise ValueError(
                    f"Received {len(self.class_names)} class names {self.class_names[:10]} "
                    f"for num_classes={self.num_classes}; give one name per class.")

    @property
    def output(self) -> str:
        """What the head serves: `"probabilities"` or `"predictions"`."""
        return "predictions" if self.kind == "regression" else "probabilities"

    @property
    def is_linear(self) -> bool:
        """Whether the head is pooling + one Dense layer (a convex problem)."""
        return not self.hidden_units

    def build(self, name: str = "head") -> keras.Sequential:
        """The head's layers: pooling, hidden Dense layers, logits.

        Returns:
            A `keras.Sequential` mapping a feature map (or vector) to logits.
        """
        layers = [{
            "flatten": keras.layers.Flatten(),
            "avg": keras.layers.GlobalAveragePooling2D(keepdims=False),
            "max": keras.layers.GlobalMaxPooling2D(keepdims=False),
        }[self.pooling]]
        for units in self.hidden_units:
            if self.dropout:
                layers.append(keras.layers.Dropout(self.dropout))
            layers.append(keras.layers.Dense(units, activation="relu"))
        if self.dropout:
            layers.append(keras.layers.Dropout(self.dropout))
        # float32 logits keep the loss stable under mixed precision.
        layers.append(keras.layers.Dense(self.num_classes, dtype="float32", name="predictions"))
        return keras.Sequential(layers, name=name)

    def loss(self, targets, logits):
        """Per-example loss of a batch, from logits."""
        if self.kind == "classification":
            return keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
        targets = keras.ops.reshape(keras.ops.cast(targets, logits.dtype), keras.ops.shape(logits))
        if self.kind == "multilabel":
            return keras.losses.binary_crossentropy(targets, logits, from_logits=True)
        return keras.ops.mean(keras.ops.square(logits - targets), axis=-1)

    def activate(self, logits):
        """Probabilities (or regression values) from the head's logits."""
        if self.kind == "classification":
            return keras.ops.softmax(logits, axis=-1)
        if self.kind == "multilabel":
            return keras.ops.sigmoid(logits)
        return logits

    def metrics(self) -> list:
        """Fresh metrics for one training phase (they take activated outputs)."""
        return {
            "classification": ["accuracy"],
            "multilabel": [keras.metrics.BinaryAccuracy(name="binary_accuracy")],
            "regression": [keras.metrics.MeanAbsoluteError(name="mae")],
        }[self.kind]

    def get_config(self) -> dict:
        config = dataclasses.asdict(self)
        config["hidden_units"] = list(self.hidden_units)
        return config

    @classmethod
    def from_config(cls, config: dict) -> "Head":
        return cls(**config)


def as_head(name: str, head) -> Head:
    """A copy of `head` (a `Head` or its config dict), named in errors by `name`."""
    if isinstance(head, Head):
        return dataclasses.replace(head)  # a copy: the model adopts class names
    if isinstance(head, dict):
        return Head(**head)
    raise ValueError(f"Received head {name!r}: {head!r}; expected a kt.Head, e.g. "
                     "kt.Head(num_classes=10), or its config dict.")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Received {name} containing {value!r}; expected positive ints.")
    return int(value)


def heads_argument(num_classes, heads, **head_arguments):
    """The `heads` argument of `TransferModel` from a thin constructor's arguments."""
    if heads is not None:
        if num_classes is not None:
            raise ValueError(f"Received num_classes={num_classes!r} and heads=...; give "
                             "num_classes (one head) or heads={name: kt.Head(...)}, not both.")
        return check_tasks(heads)
    if num_classes is None:
        raise ValueError("Received neither num_classes nor heads; give num_classes=N (one "
                         "head) or heads={name: kt.Head(...)} (several).")
    return Head(num_classes, **head_arguments)


def check_tasks(tasks) -> dict:
    """`tasks` of the multi-task constructors, checked to be a non-empty dict."""
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError(f"Received tasks={tasks!r}; expected a non-empty dict "
                         "{name: kt.Head(...)}, e.g. {'digits': kt.Head(num_classes=10)}.")
    return tasks


def check_heads(heads) -> dict:
    """`{name: Head}` of a `TransferModel`'s `heads` dict, names checked."""
    if not isinstance(heads, dict) or not heads:
        raise ValueError(f"Received heads={heads!r}; expected a kt.Head or a non-empty dict "
                         "{name: kt.Head(...)}, e.g. {'digits': kt.Head(num_classes=10)}.")
    for name in heads:
        if not isinstance(name, str) or not re.match(r"^[A-Za-z][A-Za-z0-9_]*$", name):
            raise ValueError(
                f"Received head name {name!r}; expected an identifier (a letter, then "
                "letters, digits or underscores), e.g. 'digits'. It becomes an output key "
                "and a metric prefix.")
    return {n: as_head(n, h) for n, h in heads.items()}


def check_compile_arguments(loss, kwargs: dict) -> None:
    """Refuses what `TransferModel.compile` sets from the heads; drops their Nones from `kwargs`.

    Raises:
        ValueError: `loss`, `loss_weights` or `weighted_metrics` given.
    """
    for arg in ("loss_weights", "weighted_metrics"):
        if kwargs.get(arg) is not None:
            raise ValueError(
                f"Received {arg}={kwargs[arg]!r}; a TransferModel sets loss weights "
                "with kt.Head(loss_weight=...) and weighs metrics by head itself. "
                "Pass per-head metrics as metrics={head: [...]}.")
        kwargs.pop(arg, None)
    if loss is not None:
        raise ValueError(f"Received loss={loss!r}; each head's loss follows its kind "
                         "(kt.Head(kind=...)), computed from logits.")


def heads_loss(specs: dict, y: dict, y_pred: dict, sample_weight=None, trackers=None):
    """Sum over heads of `loss_weight * head loss`, each masked to its own batches.

    Args:
        specs: `{head: Head}`.
        y, y_pred: `{head: targets}`, `{head: logits}`.
        sample_weight: `{head: mask or weights}`, or None (every example counts).
        trackers: `{head: keras.metrics.Mean}`, optional: each head's mean loss.

    Returns:
        A float32 scalar.
    """
    total = 0.0
    for name, spec in specs.items():
        values = keras.ops.cast(spec.loss(y[name], y_pred[name]), "float32")
        if sample_weight is not None:
            mask = keras.ops.cast(sample_weight[name], "float32")
        else:
            mask = keras.ops.ones_like(values)
        if trackers and name in trackers:
            trackers[name].update_state(values, sample_weight=mask)
        # An empty batch (the last one of a worker) adds nothing, not NaN.
        batch = keras.ops.maximum(keras.ops.cast(keras.ops.shape(values)[0], "float32"), 1.0)
        total = total + spec.loss_weight * keras.ops.sum(values * mask) / batch
    return total
