"""Prompting a causal language model: chat templates, sampling, streaming.

`generate(lm, prompt)` formats the prompt with the model's chat template (an
instruct model answers questions, summarises and translates when asked the
way it was trained), picks a KerasHub sampler from plain options and returns
the answer without the prompt. `stream(lm, prompt)` yields the answer piece by
piece as it is decoded (the `keras-transfer generate` command prints it so).

Example:
    >>> lm = kt.load_gguf(kt.smollm2_path())  # doctest: +SKIP
    >>> kt.generate(lm, "Translate to French: good morning", max_length=64)  # doctest: +SKIP
    'Bonjour'
"""

from __future__ import annotations

from typing import Iterator

import keras
import numpy as np
from keras import ops

from keras_transfer.errors import DataError
from keras_transfer.text import keras_hub_module

_keras_hub = keras_hub_module()


@keras.saving.register_keras_serializable(package="keras_transfer")
class ChatTokenizer(_keras_hub.models.Llama3Tokenizer):
    """A byte-level BPE tokenizer that keeps its model's chat template and special tokens.

    Args:
        vocabulary: dict mapping tokens to ids.
        merges: list of `"a b"` merge rules.
        bos_token: str. The start token.
        eos_token: str. The token that ends an answer (generation stops there).
        misc_special_tokens: set of other special tokens, kept whole in text.
        chat_template: str or None. A Jinja chat template (Hugging Face's convention).
        **kwargs: passed to `keras_hub.models.Llama3Tokenizer`.
    """

    def __init__(self, vocabulary=None, merges=None, bos_token="<|begin_of_text|>",
                 eos_token="<|end_of_text|>", misc_special_tokens=(), chat_template=None,
                 **kwargs):
        self.chat_template = chat_template
        self._special = (bos_token, eos_token, sorted(misc_special_tokens))
        super().__init__(vocabulary=vocabulary, merges=merges, bos_token=bos_token,
                         eos_token=eos_token, misc_special_tokens=set(misc_special_tokens),
                         **kwargs)

    def get_config(self):
        config = super().get_config()
        config.pop("unsplittable_tokens", None)  # rebuilt from the special tokens
        bos, eos, misc = self._special
        config.update(bos_token=bos, eos_token=eos, misc_special_tokens=misc,
                      chat_template=self.chat_template)
        return config

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the text the model was trained on.

        Args:
            messages: list of `{"role": "system"|"user"|"assistant", "content": str}`.
            add_generation_prompt: bool. End with the assistant's turn opening.

        Returns:
            str.
        """
        if not self.chat_template:
            raise DataError("Received a chat request for a tokenizer without a chat template; "
                            "pass chat=False and write the prompt in the model's own format.")
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment  # lazy: optional extra (llm)
        except ImportError:
            raise DataError("Chat templates need jinja2: pip install jinja2") from None
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = environment.from_string(self.chat_template)
        bos, eos, _ = self._special
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos, eos_token=eos)


@keras.saving.register_keras_serializable(package="keras_transfer")
class ChatCausalLMPreprocessor(_keras_hub.models.Llama3CausalLMPreprocessor):
    """`Llama3CausalLMPreprocessor` whose `add_start_token=False` holds for generation too.

    KerasHub 0.32's `generate_preprocess` adds the start token whatever
    `add_start_token` says, so a chat prompt that opens with it (SmolLM's
    `<|im_start|>`) would start twice and the model answers off the rails.
    """

    def build(self, input_shape):
        super().build(input_shape)
        if not self.add_start_token:
            self.packer.start_value = None


def chat_prompt(causal_lm, prompt: str | list[dict], system: str | None = None) -> str:
    """`prompt` formatted with `causal_lm`'s chat template.

    Args:
        causal_lm: a KerasHub `CausalLM` whose tokenizer has `apply_chat_template`.
        prompt: str (one user message) or a list of chat messages.
        system: str, optional. A system message put first.

    Returns:
        str, ending with the opening of the assistant's answer.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    tokenizer = causal_lm.preprocessor.tokenizer
    if not hasattr(tokenizer, "apply_chat_template"):
        raise DataError(f"Received a {type(tokenizer).__name__} without a chat template; "
                        "pass chat=False and write the prompt in the model's own format.")
    return tokenizer.apply_chat_template(messages)


def make_sampler(sampler: str = "greedy", *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None):
    """A KerasHub sampler from plain options.

    Args:
        sampler: str. `"greedy"`, `"top_k"`, `"top_p"` or `"random"`.
        temperature: float. Softens (>1) or sharpens (<1) the distribution.
        top_k: int. Keep the k likeliest tokens (`"top_k"`, default 5; also bounds `"top_p"`).
        top_p: float. Keep the smallest set of tokens with this probability (`"top_p"`,
            default 0.9).
        seed: int, optional. For reproducible sampling.

    Returns:
        A `keras_hub.samplers.Sampler`.
    """
    samplers = _keras_hub.samplers
    if not temperature > 0:
        raise DataError(f"Received temperature={temperature}; it must be > 0.")
    if sampler == "greedy":
        return samplers.GreedySampler()
    if sampler == "top_k":
        return samplers.TopKSampler(k=top_k or 5, seed=seed, temperature=temperature)
    if sampler == "top_p":
        if not 0 < (top_p or 0.9) <= 1:
            raise DataError(f"Received top_p={top_p}; it must be in (0, 1].")
        return samplers.TopPSampler(p=top_p or 0.9, k=top_k, seed=seed, temperature=temperature)
    if sampler == "random":
        return samplers.RandomSampler(seed=seed, temperature=temperature)
    raise DataError(f"Received sampler={sampler!r}; use 'greedy', 'top_k', 'top_p' or 'random'.")


def generate(causal_lm, prompt: str | list[dict], *, max_length: int = 128, chat: bool = True,
             system: str | None = None, sampler: str = "greedy", temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None) -> str:
    """The model's answer to a prompt (KerasHub's `generate` with a chat template and a sampler).

    Args:
        causal_lm: a KerasHub `CausalLM` (e.g. from `load_gguf`).
        prompt: str, or a list of chat messages.
        max_length: int. Tokens of prompt and answer together.
        chat: bool. Format with the model's chat template (instruct models).
        system: str, optional. A system message (with `chat`).
        sampler, temperature, top_k, top_p, seed: as for `make_sampler`.

    Returns:
        str, the answer without the prompt and the end token.

    Example:
        >>> kt.generate(lm, "What is the capital of France?")  # doctest: +SKIP
        'The capital of France is Paris.'
    """
    text = chat_prompt(causal_lm, prompt, system) if chat else prompt
    options = (sampler, temperature, top_k, top_p, seed)
    if getattr(causal_lm, "_kt_sampler_options", None) != options:
        causal_lm.sampler = make_sampler(sampler, temperature=temperature, top_k=top_k,
                                         top_p=top_p, seed=seed)
        causal_lm.generate_function = None  # recompiled once for the new sampler
        causal_lm._kt_sampler_options = options
    output = causal_lm.generate(text, max_length=max_length, strip_prompt=True)
    return str(output).strip()


def stream(causal_lm, prompt: str | list[dict], *, max_length: int = 128, chat: bool = True,
           system: str | None = None, temperature: float = 0.0, top_k: int | None = None,
           seed: int | None = None) -> Iterator[str]:
    """The answer piece by piece as it is decoded (with the model's key/value cache).

    Args:
        causal_lm: a KerasHub `CausalLM` with `call_with_cache` (Llama, GPT-2, ...).
        prompt: str, or a list of chat messages.
        max_length: int. Tokens of prompt and answer together.
        chat: bool. Format with the model's chat template.
        system: str, optional. A system message (with `chat`).
        temperature: float. 0 decodes greedily; above 0 samples.
        top_k: int, optional. Sample among the k likeliest tokens.
        seed: int, optional.

    Yields:
        str pieces whose concatenation is the answer.
    """
    text = chat_prompt(causal_lm, prompt, system) if chat else prompt
    tokenizer = causal_lm.preprocessor.tokenizer
    ids = [int(i) for i in np.asarray(tokenizer(text)).ravel()]
    if len(ids) >= max_length:
        raise DataError(f"Received a prompt of {len(ids)} tokens with max_length={max_length}; "
                        "raise max_length.")
    rng = np.random.default_rng(seed)
    stops = {int(tokenizer.end_token_id)}
    token_ids = np.zeros((1, max_length), "int32")
    token_ids[0, :len(ids)] = ids
    _, cache = causal_lm._build_cache(ops.convert_to_tensor(token_ids[:, :len(ids)]))
    # The cache covers the prompt only; grow it to max_length.
    pad = [(0, 0)] * 3 + [(0, max_length - len(ids))] + [(0, 0)] * 2
    cache = ops.pad(cache, pad)
    logits = causal_lm.call_with_cache(ops.convert_to_tensor(token_ids[:, len(ids) - 1:len(ids)]),
                                       cache, len(ids) - 1)[0]
    answer, shown = [], ""
    for index in range(len(ids), max_length):
        scores = np.asarray(ops.convert_to_numpy(logits), "float64")[0, -1]
        token = _pick(scores, temperature, top_k, rng)
        if token in stops:
            break
        answer.append(token)
        decoded = str(tokenizer.detokenize(answer))
        if not decoded.endswith("\ufffd"):  # wait for a whole UTF-8 character
            yield decoded[len(shown):]
            shown = decoded
        if index + 1 < max_length:
            logits, _, cache = causal_lm.call_with_cache(
                ops.convert_to_tensor([[token]], "int32"), cache, index)
    if answer and len(decoded) > len(shown):  # an incomplete character at the very end
        yield decoded[len(shown):]


def _pick(scores: np.ndarray, temperature: float, top_k: int | None, rng) -> int:
    """The next token: the likeliest one, or a sample at `temperature` among the top k."""
    if temperature <= 0:
        return int(np.argmax(scores))
    scores = scores / temperature
    if top_k:
        scores = np.where(scores >= np.sort(scores)[-top_k], scores, -np.inf)
    probabilities = np.exp(scores - scores.max())
    return int(rng.choice(scores.size, p=probabilities / probabilities.sum()))
