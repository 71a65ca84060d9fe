"""The loop over training phases, and what the phases share.

`run_phases` runs the phases (`phases.HeadPhase`, `phases.FineTunePhase`)
in order on a `TransferModel`, resuming from a backup when one is given;
`FitData` turns what `fit` was given into batches once, for every phase;
`fit_phase` compiles with a fresh optimizer and fits one phase. Also here:
the warmup-and-decay learning-rate schedule, unfreezing the top of a
network, and the combined history of the phases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import shutil
import tempfile
from typing import TYPE_CHECKING

import keras
import numpy as np

from keras_transfer import backend
from keras_transfer.callbacks import (
    DivergenceGuard,
    DropUnfedHeads,
    LearningRateLogger,
    ShuffleEpoch,
)
from keras_transfer.data import labels_for_head
from keras_transfer.distribute import (
    batch_message,
    is_chief,
    is_multi_worker,
    is_tpu,
    model_scope,
    needs_full_batches,
    strategy_of,
)

if TYPE_CHECKING:  # phases.py imports this module
    from keras_transfer.phases import HeadPhase

logger = logging.getLogger("keras_transfer")


# ------------------------------------------------------------ schedules
@keras.saving.register_keras_serializable(package="keras_transfer")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to a peak learning rate, then cosine or linear decay.

    Args:
        peak_learning_rate: float. The rate reached after warmup.
        total_steps: int. Steps of the whole schedule.
        warmup_steps: int. Steps of the linear warmup from 0.
        decay: str. `"cosine"` or `"linear"`.
        final_fraction: float. The last rate as a fraction of the peak.

    Example:
        >>> schedule = WarmupDecay(1e-5, total_steps=1000, warmup_steps=100)
        >>> optimizer = keras.optimizers.Adam(schedule)
    """

    def __init__(self, peak_learning_rate, total_steps, warmup_steps=0,
                 decay="cosine", final_fraction=0.0):
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise ValueError(
                f"Received total_steps={total_steps}, warmup_steps={warmup_steps}; "
                "expected 0 <= warmup_steps <= total_steps and total_steps >= 1."
            )
        if decay not in ("cosine", "linear"):
            raise ValueError(f"Received decay={decay!r}; expected 'cosine' or 'linear'.")
        self.peak_learning_rate = float(peak_learning_rate)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.decay = decay
        self.final_fraction = float(final_fraction)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        peak = self.peak_learning_rate
        warmup = peak * (step + 1.0) / max(self.warmup_steps, 1)
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = keras.ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + keras.ops.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        decayed = peak * (self.final_fraction + (1.0 - self.final_fraction) * shape)
        return keras.ops.where(step < self.warmup_steps, warmup, decayed)

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "decay": self.decay,
            "final_fraction": self.final_fraction,
        }


def count_params(model: keras.Model) -> tuple[int, int]:
    """Returns `(trainable, frozen)` parameter counts of a built model."""
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    frozen = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return trainable, frozen


def leaf_layers(model: keras.Model) -> list:
    """The model's layers with nested models flattened, in order."""
    out = []
    for layer in model.layers:
        out.extend(leaf_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return out


def unfreeze(backbone, layers="all", train_batchnorm: bool = False) -> int:
    """Makes the top of a pretrained network trainable.

    Args:
        backbone: keras.Model, or a backbone component (`ImageBackbone`,
            `TextBackbone`), whose network is unfrozen.
        layers: `"all"`, an int N (the top N layers that have weights), or a
            layer name (that layer and every layer after it).
        train_batchnorm: bool. Also train BatchNormalization layers (and let
            them update their moving statistics). Off by default.

    Returns:
        The number of layers with weights that are now trainable.
    """
    if hasattr(backbone, "network"):
        return backbone.unfreeze(layers, train_batchnorm)
    weighted = [layer for layer in leaf_layers(backbone) if layer.weights]
    plan = unfreeze_plan(backbone, layers, train_batchnorm)
    backbone.trainable = True
    for layer, trains in zip(weighted, plan):
        layer.trainable = trains
    return sum(plan)


def unfreeze_plan(network: keras.Model, layers="all", train_batchnorm: bool = False) -> list:
    """Which of the network's layers with weights `unfreeze` would make trainable.

    Args:
        network: keras.Model. The pretrained network.
        layers, train_batchnorm: as for `unfreeze`.

    Returns:
        One bool per layer with weights (in `leaf_layers` order); nothing
        is changed.
    """
    weighted = [layer for layer in leaf_layers(network) if layer.weights]
    if layers == "all" or layers is None:
        start = 0
    elif isinstance(layers, bool):
        raise ValueError(f"Received unfreeze={layers!r}; expected 'all', an int or a layer name.")
    elif isinstance(layers, int):
        if layers < 1:
            raise ValueError(f"Received unfreeze={layers}; expected a positive number of layers.")
        start = max(len(weighted) - layers, 0)
    elif isinstance(layers, str):
        names = [layer.name for layer in leaf_layers(network)]
        if layers not in names:
            import difflib

            close = difflib.get_close_matches(layers, names, n=3)
            raise ValueError(
                f"Received unfreeze={layers!r}, which is not a layer of "
                f"'{network.name}'. Closest names: {close}. "
                "model.backbone.summary() lists them all."
            )
        cut = names.index(layers)
        start = sum(1 for layer in leaf_layers(network)[:cut] if layer.weights)
    else:
        raise ValueError(f"Received unfreeze={layers!r}; expected 'all', an int or a layer name.")
    return [index >= start and (train_batchnorm or
                                not isinstance(layer, keras.layers.BatchNormalization))
            for index, layer in enumerate(weighted)]


# ----------------------------------------------------------- the data
@dataclasses.dataclass
class FitData:
    """What `fit` was given, turned into batches once and shared by the phases.

    Attributes:
        model: the `TransferModel`.
        train: `{head: (x, y)}`.
        validation: `{head: (x, y)}` or None.
        batch_size, augmentation, class_weight, shuffle, seed: as for `fit`.
        backup_dir: str or None. The run's backup folder (`backup.RunBackup`).
        shuffle_seed: `data.EpochSeed`. The training pipelines' shuffle seed:
            epoch e's order depends on (seed, e) only.
        drop_remainder: bool. Training batches all have `batch_size`
            examples (TPUs, several workers).
    """

    model: object
    train: dict
    validation: dict | None
    batch_size: int = 32
    augmentation: object = None
    class_weight: object = None
    shuffle: bool = True
    seed: int | None = None
    backup_dir: str | None = None

    def __post_init__(self):
        from keras_transfer.backup import RunBackup
        from keras_transfer.data import EpochSeed

        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or self.batch_size < 1:
            raise ValueError(f"Received batch_size={self.batch_size!r}; expected a positive int.")
        self.strategy = strategy_of(self.model)
        self.multi_worker = is_multi_worker(self.strategy)
        self.drop_remainder = needs_full_batches(self.strategy)
        self.backup = None if self.backup_dir is None else RunBackup(
            self.backup_dir, writer=is_chief(self.strategy))
        self.seed = self._choose_seed(self.seed)
        self.shuffle_seed = EpochSeed(self.seed)
        self.phase_backup = None
        self._temporary = []
        self._batches = None
        self._validation = None
        # Check every head's data (labels, class names) before anything trains.
        self.batches()
        self.validation_batches()

    def _choose_seed(self, seed):
        """The shuffle seed: given, stored in the backup, 0 on several workers, or drawn."""
        if self.backup is not None:
            seed = self.backup.choose_seed(seed)
        if seed is None:
            # Every worker must shuffle alike (each keeps its share of a batch).
            seed = 0 if self.multi_worker else random.getrandbits(31)
            if self.backup is not None:
                self.backup.choose_seed(seed)
        return int(seed)

    def _distributable(self, dataset):
        """`dataset` with the sharding several workers need."""
        if not self.multi_worker:
            return dataset
        import tensorflow as tf

        # Every worker runs the whole pipeline and keeps its part of each
        # global batch; AUTO would try to shard by file (the cache's shards).
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = \
            tf.data.experimental.AutoShardPolicy.DATA
        return dataset.with_options(options)

    def batches(self):
        """`(training batches, steps per epoch)`, shuffled and augmented."""
        if self._batches is None:
            model = self.model
            datasets = {n: model.head_dataset(n, x, y, batch_size=self.batch_size,
                                              training=self.shuffle,
                                              augmentation=self.augmentation,
                                              seed=self.shuffle_seed,
                                              drop_remainder=self.drop_remainder)
                        for n, (x, y) in self.train.items()}
            dataset, steps = model.join(datasets, training=True, seed=self.shuffle_seed,
                                        class_weight=self.class_weight)
            self._batches = self._distributable(dataset), steps
        return self._batches

    def validation_batches(self):
        """Validation batches, or None."""
        if self.validation is not None and self._validation is None:
            model = self.model
            full = is_tpu(self.strategy)  # one batch shape on a TPU
            datasets = {n: model.head_dataset(n, x, y, batch_size=self.batch_size,
                                              drop_remainder=full)
                        for n, (x, y) in self.validation.items()}
            self._validation = self._distributable(model.join(datasets)[0])
        return self._validation

    def feature_caches(self, phase: HeadPhase, verbose) -> dict:
        """`{"train": {head: FeatureCache}, "validation": {...}}`: features extracted once.

        Under a strategy each replica extracts a share of every batch. Only
        the chief writes to the cache folder; other workers of a multi-worker
        run write their copy to a temporary folder removed by `close`.
        """
        from keras_transfer.feature_cache import extract_features

        cache_dir = phase.cache_dir
        if not is_chief(self.strategy):
            cache_dir = tempfile.mkdtemp(prefix="keras_transfer-worker-cache-")
            self._temporary.append(cache_dir)

        def caches(data, training):
            found = {}
            for name, (x, y) in data.items():
                found[name] = extract_features(
                    self.model, x, y, head=name, batch_size=self.batch_size,
                    cache_dir=cache_dir,
                    augmentation=self.augmentation if training else None,
                    augmented_copies=phase.augmented_copies if training else 0,
                    verbose=verbose)
            return found

        return {"train": caches(self.train, True),
                "validation": None if self.validation is None else caches(self.validation,
                                                                         False)}

    def cached_batches(self, caches: dict, held_out: dict | None = None):
        """Training and validation batches of cached features (see `feature_caches`).

        `held_out`, optional: `{head: (kept rows, held-out rows)}` of the
        training caches: those heads train on the kept rows, and the held-out
        rows are the validation data (when `caches` has none).
        """
        model = self.model
        held_out = held_out or {}
        train = {name: cache.dataset(self.batch_size, shuffle=self.shuffle,
                                     seed=self.shuffle_seed, drop_remainder=self.drop_remainder,
                                     rows=held_out[name][0] if name in held_out else None)
                 for name, cache in caches["train"].items()}
        train, _ = model.join(train, training=True, seed=self.shuffle_seed,
                              class_weight=self.class_weight)
        full = is_tpu(self.strategy)
        validation = None
        if caches["validation"] is not None:
            validation = {name: cache.dataset(self.batch_size, drop_remainder=full)
                          for name, cache in caches["validation"].items()}
        elif held_out:
            validation = {name: caches["train"][name].dataset(
                self.batch_size, drop_remainder=full, rows=rows)
                for name, (_, rows) in held_out.items()}
        if validation is not None:
            validation = self._distributable(model.join(validation)[0])
        return self._distributable(train), validation

    def example_weights(self, head: str, labels):
        """Per-example weights from `class_weight` for one head's labels, or None."""
        tables = self.model._class_weight_tables(self.class_weight)
        return None if head not in tables else tables[head][np.asarray(labels, np.int64)]

    def settings(self, phases) -> dict:
        """What a backup must match to resume this run (see `backup.RunBackup`)."""
        from keras_transfer.cache_key import _config_digest

        return {"phases": [repr(p) for p in phases], "batch_size": self.batch_size,
                "shuffle": self.shuffle, "class_weight": repr(self.class_weight),
                "augmentation": None if self.augmentation is None
                else _config_digest(self.augmentation),
                "heads": sorted(self.train), "steps": self.batches()[1],
                "model": _config_digest(self.model)}

    def close(self) -> None:
        """Removes the temporary folders of this fit (a worker's feature caches)."""
        for folder in self._temporary:
            shutil.rmtree(folder, ignore_errors=True)
        self._temporary.clear()


# ------------------------------------------------------------- the loop
def run_phases(model, data: FitData, phases, callbacks=(), verbose="auto") -> "TransferHistory":
    """Runs `phases` in order on `model`; returns the combined history.

    With a backup (`data.backup`), phases a previous run finished are not run
    again (their weights, records and history come back), the phase in
    progress resumes after its last saved epoch, and each epoch and phase
    is saved as it ends (see `keras_transfer.backup`).
    """
    from keras_transfer.memory import warn_if_too_large

    history = TransferHistory()
    callbacks = [ShuffleEpoch(data.shuffle_seed), *callbacks]
    if not model.single:
        fed = list(data.train)
        validated = list(data.validation or {})
        left_out = [n for n in model.head_names if n not in fed]
        if left_out:
            logger.info("Heads without training data (not trained): %s", left_out)
        callbacks.insert(0, DropUnfedHeads(model.head_names, fed, validated))
    for phase in phases:  # a phase's own checks, before anything trains or is written
        if hasattr(phase, "check"):
            phase.check(model, data)
    backup = data.backup
    finished = 0
    if backup is not None:
        backup.check_settings(data.settings(phases))
        finished = min(backup.finished_phases(), len(phases))
        if backup.resuming:
            say(f"Backup {backup.path}: resuming a run with {finished} of {len(phases)} "
                "phase(s) finished.", verbose)
    say(batch_message(data.batch_size, data.strategy), verbose)
    warn_if_too_large(model, phases[finished:], data, verbose)
    for index, phase in enumerate(phases):
        if index < finished:  # done before a restart: its result, not its work
            phase.prepare(model)
            record, phase_history = backup.finished_phase(index)
            if index == finished - 1:
                backup.load_finished(model, index)
            say(f"Phase '{phase.name}': finished before the restart; restored from the "
                "backup.", verbose)
        else:
            data.phase_backup = None if backup is None else backup.phase(index, phase.name)
            record, phase_history = phase.run(model, data, callbacks, len(history.epoch),
                                              verbose)
            if backup is not None:
                backup.finish_phase(index, model, record, phase_history)
        history.extend(record, phase_history)
    data.phase_backup = None
    warn_at_chance(model, data, history, verbose)
    return history


CHANCE_MARGIN = 0.02


def warn_at_chance(model, data: FitData, history: "TransferHistory", verbose) -> list[str]:
    """Warns about every classification head whose training ended at chance accuracy.

    Chance is the share of the most frequent class in that head's labels
    (1/K when the labels come inside the data, e.g. a dataset or a folder); a final
    training or validation accuracy within `CHANCE_MARGIN` of it means the
    head learned nothing usable.

    Returns:
        The warnings given (empty when none).
    """
    warnings = []
    for name, spec in model.head_specs.items():
        if spec.kind != "classification":
            continue
        metric = "accuracy" if model.single else f"{name}_accuracy"
        for split, given, key in (("training", data.train, metric),
                                  ("validation", data.validation or {}, f"val_{metric}")):
            values = [v for v in history.history.get(key, []) if not math.isnan(v)]
            if name not in given or not values:
                continue
            chance = majority_share(given[name][1], spec)
            if values[-1] > chance + CHANCE_MARGIN:
                continue
            where = "" if model.single else f"Head {name!r}: "
            warnings.append(
                f"{where}training ended at chance: final {split} accuracy {values[-1]:.3f}, "
                f"while always answering the most frequent class scores {chance:.3f}. Check "
                "that the labels match the inputs, that the backbone is pretrained "
                "(weights=None gives random features), the learning rate (too high "
                "diverges, too low barely moves), and, after training BatchNormalization "
                "from scratch, its momentum (FineTunePhase(batchnorm_momentum=0.9)).")
    for message in warnings:
        warn(message, verbose)
    return warnings


def majority_share(labels, head) -> float:
    """The share of the most frequent class in `labels`; 1/K when they are not given.

    Args:
        labels: the labels as given to `fit` (indices, names, one-hot rows),
            or None when they come inside the data (a dataset, a folder).
        head: the `Head` they are for.

    Returns:
        A float in (0, 1].
    """
    if labels is None:
        return 1.0 / head.num_classes
    indices, _ = labels_for_head(labels, head)
    return float(np.bincount(indices, minlength=head.num_classes).max() / len(indices))


def fit_phase(model, name, train, validation, epochs, make_optimizer, callbacks=(),
              early_stopping=None, initial_epoch=0, verbose="auto", peak_learning_rate=None,
              backup=None):
    """Compiles `model` with a fresh optimizer in its strategy's scope and fits one phase.

    Args:
        model: a `TransferModel` with its `trainable` flags already set.
        name: str. Phase name for logs (`"head"`, `"fine_tune"`).
        train: batches of `(inputs, targets[, weights])`.
        validation: batches, or None.
        epochs: int. Epochs of this phase.
        make_optimizer: callable returning the phase's new optimizer.
        callbacks: extra Keras callbacks.
        early_stopping: int or None. Patience, in epochs; restores the best
            weights when it stops.
        initial_epoch: int. Epochs already run, so numbering continues.
        verbose: as for `fit`.
        peak_learning_rate: float. The phase's highest rate, for the record.
        backup: `backup.PhaseBackup`, optional. Saves every epoch; a phase
            saved before a restart resumes after its last saved epoch.

    Returns:
        `(PhaseRecord, keras.callbacks.History)`.
    """
    with model_scope(model):
        model.compile(optimizer=make_optimizer())
    trainable, frozen = count_params(model)
    record = PhaseRecord(name, initial_epoch, 0, trainable, frozen, peak_learning_rate)
    message = (f"Phase '{name}': {trainable:,} trainable and {frozen:,} frozen "
               f"parameters, peak learning rate {peak_learning_rate:g}, {epochs} epochs.")
    say(message, verbose)
    phase_callbacks = [DivergenceGuard(name), LearningRateLogger(), *callbacks]
    stopper = None
    if early_stopping:
        stopper = keras.callbacks.EarlyStopping(
            monitor="val_loss" if validation is not None else "loss",
            patience=int(early_stopping), restore_best_weights=True)
        phase_callbacks.append(stopper)
    start = initial_epoch
    if backup is not None:
        start = backup.restore(model, phase_callbacks, initial_epoch, epochs)
        if start > initial_epoch:
            say(f"Phase '{name}': resuming after epoch {start - initial_epoch} of {epochs} "
                "(weights, optimizer and schedule step from the backup).", verbose)
        phase_callbacks.append(backup)  # last: it saves the logs the others wrote
    # keras.distribution (JAX) is read while fitting; a tf.distribute model enters its own.
    with model_scope(model) if not backend.is_tensorflow() else contextlib.nullcontext():
        history = keras.Model.fit(
            model, train, validation_data=validation, epochs=initial_epoch + epochs,
            initial_epoch=start, callbacks=phase_callbacks, verbose=verbose,
            shuffle=False)  # the pipeline shuffles
    if backup is not None:
        history = backup.full_history(history)
    record.stopped_early = bool(stopper and stopper.stopped_epoch)
    return record, history


def say(message: str, verbose) -> None:
    """Logs `message`, and prints it when `verbose`."""
    logger.info(message)
    if verbose:
        print(message)


def warn(message: str, verbose) -> None:
    """Logs `message` as a warning, and prints it when `verbose`."""
    logger.warning(message)
    if verbose:
        print(f"Warning: {message}")


def scale_loss_for_replicas(loss):
    """Divides a summed loss by the replicas in sync, as Keras losses do.

    Gradients are summed over replicas; Keras's `train_step` scales the
    tracked loss back (`unscale_loss_for_distribution`).
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            return loss / float(replicas)
    return loss


@dataclasses.dataclass
class PhaseRecord:
    """What one training phase did."""

    name: str
    first_epoch: int
    epochs_run: int
    trainable_params: int
    frozen_params: int
    peak_learning_rate: float | None
    stopped_early: bool = False
    details: dict = dataclasses.field(default_factory=dict)


class TransferHistory(keras.callbacks.History):
    """The combined history of both phases.

    `history` maps each metric to one list running across both phases (as
    a Keras `History` does); `phases` says which epochs belong to which.
    """

    def __init__(self):
        super().__init__()
        self.history = {}
        self.epoch = []
        self.phases: list[PhaseRecord] = []

    def extend(self, phase: PhaseRecord, history: keras.callbacks.History) -> None:
        """Appends one phase's Keras history."""
        for key, values in history.history.items():
            previous = len(self.epoch)
            column = self.history.setdefault(key, [math.nan] * previous)
            column.extend(float(v) for v in values)
        self.epoch.extend(history.epoch)
        for column in self.history.values():  # keys missing in a phase
            column.extend([math.nan] * (len(self.epoch) - len(column)))
        phase.epochs_run = len(history.epoch)
        self.phases.append(phase)

    def phase_of_epoch(self) -> list[str]:
        """The phase name of every epoch, in order."""
        return [p.name for p in self.phases for _ in range(p.epochs_run)]
