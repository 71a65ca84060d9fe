"""Images: the `ImageBackbone` component and the image transfer models.

Every model takes raw RGB pixels in 0-255 and does the backbone's own
preprocessing inside (`image_preprocessing.ImagePreprocessing`), so a SavedModel export serves
raw images without any client-side code.
"""

from __future__ import annotations

import copy

import keras

from keras_transfer import backbones as registry
from keras_transfer.backend import tensorflow
from keras_transfer.errors import BackboneError, DataError
from keras_transfer.heads import check_tasks, heads_argument
from keras_transfer.image_data import make_image_dataset
from keras_transfer.image_preprocessing import ImagePreprocessing
from keras_transfer.model import TransferModel
from keras_transfer.training import architecture_config
from keras_transfer.training import unfreeze as unfreeze_network

@keras.saving.register_keras_serializable(package="keras_transfer")
class ImageBackbone(keras.layers.Layer):
    """The image side of a transfer model: preprocessing, the pretrained network, data, serving.

    It takes raw RGB pixels in 0-255, applies the preprocessing the network's
    weights expect and returns the network's feature map. It also turns image
    data (arrays, `tf.data`, folders, TFDS) into batches and gives the
    serving signatures of an export (raw uint8 images of any size, or
    encoded image bytes).

    Args:
        backbone: str or keras.Model. A registry name (see
            `list_backbones()`), or any Keras model that maps images to a
            feature map, e.g. one you pretrained yourself.
        weights: `"imagenet"` (downloaded by Keras), `None` (random), or the
            path of a weights file loaded by layer name. Ignored for a
            `keras.Model` backbone, which keeps its own weights.
        input_shape: tuple `(height, width, 3)` or an int side. Defaults to
            the backbone's default size (or the model's input shape).
        cut_layer: str, optional. For a `keras.Model` backbone: the layer
            whose output becomes the feature map (drop everything after it).
        preprocessing: str, optional. For a `keras.Model` backbone: one of
            `"caffe"`, `"tf"`, `"torch"`, `"none"` (default `"none"`: the
            model gets raw 0-255 pixels).
        weights_source: str, optional. Where the pretrained weights came
            from, recorded in the export metadata (defaults to `weights`).
        train_batchnorm: bool. Run the network in training mode when the
            model trains (BatchNormalization updates its statistics).
            Set by `FineTunePhase(train_batchnorm=True)`; off otherwise.

    Example:
        >>> backbone = kt.ImageBackbone("mobilenet_v2", weights=None, input_shape=(96, 96, 3))
        >>> backbone.feature_shape
        (3, 3, 1280)
    """

    data_forms = "(images, labels), a tf.data.Dataset of (image, label) or an image folder"
    lora_rank = None  # (contracts.BackboneComponent) no LoRA on image networks

    def __init__(self, backbone="mobilenet_v2", *, weights="imagenet", input_shape=None,
                 cut_layer=None, preprocessing=None, weights_source=None,
                 train_batchnorm=False, **kwargs):
        kwargs.setdefault("name", "backbone")
        super().__init__(**kwargs)
        network, self.spec, self.backbone_name, mode, input_shape, source = \
            resolve_image_backbone(backbone, weights, input_shape, cut_layer, preprocessing,
                                   weights_source)
        self.network = network
        self.input_shape_ = tuple(input_shape)
        self.preprocessing = mode
        self.weights_source = source
        self.train_batchnorm = bool(train_batchnorm)
        self.preprocessor = ImagePreprocessing(mode, name="preprocessing")
        self.feature_shape = tuple(network.compute_output_shape((None, *self.input_shape_))[1:])
        self.built = True

    @property
    def pretrained(self) -> bool:
        """False for a registry network built with random weights (`weights=None`).

        `fit` then trains it end to end by default (a frozen random backbone
        is not transfer learning). A `keras.Model` backbone counts as
        pretrained: it comes with whatever weights it has.
        """
        return self.spec is None or self.weights_source is not None

    @property
    def image_size(self) -> tuple[int, int]:
        """`(height, width)` of the model input."""
        return self.input_shape_[:2]

    def call(self, images, training=None):
        # The network runs in inference mode unless BatchNormalization
        # training was asked for: Dropout and BN statistics stay as pretrained.
        x = self.preprocessor(images)
        return self.network(x, training=training if self.train_batchnorm else False)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.feature_shape)

    # -------------------------------------------------------------- training
    def freeze(self) -> None:
        """Freezes every weight; the network runs in inference mode."""
        self.trainable = False
        self.train_batchnorm = False

    def unfreeze(self, layers="all", train_batchnorm: bool = False) -> int:
        """Makes the top of the network trainable (see `training.unfreeze`).

        Returns:
            The number of layers with weights that now train.
        """
        self.trainable = True
        self.train_batchnorm = bool(train_batchnorm)
        return unfreeze_network(self.network, layers, train_batchnorm)

    def enable_lora(self, rank, target_layer_names=None):
        raise ValueError(f"Received lora_rank={rank!r} for the image backbone "
                         f"'{self.backbone_name}'; LoRA fine-tuning is for text backbones. "
                         "Use FineTunePhase(unfreeze=...) to fine-tune part of the network.")

    # ------------------------------------------------------------------ data
    def make_dataset(self, x, y=None, *, head, batch_size=32, shuffle=False,
                     augmentation=None, seed=None, drop_remainder=False):
        """Labelled batches `(float32 images, labels)` for one head.

        Returns:
            `(dataset, class names the data gives or None)`.
        """
        dataset, source = make_image_dataset(
            x, y, image_size=self.image_size, kind=head.kind, num_classes=head.num_classes,
            class_names=head.class_names, batch_size=batch_size, shuffle=shuffle,
            augmentation=augmentation, seed=seed, drop_remainder=drop_remainder)
        if not source.has_labels:
            raise DataError("Received images without labels; give (images, labels) or a "
                            "dataset of (image, label) pairs.")
        return dataset, source.class_names

    def predict_dataset(self, x, *, batch_size=32):
        """Batches of images (no labels) to predict on."""
        dataset, _ = make_image_dataset(x, None, image_size=self.image_size,
                                        batch_size=batch_size)
        return dataset.map(lambda images, _labels: images)

    def network_inputs(self, images):
        """What the network itself takes: preprocessed images."""
        return self.preprocessor(images)

    # ---------------------------------------------------------------- export
    def serving_endpoints(self, predict) -> dict:
        """Serving signatures (raw images, encoded bytes) around `predict`."""
        return image_serving_endpoints(self.image_size, predict)

    def metadata(self) -> dict:
        """What `metadata.json` says about the backbone and the inputs."""
        return {
            "kind": "image",
            "backbone": self.backbone_name,
            "weights": self.weights_source,
            "input_shape": list(self.input_shape_),
            "preprocessing": self.preprocessing,
            "inputs": {
                "serving_default": "images: uint8 [batch, height, width, 3], raw RGB 0-255 "
                                   "(or 1 channel, grayscale), any size (resized inside)",
                "serving_bytes": "image_bytes: string [batch], encoded JPEG/PNG/GIF/BMP/WebP",
            },
        }

    def cache_key(self) -> dict:
        """What the cached features depend on besides the weights (see `feature_cache`)."""
        return {"backbone": self.backbone_name if self.spec is not None else "custom",
                "preprocessing": self.preprocessing, "input_size": list(self.input_shape_)}

    def get_config(self):
        if self.spec is None:
            backbone = architecture_config(self.network)
        else:
            backbone = self.backbone_name
        config = super().get_config()
        config.pop("trainable")  # a loaded model starts frozen; phases unfreeze it
        return {
            **config,
            "backbone": backbone,
            # The weights travel with a saved model, not in its config.
            "weights": None,
            "weights_source": self.weights_source,
            "input_shape": list(self.input_shape_),
            "preprocessing": self.preprocessing,
            "train_batchnorm": self.train_batchnorm,
        }


@keras.saving.register_keras_serializable(package="keras_transfer")
class ImageTransferModel(TransferModel):
    """An image classifier (or regressor) on a pretrained backbone.

    A `TransferModel` with an `ImageBackbone` and one head (or several,
    with `heads=`).

    Args:
        backbone: str or keras.Model. See `ImageBackbone`.
        num_classes: int. The number of classes to predict (outputs for
            regression).
        weights, input_shape, cut_layer, preprocessing, weights_source: see
            `ImageBackbone`.
        kind: str. `"classification"` (softmax), `"multilabel"` (sigmoid) or
            `"regression"` (linear).
        pooling: str. Head pooling: `"flatten"` (the classic Flatten ->
            Dense), `"avg"` or `"max"`.
        hidden_units: sequence of int. Hidden Dense layers of the head.
        dropout: float. Dropout rate in the head.
        class_names: list of str, optional. Names of the classes, in order.
        heads: dict `{name: kt.Head}`, optional, instead of `num_classes`
            and the head arguments: several tasks on one backbone.
        sampling: str. With several heads, see `TransferModel`.
        strategy: a `tf.distribute.Strategy` or a name (`"auto"`,
            `"mirrored"`, `"cpu"`, `"tpu"`); everything is built and
            compiled in its scope.
        name: str, optional. Model name.

    Example:
        >>> model = kt.ImageTransferModel("mobilenet_v2", num_classes=5,
        ...                               weights=None, input_shape=(96, 96, 3))
        >>> history = model.fit(x_train, y_train, head_epochs=2, fine_tune_epochs=1, verbose=0)
        >>> probabilities = model.predict(x_test)
        >>> probabilities.shape
        (8, 5)
    """

    def __init__(self, backbone="mobilenet_v2", num_classes=None, *, weights="imagenet",
                 input_shape=None, cut_layer=None, preprocessing=None, kind="classification",
                 pooling="flatten", hidden_units=(), dropout=0.0, class_names=None, heads=None,
                 sampling="round_robin", strategy=None, weights_source=None, name=None,
                 **kwargs):
        heads = heads_argument(num_classes, heads, kind=kind, pooling=pooling,
                               hidden_units=hidden_units, dropout=dropout,
                               class_names=class_names)
        super().__init__(
            lambda: ImageBackbone(backbone, weights=weights, input_shape=input_shape,
                                  cut_layer=cut_layer, preprocessing=preprocessing,
                                  weights_source=weights_source),
            heads, sampling=sampling, strategy=strategy, name=name or "image_transfer_model",
            **kwargs)


@keras.saving.register_keras_serializable(package="keras_transfer")
class MultiTaskModel(ImageTransferModel):
    """One image backbone, one head per task, trained on all tasks jointly.

    The model takes raw 0-255 RGB images and returns `{task name: outputs}`.
    Each task has its own data of its own size; every training batch holds
    one task's data, interleaved by `sampling`.

    Args:
        backbone: str or keras.Model. See `ImageBackbone`. A `keras.Model` is
            used (and trained) as it is: keep a copy with
            `snapshot_backbone` to compare with later.
        tasks: dict `{name: kt.Head}`; names are identifiers and become the
            output keys and metric prefixes.
        **kwargs: as for `ImageTransferModel` (`weights`, `input_shape`,
            `cut_layer`, `preprocessing`, `sampling`, `strategy`, ...).

    Example:
        >>> model = kt.MultiTaskModel("mobilenet_v2", tasks={
        ...     "digits": kt.Head(num_classes=10),
        ...     "tags": kt.Head(num_classes=5, kind="multilabel"),
        ...     "size": kt.Head(num_classes=1, kind="regression", loss_weight=0.5),
        ... }, weights=None, input_shape=(32, 32, 3))
        >>> history = model.fit({"digits": (x1, y1), "tags": (x2, y2)},
        ...                     head_epochs=2, fine_tune_epochs=1, verbose=0)
        >>> "digits_accuracy" in history.history, "tags_loss" in history.history
        (True, True)
        >>> model.predict(x1)["digits"].shape     # (N, 10)
        (12, 10)
    """

    def __init__(self, backbone="mobilenet_v2", tasks=None, **kwargs):
        kwargs.setdefault("name", "multi_task_model")
        super().__init__(backbone, heads=check_tasks(tasks), **kwargs)


def resolve_image_backbone(backbone, weights, input_shape, cut_layer=None,
                           preprocessing=None, weights_source=None):
    """Builds or cuts the backbone network of an image model.

    Args:
        backbone: a registry name, a `keras.Model`, or a serialized model
            (from a config).
        weights, input_shape, cut_layer, preprocessing, weights_source: see
            `ImageTransferModel`.

    Returns:
        `(network, spec or None, backbone name, preprocessing mode,
        input shape, weights source)`.
    """
    if isinstance(backbone, dict):  # from_config of a custom backbone
        # Keras's Functional.from_config (`functional_from_config`) pops "name",
        # "layers", "input_layers", ... out of the config it is given, which
        # would leave `{}` in the caller's model config: deserialize a copy.
        backbone = keras.saving.deserialize_keras_object(copy.deepcopy(backbone))
    if isinstance(backbone, keras.Model):
        network, mode, input_shape = _custom_backbone(backbone, cut_layer, preprocessing,
                                                      input_shape)
        return network, None, network.name, mode, input_shape, weights_source or "keras.Model"
    spec = registry.get_backbone_spec(backbone)
    if preprocessing not in (None, spec.preprocessing):
        raise BackboneError(
            f"Received preprocessing={preprocessing!r} for '{spec.name}', "
            f"whose weights expect {spec.preprocessing!r}; leave it unset.")
    input_shape = spec.check_input_shape(input_shape)
    network = spec.build(input_shape, weights)
    source = weights_source or (None if weights is None else str(weights))
    return network, spec, spec.name, spec.preprocessing, input_shape, source


# The leading bytes of every format `tf.io.decode_image` reads.
_IMAGE_SIGNATURES = {"JPEG": [(0, b"\xff\xd8\xff")], "PNG": [(0, b"\x89PNG\r\n\x1a\n")],
                     "GIF": [(0, b"GIF8")], "BMP": [(0, b"BM")],
                     "WebP": [(0, b"RIFF"), (8, b"WEBP")]}
SERVED_FORMATS = "JPEG, PNG, GIF, BMP or WebP"


def image_serving_endpoints(image_size, predict) -> dict:
    """The two serving signatures of image models.

    Both check what they receive and fail with a message that says what is
    wrong (`tf.errors.InvalidArgumentError`): images of another rank, with
    other than 1 or 3 channels, of size 0, or bytes that are no image.

    Args:
        image_size: `(height, width)` of the model input.
        predict: callable from float32 images of that size to a dict of outputs.

    Returns:
        `{"serving_default": ..., "serving_bytes": ...}` as
        `(function, input_signature)` pairs: raw uint8 images of any size
        (RGB, or grayscale turned into RGB as `fit` does), and encoded
        JPEG/PNG/GIF/BMP/WebP bytes.
    """
    tf = tensorflow("SavedModel export")
    height, width = image_size

    def serve_images(images):
        # The checks come first, each as data the next step waits for, so a
        # wrong input is reported by its message and never by a later op.
        shape = tf.shape(images)
        sizes = tf.concat([shape, tf.ones([4], tf.int32)], 0)  # safe for any rank
        channels = sizes[3]
        images = _check(images, tf.equal(tf.size(shape), 4), [
            "serving_default takes images of shape [batch, height, width, channels] "
            "(uint8 0-255); received this shape (add a batch axis for one image):", shape])
        images = _check(images, tf.logical_or(tf.equal(channels, 1), tf.equal(channels, 3)), [
            "serving_default takes RGB (3 channels) or grayscale (1 channel) images; "
            "received this many channels (drop an alpha channel: images[..., :3]):",
            channels])
        images = _check(images, tf.reduce_all(sizes[1:3] > 0), [
            "serving_default received images of size 0; height and width:", sizes[1:3]])
        images = tf.ensure_shape(images, (None, None, None, None))
        images = tf.cond(tf.equal(channels, 1), lambda: tf.tile(images, [1, 1, 1, 3]),
                         lambda: images)  # grayscale to RGB, as fit does
        images = tf.cast(tf.ensure_shape(images, (None, None, None, 3)), tf.float32)
        # Resize only when needed so same-size inputs are not resampled.
        same = tf.logical_and(tf.equal(sizes[1], height), tf.equal(sizes[2], width))
        x = tf.cond(same, lambda: images, lambda: tf.image.resize(images, (height, width)))
        return predict(tf.ensure_shape(x, (None, height, width, 3)))

    def decode_one(data):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        image.set_shape((None, None, 3))
        return tf.image.resize(tf.cast(image, tf.float32), (height, width))

    def serve_bytes(encoded):
        # Check the leading bytes first: garbage gets a message, not a decoder error.
        padded = tf.strings.join([encoded, tf.constant(b"\0" * 12)])
        known = tf.zeros(tf.shape(encoded), tf.bool)
        for parts in _IMAGE_SIGNATURES.values():
            match = tf.ones(tf.shape(encoded), tf.bool)
            for offset, magic in parts:
                match &= tf.equal(tf.strings.substr(padded, offset, len(magic)), magic)
            known |= match
        encoded = _check(encoded, tf.reduce_all(known), [
            f"serving_bytes takes encoded {SERVED_FORMATS} images; these positions of "
            "image_bytes hold something else:", tf.where(tf.logical_not(known))[:, 0]])
        # Every image is decoded and resized on its own: sizes may differ.
        images = tf.map_fn(decode_one, encoded,
                           fn_output_signature=tf.TensorSpec((height, width, 3), tf.float32))
        return predict(images)

    return {
        "serving_default": (serve_images,
                            [tf.TensorSpec(None, tf.uint8, name="images")]),
        "serving_bytes": (serve_bytes, [tf.TensorSpec((None,), tf.string, name="image_bytes")]),
    }


def _check(value, condition, message):
    """`value` when `condition` holds; otherwise an `InvalidArgumentError` with `message`.

    The result is data that depends on the check (not a control dependency,
    which graph optimisations may reorder), so nothing after it runs first.
    """
    tf = tensorflow("SavedModel export")
    def fail():
        with tf.control_dependencies([tf.debugging.Assert(False, message, summarize=20)]):
            return tf.identity(value)

    return tf.cond(condition, lambda: tf.identity(value), fail)


def _custom_backbone(model, cut_layer, preprocessing, input_shape):
    """Cuts a user's model at `cut_layer` and checks it takes images."""
    if cut_layer is not None:
        try:
            output = model.get_layer(cut_layer).output
        except ValueError as error:
            names = [layer.name for layer in model.layers][-8:]
            raise BackboneError(
                f"Received cut_layer={cut_layer!r}, which is not a layer of "
                f"'{model.name}'. Its last layers are {names}."
            ) from error
        model = keras.Model(model.inputs, output, name=f"{model.name}_cut")
    shape = tuple(model.input_shape[1:]) if model.inputs else None
    if shape is None or len(shape) != 3:
        raise BackboneError(
            f"Received a backbone model with input shape {shape}; expected "
            "images (height, width, channels). Build it with keras.Input(shape=(H, W, 3))."
        )
    if input_shape is None:
        if None in shape[:2]:
            raise BackboneError(
                f"Received a backbone model that takes images of any size {shape} and no "
                "input_shape; pass input_shape=(height, width, 3), the size to train at.")
        input_shape = shape
    input_shape = registry.as_input_shape(input_shape)
    if shape[-1] != 3 or input_shape[-1] != 3:
        raise BackboneError(
            f"Received a backbone that takes {shape[-1]} channels; transfer "
            "models feed RGB images (3 channels). Grayscale data is converted "
            "to RGB by the pipeline, so build the backbone for 3 channels."
        )
    fixed = [d for d in shape[:2] if d is not None]
    if fixed and tuple(shape[:2]) != tuple(input_shape[:2]):
        raise BackboneError(
            f"Received input_shape={input_shape} for a backbone built for "
            f"{shape}. Leave input_shape unset or build the backbone with "
            "keras.Input(shape=(None, None, 3))."
        )
    mode = preprocessing or "none"
    return model, mode, input_shape
