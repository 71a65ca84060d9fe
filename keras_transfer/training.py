"""One training phase's mechanics, shared by every phase.

`fit_phase` compiles a model with a fresh optimizer in its strategy's scope
and fits one phase (with backups and early stopping); `PhaseRecord` and
`TransferHistory` record what the phases did. Also here: the
warmup-and-decay learning-rate schedule and unfreezing the top of a network.
The loop over the phases and the data they share are in `trainer.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import math

import keras
import numpy as np

from keras_transfer import backend
from keras_transfer.callbacks import DivergenceGuard, LearningRateLogger
from keras_transfer.distribute import model_scope

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


def prepare_backbone(model, unfreeze="all", train_batchnorm: bool = False,
                     lora_rank: int | None = None, lora_targets=None) -> None:
    """A training phase's change to `model`'s backbone: LoRA adapters, or unfrozen layers.

    Made in the model's strategy scope: LoRA adapters are new variables.

    Args:
        model: the `TransferModel`.
        unfreeze, train_batchnorm: as for `unfreeze` (without `lora_rank`).
        lora_rank: int, optional. Train rank-`lora_rank` adapters instead.
        lora_targets: list of str, optional. Layer names for the adapters.
    """
    with model_scope(model):
        if lora_rank:
            count = model.backbone.enable_lora(lora_rank, lora_targets)
            logger.info("LoRA rank %d: %d adapter parameters train.", lora_rank, count)
        else:
            model.backbone.unfreeze(unfreeze, train_batchnorm)


def architecture_config(network: keras.Model) -> dict:
    """The serialized network without any layer's `trainable` flag.

    A config describes the architecture and the weights' origin, not the
    training state: `unfreeze` (a fine-tune) changes the flags, and a model
    rebuilt from its config starts frozen, as a freshly built one does,
    for every backbone kind (a phase unfreezes it again).
    """
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "trainable"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(keras.saving.serialize_keras_object(network))


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


def fit_phase(model, name, train, validation, epochs, make_optimizer, callbacks=(),
              early_stopping=None, initial_epoch=0, verbose="auto", peak_learning_rate=None,
              backup=None, divergence_factor=DivergenceGuard.FACTOR):
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
        divergence_factor: float. The loss that many times its first value
            stops the phase (`DivergenceGuard`).

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
    phase_callbacks = [DivergenceGuard(name, divergence_factor), LearningRateLogger(),
                       *callbacks]
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
        history = model.fit_batches(
            train, validation_data=validation, epochs=initial_epoch + epochs,
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
        import tensorflow as tf  # lazy: TensorFlow only on its own backend

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
