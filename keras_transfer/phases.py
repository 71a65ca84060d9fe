"""The training phases: `HeadPhase`, `FineTunePhase`, and the phases `fit` picks.

A phase is a small dataclass with every option of one stage of transfer
learning (the `contracts.Phase` protocol); `trainer.run_phases` runs them in
order on a `TransferModel`:

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

import keras
import numpy as np

from keras_transfer import fine_tune_cache
from keras_transfer.callbacks import DivergenceGuard, RestoreBest
from keras_transfer.contracts import Phase
from keras_transfer.data import held_out_split
from keras_transfer.distribute import model_scope
from keras_transfer.feature_cache import CacheUnwritableError
from keras_transfer.fine_tune_policy import forget_probe, remember_probe, run_with_policy
from keras_transfer.layer_groups import check_layer_rates, phase_optimizer
from keras_transfer.probe import fit_linear_probe
from keras_transfer.schedules import adam_for, check_optimizer_options
from keras_transfer.training import (
    PhaseRecord,
    count_params,
    fit_phase,
    leaf_layers,
    prepare_backbone,
    say,
    warn,
)

logger = logging.getLogger("keras_transfer")


@dataclasses.dataclass(frozen=True)
class HeadPhase:
    """Train the heads on the frozen backbone.

    A linear head (pooling or Flatten, then Dense: the default) on cached
    features is a convex problem, and by default it is solved to
    convergence: standardised features, L2-regularised cross-entropy (or
    least squares), the regularisation picked by cross-validation, the
    logits scaled so the training log-loss equals the cross-validated one,
    the standardisation folded into the Dense weights (`probe.fit_linear_probe`).
    Heads with hidden layers, and heads whose features cannot be cached
    (random augmentation), train with Adam.

    Args:
        epochs: int, optional. Adam epochs. None (default): enough steps to
            converge (at least 300, at least 10 epochs), stopping early when
            the validation loss (or, without validation data, the loss)
            stops falling. Not used by the probe.
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
        validation_split: float in (0, 1), optional. Without validation
            data, hold out this share of the cached training examples
            (stratified by class) as validation data for the Adam-trained
            heads, so that early stopping keeps their best epoch on examples
            they do not train on. Off by default: measured with a 256-unit
            hidden layer and 0.2 against training to the step budget, it
            cost test accuracy in 13 of 15 runs (5 tasks of 30 to 500
            examples, 3 seeds; mean -0.021) and -0.018 on 1,437 digits: the
            head trains on fewer examples, and a small held-out set picks
            the epoch by noise.
        name: str. The phase's name in logs and the history.

    Example:
        >>> kt.HeadPhase()                                  # the probe
        HeadPhase(epochs=None, learning_rate=0.001, solver='auto', early_stopping=None,
                  feature_cache='auto', augmented_copies=0, cache_dir=None,
                  validation_split=None, name='head')
        >>> kt.HeadPhase(solver="adam", epochs=10, learning_rate=3e-4, early_stopping=3)
        HeadPhase(epochs=10, learning_rate=0.0003, solver='adam', early_stopping=3, ...)
    """

    epochs: int | None = None
    learning_rate: float = 1e-3
    solver: str = "auto"
    early_stopping: int | None = None
    feature_cache: bool | str = "auto"
    augmented_copies: int = 0
    cache_dir: str | None = None
    validation_split: float | None = None
    name: str = "head"
    trains_backbone = False  # (contracts.Phase) not a field: not in the repr a backup compares

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
        if self.validation_split is not None:
            if isinstance(self.validation_split, bool) or not isinstance(
                    self.validation_split, (int, float)) or not 0 < self.validation_split < 1:
                raise ValueError(f"Received validation_split={self.validation_split!r}; "
                                 "expected a share in (0, 1), e.g. 0.2.")
            if self.feature_cache is False:
                raise ValueError("Received validation_split with feature_cache=False; the "
                                 "split is taken from the cached features. Pass "
                                 "validation_data instead.")

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
        if not model.backbone.pretrained:
            warn(f"Phase '{self.name}' trains the heads on a frozen backbone with random "
                 "weights (weights=None): its features were never trained, so this is not "
                 "transfer learning and accuracy is often near chance. Load pretrained "
                 "weights, or train end to end with kt.FineTunePhase.from_scratch() (what "
                 "fit does on a random backbone when no phases are given).", verbose)
        forget_probe(model)  # the heads change: an earlier probe's evidence no longer holds
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
        held_out = None
        if self.validation_split and caches is None:
            say(f"HeadPhase(validation_split={self.validation_split}) not used: the features "
                "are not cached (random augmentation), so no cached examples can be held "
                "out. Pass validation_data instead.", verbose)
        elif self.validation_split and caches["validation"] is not None:
            say(f"HeadPhase(validation_split={self.validation_split}) not used: validation "
                "data was given.", verbose)
        elif self.validation_split:
            held_out = _held_out_rows(model, caches["train"], remaining,
                                      self.validation_split, data.seed, verbose)
        if caches is not None:
            for name in remaining:
                cache = caches["train"][name]
                copies = (f"{cache.copies} cached augmented copies; epoch i trains on copy i % "
                          f"{cache.copies}" if cache.copies > 1 else
                          "cached features, no augmentation")
                say(f"Feature cache: training the head{'' if model.single else ' ' + repr(name)}"
                    f" on {copies} ({cache.path}); the backbone does not run.", verbose)
            train, validation = data.cached_batches(caches, held_out)
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
                initial_epoch, verbose, self.learning_rate, backup=data.phase_backup,
                divergence_factor=DivergenceGuard.HEAD_FACTOR)
        record.details.update(probed)
        if held_out:
            record.details["held_out"] = {name: {"rows": len(held), "of": len(kept) + len(held)}
                                          for name, (kept, held) in held_out.items()}
        return record, history

    def _caches(self, data, verbose):
        """`{"train": {head: FeatureCache}, "validation": {...}}`, or None without a cache."""
        if self.feature_cache is False:
            say("Feature cache: off (feature_cache=False): the frozen backbone runs on every "
                "batch of every epoch.", verbose)
            return None
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


def _held_out_rows(model, caches: dict, names, fraction, seed, verbose) -> dict | None:
    """`{head: (kept rows, held-out rows)}` of the cached training features, or None."""
    split = {}
    for name in names:
        cache = caches[name]
        where = "" if model.single else f" {name!r}"
        if cache.copies != 1 or not cache.fits_in_memory():
            say(f"HeadPhase(validation_split={fraction}) not used: the cached features of "
                f"head{where} are augmented copies or do not fit in memory, so rows cannot "
                "be held out. Pass validation_data instead.", verbose)
            return None
        rows = held_out_split(cache.load()[1], model.head_specs[name].kind, fraction, seed)
        if rows is None:
            say(f"HeadPhase(validation_split={fraction}) not used: {cache.num_examples} "
                f"examples of head{where} are too few to hold some out.", verbose)
            return None
        split[name] = rows
        say(f"Head{where}: {len(rows[1])} of {cache.num_examples} training examples "
            "(stratified) held out as validation data; the head trains on the others.",
            verbose)
    return split


def solve_linear_heads(model, caches, data, required, verbose) -> dict:
    """Solves every linear head with data by the probe; returns `{head: what was chosen}`."""
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
        remember_probe(model, name, solved[name])  # FineTunePhase(policy="auto") reads it
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
        logs = {k: float(v) for k, v in model.evaluate_batches(
            train, verbose=0, return_dict=True).items()}
        if validation is not None:
            logs.update({f"val_{k}": float(v) for k, v in model.evaluate_batches(
                validation, verbose=0, return_dict=True).items()})
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
        learning_rate: float or `(low, high)`. Peak Adam learning rate after
            warmup (default 1e-5: the weights are nudged, not rewritten; 1e-4
            with `lora_rank`). `(low, high)`: rates spread geometrically from
            the bottom block (`kt.layer_groups`) to the top one and the heads.
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
        decay: str. `"cosine"` or `"linear"` decay after warmup, or
            `"one_cycle"` (fastai's: from peak/25 up, then a cosine down to
            almost 0; `keras_transfer.schedules`).
        early_stopping: int, optional. Patience in epochs (see `HeadPhase`).
        restore_best: bool. With validation data: at the end, put back the
            weights of the epoch with the lowest validation loss, the weights
            before fine-tuning included (so a fine-tune that does not help
            keeps the heads as they were).
        min_steps: int. The step budget of `epochs=None`.
        lora_rank: int, optional. Train rank-`lora_rank` adapters on the
            attention projections instead of the weights (text backbones).
        lora_targets: list of str, optional. Layer names for adapters.
        feature_cache: `"auto"`, `True` or `False`. With `unfreeze=N` or a
            layer name: run the frozen bottom of the network once, cache its
            outputs on disk and train the unfrozen top on them
            (`fine_tune_cache`; same results within float rounding).
            `"auto"`: when nothing random happens before the network and
            BatchNormalization does not train; otherwise the whole network
            runs every step, as the log says. `True` makes that an error.
        cache_dir: str, optional. Root of that cache (see `HeadPhase`).
        layer_decay: float in (0, 1], optional. Layer-wise rate decay: the
            backbone's block g from the top trains at
            `learning_rate * layer_decay**g`; the heads at `learning_rate`.
        policy: `"auto"` (default): with `learning_rate`, `epochs` and
            `layer_decay` unset, skip after a saturated probe, else a stronger
            recipe on images (`fine_tune_policy`; the log and
            `record.details["policy"]` say why). `"always"`: as configured.
        weight_decay: float, optional. AdamW's decoupled weight decay,
            biases and normalisation scales and offsets excluded.
        gradient_accumulation_steps: int >= 2, optional. Keras's gradient
            accumulation: one update per that many batches.
        shift: float in [0, 0.5). Image backbones: random translations of
            the training images by up to this share of their height and
            width, when `fit` was given no `augmentation` (its augmentation
            is used instead). 0 (default): none. The stronger recipe of
            `fine_tune_policy` shifts by 0.1.
        name: str. The phase's name in logs and the history.

    Example:
        >>> kt.FineTunePhase(epochs=20, learning_rate=3e-4, layer_decay=0.8)
        FineTunePhase(epochs=20, learning_rate=0.0003, ..., layer_decay=0.8, ...)
        >>> kt.FineTunePhase()                                    # ~100 steps at 1e-5
        FineTunePhase(epochs=None, learning_rate=None, unfreeze='all', train_batchnorm=False,
                      batchnorm_momentum=None, warmup=0.1, decay='cosine', early_stopping=None,
                      restore_best=True, min_steps=100, lora_rank=None, lora_targets=None,
                      feature_cache='auto', cache_dir=None, layer_decay=None, policy='auto',
                      weight_decay=None, gradient_accumulation_steps=None, shift=0.0,
                      name='fine_tune')
        >>> kt.FineTunePhase(epochs=10, learning_rate=2e-5, unfreeze=20)
        FineTunePhase(epochs=10, learning_rate=2e-05, unfreeze=20, ...)
        >>> kt.FineTunePhase(epochs=3, lora_rank=4)
        FineTunePhase(epochs=3, ..., lora_rank=4, ...)
        >>> kt.FineTunePhase.from_scratch()           # random weights, end to end
        FineTunePhase(epochs=None, learning_rate=0.001, unfreeze='all', train_batchnorm=True,
                      batchnorm_momentum=0.9, ..., name='from_scratch')
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
    feature_cache: bool | str = "auto"
    cache_dir: str | None = None
    layer_decay: float | None = None
    policy: str = "auto"
    weight_decay: float | None = None
    gradient_accumulation_steps: int | None = None
    shift: float = 0.0
    name: str = "fine_tune"
    trains_backbone = True  # (contracts.Phase) not a field: not in the repr a backup compares

    def __post_init__(self):
        if self.epochs is not None:
            _check_int(self.epochs, "epochs", minimum=1)
        _check_int(self.min_steps, "min_steps", minimum=1)
        check_layer_rates(self.learning_rate, self.layer_decay)
        if self.policy not in ("auto", "always"):
            raise ValueError(f"Received policy={self.policy!r}; expected 'auto' (decide from "
                             "the probe) or 'always' (run as configured).")
        check_optimizer_options(self.weight_decay, self.gradient_accumulation_steps)
        if isinstance(self.learning_rate, list):  # hashable, like the dataclass
            object.__setattr__(self, "learning_rate", tuple(self.learning_rate))
        if self.learning_rate is not None and not isinstance(self.learning_rate, tuple):
            _check_rate(self.learning_rate)
        _check_patience(self.early_stopping)
        if not isinstance(self.warmup, (int, float)) or not 0.0 <= self.warmup <= 1.0:
            raise ValueError(f"Received warmup={self.warmup!r}; expected a share in [0, 1].")
        if self.decay not in ("cosine", "linear", "one_cycle"):
            raise ValueError(f"Received decay={self.decay!r}; expected 'cosine', 'linear' or "
                             "'one_cycle'.")
        if self.lora_rank is not None:
            _check_int(self.lora_rank, "lora_rank", minimum=1)
        if self.feature_cache not in (True, False, "auto"):
            raise ValueError(f"Received feature_cache={self.feature_cache!r}; expected True, "
                             "False or 'auto'.")
        if isinstance(self.shift, bool) or not isinstance(self.shift, (int, float)) \
                or not 0.0 <= self.shift < 0.5:
            raise ValueError(f"Received shift={self.shift!r}; expected a share of the image "
                             "in [0, 0.5), e.g. 0.1 (0: no translations).")
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
                        policy="always", name="from_scratch")
        return cls(**{**defaults, **options})

    @property
    def peak_learning_rate(self) -> float:
        """The top rate (the heads'): `learning_rate`, the high end of a range, or the default."""
        if isinstance(self.learning_rate, tuple):
            return float(self.learning_rate[1])
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
        prepare_backbone(model, self.unfreeze, self.train_batchnorm, self.lora_rank,
                         self.lora_targets)

    def run(self, model, data, callbacks, initial_epoch, verbose):
        """Unfreezes and fine-tunes; returns `(PhaseRecord, keras History)`.

        With `policy="auto"`, first decides from the probe's evidence whether
        to skip, strengthen or run as configured (`fine_tune_policy.decide`).
        """
        if self.policy == "auto":
            return run_with_policy(self, model, data, callbacks, initial_epoch, verbose)
        if self.shift and model.backbone.metadata().get("kind") != "image":
            raise ValueError(f"Received FineTunePhase(shift={self.shift!r}) on a "
                             f"{type(model.backbone).__name__}: translations are for images. "
                             "Leave shift at 0.")
        self.prepare(model)
        (train, steps), validation = data.batches(self.shift), data.validation_batches()
        epochs = self.epochs_for(steps)
        total = steps * epochs
        peak = self.peak_learning_rate
        make_optimizer, rates = phase_optimizer(model, self, adam_for(self, total), verbose)
        # The frozen bottom run once and cached (fine_tune_cache); None: the whole network runs.
        cached = fine_tune_cache.cached_fine_tune(self, model, data, verbose)
        context = contextlib.nullcontext() if cached is None else cached[2]
        if cached is not None:
            train, validation = cached[:2]
        best = RestoreBest(validation) if self.restore_best and validation is not None else None
        with context, _batchnorm_momentum(model.backbone.network, self.batchnorm_momentum):
            record, history = fit_phase(
                model, self.name, train, validation, epochs,
                make_optimizer, [*([best] if best else []), *callbacks],
                self.early_stopping, initial_epoch, verbose, peak, backup=data.phase_backup)
        if rates is not None:
            record.details["group_rates"] = rates
        if best is not None and best.restored is not None:
            record.details["restored"] = best.restored
            say(f"Phase '{self.name}': kept the weights of {best.restored} (lowest validation "
                f"loss, {best.best:.4f}).", verbose)
        return record, history


def resolve_phases(phases=None, head_epochs=None, fine_tune_epochs=None, epochs=None,
                   pretrained: bool = True, verbose=False) -> list[Phase]:
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
        bad = [p for p in phases if not isinstance(p, Phase)]
        if bad or not phases:
            raise ValueError(
                f"Received phases={phases!r}; expected a non-empty list of phases: "
                "kt.HeadPhase(...), kt.FineTunePhase(...), or objects with the members of "
                "kt.contracts.Phase (name, trains_backbone, prepare(model), run(model, data, "
                "callbacks, initial_epoch, verbose))"
                + (f"; {bad[0]!r} ({type(bad[0]).__name__}) is not one." if bad else "."))
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
