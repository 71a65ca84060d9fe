"""Data in: folders, datasets and TFDS names become batched pipelines."""

import time

import numpy as np
import pytest
import tensorflow as tf

import keras_transfer as kt
from keras_transfer.data import make_image_dataset, read_tfds


def test_image_folder_gives_class_names_and_resized_batches(image_folder):
    dataset, source = make_image_dataset(str(image_folder), image_size=(32, 32),
                                         num_classes=3, batch_size=5)
    assert source.class_names == ["cat", "dog", "fox"]
    assert source.size == 12
    images, labels = next(iter(dataset))
    assert images.shape == (5, 32, 32, 3) and images.dtype == tf.float32
    assert float(tf.reduce_max(images)) > 1.0  # raw 0-255 values, not rescaled
    labels = np.concatenate([batch_labels.numpy() for _, batch_labels in dataset])
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_model_learns_class_names_from_a_folder(image_folder):
    model = kt.ImageTransferModel("mobilenet_v2", 3, weights=None, input_shape=(32, 32, 3))
    model.fit(str(image_folder), head_epochs=1, verbose=0)
    assert model.class_names == ["cat", "dog", "fox"]
    wrong = kt.ImageTransferModel("mobilenet_v2", 3, weights=None, input_shape=(32, 32, 3),
                                  class_names=["a", "b", "c"])
    with pytest.raises(kt.DataError, match="built for"):
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
    images = next(iter(out))[0].numpy()
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    np.testing.assert_array_equal(images[..., 0], x.astype("float32"))


def test_augmentation_applies_to_training_batches_only():
    x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)).astype("uint8")
    import keras

    flip = keras.layers.RandomFlip("horizontal", seed=1)
    augmented, _ = make_image_dataset(x, image_size=(32, 32), batch_size=8, augmentation=[flip])
    plain, _ = make_image_dataset(x, image_size=(32, 32), batch_size=8)
    a = next(iter(augmented))[0].numpy()
    b = next(iter(plain))[0].numpy()
    np.testing.assert_array_equal(b, x.astype("float32"))
    flipped = [np.array_equal(a[i], b[i, :, ::-1]) for i in range(8)]
    same = [np.array_equal(a[i], b[i]) for i in range(8)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped)


def test_tfds_unknown_name_is_clear():
    with pytest.raises(kt.DataError, match="TFDS does not know"):
        read_tfds("tfds:no_such_dataset_xyz")


def test_tfds_offline_fails_fast(tmp_path):
    import socket

    try:
        socket.create_connection(("storage.googleapis.com", 443), timeout=2).close()
        pytest.skip("online: this check is for offline machines")
    except OSError:
        pass
    start = time.time()
    with pytest.raises(kt.DataError, match="offline.*tfds build tf_flowers"):
        read_tfds("tfds:tf_flowers", data_dir=str(tmp_path))
    assert time.time() - start < 20
