"""The two contracts the core relies on: a backbone component and a phase.

`TransferModel`, the trainer, the feature cache, the memory estimate and
export use a backbone component (`ImageBackbone`, `TextBackbone`) and a
phase (`HeadPhase`, `FineTunePhase`) through these members only, so a new
kind of input or a new training stage is a class that has them; it need
not inherit from anything here. The protocols are checked at run time by
`isinstance` (members present, not their signatures).

Example:
    >>> isinstance(kt.FineTunePhase(), kt.contracts.Phase)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class BackboneComponent(Protocol):
    """What everything that depends on the kind of input provides.

    A component is a `keras.layers.Layer` whose `call(inputs, training)`
    maps raw inputs (what `make_dataset` batches) to features of
    `feature_shape`.

    Attributes:
        network: keras.Model. The pretrained network (frozen, unfrozen,
            snapshot for the forgetting report, memory estimate).
        preprocessor: a Keras layer or KerasHub preprocessor: raw inputs to
            what `network` takes.
        feature_shape: tuple. One example's features, without the batch.
        input_shape_: tuple. One example as the model takes it, without the
            batch (an image `(h, w, 3)`, text `(sequence_length,)`).
        pretrained: bool. False for random weights: `fit` then trains end to
            end by default, and a head phase warns.
        data_forms: str. The data `make_dataset` takes, for error messages.
        lora_rank: int or None. The rank of LoRA adapters enabled, if any.
    """

    network: Any
    preprocessor: Any
    feature_shape: tuple
    input_shape_: tuple
    data_forms: str
    lora_rank: int | None

    @property
    def pretrained(self) -> bool: ...

    def make_dataset(self, x, y=None, *, head, batch_size: int = 32, shuffle: bool = False,
                     augmentation=None, seed=None, drop_remainder: bool = False):
        """One `Head`'s labelled batches: `(dataset, class names or None)`."""

    def predict_dataset(self, x, *, batch_size: int = 32):
        """Batches of inputs without labels."""

    def freeze(self) -> None: ...

    def unfreeze(self, layers="all", train_batchnorm: bool = False) -> int:
        """Makes the top of the network trainable; returns the layers that now train."""

    def enable_lora(self, rank: int, target_layer_names=None) -> int:
        """Adds LoRA adapters (or raises a clear error where there are none)."""

    def serving_endpoints(self, predict: Callable) -> dict:
        """`{signature: (function, input_signature)}`: raw inputs around `predict`."""

    def metadata(self) -> dict:
        """What `metadata.json` says about the backbone and its inputs."""

    def cache_key(self) -> dict:
        """What cached features depend on besides the weights."""


@runtime_checkable
class Phase(Protocol):
    """One stage of training, run by `trainer.run_phases`.

    Attributes:
        name: str. The phase's name in logs, the history and the backup.
        trains_backbone: bool. Whether the backbone's weights train. The
            memory estimate counts a forward pass of the backbone for a
            phase that does not, and a backward pass for one that does.

    `repr(phase)` must show every option: a backup resumes only the run
    with the same phases (it compares their reprs). Dataclasses do so.
    """

    name: str
    trains_backbone: bool

    def prepare(self, model) -> None:
        """Its change to the model: frozen or unfrozen layers, adapters.

        Also run alone for a phase a resumed run skips, before the backup's weights load.
        """

    def run(self, model, data, callbacks: list, initial_epoch: int, verbose):
        """Trains; returns `(training.PhaseRecord, keras.callbacks.History)`.

        Args:
            model: the `TransferModel`.
            data: the `trainer.FitData`: `batches()`, `validation_batches()`,
                `feature_caches(phase, verbose)`, `cached_batches(...)`,
                `phase_backup` (pass it to `training.fit_phase(backup=...)`).
            callbacks: the Keras callbacks of every phase.
            initial_epoch: int. Epochs run by the phases before.
            verbose: as for `fit`.
        """


@runtime_checkable
class CachingPhase(Phase, Protocol):
    """A phase that may train on cached backbone features (the memory estimate asks)."""

    def uses_cache(self, augmentation) -> bool:
        """Whether it trains on cached features, given `fit`'s augmentation."""


@runtime_checkable
class UnfreezingPhase(Phase, Protocol):
    """A phase that unfreezes part of the backbone (the memory estimate asks what)."""

    unfreeze: Any
    train_batchnorm: bool
    lora_rank: int | None


@runtime_checkable
class CheckingPhase(Phase, Protocol):
    """A phase with checks of its own, run for every phase before the first one trains."""

    def check(self, model, data) -> None:
        """Raises (a `KerasTransferError`) when this phase cannot train `model` on `data`."""
