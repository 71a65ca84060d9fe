"""What every data path shares: labels for a head, data warnings, shuffling, several heads.

Image data (`image_data`) and text data (`text_data`) are read elsewhere;
this module turns labels into what a head trains on (`labels_for_head`),
gives each data warning once per call (`warn`), shuffles in an order that
depends on (seed, epoch) only (`EpochSeed`, `shuffle_each_epoch`), and joins
the batches of several heads into one pipeline (`join_heads`).
"""

from __future__ import annotations

import contextvars
import functools
import logging

import numpy as np

from keras_transfer import backend
from keras_transfer.batches import JoinedBatches, is_batches
from keras_transfer.errors import DataError

logger = logging.getLogger("keras_transfer")


# The warnings given so far in the current `fit`/`evaluate`/`predict` call.
_given = contextvars.ContextVar("keras_transfer_warnings_given", default=None)


def warn(message: str) -> None:
    """Logs a warning about the data, once per `fit`/`evaluate`/`predict` call.

    The same data is read more than once in one call (to check it, to cache
    its features, per phase): its warnings are given the first time only.
    """
    given = _given.get()
    if given is not None:
        if message in given:
            return
        given.add(message)
    logger.warning(message)


def warns_once(method):
    """Decorates a method so that each data warning shows once per call (see `warn`)."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        if _given.get() is not None:  # nested in another call
            return method(*args, **kwargs)
        token = _given.set(set())
        try:
            return method(*args, **kwargs)
        finally:
            _given.reset(token)

    return wrapper


def labels_for_head(values, head=None, *, kind: str = "classification",
                    num_classes: int | None = None, class_names=None,
                    what: str = "examples") -> tuple[np.ndarray, list | None]:
    """Checks labels against a head and returns them as the head trains on them.

    Classification labels may be integer class indices, integral floats,
    strings of integers (as a CSV file holds them), class names (mapped to
    indices of `class_names`, or of their sorted set), or one-hot rows.
    Multi-label targets are `(N, num_classes)` rows of 0/1; regression
    targets are finite numbers of shape `(N,)` or `(N, num_classes)`.

    Args:
        values: the labels, one per example.
        head: a `Head`, optional: gives `kind`, `num_classes` and
            `class_names`.
        kind, num_classes, class_names: used when no head is given.
        what: str. What the examples are, for messages (`"images"`).

    Returns:
        `(labels, class names)`: int64 indices `(N,)` (classification) or
        float32 targets, and the class names when the labels were names.

    Raises:
        DataError: naming the offending values and what to do.
    """
    if head is not None:
        kind, num_classes, class_names = head.kind, head.num_classes, head.class_names
    try:
        labels = np.asarray(values)
    except ValueError as error:  # ragged
        raise DataError(f"Received labels that do not form an array: {error}") from error
    if labels.ndim == 0 or len(labels) == 0:
        raise DataError(f"Received no labels (an array of shape {labels.shape}).")
    if labels.dtype.kind in "OUS":
        labels = _labels_from_strings(labels, kind, class_names, what)
        if isinstance(labels, tuple):  # class names
            labels, class_names = labels
            _check_range(labels, num_classes)
            return labels, class_names
    if labels.dtype.kind not in "biuf":
        raise DataError(f"Received labels of dtype {labels.dtype}; expected numbers or "
                        "class names.")
    if not np.all(np.isfinite(labels)):
        bad = np.flatnonzero(~np.isfinite(labels.reshape(len(labels), -1)).all(axis=1))
        raise DataError(f"Received NaN or infinite labels at positions {bad[:10].tolist()}; "
                        "remove those examples or fill in their labels.")
    if kind == "classification":
        if labels.ndim == 2 and labels.shape[1] == num_classes and np.isin(labels, (0, 1)).all() \
                and (labels.sum(axis=1) == 1).all():
            labels = labels.argmax(axis=1)  # one-hot rows
        if labels.ndim != 1:
            raise DataError(f"Received labels of shape {labels.shape}; expected integer class "
                            f"indices of shape (N,) or one-hot rows (N, {num_classes}). "
                            "For several labels per example use kind='multilabel'.")
        fractional = labels[np.mod(labels, 1) != 0]
        if fractional.size:
            raise DataError(
                f"Received class labels that are not whole numbers: "
                f"{sorted(set(fractional.tolist()))[:5]}. Expected class indices 0.."
                f"{(num_classes or 2) - 1}; for numeric targets use kind='regression'.")
        labels = labels.astype(np.int64)
        _check_range(labels, num_classes)
        return labels, None
    labels = labels.astype(np.float32)
    if kind == "multilabel":
        if labels.ndim != 2 or labels.shape[1] != num_classes:
            raise DataError(f"Received multilabel targets of shape {labels.shape}; "
                            f"expected (N, {num_classes}) of 0/1.")
        if not np.isin(labels, (0, 1)).all():
            raise DataError("Received multilabel targets other than 0 and 1.")
        return labels, None
    if labels.ndim == 1 and num_classes == 1:
        labels = labels[:, np.newaxis]
    if labels.ndim != 2 or labels.shape[1] != num_classes:
        raise DataError(
            f"Received regression targets of shape {labels.shape}; expected "
            f"(N, {num_classes})" + (" or (N,)" if num_classes == 1 else "") + ".")
    return labels, None


def _labels_from_strings(labels, kind, class_names, what):
    """Labels read as text: numbers parsed, or class names mapped to indices."""
    texts = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v
             for v in labels.reshape(-1).tolist()]
    blank = [i for i, v in enumerate(texts) if v is None or not str(v).strip()]
    if blank:
        raise DataError(f"Received missing or blank labels at positions {blank[:10]}; every "
                        f"one of the {what} needs a label. Fill them in or drop those rows.")
    texts = [str(v).strip() for v in texts]
    try:
        numbers = np.asarray([float(v) for v in texts]).reshape(labels.shape)
    except ValueError:
        numbers = None
    if numbers is not None and not (kind == "classification" and class_names is not None):
        return numbers
    if kind != "classification":
        raise DataError(f"Received labels such as {texts[:3]} for a {kind} head; expected "
                        "numbers.")
    if labels.ndim != 1:
        raise DataError(f"Received class names of shape {labels.shape}; expected one per "
                        "example.")
    names = list(class_names) if class_names is not None else sorted(set(texts))
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(texts) - set(index))
    if unknown:
        raise DataError(f"Received labels {unknown[:10]} that are not among the class names "
                        f"{names[:20]}.")
    return np.asarray([index[t] for t in texts], np.int64), names


def _check_range(labels, num_classes):
    if num_classes is None:
        return
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(
            f"Received labels outside num_classes={num_classes}: "
            f"{sorted(set(bad.tolist()))[:10]}. Expected integers in "
            f"[0, {num_classes - 1}]; raise num_classes or re-index the labels.")


class EpochSeed:
    """A shuffle seed that gives epoch e an order that depends on (seed, e) only.

    With `reshuffle_each_iteration`, tf.data draws the order of each pass
    from a sequence that starts over in a new process, so a run resumed at
    epoch e would train on epoch 0's order again. A pipeline shuffled with an
    `EpochSeed` (`shuffle_each_epoch`) reads the epoch from a variable when
    each pass starts; training sets it at the start of every epoch
    (`training.fit_phase` adds the callback). The order is then the same in
    an uninterrupted run, a resumed one, and on every worker.

    Args:
        seed: int. The base seed.

    Example:
        >>> seed = EpochSeed(7)
        >>> batches = shuffle_each_epoch(dataset, 1000, seed).batch(32)
        >>> seed.set_epoch(3)   # the next pass is epoch 3's order
    """

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.epoch_number = 0
        self._variable = None  # the epoch for tf.data pipelines, made when one needs it

    def set_epoch(self, epoch: int) -> None:
        self.epoch_number = int(epoch)
        if self._variable is not None:
            self._variable.assign(self.epoch_number)

    def tensor(self):
        """This pass's seed; read inside a dataset function, when the pass starts."""
        tf = backend.tensorflow("tf.data pipelines")
        if self._variable is None:
            with tf.init_scope():
                self._variable = tf.Variable(self.epoch_number, dtype=tf.int64,
                                             trainable=False, name="shuffle_epoch")
        return tf.constant(self.seed, tf.int64) * 1_000_003 + self._variable.read_value()

    def __int__(self) -> int:
        return self.seed

    def __repr__(self) -> str:
        return f"EpochSeed({self.seed})"


def as_written(function):
    """`function` for `tf.data` to trace as written, without AutoGraph.

    AutoGraph rewrites a traced function's Python control flow into graph
    operations, and converts every function it calls as well. The pipelines'
    functions branch on static shapes, dtypes and heads only; converting
    them took about a second of every `fit` on 2 cores (issue 21).
    """
    tf = backend.tensorflow("tf.data pipelines")
    return tf.autograph.experimental.do_not_convert(function)


def shuffle_each_epoch(dataset, buffer_size: int, seed=None):
    """`dataset.shuffle` in a new order every pass.

    Args:
        dataset: the dataset to shuffle.
        buffer_size: int. Elements in the shuffle buffer.
        seed: None, an int (tf.data's own sequence of orders), or an
            `EpochSeed` (the order of epoch e depends on (seed, e) only).

    Returns:
        The shuffled dataset, with the cardinality of `dataset`.
    """
    tf = backend.tensorflow("tf.data pipelines")
    if not isinstance(seed, EpochSeed):
        return dataset.shuffle(buffer_size, seed=seed, reshuffle_each_iteration=True)
    cardinality = int(dataset.cardinality())

    def one_pass(_):
        # This runs when a pass starts, so it reads that pass's epoch. The
        # function's graph gets no global seed: the order then depends on
        # (seed, epoch) only, and TensorFlow's check of a (0, tensor) seed
        # pair, which fails after tf.random.set_seed(0), is not reached.
        tf.compat.v1.get_default_graph().seed = None
        return dataset.shuffle(buffer_size, seed=seed.tensor(), reshuffle_each_iteration=False)

    shuffled = tf.data.Dataset.from_tensors(0).flat_map(as_written(one_pass))
    if cardinality >= 0:
        shuffled = shuffled.apply(tf.data.experimental.assert_cardinality(cardinality))
    return shuffled


# ------------------------------------------------------------ several heads
SAMPLINGS = ("round_robin", "proportional")


def task_schedule(batches: dict, sampling: str = "round_robin", seed=None) -> list[str]:
    """The order in which one training epoch takes batches from the heads' data.

    `"round_robin"` takes one batch from each head's data in turn until the
    largest has been seen once; smaller ones start over when they run out, so
    every head trains for the same number of steps. `"proportional"` takes
    every batch of every head once, in a random order, so each step draws a
    head in proportion to the batches it has left. (The training pipeline
    reshuffles the proportional order every epoch.)

    Args:
        batches: dict. `{head name: batches per pass over its data}`.
        sampling: str. `"round_robin"` or `"proportional"`.
        seed: int, optional. Seed of the proportional order.

    Returns:
        A list of head names, one per step of the epoch.

    Example:
        >>> task_schedule({"a": 3, "b": 1})
        ['a', 'b', 'a', 'b', 'a', 'b']
        >>> sorted(task_schedule({"a": 3, "b": 1}, "proportional"))
        ['a', 'a', 'a', 'b']
    """
    check_sampling(sampling)
    names = list(batches)
    if sampling == "round_robin":
        return names * max(batches.values())
    order = [name for name in names for _ in range(batches[name])]
    np.random.default_rng(seed).shuffle(order)
    return order


def check_sampling(sampling) -> str:
    if sampling not in SAMPLINGS:
        raise ValueError(f"Received sampling={sampling!r}; expected one of {SAMPLINGS}.")
    return sampling


def join_heads(datasets: dict, heads: dict, *, training: bool, sampling: str = "round_robin",
               seed=None, class_weights: dict | None = None) -> tuple:
    """Joins each head's batches into the one pipeline a model with N heads trains on.

    Every batch holds the data of ONE head, with targets for all heads and a
    mask per head (1 for the head the batch belongs to, 0 for the others) as
    Keras sample weights, so each head's loss and metrics count its own
    examples only. Class weights, when given, multiply the mask.

    Args:
        datasets: dict `{head name: batches of (inputs, labels)}`, any subset
            of `heads`.
        heads: dict `{head name: Head}`, every head of the model, in order.
        training: bool. Interleave the heads by `sampling`; otherwise their
            data follow one another.
        sampling: str. `"round_robin"` or `"proportional"` (see
            `task_schedule`).
        seed: int or `EpochSeed`, optional. Seed of the proportional order.
        class_weights: dict, optional. `{head name: 1-D array of a weight
            per class}`.

    Returns:
        `(dataset, steps)`: batches of `(inputs, {head: targets},
        {head: mask})`, and the number of batches in one pass.
    """
    class_weights = class_weights or {}
    names = [name for name in heads if name in datasets]
    if is_batches(datasets[names[0]]):
        return _join_batches(datasets, names, heads, training, sampling, seed, class_weights)
    tf = backend.tensorflow("tf.data pipelines")

    def router(name):
        table = class_weights.get(name)
        table = None if table is None else tf.constant(table, tf.float32)

        def route(inputs, labels):
            n = tf.shape(labels)[0]
            targets, masks = {}, {}
            for other, spec in heads.items():
                shape = (n,) if spec.kind == "classification" else (n, spec.num_classes)
                dtype = tf.int64 if spec.kind == "classification" else tf.float32
                if other == name:
                    targets[other] = tf.reshape(tf.cast(labels, dtype), shape)
                    mask = tf.ones((n,), tf.float32)
                    if table is not None:
                        mask = tf.gather(table, targets[other])
                    masks[other] = mask
                else:
                    targets[other] = tf.zeros(shape, dtype)
                    masks[other] = tf.zeros((n,), tf.float32)
            return inputs, targets, masks

        return route

    routed = [datasets[n].map(as_written(router(n)), num_parallel_calls=tf.data.AUTOTUNE)
              for n in names]
    batches = {n: steps_of(datasets[n], n) for n in names}
    if not training or len(names) == 1:
        joint = routed[0]
        for dataset in routed[1:]:
            joint = joint.concatenate(dataset)
        steps = sum(batches.values())
    else:
        schedule = task_schedule(batches, sampling, None if seed is None else int(seed))
        steps = len(schedule)
        choice = tf.data.Dataset.from_tensor_slices(
            np.array([names.index(n) for n in schedule], np.int64))
        if sampling == "proportional":
            # Every batch once per epoch, in a new random order each epoch.
            choice = shuffle_each_epoch(choice, steps, seed)
        else:
            routed = [d.repeat() for d in routed]  # smaller heads' data start over
        joint = tf.data.Dataset.choose_from_datasets(routed, choice)
    joint = joint.apply(tf.data.experimental.assert_cardinality(steps))
    return joint.prefetch(tf.data.AUTOTUNE), steps


def _join_batches(datasets, names, heads, training, sampling, seed, class_weights):
    """`join_heads` for NumPy `Batches` (the data path off TensorFlow)."""
    def router(name):
        table = class_weights.get(name)

        def route(inputs, labels):
            n = len(labels)
            targets, masks = {}, {}
            for other, spec in heads.items():
                shape = (n,) if spec.kind == "classification" else (n, spec.num_classes)
                dtype = np.int64 if spec.kind == "classification" else np.float32
                if other == name:
                    targets[other] = np.asarray(labels, dtype).reshape(shape)
                    masks[other] = (np.ones(n, np.float32) if table is None else
                                    np.asarray(table, np.float32)[targets[other]])
                else:
                    targets[other] = np.zeros(shape, dtype)
                    masks[other] = np.zeros(n, np.float32)
            return inputs, targets, masks

        return route

    routed = [datasets[n].map(router(n)) for n in names]
    batches = {n: steps_of(datasets[n], n) for n in names}
    if not training or len(names) == 1:
        schedule = [i for i, n in enumerate(names) for _ in range(batches[n])]
        joint = JoinedBatches(routed, schedule)
    else:
        order = task_schedule(batches, sampling, None if seed is None else int(seed))
        joint = JoinedBatches(routed, [names.index(n) for n in order],
                              reshuffle_seed=seed if sampling == "proportional" else None)
    return joint, len(joint)


def weigh_classes(dataset, class_weight):
    """Adds Keras sample weights `class_weight[label]` to `(inputs, labels)` batches."""
    if is_batches(dataset):
        table = np.asarray(class_weight, np.float32)
        return dataset.map(lambda inputs, labels: (inputs, labels,
                                                   table[np.asarray(labels, np.int64)]))
    tf = backend.tensorflow("tf.data pipelines")
    table = tf.constant(class_weight, tf.float32)
    return dataset.map(as_written(lambda inputs, labels: (inputs, labels,
                                                          tf.gather(table, labels))),
                       num_parallel_calls=tf.data.AUTOTUNE)


def check_finite(dataset) -> None:
    """Refuses a `tf.data.Dataset` that never ends (`.repeat()`), before it is counted.

    Once batched again (`unbatch`, `map`, `filter`), TensorFlow no longer
    knows an infinite dataset's size, and counting it would never end.
    """
    tf = backend.tensorflow("tf.data pipelines")
    if int(dataset.cardinality()) == tf.data.INFINITE_CARDINALITY:
        raise DataError("Received an infinite tf.data.Dataset (made with .repeat()); each epoch "
                        "is one pass over the data. Give a finite dataset: drop .repeat(), or "
                        "take the examples of one epoch with .take(steps).")


def steps_of(dataset, name: str | None = None) -> int:
    """Batches in one pass of a finite dataset (counted if unknown).

    Raises:
        DataError: for an infinite or empty dataset, naming the head.
    """
    where = f"Head {name!r}: " if name else ""
    if is_batches(dataset):
        if len(dataset) == 0:
            raise DataError(f"{where}The data is empty: it yields no batches.")
        return len(dataset)
    tf = backend.tensorflow("tf.data pipelines")
    n = int(dataset.cardinality())
    if n == tf.data.INFINITE_CARDINALITY:
        raise DataError(f"{where}Received an infinite dataset; repeat() is not needed, "
                        "each epoch is one pass over the data.")
    if n < 0:
        n = sum(1 for _ in dataset)
    if n == 0:
        raise DataError(f"{where}The data is empty: it yields no batches.")
    return n


# The fewest examples `HeadPhase(validation_split=)` holds some out of.
MIN_EXAMPLES_TO_HOLD_OUT = 20


def held_out_split(labels, kind: str, fraction: float, seed=None):
    """Indices `(kept, held_out)`: about `fraction` of the rows, stratified by class.

    Each class gives `round(fraction * members)` rows (a class of 1 or 2
    members gives none), so that every class is still trained on.
    Multi-label and regression rows are drawn at random.

    Args:
        labels: array of shape (N,) (classes) or (N, K).
        kind: the head's kind: "classification", "multilabel" or "regression".
        fraction: float in (0, 1).
        seed: int, optional.

    Returns:
        Two sorted int64 arrays that partition `range(N)`, or None when fewer
        than `MIN_EXAMPLES_TO_HOLD_OUT` rows are given or none would be held out.

    Example:
        >>> kept, held = held_out_split(np.repeat([0, 1], 50), "classification", 0.2, seed=0)
        >>> len(kept), len(held), np.bincount(np.repeat([0, 1], 50)[held]).tolist()
        (80, 20, [10, 10])
    """
    labels = np.asarray(labels)
    n = len(labels)
    if n < MIN_EXAMPLES_TO_HOLD_OUT:
        return None
    rng = np.random.default_rng(seed)
    if kind == "classification":
        held = [rng.permutation(np.flatnonzero(labels == c))[: int(round(fraction * count))]
                for c, count in zip(*np.unique(labels, return_counts=True))]
        held = np.concatenate(held)
    else:
        held = rng.permutation(n)[: int(round(fraction * n))]
    if held.size == 0:
        return None
    mask = np.zeros(n, bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)
