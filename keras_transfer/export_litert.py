"""The LiteRT (TFLite) file of an export, its quantization, and running it.

Keras's own exporter writes it (`keras.Model.export(format="litert")`): it
saves the serving model as a SavedModel and converts that with
`TFLiteConverter.from_saved_model` (`from_keras_model` fails on Keras 3,
keras#18430). Two settings differ from Keras's defaults:

- only LiteRT's builtin operators: Keras also allows TensorFlow operators
  (`SELECT_TF_OPS`), which need the Flex delegate that phones' runtimes and
  `ai-edge-litert` lack, so a file using them would not run where it is
  meant to;
- the quantization asked for: `"dynamic"` (int8 weights, float
  activations), `"float16"` (float16 weights) or `"int8"` (weights and
  activations in int8, calibrated on examples; the image input stays uint8
  and the outputs float32).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np

from keras_transfer.errors import ExportError


def converter_options(quantize=None, calibration=None) -> dict:
    """The `TFLiteConverter` settings of a quantization (Keras passes them on)."""
    import tensorflow as tf  # lazy: TensorFlow is optional (Keras on JAX)

    builtins = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize is None:
        return {"target_spec": {"supported_ops": builtins}}
    options = {"optimizations": [tf.lite.Optimize.DEFAULT],
               "target_spec": {"supported_ops": builtins}}
    if quantize == "float16":
        options["target_spec"]["supported_types"] = [tf.float16]
    elif quantize == "int8":
        count = len(next(iter(calibration.values())))

        def examples():
            for i in range(count):
                yield {name: values[i:i + 1] for name, values in calibration.items()}

        options["representative_dataset"] = examples
        options["target_spec"] = {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]}
    return options


def write_litert(serving, signature, file: str, *, quantize=None, calibration=None) -> None:
    """Writes `serving` (see `export_formats.serving_model`) to the `.tflite` `file`.

    Args:
        serving: the serving Keras model.
        signature: its input signature.
        file: str. Ends in `.tflite`.
        quantize: None, `"dynamic"`, `"float16"` or `"int8"`.
        calibration: `{input: array}`, the examples int8 calibrates on.

    Raises:
        ExportError: the converter cannot write the model with builtin
            operators only (or, for int8, in integers only).
    """
    options = converter_options(quantize, calibration)
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # the converter logs every step
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            # int8 calibration runs TensorFlow's own (deprecated) interpreter, which warns.
            warnings.simplefilter("ignore", UserWarning)
            serving.export(file, format="litert", input_signature=signature, verbose=False,
                           **options)
    except Exception as error:  # noqa: BLE001 - the converter raises ConverterError and others
        message = str(error).strip().splitlines()
        raise ExportError(
            f"The LiteRT converter cannot write this model{' in int8' if quantize else ''}: "
            f"{(message or ['?'])[-1][:300]}. Try quantize='dynamic' or None, or "
            "format='onnx'. Nothing was written.") from error
    finally:
        absl.setLevel(level)


def litert_runner(file: str, threads: int | None = None):
    """A function `{input: array} -> {output: array}` running `file` in LiteRT.

    Args:
        file: str. A `.tflite` file.
        threads: int, optional. Threads for the interpreter.
    """
    from ai_edge_litert.interpreter import Interpreter  # lazy: an optional extra (export)

    interpreter = Interpreter(model_path=file, num_threads=threads)
    runner = interpreter.get_signature_runner()
    wanted = list(runner.get_input_details())

    def run(inputs: dict) -> dict:
        outputs = runner(**{name: np.asarray(inputs[name]) for name in wanted})
        return {name: np.array(value) for name, value in outputs.items()}

    return run
