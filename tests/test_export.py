"""SavedModel export: parity in a TensorFlow-only process, metadata, safe overwrite."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import keras_transfer as kt
from keras_transfer import export as export_module

SERVE_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tensorflow as tf
    export, folder = sys.argv[1], sys.argv[2]
    loaded = tf.saved_model.load(export)
    images = np.load(os.path.join(folder, "images.npy"))
    encoded = [open(os.path.join(folder, f"{i}.png"), "rb").read() for i in range(len(images))]
    a = loaded.signatures["serving_default"](images=tf.constant(images))["probabilities"]
    b = loaded.signatures["serving_bytes"](image_bytes=tf.constant(encoded))["probabilities"]
    np.save(os.path.join(folder, "uint8.npy"), a.numpy())
    np.save(os.path.join(folder, "bytes.npy"), b.numpy())
    assert "keras_transfer" not in sys.modules
    print("modules:", "keras_transfer" in sys.modules)
""")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 3, 24)
    model = kt.ImageTransferModel("mobilenet_v2", 3, weights=None, input_shape=(32, 32, 3),
                                  pooling="avg", class_names=["a", "b", "c"])
    model.fit(x, y, head_epochs=1, fine_tune_epochs=1, batch_size=8, verbose=0)
    return model, x


def test_export_matches_keras_in_a_tensorflow_only_process(trained, tmp_path):
    model, x = trained
    path = model.export(str(tmp_path / "export"), metrics={"accuracy": 0.5})
    folder = tmp_path / "io"
    folder.mkdir()
    np.save(folder / "images.npy", x)
    for i, image in enumerate(x):
        (folder / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
    script = tmp_path / "serve.py"
    script.write_text(SERVE_SCRIPT)
    result = subprocess.run([sys.executable, str(script), path, str(folder)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = model.predict(x)
    assert np.abs(np.load(folder / "uint8.npy") - expected).max() <= 1e-5
    assert np.abs(np.load(folder / "bytes.npy") - expected).max() <= 1e-5

    metadata = json.loads((tmp_path / "export" / "metadata.json").read_text())
    assert metadata["class_names"] == ["a", "b", "c"]
    assert metadata["backbone"] == "mobilenet_v2"
    assert metadata["input_shape"] == [32, 32, 3]
    assert metadata["preprocessing"] == "tf"
    assert metadata["metrics"] == {"accuracy": 0.5}
    assert set(metadata["versions"]) >= {"keras", "tensorflow", "keras_transfer"}
    assert metadata["signatures"] == ["serving_bytes", "serving_default"]


def test_serving_resizes_other_image_sizes(trained, tmp_path):
    model, x = trained
    path = model.export(str(tmp_path / "export"))
    serve = tf.saved_model.load(path).signatures["serving_default"]
    big = tf.image.resize(x[:2], (64, 48)).numpy().round().astype("uint8")
    out = serve(images=tf.constant(big))["probabilities"].numpy()
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out, model.predict(big), atol=1e-5)


def test_existing_export_is_refused_unless_overwrite(trained, tmp_path):
    model, _ = trained
    path = str(tmp_path / "export")
    model.export(path)
    stamp = os.path.getmtime(os.path.join(path, "saved_model.pb"))
    with pytest.raises(kt.ExportError, match="already exists.*overwrite=True"):
        model.export(path)
    assert os.path.getmtime(os.path.join(path, "saved_model.pb")) == stamp
    model.export(path, overwrite=True)
    assert os.listdir(tmp_path) == ["export"]  # no staging or backup folders left


def test_a_folder_that_is_not_an_export_is_never_overwritten(trained, tmp_path):
    model, _ = trained
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(kt.ExportError, match="not a SavedModel"):
        model.export(str(precious), overwrite=True)
    assert (precious / "thesis.txt").read_text() == "years of work"


def test_failed_overwrite_keeps_the_old_export(trained, tmp_path, monkeypatch):
    model, _ = trained
    path = str(tmp_path / "export")
    model.export(path)
    before = sorted(os.listdir(path))

    def broken_write(model, folder, metrics):
        os.makedirs(folder)
        open(os.path.join(folder, "saved_model.pb"), "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "_write", broken_write)
    with pytest.raises(OSError, match="disk full"):
        model.export(path, overwrite=True)
    assert sorted(os.listdir(path)) == before
    assert os.listdir(tmp_path) == ["export"]
    tf.saved_model.load(path)  # still a working export


def test_cli_export_and_metadata_loader(trained, tmp_path):
    model, _ = trained
    model.save(str(tmp_path / "m.keras"))
    from keras_transfer.cli import main

    assert main(["export", str(tmp_path / "m.keras"), str(tmp_path / "out")]) == 0
    assert kt.load_metadata(str(tmp_path / "out"))["num_classes"] == 3
    with pytest.raises(kt.ExportError, match="metadata.json"):
        kt.load_metadata(str(tmp_path))
