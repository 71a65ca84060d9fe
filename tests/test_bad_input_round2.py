"""Nothing silent, round two (issue #20): each test failed on the code before the fix.

Silent wrong results become the right result or a clear error; an overwrite
keeps the user's files; an infinite dataset is refused at once; unclear
errors become one message naming what was received and what to do.
"""

import json
import os
import zipfile

import keras
import numpy as np
import pytest

import keras_transfer as kt
from keras_transfer.backup import BackupError
from keras_transfer.errors import DataError

keras_hub = pytest.importorskip("keras_hub")

from test_bad_input import image_model, images, labels_of, text_model  # noqa: E402, F401
from test_text import TEXTS  # noqa: E402


# --------------------------------------------------- 1. a resumed run's data
def _fit(backup, x, y, validation=None, epochs=2, callbacks=()):
    from children import tiny_model

    model = tiny_model()
    return model.fit(x, y, phases=[kt.HeadPhase(epochs=epochs, solver="adam",
                                                learning_rate=1e-2)],
                     batch_size=8, seed=3, verbose=0, backup_dir=backup,
                     validation_data=validation, callbacks=list(callbacks))


class _Crash(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt("crash")


def test_a_run_resumed_with_other_data_is_refused(tmp_path):
    from children import data

    x, y = data(n=16)
    backup = tmp_path / "backup"
    with pytest.raises(KeyboardInterrupt):
        _fit(backup, x, y, callbacks=[_Crash()])
    saved = (backup / "state.json").read_text()
    # Labels shifted by one, other images of the same shape, validation data added.
    for other in [(x, (y + 1) % 3), (x[::-1], y), (x, y, (x[:8], y[:8]))]:
        with pytest.raises(BackupError, match="other data.*new backup_dir.*delete"):
            _fit(backup, *other)
    assert (backup / "state.json").read_text() == saved  # nothing written
    assert len(_fit(backup, x, y).epoch) == 2  # the same data resumes


def test_a_damaged_backup_file_is_a_backup_error(tmp_path):
    from children import data

    x, y = data(n=16)
    backup = tmp_path / "backup"
    with pytest.raises(KeyboardInterrupt):
        _fit(backup, x, y, callbacks=[_Crash()])
    state = json.loads((backup / "state.json").read_text())
    file = backup / state["progress"]["file"]
    file.write_bytes(file.read_bytes()[:100])  # truncated
    with pytest.raises(BackupError, match="damaged.*new backup_dir"):
        _fit(backup, x, y)


# ------------------------------------------------------ 2. tf.data labels
@pytest.mark.tensorflow
def test_tf_data_labels_of_width_one_are_class_indices(images):
    import tensorflow as tf
    y = np.arange(12) % 3
    model = image_model()
    dataset = tf.data.Dataset.from_tensor_slices((images, y[:, None]))
    np.testing.assert_array_equal(labels_of(model, dataset, None), y)


@pytest.mark.tensorflow
def test_tf_data_fractional_float_labels_are_refused(images):
    import tensorflow as tf
    model = image_model()
    dataset = tf.data.Dataset.from_tensor_slices((images, np.arange(12) % 3 + 0.7))
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a whole number"):
        labels_of(model, dataset, None)
    whole = tf.data.Dataset.from_tensor_slices((images, (np.arange(12) % 3).astype("float32")))
    np.testing.assert_array_equal(labels_of(model, whole, None), np.arange(12) % 3)


@pytest.mark.tensorflow
def test_tf_data_string_labels_and_rgba_images_are_refused_at_once(images):
    import tensorflow as tf
    model = image_model()
    named = tf.data.Dataset.from_tensor_slices((images, ["cat", "dog", "owl"] * 4))
    with pytest.raises(DataError, match="string labels.*class indices"):
        model.make_dataset(named)
    texts = tf.data.Dataset.from_tensor_slices((TEXTS[:4], ["pos", "neg"] * 2))
    with pytest.raises(DataError, match="string labels.*class indices"):
        text_model().make_dataset(texts)
    rgba = np.concatenate([images, images[..., :1]], axis=-1)
    with pytest.raises(DataError, match="4 channels.*x\\[..., :3\\]"):
        model.make_dataset(tf.data.Dataset.from_tensor_slices((rgba, np.zeros(12, int))))


# -------------------------------------------------- 3. pixels above 255
@pytest.mark.parametrize("dtype, high", [("uint16", 65535), ("int32", 1000)])
def test_integer_pixels_above_255_are_refused(images, dtype, high):
    model = image_model()
    x = (images.astype("float64") * high / 255).astype(dtype)
    with pytest.raises(DataError, match=f"{dtype} with values up to {high}.*8-bit"):
        model.predict(x)
    assert model.predict(images.astype("int32")).shape == (12, 3)  # 0-255 in int32 is fine


@pytest.mark.tensorflow
def test_integer_pixels_in_tf_data_above_255_are_refused(images):
    import tensorflow as tf
    model = image_model()
    with pytest.raises(DataError, match="uint16"):
        model.predict(tf.data.Dataset.from_tensor_slices(images.astype("uint16")))
    with pytest.raises(tf.errors.InvalidArgumentError, match="above 255"):
        model.predict(tf.data.Dataset.from_tensor_slices(images.astype("int32") * 4))


# -------------------------------------------------------- 4. 16-bit PNG files
def test_16_bit_png_files_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    from keras_transfer.imagenet import _read_image

    gray = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(gray).save(tmp_path / "g16.png")
    read = np.asarray(_read_image(str(tmp_path / "g16.png")))
    assert read.shape == (64, 64, 3)
    # As TensorFlow's decoder reads it (value / 257), not clipped (mean 254.5).
    np.testing.assert_allclose(read[..., 0], gray / 257, atol=0.51)
    with pytest.raises(DataError, match="up to 65535"):
        _read_image(gray)


# ----------------------------------------------------- 5. CSV rows too long
def test_a_csv_row_with_more_fields_than_the_header_is_refused(tmp_path):
    file = tmp_path / "data.csv"
    file.write_text("text,label\ngood film,1\nbad film,0,extra\n", encoding="utf-8")
    with pytest.raises(DataError, match="more fields than its header.*lines \\[3\\]"):
        kt.text_data.read_text_file(str(file))


# --------------------------------------------------- 6. doctor's Python API
@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size=0"), (dict(batch_size=-5), "batch_size=-5"),
    (dict(phases=("head", "finetune")), "'finetune'.*'fine_tune'"),
    (dict(num_classes=0), "num_classes=0"),
    (dict(num_classes=10**7), "10,000,000 classes")])
def test_doctor_refuses_what_the_cli_refuses(kwargs, message):
    from keras_transfer.doctor import system_report

    with pytest.raises(kt.KerasTransferError, match=message):
        system_report("mobilenet_v2", input_size=32, **kwargs)


# -------------------------------------------------- lost: files in subfolders
@pytest.mark.tensorflow
def test_overwrite_keeps_a_users_files_in_the_exports_folders(tmp_path):
    import tensorflow as tf
    model = image_model()
    path = tmp_path / "export"
    model.export(str(path))
    folders = ["assets", "report", "variables"]
    for folder in folders:
        (path / folder).mkdir(exist_ok=True)
        (path / folder / "mine.txt").write_text("my notes")
    with pytest.raises(kt.ExportError, match="besides the export it holds") as refused:
        model.export(str(path), overwrite=True)
    assert all(f"{folder}/mine.txt" in str(refused.value) for folder in folders)
    for folder in folders:
        assert (path / folder / "mine.txt").read_text() == "my notes"
        (path / folder / "mine.txt").unlink()
    model.export(str(path), overwrite=True)  # an export's own files are replaced


@pytest.mark.tensorflow
def test_export_metrics_that_are_not_numbers_are_refused(tmp_path):
    import tensorflow as tf
    model = image_model()
    with pytest.raises(DataError, match="metrics\\['accuracy'\\].*'high'.*not a number"):
        model.export(str(tmp_path / "export"), metrics={"accuracy": "high"})
    assert not (tmp_path / "export").exists()


# ----------------------------------------------------- hang: .repeat()
@pytest.mark.tensorflow
def test_an_infinite_dataset_is_refused_at_once(images):
    import tensorflow as tf
    model = image_model()
    batched = tf.data.Dataset.from_tensor_slices((images, np.arange(12) % 3)).batch(4)
    with pytest.raises(DataError, match="infinite.*take"):
        model.fit(batched.repeat(), head_epochs=1, verbose=0)
    texts = tf.data.Dataset.from_tensor_slices((TEXTS[:4], [0, 1, 0, 1])).repeat()
    with pytest.raises(DataError, match="infinite"):
        text_model().fit(texts, head_epochs=1, verbose=0)


# --------------------------------------------------------- unclear errors
def test_a_list_of_file_names_is_not_images(images):
    with pytest.raises(DataError, match="names such as 'a.jpg', not images.*folder"):
        image_model().predict(["a.jpg"])


def test_a_bare_string_for_a_text_model_says_to_give_a_list():
    with pytest.raises(DataError, match="not an existing CSV/TSV file.*list"):
        text_model().predict("a lovely film")


def test_a_lone_surrogate_in_a_text_is_named():
    with pytest.raises(DataError, match="UTF-8.*positions \\[1\\]"):
        text_model().predict(["fine", "broken \ud83d here"])


@pytest.mark.tensorflow
def test_backend_tensorflow_does_not_look_up_an_imported_tensorflow(monkeypatch):
    """AutoGraph converts what a tf.data function calls: `find_spec` there printed its
    "could not transform" warning before `make demo`'s table."""
    import tensorflow as tf

    import importlib.util

    from keras_transfer import backend

    def no_lookup(name, *args):
        raise AssertionError(f"find_spec({name!r}) called")

    monkeypatch.setattr(importlib.util, "find_spec", no_lookup)
    assert backend.tensorflow("tf.data pipelines") is tf


def test_a_malformed_torch_checkpoint_names_the_tensor():
    from keras_transfer import torchvision_models as tvm

    inputs = keras.Input((4, 4, 2))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1, name="conv")(inputs))
    flat = {"c.weight": np.zeros((3, 2), np.float32), "c.bias": np.zeros(3, np.float32)}
    with pytest.raises(kt.WeightsError, match="conv <- c: tensors .*'c.weight': \\(3, 2\\)"):
        tvm.load_torch_weights(model, flat, {"conv": "c"})


def test_an_adam_head_at_a_far_too_high_learning_rate_stops(images):
    from children import data, tiny_model

    x, y = data(n=32)
    model = tiny_model()
    with pytest.raises(kt.TrainingDivergedError, match="exploded.*'head' phase"):
        model.fit(x, y, phases=[kt.HeadPhase(epochs=10, solver="adam", learning_rate=1e3)],
                  batch_size=8, seed=0, verbose=0)


@pytest.mark.tensorflow
def test_a_saved_model_with_unregistered_ops_says_to_import_tensorflow_text(monkeypatch):
    import tensorflow as tf
    from keras_transfer.export import load_saved_model

    def load(path):
        raise tf.errors.NotFoundError(None, None, "Op type not registered "
                                      "'FastWordpieceTokenizeWithOffsets' in binary")

    monkeypatch.setattr(tf.saved_model, "load", load)
    with pytest.raises(kt.ExportError, match="FastWordpiece.*import tensorflow_text"):
        load_saved_model("export")


# ----------------------------------------------------------------- the CLI
def test_cli_probe_with_augment_names_the_cli_options(tmp_path, capsys):
    from keras_transfer.cli import main

    code = main(["train", str(tmp_path / "data"), "--output", str(tmp_path / "out"),
                 "--head-solver", "probe", "--augment"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert "--head-solver adam" in error and "augmented_copies" not in error


def test_cli_predict_without_tensorflow_says_to_install_it(tmp_path, capsys, monkeypatch):
    import importlib.util
    import sys

    from keras_transfer import cli

    export = tmp_path / "export"
    export.mkdir()
    (export / "saved_model.pb").write_bytes(b"")
    (export / "metadata.json").write_text(json.dumps(
        {"kind": "image", "task": "classification", "signatures": ["serving_bytes"]}))
    (tmp_path / "a.png").write_bytes(b"png")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorflow" else find_spec(name, *a))
    monkeypatch.setattr(cli, "_keras_backend", lambda: "jax")
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow fails
    assert cli.main(["predict", str(export), str(tmp_path / "a.png")]) == 2
    assert "pip install tensorflow" in capsys.readouterr().err
