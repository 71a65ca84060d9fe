"""The training recipe: what `TransferModel.fit` runs.

`fit` turns the user's data into a `FitData` (every phase's batches, built
once, through `routing`), picks the phases (`phases.resolve_phases`) and
runs them with `run_phases`: the backup says which phases a restarted run
skips, the memory estimate warns before a phase too large for the machine,
each phase's `run` trains (a head phase on the feature cache,
`FitData.feature_caches`), and a warning comes when training ended at
chance. ARCHITECTURE.md draws the data's path.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np

from keras_transfer import routing
from keras_transfer.backup import RunBackup
from keras_transfer.cache_key import _config_digest, fit_data_fingerprints
from keras_transfer.callbacks import DropUnfedHeads, ShuffleEpoch
from keras_transfer.contracts import CheckingPhase, Phase
from keras_transfer.data import EpochSeed, labels_for_head
from keras_transfer.distribute import (
    batch_message,
    is_chief,
    is_multi_worker,
    is_tpu,
    needs_full_batches,
    strategy_of,
)
from keras_transfer.feature_cache import extract_features
from keras_transfer.fine_tune_policy import remember_record
from keras_transfer.image_data import shift_augmentation
from keras_transfer.memory import warn_if_too_large
from keras_transfer.phases import resolve_phases
from keras_transfer.training import TransferHistory, say, warn

logger = logging.getLogger("keras_transfer")


def fit(model, x=None, y=None, *, validation_data=None, phases=None, head_epochs=None,
        fine_tune_epochs=None, epochs=None, batch_size=32, augmentation=None, callbacks=None,
        class_weight=None, shuffle=True, seed=None, backup_dir=None,
        verbose="auto") -> TransferHistory:
    """Trains `model` in phases; the arguments are those of `TransferModel.fit`.

    Returns:
        A `TransferHistory` covering every phase.
    """
    phases = resolve_phases(phases, head_epochs, fine_tune_epochs, epochs,
                            pretrained=model.backbone.pretrained, verbose=verbose)
    train = routing.head_data(model, x, y)
    validation = None
    if validation_data is not None:
        validation = routing.head_data(model, *_split_xy(validation_data),
                                       arg="validation_data")
    data = FitData(model=model, train=train, validation=validation,
                   batch_size=batch_size, augmentation=augmentation,
                   class_weight=class_weight, shuffle=shuffle, seed=seed,
                   backup_dir=backup_dir)
    try:
        return run_phases(model, data, phases, callbacks or [], verbose)
    finally:
        data.close()


def _split_xy(data):
    if isinstance(data, tuple) and len(data) == 2:
        return data
    return data, None


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
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or self.batch_size < 1:
            raise ValueError(f"Received batch_size={self.batch_size!r}; expected a positive int.")
        # `{head: weight of each class}`, checked before anything is written.
        self.class_weights = routing.class_weight_tables(self.model, self.class_weight)
        self.strategy = strategy_of(self.model)
        self.multi_worker = is_multi_worker(self.strategy)
        self.drop_remainder = needs_full_batches(self.strategy)
        self.backup = None if self.backup_dir is None else RunBackup(
            self.backup_dir, writer=is_chief(self.strategy))
        self.seed = self._choose_seed(self.seed)
        self.shuffle_seed = EpochSeed(self.seed)
        self.phase_backup = None
        self._temporary = []
        self._batches = {}  # {shift: (batches, steps)}
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
        import tensorflow as tf  # lazy: several workers are a TensorFlow strategy

        # Every worker runs the whole pipeline and keeps its part of each
        # global batch; AUTO would try to shard by file (the cache's shards).
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = \
            tf.data.experimental.AutoShardPolicy.DATA
        return dataset.with_options(options)

    def batches(self, shift: float = 0.0):
        """`(training batches, steps per epoch)`, shuffled and augmented.

        Args:
            shift: float. A phase's random translations by up to this share
                of the images (`FineTunePhase.shift`); `fit`'s augmentation,
                when given, is used instead.
        """
        if self.augmentation is not None:
            shift = 0.0  # fit's augmentation wins: the same batches as without a shift
        if shift not in self._batches:
            model = self.model
            augmentation = self.augmentation
            if shift:
                augmentation = shift_augmentation(shift, self.seed)
            datasets = {n: routing.head_dataset(
                model, n, x, y, batch_size=self.batch_size, training=self.shuffle,
                augmentation=augmentation, seed=self.shuffle_seed,
                drop_remainder=self.drop_remainder) for n, (x, y) in self.train.items()}
            dataset, steps = routing.join(model, datasets, training=True,
                                          seed=self.shuffle_seed,
                                          class_weight=self.class_weight)
            self._batches[shift] = self._distributable(dataset), steps
        return self._batches[shift]

    def validation_batches(self):
        """Validation batches, or None."""
        if self.validation is not None and self._validation is None:
            model = self.model
            full = is_tpu(self.strategy)  # one batch shape on a TPU
            datasets = {n: routing.head_dataset(model, n, x, y, batch_size=self.batch_size,
                                                drop_remainder=full)
                        for n, (x, y) in self.validation.items()}
            self._validation = self._distributable(routing.join(model, datasets)[0])
        return self._validation

    def feature_caches(self, phase, verbose) -> dict:
        """`{"train": {head: FeatureCache}, "validation": {...}}`: features extracted once.

        Under a strategy each replica extracts a share of every batch. Only
        the chief writes to the cache folder; other workers of a multi-worker
        run write their copy to a temporary folder removed by `close`.
        """
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
        train, _ = routing.join(model, train, training=True, seed=self.shuffle_seed,
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
            validation = self._distributable(routing.join(model, validation)[0])
        return self._distributable(train), validation

    def example_weights(self, head: str, labels):
        """Per-example weights from `class_weight` for one head's labels, or None."""
        tables = self.class_weights
        return None if head not in tables else tables[head][np.asarray(labels, np.int64)]

    def settings(self, phases) -> dict:
        """What a backup must match to resume this run (see `backup.RunBackup`)."""
        return {"data": fit_data_fingerprints(self.model, self.train, self.validation),
                "phases": [repr(p) for p in phases], "batch_size": self.batch_size,
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
def run_phases(model, data: FitData, phases: Sequence[Phase], callbacks=(),
               verbose="auto") -> TransferHistory:
    """Runs `phases` in order on `model`; returns the combined history.

    With a backup (`data.backup`), phases a previous run finished are not run
    again (their weights, records and history come back), the phase in
    progress resumes after its last saved epoch, and each epoch and phase
    is saved as it ends (see `keras_transfer.backup`).
    """
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
        if isinstance(phase, CheckingPhase):
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
            remember_record(model, record)  # what a default fine-tune decides from
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


def warn_at_chance(model, data: FitData, history: TransferHistory, verbose) -> list[str]:
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


