"""Gradual unfreezing (ULMFiT, Howard & Ruder 2018): the backbone thawed from the top.

`GradualUnfreezePhase` is a phase like `FineTunePhase` (and an example of
writing one: a frozen dataclass with `name`, `prepare(model)` and
`run(model, data, callbacks, initial_epoch, verbose)` returning
`(PhaseRecord, keras History)`). It runs a `FineTunePhase` per stage, stage
s training the top s/N of the backbone's blocks (`kt.layer_groups`) with the
heads, each stage with a fresh optimizer and schedule; the stages' histories
join into one, and the record lists each stage's blocks and trainable
parameters.

Example:

```python
model.fit(x, y, phases=[
    kt.HeadPhase(),
    kt.GradualUnfreezePhase(stages=3, epochs_per_stage=2, learning_rate=1e-4),
])
```
"""

from __future__ import annotations

import dataclasses

import keras

from keras_transfer.layer_groups import layer_groups
from keras_transfer.phases import FineTunePhase
from keras_transfer.training import PhaseRecord, count_params, say


@dataclasses.dataclass(frozen=True)
class GradualUnfreezePhase:
    """Unfreeze the backbone's blocks from the top, a few more at each stage.

    Args:
        stages: int. Stages; stage s (1..N) trains the top `ceil(s * G / N)`
            of the G blocks, the last stage all of them.
        epochs_per_stage: int. Epochs of each stage.
        learning_rate, layer_decay, decay, warmup, train_batchnorm: as for
            `FineTunePhase`, for every stage (default rate 1e-4).
        name: str. The phase's name in logs and the history.

    Example:
        >>> kt.GradualUnfreezePhase(stages=3, epochs_per_stage=1)
        GradualUnfreezePhase(stages=3, epochs_per_stage=1, learning_rate=0.0001, ...)
    """

    stages: int = 3
    epochs_per_stage: int = 1
    learning_rate: float | tuple = 1e-4
    layer_decay: float | None = None
    decay: str = "cosine"
    warmup: float = 0.1
    train_batchnorm: bool = False
    name: str = "gradual_unfreeze"
    trains_backbone = True  # (contracts.Phase) not a field: not in the repr a backup compares
    # What the memory estimate reads of a fine-tune phase: the last stage's.
    unfreeze = "all"
    lora_rank = None

    def __post_init__(self):
        for key in ("stages", "epochs_per_stage"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Received {key}={value!r}; expected an int >= 1.")
        self.stage_phase(1, "block")  # checks the rates, decay and warmup as FineTunePhase does

    def stage_phase(self, stage: int, first_layer: str):
        """The `FineTunePhase` of one stage: unfrozen from `first_layer` on."""
        return FineTunePhase(
            epochs=self.epochs_per_stage, learning_rate=self.learning_rate,
            layer_decay=self.layer_decay, decay=self.decay, warmup=self.warmup,
            train_batchnorm=self.train_batchnorm, unfreeze=first_layer, policy="always",
            name=f"{self.name}_{stage}")

    def plan(self, model) -> list[tuple[int, str]]:
        """`[(blocks trained, first layer unfrozen)]`, one per stage."""
        groups = layer_groups(model.backbone.network)
        counts = sorted({-(-s * len(groups) // self.stages) for s in range(1, self.stages + 1)})
        return [(count, groups[-count].layers[0].name) for count in counts]

    def prepare(self, model) -> None:
        """The model as the last stage leaves it (a restart resumes after the phase)."""
        model.backbone.unfreeze("all", self.train_batchnorm)

    def run(self, model, data, callbacks, initial_epoch, verbose):
        """Runs the stages; returns `(PhaseRecord, one keras History for all of them)`."""
        combined = keras.callbacks.History()
        combined.history, combined.epoch = {}, []
        stages, epoch = [], initial_epoch
        for index, (count, first) in enumerate(self.plan(model), 1):
            say(f"Phase '{self.name}': stage {index}, the top {count} blocks from "
                f"'{first}' on.", verbose)
            record, history = self.stage_phase(index, first).run(
                model, data, callbacks, epoch, verbose)
            for key, values in history.history.items():
                combined.history.setdefault(key, []).extend(values)
            combined.epoch.extend(history.epoch)
            epoch += len(history.epoch)
            stages.append({"blocks": count, "from_layer": first,
                           "trainable_params": record.trainable_params,
                           "epochs": len(history.epoch)})
        trainable, frozen = count_params(model)
        return PhaseRecord(self.name, initial_epoch, 0, trainable, frozen,
                           self.stage_phase(1, "x").peak_learning_rate,
                           details={"stages": stages}), combined
