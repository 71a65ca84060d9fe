"""The fine-tune phases' optimizer: its learning-rate schedule, weight decay, accumulation.

`FineTunePhase(decay="cosine" | "linear")` warms up linearly from 0 and
decays (`training.WarmupDecay`); `decay="one_cycle"` is fastai's one-cycle
policy (Smith 2018) on Keras's own `CosineDecay`: it starts at a 25th of the
peak, rises linearly to the peak over the warmup share (fastai rises along a
cosine; Keras's warmup is linear), then follows a cosine down to
peak / (25 * 1e5), fastai's `div` and `div_final`.

`adam_for` builds a phase's Adam (AdamW with `weight_decay`, biases and
normalisation weights excluded as is usual since BERT; Keras's own
`gradient_accumulation_steps`).

Example:

```python
schedule = one_cycle(1e-3, total_steps=200, warmup_steps=50)
model.fit(x, y, phases=[kt.FineTunePhase(decay="one_cycle", warmup=0.25)])
```
"""

from __future__ import annotations

import math

import keras

from keras_transfer.training import WarmupDecay

# Variables that weight decay leaves alone: biases, normalisation scales and offsets
# (Keras's exclude_from_weight_decay matches these in variable names).
NO_DECAY = ["bias", "gamma", "beta"]

DECAYS = ("cosine", "linear", "one_cycle")
# fastai's fit_one_cycle: div=25 (start), div_final=1e5 (end, below the start).
ONE_CYCLE_DIV = 25.0
ONE_CYCLE_DIV_FINAL = 1e5


def one_cycle(peak: float, total_steps: int, warmup_steps: int
              ) -> keras.optimizers.schedules.CosineDecay:
    """fastai's one-cycle schedule as a Keras `CosineDecay` with warmup.

    Args:
        peak: float. The highest rate, reached after `warmup_steps`.
        total_steps: int. Steps of the whole cycle.
        warmup_steps: int. Steps rising from peak / 25 to the peak.

    Returns:
        A `keras.optimizers.schedules.CosineDecay`.

    Example:
        >>> schedule = one_cycle(1e-3, total_steps=100, warmup_steps=25)
        >>> [f"{float(schedule(s)):.1e}" for s in (0, 25, 100)]
        ['4.0e-05', '1.0e-03', '4.0e-10']
    """
    start = peak / ONE_CYCLE_DIV
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=start, decay_steps=max(total_steps - warmup_steps, 1),
        alpha=1.0 / (ONE_CYCLE_DIV * ONE_CYCLE_DIV_FINAL), warmup_target=peak,
        warmup_steps=warmup_steps)


def phase_schedule(peak: float, total_steps: int, warmup_steps: int, decay: str):
    """The schedule of a fine-tune phase: `WarmupDecay`, or `one_cycle` for "one_cycle"."""
    if decay == "one_cycle":
        return one_cycle(peak, total_steps, warmup_steps)
    return WarmupDecay(peak, total_steps=total_steps, warmup_steps=warmup_steps, decay=decay)


def adam_for(phase, total_steps: int):
    """`rate -> optimizer` for a fine-tune phase of `total_steps` steps.

    Adam, or AdamW with `phase.weight_decay` (not on `NO_DECAY` variables),
    with `phase.gradient_accumulation_steps`, on `phase_schedule`.
    """
    warmup = int(round(phase.warmup * total_steps))

    def make(rate):
        schedule = phase_schedule(rate, total_steps, warmup, phase.decay)
        accumulate = phase.gradient_accumulation_steps
        if phase.weight_decay:
            optimizer = keras.optimizers.AdamW(schedule, weight_decay=phase.weight_decay,
                                               gradient_accumulation_steps=accumulate)
            optimizer.exclude_from_weight_decay(var_names=NO_DECAY)
            return optimizer
        return keras.optimizers.Adam(schedule, gradient_accumulation_steps=accumulate)

    return make


def check_optimizer_options(weight_decay, gradient_accumulation_steps) -> None:
    """Refuses a negative weight decay or fewer than 2 accumulation steps."""
    if weight_decay is not None and (isinstance(weight_decay, bool) or not isinstance(
            weight_decay, (int, float)) or not math.isfinite(weight_decay) or weight_decay < 0):
        raise ValueError(f"Received weight_decay={weight_decay!r}; expected a number >= 0, "
                         "e.g. 0.01.")
    steps = gradient_accumulation_steps
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or steps < 2):
        raise ValueError(f"Received gradient_accumulation_steps={steps!r}; expected an int "
                         ">= 2 (None: one update per batch).")
