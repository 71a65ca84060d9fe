"""Fine-tuning that pays only for what trains: the frozen bottom's outputs, cached.

When a `FineTunePhase` unfreezes only the top of an image backbone
(`unfreeze=N` or a layer name), every step of the usual path runs the whole
network forward (and the frozen part computes the same thing every epoch).
Here the frozen bottom runs once over the data, its outputs are cached on
disk like features (`feature_cache.extract_features(bottom=...)`: the same
shards, lookup, locks and eviction, keyed by the bottom's architecture and
weights, the cut and the data fingerprint), and the steps run only the
unfrozen top on them; callbacks still see the whole model.

Where to cut. A layer's output is *frozen* when the layer has no trainable
weight and all its inputs are frozen (the network's inputs are). The cut is
every frozen tensor that an unfrozen layer takes: with residual connections
(ResNet, MobileNetV2) several tensors cross it, and all of them are cached,
flattened side by side in one row per example.

Results equal the uncached path's within float rounding: the network runs in
inference mode in both (`train_batchnorm=False`: BatchNormalization uses its
moving statistics, Dropout inside the network is off), so the bottom's
outputs do not depend on the step. Nothing changes, and a log line says why,
with random augmentation (the bottom's inputs change every epoch),
`train_batchnorm=True`, `unfreeze="all"`, LoRA, several workers, or a network
that is not a Keras functional model.

Example:

```python
model.fit(x, y, phases=[kt.HeadPhase(), kt.FineTunePhase(epochs=5, unfreeze=20)])
# Phase 'fine_tune': the frozen bottom ran once; the steps run the unfrozen top on its 1
# cached output(s) (1,440 values per example).
```
"""

from __future__ import annotations

import contextlib
import logging

import keras
import numpy as np

from keras_transfer.cache_key import _config_digest, weights_digest
from keras_transfer.feature_cache import CacheUnwritableError, extract_features
from keras_transfer.training import say

logger = logging.getLogger("keras_transfer")


class CutError(ValueError):
    """The network cannot be cut into a frozen bottom and a trained top (the reason)."""


class FrozenBottom(keras.layers.Layer):
    """The frozen bottom of an image backbone: raw images -> the tensors crossing the cut.

    Called on a batch of raw images it preprocesses them, runs the network up
    to the cut in inference mode and returns one float row per example (the
    crossing tensors flattened side by side), what the cache stores. `top`
    maps such rows back to the backbone's features.

    Args:
        backbone: an `ImageBackbone` whose network is a functional Keras
            model, with its layers' `trainable` flags already set.

    Raises:
        CutError: saying why the network cannot be cut.
    """

    def __init__(self, backbone, **kwargs):
        super().__init__(name="frozen_bottom", **kwargs)
        network = getattr(backbone, "network", None)
        if not isinstance(network, keras.Model) or not hasattr(network, "_nodes_by_depth"):
            raise CutError(f"the backbone's network ({type(network).__name__}) is not a "
                           "functional Keras model")
        self.backbone_name = backbone.cache_key().get("backbone", "custom")
        self.preprocessor = backbone.preprocessor
        crossing, frozen_layers = _cut(network)
        if not frozen_layers:
            raise CutError("no layer with weights is frozen below the unfrozen ones")
        self.cut = [_position(network, t) for t in crossing]
        inputs, outputs = (t[0] if len(t) == 1 else t for t in (network.inputs,
                                                                 network.outputs))
        crossing = crossing[0] if len(crossing) == 1 else crossing
        self.bottom = keras.Model(inputs, crossing, name="bottom")
        # A functional model from intermediate tensors: the same layers (and weights).
        self.top_network = keras.Model(crossing, outputs, name="top")
        input_shape = (None, *backbone.input_shape_)
        shapes = self.bottom.compute_output_shape(input_shape)
        shapes = list(shapes) if isinstance(crossing, list) else [shapes]
        self.shapes = [tuple(int(d) for d in s[1:]) for s in shapes]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.key = {**backbone.cache_key(), "backbone": f"{self.backbone_name}.bottom",
                    "architecture": _config_digest(network),
                    "weights": weights_digest(*frozen_layers),
                    "preprocessor": _config_digest(backbone.preprocessor),
                    "dtype_policy": network.dtype_policy.name, "cut": self.cut}

    @property
    def row_size(self) -> int:
        """Values cached per example."""
        return sum(self.sizes)

    def cache_key(self) -> dict:
        """What the cached rows depend on (see `cache_key.model_key`): weights below the cut."""
        return self.key

    def call(self, images, training=None):
        outputs = self.bottom(self.preprocessor(images), training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        rows = [keras.ops.reshape(t, (keras.ops.shape(t)[0], -1)) for t in outputs]
        return rows[0] if len(rows) == 1 else keras.ops.concatenate(rows, axis=-1)

    def top(self, rows, training=None):
        """The unfrozen top, in inference mode as the backbone runs: cached rows -> features."""
        parts, start = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            parts.append(keras.ops.reshape(rows[:, start:start + size], (-1, *shape)))
            start += size
        return self.top_network(parts[0] if len(parts) == 1 else parts, training=False)


def _cut(network):
    """`(tensors crossing the cut, layers whose every output is frozen and have weights)`."""
    frozen = {id(t) for t in network.inputs}
    crossing, frozen_ops, live_ops = {}, [], set()
    for depth in sorted(network._nodes_by_depth, reverse=True):
        for node in network._nodes_by_depth[depth]:
            if node.is_input:
                continue
            inputs = node.input_tensors
            if not node.operation.trainable_weights and all(id(t) in frozen for t in inputs):
                frozen.update(id(t) for t in node.outputs)
                frozen_ops.append(node.operation)
                continue
            live_ops.add(id(node.operation))
            for tensor in inputs:
                if id(tensor) in frozen:
                    crossing.setdefault(id(tensor), tensor)
    if any(id(t) in frozen for t in network.outputs):
        raise CutError("nothing in the network trains")
    if any(id(op) in live_ops for op in frozen_ops):
        raise CutError("a layer is shared by the frozen bottom and the trained top")
    if all(id(t) in {id(i) for i in network.inputs} for t in crossing.values()):
        raise CutError("the first layer of the network trains")
    producers = {id(t._keras_history.operation) for t in crossing.values()}
    if len(producers) < len(crossing):
        raise CutError("two outputs of one layer cross the cut")
    seen = set()
    layers = []
    for op in frozen_ops:
        if op.weights and id(op) not in seen:
            seen.add(id(op))
            layers.append(op)
    return list(crossing.values()), layers


def _position(network, tensor) -> list:
    """`[layer index, output index]` of a tensor: its place, whatever the layers' names."""
    history = tensor._keras_history
    return [network.layers.index(history.operation), int(history.tensor_index)]


def why_not(phase, model, data) -> str | None:
    """Why the phase cannot cache a frozen bottom, or None when it can."""
    if phase.lora_rank or phase.unfreeze in ("all", None):
        return (f"{'LoRA adapters' if phase.lora_rank else 'unfreeze=' + repr(phase.unfreeze)}"
                " train throughout the network: no bottom is frozen")
    backbone = model.backbone
    if data.augmentation is not None or getattr(phase, "shift", 0.0):
        return ("augmentation is random, so the frozen bottom's outputs change every epoch")
    if getattr(backbone, "train_batchnorm", False):
        return ("train_batchnorm=True runs the network in training mode (Dropout and "
                "BatchNormalization statistics change with every step)")
    if not hasattr(backbone, "preprocessor") or not hasattr(backbone, "input_shape_"):
        return f"the backbone {type(backbone).__name__} is not an image backbone"
    if data.multi_worker:
        return "several workers train (each would need its own share of the cache)"
    return None


def cached_fine_tune(phase, model, data, verbose):
    """Training and validation batches of the frozen bottom's cached outputs, and the context.

    Args:
        phase: the `FineTunePhase` (its layers already unfrozen).
        model: the `TransferModel`.
        data: the `training.FitData`.
        verbose: print what happens.

    Returns:
        `(train, validation, context)`: the model trains on the batches
        inside `context`; or None when the whole network runs (the log says
        why).
    """
    if phase.feature_cache is False:
        return None
    reason = why_not(phase, model, data)
    if reason is None:
        try:
            bottom = FrozenBottom(model.backbone)
        except CutError as error:
            reason = f"the network cannot be cut: {error}"
    if reason is not None:
        if phase.feature_cache is True:
            raise ValueError(f"Received FineTunePhase(feature_cache=True), but {reason}. "
                             "Pass feature_cache='auto' to run the whole network instead.")
        if not phase.lora_rank and phase.unfreeze not in ("all", None):  # else as expected
            say(f"Phase '{phase.name}': the whole network runs every step ({reason}).",
                verbose)
        return None

    def caches(split):
        return {name: extract_features(model, x, y, head=name, batch_size=data.batch_size,
                                       cache_dir=phase.cache_dir, verbose=verbose,
                                       bottom=bottom)
                for name, (x, y) in split.items()}

    try:
        found = {"train": caches(data.train),
                 "validation": None if data.validation is None else caches(data.validation)}
    except CacheUnwritableError as error:
        if phase.feature_cache is True:
            raise
        logger.warning("%s The fine-tune phase runs the whole network instead.", error)
        return None
    say(f"Phase '{phase.name}': the frozen bottom ran once; the steps run the unfrozen top on "
        f"its {len(bottom.cut)} cached output(s) ({bottom.row_size:,} values per example).",
        verbose)
    train, validation = data.cached_batches(found)
    context = contextlib.ExitStack()
    context.enter_context(model.features_as_inputs(bottom.top))
    context.callback(lambda: [c.close() for split in found.values() if split
                              for c in split.values()])
    return train, validation, context
