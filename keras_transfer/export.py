"""SavedModel export: serving signatures, metadata and safe replacement.

An export is a TensorFlow SavedModel whose signatures take raw inputs (the
preprocessing is inside), plus `metadata.json` with the class names, the
backbone, the input size, the preprocessing, metrics and library versions.

The export is written to a temporary folder beside the target, reloaded and
checked, and only then renamed into place. An existing export is replaced
only with `overwrite=True`, and is kept until the new one is complete, so a
failure never leaves a half-written or half-overwritten export.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
import uuid

import keras
import numpy as np
import tensorflow as tf

from keras_transfer.errors import ExportError

METADATA_FILE = "metadata.json"


def _library_versions() -> dict:
    from keras_transfer import __version__

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
        **model.export_metadata(),
        "signatures": sorted(model.serving_endpoints()),
        # JSON has no NaN: a metric that is not a number is recorded as null.
        "metrics": {k: (float(v) if np.isfinite(float(v)) else None)
                    for k, v in (metrics or {}).items()},
        "versions": _library_versions(),
    }


def _is_saved_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "saved_model.pb"))


def export_saved_model(model, path, *, overwrite=False, metrics=None, verify=True) -> str:
    """Writes `model` as a SavedModel with `metadata.json`.

    Args:
        model: a `TransferModel`.
        path: str. Target folder.
        overwrite: bool. Replace an existing export at `path`. A folder that
            is not a SavedModel is never replaced.
        metrics: dict, optional. Metrics to record in the metadata.
        verify: bool. Reload the new export and check its signatures first.

    Returns:
        The absolute path of the export.

    Raises:
        ExportError: if `path` exists and `overwrite` is False, or `path` is
            a folder that does not hold a SavedModel.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if not overwrite:
            raise ExportError(
                f"Received export path {path!r}, which already exists. Pass "
                "overwrite=True (CLI: --overwrite) to replace it, or choose a new path."
            )
        if not _is_saved_model(path):
            raise ExportError(
                f"Refusing to overwrite {path!r}: it exists but is not a "
                "SavedModel export, so replacing it could destroy other files. "
                "Choose another path or remove it yourself."
            )
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = os.path.join(parent, f".{os.path.basename(path)}.tmp-{token}")
    backup = os.path.join(parent, f".{os.path.basename(path)}.old-{token}")
    try:
        _write(model, staging, metrics)
        if verify:
            check_export(staging, expected=sorted(model.serving_endpoints()))
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
    archive = keras.export.ExportArchive()
    archive.track(model)
    for name, (function, signature) in model.serving_endpoints().items():
        archive.add_endpoint(name=name, fn=function, input_signature=signature)
    archive.write_out(folder, verbose=False)
    with open(os.path.join(folder, METADATA_FILE), "w", encoding="utf-8") as f:
        json.dump(build_metadata(model, metrics), f, indent=2)


def check_export(path: str, expected=("serving_default",)) -> None:
    """Loads a SavedModel and checks that it has the expected signatures."""
    loaded = tf.saved_model.load(path)
    missing = set(expected) - set(loaded.signatures)
    if missing:
        raise ExportError(f"The export at {path!r} lacks signatures {sorted(missing)}.")


def load_metadata(path: str) -> dict:
    """Reads the `metadata.json` of an export."""
    file = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(file):
        raise ExportError(f"{path!r} has no {METADATA_FILE}: not a keras_transfer export.")
    with open(file, encoding="utf-8") as f:
        return json.load(f)
