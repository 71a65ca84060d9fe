"""How much memory a training phase needs, estimated before it runs.

The method (bytes, per replica: a replica trains on its share of the global
batch):

- **weights**: every variable of the model (backbone and heads), at its
  dtype's size.
- **gradients**: one float32 value per trainable parameter.
- **optimizer**: the optimizer's slots per trainable parameter: 2 for Adam
  (first and second moments), which every phase uses.
- **activations**: what backpropagation keeps, times the batch. The network
  is walked layer by layer (its Keras functional graph gives every tensor's
  shape) and, from the first trainable layer on, the tensors that
  TensorFlow's gradient functions read are counted once each: a
  convolution's or dense layer's input, a ReLU's output, a GELU's input, a
  max pooling's input and output, nothing for a frozen BatchNormalization
  (inference mode), an addition or padding (`kept_activations`). Summing
  every layer's output instead overestimates 2-4 times. To that come the
  gradient buffers of the backward pass (twice the largest layer output),
  the raw and preprocessed input batch, and the forward peak of a frozen
  stretch below the trainable layers (a layer's inputs and output). The
  head phase on cached features (the default) runs the backbone forward
  over batches of at least 64 (`feature_cache.MIN_EXTRACTION_BATCH`),
  holding a layer's inputs and output at once, then trains the heads on
  features: the larger of the two.
- **inputs**: the input pipeline's batches in flight (prefetch): three raw
  batches of float32 inputs.
- **runtime**: what TensorFlow takes beyond those tensors: traced
  functions, oneDNN's reordered copies of the weights and their workspace,
  the update's temporaries, allocator slack. Modelled as a base plus a
  multiple of the weights' bytes, fitted on CPU (TensorFlow 2.21, Keras
  3.15, oneDNN) to MobileNetV2 and ResNet50 at 128x128, batch 8-32:
  190 MiB + 2.5 x weights when training, 40 MiB + 1 x weights forward only.

Measured against the peak resident memory of a training child process
minus its resident memory before the model was built
(`tests/test_memory.py`, configurations not used for fitting): MobileNetV2
112 px batch 24 fine-tuning 479 MiB measured, 530 estimated (x1.11);
ResNet50 96 px batch 8 fine-tuning 857 / 847 (x0.99); ResNet50 128 px batch
16 head phase 469 / 445 (x0.95). On a GPU the tensors are the same but the
runtime part differs (cuDNN workspaces, no oneDNN copies): not measured
here (no GPU was lent).

Example:
    >>> estimate = kt.estimate_memory(model, batch_size=32, phase="fine_tune")
    >>> print(estimate.summary())
    Phase 'fine_tune', 32 examples per replica:
      weights ... MiB
      ...
      total ... MiB
    >>> estimate = kt.estimate_backbone_memory("resnet50", input_size=224, batch_size=32)
    >>> round(estimate.total / 2**30, 1)
    2.3
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import shutil
import subprocess
from collections.abc import Sequence

import keras
import numpy as np

from keras_transfer.contracts import CachingPhase, Phase, UnfreezingPhase
from keras_transfer.distribute import num_replicas
from keras_transfer.feature_cache import MIN_EXTRACTION_BATCH
from keras_transfer.training import leaf_layers, unfreeze_plan

logger = logging.getLogger("keras_transfer")

MiB = 1024 ** 2
GiB = 1024 ** 3
ADAM_SLOTS = 2
PREFETCHED_BATCHES = 3
RUNTIME_BASE = 190 * MiB
RUNTIME_PER_WEIGHT_BYTE = 2.5
RUNTIME_BASE_FORWARD = 40 * MiB
RUNTIME_PER_WEIGHT_BYTE_FORWARD = 1.0


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """The memory a training phase needs, by part, in bytes (per replica).

    Attributes:
        phase: str. `"head"` (cached features or not) or `"fine_tune"`.
        batch_size: int. Examples per replica and step.
        weights, gradients, optimizer, activations, inputs, runtime: int.
            Bytes of each part (see the module docstring).
        notes: tuple of str. What the estimate could not see.
    """

    phase: str
    batch_size: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    inputs: int
    runtime: int
    notes: tuple = ()

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.activations
                + self.inputs + self.runtime)

    def fits(self, available: int | None) -> bool | None:
        """Whether `available` bytes hold it (None when unknown)."""
        return None if available is None else self.total <= available

    def summary(self) -> str:
        """One line per part and the total."""
        parts = ("weights", "gradients", "optimizer", "activations", "inputs", "runtime")
        lines = [f"  {name:12} {format_bytes(getattr(self, name)):>10}" for name in parts]
        lines.append(f"  {'total':12} {format_bytes(self.total):>10}")
        lines += [f"  note: {note}" for note in self.notes]
        return (f"Phase '{self.phase}', {self.batch_size} examples per replica:\n"
                + "\n".join(lines))

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total}


def format_bytes(value: float) -> str:
    """`"1.5 GiB"`, `"300 MiB"`."""
    return f"{value / GiB:.2f} GiB" if value >= GiB else f"{value / MiB:.0f} MiB"


# ------------------------------------------------------------- the network
def _elements(shape) -> int | None:
    dims = list(shape)[1:]
    if any(d is None for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64))


def layer_activations(network: keras.Model) -> list[tuple[object, int, int]]:
    """`(layer, output elements, input elements)` per example, for every leaf layer.

    Sizes are read from the functional graph's shapes. Layers whose sizes
    are not known (no graph, or an unknown dimension) count 0.
    """
    sizes = []
    for layer in leaf_layers(network):
        outputs, inputs = 0, 0
        for node in getattr(layer, "_inbound_nodes", []):
            outputs += sum(_elements(t.shape) or 0 for t in node.output_tensors)
            inputs += sum(_elements(t.shape) or 0 for t in node.input_tensors)
        sizes.append((layer, outputs, inputs))
    return sizes


# What the gradient of each kind of layer reads from the forward pass
# (TensorFlow's gradient functions): a convolution or a dense layer its
# input; ReLU, ReLU6, sigmoid, tanh their output; GELU, swish their input;
# max pooling both; a BatchNormalization in inference mode, additions,
# padding, reshaping and average pooling nothing.
_KEEPS_INPUT = (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Conv1D,
                keras.layers.Conv2D, keras.layers.Conv3D, keras.layers.DepthwiseConv2D,
                keras.layers.SeparableConv2D, keras.layers.Conv2DTranspose,
                keras.layers.LayerNormalization, keras.layers.Multiply)
_KEEPS_NOTHING = (keras.layers.Add, keras.layers.Subtract, keras.layers.Concatenate,
                  keras.layers.ZeroPadding2D, keras.layers.Reshape, keras.layers.Flatten,
                  keras.layers.GlobalAveragePooling2D, keras.layers.AveragePooling2D,
                  keras.layers.Rescaling, keras.layers.Normalization, keras.layers.Dropout,
                  keras.layers.InputLayer, keras.layers.Cropping2D, keras.layers.Permute)
_OUTPUT_ACTIVATIONS = ("relu", "sigmoid", "tanh", "softmax", "elu", "exponential")


def _activation_keeps(activation) -> str | None:
    """`"output"`, `"input"` or None for a layer's built-in activation."""
    name = getattr(activation, "__name__", str(activation))
    if name in ("linear", "None"):
        return None
    return "output" if name in _OUTPUT_ACTIVATIONS else "input"


def _kept(layer) -> set:
    """Which of `"input"`, `"output"` the layer's gradient reads."""
    if isinstance(layer, keras.layers.BatchNormalization):
        # Frozen (the default when fine-tuning): inference mode, a scale and a shift.
        return {"input"} if layer.trainable else set()
    if isinstance(layer, keras.layers.ReLU):  # relu and relu6 read their output
        plain = not layer.negative_slope and not layer.threshold
        return {"output" if plain else "input"}
    if isinstance(layer, keras.layers.Activation):
        keeps = _activation_keeps(layer.activation)
        return {keeps} if keeps else set()
    if isinstance(layer, (keras.layers.MaxPooling2D, keras.layers.MaxPooling1D)):
        return {"input", "output"}
    if isinstance(layer, _KEEPS_NOTHING):
        return set()
    kept = {"input"}  # every other layer: its input (conservative for unknown ones)
    if not isinstance(layer, _KEEPS_INPUT):
        kept.add("output")
    keeps = _activation_keeps(getattr(layer, "activation", None))
    if keeps == "output":
        kept.add("output")
    return kept


def kept_activations(network: keras.Model, first: int = 0) -> int:
    """Elements per example that backpropagation keeps, from leaf layer `first` on.

    Each tensor a gradient reads is counted once, however many layers read it.
    """
    seen = {}
    for layer in leaf_layers(network)[first:]:
        kept = _kept(layer)
        for node in getattr(layer, "_inbound_nodes", []):
            tensors = ([*node.input_tensors] if "input" in kept else []) + \
                      ([*node.output_tensors] if "output" in kept else [])
            for tensor in tensors:
                seen[id(tensor)] = _elements(tensor.shape) or 0
    return sum(seen.values())


def _itemsize(dtype) -> int:
    try:
        return np.dtype(str(dtype)).itemsize
    except TypeError:
        return 2 if "16" in str(dtype) else 4  # bfloat16


def _variable_bytes(variables) -> int:
    return sum(int(np.prod(v.shape)) * _itemsize(v.dtype) for v in variables)


def estimate_memory(model, batch_size: int, phase: str | Phase = "fine_tune", *,
                    cached: bool = True, replicas: int = 1) -> MemoryEstimate:
    """Estimates the memory one training phase of `model` needs.

    Args:
        model: a `TransferModel` with an image or text backbone.
        batch_size: int. The global batch size, as given to `fit`.
        phase: `"head"`, `"fine_tune"`, or a phase (`contracts.Phase`): one
            that does not train the backbone is estimated as the head phase;
            one that does, by its `unfreeze`, `train_batchnorm` and
            `lora_rank` (`contracts.UnfreezingPhase`), else as unfreezing all.
        cached: bool. For the head phase: whether the features are cached
            (the default, without random augmentation).
        replicas: int. Replicas the batch is split over.

    Returns:
        A `MemoryEstimate` per replica. The model is not changed.
    """
    if isinstance(phase, str):
        if phase not in ("head", "fine_tune"):
            raise ValueError(f"Received phase={phase!r}; expected 'head' or 'fine_tune'.")
        trains_backbone = phase == "fine_tune"
        unfreeze, train_batchnorm, lora_rank = "all", False, None
    elif isinstance(phase, Phase):
        trains_backbone = phase.trains_backbone
        # A phase that trains the backbone without saying which layers: all of them.
        unfreeze, train_batchnorm, lora_rank = (
            (phase.unfreeze, phase.train_batchnorm, phase.lora_rank)
            if isinstance(phase, UnfreezingPhase) else ("all", False, None))
    else:
        raise ValueError(f"Received phase={phase!r}; expected 'head', 'fine_tune' or a phase "
                         "(kt.contracts.Phase).")
    per_replica = max(math.ceil(batch_size / max(replicas, 1)), 1)
    backbone = model.backbone
    network = backbone.network
    notes = []
    compute = getattr(network.dtype_policy, "compute_dtype", "float32")
    item = _itemsize(compute)
    sizes = layer_activations(network)
    if not any(out for _, out, _ in sizes):
        notes.append("the network has no functional graph: activations not counted")
    input_elements = int(np.prod(backbone.input_shape_, dtype=np.int64))
    head_params = sum(int(np.prod(w.shape)) for h in model.heads.values() for w in h.weights)
    feature_elements = int(np.prod(backbone.feature_shape, dtype=np.int64))
    weights = _variable_bytes(model.weights)
    # The head's own activations and the raw input batch plus its preprocessed copy.
    head_activations = 2 * feature_elements
    largest = max((out for _, out, _ in sizes), default=0)
    forward_peak = max((out + inp for _, out, inp in sizes), default=0)

    if not trains_backbone:
        trainable = head_params
        head_training = per_replica * (head_activations + 2 * feature_elements) * 4
        if cached:
            extraction = max(per_replica, MIN_EXTRACTION_BATCH)
            activations = max(extraction * (forward_peak + 2 * input_elements) * item,
                              head_training)
        else:
            activations = per_replica * (forward_peak + 2 * input_elements) * item \
                + head_training
        name = "head"
    else:
        if lora_rank:
            notes.append("LoRA: counted as training the whole network's activations")
            plan = [True] * sum(1 for layer in leaf_layers(network) if layer.weights)
        else:
            plan = unfreeze_plan(network, unfreeze, train_batchnorm)
        weighted = [layer for layer in leaf_layers(network) if layer.weights]
        training = [layer for layer, trains in zip(weighted, plan) if trains]
        trainable = sum(int(np.prod(w.shape)) for layer in training
                        for w in layer.weights if _trains(w)) + head_params
        if lora_rank:
            trainable = head_params  # adapters are small next to the rest
        layers = [layer for layer, _, _ in sizes]
        first = min((layers.index(layer) for layer in training if layer in layers),
                    default=len(layers))
        kept = kept_activations(network, first)
        frozen_peak = max((out + inp for _, out, inp in sizes[:first]), default=0)
        activations = per_replica * item * (
            kept + 2 * largest + max(frozen_peak, 2 * input_elements) + head_activations)
        name = "fine_tune"
    gradients = trainable * 4
    optimizer = ADAM_SLOTS * trainable * 4
    inputs = PREFETCHED_BATCHES * per_replica * input_elements * 4
    if name == "head":  # forward only: no gradient graph, no update temporaries
        runtime = int(RUNTIME_BASE_FORWARD + RUNTIME_PER_WEIGHT_BYTE_FORWARD * weights)
    else:
        runtime = int(RUNTIME_BASE + RUNTIME_PER_WEIGHT_BYTE * weights)
    return MemoryEstimate(name, per_replica, int(weights), int(gradients), int(optimizer),
                          int(activations), int(inputs), runtime, tuple(notes))


def _trains(weight) -> bool:
    # BatchNormalization's moving statistics never train; its scale and
    # offset do only with train_batchnorm (already in the plan).
    return not re.search(r"moving_(mean|variance)$", getattr(weight, "path", weight.name))


# --------------------------------------------------------- what is there
def process_memory() -> dict:
    """This process's resident memory now and at its peak, in bytes.

    Read from `/proc/self/status` (`VmRSS`, `VmHWM`) on Linux. The peak is the
    high-water mark of the process's own memory map, which starts afresh at
    `exec`; `ru_maxrss`, the portable fallback, is carried over from the
    process that started this one (a child of a 5 GB pytest reports 5 GB).

    Returns:
        `{"now": int, "peak": int}`; `now` is None where only the fallback
        is available.
    """
    values = {}
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    name, amount = line.split()[:2]
                    values["peak" if name == "VmHWM:" else "now"] = int(amount) * 1024  # kB
    except OSError:
        pass
    if "peak" not in values:
        import resource  # lazy: Unix only

        values = {"now": None,
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # KiB
    return values


def available_memory(device: str = "CPU") -> tuple[int | None, str]:
    """`(bytes, what was read)` the next training can use on `device`.

    Args:
        device: `"CPU"` (RAM available now) or `"GPU"` (the smallest GPU's
            total memory, from `nvidia-smi`).

    Returns:
        The bytes (None when unknown) and where the number came from.
    """
    if device == "GPU":
        totals = gpu_memory_totals()
        if not totals:
            return None, "GPU memory unknown (no nvidia-smi)"
        return min(totals), "nvidia-smi, total memory of the smallest GPU"
    try:
        import psutil  # lazy: optional

        return int(psutil.virtual_memory().available), "available RAM (psutil)"
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable (/proc/meminfo)"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free RAM (sysconf)"
    except (ValueError, OSError, AttributeError):
        return None, "RAM unknown"


def gpu_memory_totals() -> list[int]:
    """Total memory of each NVIDIA GPU in bytes (`nvidia-smi`), or []."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(float(v)) * MiB for v in out.split() if v.strip()]


def warn_if_too_large(model, phases: Sequence[Phase], data, verbose=0) -> list[MemoryEstimate]:
    """Warns when a phase about to run needs more memory than there is.

    Args:
        model: the `TransferModel`.
        phases: the phases about to run.
        data: the `trainer.FitData` (batch size, augmentation, strategy).
        verbose: print the warning as well as logging it.

    Returns:
        The estimates of the phases (empty when they cannot be made).
    """
    device = "GPU" if any(d.lower().startswith("gpu")
                          for d in keras.distribution.list_devices()) else "CPU"
    available, source = available_memory(device)
    estimates = []
    for phase in phases:
        try:
            cached = (not phase.trains_backbone and isinstance(phase, CachingPhase)
                      and phase.uses_cache(data.augmentation))
            estimate = estimate_memory(model, data.batch_size, phase, cached=cached,
                                       replicas=num_replicas(data.strategy))
        except Exception as error:  # noqa: BLE001 - an estimate must never stop training
            logger.debug("No memory estimate for phase %s: %s", phase, error)
            continue
        estimates.append(estimate)
        if estimate.fits(available) is False:
            message = (f"Phase '{phase.name}' may need about {format_bytes(estimate.total)} "
                       f"per {device.lower()} replica at batch size {estimate.batch_size}, "
                       f"more than the {format_bytes(available)} there is ({source}). Lower "
                       "batch_size, unfreeze fewer layers, or run `keras-transfer doctor` "
                       "for the parts.")
            logger.warning(message)
            if verbose:
                print(f"Warning: {message}")
    return estimates
