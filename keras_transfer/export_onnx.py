"""The ONNX file of an export, and running it in ONNX Runtime.

Keras's own exporter writes it (`keras.Model.export(format="onnx")`): on
TensorFlow it traces the serving model and converts the trace with tf2onnx,
patched by Keras for NumPy 2 (tf2onnx#2329).
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np


def write_onnx(serving, signature, file: str) -> None:
    """Writes `serving` (a Keras model, see `export_formats.serving_model`) to `file`."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        # tf2onnx's NumPy 2 patch warns about np.object; the trace prints progress.
        warnings.simplefilter("ignore", FutureWarning)
        serving.export(file, format="onnx", input_signature=signature, verbose=False)


def onnx_runner(file: str, threads: int | None = None):
    """A function `{input: array} -> {output: array}` running `file` in ONNX Runtime.

    Args:
        file: str. An `.onnx` file.
        threads: int, optional. Intra-op threads (ONNX Runtime's default: all cores).
    """
    import onnxruntime  # lazy: an optional extra (export)

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(file, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = [i.name for i in session.get_inputs()]

    def run(inputs: dict) -> dict:
        feeds = {name: np.asarray(inputs[name]) for name in wanted}
        return dict(zip(names, session.run(names, feeds)))

    return run
