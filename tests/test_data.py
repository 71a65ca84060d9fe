"""Data in: folders, datasets and TFDS names become batched pipelines."""

import logging
import time

import keras
import numpy as np
from PIL import Image
import pytest
try:
    import tensorflow as tf
except ImportError:  # a run on another backend without TensorFlow: its tests are marked
    tf = None

import keras_transfer as kt
from keras_transfer.image_data import make_image_dataset, read_tfds


def test_image_folder_gives_class_names_and_resized_batches(image_folder):
    dataset, source = make_image_dataset(str(image_folder), image_size=(32, 32),
                                         num_classes=3, batch_size=5)
    assert source.class_names == ["cat", "dog", "fox"]
    assert source.size == 12
    images, labels = next(iter(dataset))
    assert images.shape == (5, 32, 32, 3) and np.asarray(images).dtype == np.float32
    assert float(np.max(images)) > 1.0  # raw 0-255 values, not rescaled
    labels = np.concatenate([np.asarray(batch_labels) for _, batch_labels in dataset])
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def folder_model(**kwargs):
    """A model on a one-convolution network: what is read from folders does not depend
    on the backbone."""
    inputs = keras.Input((32, 32, 3))
    network = keras.Model(inputs, keras.layers.Conv2D(8, 3, strides=2)(inputs))
    return kt.ImageTransferModel(network, 3, preprocessing="tf", **kwargs)


def test_model_learns_class_names_from_a_folder(image_folder):
    model = folder_model()
    model.fit(str(image_folder), head_epochs=1, verbose=0)
    assert model.class_names == ["cat", "dog", "fox"]
    wrong = folder_model(class_names=["a", "b", "c"])
    with pytest.raises(kt.DataError, match="class folders \\['cat', 'dog', 'fox'\\] that are not"):
        wrong.fit(str(image_folder), head_epochs=1, verbose=0)


def test_unreadable_images_are_named(image_folder):
    (image_folder / "dog" / "broken.jpg").write_bytes(b"not an image at all")
    (image_folder / "fox" / "empty.png").write_bytes(b"")
    with pytest.raises(kt.DataError) as error:
        make_image_dataset(str(image_folder), image_size=(32, 32))
    message = str(error.value)
    assert "2 of 14" in message and "broken.jpg" in message and "empty.png" in message


@pytest.mark.parametrize("layout, message", [
    ("empty", "no class subfolders"),
    ("no_images", "no image files"),
])
def test_folders_without_images(tmp_path, layout, message):
    if layout == "no_images":
        (tmp_path / "cat").mkdir()
        (tmp_path / "cat" / "notes.txt").write_text("hello")
    with pytest.raises(kt.DataError, match=message):
        make_image_dataset(str(tmp_path), image_size=(32, 32))


def test_missing_path_is_neither_folder_nor_tfds():
    with pytest.raises(kt.DataError, match="neither an existing folder nor a TFDS name"):
        make_image_dataset("/no/such/folder", image_size=(32, 32))


@pytest.mark.tensorflow
@pytest.mark.parametrize("batched", [False, True])
def test_datasets_batched_or_not_are_rebatched(batched):
    x = np.zeros((10, 16, 16, 1), np.uint8)
    dataset = tf.data.Dataset.from_tensor_slices((x, np.arange(10) % 2))
    if batched:
        dataset = dataset.batch(3)
    out, _ = make_image_dataset(dataset, image_size=(32, 32), num_classes=2, batch_size=4)
    shapes = [images.shape for images, _ in out]
    assert shapes == [(4, 32, 32, 3), (4, 32, 32, 3), (2, 32, 32, 3)]


def test_grayscale_becomes_rgb_with_equal_channels():
    x = np.arange(2 * 32 * 32, dtype=np.uint8).reshape(2, 32, 32)
    out, _ = make_image_dataset(x, image_size=(32, 32), batch_size=2)
    images = np.asarray(next(iter(out))[0])
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    np.testing.assert_array_equal(images[..., 0], x.astype("float32"))


def test_augmentation_applies_to_training_batches_only():
    x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)).astype("uint8")
    import keras

    flip = keras.layers.RandomFlip("horizontal", seed=1)
    augmented, _ = make_image_dataset(x, image_size=(32, 32), batch_size=8, augmentation=[flip])
    plain, _ = make_image_dataset(x, image_size=(32, 32), batch_size=8)
    a = np.asarray(next(iter(augmented))[0])
    b = np.asarray(next(iter(plain))[0])
    np.testing.assert_array_equal(b, x.astype("float32"))
    flipped = [np.array_equal(a[i], b[i, :, ::-1]) for i in range(8)]
    same = [np.array_equal(a[i], b[i]) for i in range(8)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped)


@pytest.mark.tensorflow
def test_tfds_unknown_name_is_clear():
    with pytest.raises(kt.DataError, match="TFDS does not know"):
        read_tfds("tfds:no_such_dataset_xyz")


@pytest.mark.tensorflow
def test_tfds_offline_fails_fast(tmp_path, offline):
    start = time.time()
    with pytest.raises(kt.DataError, match="offline.*tfds build tf_flowers"):
        read_tfds("tfds:tf_flowers", data_dir=str(tmp_path))
    assert time.time() - start < 20


# ------------------------------------------------- folders matched by name
def _png(path, colour=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((20, 24, 3), 30, np.uint8)
    image[..., colour] = 220
    Image.fromarray(image).save(path)


def _labels(dataset):
    return sorted(np.concatenate([np.asarray(labels) for _, labels in dataset]).tolist())


def test_evaluation_folder_with_a_subset_of_classes_maps_labels_by_name(image_folder, tmp_path):
    model = folder_model()
    model.fit(str(image_folder), head_epochs=1, verbose=0)
    assert model.class_names == ["cat", "dog", "fox"]
    subset = tmp_path / "only_fox_and_dog"
    for name, colour in (("fox", 2), ("dog", 1)):
        for i in range(2):
            _png(subset / name / f"{i}.png", colour)
    dataset, _ = model.make_dataset(str(subset), batch_size=8)
    assert _labels(dataset) == [1, 1, 2, 2]  # dog is class 1, fox class 2 of the model
    metrics = model.evaluate(str(subset))
    expected = np.mean(model.predict(str(subset)).argmax(axis=1) == np.array([1, 1, 2, 2]))
    assert metrics["accuracy"] == pytest.approx(expected)


def test_class_folders_follow_the_models_class_order(image_folder):
    dataset, source = make_image_dataset(str(image_folder), image_size=(32, 32), num_classes=3,
                                         class_names=["fox", "cat", "dog"], batch_size=12)
    assert source.class_names == ["fox", "cat", "dog"]
    images, labels = next(iter(dataset))
    # The fixture's cat images are red, dog green, fox blue.
    colour = np.asarray(images).mean(axis=(1, 2)).argmax(axis=1)
    assert [["fox", "cat", "dog"][i] for i in np.asarray(labels)] == \
        [["cat", "dog", "fox"][c] for c in colour]


def test_a_folder_naming_a_class_the_model_lacks_is_an_error(image_folder):
    _png(image_folder / "wolf" / "0.png")
    model = folder_model(class_names=["cat", "dog", "fox"])
    with pytest.raises(kt.DataError, match="class folders \\['wolf'\\] that are not among"):
        model.evaluate(str(image_folder))
    with pytest.raises(kt.DataError, match="\\['wolf'\\]"):
        model.fit(str(image_folder), validation_data=str(image_folder), head_epochs=1,
                  verbose=0)


def test_webp_and_nested_images_are_read_and_other_files_named(tmp_path, caplog):
    root = tmp_path / "data"
    _png(root / "cat" / "a.png")
    _png(root / "cat" / "day2" / "deeper" / "b.png")
    (root / "dog").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8), (0, 200, 0)).save(root / "dog" / "c.webp")
    Image.new("RGB", (8, 8), (0, 200, 0)).save(root / "dog" / "d.tiff")
    (root / "dog" / ".DS_Store").write_bytes(b"\0")
    _png(root / "stray.png")
    with caplog.at_level(logging.WARNING, logger="keras_transfer"):
        dataset, source = make_image_dataset(str(root), image_size=(16, 16), num_classes=2)
    assert source.size == 3 and _labels(dataset) == [0, 0, 1]
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "d.tiff" in message and "stray.png" in message and "Skipped 2 files" in message
    assert ".DS_Store" not in message


def test_an_empty_class_folder_is_named_in_a_warning(image_folder, caplog):
    (image_folder / "wolf").mkdir()
    with caplog.at_level(logging.WARNING, logger="keras_transfer"):
        _, source = make_image_dataset(str(image_folder), image_size=(32, 32), num_classes=4)
    assert source.class_names == ["cat", "dog", "fox", "wolf"]
    assert any("['wolf']" in r.getMessage() and "no images" in r.getMessage()
               for r in caplog.records)


# ------------------------------------------------------------ CSV and TSV
def test_csv_keeps_quoted_newlines_and_drops_a_byte_order_mark(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_bytes(b'\xef\xbb\xbftext,label\n"line one\nline two",pos\n"a, b",neg\n')
    source = kt.text_data.read_text_file(str(path))
    assert source.texts == ["line one\nline two", "a, b"]
    assert source.labels == ["pos", "neg"]


@pytest.mark.parametrize("rows, message", [
    ("good,pos\nbad,\n", "missing or blank labels at positions \\[1\\]"),
    ("good,pos\nbad,  \n", "missing or blank labels at positions \\[1\\]"),
    ("good,pos\nbad\n", "fewer fields than its header, at lines \\[3\\]"),
])
def test_csv_rows_without_a_label_are_refused(tmp_path, rows, message):
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n" + rows, encoding="utf-8")
    with pytest.raises(kt.DataError, match=message):
        source = kt.text_data.read_text_file(str(path))
        kt.data.labels_for_head(source.labels, kt.Head(2), what="texts")


@pytest.mark.tensorflow
def test_training_pipelines_are_traced_without_autograph(monkeypatch):
    from tensorflow.python.autograph.impl import api

    # AutoGraph converted every function of a fit's pipelines (about a second on 2 cores);
    # they branch on static shapes only, so they are traced as written.
    converted = []
    convert = api.converted_call
    monkeypatch.setattr(api, "converted_call", lambda f, *a, **k: converted.append(f) or
                        convert(f, *a, **k))
    from keras_transfer import routing, trainer

    model = kt.ImageTransferModel(keras.Sequential([keras.Input((32, 32, 3)),
                                                    keras.layers.Conv2D(4, 3)]), 3)
    x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    # The checked pipeline fit builds first, then a phase's shifted one (an augmentation map).
    data = trainer.FitData(model=model, train=routing.head_data(model, x, np.arange(8) % 3),
                           validation=None, seed=0)
    data.batches(shift=0.1)
    assert [getattr(f, "__qualname__", f) for f in converted] == []
