"""The fine-tune phases' learning-rate schedules: warmup then decay, and one-cycle.

`FineTunePhase(decay="cosine" | "linear")` warms up linearly from 0 and
decays (`training.WarmupDecay`); `decay="one_cycle"` is fastai's one-cycle
policy (Smith 2018) on Keras's own `CosineDecay`: it starts at a 25th of the
peak, rises linearly to the peak over the warmup share (fastai rises along a
cosine; Keras's warmup is linear), then follows a cosine down to
peak / (25 * 1e5), fastai's `div` and `div_final`.

Example:

```python
schedule = one_cycle(1e-3, total_steps=200, warmup_steps=50)
model.fit(x, y, phases=[kt.FineTunePhase(decay="one_cycle", warmup=0.25)])
```
"""

from __future__ import annotations

import keras

from keras_transfer.training import WarmupDecay

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
