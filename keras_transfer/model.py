"""`TransferModel`: one backbone component and N named heads.

The backbone component (`ImageBackbone` or `TextBackbone`) owns everything
that depends on the kind of input: preprocessing, the pretrained network,
turning user data into batches, and the serving signatures of an export. The
heads (`Head` specs, built as small Keras models) map the backbone's
features to each task's logits. A single-task model is the case of one head:
its metrics are unprefixed (`accuracy`), its `predict` returns an array and
its data is `(x, y)`. With several heads, data is `{head: (x, y)}`, each
batch trains one head (see `data.join_heads`), metrics are prefixed
(`digits_accuracy`) and `predict` returns `{head: array}`.

`fit` runs training phases (`phases.HeadPhase`, `phases.FineTunePhase`)
one after the other and returns one `TransferHistory`.

A batch flows like this:

```
user data ─► backbone.make_dataset ─► (inputs, labels) per head ─► join_heads
          ─► model(inputs) = {head: head(backbone(inputs))} logits ─► losses, metrics
```
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile

import keras
import numpy as np

from keras_transfer import backend
from keras_transfer import data as data_lib
from keras_transfer import training
from keras_transfer.distribute import (
    MultiWorkerFitMixin,
    check_built_in_scope,
    get_strategy,
    is_chief,
    model_scope,
    scope,
    strategy_of,
)
from keras_transfer.errors import DataError
from keras_transfer.heads import Head, as_head
from keras_transfer.callbacks import head_of_key
from keras_transfer.phases import resolve_phases
from keras_transfer.training import scale_loss_for_replicas

logger = logging.getLogger("keras_transfer")

SINGLE = "head"  # the key of the one head of a single-task model


@keras.saving.register_keras_serializable(package="keras_transfer")
class TransferModel(MultiWorkerFitMixin, keras.Model):
    """A backbone component with one or several heads, trained in phases.

    Args:
        backbone: an `ImageBackbone` or `TextBackbone`, or a function that
            builds one (called inside the strategy's scope, where a backbone
            that trains under a strategy must be built).
        heads: a `Head` (one task), or a dict `{name: Head}` (several tasks
            on one backbone; names are identifiers and become output keys
            and metric prefixes).
        sampling: str. With several heads: `"round_robin"` (one batch of each
            head's data in turn, smaller data repeated) or `"proportional"`
            (every batch once per epoch, heads drawn in proportion to their
            data). See `data.task_schedule`.
        strategy: a `tf.distribute.Strategy`, a `keras.distribution` (JAX)
            or a name (`"auto"`, `"mirrored"`, `"multi_worker"`, `"tpu"`,
            `"cpu"`; see `distribute.get_strategy`, which maps names to
            `keras.distribution.DataParallel` on JAX); heads, optimizers and
            metrics are built in its scope. Batch sizes are global (split
            over the replicas).
        name: str, optional. Model name.

    Example:
        >>> backbone = kt.ImageBackbone("mobilenet_v2", weights=None, input_shape=(96, 96, 3))
        >>> model = kt.TransferModel(backbone, {"species": kt.Head(10),
        ...                                     "tags": kt.Head(5, kind="multilabel")})
        >>> history = model.fit({"species": (x1, y1), "tags": (x2, y2)}, head_epochs=3, verbose=0)
    """

    def __init__(self, backbone, heads, *, sampling="round_robin", strategy=None, name=None,
                 **kwargs):
        strategy = get_strategy(strategy)
        with scope(strategy):
            if callable(backbone) and not isinstance(backbone, keras.layers.Layer):
                backbone = backbone()
            check_built_in_scope(backbone, strategy)
            super().__init__(name=name or "transfer_model", **kwargs)
            if strategy is not None and not backend.is_tensorflow():
                self._keras_distribution = strategy  # TensorFlow's lives on the model
            self.single = isinstance(heads, Head)
            specs = {SINGLE: as_head(SINGLE, heads)} if self.single else _check_heads(heads)
            self.head_specs = specs
            self.sampling = data_lib.check_sampling(sampling)
            self.backbone = backbone
            self.heads = {n: spec.build(name=SINGLE if self.single else f"{n}_head")
                          for n, spec in specs.items()}
            # Per-head mean loss over that head's examples (several heads only).
            self.head_loss_trackers = [] if self.single else [
                keras.metrics.Mean(name=f"{n}_loss") for n in specs]
            for head in self.heads.values():
                head.build((None, *backbone.feature_shape))
            self.built = True
            self.backbone.freeze()
        self._features_are_inputs = False
        self._fitting = False

    # ------------------------------------------------------------ properties
    @property
    def head(self) -> keras.Sequential:
        """The head of a single-task model."""
        if not self.single:
            raise AttributeError(f"This model has several heads {self.head_names}: "
                                 "use model.heads[name].")
        return self.heads[SINGLE]

    @property
    def head_names(self) -> list[str]:
        return list(self.head_specs)

    @property
    def kind(self):
        """The head's kind (one head), or `{head: kind}`."""
        return self._per_head(lambda spec: spec.kind)

    @property
    def num_classes(self):
        """The head's number of classes (one head), or `{head: number}`."""
        return self._per_head(lambda spec: spec.num_classes)

    @property
    def class_names(self):
        """The head's class names (one head), or `{head: names or None}`."""
        return self._per_head(lambda spec: spec.class_names)

    def resolve_head(self, head: str | None, purpose: str) -> str:
        """The name of `head`, or of the only head; `purpose` says why one is needed."""
        names = self.head_names
        if head is None and len(names) > 1:
            raise ValueError(f"Received no head=; this model has heads {names}: say {purpose}.")
        head = head or names[0]
        if head not in names:
            raise ValueError(f"Received head={head!r}; this model's heads are {names}.")
        return head

    def _per_head(self, value):
        if self.single:
            return value(self.head_specs[SINGLE])
        return {n: value(spec) for n, spec in self.head_specs.items()}

    # ----------------------------------------------------------------- model
    def call(self, inputs, training=None):
        """Logits of every head: an array (one head) or `{head: logits}`."""
        features = inputs if self._features_are_inputs else self.backbone(inputs,
                                                                          training=training)
        logits = {n: head(features, training=training) for n, head in self.heads.items()}
        return logits[SINGLE] if self.single else logits

    def activate(self, logits):
        """Probabilities (regression: values) from `call`'s logits, same structure."""
        if self.single:
            return self.head_specs[SINGLE].activate(logits)
        return {n: self.head_specs[n].activate(logits[n]) for n in self.head_specs}

    @contextlib.contextmanager
    def features_as_inputs(self):
        """Within this context the model takes backbone features, not raw inputs.

        The head phase trains on cached features this way: the model (and
        every callback) is the whole model, but its backbone does not run.
        """
        self._features_are_inputs = True
        self._reset_functions()
        try:
            yield self
        finally:
            self._features_are_inputs = False
            self._reset_functions()

    def _reset_functions(self):
        # Keras traces train/test/predict functions once; a change of what
        # `call` takes needs new ones.
        self.train_function = self.test_function = self.predict_function = None

    def compile(self, optimizer="adam", loss=None, metrics=None, **kwargs):
        """Compiles with each head's loss (from logits) and metrics.

        Args:
            optimizer: a Keras optimizer or its name.
            loss: must be None: each head's loss comes from its `Head`.
            metrics: list (one head) or dict `{head: list}`, optional,
                replacing the default metrics of those heads. Metrics get
                probabilities (regression: values).
            **kwargs: passed to `keras.Model.compile` (not `loss_weights`
                nor `weighted_metrics`: set `Head(loss_weight=...)`).
        """
        for arg in ("loss_weights", "weighted_metrics"):
            if kwargs.get(arg) is not None:
                raise ValueError(
                    f"Received {arg}={kwargs[arg]!r}; a TransferModel sets loss weights "
                    "with kt.Head(loss_weight=...) and weighs metrics by head itself. "
                    "Pass per-head metrics as metrics={head: [...]}.")
            kwargs.pop(arg, None)
        if loss is not None:
            raise ValueError(f"Received loss={loss!r}; each head's loss follows its kind "
                             "(kt.Head(kind=...)), computed from logits.")
        chosen = {n: spec.metrics() for n, spec in self.head_specs.items()}
        if metrics is not None:
            chosen.update({SINGLE: list(metrics)} if self.single
                          else self._check_head_dict(metrics, "metrics"))
        if self.single:
            super().compile(optimizer=optimizer, metrics=chosen[SINGLE], **kwargs)
        else:
            super().compile(optimizer=optimizer, weighted_metrics=chosen, **kwargs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Sum over heads of `loss_weight * head loss`, each masked to its own batches."""
        if self.single:
            y, y_pred = {SINGLE: y}, {SINGLE: y_pred}
            sample_weight = None if sample_weight is None else {SINGLE: sample_weight}
        elif not isinstance(y, dict) or set(y) != set(self.head_specs):
            raise DataError(
                f"Received targets {type(y).__name__} with keys "
                f"{sorted(y) if isinstance(y, dict) else None}; a model with heads "
                f"{self.head_names} trains on batches with targets and masks for all of "
                "them. Pass data as {head name: (x, y)}.")
        total = 0.0
        trackers = dict(zip(self.head_specs, self.head_loss_trackers))
        for name, spec in self.head_specs.items():
            values = keras.ops.cast(spec.loss(y[name], y_pred[name]), "float32")
            if sample_weight is not None:
                mask = keras.ops.cast(sample_weight[name], "float32")
            else:
                mask = keras.ops.ones_like(values)
            if name in trackers:
                trackers[name].update_state(values, sample_weight=mask)
            # An empty batch (the last one of a worker) adds nothing, not NaN.
            batch = keras.ops.maximum(keras.ops.cast(keras.ops.shape(values)[0], "float32"), 1.0)
            total = total + spec.loss_weight * keras.ops.sum(values * mask) / batch
        if self.losses:
            total = total + keras.ops.sum(keras.ops.stack(
                [keras.ops.cast(v, "float32") for v in self.losses]))
        return scale_loss_for_replicas(total)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        # Metrics compare probabilities (or values), not logits.
        return super().compute_metrics(x, y, self.activate(y_pred), sample_weight)

    def _ensure_compiled(self):
        if not self.compiled:
            with model_scope(self):
                self.compile()

    # ------------------------------------------------------------------ data
    def head_data(self, x, y=None, arg: str = "x") -> dict:
        """`{head: (x, y)}` of what a user passed to `fit` or `evaluate`."""
        if self.single:
            return {SINGLE: (x, y)}
        if y is not None:
            raise DataError(f"Received y; a model with heads {self.head_names} takes its "
                            f"labels in x: x={{head name: (x, y)}}.")
        if not isinstance(x, dict):
            raise DataError(
                f"Received {arg} of type {type(x).__name__}; a model with heads "
                f"{self.head_names} takes a dict {{head name: data}}, where data is "
                f"{self.backbone.data_forms}, e.g. {{{self.head_names[0]!r}: (x, y)}}.")
        if not x:
            raise DataError(f"Received {arg}={{}}: no head has data. The heads are "
                            f"{self.head_names}.")
        self._check_head_dict(x, arg, DataError)
        fed = {}
        for name in self.head_names:
            if name not in x:
                continue
            value = x[name]
            if isinstance(value, tuple):
                if len(value) != 2:
                    raise DataError(f"Received a tuple of {len(value)} items for head "
                                    f"{name!r}; expected (x, y).")
                fed[name] = value
            else:
                fed[name] = (value, None)
        return fed

    def _check_head_dict(self, value, arg, error=ValueError) -> dict:
        if not isinstance(value, dict):
            raise TypeError(f"Received {arg}={value!r}; expected a dict {{head name: ...}} "
                            f"for the heads {self.head_names}.")
        unknown = [n for n in value if n not in self.head_specs]
        if unknown:
            import difflib

            hints = {n: difflib.get_close_matches(str(n), self.head_names, n=1) for n in unknown}
            hint = "; ".join(f"{n!r}: did you mean {h[0]!r}?" for n, h in hints.items() if h)
            raise error(f"Received {arg} for unknown head(s) {unknown}; this model's heads "
                        f"are {self.head_names}. {hint}".rstrip())
        return dict(value)

    def head_dataset(self, name, x, y=None, *, batch_size=32, training=False,
                     augmentation=None, seed=None, drop_remainder=False):
        """One head's labelled batches `(inputs, labels)`; adopts the class names the data gives."""
        spec = self.head_specs[name]
        try:
            dataset, class_names = self.backbone.make_dataset(
                x, y, head=spec, batch_size=batch_size, shuffle=training,
                augmentation=augmentation if training else None, seed=seed,
                drop_remainder=drop_remainder)
        except DataError as error:
            if self.single:
                raise
            raise DataError(f"Head {name!r}: {error}") from error
        self._adopt_class_names(name, class_names)
        return dataset

    def _adopt_class_names(self, name, class_names):
        if class_names is None:
            return
        spec = self.head_specs[name]
        where = "" if self.single else f"Head {name!r}: "
        if spec.class_names is None:
            if spec.kind != "regression" and len(class_names) != spec.num_classes:
                raise DataError(
                    f"{where}the data names {len(class_names)} classes "
                    f"{list(class_names)[:10]}, but the model has num_classes="
                    f"{spec.num_classes}.")
            spec.class_names = list(class_names)
        elif list(class_names) != list(spec.class_names):
            raise DataError(
                f"{where}the data names the classes {list(class_names)[:10]}, but this "
                f"model was built for {spec.class_names[:10]}. Rename the class folders "
                "or build the model with matching class_names.")

    def join(self, datasets: dict, *, training=False, seed=None, class_weight=None):
        """Joins `{head: batches}` into what Keras trains on; returns `(dataset, steps)`."""
        weights = self._class_weight_tables(class_weight)
        if self.single:
            dataset = datasets[SINGLE]
            if weights:
                dataset = data_lib.weigh_classes(dataset, weights[SINGLE])
            return dataset, data_lib.steps_of(dataset)
        return data_lib.join_heads(datasets, self.head_specs, training=training,
                                   sampling=self.sampling, seed=seed, class_weights=weights)

    def _class_weight_tables(self, class_weight) -> dict:
        if class_weight is None:
            return {}
        given = {SINGLE: class_weight} if self.single else self._check_head_dict(
            class_weight, "class_weight")
        tables = {}
        for name, weights in given.items():
            spec = self.head_specs[name]
            if spec.kind != "classification" or not isinstance(weights, dict):
                raise ValueError(
                    f"Received class_weight={weights!r} for a {spec.kind} head; expected "
                    "{class index: weight} for a classification head.")
            table = np.ones(spec.num_classes, np.float32)
            for index, weight in weights.items():
                if not isinstance(index, (int, np.integer)) or not 0 <= index < spec.num_classes:
                    raise ValueError(f"Received class_weight for class {index!r}; expected "
                                     f"class indices in [0, {spec.num_classes - 1}].")
                table[int(index)] = float(weight)
            tables[name] = table
        return tables

    def make_dataset(self, x, y=None, *, batch_size=32, training=False, augmentation=None,
                     seed=None, class_weight=None):
        """Turns user data into the batches Keras trains or evaluates on.

        Args:
            x, y: the data as for `fit` (several heads: `{head: (x, y)}`).
            batch_size: int. Examples per batch (each batch holds one head's data).
            training: bool. Shuffle, augment and interleave the heads.
            augmentation: Keras layer(s) for training batches (images).
            seed: int, optional. Shuffle and sampling seed.
            class_weight: dict, optional. `{class: weight}` (several heads:
                `{head: {class: weight}}`).

        Returns:
            `(dataset, steps)`: batches of `(inputs, targets[, weights])`.
        """
        datasets = {n: self.head_dataset(n, hx, hy, batch_size=batch_size, training=training,
                                         augmentation=augmentation, seed=seed)
                    for n, (hx, hy) in self.head_data(x, y).items()}
        return self.join(datasets, training=training, seed=seed, class_weight=class_weight)

    # ------------------------------------------------------------- training
    def find_learning_rate(self, x=None, y=None, **options):
        """The learning-rate finder; the model is left exactly as it was.

        A thin delegate: see `keras_transfer.lr_finder.find_learning_rate`
        for the options (`unfreeze="all"` for the fine-tuning rate, `plot=`).

        Returns:
            A `lr_finder.LearningRateFinding` (its `suggestion`, the curve).
        """
        from keras_transfer.lr_finder import find_learning_rate

        return find_learning_rate(self, x, y, **options)

    @data_lib.warns_once
    def fit(self, x=None, y=None, *, validation_data=None, phases=None, head_epochs=None,
            fine_tune_epochs=None, epochs=None, batch_size=32, augmentation=None,
            callbacks=None, class_weight=None, shuffle=True, seed=None, backup_dir=None,
            verbose="auto"):
        """Trains in phases: the heads on the frozen backbone, then fine-tuning.

        Args:
            x: the training data: arrays, a `tf.data.Dataset` of `(input,
                label)`, an image folder or `"tfds:<name>"`, a list of texts or
                a CSV/TSV file; with several heads, a dict `{head: data}`
                (data `(x, y)` or one of the above; heads left out are not
                trained).
            y: labels when `x` is an array or a list (one head only).
            validation_data: `(x, y)` or anything `x` can be.
            phases: list of `HeadPhase` / `FineTunePhase` objects, run in
                order; they hold every training option (learning rates,
                unfreezing, warmup, early stopping, feature cache, LoRA).
            head_epochs: int. Shorthand for `phases=[HeadPhase(epochs=...)]`.
            fine_tune_epochs: int. Shorthand adding `FineTunePhase(epochs=...)`.
            epochs: int. Keras-style shorthand: the head phase only.
            batch_size: int. Examples per batch: the global batch, split over
                the replicas of a strategy.
            augmentation: Keras layer(s) applied to training images.
            callbacks: list of Keras callbacks, used in every phase; they see
                the whole model.
            class_weight: dict `{class index: weight}` (several heads:
                `{head: {class index: weight}}`).
            shuffle: bool. Shuffle the training data every epoch (epoch e's
                order depends on the seed and e only).
            seed: int, optional. Shuffle and sampling seed (None: drawn from
                Python's `random`, which `keras.utils.set_random_seed` seeds;
                with several workers, 0).
            backup_dir: str, optional. A folder (new, empty, or one this
                method wrote before) where the run saves its state after
                every epoch and phase. Run the same command again after a
                crash and it goes on from the last saved epoch in the right
                phase, with the optimizer, learning-rate schedule and history
                restored (see `keras_transfer.backup`). Nothing else in the
                folder is ever removed.
            verbose: as for `keras.Model.fit`.

        Returns:
            A `TransferHistory` covering every phase.

        Example:
            >>> model = kt.ImageTransferModel("mobilenet_v2", num_classes=5, weights=None,
            ...                               input_shape=(32, 32, 3))
            >>> history = model.fit(train, validation_data=val,
            ...                     head_epochs=5, fine_tune_epochs=5, verbose=0)
            >>> history = model.fit(train, phases=[
            ...     kt.HeadPhase(epochs=5),
            ...     kt.FineTunePhase(epochs=10, learning_rate=2e-5, unfreeze=20)], verbose=0)
        """
        phases = resolve_phases(phases, head_epochs, fine_tune_epochs, epochs,
                                         pretrained=getattr(self.backbone, "pretrained", True),
                                         verbose=verbose)
        fit_data = training.FitData(
            model=self, train=self.head_data(x, y),
            validation=None if validation_data is None else self.head_data(
                *_split_xy(validation_data), arg="validation_data"),
            batch_size=batch_size, augmentation=augmentation, class_weight=class_weight,
            shuffle=shuffle, seed=seed, backup_dir=backup_dir)
        self._fitting = True
        try:
            history = training.run_phases(self, fit_data, phases, callbacks or [], verbose)
        finally:
            self._fitting = False
            fit_data.close()
        self.history = history
        return history

    @data_lib.warns_once
    def evaluate(self, x=None, y=None, *, batch_size=32, verbose=0, **kwargs):
        """Evaluates on data of any supported kind.

        Returns:
            One head: a dict of metric values, e.g. `{"loss": 0.3,
            "accuracy": 0.9}`. Several heads: `{head: {"loss": ...,
            metric: ...}}` for the heads given data, each counting its own
            examples only.
        """
        if self._fitting:  # Keras fit's validation pass: the data is already batched
            return super().evaluate(x, y, verbose=verbose, **kwargs)
        dataset, _ = self.make_dataset(x, y, batch_size=batch_size)
        self._ensure_compiled()
        results = super().evaluate(dataset, verbose=verbose, return_dict=True, **kwargs)
        if self.single:
            return {k: float(v) for k, v in results.items()}
        fed = self.head_data(x, y)
        per_head = {n: {} for n in fed}
        for key, value in results.items():
            owner = head_of_key(key, self.head_names)
            if owner in per_head:
                per_head[owner][key[len(owner) + 1:]] = float(value)
        return per_head

    @data_lib.warns_once
    def predict(self, x, *, batch_size=32, verbose=0, **kwargs):
        """Predicts probabilities (regression: values).

        Args:
            x: inputs without labels, in any form `fit` takes for one head.
            batch_size: int.
            verbose: as for `keras.Model.predict`.

        Returns:
            One head: an array `(N, num_classes)`. Several heads:
            `{head: array}`.
        """
        if isinstance(x, dict):
            raise DataError("Received a dict; predict takes inputs only (no head names) "
                            "and returns every head's outputs for them.")
        dataset = self.backbone.predict_dataset(x, batch_size=batch_size)
        logits = super().predict(dataset, verbose=verbose, **kwargs)
        outputs = self.activate(logits)
        if self.single:
            return np.asarray(outputs)
        return {n: np.asarray(outputs[n]) for n in self.head_names}

    # ----------------------------------------------------------------- LoRA
    def save_adapters(self, path: str) -> str:
        """Saves the LoRA adapters and the heads, nothing else.

        Args:
            path: str. A file name ending in `.lora.h5`.

        Returns:
            The path written (a few MB at most, not the whole backbone).
        """
        import h5py

        if getattr(self.backbone, "lora_rank", None) is None:
            raise ValueError("No adapters to save: fine-tune with "
                             "FineTunePhase(lora_rank=...) first (or backbone.enable_lora).")
        if not str(path).endswith(".lora.h5"):
            raise ValueError(f"Received path={path!r}; adapter files end in '.lora.h5'.")
        self.backbone.network.save_lora_weights(path)
        with h5py.File(path, "a") as file:
            for name, head in self.heads.items():
                for i, weight in enumerate(head.weights):
                    file[f"heads/{name}/{i}"] = keras.ops.convert_to_numpy(weight)
        return path

    def load_adapters(self, path: str) -> None:
        """Loads adapters and heads saved by `save_adapters` into this model."""
        import h5py

        if not os.path.isfile(path):
            raise ValueError(f"Received adapter file {path!r}, which does not exist.")
        with h5py.File(path, "r") as file:
            rank = int(file["lora/vars/rank"][()])
            saved = {name: [np.asarray(file[f"heads/{name}/{i}"])
                            for i in range(len(file[f"heads/{name}"]))]
                     for name in file["heads"]}
        if sorted(saved) != sorted(self.heads):
            raise ValueError(f"The adapter file {path!r} holds heads {sorted(saved)}; this "
                             f"model has {sorted(self.heads)}.")
        for name, weights in saved.items():
            if [w.shape for w in weights] != [tuple(w.shape) for w in self.heads[name].weights]:
                raise ValueError(f"The head {name!r} in {path!r} does not fit this model's "
                                 "head (different num_classes or hidden_units).")
        self.backbone.enable_lora(rank)
        self.backbone.network.load_lora_weights(path)
        for name, weights in saved.items():
            self.heads[name].set_weights(weights)

    # ---------------------------------------------------------------- export
    def serving_endpoints(self) -> dict:
        """`{signature name: (function, input_signature)}`: raw inputs in.

        One head returns `{"probabilities": ...}` (regression:
        `"predictions"`); several return `{head: ...}`.
        """
        def predict(inputs):
            outputs = self.activate(self(inputs, training=False))
            if self.single:
                return {self.head_specs[SINGLE].output: outputs}
            return outputs

        return self.backbone.serving_endpoints(predict)

    def export_metadata(self) -> dict:
        """What `metadata.json` says about the model, its backbone and heads."""
        heads = {n: {**spec.get_config(), "output": spec.output}
                 for n, spec in self.head_specs.items()}
        return {
            **self.backbone.metadata(),
            "task": self.kind if self.single else "multitask",
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "output": self._per_head(lambda spec: spec.output),
            "heads": heads,
        }

    def export(self, path, *, overwrite=False, metrics=None, verify=True) -> str:
        """Exports a SavedModel for serving, preprocessing inside.

        Args:
            path: str. The export folder (created; must not exist unless
                `overwrite=True`).
            overwrite: bool. Replace an existing export (only ever a folder
                that holds a SavedModel); the old one is kept until the new
                one is complete.
            metrics: dict, optional. Evaluation results for `metadata.json`
                (as `evaluate` returns them).
            verify: bool. Reload the written SavedModel and check its
                signatures before it replaces anything.

        Returns:
            The path of the export; None on a worker that is not the chief
            of a multi-worker strategy (it writes to a temporary folder it
            deletes: every worker takes part in saving, only the chief keeps
            a copy).

        Raises:
            ExportError: Keras runs on another backend than TensorFlow (then
                save a `.keras` file and export it with `keras-transfer
                export`), or `path` cannot be written; nothing is written.

        Example:
            >>> model.export("saved_models/flowers")
            '.../saved_models/flowers'
            >>> serve = tf.saved_model.load("saved_models/flowers").signatures["serving_default"]
        """
        from keras_transfer.export import check_backend, export_saved_model

        check_backend()  # before a worker's scratch export, too

        flat = {}
        for key, value in (metrics or {}).items():
            if isinstance(value, dict):
                flat.update({f"{key}_{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        if not is_chief(strategy_of(self)):
            with tempfile.TemporaryDirectory(prefix="keras_transfer-worker-export-") as scratch:
                export_saved_model(self, os.path.join(scratch, "export"), metrics=flat,
                                   verify=False)
            return None
        return export_saved_model(self, path, overwrite=overwrite, metrics=flat, verify=verify)

    # ---------------------------------------------------------------- config
    @property
    def _default_save_signature(self):
        # Keras would trace a default SavedModel signature from the build
        # shapes; exports carry explicit raw-input signatures instead.
        return None

    def get_compile_config(self):
        # Every phase compiles with a fresh optimizer: a saved model keeps no
        # compile state (`evaluate` compiles the defaults when needed).
        return {}

    def compile_from_config(self, config):
        if config:
            self.compile(**keras.saving.deserialize_keras_object(config))

    def get_config(self):
        return {
            "name": self.name,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "heads": (self.head_specs[SINGLE].get_config() if self.single else
                      {n: spec.get_config() for n, spec in self.head_specs.items()}),
            "sampling": self.sampling,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        backbone = keras.saving.deserialize_keras_object(config.pop("backbone"))
        heads = config.pop("heads")
        heads = Head.from_config(heads) if "num_classes" in heads else {
            n: Head.from_config(h) for n, h in heads.items()}
        # Subclasses (ImageTransferModel, ...) only add a constructor; their
        # state is that of a TransferModel.
        model = cls.__new__(cls)
        TransferModel.__init__(model, backbone, heads, **config)
        return model


def heads_argument(num_classes, heads, **head_arguments):
    """The `heads` argument of `TransferModel` from a thin constructor's arguments."""
    if heads is not None:
        if num_classes is not None:
            raise ValueError(f"Received num_classes={num_classes!r} and heads=...; give "
                             "num_classes (one head) or heads={name: kt.Head(...)}, not both.")
        return check_tasks(heads)
    if num_classes is None:
        raise ValueError("Received neither num_classes nor heads; give num_classes=N (one "
                         "head) or heads={name: kt.Head(...)} (several).")
    return Head(num_classes, **head_arguments)


def check_tasks(tasks) -> dict:
    """`tasks` of the multi-task constructors, checked to be a non-empty dict."""
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError(f"Received tasks={tasks!r}; expected a non-empty dict "
                         "{name: kt.Head(...)}, e.g. {'digits': kt.Head(num_classes=10)}.")
    return tasks


def _check_heads(heads) -> dict:
    import re

    if not isinstance(heads, dict) or not heads:
        raise ValueError(f"Received heads={heads!r}; expected a kt.Head or a non-empty dict "
                         "{name: kt.Head(...)}, e.g. {'digits': kt.Head(num_classes=10)}.")
    for name in heads:
        if not isinstance(name, str) or not re.match(r"^[A-Za-z][A-Za-z0-9_]*$", name):
            raise ValueError(
                f"Received head name {name!r}; expected an identifier (a letter, then "
                "letters, digits or underscores), e.g. 'digits'. It becomes an output key "
                "and a metric prefix.")
    return {n: as_head(n, h) for n, h in heads.items()}


def _split_xy(data):
    if isinstance(data, tuple) and len(data) == 2:
        return data
    return data, None
