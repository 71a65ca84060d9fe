"""An independent NumPy forward pass of EfficientNet-Lite0 from its PyTorch state dict.

Convolutions are written as sums over kernel offsets on an explicitly padded
array, in PyTorch's (out, in, kh, kw) layout, with TensorFlow's "same" padding
(the extra pixel of an odd total at the end), BatchNormalization epsilon 1e-3.
"""

import numpy as np

BLOCKS = [(3, 1, 1, 16)] + [(3, 2, 6, 24), (3, 1, 6, 24)] + [(5, 2, 6, 40), (5, 1, 6, 40)] \
    + [(3, 2, 6, 80)] + [(3, 1, 6, 80)] * 2 + [(5, 1, 6, 112)] * 3 + [(5, 2, 6, 192)] \
    + [(5, 1, 6, 192)] * 3 + [(3, 1, 6, 320)]


def _pad_same(x, kernel, stride):
    """(H, W, C) padded as TensorFlow's "same" does."""
    pads = []
    for size in x.shape[:2]:
        total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, pads + [(0, 0)])


def _conv(x, weight, stride=1, groups=1):
    """x (H, W, Cin); weight (Cout, Cin/groups, k, k) -> (H', W', Cout)."""
    k = weight.shape[-1]
    x = _pad_same(x, k, stride)
    out_h = (x.shape[0] - k) // stride + 1
    out_w = (x.shape[1] - k) // stride + 1
    out = 0
    for i in range(k):
        for j in range(k):
            patch = x[i:i + stride * out_h:stride, j:j + stride * out_w:stride]
            if groups == 1:
                out = out + patch @ weight[:, :, i, j].T
            else:  # depthwise
                out = out + patch * weight[:, 0, i, j]
    return out


def _bn(x, state, prefix):
    scale = state[prefix + ".weight"] / np.sqrt(state[prefix + ".running_var"] + 1e-3)
    return (x - state[prefix + ".running_mean"]) * scale + state[prefix + ".bias"]


def lite0_logits(state, image):
    """Logits (1000,) of one raw 0-255 RGB image (H, W, 3), in float64."""
    s = {k: np.asarray(v, np.float64) for k, v in state.items()}
    relu6 = lambda t: np.clip(t, 0, 6)  # noqa: E731
    x = (np.asarray(image, np.float64) - 127.0) / 128.0
    x = relu6(_bn(_conv(x, s["_conv_stem.weight"], 2), s, "_bn0"))
    for i, (kernel, stride, expansion, channels) in enumerate(BLOCKS):
        p, inputs = f"_blocks.{i}.", x
        if expansion != 1:
            x = relu6(_bn(_conv(x, s[p + "_expand_conv.weight"]), s, p + "_bn0"))
        x = relu6(_bn(_conv(x, s[p + "_depthwise_conv.weight"], stride, groups=x.shape[-1]),
                      s, p + "_bn1"))
        x = _bn(_conv(x, s[p + "_project_conv.weight"]), s, p + "_bn2")
        if stride == 1 and inputs.shape[-1] == channels:
            x = x + inputs
    x = relu6(_bn(_conv(x, s["_conv_head.weight"]), s, "_bn1"))
    return x.mean(axis=(0, 1)) @ s["_fc.weight"].T + s["_fc.bias"]
