"""The learning-rate finder: a short run with an exponentially rising rate.

Smith (2017, "Cyclical learning rates") and fastai's `lr_find`: train for a
hundred batches while the rate rises from tiny to large, one batch per rate;
the loss first stays flat (too small to move anything), then falls, then
explodes. The rate where the smoothed loss falls fastest is a good peak rate
for training; the run stops once the loss has blown up. Afterwards the
model is exactly as before: every variable (weights, BatchNormalization
statistics, random-seed states) is put back bit for bit, the trainable
flags are restored, and the model's own optimizer is never used (it is
recompiled in, its state untouched).

Example:

```python
model.fit(x, y, phases=[kt.HeadPhase()])
found = model.find_learning_rate(x, y, unfreeze="all")
found.suggestion                      # e.g. 2.1e-4
found.plot("lr_find.png")
model.fit(x, y, phases=[kt.FineTunePhase(learning_rate=found.suggestion)])
```
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from keras_transfer.distribute import model_scope
from keras_transfer.errors import KerasTransferError
from keras_transfer.training import leaf_layers, say


class FinderError(KerasTransferError, ValueError):
    """The learning-rate finder was asked something it cannot do."""


@dataclasses.dataclass
class LearningRateFinding:
    """The finder's result.

    Attributes:
        rates: the rate of each batch run, rising.
        losses: each batch's training loss.
        smoothed: the losses smoothed (bias-corrected exponential average).
        suggestion: float. The rate where the smoothed loss falls fastest
            (per decade of rate), before its minimum.
        minimum_rate: float. The rate of the lowest smoothed loss; a tenth
            of it is fastai's older rule of thumb.
    """

    rates: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    suggestion: float
    minimum_rate: float

    def plot(self, path: str | None = None, ax=None):
        """Plots the smoothed loss against the rate (log scale), the suggestion marked.

        Args:
            path: str, optional. Save the figure there.
            ax: a matplotlib Axes to draw on, optional.

        Returns:
            The matplotlib Axes.
        """
        import matplotlib  # lazy: optional (plots)

        if ax is None:
            if path is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt  # lazy: optional (plots)

            _, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.rates, self.losses, alpha=0.3, label="loss")
        ax.plot(self.rates, self.smoothed, label="smoothed")
        ax.axvline(self.suggestion, color="red", linestyle="--",
                   label=f"suggestion {self.suggestion:.2g}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        ax.legend()
        if path is not None:
            ax.figure.savefig(path, bbox_inches="tight")
        return ax


def find_learning_rate(model, x, y=None, *, start: float = 1e-7, end: float = 1.0,
                       steps: int = 100, batch_size: int = 32, unfreeze=None,
                       smoothing: float = 0.9, stop_factor: float = 4.0, seed: int = 0,
                       plot: str | None = None, verbose: bool = False) -> LearningRateFinding:
    """Runs the finder on `model` and puts everything back.

    Args:
        model: a `TransferModel`.
        x, y: training data, as for `fit`.
        start, end: float. The first and the last rate; rate i is
            `start * (end / start) ** (i / (steps - 1))`.
        steps: int. Batches (one rate each); the data repeats as needed.
        batch_size: int.
        unfreeze: optional. None: train what is trainable now (after the
            head phase: the heads). `"all"`, an int or a layer name: unfreeze
            the backbone as `FineTunePhase(unfreeze=...)` would, for the
            run only.
        smoothing: float in [0, 1). The exponential average's factor.
        stop_factor: float. Stop when the smoothed loss exceeds this many
            times its minimum (or is not finite).
        seed: int. Shuffle seed.
        plot: str, optional. Save the plot there.
        verbose: print the suggestion.

    Returns:
        A `LearningRateFinding`.

    Raises:
        FinderError: bad settings, or nothing to train, before anything runs.
    """
    _check(start, end, steps, smoothing, stop_factor)
    flags = [(layer, layer.trainable) for layer in [model, *_all_layers(model)]]
    optimizer = model.optimizer if getattr(model, "compiled", False) else None
    saved = [np.array(keras.ops.convert_to_numpy(v)) for v in model.variables]
    saved_optimizer = None if optimizer is None else [
        np.array(keras.ops.convert_to_numpy(v)) for v in optimizer.variables]
    try:
        if unfreeze is not None:
            with model_scope(model):
                model.backbone.unfreeze(unfreeze)
        if not model.trainable_weights:
            raise FinderError(
                "Received a model with nothing to train: every weight is frozen. Pass "
                "unfreeze='all' (or an int or a layer name) to find the fine-tuning rate "
                "of the backbone, or build the model's heads first.")
        dataset, _ = model.make_dataset(x, y, batch_size=batch_size, training=True, seed=seed)
        schedule = keras.optimizers.schedules.ExponentialDecay(
            start, decay_steps=max(steps - 1, 1), decay_rate=end / start)
        with model_scope(model):
            model.compile(optimizer=keras.optimizers.Adam(schedule))
        rates, losses = _run(model, dataset, schedule, steps, smoothing, stop_factor)
    finally:
        for layer, trainable in flags:
            layer.trainable = trainable
        for variable, value in zip(model.variables, saved):
            variable.assign(value)
        if optimizer is not None:
            with model_scope(model):
                model.compile(optimizer=optimizer)
            for variable, value in zip(optimizer.variables, saved_optimizer):
                variable.assign(value)
    found = summarise(np.array(rates), np.array(losses), smoothing)
    say(f"Learning-rate finder: {len(rates)} batches from {start:g} to {rates[-1]:.3g}; "
        f"suggested rate {found.suggestion:.3g} (steepest fall of the smoothed loss), "
        f"minimum at {found.minimum_rate:.3g}.", verbose)
    if plot is not None:
        found.plot(plot)
    return found


def _all_layers(model) -> list:
    layers = []
    for layer in model.layers:
        layers.append(layer)
        if hasattr(layer, "network"):  # a backbone component
            layers.extend([layer.network, *leaf_layers(layer.network)])
        elif isinstance(layer, keras.Model):
            layers.extend(leaf_layers(layer))
    return layers


def _batches(dataset):
    """The dataset's batches, over and over (tf.data or a `keras.utils.PyDataset`)."""
    while True:
        if isinstance(dataset, keras.utils.PyDataset):
            for index in range(len(dataset)):
                yield dataset[index]
            dataset.on_epoch_end()
        else:
            yield from dataset


def _run(model, dataset, schedule, steps, smoothing, stop_factor):
    rates, losses = [], []
    average, best = 0.0, math.inf
    for step, batch in zip(range(steps), _batches(dataset)):
        x, y, weights = (tuple(batch) + (None,))[:3]
        rate = float(keras.ops.convert_to_numpy(schedule(step)))
        logs = model.train_on_batch(x, y, sample_weight=weights, return_dict=True)
        loss = float(logs["loss"])
        rates.append(rate)
        losses.append(loss)
        average = smoothing * average + (1 - smoothing) * loss
        smoothed = average / (1 - smoothing ** (step + 1))
        if not math.isfinite(smoothed) or smoothed > stop_factor * best:
            break
        best = min(best, smoothed)
    return rates, losses


def summarise(rates: np.ndarray, losses: np.ndarray, smoothing: float = 0.9
              ) -> LearningRateFinding:
    """The smoothed curve and the suggested rate, from each batch's rate and loss.

    Args:
        rates, losses: one per batch, rates rising.
        smoothing: the exponential average's factor.

    Returns:
        A `LearningRateFinding`.

    Example:
        >>> rates = np.logspace(-6, 0, 61)
        >>> losses = 2 / (1 + (rates / 1e-3) ** 2) + (rates > 0.1) * 50 * rates
        >>> f"{summarise(rates, losses, smoothing=0).suggestion:.0e}"
        '1e-03'
    """
    finite = np.where(np.isfinite(losses), losses, np.inf)
    smoothed = np.empty(len(losses))
    average = 0.0
    for i, loss in enumerate(finite):
        average = smoothing * average + (1 - smoothing) * min(loss, 1e30)
        smoothed[i] = average / (1 - smoothing ** (i + 1))
    lowest = int(np.argmin(smoothed))
    if lowest < 2:
        suggestion = float(rates[lowest])
    else:
        # The fall per decade of rate, up to the minimum.
        slope = np.gradient(smoothed[:lowest + 1], np.log10(rates[:lowest + 1]))
        suggestion = float(rates[int(np.argmin(slope))])
    return LearningRateFinding(rates, losses, smoothed, suggestion, float(rates[lowest]))


def _check(start, end, steps, smoothing, stop_factor):
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value <= 0:
            raise FinderError(f"Received {name}={value!r}; expected a positive rate.")
    if start >= end:
        raise FinderError(f"Received start={start!r}, end={end!r}; the rate rises: expected "
                          "start < end, e.g. start=1e-7, end=1.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 5:
        raise FinderError(f"Received steps={steps!r}; expected an int >= 5 (e.g. 100).")
    if not 0 <= smoothing < 1:
        raise FinderError(f"Received smoothing={smoothing!r}; expected a number in [0, 1).")
    if not stop_factor > 1:
        raise FinderError(f"Received stop_factor={stop_factor!r}; expected a number > 1.")

