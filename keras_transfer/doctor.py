"""What this machine offers for training: versions, devices, memory, and whether a run fits.

`keras-transfer doctor` prints `format_report(system_report(...))`.

Example:
    >>> report = system_report(backbone="resnet50", input_size=224, batch_size=32)
    >>> print(format_report(report))
    Versions: keras_transfer ...
"""

from __future__ import annotations

import importlib.metadata
import os
import platform

import keras
import numpy as np

from keras_transfer import __version__
from keras_transfer.distribute import find_tpu
from keras_transfer.errors import DataError
from keras_transfer.image import ImageTransferModel
from keras_transfer.lm_memory import GPT_J_6B, MODES, SMOLLM2_135M, advice, estimate_lm_memory
from keras_transfer.memory import (
    MemoryEstimate,
    available_memory,
    estimate_memory,
    format_bytes,
    gpu_memory_totals,
)
from keras_transfer.phases import FineTunePhase, HeadPhase

# The CPU flags that decide TensorFlow's speed on a CPU (/proc/cpuinfo names).
CPU_FEATURES = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
                "amx_tile", "amx_bf16")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_info() -> dict:
    """The CPU's model name, cores this process may use, and its vector features."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:  # not Linux: no flags to read
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {"name": name, "cores": cores,
            "features": [f for f in CPU_FEATURES if f in flags],
            "missing": [f for f in CPU_FEATURES if flags and f not in flags]}


def system_report(backbone: str | None = "mobilenet_v2", input_size: int | None = None,
                  batch_size: int = 32, phases=("head", "fine_tune"),
                  unfreeze="all", num_classes: int = 10) -> dict:
    """Versions, devices, memory, and memory estimates for a chosen run.

    Args:
        backbone: str or None. A registry backbone to estimate for (None:
            no estimate).
        input_size: int, optional. Image side (default: the backbone's).
        batch_size: int. Global batch size.
        phases: the phases to estimate (`"head"`, `"fine_tune"`).
        unfreeze: as for `FineTunePhase`.
        num_classes: int. Classes of the head.

    Returns:
        A JSON-ready dict.
    """
    phases = _check_options(input_size, batch_size, phases, num_classes)
    if keras.backend.backend() == "tensorflow":
        devices = _tensorflow_devices()
    else:
        devices = _keras_devices()
    gpus, tpu_found, tf_version, built_with_cuda = devices
    ram, ram_source = available_memory("CPU")
    try:
        import psutil  # lazy: optional

        ram_total = int(psutil.virtual_memory().total)
    except ImportError:
        ram_total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    on_tensorflow = keras.backend.backend() == "tensorflow"
    if tpu_found:
        auto = "TPUStrategy" if on_tensorflow else "keras.distribution.DataParallel over the TPU"
    elif len(gpus) > 1:
        auto = (f"MirroredStrategy over {len(gpus)} GPUs" if on_tensorflow else
                f"keras.distribution.DataParallel over {len(gpus)} GPUs")
    else:
        auto = "the default strategy (one device)"
    report = {
        "versions": {"keras_transfer": __version__, "keras_backend": keras.backend.backend(),
                     "tensorflow": tf_version, "keras": keras.__version__,
                     "keras_hub": _version("keras-hub"), "numpy": np.__version__,
                     "python": platform.python_version(),
                     "tensorflow_built_with_cuda": built_with_cuda},
        "cpu": cpu_info(),
        "memory": {"total": ram_total, "available": ram, "source": ram_source},
        "gpus": gpus,
        "tpu": tpu_found,
        "auto_strategy": auto,
        "estimates": [],
    }
    if backbone:
        device = "GPU" if gpus else "CPU"
        available, source = available_memory(device)
        replicas = max(len(gpus), 1)
        for phase in phases:
            estimate = estimate_backbone_memory(
                backbone, input_size=input_size, batch_size=batch_size, phase=phase,
                num_classes=num_classes, unfreeze=unfreeze, replicas=replicas)
            report["estimates"].append({
                "backbone": backbone, "input_size": input_size, "batch_size": batch_size,
                "replicas": replicas, "device": device, "available": available,
                "available_source": source, "fits": estimate.fits(available),
                **estimate.as_dict()})
    return report


PHASES = ("head", "fine_tune")
# The estimate builds the model: a head of more classes than this is refused
# before TensorFlow runs out of memory building it (1e6 classes x 1280
# features is 5 GB of float32 weights already).
MAX_CLASSES = 1_000_000


def _check_options(input_size, batch_size, phases, num_classes) -> tuple:
    """Refuses what `keras-transfer doctor` refuses, before anything is built; the phases."""
    for name, value in (("batch_size", batch_size), ("num_classes", num_classes),
                        ("input_size", input_size)):
        if value is None and name == "input_size":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise DataError(f"Received {name}={value!r}; expected a whole number >= 1.")
    if num_classes > MAX_CLASSES:
        raise DataError(f"Received num_classes={num_classes:,} classes; the doctor builds the "
                        f"head to estimate it and takes at most {MAX_CLASSES:,}. Estimate a "
                        "head of that size from its weights: num_classes x features x 4 bytes.")
    if isinstance(phases, str):
        phases = (phases,)
    unknown = [p for p in phases if p not in PHASES]
    if unknown or not phases:
        raise DataError(f"Received phases={tuple(phases)!r}; expected names among {PHASES} "
                        f"(unknown: {unknown}).")
    return tuple(phases)


def _tensorflow_devices():
    """`(gpus, tpu, TensorFlow version, built with CUDA)` as TensorFlow sees them."""
    import tensorflow as tf  # lazy: the TensorFlow backend only

    gpus = []
    totals = gpu_memory_totals()
    for index, device in enumerate(tf.config.list_physical_devices("GPU")):
        details = tf.config.experimental.get_device_details(device)
        gpus.append({"name": details.get("device_name", device.name),
                     "compute_capability": details.get("compute_capability"),
                     "memory": totals[index] if index < len(totals) else None})
    try:
        tpu = find_tpu()
        tpu_found = None if tpu is None else (tpu.master() or "local TPU VM")
    except (ValueError, RuntimeError) as error:
        tpu_found = f"a TPU is named but cannot be resolved: {error}"
    return gpus, tpu_found, tf.__version__, tf.test.is_built_with_cuda()


def _keras_devices():
    """The same as `_tensorflow_devices`, from the devices another Keras backend sees."""
    devices = keras.distribution.list_devices()
    totals = gpu_memory_totals()
    gpus = [{"name": name, "compute_capability": None,
             "memory": totals[i] if i < len(totals) else None}
            for i, name in enumerate(d for d in devices if d.lower().startswith("gpu"))]
    tpus = [d for d in devices if d.lower().startswith("tpu")]
    return gpus, f"{len(tpus)} TPU cores" if tpus else None, _version("tensorflow"), None


def format_report(report: dict) -> str:
    """The report as the lines `keras-transfer doctor` prints."""
    v, cpu, ram = report["versions"], report["cpu"], report["memory"]
    lines = [
        "Versions: " + ", ".join(f"{k} {v[k]}" for k in
                                 ("keras_transfer", "tensorflow", "keras", "keras_hub",
                                  "numpy", "python")),
        f"  Keras backend: {v['keras_backend']}"
        + ("" if v["tensorflow_built_with_cuda"] is None else
           f"; TensorFlow built with CUDA: {'yes' if v['tensorflow_built_with_cuda'] else 'no'}"),
        f"CPU: {cpu['name']}, {cpu['cores']} cores for this process",
        "  features: " + (", ".join(cpu["features"]) or "unknown")
        + (f" (not: {', '.join(cpu['missing'])})" if cpu["missing"] else ""),
        f"Memory: {format_bytes(ram['total'])} total, "
        + (f"{format_bytes(ram['available'])} available" if ram["available"] else
           "available unknown") + f" ({ram['source']})",
    ]
    if report["gpus"]:
        for i, gpu in enumerate(report["gpus"]):
            memory = format_bytes(gpu["memory"]) if gpu["memory"] else "memory unknown"
            lines.append(f"GPU {i}: {gpu['name']}, compute capability "
                         f"{gpu['compute_capability']}, {memory}")
    else:
        lines.append(f"GPUs: none seen by {v['keras_backend']}")
    lines.append(f"TPU: {report['tpu'] or 'none found'}")
    lines.append(f"strategy='auto' would use {report['auto_strategy']}.")
    for e in report["estimates"]:
        size = e["input_size"] or "default"
        fits = {True: "fits", False: "DOES NOT FIT", None: "fit unknown"}[e["fits"]]
        available = format_bytes(e["available"]) if e["available"] else "unknown"
        lines.append(f"Phase '{e['phase']}' of {e['backbone']} at {size} px, global batch "
                     f"{e['batch_size']} on {e['replicas']} {e['device']} replica(s):")
        for part in ("weights", "gradients", "optimizer", "activations", "inputs", "runtime"):
            lines.append(f"    {part:12} {format_bytes(e[part]):>10}")
        lines.append(f"    {'total':12} {format_bytes(e['total']):>10} per replica; {available} "
                     f"available ({e['available_source']}): {fits}.")
    return "\n".join(lines)


def estimate_backbone_memory(backbone: str = "mobilenet_v2", *, input_size: int | None = None,
                             batch_size: int = 32, phase: str = "fine_tune",
                             num_classes: int = 10, unfreeze="all",
                             replicas: int = 1) -> MemoryEstimate:
    """Estimates a phase's memory for a registry backbone, built without weights.

    Args:
        backbone: str. A registry name (`kt.list_backbones()`).
        input_size: int, optional. Image side (default: the backbone's).
        batch_size: int. Global batch size.
        phase: str. `"head"` or `"fine_tune"`.
        num_classes: int. Classes of the head.
        unfreeze: as for `FineTunePhase`.
        replicas: int. Replicas the batch is split over.

    Returns:
        A `MemoryEstimate`.
    """
    shape = None if input_size is None else (int(input_size), int(input_size), 3)
    model = ImageTransferModel(backbone, num_classes, weights=None, input_shape=shape,
                               pooling="avg")
    chosen = HeadPhase() if phase == "head" else FineTunePhase(unfreeze=unfreeze)
    return estimate_memory(model, batch_size, chosen, replicas=replicas)


# CPU features that prebuilt wheels assume: TensorFlow's (since 1.6) and jaxlib's are
# built with AVX and stop with "Illegal instruction" without it; wheels built for
# x86-64-v3 CPUs also need AVX2 and FMA, which otherwise only make things faster.
WHEEL_CPU_FEATURES = {
    "avx": "required by TensorFlow's and jaxlib's prebuilt wheels (Illegal instruction without it)",
    "avx2": "required by wheels built for x86-64-v3 CPUs; otherwise speed",
    "fma": "required by wheels built for x86-64-v3 CPUs; otherwise speed",
}


def wheel_cpu_warnings(cpu: dict | None = None) -> list[str]:
    """Warnings for the CPU features whose absence breaks prebuilt wheels.

    Args:
        cpu: `cpu_info()`'s dict (default: this machine's).

    Returns:
        One line per missing feature (empty when all are there or the flags are unknown).
    """
    cpu = cpu_info() if cpu is None else cpu
    return [f"CPU lacks {name.upper()}: {why}." for name, why in WHEEL_CPU_FEATURES.items()
            if name in cpu["missing"]]


def language_model_report(available: int | None = None, batch_size: int = 1,
                          sequence_length: int = 512) -> list[dict]:
    """Whether GPT-J-6B and SmolLM2-135M fit here for inference, LoRA and full fine-tuning.

    Args:
        available: int, bytes of memory free (default: this machine's).
        batch_size: int. Sequences per step.
        sequence_length: int. Tokens per sequence.

    Returns:
        One dict per (model, mode, dtype): `estimate_lm_memory`'s, with `fits` and `advice`.
    """
    if available is None:
        available = available_memory("CPU")[0]
    rows = []
    for model in (GPT_J_6B, SMOLLM2_135M):
        for mode in MODES:
            for dtype in ("float32", "bfloat16", "int8"):
                e = estimate_lm_memory(model, mode, dtype, batch_size=batch_size,
                                       sequence_length=sequence_length)
                e["fits"] = e["possible"] and (None if available is None
                                               else e["total"] <= available)
                e["advice"] = advice(e, available)
                rows.append(e)
    return rows


def format_language_model_report(rows: list[dict], cpu: dict | None = None) -> str:
    """`language_model_report`'s rows as the lines `keras-transfer doctor` prints."""
    first = rows[0]
    lines = [f"Language models (batch {first['batch_size']} x {first['sequence_length']} tokens; "
             "runtime overhead not included):"]
    for e in rows:
        fits = ("n/a" if not e["possible"] else
                {True: "fits", False: "DOES NOT FIT", None: "fit unknown"}[e["fits"]])
        total = format_bytes(e["total"]) if e["possible"] else "-"
        lines.append(f"  {e['model']:13} {e['mode']:9} {e['dtype']:8} {total:>10}  {fits}"
                     + (f": {e['advice']}" if e["advice"] else ""))
    lines.extend("  " + w for w in wheel_cpu_warnings(cpu))
    return "\n".join(lines)
