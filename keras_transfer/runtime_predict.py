"""`keras-transfer predict` on an ONNX or LiteRT export, run in that file's own runtime.

A SavedModel decodes and resizes images inside its graph (`serving_bytes`).
An ONNX or LiteRT file takes uint8 RGB images at the model's input size (see
`export_formats.format_metadata`), so here each image file is decoded with
Pillow and resized to that size, as a user of that runtime would do it, and
the file runs in ONNX Runtime or the LiteRT interpreter. Neither Keras nor
TensorFlow is imported.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from keras_transfer.errors import DataError, ExportError
from keras_transfer.export_litert import litert_runner
from keras_transfer.export_onnx import onnx_runner
from keras_transfer.image_files import pil_rgb

# The file an export folder holds in each runtime's format, and how to run it.
RUNNERS = {"model.onnx": onnx_runner, "model.tflite": litert_runner}


def runtime_file(folder: str) -> str | None:
    """The ONNX or LiteRT file of an export folder, or None (a SavedModel export)."""
    found = [name for name in RUNNERS if os.path.isfile(os.path.join(folder, name))]
    return os.path.join(folder, found[0]) if found else None


def read_image(file: str, size: tuple[int, int]) -> np.ndarray:
    """An image file as uint8 RGB `(height, width, 3)` at `size` (bilinear resize).

    Raises:
        DataError: the file cannot be read as an image, naming it.
    """
    try:
        with Image.open(file) as image:
            rgb = pil_rgb(image)
            if rgb.size != (size[1], size[0]):
                rgb = rgb.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(rgb, np.uint8)
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"Cannot read {file!r} as an image: {error}") from error


def predict_files(file: str, metadata: dict, images: list[str]) -> list[dict]:
    """Each image file's outputs `{output name: values}` from an ONNX or LiteRT file.

    Args:
        file: str. The `model.onnx` or `model.tflite` of an export.
        metadata: dict. The export's `metadata.json`.
        images: list of str. Image files.

    Returns:
        One dict per image, `{output name: 1-D array}`: `"probabilities"`
        (regression: `"predictions"`) for one head, `{head: ...}` for several.

    Raises:
        ExportError: the export is not an image model.
        DataError: a file is not an image.
    """
    height, width = (metadata.get("input_shape") or [None, None])[:2]
    if metadata.get("kind") != "image" or not height or not width:
        raise ExportError(f"{os.path.dirname(file)!r} is not an image model's export "
                          f"(kind={metadata.get('kind')!r}); predict classifies image files.")
    run = RUNNERS[os.path.basename(file)](file)
    return [{name: np.asarray(values)[0] for name, values in
             run({"images": read_image(image, (height, width))[np.newaxis]}).items()}
            for image in images]


def describe(values, head: dict) -> dict:
    """One head's output for one image, as `keras-transfer predict --json` shows it.

    Args:
        values: 1-D array. The head's outputs for the image.
        head: dict. The head's entry in `metadata.json` (`kind`, `class_names`).

    Returns:
        `{"class", "probability"}`, `{"labels", "probabilities"}` (multi-label)
        or `{"outputs"}` (regression).
    """
    names = head.get("class_names") or [str(i) for i in range(len(values))]
    kind = head.get("kind", "classification")
    if kind == "classification":
        top = int(values.argmax())
        return {"class": names[top], "probability": float(values[top])}
    if kind == "multilabel":
        return {"labels": [n for n, p in zip(names, values) if p >= 0.5],
                "probabilities": {n: float(p) for n, p in zip(names, values)}}
    return {"outputs": [float(v) for v in values]}


def as_text(result: dict) -> str:
    """`describe`'s result as one tab-separated line."""
    if "class" in result:
        return f"{result['class']}\t{result['probability']:.4f}"
    if "labels" in result:
        return ", ".join(result["labels"]) or "(no label above 0.5)"
    return str(result["outputs"])
