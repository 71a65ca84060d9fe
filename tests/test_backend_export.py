"""A model made on JAX exports through the CLI under TensorFlow, with equal outputs.

A child process on `KERAS_BACKEND=jax`, where TensorFlow cannot be imported
(as where it is not installed), trains a tiny image model and a tiny text
model through both phases, saves them as `.keras` files with its own
predictions, and tries `model.export` (which must refuse and write nothing). The test then runs `keras-transfer export` with
`KERAS_BACKEND=jax` still set, as in the shell the model was trained in, and
serves the SavedModels with TensorFlow.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from processes import ROOT, child_env

TESTS = os.path.join(ROOT, "tests")

ON_JAX = textwrap.dedent("""
    import json, os, sys

    class NoTensorFlow:  # TensorFlow unimportable, as where it is not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tensorflow_text"):
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, NoTensorFlow())
    import numpy as np
    import keras
    assert keras.config.backend() == "jax", keras.config.backend()
    import keras_transfer as kt
    sys.path.insert(0, sys.argv[2])  # the tests folder
    from test_text import LABELS, TEXTS, tiny_model

    out = sys.argv[1]
    rng = np.random.default_rng(0)

    def perturb(model):
        # Weights that start constant (a head's zeros, biases, normalization)
        # made random, else every text would get the same output.
        for w in model.weights:
            value = np.asarray(w)
            if np.ptp(value) == 0:
                w.assign((value + rng.normal(0, 0.05, value.shape)).astype(w.dtype))

    def fit_to(model, batch):
        # Set from one batch as training would set them: the moving statistics
        # of every BatchNormalization (with the initial ones, a random
        # network's features fade to a constant), and a head whose logits
        # vary by about 1 from input to input.
        network = model.backbone.network
        layers = [l for l in network.layers if isinstance(l, keras.layers.BatchNormalization)]
        saved = [(l.momentum, l.trainable) for l in layers]
        for layer in layers:
            layer.momentum, layer.trainable = 0.0, True
        network(batch, training=True)
        for layer, (momentum, trainable) in zip(layers, saved):
            layer.momentum, layer.trainable = momentum, trainable
        features = np.asarray(network(batch)).mean(axis=(1, 2))
        kernel = rng.normal(0, 1, (features.shape[1], 3)) / np.sqrt(features.var(axis=0).sum())
        dense = model.head.layers[-1]
        dense.set_weights([kernel, -features.mean(axis=0) @ kernel])

    image = kt.ImageTransferModel("mobilenet_v2", 3, weights=None, input_shape=(32, 32, 3),
                                  pooling="avg", class_names=["a", "b", "c"])
    def tinted(n):
        # Image i is brighter in channel i % 3: labels the probe can learn, so
        # its cross-validation keeps a C whose outputs differ by input (on
        # random labels it rightly chooses the strongest penalty, and every
        # image then gets about 1/3 for each class).
        pixels = rng.integers(0, 192, (n, 32, 32, 3))
        pixels[np.arange(n), :, :, np.arange(n) % 3] += 63
        return pixels.astype(np.uint8)

    seen = tinted(64)
    fit_to(image, seen / 127.5 - 1)  # its "tf" preprocessing
    both_phases = [kt.HeadPhase(), kt.FineTunePhase(epochs=1)]
    image.fit(seen[:48], np.arange(48) % 3, phases=both_phases, batch_size=16, verbose=0)
    images = tinted(6)
    np.save(os.path.join(out, "images.npy"), images)
    np.save(os.path.join(out, "image_jax.npy"), image.predict(images))
    image.save(os.path.join(out, "image.keras"))

    text = tiny_model(class_names=["neg", "pos"])
    perturb(text)
    text.fit(TEXTS, LABELS, phases=both_phases, batch_size=8, verbose=0)
    texts = TEXTS[:6] + ["unknownword service", "very " * 20]
    json.dump(texts, open(os.path.join(out, "texts.json"), "w"))
    np.save(os.path.join(out, "text_jax.npy"), text.predict(texts))
    text.save(os.path.join(out, "text.keras"))

    try:
        image.export(os.path.join(out, "refused"))
    except kt.ExportError as error:
        open(os.path.join(out, "refused.txt"), "w").write(str(error))
""")


@pytest.fixture(scope="module")
def on_jax(tmp_path_factory):
    """The folder where a JAX process left its `.keras` files and predictions."""
    pytest.importorskip("jax", reason="the JAX side needs jax: pip install 'jax[cpu]'")
    folder = tmp_path_factory.mktemp("on_jax")
    script = folder / "on_jax.py"
    script.write_text(ON_JAX)
    result = subprocess.run(
        [sys.executable, str(script), str(folder), TESTS], cwd=ROOT, capture_output=True,
        text=True, timeout=600,
        env=child_env(folder, KERAS_BACKEND="jax", PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def export_in_a_jax_shell(model, output, tmp_path):
    """`keras-transfer export MODEL OUTPUT` in a shell that has KERAS_BACKEND=jax."""
    return subprocess.run(
        [sys.executable, "-m", "keras_transfer.cli", "export", str(model), str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=child_env(tmp_path, KERAS_BACKEND="jax"))


# The export reproduces the Keras model it loads (1e-5, as on TensorFlow
# alone); the model's outputs on JAX differ from TensorFlow's by how the two
# backends' float32 kernels round: measured 6e-8 on the tiny BERT, 1.2e-5 to
# 2e-5 on this MobileNetV2 (53 convolutions; 1.4e-5 on MobileNet).
@pytest.mark.large  # about 2.5 minutes on 2 cores: a JAX process, then two CLI exports
@pytest.mark.parametrize("kind, inputs, across_backends", [
    ("image", "images", 1e-4), ("text", "texts", 1e-5)])
def test_a_model_made_on_jax_exports_with_equal_outputs(on_jax, tmp_path, kind, inputs,
                                                        across_backends):
    import keras

    import keras_transfer  # noqa: F401 - registers the model classes for loading

    result = export_in_a_jax_shell(on_jax / f"{kind}.keras", tmp_path / "export", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Exported a SavedModel" in result.stdout
    metadata = json.loads((tmp_path / "export" / "metadata.json").read_text())
    assert "tensorflow" in metadata["versions"]

    if kind == "text":
        import tensorflow_text  # noqa: F401 - registers the tokenizer ops
        x = json.loads((on_jax / "texts.json").read_text())
    else:
        x = np.load(on_jax / "images.npy")
    serve = tf.saved_model.load(str(tmp_path / "export")).signatures["serving_default"]
    served = serve(**{inputs: tf.constant(x)})["probabilities"].numpy()
    on_tensorflow = keras.saving.load_model(str(on_jax / f"{kind}.keras")).predict(x)
    np.testing.assert_allclose(served, on_tensorflow, atol=1e-5, rtol=0)
    expected = np.load(on_jax / f"{kind}_jax.npy")
    assert expected.std(axis=0).max() > 0.01  # outputs that differ by input
    np.testing.assert_allclose(served, expected, atol=across_backends, rtol=0)


@pytest.mark.large  # shares the JAX process of the test above
def test_export_on_jax_says_what_to_do_and_writes_nothing(on_jax):
    message = (on_jax / "refused.txt").read_text()
    assert "'jax'" in message and "keras-transfer export model.keras" in message
    assert "pip install tensorflow" in message
    assert [n for n in os.listdir(on_jax) if "refused" in n] == ["refused.txt"]


@pytest.fixture
def tiny(tmp_path):
    """A model on a one-layer backbone, saved as `tiny.keras`."""
    import keras

    import keras_transfer as kt

    inputs = keras.Input((16, 16, 3))
    backbone = keras.Model(inputs, keras.layers.Conv2D(2, 3, strides=4)(inputs))
    model = kt.ImageTransferModel(backbone, 3, pooling="avg")
    model.save(str(tmp_path / "tiny.keras"))
    return model


def test_export_under_another_backend_writes_nothing(tiny, tmp_path, monkeypatch):
    import keras

    import keras_transfer as kt

    before = sorted(os.listdir(tmp_path))
    monkeypatch.setattr(keras.config, "backend", lambda: "torch")
    with pytest.raises(kt.ExportError, match="runs Keras on 'torch'.*keras-transfer export"):
        tiny.export(str(tmp_path / "export"))
    with pytest.raises(kt.ExportError, match="'torch'"):
        kt.export.export_saved_model(tiny, str(tmp_path / "export"))
    assert sorted(os.listdir(tmp_path)) == before


def test_cli_export_without_tensorflow_is_one_line(tiny, tmp_path, monkeypatch, capsys):
    from keras_transfer.cli import main

    monkeypatch.setitem(sys.modules, "tensorflow", None)  # as if not installed
    assert main(["export", str(tmp_path / "tiny.keras"), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "pip install tensorflow" in error
    assert "training on JAX does not need it" in error
    assert not (tmp_path / "out").exists()


def test_cli_export_refuses_a_process_where_keras_runs_on_jax(tiny, tmp_path, monkeypatch,
                                                             capsys):
    import keras

    from keras_transfer.cli import main

    monkeypatch.setattr(keras.config, "backend", lambda: "jax")
    assert main(["export", str(tmp_path / "tiny.keras"), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "'jax'" in error and "new process" in error
    assert not (tmp_path / "out").exists()
