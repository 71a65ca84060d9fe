"""An independent NumPy forward pass of a Llama GGUF file, for checking the KerasHub mapping.

It reads the tensors as llama.cpp does (its own dequantization through the gguf
package, rows as stored) and applies llama.cpp's rotary embedding, which rotates
adjacent pairs of dimensions: it never uses the row reordering that the mapping
onto KerasHub undoes, so both agree only if that mapping is right.
"""

import numpy as np
from gguf import GGUFReader, quants


def llama_logits(path, token_ids):
    """Logits `(len(token_ids), vocabulary)` in float64.

    `path` is a GGUF file, or a `GGUFCheckpoint` already read (only its fields and its
    still-quantized tensors are used).
    """
    if isinstance(path, str):
        reader = GGUFReader(path)
        fields = {name: field.contents() for name, field in reader.fields.items()}
        raw = reader.tensors
    else:
        fields, raw = path.metadata, path.tensors.values()
    w = {t.name: np.asarray(quants.dequantize(t.data, t.tensor_type), np.float64)
         .reshape([int(d) for d in reversed(t.shape)]) for t in raw}
    heads = int(fields["llama.attention.head_count"])
    kv_heads = int(fields["llama.attention.head_count_kv"])
    eps = float(fields["llama.attention.layer_norm_rms_epsilon"])
    theta = float(fields.get("llama.rope.freq_base", 10000.0))
    x = w["token_embd.weight"][np.asarray(token_ids)]
    n, hidden = x.shape
    head_dim = hidden // heads
    # Interleaved rotary embedding: dimensions (2i, 2i+1) rotate by position * theta^(-2i/d).
    angles = np.arange(n)[:, None] * theta ** (-np.arange(0, head_dim, 2) / head_dim)
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]

    def rotate(t):  # (n, heads, head_dim)
        even, odd = t[..., 0::2], t[..., 1::2]
        out = np.empty_like(t)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
        return out

    def rms_norm(t, scale):
        return t / np.sqrt(np.mean(t * t, axis=-1, keepdims=True) + eps) * scale

    causal = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(int(fields["llama.block_count"])):
        b = lambda name: w[f"blk.{i}.{name}.weight"]  # noqa: E731
        h = rms_norm(x, b("attn_norm"))
        q = rotate((h @ b("attn_q").T).reshape(n, heads, head_dim))
        k = rotate((h @ b("attn_k").T).reshape(n, kv_heads, head_dim))
        v = (h @ b("attn_v").T).reshape(n, kv_heads, head_dim)
        k, v = (np.repeat(t, heads // kv_heads, axis=1) for t in (k, v))
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head_dim) + causal
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", scores, v).reshape(n, hidden) @ b("attn_output").T
        h = rms_norm(x, b("ffn_norm"))
        gate = h @ b("ffn_gate").T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ b("ffn_up").T)) @ b("ffn_down").T
    x = rms_norm(x, w["output_norm.weight"])
    return x @ w.get("output.weight", w["token_embd.weight"]).T
