"""Domain adaptation of a generator: continue training a KerasHub `CausalLM` on your text.

GPT-2 and other KerasHub causal language models keep learning the next token
on a user's own corpus, through LoRA adapters (the pretrained weights stay
frozen) or on every weight, with a warmup + decay schedule.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import logging
import os
import sysconfig

import keras
import numpy as np

from keras_transfer import backend, training
from keras_transfer.callbacks import DivergenceGuard
from keras_transfer.data import steps_of
from keras_transfer.errors import BackboneError
from keras_transfer.text import keras_hub_module, load_preset
from keras_transfer.text_data import as_text_source, read_utf8_lines

logger = logging.getLogger("keras_transfer")


def adapt_causal_lm(causal_lm, texts, *, epochs=1, batch_size=8, sequence_length=None,
                    lora_rank=4, learning_rate=1e-4, warmup_fraction=0.1,
                    decay="cosine", callbacks=None, verbose="auto", jit_compile="auto"):
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
        jit_compile: as for `keras.Model.compile` (`"auto"`: XLA where every
            layer supports it).

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
        jit_compile=jit_compile,
    )
    trainable, frozen = training.count_params(causal_lm)
    logger.info("Causal LM adaptation: %d trainable, %d frozen parameters.", trainable, frozen)
    history = causal_lm.fit(dataset, epochs=epochs, verbose=verbose, shuffle=False,
                            callbacks=[DivergenceGuard("adapt"), *(callbacks or [])])
    return causal_lm, history


def perplexity(causal_lm, texts, *, batch_size: int = 8, per_text: bool = False):
    """Perplexity of `causal_lm` on `texts`: exp(mean negative log-likelihood per token).

    Every predicted token of every text counts once (padding does not), so
    the figure does not depend on how texts are batched. Lower is better; a
    model that knows nothing of a vocabulary of V tokens scores V.

    Args:
        causal_lm: a `keras_hub.models.CausalLM` with its preprocessor.
        texts: list of str. Each is cut to the preprocessor's sequence length.
        batch_size: int.
        per_text: bool. Return each text's own perplexity instead (from
            the same forward passes).

    Returns:
        float, or an array with one perplexity per text (`per_text=True`).

    Example:
        >>> before = kt.perplexity(lm, held_out)  # doctest: +SKIP
        >>> lm, history = kt.adapt_causal_lm(lm, train)  # doctest: +SKIP
        >>> kt.perplexity(lm, held_out) < before  # doctest: +SKIP
        True
    """
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"Received texts={str(texts)[:80]}; expected a non-empty list of "
                         "strings.")
    totals, counts = [], []  # per text: summed negative log-likelihood, tokens
    for start in range(0, len(texts), batch_size):
        x, y, weight = causal_lm.preprocessor(texts[start:start + batch_size])
        logits = np.asarray(keras.ops.convert_to_numpy(causal_lm(x)), np.float64)
        logits -= logits.max(-1, keepdims=True)  # log-softmax in float64, stable
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        y = np.asarray(keras.ops.convert_to_numpy(y))
        weight = np.asarray(keras.ops.convert_to_numpy(weight), np.float64)
        nll = -np.take_along_axis(log_probs, y[..., None], -1)[..., 0]
        totals.extend((nll * weight).sum(axis=1))
        counts.extend(weight.sum(axis=1))
    totals, counts = np.array(totals), np.array(counts)
    if per_text:
        return np.exp(totals / np.maximum(counts, 1.0))
    return float(np.exp(totals.sum() / counts.sum()))


def docstring_corpus(root: str | None = None, held_out_share: float = 0.1, *,
                     min_chars: int = 200, max_chars: int = 1200) -> tuple[list[str], list[str]]:
    """A domain corpus from Python source: the docstrings under `root` (default: the standard library).

    The standard library is there on every machine, offline; point `root` at
    a package's source to adapt a model to its documentation. Docstrings of
    modules, classes and functions are read with `ast` (nothing is
    imported). Modules are split by name (a stable hash), so held-out
    docstrings come from modules the training set never saw.

    Args:
        root: str, optional. A folder of `.py` files (searched recursively;
            `test`/`tests` folders and `site-packages` are skipped).
        held_out_share: float in (0, 1). Share of modules held out.
        min_chars, max_chars: int. Docstring lengths kept.

    Returns:
        `(training docstrings, held-out docstrings)`, in a fixed order.

    Example:
        >>> train, held_out = kt.docstring_corpus()  # doctest: +SKIP
        >>> len(train), len(held_out)  # Python 3.11  # doctest: +SKIP
        (1832, 224)
    """
    if not 0 < held_out_share < 1:
        raise ValueError(f"Received held_out_share={held_out_share!r}; expected a number "
                         "between 0 and 1.")
    root = root or sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(root):
        raise ValueError(f"Received root={root!r}, which is not a folder; expected a folder "
                         "of Python source files.")
    train, held_out = [], []
    for directory, folders, files in os.walk(root):
        folders[:] = sorted(f for f in folders if f not in (
            "test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__"))
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(directory, name)
            module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # not Python 3 source this interpreter reads
            share = int(hashlib.sha256(module.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            chosen = held_out if share < held_out_share else train
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                     ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and min_chars <= len(doc) <= max_chars:
                        chosen.append(doc)
    return train, held_out
