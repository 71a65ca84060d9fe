"""Measuring catastrophic forgetting: how far fine-tuning moved a backbone.

`forgetting_report` compares an original backbone with its fine-tuned self
on a probe set: accuracy kept on an earlier task, representation drift per
block (linear CKA and cosine similarity) and relative weight change per
layer, for image backbones and KerasHub text backbones alike.
`snapshot_backbone` keeps the copy of the original to compare with.

Example:

```python
original = kt.snapshot_backbone(model)               # before fine-tuning
model.fit(x, y, head_epochs=2, fine_tune_epochs=3)
report = kt.forgetting_report(original, model, x_test[:200],
                              earlier_task=(head_a, xa_test, ya_test))
print(report)
report.plot("forgetting.png")
```
"""

from __future__ import annotations

import dataclasses
import math
import re

import keras
import numpy as np

from keras_transfer.errors import BackboneError, DataError
from keras_transfer.image import ImageBackbone
from keras_transfer.plots import plot_forgetting
from keras_transfer.text import TextBackbone, TextPooling


def snapshot_backbone(model) -> keras.Model:
    """A frozen copy of a backbone, to measure forgetting against later.

    Args:
        model: a `TransferModel`, `TextTransferModel`, `MultiTaskModel`,
            `TextMultiTaskModel` (its `backbone` is copied), any functional
            `keras.Model` or a KerasHub backbone.

    Returns:
        A new `keras.Model` with the same architecture and weights. Its
        weights are not shared, so later training leaves it unchanged.
        Plain Keras models are copied with `keras.models.clone_model`;
        subclasses (KerasHub backbones such as `BertBackbone`) are rebuilt
        with `type(backbone).from_config(backbone.get_config())`, so the
        copy keeps its class (and, e.g., `hidden_dim`); each way is the
        fallback of the other.

    Example:
        >>> original = kt.snapshot_backbone(model)   # before fine-tuning
        >>> history = model.fit(x_train, y_train, head_epochs=2, fine_tune_epochs=3, verbose=0)
        >>> print(kt.forgetting_report(original, model, x_test))
        Forgetting ...
    """
    backbone = _network(model)
    if not isinstance(backbone, keras.Model):
        raise TypeError(f"Received {type(model).__name__}; expected a transfer model "
                         "with a .backbone or a keras.Model.")

    def from_config():
        return type(backbone).from_config(backbone.get_config())

    def clone():
        return keras.models.clone_model(backbone)

    builtin = type(backbone).__module__.split(".")[0] == "keras"
    failures = []
    for make in (clone, from_config) if builtin else (from_config, clone):
        try:
            copy = make()
            copy.set_weights(backbone.get_weights())
        except Exception as error:  # noqa: BLE001 - the other way may work
            failures.append(f"{make.__name__}: {type(error).__name__}: {str(error)[:200]}")
            continue
        copy.trainable = False
        return copy
    raise BackboneError(
        f"Could not copy the backbone '{backbone.name}' ({type(backbone).__name__}) "
        f"with the same weights: {'; '.join(failures)}. Copy it before changing its "
        "architecture (e.g. before enable_lora), or save it with backbone.save(...) "
        "and load that file as the original.")


_BLOCK = re.compile(r"^(.*?block_?\d+[a-z]?)(?:_|$)")
_TRANSFORMER_LAYER = re.compile(r"^transformer_layer_\d+$")


def _is_text_backbone(backbone) -> bool:
    """Whether `backbone` takes KerasHub token dicts (token ids and padding mask)."""
    try:
        inputs = backbone.input
    except (AttributeError, ValueError, RuntimeError):
        return False
    return isinstance(inputs, dict) and {"token_ids", "padding_mask"} <= set(inputs)


def _sequence_output_layer(backbone) -> str:
    """The layer that outputs a text backbone's final token sequence."""
    output = backbone.output
    if isinstance(output, dict):
        output = output.get("sequence_output", next(iter(output.values())))
    history = getattr(output, "_keras_history", None)
    if history is not None and history[0] in backbone.layers:
        return history[0].name
    return backbone.layers[-1].name


def _output_rank(layer) -> int | None:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError, RuntimeError):
        return None


def block_layers(backbone: keras.Model, max_blocks: int = 8) -> list[str]:
    """Layer names at block boundaries, to compare representations at.

    Layers whose names carry a block number (`block_3_...` in MobileNetV2,
    `block3_...` in VGG, `conv2_block1_...` in ResNet, `block2a_...` in
    EfficientNet) are grouped by block, and the last layer of each block
    with a 4D output is its boundary (`block_3_add`, `block3_pool`). Without
    block names, layers with 4D outputs are used. Up to `max_blocks` evenly
    spaced boundaries are kept, plus the backbone's final output layer.

    KerasHub text backbones (inputs `token_ids`, `padding_mask`, ...): the
    boundaries are the `transformer_layer_N` layers (evenly spaced, up to
    `max_blocks`), plus the layer that outputs the final sequence output
    (`sequence_output`, not the pooler).

    Args:
        backbone: keras.Model. A functional model.
        max_blocks: int. Most boundaries to keep before the final output.

    Returns:
        Layer names, in network order.

    Example:
        >>> block_layers(keras.applications.VGG16(weights=None, include_top=False))
        ['block1_pool', 'block2_pool', 'block3_pool', 'block4_pool', 'block5_pool']
        >>> block_layers(keras_hub.models.BertBackbone(
        ...     vocabulary_size=10, num_layers=4, num_heads=1, hidden_dim=4,
        ...     intermediate_dim=8), max_blocks=2)
        ['transformer_layer_0', 'transformer_layer_2', 'transformer_layer_3']
    """
    layers = [layer for layer in backbone.layers
              if not isinstance(layer, keras.layers.InputLayer)]
    if not layers:
        raise ValueError(f"Received backbone '{backbone.name}' without layers.")
    if _is_text_backbone(backbone):
        candidates = [layer.name for layer in layers if _TRANSFORMER_LAYER.match(layer.name)]
        if not candidates:
            candidates = [layer.name for layer in layers if _output_rank(layer) == 3]
        final = _sequence_output_layer(backbone)
    else:
        groups: dict[str, str] = {}
        for layer in layers:
            match = _BLOCK.match(layer.name)
            if match and _output_rank(layer) == 4:
                groups[match.group(1)] = layer.name  # the last one wins
        candidates = list(groups.values())
        if not candidates:
            candidates = [layer.name for layer in layers if _output_rank(layer) == 4]
        final = layers[-1].name
    candidates = [c for c in candidates if c != final]
    if len(candidates) > max_blocks:
        keep = np.unique(np.linspace(0, len(candidates) - 1, max_blocks).round().astype(int))
        candidates = [candidates[i] for i in keep]
    return candidates + [final]


def linear_cka(x, y) -> float:
    """Linear centered kernel alignment (Kornblith et al., 2019).

    Each example's activations are flattened and centered over the
    examples; CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), computed with
    the n x n Gram matrices when there are fewer examples than features.

    Args:
        x: array `(n, ...)`. Activations of n examples.
        y: array `(n, ...)`. Activations of the same examples elsewhere.

    Returns:
        A float in [0, 1]; 1 for identical representations (also up to
        rotation and isotropic scaling). NaN when either side is constant.

    Example:
        >>> a = np.random.default_rng(0).normal(size=(50, 8))
        >>> round(linear_cka(a, 3 * a), 6)
        1.0
    """
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    if len(x) != len(y):
        raise ValueError(f"Received {len(x)} and {len(y)} examples; expected the same examples.")
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    if len(x) < min(x.shape[1], y.shape[1]):
        gram_x, gram_y = x @ x.T, y @ y.T
        similarity = np.sum(gram_x * gram_y)
        norm = np.linalg.norm(gram_x) * np.linalg.norm(gram_y)
    else:
        similarity = np.linalg.norm(y.T @ x) ** 2
        norm = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    if norm == 0:
        return math.nan
    return float(min(similarity / norm, 1.0))


def mean_cosine_similarity(x, y) -> float:
    """Mean over examples of the cosine between flattened activations.

    Args:
        x: array `(n, ...)`.
        y: array `(n, ...)`.

    Returns:
        A float in [-1, 1]. Two zero vectors count as identical (1).
    """
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    dots = np.sum(x * y, axis=1)
    both_zero = (np.linalg.norm(x, axis=1) == 0) & (np.linalg.norm(y, axis=1) == 0)
    cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
    return float(np.mean(np.where(both_zero, 1.0, cosine)))


def relative_weight_change(original: keras.layers.Layer, finetuned: keras.layers.Layer) -> float:
    """`||W_ft - W_0|| / ||W_0||` over all weights of one layer.

    Returns:
        A float >= 0; NaN when the original weights are all zero and changed.
    """
    change, size, _ = _weight_sums(original, finetuned)
    return _relative(change, size)


def _weight_sums(original, finetuned) -> tuple[float, float, int]:
    """`(||W_ft - W_0||^2, ||W_0||^2, parameters)` over a layer's weights."""
    before = [np.asarray(w, np.float64) for w in original.get_weights()]
    after = [np.asarray(w, np.float64) for w in finetuned.get_weights()]
    if [w.shape for w in before] != [w.shape for w in after]:
        raise ValueError(f"Layer {original.name!r} has weights of shapes "
                         f"{[w.shape for w in before]} in the original backbone but "
                         f"{[w.shape for w in after]} in the fine-tuned one; both "
                         "backbones must have the same architecture.")
    change = sum(float(np.sum((a - b) ** 2)) for a, b in zip(after, before))
    size = sum(float(np.sum(b ** 2)) for b in before)
    return change, size, int(sum(w.size for w in before))


def _relative(change: float, size: float) -> float:
    """`sqrt(change / size)` from squared norms; NaN for a change of nothing."""
    if size == 0:
        return 0.0 if change == 0 else math.nan
    return math.sqrt(change / size)


@dataclasses.dataclass
class ForgettingReport:
    """How much a fine-tuned backbone moved away from the original.

    Attributes:
        blocks: list of dict, one row per block boundary: `block`, `layer`,
            `cka` (linear CKA), `cosine` (mean cosine similarity),
            `weight_change` (relative change of the block's weights) and
            `params` (weights in the block).
        layers: list of dict, one row per layer with weights: `layer`,
            `params`, `weight_change`.
        earlier_task: dict or None: `original_accuracy`,
            `finetuned_accuracy` and `retained` (their ratio).
        weight_change: float. Relative change of all backbone weights.
        probe_size: int. Examples in the probe set.
        probe_kind: str. `"images"` or `"texts"`.
    """

    blocks: list
    layers: list
    earlier_task: dict | None = None
    weight_change: float = 0.0
    probe_size: int = 0
    probe_kind: str = "images"

    @property
    def retained_accuracy(self) -> float | None:
        """Fine-tuned / original accuracy on the earlier task (None without one)."""
        return None if self.earlier_task is None else self.earlier_task["retained"]

    @property
    def mean_cka(self) -> float:
        """Mean linear CKA over the blocks."""
        return float(np.nanmean([row["cka"] for row in self.blocks]))

    @property
    def mean_cosine(self) -> float:
        """Mean cosine similarity over the blocks."""
        return float(np.nanmean([row["cosine"] for row in self.blocks]))

    def table(self) -> list[dict]:
        """The per-block rows (copies), for printing or a DataFrame."""
        return [dict(row) for row in self.blocks]

    def summary(self) -> dict:
        """Headline numbers: mean and lowest CKA, mean cosine, weight change."""
        summary = {
            "mean_cka": self.mean_cka,
            "min_cka": float(np.nanmin([row["cka"] for row in self.blocks])),
            "final_cka": self.blocks[-1]["cka"],
            "mean_cosine": self.mean_cosine,
            "weight_change": self.weight_change,
        }
        if self.earlier_task is not None:
            summary.update(self.earlier_task)
        return summary

    def to_text(self) -> str:
        """A plain-text table of the blocks and the headline numbers."""
        width = max([len("block")] + [len(row["layer"]) for row in self.blocks])
        lines = [f"Forgetting report ({self.probe_size} probe {self.probe_kind})"]
        if self.earlier_task is not None:
            t = self.earlier_task
            lines.append(f"Earlier task accuracy: {t['original_accuracy']:.4f} -> "
                         f"{t['finetuned_accuracy']:.4f} (retained {t['retained']:.1%})")
        lines.append(f"Relative weight change (all weights): {self.weight_change:.4g}")
        header = f"{'layer':<{width}}  {'CKA':>7}  {'cosine':>7}  {'dW/W':>9}  {'params':>9}"
        lines += [header, "-" * len(header)]
        for row in self.blocks:
            lines.append(f"{row['layer']:<{width}}  {row['cka']:>7.4f}  {row['cosine']:>7.4f}  "
                         f"{row['weight_change']:>9.4g}  {row['params']:>9,}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    def plot(self, path=None, title=None):
        """Draws the report (see `plots.plot_forgetting`); returns the figure."""
        return plot_forgetting(self, path=path, title=title)


def _network(model):
    """The pretrained network of a transfer model, a backbone component, or itself."""
    component = getattr(model, "backbone", model)
    return getattr(component, "network", component)


def _component(models, preprocessing, text: bool, probe):
    """The backbone component whose data path turns probe inputs into network inputs.

    The first transfer model (or component) given lends its own, the path its
    training used, unless `preprocessing` is given; a bare network is wrapped
    in an `ImageBackbone` or a `TextBackbone` for the same path.
    """
    if preprocessing is None:
        for model in models:
            component = getattr(model, "backbone", model)
            if isinstance(getattr(component, "network", None), keras.Model):
                return component
    network = _network(models[0])
    if text:
        if isinstance(preprocessing, str):
            raise ValueError(
                f"Received preprocessing={preprocessing!r} for a text backbone; "
                "expected a tokenizer-preprocessor such as keras_hub.models."
                "TextClassifierPreprocessor(...), or a TextTransferModel to take it from.")
        if preprocessing is None:
            raise ValueError(
                "Received text backbones but no tokenizer: pass the TextTransferModel "
                "(or TextMultiTaskModel) as finetuned_backbone, or "
                "preprocessing=keras_hub.models.TextClassifierPreprocessor(...) made "
                "for this backbone.")
        return TextBackbone(network, preprocessor=preprocessing, sequence_length=getattr(
            preprocessing, "sequence_length", 128))
    if isinstance(probe, (str, bytes)) or (isinstance(probe, (list, tuple)) and probe
                                           and isinstance(probe[0], (str, bytes))):
        raise DataError(
            f"Received texts as probe_images, but '{network.name}' is not a "
            "KerasHub text backbone (it takes no token_ids/padding_mask). Pass "
            "images, or the text backbones to compare.")
    # A network that takes any size is read at the probe images' size.
    size = None if None not in tuple(network.input_shape[1:3]) else \
        (*np.shape(probe)[1:3], 3)
    return ImageBackbone(network, input_shape=size, preprocessing=preprocessing
                         if isinstance(preprocessing, str) else None)


def _network_inputs(component, inputs, keys, batch_size, name, user_preprocessing=None):
    """What the network takes for `inputs` (an array, or `{input: array}` for text).

    The component's own `predict_dataset` reads the inputs as `predict` would
    (resized RGB images, or token dicts), then `network_inputs` preprocesses
    them; `user_preprocessing` (a callable given for images) comes last.
    """
    try:
        parts = [keras.tree.map_structure(np.asarray, component.network_inputs(batch))
                 for batch in component.predict_dataset(inputs, batch_size=batch_size)]
    except DataError as error:
        raise DataError(f"{name}: {error}") from error
    if not isinstance(parts[0], dict):
        return np.concatenate([np.asarray(user_preprocessing(p)) if user_preprocessing else p
                               for p in parts])
    missing = [k for k in keys if k not in parts[0]]
    if missing:
        raise BackboneError(
            f"The tokenizer gives {sorted(parts[0])} but the backbone takes "
            f"{sorted(keys)} (missing {missing}): pass the preprocessor made for this "
            "backbone, e.g. preprocessing=keras_hub.models.TextClassifierPreprocessor"
            ".from_preset(...).")
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}


def _masked_mean(values, padding_mask) -> np.ndarray:
    """Mean over real tokens of `(N, sequence, hidden)` values; others as they are."""
    values = np.asarray(values, np.float64)
    if values.ndim != 3:
        return values
    mask = np.asarray(padding_mask, np.float64)[..., np.newaxis]
    return (values * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)


def _size(data) -> int:
    return len(next(iter(data.values()))) if isinstance(data, dict) else len(data)


def _take(data, start, stop):
    if isinstance(data, dict):
        return {k: v[start:stop] for k, v in data.items()}
    return data[start:stop]


def _batches(function, inputs, batch_size):
    """`function` over batches of `inputs` (an array or a dict of arrays), concatenated."""
    outputs = [function(_take(inputs, i, i + batch_size))
               for i in range(0, _size(inputs), batch_size)]
    if isinstance(outputs[0], (list, tuple)):
        return [np.concatenate([np.asarray(o[k]) for o in outputs]) for k in range(len(outputs[0]))]
    return np.concatenate([np.asarray(o) for o in outputs])


def _outputs_logits(head) -> bool:
    """Whether a head's last layer has no activation (outputs logits)."""
    last = head.layers[-1] if getattr(head, "layers", None) else head
    activation = getattr(last, "activation", None)
    return activation is None or getattr(activation, "__name__", "") == "linear"


def _accuracy(predictions, labels) -> float:
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    if labels.ndim == 2 and labels.shape == predictions.shape and predictions.shape[1] > 1 \
            and np.isin(labels, (0, 1)).all() and not np.allclose(labels.sum(axis=1), 1):
        return float(np.mean((predictions > 0.5) == labels))  # multi-label
    if labels.ndim == 2 and labels.shape == predictions.shape:
        labels = labels.argmax(axis=1)  # one-hot
    labels = labels.reshape(-1)
    if predictions.shape[-1] == 1:
        return float(np.mean((predictions.reshape(-1) > 0.5) == labels))
    return float(np.mean(predictions.argmax(axis=-1) == labels))


def forgetting_report(original_backbone, finetuned_backbone, probe_images, *,
                      earlier_task=None, layers=None, preprocessing=None,
                      max_blocks: int = 8, batch_size: int = 64) -> ForgettingReport:
    """Measures how much fine-tuning changed a backbone (image or text).

    Image backbones compare each block's activations `(N, H, W, C)` as
    they are (flattened per example). KerasHub text backbones (BERT,
    RoBERTa, ...) give `(N, sequence, hidden)` activations that include
    padding positions, whose values mean nothing; each block's output is
    therefore mean-pooled over the padding mask (real tokens only) to one
    `(N, hidden)` vector per text before linear CKA and cosine similarity
    are computed. Weight changes are computed the same way for both.

    Args:
        original_backbone: the backbone before fine-tuning (from
            `snapshot_backbone`), or a transfer model holding it.
        finetuned_backbone: the fine-tuned backbone, or the transfer model
            (`TransferModel`, `TextTransferModel`, `MultiTaskModel`,
            `TextMultiTaskModel`) that holds it; its preprocessing (a text
            model's `tokenize`) is then used for both backbones.
        probe_images: the probe set. Images: array `(N, H, W, C)` of raw
            images (0-255), e.g. a few hundred test images; each block's
            activations on them take N x (block size) floats of memory.
            Text backbones: a list of N strings.
        earlier_task: `(head, x, y)`, optional. A head trained on the
            original backbone for an earlier task, with that task's inputs
            (images, or a list of strings for text) and labels: the report
            gives its accuracy on the original and on the fine-tuned
            backbone. A text head takes pooled features, as the `head` of a
            `TextTransferModel` does; they are pooled with the
            `text_pooling` of the transfer model given (default `"mean"`).
        layers: list of str, optional. Layer names to compare at (default:
            `block_layers(backbone, max_blocks)`).
        preprocessing: images: a mode (`"tf"`, `"caffe"`, `"torch"`,
            `"none"`) or a callable applied to the images first. Text: a
            tokenizer-preprocessor (e.g.
            `keras_hub.models.TextClassifierPreprocessor`) mapping a batch
            of strings to the backbone's token dict; needed only when both
            backbones are bare KerasHub backbones. Defaults to the
            preprocessor of the fine-tuned (or original) transfer model,
            else none.
        max_blocks: int. Most block boundaries to compare at.
        batch_size: int.

    Returns:
        A `ForgettingReport`: `print(report)` shows the table,
        `report.plot()` draws it.

    Example:
        >>> original = kt.snapshot_backbone(model)
        >>> history = model.fit(x_train, y_train, head_epochs=2, fine_tune_epochs=5, verbose=0)
        >>> report = kt.forgetting_report(original, model, x_test[:256],
        ...                               earlier_task=(head_a, xa_test, ya_test))
        >>> retained, cka = report.summary()["retained"], report.mean_cka
        >>> # text: TextTransferModel (or TextMultiTaskModel) and strings
        >>> original = kt.snapshot_backbone(text_model)
        >>> history = text_model.fit(texts, labels, head_epochs=2, fine_tune_epochs=2, verbose=0)
        >>> report = kt.forgetting_report(original, text_model, texts[:256])
    """
    original, finetuned = _network(original_backbone), _network(finetuned_backbone)
    for model, given in ((original, original_backbone), (finetuned, finetuned_backbone)):
        if not isinstance(model, keras.Model):
            raise ValueError(f"Received {type(given).__name__}; expected a keras.Model "
                             "backbone or a model with a .backbone (TransferModel, "
                             "TextTransferModel, MultiTaskModel, TextMultiTaskModel).")
    text = _is_text_backbone(original)
    component = _component((finetuned_backbone, original_backbone), preprocessing, text,
                           probe_images)
    # Earlier-task text heads take features pooled as the transfer model given pools them.
    pooling = next((p for m in (finetuned_backbone, original_backbone)
                    if isinstance(p := getattr(getattr(m, "backbone", None), "pooling", None),
                                  str)), "mean")
    user_preprocessing = preprocessing if callable(preprocessing) and not text else None

    def prepare(inputs, name):
        """Model-ready inputs: preprocessed images or token arrays."""
        keys = list(original.input) if text else None
        return _network_inputs(component, inputs, keys, batch_size, name, user_preprocessing)

    names = list(layers) if layers is not None else block_layers(original, max_blocks)
    for name in names:
        for model in (original, finetuned):
            try:
                model.get_layer(name)
            except ValueError as error:
                raise ValueError(
                    f"Received layer {name!r}, which is not a layer of '{model.name}'. "
                    "Both backbones must have the same architecture; "
                    "kt.block_layers(backbone) lists usable layers.") from error

    def extractor(model):
        try:
            outputs = [model.get_layer(name).output for name in names]
            if isinstance(model.input, dict):
                inputs = model.input
            else:
                inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
            return keras.Model(inputs, outputs)
        except (AttributeError, ValueError, TypeError) as error:
            raise BackboneError(
                f"Could not read the outputs of layers {names} of '{model.name}': "
                f"{error}. The forgetting report needs functional backbones "
                "(built from keras.Input), as keras.applications models are.") from error

    def activations(model, prepared):
        """One array per block; text: mean over real tokens, `(N, hidden)`."""
        extract = extractor(model)

        def run(batch):
            outputs = extract(batch)
            if not isinstance(outputs, (list, tuple)):
                outputs = [outputs]
            if text:
                return [_masked_mean(o, batch["padding_mask"]) for o in outputs]
            return [np.asarray(o) for o in outputs]

        return _batches(run, prepared, batch_size)

    prepared = prepare(probe_images, "probe_images")
    before = activations(original, prepared)
    after = activations(finetuned, prepared)

    # Weight change per layer, and per block (layers up to each boundary).
    layer_rows, totals = [], [0.0, 0.0]
    order = [layer.name for layer in original.layers]
    boundaries = [order.index(name) if name in order else len(order) - 1 for name in names]
    block_sums = [[0.0, 0.0, 0] for _ in names]
    for index, layer in enumerate(original.layers):
        if not layer.weights:
            continue
        try:
            tuned = finetuned.get_layer(layer.name)
        except ValueError as error:
            raise ValueError(f"The fine-tuned backbone has no layer {layer.name!r}; "
                             "both backbones must have the same architecture.") from error
        change, size, params = _weight_sums(layer, tuned)
        layer_rows.append({"layer": layer.name, "params": params,
                           "weight_change": _relative(change, size)})
        totals[0] += change
        totals[1] += size
        block = next((b for b, end in enumerate(boundaries) if index <= end), len(names) - 1)
        block_sums[block][0] += change
        block_sums[block][1] += size
        block_sums[block][2] += params

    rows = []
    for name, a, b, (change, size, params) in zip(names, before, after, block_sums):
        match = _BLOCK.match(name)
        rows.append({
            "block": match.group(1) if match else name,
            "layer": name,
            "cka": linear_cka(a, b),
            "cosine": mean_cosine_similarity(a, b),
            "weight_change": _relative(change, size),
            "params": params,
        })

    earlier = None
    if earlier_task is not None:
        if not isinstance(earlier_task, (tuple, list)) or len(earlier_task) != 3:
            raise ValueError(f"Received earlier_task of type {type(earlier_task).__name__}; "
                             "expected a tuple (head, images, labels) (text: "
                             "(head, texts, labels)).")
        head, x, y = earlier_task
        kind = "texts" if text else "images"
        x = prepare(x, f"earlier_task {kind}")
        if _size(x) != len(np.asarray(y)):
            raise DataError(f"Received {_size(x)} earlier-task {kind} but "
                            f"{len(np.asarray(y))} labels; expected one label per "
                            f"{kind[:-1]}.")
        pool = TextPooling(pooling) if text else None

        def accuracy(model):
            def predict(batch):
                features = model(batch, training=False)
                if pool is not None:
                    features = pool(features, batch["padding_mask"])
                outputs = head(features, training=False)
                if _outputs_logits(head):  # our heads output logits
                    outputs = keras.ops.sigmoid(outputs)  # the argmax is the same
                return outputs

            return _accuracy(_batches(predict, x, batch_size), y)

        first, second = accuracy(original), accuracy(finetuned)
        earlier = {"original_accuracy": first, "finetuned_accuracy": second,
                   "retained": second / first if first else math.nan}

    total = _relative(*totals)
    return ForgettingReport(rows, layer_rows, earlier, total, _size(prepared),
                            "texts" if text else "images")
