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

`fit` hands over to the trainer (`trainer.fit`: the phases, one after the
other); user data reaches the heads through `routing.py`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Sequence

import keras
import numpy as np

from keras_transfer import adapters, backend, distribute, lr_finder, routing, trainer
from keras_transfer import data as data_lib
from keras_transfer import export as export_lib
from keras_transfer.contracts import BackboneComponent, Phase
from keras_transfer.errors import DataError
from keras_transfer.heads import (SINGLE, Head, as_head, check_compile_arguments, check_heads,
                                  heads_loss)
from keras_transfer.training import TransferHistory, scale_loss_for_replicas


@keras.saving.register_keras_serializable(package="keras_transfer")
class TransferModel(distribute.MultiWorkerFitMixin, keras.Model):
    """A backbone component with one or several heads, trained in phases.

    Args:
        backbone: an `ImageBackbone` or `TextBackbone` (any
            `contracts.BackboneComponent`), or a function that
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

    def __init__(self, backbone: BackboneComponent | Callable[[], BackboneComponent], heads,
                 *, sampling="round_robin", strategy=None, name=None, **kwargs):
        strategy = distribute.get_strategy(strategy)
        with distribute.scope(strategy):
            if callable(backbone) and not isinstance(backbone, keras.layers.Layer):
                backbone = backbone()
            distribute.check_built_in_scope(backbone, strategy)
            super().__init__(name=name or "transfer_model", **kwargs)
            if strategy is not None and not backend.is_tensorflow():
                self._keras_distribution = strategy  # TensorFlow's lives on the model
            self.single = isinstance(heads, Head)
            specs = {SINGLE: as_head(SINGLE, heads)} if self.single else check_heads(heads)
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
    def strategy(self):
        """The strategy (TensorFlow) or Keras distribution (JAX) it was built in, or None."""
        return distribute.strategy_of(self)

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
        if callable(self._features_are_inputs):  # the inputs are a cached bottom's outputs
            features = self._features_are_inputs(inputs, training=training)
        logits = {n: head(features, training=training) for n, head in self.heads.items()}
        return logits[SINGLE] if self.single else logits

    def activate(self, logits):
        """Probabilities (regression: values) from `call`'s logits, same structure."""
        if self.single:
            return self.head_specs[SINGLE].activate(logits)
        return {n: self.head_specs[n].activate(logits[n]) for n in self.head_specs}

    @contextlib.contextmanager
    def features_as_inputs(self, top=None):
        """Within this context the model takes backbone features, not raw inputs.

        The head phase trains on cached features this way: the model (and
        every callback) is the whole model, but its backbone does not run.

        Args:
            top: callable `(inputs, training) -> features`, optional. The
                inputs are then what `top` takes: a fine-tune phase trains
                the unfrozen top of the network on its frozen bottom's cached
                outputs (`fine_tune_cache`).
        """
        self._features_are_inputs = top or True
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
        check_compile_arguments(loss, kwargs)
        chosen = {n: spec.metrics() for n, spec in self.head_specs.items()}
        if metrics is not None:
            chosen.update({SINGLE: list(metrics)} if self.single
                          else routing.check_head_dict(self, metrics, "metrics"))
        if self.single:
            super().compile(optimizer=optimizer, metrics=chosen[SINGLE], **kwargs)
        else:
            super().compile(optimizer=optimizer, weighted_metrics=chosen, **kwargs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Sum over heads of `loss_weight * head loss`, each masked to its own batches."""
        if self.single:
            y, y_pred = {SINGLE: y}, {SINGLE: y_pred}
            sample_weight = None if sample_weight is None else {SINGLE: sample_weight}
        else:
            routing.check_targets(self, y)
        total = heads_loss(self.head_specs, y, y_pred, sample_weight,
                           dict(zip(self.head_specs, self.head_loss_trackers)))
        if self.losses:
            total = total + keras.ops.sum(keras.ops.stack(
                [keras.ops.cast(v, "float32") for v in self.losses]))
        return scale_loss_for_replicas(total)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        # Metrics compare probabilities (or values), not logits.
        return super().compute_metrics(x, y, self.activate(y_pred), sample_weight)

    def _ensure_compiled(self):
        if not self.compiled:
            with distribute.model_scope(self):
                self.compile()

    # ------------------------------------------------------ data, LoRA files
    # Functions of the model written in their own modules, bound as methods.
    head_data = routing.head_data
    head_dataset = routing.head_dataset
    make_dataset = routing.make_dataset
    save_adapters = adapters.save_adapters
    load_adapters = adapters.load_adapters

    # ------------------------------------------------------------- training
    find_learning_rate = lr_finder.find_learning_rate  # leaves the model as it was

    @data_lib.warns_once
    def fit(self, x=None, y=None, *, validation_data=None,
            phases: Sequence[Phase] | Phase | None = None, head_epochs=None,
            fine_tune_epochs=None, epochs=None, batch_size=32, augmentation=None,
            callbacks=None, class_weight=None, shuffle=True, seed=None, backup_dir=None,
            verbose="auto") -> TransferHistory:
        """Trains in phases: the heads on the frozen backbone, then fine-tuning.

        Args:
            x: the training data: arrays, a `tf.data.Dataset` of `(input,
                label)`, an image folder or `"tfds:<name>"`, a list of texts or
                a CSV/TSV file; with several heads, a dict `{head: data}`
                (data `(x, y)` or one of the above; heads left out are not
                trained).
            y: labels when `x` is an array or a list (one head only).
            validation_data: `(x, y)` or anything `x` can be.
            phases: list of `HeadPhase` / `FineTunePhase` objects (or any
                `contracts.Phase`), run in order; they hold every training
                option (learning rates, unfreezing, warmup, early stopping,
                feature cache, LoRA).
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
        self.history = trainer.fit(
            self, x, y, validation_data=validation_data, phases=phases,
            head_epochs=head_epochs, fine_tune_epochs=fine_tune_epochs, epochs=epochs,
            batch_size=batch_size, augmentation=augmentation, callbacks=callbacks,
            class_weight=class_weight, shuffle=shuffle, seed=seed, backup_dir=backup_dir,
            verbose=verbose)
        return self.history

    def fit_batches(self, batches, **kwargs):
        """Keras's own `fit` on batches already made (`make_dataset`): one phase's loop.

        `fit` is the phased recipe on user data; a phase (`training.fit_phase`)
        runs Keras's loop through this method.
        """
        return super().fit(batches, **kwargs)

    def evaluate_batches(self, batches, y=None, **kwargs):
        """Keras's own `evaluate` on batches already made (phases, their callbacks)."""
        return super().evaluate(batches, y, **kwargs)

    @data_lib.warns_once
    def evaluate(self, x=None, y=None, *, batch_size=32, verbose=0, **kwargs):
        """Evaluates on data of any supported kind.

        Returns:
            One head: a dict of metric values, e.g. `{"loss": 0.3,
            "accuracy": 0.9}`. Several heads: `{head: {"loss": ...,
            metric: ...}}` for the heads given data, each counting its own
            examples only.
        """
        if kwargs.get("_use_cached_eval_dataset"):
            # Keras's own `fit` (`fit_batches`) evaluates its validation batches
            # through this method, with this flag: they are batches already.
            return self.evaluate_batches(x, y, verbose=verbose, **kwargs)
        dataset, _ = self.make_dataset(x, y, batch_size=batch_size)
        self._ensure_compiled()
        results = super().evaluate(dataset, verbose=verbose, return_dict=True, **kwargs)
        if self.single:
            return {k: float(v) for k, v in results.items()}
        return routing.results_by_head(self, results, fed=self.head_data(x, y))

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

    export_metadata = export_lib.model_metadata  # what metadata.json says

    def export(self, path, *, overwrite=False, metrics=None, verify=True, format="saved_model",
               quantize=None, representative_data=None, evaluation_data=None) -> str:
        """Exports a SavedModel (or an ONNX or LiteRT file) for serving, preprocessing inside.

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
            format: str. `"saved_model"`, `"onnx"` or `"litert"` (see
                `keras_transfer.export_formats`).
            quantize, representative_data, evaluation_data: LiteRT
                quantization, the inputs int8 calibrates on, and held-out
                `(x, y)` whose accuracy goes into the metadata (see
                `keras_transfer.export.export_model`).

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
        export_lib.check_backend(format)  # before a worker's scratch export, too
        if not distribute.is_chief(distribute.strategy_of(self)):
            with tempfile.TemporaryDirectory(prefix="keras_transfer-worker-export-") as scratch:
                export_lib.export_saved_model(self, os.path.join(scratch, "export"),
                                              metrics=metrics, verify=False)
            return None
        return export_lib.export_model(
            self, path, format=format, overwrite=overwrite, metrics=metrics, verify=verify,
            quantize=quantize, representative_data=representative_data,
            evaluation_data=evaluation_data)

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
