"""SavedModel export: serving signatures, metadata and safe replacement.

An export is a TensorFlow SavedModel whose signatures take raw inputs (the
preprocessing is inside), plus `metadata.json` with the class names, the
backbone, the input size, the preprocessing, metrics and library versions.

The export is written to a temporary folder beside the target, reloaded and
checked, and only then renamed into place. An existing export is replaced
only with `overwrite=True`, only when it holds nothing but an export, and is
kept until the new one is complete, so a failure never leaves a
half-written or half-overwritten export. A process killed between the two
renames of a replacement leaves the old export in a hidden `.NAME.old-*`
folder: the next export to the same path, or `load_metadata`, puts it back.
The next export also removes the staging folders of killed exports.

ONNX and LiteRT exports (`export_model(format=...)`, written and checked by
`export_formats.py`) are folders too, staged and replaced by the same rules.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import time
import uuid

import numpy as np

from keras_transfer import __version__, export_formats
from keras_transfer.errors import DataError, ExportError

# TensorFlow and Keras are imported where an export is written or read, so
# the command line checks its paths before the slow imports.

logger = logging.getLogger("keras_transfer")

METADATA_FILE = "metadata.json"
# What an export folder holds: the SavedModel, its metadata, the CLI's
# training report, and files operating systems drop into any folder.
EXPORT_ENTRIES = frozenset({"saved_model.pb", "saved_model.pbtxt", "fingerprint.pb", "variables",
                            "assets", METADATA_FILE, "report", ".DS_Store", "Thumbs.db",
                            "desktop.ini",
                            # ONNX and LiteRT exports (export_formats.py), and the
                            # vocabulary files KerasHub tokenizers write beside them.
                            "model.onnx", "model.tflite", "vocabulary.txt", "vocabulary.json",
                            "vocabulary.spm", "merges.txt"})
# What makes a folder an export, in each format.
EXPORT_FILES = ("saved_model.pb", "model.onnx", "model.tflite")


def _library_versions() -> dict:
    # lazy: the CLI checks export paths without Keras or TensorFlow
    import keras
    import tensorflow as tf

    return {
        "keras_transfer": __version__,
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def build_metadata(model, metrics=None) -> dict:
    """The content of `metadata.json` for `model`."""
    return {
        "format": "keras_transfer/saved_model/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **model_metadata(model),
        "signatures": sorted(model.serving_endpoints()),
        # JSON has no NaN: a metric that is not a number is recorded as null.
        "metrics": {k: (v if np.isfinite(v) else None)
                    for k, v in check_metrics(metrics).items()},
        "versions": _library_versions(),
    }


def model_metadata(model) -> dict:
    """What `metadata.json` says about a `TransferModel`, its backbone and heads."""
    specs = model.head_specs
    heads = {n: {**spec.get_config(), "output": spec.output} for n, spec in specs.items()}
    return {
        **model.backbone.metadata(),
        "task": model.kind if model.single else "multitask",
        "num_classes": model.num_classes,
        "class_names": model.class_names,
        "output": specs[next(iter(specs))].output if model.single else {
            n: spec.output for n, spec in specs.items()},
        "heads": heads,
    }


def check_metrics(metrics) -> dict:
    """`{name: float}` from the metrics given to an export.

    A nested dict (several heads' `evaluate`) is flattened to
    `{f"{head}_{metric}": value}`.

    Raises:
        DataError: not a dict of names to single numbers (named in the message).
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise DataError(f"Received metrics of type {type(metrics).__name__}; expected a dict "
                        "{name: number}, e.g. model.evaluate(...)'s result. Nothing was "
                        "written.")
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update({f"{key}_{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    checked = {}
    for name, value in flat.items():
        try:
            if isinstance(value, (str, bytes, bool)) or np.size(value) != 1:
                raise TypeError
            checked[str(name)] = float(np.asarray(value).reshape(()))
        except (TypeError, ValueError):
            raise DataError(f"Received metrics[{name!r}] = {str(value)[:80]!r}, which is not "
                            "a number; expected {name: number}. Nothing was written.") from None
    return checked


def check_backend(format: str = "saved_model") -> None:
    """Checks that Keras runs on TensorFlow, which writes every format.

    A SavedModel is TensorFlow's; the ONNX and LiteRT files are converted
    from TensorFlow traces (Keras's own exporters on TensorFlow: its JAX
    ONNX path needs jax2onnx and cannot quantize, and it has no JAX LiteRT
    path). A model trained on another backend exports from its `.keras`
    file: the `keras-transfer export` command runs on TensorFlow whatever
    `KERAS_BACKEND` says.

    Raises:
        ExportError: Keras runs on another backend (named in the message).
    """
    # lazy: the CLI checks export paths without Keras
    import keras

    backend = keras.config.backend()
    if backend != "tensorflow":
        what = {"onnx": "an ONNX file", "litert": "a LiteRT file"}.get(format, "a SavedModel")
        raise ExportError(
            f"Exporting {what} needs Keras on the TensorFlow backend; this process runs "
            f"Keras on {backend!r} (KERAS_BACKEND={backend}). Save the model with "
            "model.save('model.keras'), then run `keras-transfer export model.keras out/"
            f"{'' if format == 'saved_model' else ' --format ' + format}` "
            "with TensorFlow installed (pip install tensorflow): the command exports on "
            "TensorFlow whatever KERAS_BACKEND says. Nothing was written.")


def _is_saved_model(path: str) -> bool:
    """Whether `path` holds an export (a SavedModel, or an ONNX or LiteRT file)."""
    return any(os.path.isfile(os.path.join(path, f)) for f in EXPORT_FILES)


def check_export_path(path, overwrite: bool = False) -> str:
    """Checks that an export can be written to `path`, before any work is done.

    An export lost by a replacement that was killed midway is put back first
    (see `recover_export`), so the check sees it.

    Args:
        path: str. The export folder.
        overwrite: bool. Whether an existing export may be replaced.

    Returns:
        The absolute path.

    Raises:
        ExportError: `path` exists and `overwrite` is False; `path` is not
            an export, or holds files besides the export (which replacing it
            would delete); or the folder cannot be created.
    """
    path = os.path.abspath(os.fspath(path))
    recover_export(path)
    if os.path.exists(path):
        if not overwrite:
            raise ExportError(
                f"Received export path {path!r}, which already exists. Pass "
                "overwrite=True (CLI: --overwrite) to replace it, or choose a new path."
            )
        if not _is_saved_model(path):
            raise ExportError(
                f"Refusing to overwrite {path!r}: it exists but is not a "
                "SavedModel, ONNX or LiteRT export, so replacing it could destroy other files. "
                "Choose another path or remove it yourself."
            )
        foreign = sorted(set(os.listdir(path)) - EXPORT_ENTRIES) + _foreign_inside(path)
        if foreign:
            raise ExportError(
                f"Refusing to overwrite {path!r}: besides the export it holds {foreign[:10]}, "
                "which replacing the export would delete. Move them out of the folder, or "
                "export to another path.")
        return path
    check_can_create(path)
    return path


# What an export writes inside its own subfolders (assets: those the SavedModel names).
_VARIABLES = re.compile(r"^variables\.(index|data-\d+-of-\d+)$")
_REPORT = frozenset({"metrics.json", "history.png"})
_SYSTEM_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


def _foreign_inside(path: str) -> list[str]:
    """Files in an export's `variables/`, `assets/` and `report/` that no export wrote.

    Replacing the export replaces these folders whole, so such files would be lost.
    """
    foreign = []
    for folder in ("variables", "assets", "report"):
        root = os.path.join(path, folder)
        if not os.path.isdir(root):
            continue
        ours = _asset_names(path) if folder == "assets" else None
        for name in sorted(os.listdir(root)):
            if name in _SYSTEM_FILES:
                continue
            written = (_VARIABLES.match(name) if folder == "variables" else
                       name in _REPORT if folder == "report" else name in ours)
            if not written or os.path.isdir(os.path.join(root, name)):
                foreign.append(f"{folder}/{name}")
    return foreign


def _asset_names(path: str) -> set[str]:
    """The asset files the SavedModel at `path` names (read from saved_model.pb)."""
    # lazy: TensorFlow is imported only to read a SavedModel
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    try:
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            saved.ParseFromString(f.read())
    except Exception:  # noqa: BLE001 - unreadable: no asset counts as ours
        return set()
    return {asset.filename for graph in saved.meta_graphs for asset in graph.asset_file_def}


def check_can_create(path) -> None:
    """Checks that `path` (a file or folder, with missing parents) can be created.

    Raises:
        ExportError: a parent is a file, or the closest existing folder is
            not writable.
    """
    path = os.path.abspath(os.fspath(path))
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ExportError(f"Cannot write {path!r}: {ancestor!r} is a file, not a folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ExportError(f"Cannot write {path!r}: no permission to write in "
                          f"{ancestor!r}. Choose a folder you can write to.")


def _siblings(path: str, kind: str) -> list[str]:
    """The hidden staging (`"tmp"`) or backup (`"old"`) folders of exports to `path`."""
    parent, base = os.path.split(path)
    prefix = f".{base}.{kind}-"
    if not os.path.isdir(parent):
        return []
    return sorted(os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(prefix))


def _owner_is_running(folder: str) -> bool:
    """Whether the process that made a staging or backup folder still runs.

    The folders are named `.NAME.tmp-<pid>-<random>`; a folder whose process
    is gone was left by a killed export. When in doubt, the answer is yes.
    """
    try:
        pid = int(folder.rsplit("-", 2)[-2])
    except (ValueError, IndexError):
        return False  # an older naming scheme: no process of this version
    if pid == os.getpid() or os.name == "nt":  # os.kill(pid, 0) would end it on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by someone else
    return True


def recover_export(path) -> str | None:
    """Puts back an export left behind by a replacement that was killed midway.

    `export_saved_model(overwrite=True)` moves the old export aside, then
    renames the new one into place. A process killed between the two renames
    leaves no export at `path` and the old one in `.NAME.old-<pid>-<random>`:
    this renames it back.

    Args:
        path: str. The export folder.

    Returns:
        The folder the export was put back from, or None when nothing was
        missing.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        return None
    backups = [b for b in _siblings(path, "old")
               if _is_saved_model(b) and not _owner_is_running(b)]
    if not backups:
        return None
    newest = max(backups, key=os.path.getmtime)
    os.rename(newest, path)
    logger.warning("The export at %s was missing: a replacement of it was killed before it "
                   "finished. The previous export was put back from %s.", path, newest)
    return newest


def _remove_leftovers(path: str) -> None:
    """Removes staging and backup folders of killed exports to `path`."""
    for folder in _siblings(path, "tmp") + _siblings(path, "old"):
        if not _owner_is_running(folder):
            logger.info("Removing %s, left by an export that was killed.", folder)
            shutil.rmtree(folder, ignore_errors=True)


def export_saved_model(model, path, *, overwrite=False, metrics=None, verify=True) -> str:
    """Writes `model` as a SavedModel with `metadata.json`.

    Args:
        model: a `TransferModel`.
        path: str. Target folder.
        overwrite: bool. Replace an existing export at `path`. A folder that
            is not an export, or that holds other files too, is never
            replaced.
        metrics: dict, optional. Metrics to record in the metadata.
        verify: bool. Reload the new export and check its signatures first.

    Returns:
        The absolute path of the export.

    Raises:
        ExportError: Keras runs on a backend other than TensorFlow (see
            `check_backend`), or see `check_export_path`.
    """
    check_backend()
    check_metrics(metrics)
    path = check_export_path(path, overwrite)

    def write(staging):
        _write(model, staging, metrics)
        if verify:
            check_export(staging, expected=sorted(model.serving_endpoints()))

    return stage_export(path, write)


def export_model(model, path, *, format="saved_model", overwrite=False, metrics=None,
                 verify=True, quantize=None, representative_data=None,
                 evaluation_data=None) -> str:
    """Writes `model` in `format` with `metadata.json` (see `export_formats`).

    Args:
        model: a `TransferModel`.
        path: str. Target folder.
        format: str. `"saved_model"`, `"onnx"` or `"litert"`.
        overwrite, metrics, verify: as for `export_saved_model`. An ONNX or
            LiteRT file is always run in its runtime and compared with
            Keras before it replaces anything.
        quantize: str, optional. LiteRT: `"dynamic"`, `"float16"` or `"int8"`.
        representative_data: inputs int8 calibrates on (a sample of the
            training inputs, in any form `predict` takes).
        evaluation_data: `(x, y)`, optional. Held-out data whose accuracy
            in Keras and in the runtime goes into the metadata.

    Returns:
        The absolute path of the export folder.

    Raises:
        ExportError: a bad format or quantization, int8 without data, a
            runtime that is not installed, Keras not on TensorFlow, or see
            `check_export_path`; all before anything is written. Also a
            file that does not match Keras in its runtime (nothing replaced).
    """
    export_formats.check_format(format, quantize, representative_data)
    if format == "saved_model":
        if evaluation_data is not None:
            raise ExportError("Received evaluation_data for a SavedModel export; it measures "
                              "ONNX and LiteRT files against Keras. Use model.evaluate.")
        return export_saved_model(model, path, overwrite=overwrite, metrics=metrics,
                                  verify=verify)
    check_backend(format)
    export_formats.check_runtime(format)
    path = check_export_path(path, overwrite)

    def write(staging):
        file = export_formats.write_format(model, staging, format, quantize=quantize,
                                           representative_data=representative_data)
        checks = export_formats.verify(model, format, file, quantize)
        evaluation = None if evaluation_data is None else \
            export_formats.accuracy(model, format, file, evaluation_data)
        metadata = {**build_metadata(model, metrics),
                    **export_formats.format_metadata(model, format, file, quantize, checks,
                                                     evaluation)}
        metadata.pop("signatures")
        metadata.pop("serving_needs", None)
        with open(os.path.join(staging, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=2, allow_nan=False)

    return stage_export(path, write)


def stage_export(path: str, write) -> str:
    """Runs `write(staging folder)`, then moves the folder to `path`.

    An export already at `path` (checked by `check_export_path`) is moved
    aside first and put back if anything fails; staging and backup folders
    of killed exports are removed.
    """
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    _remove_leftovers(path)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = os.path.join(parent, f".{os.path.basename(path)}.tmp-{token}")
    backup = os.path.join(parent, f".{os.path.basename(path)}.old-{token}")
    try:
        write(staging)
        if os.path.exists(path):
            os.rename(path, backup)
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if os.path.exists(backup) and not os.path.exists(path):
            os.rename(backup, path)  # put the old export back
        raise
    shutil.rmtree(backup, ignore_errors=True)
    return path


def _write(model, folder, metrics):
    # lazy: the CLI checks export paths without Keras
    import keras

    archive = keras.export.ExportArchive()
    archive.track(model)
    for name, (function, signature) in model.serving_endpoints().items():
        archive.add_endpoint(name=name, fn=function, input_signature=signature)
    archive.write_out(folder, verbose=False)
    with open(os.path.join(folder, METADATA_FILE), "w", encoding="utf-8") as f:
        json.dump(build_metadata(model, metrics), f, indent=2, allow_nan=False)


def load_saved_model(path: str):
    """`tf.saved_model.load(path)`, saying what to import when an op is missing.

    A text export holds KerasHub's tokenizer ops, which `tensorflow_text`
    registers: a process that loads it must `import tensorflow_text` first.

    Raises:
        ExportError: the SavedModel uses ops this process has not registered.
    """
    # lazy: TensorFlow is optional (Keras on JAX)
    import tensorflow as tf

    try:
        return tf.saved_model.load(path)
    except tf.errors.NotFoundError as error:
        if "Op type not registered" not in str(error):
            raise
        op = re.search(r"Op type not registered '([^']+)'", str(error))
        raise ExportError(
            f"Cannot load the SavedModel {path!r}: it uses the op "
            f"{op.group(1) if op else '?'!r}, which this process has not registered. A text "
            "export's tokenizer ops come from tensorflow_text: `import tensorflow_text` "
            "(pip install tensorflow-text) before tf.saved_model.load.") from None


def check_export(path: str, expected=("serving_default",)) -> None:
    """Loads a SavedModel and checks that it has the expected signatures."""
    loaded = load_saved_model(path)
    missing = set(expected) - set(loaded.signatures)
    if missing:
        raise ExportError(f"The export at {path!r} lacks signatures {sorted(missing)}.")


def load_metadata(path: str) -> dict:
    """Reads the `metadata.json` of an export.

    An export lost by a replacement that was killed midway is put back
    first (see `recover_export`).
    """
    recover_export(path)
    file = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(file):
        raise ExportError(f"{path!r} has no {METADATA_FILE}: not a keras_transfer export.")
    with open(file, encoding="utf-8") as f:
        return json.load(f)
