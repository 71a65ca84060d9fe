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

int8 keeps the additions of two tensors (`ADD`: residual connections above
all) in float: the converter calibrates the model, and `quantize_calibrated`
quantizes it with `ADD` on TensorFlow's denylist (as
`tf.lite.experimental.QuantizationDebugger`'s selective quantization does);
the weights, convolutions, depthwise convolutions, pooling and the dense head
stay int8. A residual stream sums the blocks before it and its range grows
(55 at the demo's MobileNetV2's last addition, against 6 for a ReLU6), so one
int8 scale for it is coarse; with the additions in float the stream passes
from block to block unrounded (only the convolutions' inputs are quantized).
Measured on the demo's 320 test patches: every `ADD` in int8, 97.5% against
the float model's 100% (another draw of patches: 97.2% against 99.7%); the
additions in float, 100% (99.1%), for 0.1% more bytes. The head in float, or
200 calibration examples instead of 40, gained 0.3 points; the preprocessing
in float, 1.25.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np

from keras_transfer.errors import ExportError

# The operators an int8 file computes in float (see the module's docstring).
FLOAT_OPS = ("ADD",)


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
        # The converter stops at the calibrated float model; quantize_calibrated does the rest.
        options["_experimental_calibrate_only"] = True
    return options


def quantize_calibrated(file: str) -> None:
    """Quantizes the calibrated model in `file` to int8, `FLOAT_OPS` in float, in place.

    As the converter's own quantization step, it leaves in float the
    operators LiteRT has no int8 kernel for (MiniLM's `NEG`; `float_ops`
    lists what computes in float).
    """
    # What tf.lite.experimental.QuantizationDebugger.get_nondebug_quantized_model calls
    # with its denylisted_ops (the converter's own quantization step takes no denylist).
    from tensorflow.lite.python import convert  # lazy: TensorFlow is optional (Keras on JAX)

    with open(file, "rb") as f:
        calibrated = f.read()
    quantized = convert.mlir_quantize(calibrated, denylisted_ops=list(FLOAT_OPS))
    with open(file, "wb") as f:
        f.write(quantized)


def float_ops(file: str) -> set:
    """The operators of the `.tflite` `file` that give float32 tensors."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType  # lazy: an optional extra

    # Without the default XNNPACK delegate, which would hide the operators it takes.
    interpreter = Interpreter(
        model_path=file,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    dtypes = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    return {op["op_name"] for op in interpreter._get_ops_details()  # noqa: SLF001
            if any(dtypes.get(i) == np.float32 for i in op["outputs"])}


def write_litert(serving, signature, file: str, *, quantize=None, calibration=None) -> None:
    """Writes `serving` (see `export_formats.serving_model`) to the `.tflite` `file`.

    Args:
        serving: the serving Keras model.
        signature: its input signature.
        file: str. Ends in `.tflite`.
        quantize: None, `"dynamic"`, `"float16"` or `"int8"` (`FLOAT_OPS`
            in float, see `quantize_calibrated`).
        calibration: `{input: array}`, the examples int8 calibrates on.

    Raises:
        ExportError: the converter cannot write the model with builtin
            operators only.
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
            if quantize == "int8":
                quantize_calibrated(file)
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
