"""ONNX and LiteRT exports: one file for the runtime, checked in that runtime.

An export in these formats is a folder, as a SavedModel export is: the model
file (`model.onnx` or `model.tflite`), `metadata.json`, and for text models
the tokenizer's vocabulary. It is written to a hidden staging folder, loaded
in its own runtime (`onnxruntime`, the LiteRT interpreter of
`ai-edge-litert`), run on a few inputs and compared with Keras, and only then
moved into place, by the same rules as the SavedModel (see `export.py`).

The file takes what a user of that runtime has at hand:

- image models: `images`, uint8 `[batch, height, width, 3]` at the model's
  input size (0-255 RGB); the preprocessing is inside.
- text models: `token_ids` and `padding_mask`, int32 `[batch,
  sequence_length]`, as the tokenizer beside the file makes them (segment
  ids, where the network takes them, are zeros inside).

Each head is one output, named as in the SavedModel (`probabilities`,
`predictions`, or the head's name).

Both files are made by Keras's own exporters (`keras.Model.export(format=
"onnx" | "litert")`) called on a small serving model around the
`TransferModel`: Keras traces it with TensorFlow and converts the trace with
tf2onnx (patched by Keras for NumPy 2) or the TFLite converter fed from a
SavedModel (the workaround for `from_keras_model` on Keras 3).
"""

from __future__ import annotations

import importlib.util
import logging
import os

import numpy as np

from keras_transfer.errors import ExportError
from keras_transfer.export_litert import litert_runner, write_litert
from keras_transfer.export_onnx import onnx_runner, write_onnx

logger = logging.getLogger("keras_transfer")

FORMATS = ("saved_model", "onnx", "litert")
QUANTIZATIONS = ("dynamic", "float16", "int8")
MODEL_FILES = {"onnx": "model.onnx", "litert": "model.tflite"}
# Float files must reproduce Keras's probabilities within this (issue 22).
FLOAT_TOLERANCE = 1e-4
VERIFY_EXAMPLES = 8
# The TFLite converter's advice is 100 to 500 calibration examples.
CALIBRATION_EXAMPLES = 200
RUNTIME_PACKAGES = {"onnx": ("onnxruntime", "onnx", "tf2onnx"),
                    "litert": ("ai_edge_litert",)}
PIP_NAMES = {"onnxruntime": "onnxruntime", "onnx": "onnx", "tf2onnx": "tf2onnx",
             "ai_edge_litert": "ai-edge-litert"}


def check_format(format: str, quantize=None, representative_data=None) -> None:
    """Checks the format arguments of an export, before anything is done.

    Args:
        format: str. `"saved_model"`, `"onnx"` or `"litert"`.
        quantize: str, optional. LiteRT only: `"dynamic"`, `"float16"` or
            `"int8"`.
        representative_data: the examples int8 calibrates on.

    Raises:
        ExportError: an unknown format or quantization, a quantization for
            another format than LiteRT, or int8 without data to calibrate on.
    """
    if format not in FORMATS:
        raise ExportError(f"Received format={format!r}; expected one of {list(FORMATS)}.")
    if quantize is not None:
        if format != "litert":
            raise ExportError(
                f"Received quantize={quantize!r} with format={format!r}; quantization is "
                "for format='litert' (ONNX and SavedModel exports are float32).")
        if quantize not in QUANTIZATIONS:
            raise ExportError(f"Received quantize={quantize!r}; expected one of "
                              f"{list(QUANTIZATIONS)} or None.")
        if quantize == "int8" and representative_data is None:
            raise ExportError(
                "Received quantize='int8' without representative_data: full-integer "
                "quantization calibrates on examples. Pass representative_data= with a "
                "sample of the training inputs (e.g. x_train; CLI: --calibration-data), or "
                "use quantize='dynamic', which needs none.")
    if representative_data is not None and quantize != "int8":
        raise ExportError(f"Received representative_data with quantize={quantize!r}; only "
                          "quantize='int8' calibrates on data.")


def check_runtime(format: str) -> None:
    """Checks that the packages that write and run `format` are installed.

    Raises:
        ExportError: naming the missing packages and the install line.
    """
    missing = [PIP_NAMES[p] for p in RUNTIME_PACKAGES.get(format, ())
               if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportError(
            f"The {format} export needs {', '.join(missing)}, which is not installed: "
            f"pip install {' '.join(missing)} (or pip install 'keras-transfer[export]'). "
            "Nothing was written.")


# ----------------------------------------------------------------- serving
def kind_of(model) -> str:
    return model.backbone.metadata()["kind"]


def serving_model(model):
    """A Keras model from the runtime's inputs to `{output name: array}`.

    Keras's exporters trace a model's `call`; this one's call is the
    serving function (preprocessing, the heads' activations, named
    outputs) rather than the `TransferModel`'s own.

    Returns:
        `(serving model, input signature)`: one `tf.TensorSpec` for images;
        a dict of them for text.
    """
    # lazy: the CLI checks the format before Keras picks its backend; TensorFlow is optional
    import keras
    import tensorflow as tf

    def outputs(x):
        out = model.activate(model(x, training=False))
        return {model.head_specs[next(iter(model.head_specs))].output: out} if model.single \
            else dict(out)

    if kind_of(model) == "image":
        height, width = model.backbone.image_size
        signature = [tf.TensorSpec((None, height, width, 3), tf.uint8, name="images")]

        def serve(images):
            return outputs(tf.cast(images, tf.float32))
    else:
        network = model.backbone.network
        names = set(network.input) if isinstance(network.input, dict) else set()
        if not {"token_ids", "padding_mask"} <= names or names - {"token_ids", "padding_mask",
                                                                  "segment_ids"}:
            raise ExportError(
                f"The backbone {network.name!r} takes inputs {sorted(names)}; ONNX and LiteRT "
                "exports serve token_ids and padding_mask (and segment_ids as zeros). Export "
                "a SavedModel (format='saved_model'), which takes strings.")
        length = model.backbone.sequence_length
        spec = tf.TensorSpec((None, length), tf.int32)
        signature = [{"token_ids": tf.TensorSpec.from_spec(spec, name="token_ids"),
                      "padding_mask": tf.TensorSpec.from_spec(spec, name="padding_mask")}]

        def serve(tokens):
            inputs = {"token_ids": tokens["token_ids"], "padding_mask": tokens["padding_mask"]}
            if "segment_ids" in names:
                inputs["segment_ids"] = tf.zeros_like(tokens["token_ids"])
            return outputs(inputs)

    class Serving(keras.Model):
        def __init__(self):
            super().__init__(name="serving")
            self.transfer_model = model  # tracked: its weights go into the file
            self.built = True

        def call(self, inputs):
            return serve(inputs)

    return Serving(), signature


def keras_outputs(model, inputs: dict) -> dict:
    """What the served function gives in Keras for the runtime's `inputs`."""
    serving, _ = serving_model(model)
    x = inputs["images"] if "images" in inputs else inputs
    return {k: np.asarray(v) for k, v in serving(x).items()}


def sample_inputs(model, data=None, count: int = VERIFY_EXAMPLES, seed: int = 0) -> dict:
    """Up to `count` runtime inputs: drawn from `data` when given, else random.

    Args:
        model: a `TransferModel`.
        data: inputs in any form `predict` takes, optional.
        count: int. How many examples at most.
        seed: int. Which random draw.

    Returns:
        `{input name: array}` as the runtime takes them.
    """
    rng = np.random.default_rng(seed)
    if data is not None:
        return draw(model, data, count, seed)
    if kind_of(model) == "image":
        height, width = model.backbone.image_size
        return {"images": rng.integers(0, 256, (count, height, width, 3), dtype=np.uint8)}
    length = model.backbone.sequence_length
    vocabulary = int(model.backbone.network.vocabulary_size)
    ids = rng.integers(0, vocabulary, (count, length), dtype=np.int32)
    lengths = rng.integers(2, length + 1, count)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    return {"token_ids": ids * mask, "padding_mask": mask}


def runtime_inputs(model, batch) -> dict:
    """A batch of `predict_dataset` (float images or token dicts) as the runtime takes it."""
    if kind_of(model) == "image":
        return {"images": np.clip(np.round(np.asarray(batch)), 0, 255).astype(np.uint8)}
    return {k: np.asarray(batch[k]).astype(np.int32) for k in ("token_ids", "padding_mask")}


def draw(model, data, count: int, seed: int = 0) -> dict:
    """A random sample of at most `count` examples of `data`, as runtime inputs.

    Args:
        model: a `TransferModel`.
        data: inputs in any form `predict` takes (arrays, lists of texts,
            folders, datasets), or `(x, y)`, whose `x` is used.
        count: int. The sample's size at most.
        seed: int. Which random sample.

    Returns:
        `{input name: array}`.
    """
    if isinstance(data, tuple) and len(data) == 2:
        data = data[0]
    rng = np.random.default_rng(seed)
    if isinstance(data, (np.ndarray, list)) and len(data) > count:
        picked = np.sort(rng.choice(len(data), count, replace=False))
        data = data[picked] if isinstance(data, np.ndarray) else [data[i] for i in picked]
    batches = [runtime_inputs(model, b) for b in model.backbone.predict_dataset(data)]
    if not batches:
        raise ExportError("Received representative_data with no examples; pass a sample of "
                          "the training inputs.")
    joined = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    total = len(next(iter(joined.values())))
    if total > count:  # a folder or dataset, read whole: keep a random sample of it
        picked = np.sort(rng.choice(total, count, replace=False))
        joined = {k: v[picked] for k, v in joined.items()}
    return joined


# ----------------------------------------------------------------- write
def write_format(model, folder: str, format: str, *, quantize=None,
                 representative_data=None) -> str:
    """Writes the model file of `format` into `folder` (and a text model's vocabulary).

    Returns:
        The model file's path.
    """
    os.makedirs(folder, exist_ok=True)
    file = os.path.join(folder, MODEL_FILES[format])
    serving, signature = serving_model(model)
    if format == "onnx":
        write_onnx(serving, signature, file)
    else:
        calibration = None
        if quantize == "int8":
            calibration = draw(model, representative_data, CALIBRATION_EXAMPLES)
        write_litert(serving, signature, file, quantize=quantize, calibration=calibration)
    if kind_of(model) == "text":
        model.backbone.preprocessor.tokenizer.save_assets(folder)
    return file


def run_file(format: str, file: str):
    """A function `inputs dict -> outputs dict` that runs `file` in its own runtime."""
    if format == "onnx":
        return onnx_runner(file)
    return litert_runner(file)


def verify(model, format: str, file: str, quantize=None, inputs=None) -> dict:
    """Runs `file` in its runtime on a few inputs and compares it with Keras.

    Float files must match Keras's outputs within `FLOAT_TOLERANCE`;
    quantized ones must give finite outputs of the right shapes (how close
    they are is recorded, and measured by accuracy with `evaluation_data`).

    Returns:
        What `metadata.json` records: the examples compared, the largest
        absolute difference per output and, for classifiers, how often the
        top class agrees.

    Raises:
        ExportError: the file does not load or run in its runtime, lacks an
            output, or differs from Keras.
    """
    inputs = inputs if inputs is not None else sample_inputs(model)
    expected = keras_outputs(model, inputs)
    try:
        got = run_file(format, file)(inputs)
    except Exception as error:  # noqa: BLE001 - each runtime raises its own kinds
        raise ExportError(f"The written {format} file does not run in its runtime: "
                          f"{type(error).__name__}: {str(error)[:300]}. Nothing was "
                          "replaced.") from error
    if sorted(got) != sorted(expected):
        raise ExportError(f"The {format} file has outputs {sorted(got)}; expected "
                          f"{sorted(expected)}. Nothing was replaced.")
    report = {"examples": int(len(next(iter(inputs.values())))), "max_abs_diff": {},
              "top1_agreement": {}}
    for name, want in expected.items():
        have = np.asarray(got[name], np.float32).reshape(want.shape)
        if not np.all(np.isfinite(have)):
            raise ExportError(f"The {format} file gives non-finite {name!r}. Nothing was "
                              "replaced.")
        diff = float(np.abs(have - want).max())
        report["max_abs_diff"][name] = diff
        if want.ndim == 2 and want.shape[1] > 1:
            report["top1_agreement"][name] = float(np.mean(have.argmax(1) == want.argmax(1)))
        tolerance = FLOAT_TOLERANCE * max(1.0, float(np.abs(want).max()))
        if quantize is None and diff > tolerance:
            raise ExportError(
                f"The {format} file's {name!r} differs from Keras by {diff:.2e} (more than "
                f"{tolerance:.0e}) on {report['examples']} examples. Nothing was replaced; "
                "please report this with the model's backbone.")
    return report


def accuracy(model, format: str, file: str, evaluation_data) -> dict:
    """The accuracy of Keras and of the file in its runtime on held-out `(x, y)`.

    Raises:
        ExportError: `evaluation_data` is not `(x, y)`, or the model is not
            a single-head classifier.
    """
    if not (isinstance(evaluation_data, tuple) and len(evaluation_data) == 2):
        raise ExportError(f"Received evaluation_data of type {type(evaluation_data).__name__}; "
                          "expected (x, y), held-out inputs and their labels.")
    if not model.single or model.kind != "classification":
        raise ExportError("evaluation_data measures accuracy, which needs a model with one "
                          "classification head; this one has heads "
                          f"{sorted(model.head_specs)} ({model.kind}).")
    dataset, _ = model.make_dataset(*evaluation_data, batch_size=32)
    run = run_file(format, file)
    right = {"keras": 0, "export": 0}
    count = 0
    for x, labels in dataset:
        inputs = runtime_inputs(model, x)
        labels = np.asarray(labels)
        (want,) = keras_outputs(model, inputs).values()
        (have,) = run(inputs).values()
        right["keras"] += int(np.sum(np.argmax(want, 1) == labels))
        right["export"] += int(np.sum(np.argmax(have, 1) == labels))
        count += len(labels)
    if count == 0:
        raise ExportError("Received evaluation_data with no examples.")
    return {"examples": count, "keras": right["keras"] / count,
            "export": right["export"] / count}


def format_metadata(model, format: str, file: str, quantize, verification, evaluation):
    """What `metadata.json` adds for an ONNX or LiteRT file."""
    if kind_of(model) == "image":
        height, width = model.backbone.image_size
        inputs = {"images": f"uint8 [batch, {height}, {width}, 3], RGB 0-255 at the model's "
                            "input size (resize before); the preprocessing is inside"}
    else:
        length = model.backbone.sequence_length
        inputs = {"token_ids": f"int32 [batch, {length}], the tokenizer's ids, [CLS] first, "
                               "padded with 0",
                  "padding_mask": f"int32 [batch, {length}], 1 for real tokens, 0 for padding"}
    extra = {
        "format": f"keras_transfer/{format}/1",
        "file": os.path.basename(file),
        "file_bytes": os.path.getsize(file),
        "inputs": inputs,
        "outputs": sorted(verification["max_abs_diff"]),  # one per head
        "quantize": quantize,
        "verification": verification,
    }
    if kind_of(model) == "text":
        tokenizer = model.backbone.preprocessor.tokenizer
        config = tokenizer.get_config()
        extra["tokenizer"] = {
            "class": type(tokenizer).__name__,
            "files": sorted(f for f in os.listdir(os.path.dirname(file))
                            if f not in (os.path.basename(file), "metadata.json")),
            "sequence_length": model.backbone.sequence_length,
            **{k: config[k] for k in ("lowercase", "strip_accents") if k in config},
        }
    if evaluation is not None:
        extra["accuracy"] = evaluation
    return extra
