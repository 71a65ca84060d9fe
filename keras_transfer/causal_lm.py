"""Domain adaptation of a generator: continue training a KerasHub `CausalLM` on your text.

GPT-2 and other KerasHub causal language models keep learning the next token
on a user's own corpus, through LoRA adapters (the pretrained weights stay
frozen) or on every weight, with a warmup + decay schedule.
"""

from __future__ import annotations

import difflib
import logging
import os

import keras

from keras_transfer import backend, training
from keras_transfer.callbacks import DivergenceGuard
from keras_transfer.data import steps_of
from keras_transfer.errors import BackboneError
from keras_transfer.text import keras_hub_module, load_preset
from keras_transfer.text_data import as_text_source, read_utf8_lines

logger = logging.getLogger("keras_transfer")


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
        >>> lm, history = kt.adapt_causal_lm("gpt2_base_en", my_texts, lora_rank=4)  # doctest: +SKIP
        >>> lm.generate("The patient presented with", max_length=40)  # doctest: +SKIP
    """
    keras_hub = keras_hub_module()
    if isinstance(causal_lm, str):
        preset = causal_lm
        if not os.path.isdir(preset) and preset not in keras_hub.models.CausalLM.presets:
            close = difflib.get_close_matches(preset, list(keras_hub.models.CausalLM.presets), n=3)
            raise BackboneError(f"Received unknown causal LM preset {preset!r}. Closest: {close}.")
        causal_lm = load_preset(keras_hub.models.CausalLM, preset)
    if isinstance(texts, (str, os.PathLike)):
        texts = [t for t in read_utf8_lines(os.fspath(texts)) if t.strip()]
    source = as_text_source(list(texts))
    if sequence_length is not None:
        causal_lm.preprocessor.sequence_length = sequence_length
    tf = backend.tensorflow("adapt_causal_lm")
    dataset = tf.data.Dataset.from_tensor_slices(source.texts).shuffle(
        len(source.texts)).batch(batch_size)
    steps = steps_of(dataset)
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
                            callbacks=[DivergenceGuard("adapt"), *(callbacks or [])])
    return causal_lm, history
