"""The generic transfer model: preprocessing, a frozen backbone and a head.

`TransferModel` is a `keras.Model`. Its `call` runs the preprocessing layer,
the backbone (in inference mode unless BatchNormalization training was asked
for) and the head. Its `fit` runs the two phases of transfer learning and
returns one combined history. Subclasses (`ImageTransferModel`) say how to
build the backbone and preprocessing, how to turn user data into batches and
which serving signatures the export has.
"""

from __future__ import annotations

import logging

import keras
import numpy as np

from keras_transfer import features, heads, training
from keras_transfer.distribute import get_strategy, scope
from keras_transfer.errors import DataError

logger = logging.getLogger("keras_transfer")


class PhasedModel(keras.Model):
    """A model whose training phases each compile with a fresh optimizer.

    A saved model therefore keeps no compile state: the last phase's
    optimizer would not fit the freshly frozen model that loads, and
    `evaluate` compiles the defaults when needed.
    """

    def get_compile_config(self):
        return {}

    def compile_from_config(self, config):
        if config:
            self.compile(**keras.saving.deserialize_keras_object(config))


class TransferModel(PhasedModel):
    """Backbone + head, trained in two phases. Base of the image and text models.

    Args:
        num_classes: int. The number of classes to predict (outputs for
            regression).
        task: str. `"classification"` (softmax), `"multilabel"` (sigmoid) or
            `"regression"` (linear).
        pooling: str. Head pooling: `"flatten"` (the classic Flatten ->
            Dense), `"avg"` or `"max"`.
        hidden_units: sequence of int. Hidden Dense layers of the head.
        dropout: float. Dropout rate in the head.
        class_names: list of str, optional. Names of the classes, in order.
        **kwargs: passed to `keras.Model` (e.g. `name`).
    """

    def __init__(self, num_classes, task="classification", pooling="flatten",
                 hidden_units=(), dropout=0.0, class_names=None, **kwargs):
        super().__init__(**kwargs)
        heads.check_task(task, num_classes)
        self.num_classes = num_classes
        self.task = task
        self.pooling = pooling
        self.hidden_units = tuple(int(u) for u in hidden_units)
        self.dropout = float(dropout)
        self.class_names = self._check_class_names(class_names)
        self.train_batchnorm = False

    def _check_class_names(self, class_names):
        if class_names is None:
            return None
        class_names = [str(c) for c in class_names]
        if self.task != "regression" and len(class_names) != self.num_classes:
            raise ValueError(
                f"Received {len(class_names)} class names {class_names[:10]} for "
                f"num_classes={self.num_classes}; give one name per class."
            )
        return class_names

    def _attach(self, preprocessor, backbone, input_shape):
        """Adds the head on top of `backbone`, builds, and freezes the backbone."""
        self.preprocessor = preprocessor
        self.backbone = backbone
        self.head = heads.build_head(self.num_classes, self.task, self.pooling,
                                     self.hidden_units, self.dropout)
        self.build((None, *input_shape))
        training.freeze(self.backbone)

    def build(self, input_shape):
        features = self.backbone.compute_output_shape(
            self.preprocessor.compute_output_shape(input_shape))
        self.head.build(features)
        self.built = True

    def call(self, inputs, training=None):
        return self.head(self.head_inputs(inputs, training=training), training=training)

    def head_inputs(self, inputs, training=None):
        """What the head takes: the backbone's features of raw inputs.

        The backbone runs in inference mode unless the user asked to train
        BatchNormalization: Dropout and BN statistics stay as pretrained.
        The feature cache stores exactly these.
        """
        x = self.preprocessor(inputs)
        return self.backbone(x, training=training if self.train_batchnorm else False)

    @property
    def _default_save_signature(self):
        # Keras traces a default signature from the build shapes when a
        # SavedModel is written; ours has explicit raw-input signatures, and
        # a text model's build shape is no tensor spec.
        return None

    # ----------------------------------------------------------- data hooks
    def make_dataset(self, x, y=None, *, batch_size=32, training=False,
                     augmentation=None, seed=None):
        """Turns user data into batches. Subclasses implement this.

        Returns:
            `(tf.data.Dataset, source)` where `source.class_names` may name
            the classes.
        """
        raise NotImplementedError

    def serving_endpoints(self) -> dict:
        """`{signature name: (function, input_signature)}` for export."""
        raise NotImplementedError

    def export_metadata(self) -> dict:
        """What `metadata.json` says about this model, beyond the basics."""
        return {}

    # ------------------------------------------------------------- training
    def fit(self, x=None, y=None, *, validation_data=None, head_epochs=5,
            fine_tune_epochs=0, epochs=None, batch_size=32,
            head_learning_rate=1e-3, fine_tune_learning_rate=1e-5,
            unfreeze="all", train_batchnorm=False, warmup_fraction=0.1,
            decay="cosine", early_stopping=None, augmentation=None,
            callbacks=None, shuffle=True, seed=None, verbose="auto",
            feature_cache="auto", augmented_copies=0, cache_dir=None):
        """Trains the head on the frozen backbone, then fine-tunes.

        Args:
            x: the training data: arrays, a `tf.data.Dataset` of
                `(input, label)`, or (images) a folder or `"tfds:<name>"`.
            y: labels when `x` is an array.
            validation_data: `(x, y)` or anything `x` can be.
            head_epochs: int. Epochs of phase 1 (backbone frozen).
            fine_tune_epochs: int. Epochs of phase 2 (backbone unfrozen);
                0 skips it.
            epochs: int, optional. Keras-style alias: `head_epochs=epochs`
                and no fine-tuning.
            batch_size: int.
            head_learning_rate: float. Adam learning rate of phase 1.
            fine_tune_learning_rate: float. Peak Adam learning rate of
                phase 2 (default 1e-5), reached after warmup, then decayed.
            unfreeze: `"all"`, an int N (top N layers with weights) or a
                layer name (from that layer on) for phase 2.
            train_batchnorm: bool. Let BatchNormalization layers train and
                update their statistics in phase 2. Off by default.
            warmup_fraction: float. Share of phase 2 spent warming up.
            decay: str. `"cosine"` or `"linear"` decay after warmup.
            early_stopping: int, optional. Patience in epochs; each phase
                stops when the validation loss (or the loss) stops falling
                and restores its best weights.
            augmentation: Keras layer(s) applied to training batches.
            callbacks: list of Keras callbacks, used in both phases.
            shuffle: bool. Shuffle the training data every epoch.
            seed: int, optional. Shuffle seed.
            verbose: as for `keras.Model.fit`.
            feature_cache: `"auto"`, `True` or `False`. Train the head on
                backbone features computed once and cached on disk (see
                `keras_transfer.features`) instead of running the frozen
                backbone every epoch. `"auto"` (default): cache when nothing
                random happens to the inputs (or `augmented_copies` > 0);
                with random augmentation and `augmented_copies=0` the
                backbone runs every epoch, as the log says. `True` makes
                that last case an error; `False` never caches. While the
                head trains on cached features, callbacks see `self.head`.
            augmented_copies: int. With `augmentation` and the feature
                cache: cache this many augmented copies of the data; epoch
                i trains on copy i % K.
            cache_dir: str, optional. Root of the feature cache (default
                `$KERAS_TRANSFER_CACHE`, else
                `~/.cache/keras_transfer/features`).

        Returns:
            A `TransferHistory` covering both phases.

        Example:
            >>> model = kt.ImageTransferModel("mobilenet_v2", num_classes=5)
            >>> history = model.fit(train, validation_data=val,
            ...                     head_epochs=5, fine_tune_epochs=5)
        """
        head_epochs, fine_tune_epochs = training.check_phase_arguments(
            head_epochs, fine_tune_epochs, epochs, warmup_fraction)
        train, source = self.make_dataset(x, y, batch_size=batch_size, training=shuffle,
                                          augmentation=augmentation, seed=seed)
        self._adopt_class_names(source.class_names)
        validation = None
        if validation_data is not None:
            vx, vy = (validation_data if isinstance(validation_data, tuple)
                      else (validation_data, None))
            validation, _ = self.make_dataset(vx, vy, batch_size=batch_size)
        steps = training.steps_per_epoch(train)
        if steps == 0:
            raise DataError("The training data is empty: it yields no batches.")

        train_head = None
        if head_epochs and features.use_feature_cache(feature_cache, augmentation,
                                                      augmented_copies):
            def train_head():
                return features.train_head_on_features(
                    self, x, y, validation_data=validation_data, epochs=head_epochs,
                    batch_size=batch_size, learning_rate=head_learning_rate,
                    callbacks=list(callbacks or []), early_stopping=early_stopping,
                    cache_dir=cache_dir, augmentation=augmentation,
                    augmented_copies=augmented_copies, shuffle=shuffle, seed=seed,
                    verbose=verbose)

        history = training.train_two_phases(
            self, train, validation, steps=steps, head_epochs=head_epochs,
            fine_tune_epochs=fine_tune_epochs, head_learning_rate=head_learning_rate,
            fine_tune_learning_rate=fine_tune_learning_rate,
            warmup_fraction=warmup_fraction, decay=decay,
            loss=heads.default_loss(self.task),
            make_metrics=lambda: heads.default_metrics(self.task),
            prepare_fine_tuning=lambda: self._unfreeze_for_fine_tuning(unfreeze, train_batchnorm),
            callbacks=list(callbacks or []), early_stopping=early_stopping, verbose=verbose,
            train_head=train_head)
        self.history = history
        return history

    def _unfreeze_for_fine_tuning(self, unfreeze, train_batchnorm):
        """Makes the weights that phase 2 trains trainable."""
        training.unfreeze(self.backbone, unfreeze, train_batchnorm)
        self.train_batchnorm = bool(train_batchnorm)

    def _adopt_class_names(self, class_names):
        if class_names is None:
            return
        if self.class_names is None:
            self.class_names = self._check_class_names(class_names)
        elif list(class_names) != list(self.class_names):
            raise DataError(
                f"The data names the classes {list(class_names)[:10]}, but this "
                f"model was built for {self.class_names[:10]}. Rename the class "
                "folders or build the model with matching class_names."
            )

    def _ensure_compiled(self):
        if not self.compiled:
            with self.distribute_strategy.scope():
                self.compile(loss=heads.default_loss(self.task),
                             metrics=heads.default_metrics(self.task))

    def evaluate(self, x=None, y=None, *, batch_size=32, verbose=0, **kwargs):
        """Evaluates on data of any supported kind.

        Returns:
            A dict of metric values, e.g. `{"loss": 0.3, "accuracy": 0.9}`.
        """
        if kwargs.get("_use_cached_eval_dataset"):  # Keras fit's validation pass
            return keras.Model.evaluate(self, x, y, batch_size=batch_size,
                                        verbose=verbose, **kwargs)
        dataset, _ = self.make_dataset(x, y, batch_size=batch_size)
        self._ensure_compiled()
        return keras.Model.evaluate(self, dataset, verbose=verbose,
                                    return_dict=True, **kwargs)

    def predict(self, x, *, batch_size=32, verbose=0, **kwargs) -> np.ndarray:
        """Predicts class probabilities (or regression outputs).

        Returns:
            A numpy array of shape `(N, num_classes)`.
        """
        dataset, _ = self.make_dataset(x, None, batch_size=batch_size)
        dataset = dataset.map(lambda inputs, _labels: inputs)
        return keras.Model.predict(self, dataset, verbose=verbose, **kwargs)

    def export(self, path, *, overwrite=False, metrics=None, verify=True) -> str:
        """Exports a SavedModel for serving, preprocessing inside.

        Args:
            path: str. The export folder (created; must not exist unless
                `overwrite=True`).
            overwrite: bool. Replace an existing export (only ever a folder
                that holds a SavedModel); the old one is kept until the new
                one is complete.
            metrics: dict, optional. Evaluation results for `metadata.json`.
            verify: bool. Reload the written SavedModel and check its
                signatures before it replaces anything.

        Returns:
            The path of the export.
        """
        from keras_transfer.export import export_saved_model

        return export_saved_model(self, path, overwrite=overwrite,
                                  metrics=metrics, verify=verify)

    def get_config(self):
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "task": self.task,
            "pooling": self.pooling,
            "hidden_units": list(self.hidden_units),
            "dropout": self.dropout,
            "class_names": self.class_names,
        }


def strategy_scope(strategy):
    """Resolves `strategy` and returns `(strategy, its scope)`."""
    strategy = get_strategy(strategy)
    return strategy, scope(strategy)
