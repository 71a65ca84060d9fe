"""Keras callbacks the phases add: divergence guard, learning rates, head logs, epoch seeds.

They are plain `keras.callbacks.Callback`s, added by `training.fit_phase`
before the user's own callbacks.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from keras_transfer.errors import TrainingDivergedError


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training when the loss becomes NaN or infinite, or explodes, and says where.

    The loss explodes when it exceeds `factor` times the first batch's loss
    of the phase (at least 1e-2), as a learning rate far too high makes it.
    The weights of the phase's start are put back before the error is
    raised, so a diverged run loses no earlier training.

    Args:
        phase: str. Name of the phase, for the message.
        factor: float. How many times the first loss counts as diverged
            (`HEAD_FACTOR` for a head on a frozen backbone: its loss is
            convex, and at a sound learning rate stays within a few times its
            first value; 100 times is a learning rate far too high).
    """

    FACTOR = 1e4
    HEAD_FACTOR = 1e2

    def __init__(self, phase: str, factor: float = FACTOR):
        super().__init__()
        self.phase = phase
        self.factor = factor
        self._epoch = 0
        self._saved = None
        self._first = None

    def on_train_begin(self, logs=None):
        self._saved = [np.array(w) for w in self.model.get_weights()]
        self._first = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        loss = float(loss)
        # The reference is the first loss above 0: a first batch of a head with
        # loss_weight=0 (several heads) gives 0, and would make any loss a divergence.
        if self._first is None and math.isfinite(loss) and loss > 0:
            self._first = max(loss, 1e-2)
        if math.isfinite(loss) and (self._first is None or loss <= self.factor * self._first):
            return
        self.model.stop_training = True
        self.model.set_weights(self._saved)
        what = (f"became {loss}" if not math.isfinite(loss) else
                f"exploded to {loss:.3g} ({loss / self._first:.2g} times its first value)")
        raise TrainingDivergedError(
            f"The loss {what} at step {batch + 1} of epoch {self._epoch + 1} in the "
            f"'{self.phase}' phase. The weights from the start of that phase were "
            "restored. Lower the learning rate, check the inputs for NaN or infinite "
            "values, and check the labels.")


class RestoreBest(keras.callbacks.Callback):
    """Puts back the weights with the lowest validation loss when training ends.

    The weights before the first epoch count too: their validation loss is
    measured when training begins, so a phase that makes things worse ends
    where it started.

    Args:
        validation: the validation batches, evaluated once before training.

    Attributes:
        best: float. The lowest validation loss seen.
        restored: str or None. What was put back (`"epoch N"` or `"the
            weights before this phase"`), None when the last epoch was best.
    """

    def __init__(self, validation):
        super().__init__()
        self.validation = validation
        self.best = math.inf
        self.restored = None
        self._weights = None
        self._label = None

    def on_train_begin(self, logs=None):
        results = self.model.evaluate_batches(self.validation, verbose=0, return_dict=True)
        self._keep(float(results["loss"]), "the weights before this phase")

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("val_loss")
        if loss is not None and float(loss) < self.best:
            self._keep(float(loss), f"epoch {epoch + 1}")
            self._last = True
        else:
            self._last = False

    def on_train_end(self, logs=None):
        if not getattr(self, "_last", True):
            self.model.set_weights(self._weights)
            self.restored = self._label

    def _keep(self, loss, label):
        self.best, self._label = loss, label
        self._weights = [np.array(w) for w in self.model.get_weights()]


class ShuffleEpoch(keras.callbacks.Callback):
    """Tells the training pipelines which epoch starts (see `data.EpochSeed`).

    Keras makes a new iterator over the training data after
    `on_epoch_begin`, so that pass is shuffled in epoch e's order.
    """

    def __init__(self, seed):
        super().__init__()
        self.seed = seed

    def on_epoch_begin(self, epoch, logs=None):
        self.seed.set_epoch(epoch)


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the optimizer's current learning rate to each epoch's logs."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            optimizer = self.model.optimizer
            if isinstance(optimizer, keras.optimizers.MultiOptimizer):  # per-layer rates:
                optimizer = optimizer.optimizers[0]  # the top rate (layer_groups.py)
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(
                optimizer.learning_rate))


class DropUnfedHeads(keras.callbacks.Callback):
    """Removes the metrics of heads that had no data from each epoch's logs.

    A head without training (or validation) data would otherwise show zeros.
    """

    def __init__(self, head_names, trained, validated):
        super().__init__()
        self.head_names = list(head_names)
        self.trained = set(trained)
        self.validated = set(validated)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for key in list(logs):
            owner = head_of_key(key, self.head_names)
            if owner is None:
                continue
            fed = self.validated if key.startswith("val_") else self.trained
            if owner not in fed:
                del logs[key]


def head_of_key(key: str, head_names) -> str | None:
    """The head a metric key belongs to: the longest head-name prefix."""
    key = key.removeprefix("val_")
    owners = [n for n in head_names if key.startswith(n + "_")]
    return max(owners, key=len) if owners else None
