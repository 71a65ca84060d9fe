"""Training phases, learning-rate schedules, callbacks and the loop over phases.

A phase is a small dataclass with every option of one stage of transfer
learning; `run_phases` runs them in order on a `TransferModel`:

- `HeadPhase`: the backbone is frozen (inference mode) and the heads train.
  When nothing random happens to the inputs, the backbone runs once over
  the data, its features are cached on disk (`feature_cache`) and the heads
  train on them; callbacks still see the whole model.
- `FineTunePhase`: the backbone is unfrozen (all of it, its top N layers,
  from a named layer on, or LoRA adapters) and trains with a small learning
  rate that warms up and then decays, so the pretrained features are nudged
  rather than overwritten (catastrophic forgetting).

`compile()` fixes which weights train, so every change of `trainable` is
followed by a recompile with a fresh optimizer. BatchNormalization layers
stay frozen while fine-tuning: a frozen Keras 3 BatchNormalization runs in
inference mode even when `fit` passes `training=True` down (keras#20285), so
its moving statistics are kept.

Example:

```python
model.fit(x, y, phases=[
    kt.HeadPhase(epochs=5),
    kt.FineTunePhase(epochs=10, learning_rate=1e-5, unfreeze=20, warmup=0.1),
])
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import shutil
import tempfile

import keras
import numpy as np

from keras_transfer.callbacks import (
    DivergenceGuard,
    DropUnfedHeads,
    LearningRateLogger,
    RestoreBest,
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



# ----------------------------------------------------------------- phases
@dataclasses.dataclass(frozen=True)
class HeadPhase:
    """Train the heads on the frozen backbone.

    A linear head (pooling or Flatten, then Dense: the default) on cached
    features is a convex problem, and by default it is solved to
    convergence: standardised features, L2-regularised cross-entropy (or
    least squares), the regularisation picked by cross-validation, the
    standardisation folded into the Dense weights (`probe.fit_linear_probe`).
    Heads with hidden layers, and heads whose features cannot be cached
    (random augmentation), train with Adam.

    Args:
        epochs: int, optional. Adam epochs. None (default): enough steps to
            converge (at least 300, at least 10 epochs), stopping early when
            the validation loss (or the loss) stops falling. Not used by the
            probe.
        learning_rate: float. Adam learning rate.
        solver: str. `"auto"` (the probe for linear heads on cached
            features, Adam otherwise), `"probe"` (an error where it cannot be
            used) or `"adam"`.
        early_stopping: int, optional. Adam's patience in epochs: stop when
            the validation loss (or the loss) stops falling, restore the best
            weights.
        feature_cache: `"auto"`, `True` or `False`. Run the frozen backbone
            once, cache its features on disk and train the heads on them.
            `"auto"`: cache when nothing random happens to the inputs (or
            with `augmented_copies`); with random augmentation the backbone
            runs every epoch, as the log says. `True` makes that last case an
            error; `False` never caches (and so never probes).
        augmented_copies: int. With augmentation: cache this many augmented
            copies of the data (the probe fits all of them; Adam's epoch i
            trains on copy i % K).
        cache_dir: str, optional. Root of the feature cache (default
            `$KERAS_TRANSFER_CACHE`, else `~/.cache/keras_transfer/features`).
        name: str. The phase's name in logs and the history.

    Example:
        >>> kt.HeadPhase()                                  # the probe
        >>> kt.HeadPhase(solver="adam", epochs=10, learning_rate=3e-4, early_stopping=3)
    """

    epochs: int | None = None
    learning_rate: float = 1e-3
    solver: str = "auto"
    early_stopping: int | None = None
    feature_cache: bool | str = "auto"
    augmented_copies: int = 0
    cache_dir: str | None = None
    name: str = "head"

    def __post_init__(self):
        if self.epochs is not None:
            _check_int(self.epochs, "epochs", minimum=1)
        _check_rate(self.learning_rate)
        if self.solver not in SOLVERS:
            raise ValueError(f"Received solver={self.solver!r}; expected one of {SOLVERS}.")
        _check_patience(self.early_stopping)
        if self.feature_cache not in (True, False, "auto"):
            raise ValueError(f"Received feature_cache={self.feature_cache!r}; expected True, "
                             "False or 'auto'.")
        _check_int(self.augmented_copies, "augmented_copies", minimum=0)
        if self.solver == "probe" and self.feature_cache is False:
            raise ValueError("Received solver='probe' with feature_cache=False; the probe "
                             "solves the heads on cached features.")

    def uses_cache(self, augmentation) -> bool:
        """Whether the heads train on cached features, given fit's augmentation."""
        if self.feature_cache is False:
            return False
        random = augmentation is not None and not self.augmented_copies
        if random and (self.feature_cache is True or self.solver == "probe"):
            raise ValueError(
                f"Received {'solver=probe' if self.solver == 'probe' else 'feature_cache=True'}"
                " with random augmentation and augmented_copies=0: features of freshly "
                "augmented inputs change every epoch and cannot be cached. Pass "
                "augmented_copies=K to cache K augmented copies, or feature_cache='auto' to "
                "recompute them every epoch.")
        return not random

    def prepare(self, model) -> None:
        """The phase's change to the model before training: a frozen backbone."""
        model.backbone.freeze()

    def run(self, model, data, callbacks, initial_epoch, verbose):
        """Trains the heads; returns `(PhaseRecord, keras History)`."""
        if not getattr(model.backbone, "pretrained", True):
            warn(f"Phase '{self.name}' trains the heads on a frozen backbone with random "
                 "weights (weights=None): its features were never trained, so this is not "
                 "transfer learning and accuracy is often near chance. Load pretrained "
                 "weights, or train end to end with kt.FineTunePhase.from_scratch() (what "
                 "fit does on a random backbone when no phases are given).", verbose)
        self.prepare(model)
        caches = self._caches(data, verbose)
        probed = {}
        if caches is not None and self.solver != "adam":
            probed = solve_linear_heads(model, caches, data, self.solver == "probe", verbose)
            if probed and self.epochs is not None:
                say(f"HeadPhase(epochs={self.epochs}) not used for {sorted(probed)}: a linear "
                    "head is solved to convergence. HeadPhase(solver='adam') trains it for "
                    "epochs with Adam instead.", verbose)
        remaining = [n for n in data.train if n not in probed]
        if not remaining:
            return _solved_phase(model, self.name, data, caches, probed, callbacks,
                                 initial_epoch, verbose)
        if caches is not None:
            for name in remaining:
                cache = caches["train"][name]
                copies = (f"{cache.copies} cached augmented copies; epoch i trains on copy i % "
                          f"{cache.copies}" if cache.copies > 1 else
                          "cached features, no augmentation")
                say(f"Feature cache: training the head{'' if model.single else ' ' + repr(name)}"
                    f" on {copies} ({cache.path}); the backbone does not run.", verbose)
            train, validation = data.cached_batches(caches)
            context = model.features_as_inputs()
        else:
            (train, _), validation = data.batches(), data.validation_batches()
            context = contextlib.nullcontext()
        epochs, patience = self.epochs, self.early_stopping
        if epochs is None:  # enough steps to converge, and stop when it has
            steps = data.batches()[1]
            epochs = min(max(math.ceil(300 / steps), 10), 200)
            patience = patience or 5
        with context, _frozen(model.heads[n] for n in probed):
            record, history = fit_phase(
                model, self.name, train, validation, epochs,
                lambda: keras.optimizers.Adam(self.learning_rate), callbacks, patience,
                initial_epoch, verbose, self.learning_rate, backup=data.phase_backup)
        record.details.update(probed)
        return record, history

    def _caches(self, data, verbose):
        """`{"train": {head: FeatureCache}, "validation": {...}}`, or None without a cache."""
        from keras_transfer.feature_cache import CacheUnwritableError

        if not self.uses_cache(data.augmentation):
            say("Feature cache: not used for the head phase: augmentation is random and "
                "augmented_copies=0, so the frozen backbone recomputes the features of "
                "freshly augmented inputs every epoch. Pass HeadPhase(augmented_copies=K) "
                "to cache K augmented copies instead.", verbose)
            return None
        try:
            return data.feature_caches(self, verbose)
        except CacheUnwritableError as error:
            if self.feature_cache is True or self.solver == "probe":
                raise
            logger.warning("%s The head phase runs the frozen backbone every epoch "
                           "instead.", error)
            if verbose:
                print(f"Warning: {error} The head phase runs the frozen backbone every "
                      "epoch instead.")
            return None


SOLVERS = ("auto", "probe", "adam")


def solve_linear_heads(model, caches, data, required, verbose) -> dict:
    """Solves every linear head with data by the probe; returns `{head: what was chosen}`."""
    from keras_transfer.probe import fit_linear_probe

    solved = {}
    for name, cache in caches["train"].items():
        spec = model.head_specs[name]
        if not spec.is_linear:
            if required:
                raise ValueError(f"Received solver='probe' for head {name!r} with hidden "
                                 f"layers {spec.hidden_units}; the probe solves linear heads. "
                                 "Use solver='auto' or 'adam'.")
            continue
        features, labels = _pooled_features(cache, spec.pooling)
        weights = data.example_weights(name, labels)
        probe = fit_linear_probe(features, labels, spec.kind, spec.num_classes,
                                 sample_weight=weights, seed=data.seed or 0)
        dense = model.heads[name].layers[-1]
        dense.set_weights([probe.kernel.astype("float32"), probe.bias.astype("float32")])
        report = probe.report
        where = "" if model.single else f" {name!r}"
        say(f"Head{where}: linear probe on {len(labels):,} cached feature rows: "
            f"{report.summary()}", verbose)
        found = {k: v for k, v in report.as_dict().items() if k not in ("fold_scores", "grid")}
        solved[name] = {**found, "solver": "probe", "method": report.solver,
                        "summary": report.summary()}
    return solved


def _pooled_features(cache, pooling):
    """A cache's features (all copies), pooled as the head does, and the labels."""
    parts = [cache.load(copy) for copy in range(cache.copies)]
    features = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if features.ndim == 4 and pooling != "flatten":
        features = (features.mean if pooling == "avg" else features.max)(axis=(1, 2))
    return features.reshape(len(features), -1), labels


@contextlib.contextmanager
def _batchnorm_momentum(network, momentum):
    """Sets every BatchNormalization layer's momentum inside the context (None: unchanged).

    The layers read it when the training step is traced, and every phase
    compiles (and so traces) afresh.
    """
    layers = [layer for layer in leaf_layers(network)
              if isinstance(layer, keras.layers.BatchNormalization)]
    kept = [layer.momentum for layer in layers]
    if momentum is not None:
        for layer in layers:
            layer.momentum = float(momentum)
    try:
        yield
    finally:
        for layer, value in zip(layers, kept):
            layer.momentum = value


@contextlib.contextmanager
def _frozen(layers):
    """Keeps `layers` frozen inside the context (heads already solved)."""
    layers = list(layers)
    for layer in layers:
        layer.trainable = False
    try:
        yield
    finally:
        for layer in layers:
            layer.trainable = True


def _solved_phase(model, name, data, caches, solved, callbacks, initial_epoch, verbose):
    """The record of a phase solved without epochs: one entry of logs, callbacks told."""
    train, validation = data.cached_batches(caches)
    with model.features_as_inputs():
        with model_scope(model):
            model.compile(optimizer=keras.optimizers.Adam())
        logs = {k: float(v) for k, v in keras.Model.evaluate(
            model, train, verbose=0, return_dict=True).items()}
        if validation is not None:
            logs.update({f"val_{k}": float(v) for k, v in keras.Model.evaluate(
                model, validation, verbose=0, return_dict=True).items()})
        history = keras.callbacks.History()
        callback_list = keras.callbacks.CallbackList(list(callbacks) + [history], model=model)
        callback_list.on_train_begin()
        callback_list.on_epoch_begin(initial_epoch)
        callback_list.on_epoch_end(initial_epoch, logs)
        callback_list.on_train_end(logs)
    trainable, frozen = count_params(model)
    record = PhaseRecord(name, initial_epoch, 0, trainable, frozen, None, details=solved)
    say(f"Phase '{name}': {trainable:,} parameters solved by the probe (backbone frozen); "
        + ", ".join(f"{k} {v:.4f}" for k, v in logs.items()), verbose)
    return record, history


@dataclasses.dataclass(frozen=True)
class FineTunePhase:
    """Unfreeze the backbone and train on with a small, warmed-up, decaying rate.

    Measured here after a converged probe (MiniLM on 100 yelp sentences,
    VGG16 on 5-shot textures, 3 seeds): about 100 optimiser steps at 1e-5
    with warmup and cosine decay improved on the probe in 9 runs of 9 (yelp
    0.863 -> 0.892, 8 topics +0.010, textures +0.017); holding out a fifth of
    a small training set to pick an epoch gained less (+0.011 against
    +0.019) and lost to the probe twice, its 8-26 examples being noise; a
    rate of 3e-5 lost 0.025 once. So the default budget is counted in steps,
    and an epoch is picked only on validation data the user gives.

    Args:
        epochs: int, optional. Passes over the training data. None (default):
            at least `min_steps` optimiser steps and at least 3 epochs.
        learning_rate: float. Peak Adam learning rate, reached after warmup
            (default 1e-5: the pretrained weights are nudged, not rewritten;
            1e-4 with `lora_rank`).
        unfreeze: `"all"`, an int N (the top N layers with weights) or a
            layer name (from that layer on).
        train_batchnorm: bool. Let BatchNormalization layers train and
            update their statistics (and dropout inside the backbone run).
        batchnorm_momentum: float, optional. With `train_batchnorm`: the
            momentum of the BatchNormalization moving statistics during this
            phase. Many Keras networks build them with 0.999, which a run of
            a few hundred steps from scratch leaves far from the data's
            statistics (inference then falls to chance); 0.9 follows them.
            None keeps each layer's own.
        warmup: float. Share of the phase's steps spent warming up from 0.
        decay: str. `"cosine"` or `"linear"` decay after warmup.
        early_stopping: int, optional. Patience in epochs (see `HeadPhase`).
        restore_best: bool. With validation data: at the end, put back the
            weights of the epoch with the lowest validation loss, the weights
            before fine-tuning included (so a fine-tune that does not help
            keeps the heads as they were).
        min_steps: int. The step budget of `epochs=None`.
        lora_rank: int, optional. Train rank-`lora_rank` adapters on the
            attention projections instead of the weights (text backbones).
        lora_targets: list of str, optional. Layer names for adapters.
        name: str. The phase's name in logs and the history.

    Example:
        >>> kt.FineTunePhase()                                    # ~100 steps at 1e-5
        >>> kt.FineTunePhase(epochs=10, learning_rate=2e-5, unfreeze=20)
        >>> kt.FineTunePhase(epochs=3, lora_rank=4)
        >>> kt.FineTunePhase.from_scratch()           # random weights, end to end
    """

    epochs: int | None = None
    learning_rate: float | None = None
    unfreeze: object = "all"
    train_batchnorm: bool = False
    batchnorm_momentum: float | None = None
    warmup: float = 0.1
    decay: str = "cosine"
    early_stopping: int | None = None
    restore_best: bool = True
    min_steps: int = 100
    lora_rank: int | None = None
    lora_targets: tuple | None = None
    name: str = "fine_tune"

    def __post_init__(self):
        if self.epochs is not None:
            _check_int(self.epochs, "epochs", minimum=1)
        _check_int(self.min_steps, "min_steps", minimum=1)
        if self.learning_rate is not None:
            _check_rate(self.learning_rate)
        _check_patience(self.early_stopping)
        if not isinstance(self.warmup, (int, float)) or not 0.0 <= self.warmup <= 1.0:
            raise ValueError(f"Received warmup={self.warmup!r}; expected a share in [0, 1].")
        if self.decay not in ("cosine", "linear"):
            raise ValueError(f"Received decay={self.decay!r}; expected 'cosine' or 'linear'.")
        if self.lora_rank is not None:
            _check_int(self.lora_rank, "lora_rank", minimum=1)
        if self.batchnorm_momentum is not None:
            if not 0.0 <= self.batchnorm_momentum < 1.0:
                raise ValueError(f"Received batchnorm_momentum={self.batchnorm_momentum!r}; "
                                 "expected a number in [0, 1), e.g. 0.9.")
            if not self.train_batchnorm:
                raise ValueError(f"Received batchnorm_momentum={self.batchnorm_momentum!r} "
                                 "with train_batchnorm=False: the moving statistics change "
                                 "only while BatchNormalization trains. Pass "
                                 "train_batchnorm=True too.")

    @classmethod
    def from_scratch(cls, **options) -> "FineTunePhase":
        """Trains a randomly initialised backbone end to end, with its heads.

        What `fit` runs by default on a backbone with random weights
        (`weights=None`): every layer trains at a from-scratch peak rate of
        1e-3 (warmup, then cosine decay), BatchNormalization included, its
        moving statistics at momentum 0.9 so that they converge within the run.

        Args:
            **options: any `FineTunePhase` argument, replacing these defaults.

        Returns:
            A `FineTunePhase` named `"from_scratch"`.
        """
        defaults = dict(learning_rate=1e-3, train_batchnorm=True, batchnorm_momentum=0.9,
                        name="from_scratch")
        return cls(**{**defaults, **options})

    @property
    def peak_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if self.lora_rank else 1e-5

    def epochs_for(self, steps_per_epoch: int) -> int:
        """The epochs run: `epochs`, or enough for `min_steps` (at least 3)."""
        if self.epochs is not None:
            return self.epochs
        return max(math.ceil(self.min_steps / steps_per_epoch), 3)

    def prepare(self, model) -> None:
        """The phase's change to the model: unfrozen layers or LoRA adapters.

        Made in the strategy's scope: LoRA adapters are new variables.
        """
        with model_scope(model):
            if self.lora_rank:
                count = model.backbone.enable_lora(self.lora_rank, self.lora_targets)
                logger.info("LoRA rank %d: %d adapter parameters train.", self.lora_rank,
                            count)
            else:
                model.backbone.unfreeze(self.unfreeze, self.train_batchnorm)

    def run(self, model, data, callbacks, initial_epoch, verbose):
        """Unfreezes and fine-tunes; returns `(PhaseRecord, keras History)`."""
        self.prepare(model)
        (train, steps), validation = data.batches(), data.validation_batches()
        epochs = self.epochs_for(steps)
        total = steps * epochs
        peak = self.peak_learning_rate
        schedule = WarmupDecay(peak, total_steps=total,
                               warmup_steps=int(round(self.warmup * total)), decay=self.decay)
        best = RestoreBest(validation) if self.restore_best and validation is not None else None
        with _batchnorm_momentum(model.backbone.network, self.batchnorm_momentum):
            record, history = fit_phase(
                model, self.name, train, validation, epochs,
                lambda: keras.optimizers.Adam(schedule), [*([best] if best else []), *callbacks],
                self.early_stopping, initial_epoch, verbose, peak, backup=data.phase_backup)
        if best is not None and best.restored is not None:
            record.details["restored"] = best.restored
            say(f"Phase '{self.name}': kept the weights of {best.restored} (lowest validation "
                f"loss, {best.best:.4f}).", verbose)
        return record, history


def resolve_phases(phases=None, head_epochs=None, fine_tune_epochs=None, epochs=None,
                   pretrained: bool = True, verbose=False) -> list:
    """The phases `fit` runs, from `phases=` or the epoch shorthands.

    Args:
        phases, head_epochs, fine_tune_epochs, epochs: as given to `fit`.
        pretrained: bool. Whether the backbone's weights are pretrained. The
            defaults (nothing given) are a head phase and a fine-tune phase
            on a pretrained backbone, and `FineTunePhase.from_scratch()` on
            a random one: a frozen random backbone is not transfer learning.
        verbose: print what was chosen for a random backbone.

    Returns:
        A non-empty list of phase objects.
    """
    shorthands = {"head_epochs": head_epochs, "fine_tune_epochs": fine_tune_epochs,
                  "epochs": epochs}
    given = {k: v for k, v in shorthands.items() if v is not None}
    if phases is not None:
        if given:
            raise ValueError(f"Received phases= and {sorted(given)}; the phases hold the "
                             "epochs: give one or the other.")
        phases = list(phases) if isinstance(phases, (list, tuple)) else [phases]
        bad = [p for p in phases if not isinstance(p, (HeadPhase, FineTunePhase))]
        if bad or not phases:
            raise ValueError(f"Received phases={phases!r}; expected a non-empty list of "
                             "kt.HeadPhase(...) and kt.FineTunePhase(...).")
        return phases
    if epochs is not None:
        if head_epochs is not None or fine_tune_epochs is not None:
            raise ValueError(
                f"Received epochs={epochs!r} together with "
                f"{sorted(k for k in given if k != 'epochs')}: epochs=N is the Keras-style "
                "shorthand for the head phase alone. Use head_epochs= and "
                "fine_tune_epochs= to run both phases.")
        head_epochs = epochs
    for name, value in (("head_epochs", head_epochs), ("fine_tune_epochs", fine_tune_epochs)):
        if value is not None:
            _check_int(value, name, minimum=0)
    if head_epochs is None and fine_tune_epochs is None:
        if not pretrained:
            say("The backbone has random weights (weights=None), and a frozen random backbone "
                "is not transfer learning: training it end to end from scratch "
                "(FineTunePhase.from_scratch(): peak learning rate 1e-3 with warmup and cosine "
                "decay, BatchNormalization training at momentum 0.9). Pass phases=[...] to "
                "choose otherwise.", verbose)
            return [FineTunePhase.from_scratch()]
        return [HeadPhase(), FineTunePhase()]  # the defaults: both phases, budgets chosen
    phases = []
    if head_epochs is None or head_epochs > 0:
        phases.append(HeadPhase(epochs=head_epochs))
    if fine_tune_epochs:
        phases.append(FineTunePhase(epochs=fine_tune_epochs))
    if not phases:
        raise ValueError("Received head_epochs=0 and fine_tune_epochs=0: nothing to train.")
    return phases


def _check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"Received {name}={value!r}; expected an int >= {minimum}.")


def _check_rate(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Received learning_rate={value!r}; expected a positive number.")


def _check_patience(value):
    if value is not None:
        _check_int(value, "early_stopping", minimum=1)


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

    def cached_batches(self, caches: dict):
        """Training and validation batches of cached features (see `feature_caches`)."""
        model = self.model
        train = {name: cache.dataset(self.batch_size, shuffle=self.shuffle,
                                     seed=self.shuffle_seed, drop_remainder=self.drop_remainder)
                 for name, cache in caches["train"].items()}
        train, _ = model.join(train, training=True, seed=self.shuffle_seed,
                              class_weight=self.class_weight)
        validation = None
        if caches["validation"] is not None:
            full = is_tpu(self.strategy)
            validation, _ = model.join({name: cache.dataset(self.batch_size, drop_remainder=full)
                                        for name, cache in caches["validation"].items()})
            validation = self._distributable(validation)
        return self._distributable(train), validation

    def example_weights(self, head: str, labels):
        """Per-example weights from `class_weight` for one head's labels, or None."""
        tables = self.model._class_weight_tables(self.class_weight)
        return None if head not in tables else tables[head][np.asarray(labels, np.int64)]

    def settings(self, phases) -> dict:
        """What a backup must match to resume this run (see `backup.RunBackup`)."""
        from keras_transfer.feature_cache import _config_digest

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
