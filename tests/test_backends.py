"""Training on JAX: TensorFlow never imported, keras.distribution, clear errors.

Each test runs a child Python with `KERAS_BACKEND=jax` (Keras picks its
backend once per process), in this environment; skipped where JAX is not
installed. The rest of the suite runs on JAX as a whole in CI's second
environment, which has no TensorFlow.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import keras
import pytest

needs_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                               reason="JAX is not installed")
# Tests that need nothing but JAX run in CI's JAX environment, not again from TensorFlow's.
jax_environment = pytest.mark.skipif(
    importlib.util.find_spec("jax") is None or keras.backend.backend() == "tensorflow",
    reason="runs in the JAX environment (make test-jax)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Defined in every child: what these tests check does not depend on the backbone's
# size, and JAX compiles MobileNetV2's training step for about a minute.
SMALL_NETWORK = textwrap.dedent("""
    def small_network():  # two convolutions with BatchNormalization, for 32x32 images
        import keras
        inputs = keras.Input((32, 32, 3))
        h = keras.layers.Conv2D(8, 3, strides=2)(inputs)
        h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
        return keras.Model(inputs, keras.layers.Conv2D(16, 3, strides=2)(h))
""")


def run_on_jax(code: str, devices: int = 1, timeout: int = 600) -> dict:
    """Runs `code` under JAX on `devices` CPU devices; returns the JSON it prints last."""
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    code = SMALL_NETWORK + textwrap.dedent(code)
    result = subprocess.run([sys.executable, "-c", code], env=env,
                            capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@jax_environment
def test_training_core_never_imports_tensorflow():
    # TensorFlow made unimportable, as where it is not installed (Keras itself
    # imports it when it can, to serialise configs).
    out = run_on_jax("""
        import json, sys

        class NoTensorFlow:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("tensorflow", "tensorflow_text"):
                    raise ModuleNotFoundError(f"No module named {name!r}")

        sys.meta_path.insert(0, NoTensorFlow())
        import numpy as np
        import keras_transfer as kt

        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (24, 32, 32, 3)).astype("uint8")
        y = np.arange(24) % 3
        model = kt.ImageTransferModel(small_network(), 3, preprocessing="tf")
        model.fit(x, y, phases=[kt.HeadPhase(), kt.FineTunePhase(epochs=1)], batch_size=8,
                  verbose=0)
        print(json.dumps({"tensorflow": "tensorflow" in sys.modules,
                          "predictions": np.asarray(model.predict(x[:2])).shape}))
    """)
    assert out == {"tensorflow": False, "predictions": [2, 3]}


@needs_jax
@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="needs TensorFlow installed beside JAX")
def test_tf_data_on_jax_says_it_needs_the_tensorflow_backend():
    out = run_on_jax("""
        import json
        import numpy as np
        import tensorflow as tf
        import keras_transfer as kt

        model = kt.ImageTransferModel(small_network(), 2, preprocessing="tf")
        data = tf.data.Dataset.from_tensor_slices((np.zeros((4, 32, 32, 3)), [0, 1, 0, 1]))
        try:
            model.fit(data, head_epochs=1, verbose=0)
        except kt.KerasTransferError as error:
            print(json.dumps({"type": type(error).__name__, "message": str(error)}))
    """)
    assert out["type"] == "BackendError"
    assert "tf.data inputs needs the TensorFlow backend" in out["message"]
    assert "'jax'" in out["message"] and "NumPy arrays" in out["message"]


@jax_environment
def test_strategy_auto_on_jax_is_data_parallel_over_the_devices():
    out = run_on_jax("""
        import json
        import numpy as np
        import keras_transfer as kt

        rng = np.random.default_rng(0)
        x = rng.normal(size=(32, 32, 32, 3)).astype("float32") * 40 + 128
        y = np.arange(32) % 2
        strategy = kt.get_strategy("auto")
        refused = False
        try:  # a network passed in must be built where its variables will live
            kt.ImageTransferModel(small_network(), 2, preprocessing="tf", strategy=strategy)
        except kt.BackboneError as error:
            refused = "with strategy.scope()" in str(error)
        with strategy.scope():
            model = kt.ImageTransferModel(small_network(), 2, preprocessing="tf",
                                          strategy=strategy)
        history = model.fit(x, y, phases=[kt.HeadPhase(solver="adam", epochs=2),
                                          kt.FineTunePhase(epochs=1)], batch_size=8, verbose=0)
        kernel = model.head.layers[-1].kernel.value
        print(json.dumps({
            "distribution": type(model.strategy).__name__,
            "built_outside_refused": refused,
            "kernel_devices": len(kernel.sharding.device_set),
            "losses_finite": bool(np.isfinite(history.history["loss"]).all()),
            "epochs": len(history.history["loss"])}))
    """, devices=2)
    assert out == {"distribution": "DataParallel", "built_outside_refused": True,
                   "kernel_devices": 2, "losses_finite": True, "epochs": 3}


@needs_jax
@pytest.mark.large
@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="the export needs TensorFlow installed beside JAX")
def test_cli_train_on_jax_exports_through_tensorflow(image_folder, tmp_path):
    output = tmp_path / "exported"
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "keras_transfer.cli", "train", str(image_folder),
         "--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "32",
         "--fine-tune-epochs", "0", "--batch-size", "4", "--output", str(output), "--quiet",
         "--no-report"],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Exported a SavedModel" in result.stdout
    assert "Epoch" not in result.stdout and "summary" not in result.stdout  # --quiet
    assert not (output / "report").exists()  # --no-report
    metadata = json.loads((output / "metadata.json").read_text())
    assert metadata["class_names"] == ["cat", "dog", "fox"]
    # The .keras file that carried the model across is gone; nothing else was left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "images"]
