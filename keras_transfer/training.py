"""The two training phases, learning-rate schedules and callbacks.

Phase 1 trains the head on a frozen backbone. Phase 2 unfreezes the backbone
(all of it, its top N layers, or from a named layer on) and fine-tunes with a
small learning rate that warms up and then decays, so the pretrained features
are nudged rather than overwritten (catastrophic forgetting).

`compile()` fixes which weights train, so every change of `trainable` is
followed by a recompile. BatchNormalization layers stay frozen while
fine-tuning: a frozen Keras 3 BatchNormalization runs in inference mode even
when `fit` passes `training=True` down (keras#20285), so its moving
statistics are kept.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import keras
import numpy as np

from keras_transfer.errors import TrainingDivergedError

logger = logging.getLogger("keras_transfer")


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


def freeze(backbone: keras.Model) -> None:
    """Freezes every weight of the backbone."""
    backbone.trainable = False


def unfreeze(backbone: keras.Model, layers="all", train_batchnorm: bool = False) -> int:
    """Makes the top of the backbone trainable.

    Args:
        backbone: keras.Model. The pretrained network.
        layers: `"all"`, an int N (the top N layers that have weights), or a
            layer name (that layer and every layer after it).
        train_batchnorm: bool. Also train BatchNormalization layers (and let
            them update their moving statistics). Off by default.

    Returns:
        The number of layers with weights that are now trainable.
    """
    weighted = [layer for layer in leaf_layers(backbone) if layer.weights]
    if layers == "all" or layers is None:
        start = 0
    elif isinstance(layers, bool):
        raise ValueError(f"Received unfreeze={layers!r}; expected 'all', an int or a layer name.")
    elif isinstance(layers, int):
        if layers < 1:
            raise ValueError(f"Received unfreeze={layers}; expected a positive number of layers.")
        start = max(len(weighted) - layers, 0)
    elif isinstance(layers, str):
        names = [layer.name for layer in leaf_layers(backbone)]
        if layers not in names:
            import difflib

            close = difflib.get_close_matches(layers, names, n=3)
            raise ValueError(
                f"Received unfreeze={layers!r}, which is not a layer of "
                f"'{backbone.name}'. Closest names: {close}. "
                "model.backbone.summary() lists them all."
            )
        cut = names.index(layers)
        start = sum(1 for layer in leaf_layers(backbone)[:cut] if layer.weights)
    else:
        raise ValueError(f"Received unfreeze={layers!r}; expected 'all', an int or a layer name.")

    backbone.trainable = True
    count = 0
    for index, layer in enumerate(weighted):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = index >= start and (train_batchnorm or not is_bn)
        count += layer.trainable
    return count


class NaNGuard(keras.callbacks.Callback):
    """Stops training at the first non-finite loss and says where.

    The weights of the phase's start are put back before the error is
    raised, so a diverged run loses no earlier training.

    Args:
        phase: str. Name of the phase, for the message.
    """

    def __init__(self, phase: str):
        super().__init__()
        self.phase = phase
        self._epoch = 0
        self._saved = None

    def on_train_begin(self, logs=None):
        self._saved = [np.array(w) for w in self.model.get_weights()]

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.model.stop_training = True
            self.model.set_weights(self._saved)
            raise TrainingDivergedError(
                f"The loss became {float(loss)} at step {batch + 1} of epoch "
                f"{self._epoch + 1} in the '{self.phase}' phase. The weights "
                "from the start of that phase were restored. Lower the "
                "learning rate, check the inputs for NaN or infinite values, "
                "and check the labels."
            )


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the optimizer's current learning rate to each epoch's logs."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            optimizer = self.model.optimizer
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(
                optimizer.learning_rate))


@dataclasses.dataclass
class PhaseRecord:
    """What one training phase did."""

    name: str
    first_epoch: int
    epochs_run: int
    trainable_params: int
    frozen_params: int
    peak_learning_rate: float
    stopped_early: bool = False


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


def run_phase(model, name, train, validation, epochs, optimizer, loss, metrics,
              callbacks=(), early_stopping=None, initial_epoch=0, verbose="auto",
              peak_learning_rate=None):
    """Compiles `model` in its strategy's scope and fits one phase.

    Args:
        model: keras.Model with its `trainable` flags already set.
        name: str. Phase name for logs (`"head"` or `"fine_tune"`).
        train: tf.data.Dataset of `(inputs, targets)` batches.
        validation: tf.data.Dataset or None.
        epochs: int. Epochs of this phase.
        optimizer: keras.optimizers.Optimizer (fresh for each phase).
        loss, metrics: as for `compile`.
        callbacks: extra Keras callbacks.
        early_stopping: int or None. Patience, in epochs; restores the best
            weights when it stops.
        initial_epoch: int. Epochs already run, so numbering continues.
        verbose: as for `fit`.
        peak_learning_rate: float. The phase's highest rate, for the record.

    Returns:
        `(PhaseRecord, keras.callbacks.History)`.
    """
    with model.distribute_strategy.scope():
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics)
    trainable, frozen = count_params(model)
    peak = peak_learning_rate
    if peak is None:
        peak = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    record = PhaseRecord(name, initial_epoch, 0, trainable, frozen, peak)
    message = (f"Phase '{name}': {trainable:,} trainable and {frozen:,} frozen "
               f"parameters, peak learning rate {peak:g}, {epochs} epochs.")
    logger.info(message)
    if verbose:
        print(message)
    phase_callbacks = [NaNGuard(name), LearningRateLogger(), *callbacks]
    stopper = None
    if early_stopping:
        stopper = keras.callbacks.EarlyStopping(
            monitor="val_loss" if validation is not None else "loss",
            patience=int(early_stopping), restore_best_weights=True)
        phase_callbacks.append(stopper)
    history = keras.Model.fit(
        model, train, validation_data=validation, epochs=initial_epoch + epochs,
        initial_epoch=initial_epoch, callbacks=phase_callbacks, verbose=verbose,
        shuffle=False)  # the pipeline shuffles
    record.stopped_early = bool(stopper and stopper.stopped_epoch)
    return record, history


def check_phase_arguments(head_epochs, fine_tune_epochs, epochs=None,
                          warmup_fraction=0.1) -> tuple[int, int]:
    """Validates the epochs of both phases; `epochs` is the Keras-style alias.

    Returns:
        `(head_epochs, fine_tune_epochs)`.
    """
    if epochs is not None:
        head_epochs, fine_tune_epochs = epochs, 0
    for name, value in (("head_epochs", head_epochs), ("fine_tune_epochs", fine_tune_epochs)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"Received {name}={value!r}; expected an int >= 0.")
    if head_epochs + fine_tune_epochs == 0:
        raise ValueError("Received head_epochs=0 and fine_tune_epochs=0: nothing to train.")
    if not 0.0 <= warmup_fraction <= 1.0:
        raise ValueError(f"Received warmup_fraction={warmup_fraction}; expected [0, 1].")
    return head_epochs, fine_tune_epochs


def train_two_phases(model, train, validation, *, steps, head_epochs, fine_tune_epochs,
                     head_learning_rate, fine_tune_learning_rate, warmup_fraction, decay,
                     loss, make_metrics, prepare_fine_tuning, callbacks=(),
                     early_stopping=None, verbose="auto", train_head=None) -> TransferHistory:
    """Trains the head on the frozen backbone, then fine-tunes.

    Args:
        model: a model with `backbone` and `train_batchnorm` attributes.
        train, validation: batched `tf.data.Dataset`s (validation may be None).
        steps: int. Batches per epoch, for the schedule.
        head_epochs, fine_tune_epochs: int. Epochs of each phase.
        head_learning_rate: float. Adam rate of phase 1.
        fine_tune_learning_rate: float. Peak rate of phase 2.
        warmup_fraction: float. Share of phase 2 spent warming up.
        decay: str. `"cosine"` or `"linear"`.
        loss: the loss (or dict of losses) to compile with.
        make_metrics: callable returning fresh metrics for one phase.
        prepare_fine_tuning: callable that makes phase 2's weights trainable.
        callbacks: Keras callbacks for both phases.
        early_stopping: int, optional. Patience in epochs.
        verbose: as for `fit`.
        train_head: callable, optional. Runs phase 1 in another way (e.g.
            `features.train_head_on_features` on cached features) and
            returns `(PhaseRecord, keras History)`.

    Returns:
        The combined `TransferHistory`.
    """
    history = TransferHistory()
    # Optimizers and metrics own variables: create them in the strategy scope.
    with model.distribute_strategy.scope():
        if head_epochs:
            freeze(model.backbone)
            model.train_batchnorm = False
            if train_head is not None:
                record, phase_history = train_head()
            else:
                record, phase_history = run_phase(
                    model, "head", train, validation, head_epochs,
                    keras.optimizers.Adam(head_learning_rate), loss, make_metrics(),
                    callbacks, early_stopping, initial_epoch=0, verbose=verbose,
                    peak_learning_rate=head_learning_rate)
            history.extend(record, phase_history)
        if fine_tune_epochs:
            prepare_fine_tuning()
            total = steps * fine_tune_epochs
            schedule = WarmupDecay(fine_tune_learning_rate, total_steps=total,
                                   warmup_steps=int(round(warmup_fraction * total)),
                                   decay=decay)
            record, phase_history = run_phase(
                model, "fine_tune", train, validation, fine_tune_epochs,
                keras.optimizers.Adam(schedule), loss, make_metrics(), callbacks,
                early_stopping, initial_epoch=len(history.epoch), verbose=verbose,
                peak_learning_rate=fine_tune_learning_rate)
            history.extend(record, phase_history)
    return history


def steps_per_epoch(dataset) -> int:
    """Batches in one pass of a finite dataset (counted if unknown)."""
    import tensorflow as tf

    n = int(dataset.cardinality())
    if n == tf.data.INFINITE_CARDINALITY:
        raise ValueError("Received an infinite dataset; repeat() is not needed, "
                         "each epoch is one pass over the data.")
    if n < 0:
        n = sum(1 for _ in dataset)
    return n
