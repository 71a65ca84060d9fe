"""Layer groups of a pretrained network, and discriminative learning rates over them.

Fine-tuning moves the bottom of a pretrained network less than its top: the
low layers hold generic features (edges, sub-words), the high ones the
pretraining task's (ULMFiT, Howard & Ruder 2018; fastai's `slice(low, high)`;
layer-wise decay in BEiT/ELECTRA). `layer_groups` cuts a network into its
blocks, bottom to top, from the names the families give their layers
(`block_3_expand` in MobileNetV2, `conv4_block2_1_conv` in ResNet,
`block5a_expand_conv` in EfficientNet, `block4_conv1` in VGG,
`transformer_layer_3` in KerasHub encoders); `group_rates` gives each group
its rate, and `discriminative_optimizer` builds the optimizer that applies
them.

Per-group rates use Keras's own `keras.optimizers.MultiOptimizer`
(keras#21741): one inner optimizer per distinct rate, the variables mapped
to them by identity. Checked here with fit on TensorFlow (eagerly traced,
and under `MirroredStrategy`), on JAX (its stateless `fit` step) and with
LoRA adapters (their variables belong to the adapted layers, so they take
their group's rate). Scaling the gradients instead would not work with
Adam, whose step does not depend on the gradient's scale.

Example:

```python
groups = kt.layer_groups(model.backbone.network)
[g.name for g in groups][:3]            # ['stem', 'expanded_conv', 'block_1']
model.fit(x, y, phases=[kt.HeadPhase(), kt.FineTunePhase(layer_decay=0.8)])
```
"""

from __future__ import annotations

import dataclasses
import math
import re

import keras

from keras_transfer.errors import KerasTransferError
from keras_transfer.training import leaf_layers, say

# What names a block in each family, tried in order (the first that matches
# a layer's name wins): a ResNet's conv4_block2 also contains "block2".
BLOCK_PATTERNS = (
    r"transformer_layer_\d+",          # KerasHub encoders and decoders
    r"stage_\d+_block_\d+",            # ConvNeXt
    r"conv\d+_block\d+",               # ResNet, ResNetV2, DenseNet
    r"block_\d+",                      # MobileNetV2 (Keras and the torchvision port)
    r"expanded_conv(?:_\d+)?",         # MobileNetV2's first block, MobileNetV3
    r"block\d+[a-z]?",                 # EfficientNet(V2) block5a, VGG and Xception block4
)
# Without block names (e.g. InceptionV3's conv2d_N), layers with weights are
# cut into at most this many contiguous groups of equal size.
MAX_UNNAMED_GROUPS = 12


class LayerRateError(KerasTransferError, ValueError):
    """Per-layer learning rates asked for in a way that cannot work."""


@dataclasses.dataclass(frozen=True)
class LayerGroup:
    """Consecutive layers with weights that share a learning rate.

    Attributes:
        name: str. The block's name (`"block_3"`), `"stem"` for the layers
            before the first block, or `"layers_i-j"` without block names.
        layers: tuple of the group's layers, in order.
    """

    name: str
    layers: tuple

    @property
    def variables(self) -> list:
        return [v for layer in self.layers for v in layer.weights]


def layer_groups(network: keras.Model) -> list[LayerGroup]:
    """Cuts a network's layers with weights into blocks, bottom to top.

    A layer belongs to the block its name names (see `BLOCK_PATTERNS`);
    layers before the first block form the `"stem"` group and layers after a
    block without a block name of their own (a top convolution, a final
    normalisation) join the block before them. A network without block
    names is cut into at most `MAX_UNNAMED_GROUPS` groups of consecutive
    layers.

    Args:
        network: keras.Model. Nested models are looked into.

    Returns:
        A list of `LayerGroup`, the input side first.

    Example:
        >>> net = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3))
        >>> [g.name for g in kt.layer_groups(net)][:3]
        ['stem', 'expanded_conv', 'block_1']
    """
    weighted = [layer for layer in leaf_layers(network) if layer.weights]
    keys = [_block_of(layer.name) for layer in weighted]
    if not any(keys):
        size = math.ceil(len(weighted) / MAX_UNNAMED_GROUPS) if weighted else 1
        return [LayerGroup(f"layers_{i}-{min(i + size, len(weighted)) - 1}",
                           tuple(weighted[i:i + size])) for i in range(0, len(weighted), size)]
    groups: list[tuple[str, list]] = []
    for layer, key in zip(weighted, keys):
        if key is None:
            key = groups[-1][0] if groups else "stem"
        if not groups or groups[-1][0] != key:
            groups.append((key, []))
        groups[-1][1].append(layer)
    return [LayerGroup(name, tuple(layers)) for name, layers in groups]


def _block_of(name: str) -> str | None:
    for pattern in BLOCK_PATTERNS:
        found = re.search(pattern, name)
        if found:
            return found.group(0)
    return None


def check_layer_rates(learning_rate, layer_decay) -> None:
    """Refuses a decay outside (0, 1], a range high-to-low, or both at once.

    Raises:
        LayerRateError: what was received and what to pass instead.
    """
    if layer_decay is not None:
        if isinstance(layer_decay, bool) or not isinstance(layer_decay, (int, float)) \
                or not 0 < layer_decay <= 1:
            raise LayerRateError(
                f"Received layer_decay={layer_decay!r}; expected a number in (0, 1]: the "
                "rate of each block is the one above it times the decay (e.g. 0.8; 1 "
                "trains every block at the top rate).")
        if isinstance(learning_rate, (tuple, list)):
            raise LayerRateError(
                f"Received layer_decay={layer_decay!r} with learning_rate={learning_rate!r}; "
                "give one: a decay from the top rate, or a (low, high) range.")
    if isinstance(learning_rate, (tuple, list)):
        if len(learning_rate) != 2 or not all(
                isinstance(r, (int, float)) and not isinstance(r, bool)
                and math.isfinite(r) and r > 0 for r in learning_rate):
            raise LayerRateError(
                f"Received learning_rate={learning_rate!r}; expected a positive rate or a "
                "(low, high) pair of positive rates, e.g. (1e-6, 1e-4).")
        if learning_rate[0] > learning_rate[1]:
            raise LayerRateError(
                f"Received learning_rate={tuple(learning_rate)!r}, high to low; expected "
                f"(low, high): the bottom block trains at the low rate and the top at the "
                f"high one, i.e. {tuple(learning_rate[::-1])!r}.")


def group_rates(num_groups: int, learning_rate, layer_decay=None) -> list[float]:
    """The learning rate of each group, bottom to top.

    Args:
        num_groups: int. Groups, as `layer_groups` returns them.
        learning_rate: float (the top rate) or `(low, high)`: rates spread
            geometrically from the bottom group (low) to the top one (high).
        layer_decay: float in (0, 1], optional. With a float rate: group g
            from the top trains at `learning_rate * layer_decay**g`.

    Returns:
        A list of floats, one per group, bottom first.

    Example:
        >>> kt.group_rates(3, 1e-3, layer_decay=0.5)
        [0.00025, 0.0005, 0.001]
        >>> kt.group_rates(3, (1e-6, 1e-4))
        [1e-06, 1e-05, 0.0001]
    """
    check_layer_rates(learning_rate, layer_decay)
    if isinstance(learning_rate, (tuple, list)):
        low, high = map(float, learning_rate)
        if num_groups == 1:
            return [high]
        # 12 significant digits: (1e-6, 1e-4) gives 1e-05, not 9.999999999999999e-06.
        return [float(f"{low * (high / low) ** (g / (num_groups - 1)):.12g}")
                for g in range(num_groups)]
    decay = 1.0 if layer_decay is None else float(layer_decay)
    return [float(learning_rate) * decay ** (num_groups - 1 - g) for g in range(num_groups)]


def discriminative_optimizer(model: keras.Model, groups: list[LayerGroup], rates: list[float],
                             make_optimizer, top_rate: float) -> keras.optimizers.Optimizer:
    """An optimizer that trains each group's variables at its own rate.

    Args:
        model: keras.Model. Its variables outside the groups (the heads)
            train at `top_rate`.
        groups: `layer_groups` of the backbone's network.
        rates: one rate per group (`group_rates`).
        make_optimizer: callable `rate -> keras.optimizers.Optimizer`: the
            optimizer of one rate (the schedule's peak, say).
        top_rate: float. The rate of everything outside the groups.

    Returns:
        A `keras.optimizers.MultiOptimizer`, or the plain optimizer when
        every rate is the top rate.
    """
    if all(rate == top_rate for rate in rates):
        return make_optimizer(top_rate)
    optimizers = {top_rate: make_optimizer(top_rate)}
    chosen = {}
    for group, rate in zip(groups, rates):
        if rate not in optimizers:
            optimizers[rate] = make_optimizer(rate)
        for variable in group.variables:
            chosen[id(variable)] = optimizers[rate]
    return keras.optimizers.MultiOptimizer(_ByVariable(optimizers[top_rate], chosen))


def phase_optimizer(model, phase, make_optimizer, verbose):
    """A fine-tune phase's optimizer factory, with a rate per block where it asks for them.

    Args:
        model: the `TransferModel`; its `backbone.network` is cut into blocks.
        phase: the `FineTunePhase` (its `learning_rate`, `layer_decay`,
            `peak_learning_rate` and `name` are read).
        make_optimizer: callable `rate -> optimizer` (the schedule's peak).
        verbose: print the rates chosen.

    Returns:
        `(factory, rates)`: `factory()` builds a fresh optimizer; `rates` is
        `{group name: rate}` bottom first, or None with one rate for all.
    """
    top = phase.peak_learning_rate
    ranged = isinstance(phase.learning_rate, tuple)
    if phase.layer_decay is None and not ranged:
        return (lambda: make_optimizer(top)), None
    groups = layer_groups(model.backbone.network)
    rates = group_rates(len(groups), phase.learning_rate if ranged else top, phase.layer_decay)
    say(f"Phase '{phase.name}': {len(groups)} layer groups of the backbone, rates "
        f"{rates[0]:.3g} (bottom) to {rates[-1]:.3g} (top); the heads at {top:.3g}.", verbose)
    return (lambda: discriminative_optimizer(model, groups, rates, make_optimizer, top),
            {group.name: rate for group, rate in zip(groups, rates)})


class _ByVariable:
    """Maps a variable to its group's optimizer by identity (paths repeat across nested
    networks); `MultiOptimizer` takes its `default_optimizer` first, so
    `optimizers[0]` is the top rate's (what `LearningRateLogger` logs)."""

    def __init__(self, default_optimizer, chosen: dict):
        self.default_optimizer = default_optimizer
        self._chosen = chosen

    def values(self):
        return [self.default_optimizer, *dict.fromkeys(self._chosen.values())]

    def __call__(self, variable):
        return self._chosen.get(id(variable), self.default_optimizer)
