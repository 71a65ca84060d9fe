"""Several heads trained in parallel on one backbone, and forgetting measurements.

`MultiTaskModel` puts one head per task on a shared image backbone. Each task
has its own dataset of its own size. Training interleaves batches: every step
takes one batch from ONE task (round-robin, or drawn in proportion to the
tasks' sizes), and the batch carries a per-task mask as Keras sample weights,
so only that task's loss, and only that task's metrics, count the batch. The
two phases are those of `TransferModel.fit` (head on the frozen backbone,
then fine-tuning with BatchNormalization frozen and a `WarmupDecay` rate),
run by the same functions of `training.py`. `TextMultiTaskModel` does the
same on a KerasHub text backbone (one `TextPooling`, then one head per task)
and serves raw strings; both share `MultiTaskBase`.

`forgetting_report` measures how much a backbone forgot when it was
fine-tuned: accuracy kept on an earlier task, representation drift per block
(linear CKA and cosine similarity on a probe set) and relative weight change
per layer, for image backbones and KerasHub text backbones alike.
`snapshot_backbone` keeps the copy of the original to compare with.

Example:

```python
import keras_transfer as kt
model = kt.MultiTaskModel("mobilenet_v2", tasks={
    "digits": kt.Task(num_classes=10),
    "tags": kt.Task(num_classes=5, kind="multilabel"),
    "size": kt.Task(num_classes=1, kind="regression", loss_weight=0.5),
}, weights=None, input_shape=(32, 32, 3))
original = kt.snapshot_backbone(model)
model.fit({"digits": (x1, y1), "tags": (x2, y2), "size": (x3, y3)},
          head_epochs=2, fine_tune_epochs=2)
model.evaluate({"digits": (x1_test, y1_test)})   # {"digits": {"loss": ..., "accuracy": ...}}
report = kt.forgetting_report(original, model, x1_test[:200])
print(report)
```
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re

import keras
import numpy as np
import tensorflow as tf

from keras_transfer import heads, training
from keras_transfer.data import TextSource, as_text_source, check_labels, make_image_dataset
from keras_transfer.errors import BackboneError, DataError
from keras_transfer.image import (
    ImageBackboneMixin,
    ImagePreprocessing,
    image_serving_endpoints,
)
from keras_transfer.model import PhasedModel, strategy_scope
from keras_transfer.text import TextPooling, resolve_text_backbone
from keras_transfer.training import steps_per_epoch

logger = logging.getLogger("keras_transfer")

SAMPLINGS = ("round_robin", "proportional")
_TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


# --------------------------------------------------------------------- tasks
@dataclasses.dataclass
class Task:
    """One task of a `MultiTaskModel`: its head, loss and loss weight.

    Args:
        num_classes: int. The number of classes to predict (outputs for
            regression).
        kind: str. `"classification"` (softmax, integer labels),
            `"multilabel"` (sigmoid, 0/1 targets of shape `(N, num_classes)`)
            or `"regression"` (linear, targets of shape `(N,)` or
            `(N, num_classes)`).
        loss_weight: float. Weight of this task's loss in the total loss.
        class_names: list of str, optional. Names of the classes, in order.
        pooling: str. Head pooling: `"avg"` (default), `"max"` or
            `"flatten"`.
        hidden_units: sequence of int. Hidden Dense layers of the head.
        dropout: float. Dropout rate in the head.

    Example:
        >>> kt.Task(num_classes=1, kind="regression", loss_weight=0.5)
    """

    num_classes: int
    kind: str = "classification"
    loss_weight: float = 1.0
    class_names: list | None = None
    pooling: str = "avg"
    hidden_units: tuple = ()
    dropout: float = 0.0

    def __post_init__(self):
        heads.check_task(self.kind, self.num_classes)
        if self.pooling not in heads.POOLINGS:
            raise ValueError(f"Received pooling={self.pooling!r}; expected one of {heads.POOLINGS}.")
        if isinstance(self.loss_weight, bool) or not isinstance(self.loss_weight, (int, float)) \
                or not math.isfinite(self.loss_weight) or self.loss_weight < 0:
            raise ValueError(f"Received loss_weight={self.loss_weight!r}; expected a "
                             "finite number >= 0.")
        self.loss_weight = float(self.loss_weight)
        self.hidden_units = tuple(int(u) for u in self.hidden_units)
        self.dropout = float(self.dropout)
        if self.class_names is not None:
            self.class_names = [str(c) for c in self.class_names]
            if self.kind != "regression" and len(self.class_names) != self.num_classes:
                raise ValueError(
                    f"Received {len(self.class_names)} class names "
                    f"{self.class_names[:10]} for num_classes={self.num_classes}; "
                    "give one name per class.")

    @property
    def output(self) -> str:
        """What the head outputs: `"probabilities"` or `"predictions"`."""
        return "predictions" if self.kind == "regression" else "probabilities"

    def get_config(self) -> dict:
        config = dataclasses.asdict(self)
        config["hidden_units"] = list(self.hidden_units)
        return config


def _as_task(name, task) -> Task:
    if isinstance(task, Task):
        return dataclasses.replace(task)  # a copy: the model adopts class names
    if isinstance(task, dict):
        return Task(**task)
    raise ValueError(f"Received task {name!r}: {task!r}; expected a kt.Task, e.g. "
                     "kt.Task(num_classes=10), or its config dict.")


def task_schedule(batches: dict, sampling: str = "round_robin", seed=None) -> list[str]:
    """The order in which one training epoch takes batches from the tasks.

    `"round_robin"` takes one batch from each task in turn until the largest
    task has been seen once; smaller tasks start over when they run out, so
    every task trains for the same number of steps. `"proportional"` takes
    every batch of every task once, in a random order, so each step draws a
    task in proportion to the batches it has left. (The training pipeline
    reshuffles the proportional order every epoch.)

    Args:
        batches: dict. `{task name: batches per pass over its data}`.
        sampling: str. `"round_robin"` or `"proportional"`.
        seed: int, optional. Seed of the proportional order.

    Returns:
        A list of task names, one per step of the epoch.

    Example:
        >>> task_schedule({"a": 3, "b": 1})
        ['a', 'b', 'a', 'b', 'a', 'b']
        >>> sorted(task_schedule({"a": 3, "b": 1}, "proportional"))
        ['a', 'a', 'a', 'b']
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"Received sampling={sampling!r}; expected one of {SAMPLINGS}.")
    names = list(batches)
    if sampling == "round_robin":
        return names * max(batches.values())
    order = [name for name in names for _ in range(batches[name])]
    np.random.default_rng(seed).shuffle(order)
    return order


# --------------------------------------------------------------------- model
class MultiTaskBase(PhasedModel):
    """What image and text multi-task models share: tasks, heads, losses, training.

    One backbone feeds one head per task. Subclasses say how the backbone is
    built and called (`build`, `call`), how one task's data becomes batches
    (`_task_batches`), how inputs to predict become batches
    (`_predict_batches`), and what the export serves (`serving_endpoints`,
    `export_metadata`) and the config holds (`get_config`). Everything else
    (per-task losses and metrics, interleaved batches, the two training
    phases, evaluate, export) lives here once.

    Args:
        tasks: dict. `{name: Task}`; names are identifiers (letters, digits,
            underscores) and become the output keys and metric prefixes.
        name: str. Model name.
        **kwargs: passed to `keras.Model`.
    """

    # What one task's data is, for error messages.
    _data_kind = "(inputs, labels)"
    _data_forms = "(inputs, labels) or a tf.data.Dataset of (input, label)"

    def __init__(self, tasks=None, *, name=None, **kwargs):
        if not isinstance(tasks, dict) or not tasks:
            raise ValueError(
                f"Received tasks={tasks!r}; expected a non-empty dict "
                "{name: kt.Task(...)}, e.g. {'digits': kt.Task(num_classes=10)}.")
        for task_name in tasks:
            if not isinstance(task_name, str) or not _TASK_NAME.match(task_name):
                raise ValueError(
                    f"Received task name {task_name!r}; expected an identifier "
                    "(a letter, then letters, digits or underscores), e.g. 'digits'. "
                    "It becomes an output key and a metric prefix.")
        super().__init__(name=name, **kwargs)
        self._task_specs = {n: _as_task(n, t) for n, t in tasks.items()}
        self.task_names = list(self._task_specs)
        self.train_batchnorm = False
        self._task_loss_fns = None

    def _add_heads(self, pooling=None):
        """Builds one head per task (`pooling` overrides the tasks' own)."""
        self.task_heads = {
            n: heads.build_head(t.num_classes, t.kind, pooling or t.pooling, t.hidden_units,
                                t.dropout, name=f"{n}_head")
            for n, t in self._task_specs.items()}
        # Per-task mean loss over that task's examples only.
        self.task_loss_trackers = [keras.metrics.Mean(name=f"{n}_loss")
                                   for n in self.task_names]

    # ------------------------------------------------------------ properties
    @property
    def tasks(self) -> dict:
        """`{name: Task}`, in output order."""
        return dict(self._task_specs)

    @property
    def task(self) -> str:
        """`"multitask"`: read by the export metadata."""
        return "multitask"

    @property
    def num_classes(self) -> dict:
        """`{task name: number of classes or outputs}`."""
        return {n: t.num_classes for n, t in self._task_specs.items()}

    @property
    def class_names(self) -> dict:
        """`{task name: class names or None}`."""
        return {n: t.class_names for n, t in self._task_specs.items()}

    def compile(self, optimizer="adam", loss=None, metrics=None, **kwargs):
        """Compiles with one loss and metrics per task.

        Args:
            optimizer: a Keras optimizer or its name.
            loss: dict, optional. `{task name: loss}` overriding the default
                loss of some tasks (a name, function or `keras.losses.Loss`).
            metrics: dict, optional. `{task name: list of metrics}`
                overriding the defaults of some tasks. They are weighted by
                the task masks, so they count that task's examples only.
            **kwargs: passed to `keras.Model.compile` (not `loss_weights`
                nor `weighted_metrics`: set `Task(loss_weight=...)`).
        """
        for arg in ("loss_weights", "weighted_metrics"):
            if kwargs.get(arg) is not None:
                raise ValueError(
                    f"Received {arg}={kwargs[arg]!r}; a {type(self).__name__} sets loss "
                    "weights with kt.Task(loss_weight=...) and weighs metrics by task "
                    "itself. Pass per-task metrics as metrics={task: [...]}.")
            kwargs.pop(arg, None)
        losses = {n: heads.default_loss(t.kind) for n, t in self._task_specs.items()}
        losses.update(self._check_task_dict(loss, "loss"))
        task_metrics = {n: heads.default_metrics(t.kind) for n, t in self._task_specs.items()}
        task_metrics.update(self._check_task_dict(metrics, "metrics"))
        self._task_loss_fns = {n: _per_example_loss(fn) for n, fn in losses.items()}
        super().compile(optimizer=optimizer, loss=None, weighted_metrics=task_metrics, **kwargs)

    def _check_task_dict(self, value, arg) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise TypeError(f"Received {arg}={value!r}; expected a dict "
                             f"{{task name: ...}} for the tasks {self.task_names}.")
        unknown = sorted(set(value) - set(self.task_names))
        if unknown:
            raise ValueError(f"Received {arg} for unknown task(s) {unknown}; this "
                             f"model's tasks are {self.task_names}.")
        return dict(value)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Sum over tasks of `loss_weight * task loss`, each masked to its task."""
        if self._task_loss_fns is None:
            raise RuntimeError("Compile the model first (fit and evaluate do it).")
        if not isinstance(y, dict) or set(y) != set(self.task_names):
            raise DataError(
                f"Received targets {type(y).__name__} with keys "
                f"{sorted(y) if isinstance(y, dict) else None}; a {type(self).__name__} "
                f"trains on batches with targets and masks for all of its tasks "
                f"{self.task_names}. Pass data as {{task name: {self._data_kind}}}.")
        total = 0.0
        for name, tracker in zip(self.task_names, self.task_loss_trackers):
            values = self._task_loss_fns[name](y[name], y_pred[name])
            values = keras.ops.cast(values, "float32")
            if len(values.shape) > 1:  # a loss without reduction over outputs
                values = keras.ops.mean(keras.ops.reshape(
                    values, (keras.ops.shape(values)[0], -1)), axis=-1)
            if sample_weight is not None:
                mask = keras.ops.cast(sample_weight[name], "float32")
            else:
                mask = keras.ops.ones_like(values)
            tracker.update_state(values, sample_weight=mask)
            batch = keras.ops.cast(keras.ops.shape(values)[0], "float32")
            weight = self._task_specs[name].loss_weight
            total = total + weight * keras.ops.sum(values * mask) / batch
        # Gradients are summed over replicas: scale like Keras losses do.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            total = total / float(replicas)
        if self.losses:
            total = total + keras.ops.sum(keras.ops.stack(
                [keras.ops.cast(v, "float32") for v in self.losses]))
        return total

    def _ensure_compiled(self):
        if not self.compiled:
            with self.distribute_strategy.scope():
                self.compile()

    # ------------------------------------------------------------------ data
    def _check_data(self, data, arg="x") -> dict:
        if isinstance(data, tf.data.Dataset) or not isinstance(data, dict):
            raise DataError(
                f"Received {arg} of type {type(data).__name__}; a "
                f"{type(self).__name__} takes a dict {{task name: data}}, where data "
                f"is {self._data_forms}, e.g. {{{self.task_names[0]!r}: (x, y)}}.")
        if not data:
            raise DataError(f"Received {arg}={{}}: no task has data. Its tasks are "
                            f"{self.task_names}.")
        unknown = [n for n in data if n not in self._task_specs]
        if unknown:
            import difflib

            hints = {n: difflib.get_close_matches(str(n), self.task_names, n=1) for n in unknown}
            hint = "; ".join(f"{n!r}: did you mean {h[0]!r}?" for n, h in hints.items() if h)
            raise DataError(
                f"Received {arg} for task(s) {unknown}, which this model does not "
                f"have. Its tasks are {self.task_names}. {hint}".rstrip())
        return {n: data[n] for n in self.task_names if n in data}

    def _task_batches(self, name, task, x, y, *, batch_size, training, augmentation, seed):
        """One task's labelled batches. Subclasses implement this.

        Args:
            name: str. The task name, for error messages.
            task: Task. Its spec.
            x: the task's data (without labels when they travel inside).
            y: its labels, or None.
            batch_size, training, augmentation, seed: as for `make_dataset`.

        Returns:
            `(dataset, class_names)`: batches of `(inputs, labels)`, and the
            class names the data gives (or None).

        Raises:
            DataError: data without labels, naming the task.
        """
        raise NotImplementedError

    def _predict_batches(self, x, batch_size) -> tf.data.Dataset:
        """Batches of model inputs (no labels) to predict on. Subclasses implement this."""
        raise NotImplementedError

    def _task_dataset(self, name, data, *, batch_size, training, augmentation=None, seed=None):
        """One task's batches as `(inputs, {task: targets}, {task: mask})`."""
        task = self._task_specs[name]
        if isinstance(data, tuple):
            if len(data) != 2:
                raise DataError(f"Received a tuple of {len(data)} items for task "
                                f"{name!r}; expected {self._data_kind}.")
            x, y = data
        else:
            x, y = data, None
        if y is not None and task.kind == "regression":
            _check_regression_targets(name, y, task.num_classes)
        dataset, class_names = self._task_batches(
            name, task, x, y, batch_size=batch_size, training=training,
            augmentation=augmentation, seed=seed)
        self._adopt_class_names(name, class_names)
        specs = {n: self._task_specs[n] for n in self.task_names}

        def route(inputs, labels):
            n = tf.shape(labels)[0]
            targets, masks = {}, {}
            for other, spec in specs.items():
                if spec.kind == "classification":
                    empty = tf.zeros((n,), tf.int64)
                else:
                    empty = tf.zeros((n, spec.num_classes), tf.float32)
                if other == name:
                    if spec.kind == "classification":
                        targets[other] = tf.reshape(tf.cast(labels, tf.int64), (n,))
                    else:
                        targets[other] = tf.reshape(tf.cast(labels, tf.float32),
                                                    (n, spec.num_classes))
                    masks[other] = tf.ones((n,), tf.float32)
                else:
                    targets[other] = empty
                    masks[other] = tf.zeros((n,), tf.float32)
            return inputs, targets, masks

        dataset = dataset.map(route, num_parallel_calls=tf.data.AUTOTUNE)
        steps = steps_per_epoch(dataset)
        if steps == 0:
            raise DataError(f"Task {name!r}: the data is empty; it yields no batches.")
        return dataset, steps

    def _adopt_class_names(self, name, class_names):
        if class_names is None:
            return
        task = self._task_specs[name]
        if task.class_names is None:
            if task.kind != "regression" and len(class_names) != task.num_classes:
                raise DataError(
                    f"Task {name!r}: the data names {len(class_names)} classes "
                    f"{list(class_names)[:10]}, but the task has num_classes="
                    f"{task.num_classes}.")
            task.class_names = list(class_names)
        elif list(class_names) != list(task.class_names):
            raise DataError(
                f"Task {name!r}: the data names the classes {list(class_names)[:10]}, "
                f"but the task was built for {task.class_names[:10]}.")

    def make_dataset(self, data, *, batch_size=32, training=False, sampling="round_robin",
                     augmentation=None, seed=None):
        """Turns `{task: data}` into one pipeline of single-task batches.

        Args:
            data: dict `{task name: data}`, data as for `fit`.
            batch_size: int. Examples per batch (every batch holds one task).
            training: bool. Shuffle, augment and interleave the tasks by
                `sampling`; otherwise the tasks follow one another.
            sampling: str. `"round_robin"` or `"proportional"`, see
                `task_schedule`.
            augmentation: Keras layer(s) for training batches.
            seed: int, optional. Shuffle seed.

        Returns:
            `(dataset, steps)`: batches of `(inputs, {task: targets},
            {task: mask})`, and the number of batches in one epoch.
        """
        if sampling not in SAMPLINGS:
            raise ValueError(f"Received sampling={sampling!r}; expected one of {SAMPLINGS}.")
        data = self._check_data(data)
        parts = {n: self._task_dataset(n, d, batch_size=batch_size, training=training,
                                       augmentation=augmentation, seed=seed)
                 for n, d in data.items()}
        names = list(parts)
        datasets = [parts[n][0] for n in names]
        batches = {n: parts[n][1] for n in names}
        if not training or len(names) == 1:
            joint = datasets[0]
            for dataset in datasets[1:]:
                joint = joint.concatenate(dataset)
            steps = sum(batches.values())
        else:
            schedule = task_schedule(batches, sampling, seed)
            steps = len(schedule)
            choice = tf.data.Dataset.from_tensor_slices(
                np.array([names.index(n) for n in schedule], np.int64))
            if sampling == "proportional":
                # Every batch once per epoch, in a new random order each epoch.
                choice = choice.shuffle(steps, seed=seed, reshuffle_each_iteration=True)
            else:
                datasets = [d.repeat() for d in datasets]  # smaller tasks start over
            joint = tf.data.Dataset.choose_from_datasets(datasets, choice)
        joint = joint.apply(tf.data.experimental.assert_cardinality(steps))
        return joint.prefetch(tf.data.AUTOTUNE), steps

    # -------------------------------------------------------------- training
    def fit(self, x=None, y=None, *, validation_data=None, head_epochs=5,
            fine_tune_epochs=0, epochs=None, batch_size=32, sampling="round_robin",
            head_learning_rate=1e-3, fine_tune_learning_rate=1e-5, unfreeze="all",
            train_batchnorm=False, warmup_fraction=0.1, decay="cosine",
            early_stopping=None, augmentation=None, callbacks=None, shuffle=True,
            seed=None, verbose="auto"):
        """Trains the heads on the frozen backbone, then fine-tunes, on all tasks.

        Args:
            x: dict `{task name: data}`; for images, data is `(images,
                labels)`, a `tf.data.Dataset` of `(image, label)` or an image
                folder; for texts, `(texts, labels)`, a `tf.data.Dataset` of
                `(text, label)` or a CSV/TSV file. Tasks may have datasets of different sizes; tasks left out
                are not trained (their heads stay as they are).
            y: must be None (the labels travel in `x`).
            validation_data: dict like `x`, optional.
            head_epochs: int. Epochs of phase 1 (backbone frozen).
            fine_tune_epochs: int. Epochs of phase 2 (backbone unfrozen);
                0 skips it.
            epochs: int, optional. Keras-style alias: `head_epochs=epochs`
                and no fine-tuning.
            batch_size: int. Examples per batch; each batch is from one task.
            sampling: str. `"round_robin"` (one batch of each task in turn,
                smaller tasks repeated: equal steps per task) or
                `"proportional"` (every batch once per epoch, tasks drawn in
                proportion to their size). See `task_schedule`.
            head_learning_rate: float. Adam learning rate of phase 1.
            fine_tune_learning_rate: float. Peak Adam rate of phase 2.
            unfreeze: `"all"`, an int N or a layer name, for phase 2.
            train_batchnorm: bool. Let BatchNormalization train in phase 2.
            warmup_fraction: float. Share of phase 2 spent warming up.
            decay: str. `"cosine"` or `"linear"` decay after warmup.
            early_stopping: int, optional. Patience in epochs on the total
                validation loss (or the loss); restores the best weights.
            augmentation: Keras layer(s) applied to training batches.
            callbacks: list of Keras callbacks, used in both phases.
            shuffle: bool. Shuffle each task's data every epoch.
            seed: int, optional. Shuffle and sampling seed.
            verbose: as for `keras.Model.fit`.

        Returns:
            A `TransferHistory` covering both phases, with the total `loss`
            and per-task keys such as `digits_loss`, `digits_accuracy`,
            `tags_binary_accuracy`, `size_mae` and their `val_` forms.

        Example:
            >>> history = model.fit({"digits": (x1, y1), "tags": (x2, y2)},
            ...                     validation_data={"digits": (v1, w1)},
            ...                     head_epochs=3, fine_tune_epochs=2,
            ...                     sampling="proportional")
        """
        if y is not None:
            raise DataError(f"Received y; a {type(self).__name__} takes its labels in x: "
                            f"x={{task name: {self._data_kind}}}.")
        head_epochs, fine_tune_epochs = training.check_phase_arguments(
            head_epochs, fine_tune_epochs, epochs, warmup_fraction)
        if sampling not in SAMPLINGS:
            raise ValueError(f"Received sampling={sampling!r}; expected one of {SAMPLINGS}.")

        fed = self._check_data(x)
        train, steps = self.make_dataset(fed, batch_size=batch_size, training=shuffle,
                                         sampling=sampling, augmentation=augmentation,
                                         seed=seed)
        validation, validated = None, []
        if validation_data is not None:
            validated = list(self._check_data(validation_data, "validation_data"))
            validation, _ = self.make_dataset(validation_data, batch_size=batch_size)
        left_out = [n for n in self.task_names if n not in fed]
        if left_out:
            logger.info("Tasks without training data (not trained): %s", left_out)
        callbacks = [_DropUnfedTasks(self.task_names, list(fed), validated),
                     *(callbacks or [])]
        loss = {n: heads.default_loss(t.kind) for n, t in self._task_specs.items()}

        history = training.train_two_phases(
            self, train, validation, steps=steps, head_epochs=head_epochs,
            fine_tune_epochs=fine_tune_epochs, head_learning_rate=head_learning_rate,
            fine_tune_learning_rate=fine_tune_learning_rate,
            warmup_fraction=warmup_fraction, decay=decay, loss=loss,
            make_metrics=lambda: {n: heads.default_metrics(t.kind)
                                  for n, t in self._task_specs.items()},
            prepare_fine_tuning=lambda: self._unfreeze_for_fine_tuning(unfreeze,
                                                                       train_batchnorm),
            callbacks=callbacks,
            early_stopping=early_stopping, verbose=verbose)
        self.history = history
        return history

    def evaluate(self, x=None, y=None, *, batch_size=32, verbose=0, **kwargs):
        """Evaluates each task on its own data.

        Args:
            x: dict `{task name: data}` as for `fit`; any subset of tasks.
            y: must be None.
            batch_size: int.
            verbose: as for `keras.Model.evaluate`.

        Returns:
            `{task name: {"loss": ..., metric: ...}}`, e.g.
            `{"digits": {"loss": 0.3, "accuracy": 0.9}}`. Each task's values
            count that task's examples only.
        """
        if kwargs.get("_use_cached_eval_dataset"):  # Keras fit's validation pass
            return keras.Model.evaluate(self, x, y, batch_size=batch_size,
                                        verbose=verbose, **kwargs)
        if y is not None:
            raise DataError(f"Received y; pass x={{task name: {self._data_kind}}}.")
        data = self._check_data(x)
        dataset, _ = self.make_dataset(data, batch_size=batch_size)
        self._ensure_compiled()
        results = keras.Model.evaluate(self, dataset, verbose=verbose, return_dict=True,
                                       **kwargs)
        per_task = {n: {} for n in data}
        for key, value in results.items():
            owner = _task_of_key(key, self.task_names)
            if owner in per_task:
                per_task[owner][key[len(owner) + 1:]] = float(value)
        return per_task

    def _unfreeze_for_fine_tuning(self, unfreeze, train_batchnorm):
        """Makes the weights that phase 2 trains trainable."""
        training.unfreeze(self.backbone, unfreeze, train_batchnorm)
        self.train_batchnorm = bool(train_batchnorm)

    def predict(self, x, *, batch_size=32, verbose=0, **kwargs) -> dict:
        """Predicts every task on the same inputs.

        Args:
            x: inputs without labels (images for `MultiTaskModel`, texts for
                `TextMultiTaskModel`), in any form their `fit` takes.
            batch_size: int.
            verbose: as for `keras.Model.predict`.

        Returns:
            `{task name: numpy array (N, num_classes)}` of probabilities
            (regression: predictions).
        """
        if isinstance(x, dict):
            raise DataError("Received a dict; predict takes inputs only (no task "
                            "names) and returns every task's outputs for them.")
        dataset = self._predict_batches(x, batch_size)
        outputs = keras.Model.predict(self, dataset, verbose=verbose, **kwargs)
        return {n: np.asarray(outputs[n]) for n in self.task_names}

    # ---------------------------------------------------------------- export
    def export(self, path, *, overwrite=False, metrics=None, verify=True) -> str:
        """Exports one SavedModel whose signatures return `{task: outputs}`.

        Args:
            path: str. The export folder.
            overwrite: bool. Replace an existing export.
            metrics: dict, optional. `{task: {metric: value}}` (as returned
                by `evaluate`) or flat `{name: value}`, for `metadata.json`.
            verify: bool. Reload and check the export before it replaces
                anything.

        Returns:
            The path of the export.

        Example:
            >>> model.export("saved_models/multi")
            >>> serve = tf.saved_model.load("saved_models/multi").signatures["serving_default"]
            >>> serve(images=tf.constant(uint8_images))   # {"digits": ..., "tags": ...}
            >>> # a TextMultiTaskModel's: serve(texts=tf.constant(["some text"]))
        """
        from keras_transfer.export import export_saved_model

        flat = {}
        for key, value in (metrics or {}).items():
            if isinstance(value, dict):
                flat.update({f"{key}_{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        return export_saved_model(self, path, overwrite=overwrite, metrics=flat, verify=verify)

@keras.saving.register_keras_serializable(package="keras_transfer")
class MultiTaskModel(ImageBackboneMixin, MultiTaskBase):
    """One image backbone, one head per task, trained on all tasks jointly.

    The model takes raw 0-255 RGB images and returns `{task name: outputs}`.
    `TextMultiTaskModel` is its twin for text; both share `MultiTaskBase`.

    Args:
        backbone: str or keras.Model. A registry name (see
            `list_backbones()`), or any Keras model that maps images to a
            feature map. A `keras.Model` is used (and trained) as it is:
            keep a copy with `snapshot_backbone` to compare with later.
        tasks: dict. `{name: Task}`; names are identifiers (letters, digits,
            underscores) and become the output keys and metric prefixes.
        weights: `"imagenet"`, `None` (random), or a weights file. Ignored
            for a `keras.Model` backbone.
        input_shape: tuple `(height, width, 3)` or an int side.
        cut_layer: str, optional. For a `keras.Model` backbone: the layer
            whose output becomes the feature map.
        preprocessing: str, optional. For a `keras.Model` backbone:
            `"caffe"`, `"tf"`, `"torch"` or `"none"` (default).
        strategy: a `tf.distribute.Strategy` or a name (`"auto"`,
            `"mirrored"`, `"cpu"`, `"tpu"`).
        weights_source: str, optional. Where the pretrained weights came
            from, for the export metadata.
        name: str, optional. Model name.

    Example:
        >>> model = kt.MultiTaskModel("mobilenet_v2", tasks={
        ...     "digits": kt.Task(num_classes=10),
        ...     "tags": kt.Task(num_classes=5, kind="multilabel"),
        ...     "size": kt.Task(num_classes=1, kind="regression", loss_weight=0.5),
        ... }, weights=None, input_shape=(32, 32, 3))
        >>> history = model.fit({"digits": (x1, y1), "tags": (x2, y2)},
        ...                     head_epochs=2, fine_tune_epochs=1)
        >>> history.history["digits_accuracy"], history.history["tags_loss"]
        >>> model.predict(x1)["digits"].shape     # (N, 10)
    """

    _data_kind = "(images, labels)"
    _data_forms = "(images, labels), a tf.data.Dataset of (image, label) or an image folder"

    def __init__(self, backbone="mobilenet_v2", tasks=None, *, weights="imagenet",
                 input_shape=None, cut_layer=None, preprocessing=None, strategy=None,
                 weights_source=None, name=None, **kwargs):
        strategy, strategy_context = strategy_scope(strategy)
        with strategy_context:
            super().__init__(tasks, name=name or "multi_task_model", **kwargs)
            self.backbone, self.preprocessor = self._resolve_backbone(
                backbone, weights, input_shape, cut_layer, preprocessing, weights_source)
            self._add_heads()
            self.build((None, *self.input_shape_))
            training.freeze(self.backbone)

    # ----------------------------------------------------------------- model
    def build(self, input_shape):
        features = self.backbone.compute_output_shape(
            self.preprocessor.compute_output_shape(input_shape))
        for head in self.task_heads.values():
            head.build(features)
        self.built = True

    def call(self, inputs, training=None):
        x = self.preprocessor(inputs)
        # The backbone runs in inference mode unless BatchNormalization
        # training was asked for (as in TransferModel.call).
        features = self.backbone(x, training=training if self.train_batchnorm else False)
        return {n: self.task_heads[n](features, training=training) for n in self.task_names}

    # ------------------------------------------------------------------ data
    def _task_batches(self, name, task, x, y, *, batch_size, training, augmentation, seed):
        try:
            dataset, source = make_image_dataset(
                x, y, image_size=self.image_size, task=task.kind,
                num_classes=task.num_classes, batch_size=batch_size, shuffle=training,
                augmentation=augmentation if training else None, seed=seed)
        except DataError as error:
            raise DataError(f"Task {name!r}: {error}") from error
        if not source.has_labels:
            raise DataError(f"Task {name!r} received images without labels; give "
                            "(images, labels) or a dataset of (image, label) pairs.")
        return dataset, source.class_names

    def _predict_batches(self, x, batch_size):
        dataset, _ = make_image_dataset(x, None, image_size=self.image_size,
                                        batch_size=batch_size)
        return dataset.map(lambda images, _labels: images)

    # ---------------------------------------------------------------- export
    def serving_endpoints(self) -> dict:
        """`{signature: (function, input_signature)}`; outputs `{task: values}`."""
        return image_serving_endpoints(self.image_size,
                                       lambda images: self(images, training=False))

    def export_metadata(self) -> dict:
        """What `metadata.json` says about the model and each task."""
        return {
            "kind": "image_multitask",
            **self._backbone_metadata(),
            "output": {n: t.output for n, t in self._task_specs.items()},
            "tasks": {n: {**t.get_config(), "output": t.output}
                      for n, t in self._task_specs.items()},
        }

    def get_config(self):
        return {
            "name": self.name,
            "tasks": {n: t.get_config() for n, t in self._task_specs.items()},
            **self._backbone_config(),
        }


@keras.saving.register_keras_serializable(package="keras_transfer")
class TextMultiTaskModel(MultiTaskBase):
    """One KerasHub text backbone, one head per task, trained on all tasks jointly.

    The backbone's token outputs are pooled once (`TextPooling`, shared by
    all tasks) and each task's head (`Task.hidden_units`, `dropout`) maps
    the pooled vector to its outputs; `Task.pooling` is for image heads and
    is not used here. Training, per-task losses and metrics, sampling and
    the two phases are those of `MultiTaskModel` (`MultiTaskBase`).
    Tokenization runs in the `tf.data` pipeline, and inside the export,
    whose `serving_default` takes raw strings and returns `{task: outputs}`
    (import `tensorflow_text` before loading it).

    Args:
        backbone: str or `keras_hub.models.Backbone`. A KerasHub text preset
            (e.g. `"bert_tiny_en_uncased"`), a local KerasHub preset or
            Hugging Face folder, or a backbone instance (then give
            `preprocessor`).
        tasks: dict. `{name: Task}`; names are identifiers (letters, digits,
            underscores) and become the output keys and metric prefixes.
        sequence_length: int. Tokens per text (longer texts are cut).
        text_pooling: str. `"mean"` (over real tokens), `"cls"` or
            `"pooled"`.
        preprocessor: a `keras_hub.models.TextClassifierPreprocessor`;
            needed only with a `Backbone` instance.
        load_weights: bool. Load the preset's pretrained weights.
        strategy: a `tf.distribute.Strategy` or a name.
        preset: str, optional. The preset the backbone came from (set by
            `from_config`).
        name: str, optional. Model name.

    Example:
        >>> model = kt.TextMultiTaskModel(kt.minilm_path(), tasks={
        ...     "sentiment": kt.Task(num_classes=2),
        ...     "topics": kt.Task(num_classes=5, kind="multilabel"),
        ... }, sequence_length=64)
        >>> model.fit({"sentiment": (texts1, labels1), "topics": (texts2, tags2)},
        ...           head_epochs=3, fine_tune_epochs=1)
        >>> model.predict(["great food"])["sentiment"].shape   # (1, 2)
        >>> model.export("saved_models/reviews")   # serving_default(texts=...)
    """

    _data_kind = "(texts, labels)"
    _data_forms = ("(texts, labels), a tf.data.Dataset of (text, label) or a CSV/TSV "
                   "file (classification)")

    def __init__(self, backbone="bert_tiny_en_uncased", tasks=None, *, sequence_length=128,
                 text_pooling="mean", preprocessor=None, load_weights=True, strategy=None,
                 preset=None, name=None, **kwargs):
        strategy, strategy_context = strategy_scope(strategy)
        with strategy_context:
            super().__init__(tasks, name=name or "text_multi_task_model", **kwargs)
            network, preprocessor, found = resolve_text_backbone(
                backbone, preprocessor, sequence_length=sequence_length,
                load_weights=load_weights)
            self.preset = found or preset
            self.sequence_length = sequence_length
            self.text_pooling = text_pooling
            self.text_preprocessor = preprocessor
            self.pool = TextPooling(text_pooling, name="text_pooling")
            self.backbone = network
            self._add_heads(pooling="flatten")  # on the pooled (N, hidden) vectors
            self.build((None, sequence_length))
            training.freeze(self.backbone)

    @property
    def _default_save_signature(self):
        # The export has an explicit raw-string signature; the build shape
        # of a text model is no tensor spec (as in TransferModel).
        return None

    # ----------------------------------------------------------------- model
    def build(self, input_shape):
        for head in self.task_heads.values():
            head.build((None, self.backbone.hidden_dim))
        self.built = True

    def call(self, inputs, training=None):
        outputs = self.backbone(inputs, training=training if self.train_batchnorm else False)
        features = self.pool(outputs, inputs["padding_mask"])
        return {n: self.task_heads[n](features, training=training) for n in self.task_names}

    def tokenize(self, texts):
        """Token ids and masks of a batch of strings, as the backbone takes them."""
        return self.text_preprocessor(texts)

    def _unfreeze_for_fine_tuning(self, unfreeze, train_batchnorm):
        super()._unfreeze_for_fine_tuning(unfreeze, train_batchnorm)
        if self.text_pooling != "pooled":
            # The pooler feeds no loss under mean/cls pooling: keep it frozen.
            for layer in self.backbone._flatten_layers(include_self=False):
                if layer.name.startswith("pooled_dense"):
                    layer.trainable = False

    # ------------------------------------------------------------------ data
    def _texts_dataset(self, name, x, y, task):
        """`(dataset of (text, label) pairs, class names, size)` of one task's data."""
        classification = task is not None and task.kind == "classification"
        try:
            source = as_text_source(x, y if classification else None,
                                    class_names=task.class_names if classification else None)
        except DataError as error:
            raise DataError(f"Task {name!r}: {error}" if task else str(error)) from error
        if not isinstance(source, TextSource):  # a tf.data.Dataset
            dataset = source
            if not isinstance(dataset.element_spec, tuple):
                if task is not None:
                    raise DataError(f"Task {name!r} received texts without labels; give "
                                    "(texts, labels) or a dataset of (text, label) pairs.")
                dataset = dataset.map(lambda t: (t, tf.constant(-1, tf.int64)))
            if dataset.element_spec[0].shape.rank == 1:
                dataset = dataset.unbatch()
            size = int(dataset.cardinality())
            if size == 0:
                raise DataError(f"Task {name!r}: received an empty tf.data.Dataset of texts.")
            return dataset, None, size
        labels = source.labels
        if task is None:
            labels = np.full(len(source.texts), -1)
        elif classification:
            if labels is None:
                raise DataError(f"Task {name!r} received texts without labels; give "
                                "(texts, labels) or a dataset of (text, label) pairs.")
            try:
                check_labels(labels, task.kind, task.num_classes)
            except DataError as error:
                raise DataError(f"Task {name!r}: {error}") from error
        else:
            if y is None:
                raise DataError(f"Task {name!r} received texts without targets; give "
                                f"(texts, targets of shape (N, {task.num_classes})).")
            labels = np.asarray(y, np.float32)
            if len(labels) != len(source.texts):
                raise DataError(f"Task {name!r}: received {len(source.texts)} texts but "
                                f"{len(labels)} targets; expected one per text.")
        dataset = tf.data.Dataset.from_tensor_slices((source.texts, labels))
        return dataset, source.class_names, len(source.texts)

    def _task_batches(self, name, task, x, y, *, batch_size, training, augmentation, seed):
        if augmentation is not None:
            raise DataError("Received augmentation; it is for images, text models take none.")
        dataset, class_names, size = self._texts_dataset(name, x, y, task)
        if training:
            dataset = dataset.shuffle(max(min(size, 10_000), 1), seed=seed)
        dataset = dataset.batch(batch_size).map(
            lambda texts, labels: (self.tokenize(texts), labels),
            num_parallel_calls=tf.data.AUTOTUNE)
        return dataset, class_names

    def _predict_batches(self, x, batch_size):
        dataset, _, _ = self._texts_dataset("predict", x, None, None)
        return dataset.batch(batch_size).map(lambda texts, _labels: self.tokenize(texts),
                                             num_parallel_calls=tf.data.AUTOTUNE)

    # ---------------------------------------------------------------- export
    def serving_endpoints(self) -> dict:
        """`{"serving_default": (function, input_signature)}`: raw strings in,
        `{task: outputs}` out, the tokenizer inside the graph."""

        def serve_texts(texts):
            return self(self.tokenize(texts), training=False)

        return {"serving_default": (serve_texts,
                                    [tf.TensorSpec((None,), tf.string, name="texts")])}

    def export_metadata(self) -> dict:
        """What `metadata.json` says about the model and each task."""
        return {
            "kind": "text_multitask",
            "backbone": self.preset or self.backbone.name,
            "backbone_class": type(self.backbone).__name__,
            "sequence_length": self.sequence_length,
            "text_pooling": self.text_pooling,
            "output": {n: t.output for n, t in self._task_specs.items()},
            "tasks": {n: {**t.get_config(), "output": t.output}
                      for n, t in self._task_specs.items()},
            "inputs": {"serving_default": "texts: string [batch], raw UTF-8 text"},
            "serving_needs": "import tensorflow_text before tf.saved_model.load",
        }

    def get_config(self):
        return {
            "name": self.name,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "preprocessor": keras.saving.serialize_keras_object(self.text_preprocessor),
            "tasks": {n: t.get_config() for n, t in self._task_specs.items()},
            "sequence_length": self.sequence_length,
            "text_pooling": self.text_pooling,
            "preset": self.preset,
        }


def _per_example_loss(loss):
    """A function `(y_true, y_pred) -> per-example losses` for any loss spec."""
    if isinstance(loss, keras.losses.Loss):
        return loss.call  # the unreduced values
    function = keras.losses.get(loss)
    if isinstance(function, keras.losses.Loss):
        return function.call
    if function is None:
        raise ValueError(f"Received loss {loss!r}, which Keras does not know.")
    return function


def _task_of_key(key: str, task_names) -> str | None:
    """The task a metric key belongs to: the longest task-name prefix."""
    key = key.removeprefix("val_")
    owners = [n for n in task_names if key.startswith(n + "_")]
    return max(owners, key=len) if owners else None


def _check_regression_targets(name, y, num_classes):
    shape = np.shape(y)
    if not (len(shape) == 2 and shape[1] == num_classes) and \
            not (len(shape) == 1 and num_classes == 1):
        raise DataError(
            f"Task {name!r}: received regression targets of shape {shape}; expected "
            f"(N, {num_classes})" + (" or (N,)" if num_classes == 1 else "") + ".")


class _DropUnfedTasks(keras.callbacks.Callback):
    """Removes the metrics of tasks that had no data from each epoch's logs.

    A task without training (or validation) data would otherwise show zeros.
    """

    def __init__(self, task_names, trained, validated):
        super().__init__()
        self.task_names = list(task_names)
        self.trained = set(trained)
        self.validated = set(validated)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for key in list(logs):
            owner = _task_of_key(key, self.task_names)
            if owner is None:
                continue
            fed = self.validated if key.startswith("val_") else self.trained
            if owner not in fed:
                del logs[key]


# ---------------------------------------------------------------- forgetting
def snapshot_backbone(model) -> keras.Model:
    """A frozen copy of a backbone, to measure forgetting against later.

    Args:
        model: a `TransferModel`, `TextTransferModel`, `MultiTaskModel`,
            `TextMultiTaskModel` (its `backbone` is copied), any functional
            `keras.Model` or a KerasHub backbone.

    Returns:
        A new `keras.Model` with the same architecture and weights. Its
        weights are not shared, so later training leaves it unchanged.
        Plain Keras models are copied with `keras.models.clone_model`;
        subclasses (KerasHub backbones such as `BertBackbone`) are rebuilt
        with `type(backbone).from_config(backbone.get_config())`, so the
        copy keeps its class (and, e.g., `hidden_dim`); each way is the
        fallback of the other.

    Example:
        >>> original = kt.snapshot_backbone(model)   # before fine-tuning
        >>> model.fit(data, head_epochs=2, fine_tune_epochs=3)
        >>> print(kt.forgetting_report(original, model, probe_images))
    """
    backbone = getattr(model, "backbone", model)
    if not isinstance(backbone, keras.Model):
        raise TypeError(f"Received {type(model).__name__}; expected a transfer model "
                         "with a .backbone or a keras.Model.")

    def from_config():
        return type(backbone).from_config(backbone.get_config())

    def clone():
        return keras.models.clone_model(backbone)

    builtin = type(backbone).__module__.split(".")[0] == "keras"
    failures = []
    for make in (clone, from_config) if builtin else (from_config, clone):
        try:
            copy = make()
            copy.set_weights(backbone.get_weights())
        except Exception as error:  # noqa: BLE001 - the other way may work
            failures.append(f"{make.__name__}: {type(error).__name__}: {str(error)[:200]}")
            continue
        copy.trainable = False
        return copy
    raise BackboneError(
        f"Could not copy the backbone '{backbone.name}' ({type(backbone).__name__}) "
        f"with the same weights: {'; '.join(failures)}. Copy it before changing its "
        "architecture (e.g. before enable_lora), or save it with backbone.save(...) "
        "and load that file as the original.")


_BLOCK = re.compile(r"^(.*?block_?\d+[a-z]?)(?:_|$)")
_TRANSFORMER_LAYER = re.compile(r"^transformer_layer_\d+$")


def _is_text_backbone(backbone) -> bool:
    """Whether `backbone` takes KerasHub token dicts (token ids and padding mask)."""
    try:
        inputs = backbone.input
    except (AttributeError, ValueError, RuntimeError):
        return False
    return isinstance(inputs, dict) and {"token_ids", "padding_mask"} <= set(inputs)


def _sequence_output_layer(backbone) -> str:
    """The layer that outputs a text backbone's final token sequence."""
    output = backbone.output
    if isinstance(output, dict):
        output = output.get("sequence_output", next(iter(output.values())))
    history = getattr(output, "_keras_history", None)
    if history is not None and history[0] in backbone.layers:
        return history[0].name
    return backbone.layers[-1].name


def _output_rank(layer) -> int | None:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError, RuntimeError):
        return None


def block_layers(backbone: keras.Model, max_blocks: int = 8) -> list[str]:
    """Layer names at block boundaries, to compare representations at.

    Layers whose names carry a block number (`block_3_...` in MobileNetV2,
    `block3_...` in VGG, `conv2_block1_...` in ResNet, `block2a_...` in
    EfficientNet) are grouped by block, and the last layer of each block
    with a 4D output is its boundary (`block_3_add`, `block3_pool`). Without
    block names, layers with 4D outputs are used. Up to `max_blocks` evenly
    spaced boundaries are kept, plus the backbone's final output layer.

    KerasHub text backbones (inputs `token_ids`, `padding_mask`, ...): the
    boundaries are the `transformer_layer_N` layers (evenly spaced, up to
    `max_blocks`), plus the layer that outputs the final sequence output
    (`sequence_output`, not the pooler).

    Args:
        backbone: keras.Model. A functional model.
        max_blocks: int. Most boundaries to keep before the final output.

    Returns:
        Layer names, in network order.

    Example:
        >>> block_layers(keras.applications.VGG16(weights=None, include_top=False))
        ['block1_pool', 'block2_pool', 'block3_pool', 'block4_pool', 'block5_pool']
        >>> block_layers(keras_hub.models.BertBackbone(..., num_layers=4), max_blocks=2)
        ['transformer_layer_0', 'transformer_layer_2', 'transformer_layer_3']
    """
    layers = [layer for layer in backbone.layers
              if not isinstance(layer, keras.layers.InputLayer)]
    if not layers:
        raise ValueError(f"Received backbone '{backbone.name}' without layers.")
    if _is_text_backbone(backbone):
        candidates = [layer.name for layer in layers if _TRANSFORMER_LAYER.match(layer.name)]
        if not candidates:
            candidates = [layer.name for layer in layers if _output_rank(layer) == 3]
        final = _sequence_output_layer(backbone)
    else:
        groups: dict[str, str] = {}
        for layer in layers:
            match = _BLOCK.match(layer.name)
            if match and _output_rank(layer) == 4:
                groups[match.group(1)] = layer.name  # the last one wins
        candidates = list(groups.values())
        if not candidates:
            candidates = [layer.name for layer in layers if _output_rank(layer) == 4]
        final = layers[-1].name
    candidates = [c for c in candidates if c != final]
    if len(candidates) > max_blocks:
        keep = np.unique(np.linspace(0, len(candidates) - 1, max_blocks).round().astype(int))
        candidates = [candidates[i] for i in keep]
    return candidates + [final]


def linear_cka(x, y) -> float:
    """Linear centered kernel alignment (Kornblith et al., 2019).

    Each example's activations are flattened and centered over the
    examples; CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), computed with
    the n x n Gram matrices when there are fewer examples than features.

    Args:
        x: array `(n, ...)`. Activations of n examples.
        y: array `(n, ...)`. Activations of the same examples elsewhere.

    Returns:
        A float in [0, 1]; 1 for identical representations (also up to
        rotation and isotropic scaling). NaN when either side is constant.

    Example:
        >>> a = np.random.default_rng(0).normal(size=(50, 8))
        >>> round(linear_cka(a, 3 * a), 6)
        1.0
    """
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    if len(x) != len(y):
        raise ValueError(f"Received {len(x)} and {len(y)} examples; expected the same examples.")
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    if len(x) < min(x.shape[1], y.shape[1]):
        gram_x, gram_y = x @ x.T, y @ y.T
        similarity = np.sum(gram_x * gram_y)
        norm = np.linalg.norm(gram_x) * np.linalg.norm(gram_y)
    else:
        similarity = np.linalg.norm(y.T @ x) ** 2
        norm = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    if norm == 0:
        return math.nan
    return float(min(similarity / norm, 1.0))


def mean_cosine_similarity(x, y) -> float:
    """Mean over examples of the cosine between flattened activations.

    Args:
        x: array `(n, ...)`.
        y: array `(n, ...)`.

    Returns:
        A float in [-1, 1]. Two zero vectors count as identical (1).
    """
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    dots = np.sum(x * y, axis=1)
    both_zero = (np.linalg.norm(x, axis=1) == 0) & (np.linalg.norm(y, axis=1) == 0)
    cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
    return float(np.mean(np.where(both_zero, 1.0, cosine)))


def relative_weight_change(original: keras.layers.Layer, finetuned: keras.layers.Layer) -> float:
    """`||W_ft - W_0|| / ||W_0||` over all weights of one layer.

    Returns:
        A float >= 0; NaN when the original weights are all zero and changed.
    """
    change, size, _ = _weight_sums(original, finetuned)
    return _relative(change, size)


def _weight_sums(original, finetuned) -> tuple[float, float, int]:
    """`(||W_ft - W_0||^2, ||W_0||^2, parameters)` over a layer's weights."""
    before = [np.asarray(w, np.float64) for w in original.get_weights()]
    after = [np.asarray(w, np.float64) for w in finetuned.get_weights()]
    if [w.shape for w in before] != [w.shape for w in after]:
        raise ValueError(f"Layer {original.name!r} has weights of shapes "
                         f"{[w.shape for w in before]} in the original backbone but "
                         f"{[w.shape for w in after]} in the fine-tuned one; both "
                         "backbones must have the same architecture.")
    change = sum(float(np.sum((a - b) ** 2)) for a, b in zip(after, before))
    size = sum(float(np.sum(b ** 2)) for b in before)
    return change, size, int(sum(w.size for w in before))


def _relative(change: float, size: float) -> float:
    """`sqrt(change / size)` from squared norms; NaN for a change of nothing."""
    if size == 0:
        return 0.0 if change == 0 else math.nan
    return math.sqrt(change / size)


@dataclasses.dataclass
class ForgettingReport:
    """How much a fine-tuned backbone moved away from the original.

    Attributes:
        blocks: list of dict, one row per block boundary: `block`, `layer`,
            `cka` (linear CKA), `cosine` (mean cosine similarity),
            `weight_change` (relative change of the block's weights) and
            `params` (weights in the block).
        layers: list of dict, one row per layer with weights: `layer`,
            `params`, `weight_change`.
        earlier_task: dict or None: `original_accuracy`,
            `finetuned_accuracy` and `retained` (their ratio).
        weight_change: float. Relative change of all backbone weights.
        probe_size: int. Examples in the probe set.
        probe_kind: str. `"images"` or `"texts"`.
    """

    blocks: list
    layers: list
    earlier_task: dict | None = None
    weight_change: float = 0.0
    probe_size: int = 0
    probe_kind: str = "images"

    @property
    def retained_accuracy(self) -> float | None:
        """Fine-tuned / original accuracy on the earlier task (None without one)."""
        return None if self.earlier_task is None else self.earlier_task["retained"]

    @property
    def mean_cka(self) -> float:
        """Mean linear CKA over the blocks."""
        return float(np.nanmean([row["cka"] for row in self.blocks]))

    @property
    def mean_cosine(self) -> float:
        """Mean cosine similarity over the blocks."""
        return float(np.nanmean([row["cosine"] for row in self.blocks]))

    def table(self) -> list[dict]:
        """The per-block rows (copies), for printing or a DataFrame."""
        return [dict(row) for row in self.blocks]

    def summary(self) -> dict:
        """Headline numbers: mean and lowest CKA, mean cosine, weight change."""
        summary = {
            "mean_cka": self.mean_cka,
            "min_cka": float(np.nanmin([row["cka"] for row in self.blocks])),
            "final_cka": self.blocks[-1]["cka"],
            "mean_cosine": self.mean_cosine,
            "weight_change": self.weight_change,
        }
        if self.earlier_task is not None:
            summary.update(self.earlier_task)
        return summary

    def to_text(self) -> str:
        """A plain-text table of the blocks and the headline numbers."""
        width = max([len("block")] + [len(row["layer"]) for row in self.blocks])
        lines = [f"Forgetting report ({self.probe_size} probe {self.probe_kind})"]
        if self.earlier_task is not None:
            t = self.earlier_task
            lines.append(f"Earlier task accuracy: {t['original_accuracy']:.4f} -> "
                         f"{t['finetuned_accuracy']:.4f} (retained {t['retained']:.1%})")
        lines.append(f"Relative weight change (all weights): {self.weight_change:.4g}")
        header = f"{'layer':<{width}}  {'CKA':>7}  {'cosine':>7}  {'dW/W':>9}  {'params':>9}"
        lines += [header, "-" * len(header)]
        for row in self.blocks:
            lines.append(f"{row['layer']:<{width}}  {row['cka']:>7.4f}  {row['cosine']:>7.4f}  "
                         f"{row['weight_change']:>9.4g}  {row['params']:>9,}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    def plot(self, path=None, title=None):
        """Draws the report (see `plots.plot_forgetting`); returns the figure."""
        from keras_transfer.plots import plot_forgetting

        return plot_forgetting(self, path=path, title=title)


def _parts(model):
    """`(preprocessor or None, backbone)` of a transfer model or a bare backbone.

    A text model's preprocessor is its tokenizer (`model.tokenize`).
    """
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, keras.Model):
        tokenize = getattr(model, "tokenize", None)
        return tokenize or getattr(model, "preprocessor", None), backbone
    if isinstance(model, keras.Model):
        return None, model
    raise ValueError(f"Received {type(model).__name__}; expected a keras.Model backbone "
                     "or a model with a .backbone (TransferModel, TextTransferModel, "
                     "MultiTaskModel, TextMultiTaskModel).")


def _is_texts(values) -> bool:
    if isinstance(values, (str, bytes)):
        return True
    if isinstance(values, np.ndarray):
        return values.dtype.kind in "USO"
    return isinstance(values, (list, tuple)) and bool(values) \
        and isinstance(values[0], (str, bytes))


def _as_texts(texts, name="probe_images") -> list[str]:
    if isinstance(texts, np.ndarray):
        texts = texts.tolist()
    if isinstance(texts, (str, bytes)) or not isinstance(texts, (list, tuple)) or not texts:
        shown = repr(texts)[:60]
        raise DataError(f"Received {name}={shown} for a text backbone; expected a "
                        "non-empty list of strings.")
    texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise DataError(f"Received {name} with non-strings at positions {bad[:10]}; "
                        "a text backbone takes a list of strings.")
    return texts


def _tokens(tokenize, texts, keys, batch_size) -> dict:
    """Token arrays `{input name: (N, sequence)}` of texts, in batches."""
    parts = [tokenize(tf.constant(texts[i:i + batch_size]))
             for i in range(0, len(texts), batch_size)]
    missing = [k for k in keys if k not in parts[0]]
    if missing:
        raise BackboneError(
            f"The tokenizer gives {sorted(parts[0])} but the backbone takes "
            f"{sorted(keys)} (missing {missing}): pass the preprocessor made for this "
            "backbone, e.g. preprocessing=keras_hub.models.TextClassifierPreprocessor"
            ".from_preset(...).")
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in keys}


def _masked_mean(values, padding_mask) -> np.ndarray:
    """Mean over real tokens of `(N, sequence, hidden)` values; others as they are."""
    values = np.asarray(values, np.float64)
    if values.ndim != 3:
        return values
    mask = np.asarray(padding_mask, np.float64)[..., np.newaxis]
    return (values * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)


def _size(data) -> int:
    return len(next(iter(data.values()))) if isinstance(data, dict) else len(data)


def _take(data, start, stop):
    if isinstance(data, dict):
        return {k: v[start:stop] for k, v in data.items()}
    return data[start:stop]


def _as_images(images, backbone, name="probe_images") -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
        images = images[..., np.newaxis]
    if images.ndim != 4 or len(images) == 0:
        raise DataError(f"Received {name} of shape {images.shape}; expected "
                        "(N, height, width, channels) with N >= 1.")
    expected = backbone.input_shape
    if images.shape[-1] == 1 and expected[-1] == 3:
        images = np.repeat(images, 3, axis=-1)
    size = tuple(expected[1:3])
    if None not in size and tuple(images.shape[1:3]) != size:
        images = tf.image.resize(images, size).numpy()
    return images


def _batches(function, inputs, batch_size):
    """`function` over batches of `inputs` (an array or a dict of arrays), concatenated."""
    outputs = [function(_take(inputs, i, i + batch_size))
               for i in range(0, _size(inputs), batch_size)]
    if isinstance(outputs[0], (list, tuple)):
        return [np.concatenate([np.asarray(o[k]) for o in outputs]) for k in range(len(outputs[0]))]
    return np.concatenate([np.asarray(o) for o in outputs])


def _accuracy(predictions, labels) -> float:
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    if labels.ndim == 2 and labels.shape == predictions.shape and predictions.shape[1] > 1 \
            and np.isin(labels, (0, 1)).all() and not np.allclose(labels.sum(axis=1), 1):
        return float(np.mean((predictions > 0.5) == labels))  # multi-label
    if labels.ndim == 2 and labels.shape == predictions.shape:
        labels = labels.argmax(axis=1)  # one-hot
    labels = labels.reshape(-1)
    if predictions.shape[-1] == 1:
        return float(np.mean((predictions.reshape(-1) > 0.5) == labels))
    return float(np.mean(predictions.argmax(axis=-1) == labels))


def forgetting_report(original_backbone, finetuned_backbone, probe_images, *,
                      earlier_task=None, layers=None, preprocessing=None,
                      max_blocks: int = 8, batch_size: int = 64) -> ForgettingReport:
    """Measures how much fine-tuning changed a backbone (image or text).

    Image backbones compare each block's activations `(N, H, W, C)` as
    they are (flattened per example). KerasHub text backbones (BERT,
    RoBERTa, ...) give `(N, sequence, hidden)` activations that include
    padding positions, whose values mean nothing; each block's output is
    therefore mean-pooled over the padding mask (real tokens only) to one
    `(N, hidden)` vector per text before linear CKA and cosine similarity
    are computed. Weight changes are computed the same way for both.

    Args:
        original_backbone: the backbone before fine-tuning (from
            `snapshot_backbone`), or a transfer model holding it.
        finetuned_backbone: the fine-tuned backbone, or the transfer model
            (`TransferModel`, `TextTransferModel`, `MultiTaskModel`,
            `TextMultiTaskModel`) that holds it; its preprocessing (a text
            model's `tokenize`) is then used for both backbones.
        probe_images: the probe set. Images: array `(N, H, W, C)` of raw
            images (0-255), e.g. a few hundred test images; each block's
            activations on them take N x (block size) floats of memory.
            Text backbones: a list of N strings.
        earlier_task: `(head, x, y)`, optional. A head trained on the
            original backbone for an earlier task, with that task's inputs
            (images, or a list of strings for text) and labels: the report
            gives its accuracy on the original and on the fine-tuned
            backbone. A text head takes pooled features, as the `head` of a
            `TextTransferModel` does; they are pooled with the
            `text_pooling` of the transfer model given (default `"mean"`).
        layers: list of str, optional. Layer names to compare at (default:
            `block_layers(backbone, max_blocks)`).
        preprocessing: images: a mode (`"tf"`, `"caffe"`, `"torch"`,
            `"none"`) or a callable applied to the images first. Text: a
            tokenizer-preprocessor (e.g.
            `keras_hub.models.TextClassifierPreprocessor`) mapping a batch
            of strings to the backbone's token dict; needed only when both
            backbones are bare KerasHub backbones. Defaults to the
            preprocessor of the fine-tuned (or original) transfer model,
            else none.
        max_blocks: int. Most block boundaries to compare at.
        batch_size: int.

    Returns:
        A `ForgettingReport`: `print(report)` shows the table,
        `report.plot()` draws it.

    Example:
        >>> original = kt.snapshot_backbone(model)
        >>> model.fit(data_b, head_epochs=2, fine_tune_epochs=5)
        >>> report = kt.forgetting_report(original, model, x_test[:256],
        ...                               earlier_task=(head_a, xa_test, ya_test))
        >>> report.summary()["retained"], report.mean_cka
        >>> # text: TextTransferModel (or TextMultiTaskModel) and strings
        >>> original = kt.snapshot_backbone(text_model)
        >>> text_model.fit(texts_b, labels_b, head_epochs=2, fine_tune_epochs=2)
        >>> kt.forgetting_report(original, text_model, test_texts[:256])
    """
    pre_original, original = _parts(original_backbone)
    pre_finetuned, finetuned = _parts(finetuned_backbone)
    text = _is_text_backbone(original)
    if text:
        if isinstance(preprocessing, str):
            raise ValueError(
                f"Received preprocessing={preprocessing!r} for a text backbone; "
                "expected a tokenizer-preprocessor such as keras_hub.models."
                "TextClassifierPreprocessor(...), or a TextTransferModel to take it from.")
        pre = preprocessing or pre_finetuned or pre_original
        if pre is None:
            raise ValueError(
                "Received text backbones but no tokenizer: pass the TextTransferModel "
                "(or TextMultiTaskModel) as finetuned_backbone, or "
                "preprocessing=keras_hub.models.TextClassifierPreprocessor(...) made "
                "for this backbone.")
        pooling = (getattr(finetuned_backbone, "text_pooling", None)
                   or getattr(original_backbone, "text_pooling", None) or "mean")
    else:
        if _is_texts(probe_images):
            raise DataError(
                f"Received texts as probe_images, but '{original.name}' is not a "
                "KerasHub text backbone (it takes no token_ids/padding_mask). Pass "
                "images, or the text backbones to compare.")
        if isinstance(preprocessing, str):
            preprocessing = ImagePreprocessing(preprocessing)
        pre = preprocessing or pre_finetuned or pre_original or (lambda images: images)

    def prepare(inputs, name):
        """Model-ready inputs: preprocessed images or token arrays."""
        if text:
            return _tokens(pre, _as_texts(inputs, name), list(original.input), batch_size)
        images = _as_images(inputs, original, name)
        return _batches(lambda b: np.asarray(pre(b)), images, batch_size)

    names = list(layers) if layers is not None else block_layers(original, max_blocks)
    for name in names:
        for model in (original, finetuned):
            try:
                model.get_layer(name)
            except ValueError as error:
                raise ValueError(
                    f"Received layer {name!r}, which is not a layer of '{model.name}'. "
                    "Both backbones must have the same architecture; "
                    "kt.block_layers(backbone) lists usable layers.") from error

    def extractor(model):
        try:
            outputs = [model.get_layer(name).output for name in names]
            if isinstance(model.input, dict):
                inputs = model.input
            else:
                inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
            return keras.Model(inputs, outputs)
        except (AttributeError, ValueError, TypeError) as error:
            raise BackboneError(
                f"Could not read the outputs of layers {names} of '{model.name}': "
                f"{error}. The forgetting report needs functional backbones "
                "(built from keras.Input), as keras.applications models are.") from error

    def activations(model, prepared):
        """One array per block; text: mean over real tokens, `(N, hidden)`."""
        extract = extractor(model)

        def run(batch):
            outputs = extract(batch)
            if not isinstance(outputs, (list, tuple)):
                outputs = [outputs]
            if text:
                return [_masked_mean(o, batch["padding_mask"]) for o in outputs]
            return [np.asarray(o) for o in outputs]

        return _batches(run, prepared, batch_size)

    prepared = prepare(probe_images, "probe_images")
    before = activations(original, prepared)
    after = activations(finetuned, prepared)

    # Weight change per layer, and per block (layers up to each boundary).
    layer_rows, totals = [], [0.0, 0.0]
    order = [layer.name for layer in original.layers]
    boundaries = [order.index(name) if name in order else len(order) - 1 for name in names]
    block_sums = [[0.0, 0.0, 0] for _ in names]
    for index, layer in enumerate(original.layers):
        if not layer.weights:
            continue
        try:
            tuned = finetuned.get_layer(layer.name)
        except ValueError as error:
            raise ValueError(f"The fine-tuned backbone has no layer {layer.name!r}; "
                             "both backbones must have the same architecture.") from error
        change, size, params = _weight_sums(layer, tuned)
        layer_rows.append({"layer": layer.name, "params": params,
                           "weight_change": _relative(change, size)})
        totals[0] += change
        totals[1] += size
        block = next((b for b, end in enumerate(boundaries) if index <= end), len(names) - 1)
        block_sums[block][0] += change
        block_sums[block][1] += size
        block_sums[block][2] += params

    rows = []
    for name, a, b, (change, size, params) in zip(names, before, after, block_sums):
        match = _BLOCK.match(name)
        rows.append({
            "block": match.group(1) if match else name,
            "layer": name,
            "cka": linear_cka(a, b),
            "cosine": mean_cosine_similarity(a, b),
            "weight_change": _relative(change, size),
            "params": params,
        })

    earlier = None
    if earlier_task is not None:
        if not isinstance(earlier_task, (tuple, list)) or len(earlier_task) != 3:
            raise ValueError(f"Received earlier_task of type {type(earlier_task).__name__}; "
                             "expected a tuple (head, images, labels) (text: "
                             "(head, texts, labels)).")
        head, x, y = earlier_task
        kind = "texts" if text else "images"
        x = prepare(x, f"earlier_task {kind}")
        if _size(x) != len(np.asarray(y)):
            raise DataError(f"Received {_size(x)} earlier-task {kind} but "
                            f"{len(np.asarray(y))} labels; expected one label per "
                            f"{kind[:-1]}.")
        pool = TextPooling(pooling) if text else None

        def accuracy(model):
            def predict(batch):
                features = model(batch, training=False)
                if pool is not None:
                    features = pool(features, batch["padding_mask"])
                return head(features, training=False)

            return _accuracy(_batches(predict, x, batch_size), y)

        first, second = accuracy(original), accuracy(finetuned)
        earlier = {"original_accuracy": first, "finetuned_accuracy": second,
                   "retained": second / first if first else math.nan}

    total = _relative(*totals)
    return ForgettingReport(rows, layer_rows, earlier, total, _size(prepared),
                            "texts" if text else "images")
