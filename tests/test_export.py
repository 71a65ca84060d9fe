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
    # Two convolutions with BatchNormalization: what an export must carry, traced and
    # saved in seconds (test_cli exports a registry backbone).
    import keras

    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(8, 3, strides=2)(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(keras.layers.ReLU()(h))
    model = kt.ImageTransferModel(keras.Model(inputs, h, name="small"), 3, pooling="avg",
                                  preprocessing="tf", class_names=["a", "b", "c"])
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
    assert metadata["backbone"] == "small"
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


# ------------------------------------------------------- serving checks
@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    model, x = trained
    path = model.export(str(tmp_path_factory.mktemp("served") / "export"))
    return model, x, tf.saved_model.load(path).signatures


@pytest.mark.parametrize("shape, message", [
    ((32, 32, 3), "shape \\[batch, height, width, channels\\].*\\[32 32 3\\]"),
    ((2, 32, 32, 4), "RGB \\(3 channels\\) or grayscale \\(1 channel\\).*\\[4\\]"),
    ((2, 32, 32, 2), "RGB \\(3 channels\\) or grayscale \\(1 channel\\).*\\[2\\]"),
    ((1, 0, 0, 3), "images of size 0"),
    ((1, 32, 0, 1), "images of size 0"),
])
def test_serving_names_what_is_wrong_with_the_images(served, shape, message):
    _, _, signatures = served
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        signatures["serving_default"](images=tf.zeros(shape, tf.uint8))


def test_serving_bytes_names_what_is_not_an_image(served):
    _, x, signatures = served
    png = tf.io.encode_png(x[0]).numpy()
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="JPEG, PNG, GIF, BMP or WebP.*image_bytes.*\\[1 2\\]"):
        signatures["serving_bytes"](image_bytes=tf.constant([png, b"garbage", b""]))


def test_serving_takes_grayscale_images_as_fit_does(served):
    model, x, signatures = served
    gray = x[:3, :, :, :1]
    out = signatures["serving_default"](images=tf.constant(gray))["probabilities"].numpy()
    np.testing.assert_allclose(out, model.predict(gray), atol=1e-5)
    encoded = [tf.io.encode_png(image).numpy() for image in gray]
    out = signatures["serving_bytes"](image_bytes=tf.constant(encoded))["probabilities"].numpy()
    np.testing.assert_allclose(out, model.predict(gray), atol=1e-5)


# ---------------------------------------------------- nothing ever lost
@pytest.fixture(scope="module")
def tiny():
    """A model on a one-layer backbone, quick to export, and images for it."""
    import keras

    inputs = keras.Input((16, 16, 3))
    backbone = keras.Model(inputs, keras.layers.Conv2D(2, 3, strides=4)(inputs))
    model = kt.ImageTransferModel(backbone, 3, pooling="avg", class_names=["a", "b", "c"])
    x = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)).astype("uint8")
    return model, x


def test_a_nan_metric_is_written_as_null(tiny, tmp_path):
    model, _ = tiny
    path = model.export(str(tmp_path / "export"), metrics={"loss": float("nan"), "acc": 0.5})

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    text = (tmp_path / "export" / "metadata.json").read_text()
    assert json.loads(text, parse_constant=refuse)["metrics"] == {"loss": None, "acc": 0.5}
    assert kt.load_metadata(path)["metrics"]["loss"] is None


def test_overwrite_never_deletes_a_users_files(tiny, tmp_path):
    model, _ = tiny
    path = tmp_path / "export"
    model.export(str(path))
    (path / "notes.txt").write_text("my notes")
    with pytest.raises(kt.ExportError, match="\\['notes.txt'\\].*Move them out"):
        model.export(str(path), overwrite=True)
    assert (path / "notes.txt").read_text() == "my notes"
    tf.saved_model.load(str(path))  # the old export is untouched
    (path / "notes.txt").unlink()
    model.export(str(path), overwrite=True)


KILLED_EXPORT = textwrap.dedent("""
    import os, signal, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    from keras_transfer import export
    path, moment = sys.argv[1], sys.argv[2]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def fake_write(model, folder, metrics):
        os.makedirs(os.path.join(folder, "variables"))
        open(os.path.join(folder, "saved_model.pb"), "wb").write(b"new")
        if moment == "while writing":
            die()

    rename = os.rename

    def rename_then_die(source, target):
        rename(source, target)
        if moment == "between renames" and ".old-" in target:
            die()

    export._write = fake_write
    export.os.rename = rename_then_die
    export.export_saved_model(None, path, overwrite=True, verify=False)
""")


def kill_an_export(folder, moment):
    """Runs `export(overwrite=True)` to folder/export in a process killed at `moment`."""
    script = folder / "killed.py"
    script.write_text(KILLED_EXPORT)
    result = subprocess.run([sys.executable, str(script), str(folder / "export"), moment],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]  # killed by SIGKILL
    return sorted(f.split("-")[0] for f in os.listdir(folder) if f.startswith(".export."))


def test_an_export_killed_between_its_renames_is_put_back(tiny, tmp_path):
    model, x = tiny
    path = tmp_path / "export"
    model.export(str(path))
    assert kill_an_export(tmp_path, "between renames") == [".export.old", ".export.tmp"]
    assert not path.exists()  # the moment the old code lost the export
    # The next load puts the old export back ...
    assert kt.load_metadata(str(path))["class_names"] == ["a", "b", "c"]
    served = tf.saved_model.load(str(path)).signatures["serving_default"]
    np.testing.assert_allclose(served(images=tf.constant(x))["probabilities"].numpy(),
                               model.predict(x), atol=1e-5)
    # ... so does the check the CLI makes before training (it then refuses to overwrite) ...
    kill_an_export(tmp_path, "between renames")
    with pytest.raises(kt.ExportError, match="already exists"):
        export_module.check_export_path(str(path))
    assert kt.load_metadata(str(path))["class_names"] == ["a", "b", "c"]
    # ... and so does the next export, which also removes what the killed ones left
    # (so a third killed export leaves only its own two folders).
    assert kill_an_export(tmp_path, "between renames") == [".export.old", ".export.tmp"]
    model.export(str(path), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["export", "killed.py"]
    tf.saved_model.load(str(path))


def test_an_export_killed_while_writing_leaves_the_old_one(tiny, tmp_path):
    model, _ = tiny
    path = tmp_path / "export"
    model.export(str(path))
    assert kill_an_export(tmp_path, "while writing") == [".export.tmp"]
    assert kt.load_metadata(str(path))["class_names"] == ["a", "b", "c"]
    running = tmp_path / f".export.tmp-{os.getppid()}-0000beef"  # a live process's
    running.mkdir()
    model.export(str(path), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == [running.name, "export", "killed.py"]
