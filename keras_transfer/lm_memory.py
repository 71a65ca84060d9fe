"""Will a language model fit? Memory for inference, LoRA and full fine-tuning by dtype.

Estimates in bytes, from a model's shape alone (nothing is built):

- weights: parameters x bytes per parameter (float32 4, bfloat16 2, int8 1, as
  Keras's `quantize("int8")` stores kernels, plus a float32 scale per row);
- training: gradients and AdamW's two moments for what trains (every weight, or
  the LoRA adapters on the query and value projections, kept in float32), and
  the activations kept for the backward pass, after Korthikanti et al. 2022
  ("Reducing Activation Recomputation in Large Transformer Models"):
  `sequence x batch x hidden x (34 + 5 x heads x sequence / hidden)` bytes per
  layer at 16 bits, scaled to the dtype, plus the logits and their gradient;
- inference: the key/value cache and one step's logits.

Runtime overhead (the framework, XLA's buffers) comes on top: leave a margin.

Example:
    >>> e = estimate_lm_memory(GPT_J_6B, "inference", "bfloat16")
    >>> round(e["weights"] / 2**30, 1)
    11.3
"""

from __future__ import annotations

import dataclasses

_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}
MODES = ("inference", "lora", "full")


@dataclasses.dataclass(frozen=True)
class LanguageModelShape:
    """What the estimate needs of a decoder-only transformer."""

    name: str
    parameters: int
    layers: int
    hidden: int
    heads: int
    key_value_heads: int
    vocabulary: int


GPT_J_6B = LanguageModelShape("GPT-J-6B", 6_053_381_344, 28, 4096, 16, 16, 50_400)
SMOLLM2_135M = LanguageModelShape("SmolLM2-135M", 134_515_008, 30, 576, 9, 3, 49_152)


def estimate_lm_memory(model: LanguageModelShape, mode: str, dtype: str, *,
                       batch_size: int = 1, sequence_length: int = 512,
                       lora_rank: int = 8) -> dict:
    """Bytes a language model needs for one use, by part.

    Args:
        model: a `LanguageModelShape` (e.g. `GPT_J_6B`).
        mode: `"inference"`, `"lora"` or `"full"` (fine-tuning every weight).
        dtype: `"float32"`, `"bfloat16"` or `"int8"` (the weights' storage).
        batch_size: int. Sequences per step.
        sequence_length: int. Tokens per sequence.
        lora_rank: int. Rank of the adapters (`"lora"`).

    Returns:
        dict of bytes (`weights`, `trained` parameters' gradients and optimizer,
        `activations`, `total`), and `possible` (False for full fine-tuning of int8
        weights, which Keras cannot train: use LoRA over them).
    """
    if mode not in MODES or dtype not in _BYTES:
        raise ValueError(f"Received mode={mode!r}, dtype={dtype!r}; use one of {MODES} and "
                         f"one of {tuple(_BYTES)}.")
    width = _BYTES[dtype]
    weights = model.parameters * width
    if dtype == "int8":  # a float32 scale per output row of each kernel (about hidden rows)
        weights += model.layers * 12 * model.hidden * 4
    tokens = batch_size * sequence_length
    head_dim = model.hidden // model.heads
    if mode == "inference":
        cache = 2 * model.layers * model.key_value_heads * head_dim * tokens * max(width, 2)
        activations = cache + tokens * model.vocabulary * 4
        trained = 0
    else:
        per_layer = tokens * model.hidden * (34 + 5 * model.heads * sequence_length / model.hidden)
        activations = int(model.layers * per_layer * max(width, 2) / 2
                          + 2 * tokens * model.vocabulary * 4)
        if mode == "lora":  # A (hidden x r) and B (r x hidden) on the query and value kernels
            trained = model.layers * 2 * 2 * model.hidden * lora_rank * (4 + 4 + 8)
        else:  # gradients in the weights' dtype, AdamW's two moments likewise
            trained = model.parameters * 3 * width
    possible = not (mode == "full" and dtype == "int8")
    return {"model": model.name, "mode": mode, "dtype": dtype, "batch_size": batch_size,
            "sequence_length": sequence_length, "weights": weights, "trained": trained,
            "activations": int(activations), "total": int(weights + trained + activations),
            "possible": possible}


def advice(estimate: dict, available: int | None) -> str:
    """What to do when an estimate does not fit (or is impossible)."""
    if not estimate["possible"]:
        return ("int8 weights cannot be trained: train LoRA adapters over them, or fine-tune "
                "every weight in bfloat16")
    if available is None or estimate["total"] <= available:
        return ""
    if estimate["mode"] == "full":
        return ("use LoRA (adapt_causal_lm's default)"
                + (", or bfloat16" if estimate["dtype"] == "float32" else "")
                + ", or a machine with more memory")
    if estimate["activations"] > estimate["weights"]:
        return "shorten the sequences or the batch"
    if estimate["dtype"] == "float32":
        return "load the weights in bfloat16, or int8 (lm.quantize('int8'))"
    if estimate["dtype"] == "bfloat16":
        return "quantize the weights to int8 (lm.quantize('int8'))"
    return "a machine with more memory, or a smaller model"
