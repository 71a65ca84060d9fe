"""Routing a user's data to a model's heads, and the heads' batches back together.

What `TransferModel.fit`, `evaluate` and the trainer turn user data into:
`head_data` splits it by head (`{head: (x, y)}`), `head_dataset` makes one
head's labelled batches through the backbone component
(`backbone.make_dataset`) and adopts the class names the data gives, `join`
joins the heads' batches into what Keras trains on (`data.join_heads`:
targets and masks for every head; class weights). The functions take the
`TransferModel` (its `head_specs`, `single`, `sampling`, `backbone`).
"""

from __future__ import annotations

import difflib

import numpy as np

from keras_transfer.callbacks import head_of_key
from keras_transfer.data import join_heads, steps_of, weigh_classes
from keras_transfer.errors import DataError
from keras_transfer.heads import SINGLE


def head_data(model, x, y=None, arg: str = "x") -> dict:
    """`{head: (x, y)}` of what a user passed to `fit` or `evaluate`."""
    if model.single:
        return {SINGLE: (x, y)}
    if y is not None:
        raise DataError(f"Received y; a model with heads {model.head_names} takes its "
                        f"labels in x: x={{head name: (x, y)}}.")
    if not isinstance(x, dict):
        raise DataError(
            f"Received {arg} of type {type(x).__name__}; a model with heads "
            f"{model.head_names} takes a dict {{head name: data}}, where data is "
            f"{model.backbone.data_forms}, e.g. {{{model.head_names[0]!r}: (x, y)}}.")
    if not x:
        raise DataError(f"Received {arg}={{}}: no head has data. The heads are "
                        f"{model.head_names}.")
    check_head_dict(model, x, arg, DataError)
    fed = {}
    for name in model.head_names:
        if name not in x:
            continue
        value = x[name]
        if isinstance(value, tuple):
            if len(value) != 2:
                raise DataError(f"Received a tuple of {len(value)} items for head "
                                f"{name!r}; expected (x, y).")
            fed[name] = value
        else:
            fed[name] = (value, None)
    return fed

def check_head_dict(model, value, arg, error=ValueError) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"Received {arg}={value!r}; expected a dict {{head name: ...}} "
                        f"for the heads {model.head_names}.")
    unknown = [n for n in value if n not in model.head_specs]
    if unknown:
        hints = {n: difflib.get_close_matches(str(n), model.head_names, n=1) for n in unknown}
        hint = "; ".join(f"{n!r}: did you mean {h[0]!r}?" for n, h in hints.items() if h)
        raise error(f"Received {arg} for unknown head(s) {unknown}; this model's heads "
                    f"are {model.head_names}. {hint}".rstrip())
    return dict(value)

def check_targets(model, y) -> None:
    """Checks that a batch's targets (several heads) hold every head's.

    Raises:
        DataError: the targets are not `{head: ...}` for exactly the model's heads.
    """
    if not isinstance(y, dict) or set(y) != set(model.head_specs):
        raise DataError(
            f"Received targets {type(y).__name__} with keys "
            f"{sorted(y) if isinstance(y, dict) else None}; a model with heads "
            f"{model.head_names} trains on batches with targets and masks for all of "
            "them. Pass data as {head name: (x, y)}.")


def head_dataset(model, name, x, y=None, *, batch_size=32, training=False,
                 augmentation=None, seed=None, drop_remainder=False):
    """One head's labelled batches `(inputs, labels)`; adopts the class names the data gives."""
    spec = model.head_specs[name]
    try:
        dataset, class_names = model.backbone.make_dataset(
            x, y, head=spec, batch_size=batch_size, shuffle=training,
            augmentation=augmentation if training else None, seed=seed,
            drop_remainder=drop_remainder)
    except DataError as error:
        if model.single:
            raise
        raise DataError(f"Head {name!r}: {error}") from error
    _adopt_class_names(model, name, class_names)
    return dataset

def _adopt_class_names(model, name, class_names):
    if class_names is None:
        return
    spec = model.head_specs[name]
    where = "" if model.single else f"Head {name!r}: "
    if spec.class_names is None:
        if spec.kind != "regression" and len(class_names) != spec.num_classes:
            raise DataError(
                f"{where}the data names {len(class_names)} classes "
                f"{list(class_names)[:10]}, but the model has num_classes="
                f"{spec.num_classes}.")
        spec.class_names = list(class_names)
    elif list(class_names) != list(spec.class_names):
        raise DataError(
            f"{where}the data names the classes {list(class_names)[:10]}, but this "
            f"model was built for {spec.class_names[:10]}. Rename the class folders "
            "or build the model with matching class_names.")

def join(model, datasets: dict, *, training=False, seed=None, class_weight=None):
    """Joins `{head: batches}` into what Keras trains on; returns `(dataset, steps)`."""
    weights = class_weight_tables(model, class_weight)
    if model.single:
        dataset = datasets[SINGLE]
        if weights:
            dataset = weigh_classes(dataset, weights[SINGLE])
        return dataset, steps_of(dataset)
    return join_heads(datasets, model.head_specs, training=training,
                               sampling=model.sampling, seed=seed, class_weights=weights)

def class_weight_tables(model, class_weight) -> dict:
    """`{head: float32 weight of each class index}` from `fit`'s `class_weight`."""
    if class_weight is None:
        return {}
    given = {SINGLE: class_weight} if model.single else check_head_dict(
        class_weight, "class_weight")
    tables = {}
    for name, weights in given.items():
        spec = model.head_specs[name]
        if spec.kind != "classification" or not isinstance(weights, dict):
            raise ValueError(
                f"Received class_weight={weights!r} for a {spec.kind} head; expected "
                "{class index: weight} for a classification head.")
        table = np.ones(spec.num_classes, np.float32)
        for index, weight in weights.items():
            if not isinstance(index, (int, np.integer)) or not 0 <= index < spec.num_classes:
                raise ValueError(f"Received class_weight for class {index!r}; expected "
                                 f"class indices in [0, {spec.num_classes - 1}].")
            table[int(index)] = float(weight)
        tables[name] = table
    return tables

def make_dataset(model, x, y=None, *, batch_size=32, training=False, augmentation=None,
                 seed=None, class_weight=None):
    """Turns user data into the batches Keras trains or evaluates on.

    Args:
        x, y: the data as for `fit` (several heads: `{head: (x, y)}`).
        batch_size: int. Examples per batch (each batch holds one head's data).
        training: bool. Shuffle, augment and interleave the heads.
        augmentation: Keras layer(s) for training batches (images).
        seed: int, optional. Shuffle and sampling seed.
        class_weight: dict, optional. `{class: weight}` (several heads:
            `{head: {class: weight}}`).

    Returns:
        `(dataset, steps)`: batches of `(inputs, targets[, weights])`.
    """
    datasets = {n: head_dataset(model, n, hx, hy, batch_size=batch_size, training=training,
                                     augmentation=augmentation, seed=seed)
                for n, (hx, hy) in head_data(model, x, y).items()}
    return join(model, datasets, training=training, seed=seed, class_weight=class_weight)


def results_by_head(model, results: dict, fed: dict) -> dict:
    """`{head: {metric: value}}` of `evaluate`'s prefixed results, for the heads in `fed`."""
    per_head = {n: {} for n in fed}
    for key, value in results.items():
        owner = head_of_key(key, model.head_names)
        if owner in per_head:
            per_head[owner][key[len(owner) + 1:]] = float(value)
    return per_head
