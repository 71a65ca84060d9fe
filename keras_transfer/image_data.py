"""Turning what a user has into batched pipelines of images.

Sources: numpy arrays `(N, H, W)`, `(N, H, W, 1)` or `(N, H, W, 3)`; a
`tf.data.Dataset` of `(image, label)` pairs, batched or not; a folder with one
subfolder of images per class; or a TensorFlow Datasets name written
`"tfds:<name>[:<split>]"`. Every pipeline resizes to the model's input size,
turns grayscale into RGB, keeps raw 0-255 values as float32 (the model does
its own preprocessing), batches and prefetches. Random augmentation layers,
if given, run on training batches only.

On the TensorFlow backend the pipeline is `tf.data`; on the others it is a
`batches.ExampleBatches` of NumPy arrays (files decoded with Pillow) and
`tf.data`/TFDS sources need TensorFlow (see `backend.py`).
"""


from __future__ import annotations

import dataclasses
import os
import socket
from urllib.parse import urlparse

import keras
import numpy as np

from keras_transfer import backend
from keras_transfer.batches import ExampleBatches
from keras_transfer.data import (as_written, check_finite, labels_for_head, shuffle_each_epoch,
                                 warn)
from keras_transfer.errors import DataError
from keras_transfer.image_files import decode_image_file


# What `tf.io.decode_image` reads, and image files it does not (named when skipped).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
OTHER_IMAGE_EXTENSIONS = (".tif", ".tiff", ".heic", ".heif", ".avif", ".jp2", ".ppm", ".pgm")
TFDS_PREFIX = "tfds:"


@dataclasses.dataclass
class ImageSource:
    """Images and labels read from a source, before batching.

    Attributes:
        class_names: list of str, or None when the source does not name them.
        size: number of examples, or None when unknown.
        has_labels: bool.
        images: an `(N, H, W, C)` array, or a list of image files, or None
            for a `tf.data`/TFDS source.
        labels: `(N, ...)` array (`-1` placeholders without labels), with
            `images`.
        dataset: unbatched `tf.data.Dataset` of `(image, label)` for a
            `tf.data`/TFDS source (see `as_tf_dataset` for the others).
    """

    class_names: list | None
    size: int | None
    has_labels: bool = True
    images: object = None
    labels: np.ndarray | None = None
    dataset: object = None

    @property
    def are_files(self) -> bool:
        return isinstance(self.images, list)

    def as_tf_dataset(self):
        """The unbatched `tf.data.Dataset` of `(image, label)`."""
        if self.dataset is not None:
            return self.dataset
        tf = backend.tensorflow("tf.data pipelines")
        if not self.are_files:
            return tf.data.Dataset.from_tensor_slices((self.images, self.labels))

        def load(file, label):
            image = tf.io.decode_image(tf.io.read_file(file), channels=3,
                                       expand_animations=False)
            return image, label

        return tf.data.Dataset.from_tensor_slices((self.images, self.labels)).map(
            as_written(load), num_parallel_calls=tf.data.AUTOTUNE)


def read_image_folder(path: str, class_names=None) -> ImageSource:
    """Reads a folder with one subfolder of images per class.

    Images in nested folders belong to the class folder they are in. Every
    file is checked before training starts, and unreadable ones are named,
    so a broken file does not stop a run halfway through. Files that are not
    images TensorFlow reads (e.g. `.tiff`), and class folders without images,
    are named in a warning.

    Args:
        path: str. The folder; subfolder names are the class names (sorted).
        class_names: list of str, optional. The model's class names: class
            folders are matched to them by name (a subset is fine), and a
            folder that names another class is an error.

    Returns:
        An `ImageSource` (its class names are `class_names` when given).

    Raises:
        DataError: no class folders, no images, unreadable images, or a class
            folder the model does not know.
    """
    found = folder_class_names(path)
    names = found if class_names is None else [str(c) for c in class_names]
    unknown = [n for n in found if n not in names]
    if unknown:
        raise DataError(
            f"The folder {path!r} has class folders {unknown} that are not among this "
            f"model's classes {names[:20]}. Class folders are matched to the model's "
            "classes by name: rename or remove those folders, or use a model built for "
            "these classes.")
    files, labels, skipped, empty = [], [], [], []
    for name in found:
        class_files = _image_files(os.path.join(path, name), skipped)
        if not class_files:
            empty.append(name)
        files += class_files
        labels += [names.index(name)] * len(class_files)
    skipped += [os.path.join(path, f) for f in sorted(os.listdir(path))
                if os.path.isfile(os.path.join(path, f))
                and f.lower().endswith(IMAGE_EXTENSIONS + OTHER_IMAGE_EXTENSIONS)]
    if not files:
        raise DataError(
            f"The folder {path!r} has class subfolders {found} but no "
            f"image files ({', '.join(IMAGE_EXTENSIONS)}) in them."
            + (f" It has {len(skipped)} other files, e.g. {_shown(skipped, 3)}; "
               "convert images to PNG or JPEG." if skipped else "")
        )
    if skipped:
        warn(f"Skipped {len(skipped)} files in {path!r} that are not images TensorFlow "
             f"reads ({', '.join(IMAGE_EXTENSIONS)}) or lie outside the class folders: "
             f"{_shown(skipped, 10)}. Convert them (e.g. to PNG) or move them into a class "
             "folder to use them.")
    if empty:
        warn(f"The class folders {empty} of {path!r} hold no images: the model sees no "
             "example of these classes here.")
    unreadable = [f for f in files if not _is_readable_image(f)]
    if unreadable:
        shown = "\n  ".join(unreadable[:20])
        more = f"\n  ... and {len(unreadable) - 20} more" if len(unreadable) > 20 else ""
        raise DataError(
            f"{len(unreadable)} of {len(files)} image files in {path!r} cannot "
            f"be decoded:\n  {shown}{more}\nRemove or replace them and run again."
        )

    return ImageSource(names, len(files), images=files, labels=np.asarray(labels, np.int64))


def _image_files(folder: str, skipped: list) -> list[str]:
    """The image files under `folder`, nested folders included, sorted.

    Files of other types are added to `skipped`; hidden files and folders
    (`.DS_Store`, `.ipynb_checkpoints`) are left out without a word.
    """
    files = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            file = os.path.join(root, name)
            (files if name.lower().endswith(IMAGE_EXTENSIONS) else skipped).append(file)
    return files


def _shown(items: list, n: int) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def folder_class_names(path: str) -> list[str]:
    """The class names of an image folder: its subfolders, sorted."""
    if not os.path.isdir(path):
        raise DataError(f"Received data path {path!r}, which is not a folder.")
    class_names = sorted(
        d for d in os.listdir(path)
        if os.path.isdir(os.path.join(path, d)) and not d.startswith(".")
    )
    if not class_names:
        raise DataError(
            f"The folder {path!r} has no class subfolders. Expected one "
            "subfolder of images per class, e.g. data/cats/*.jpg, data/dogs/*.jpg."
        )
    return class_names


def _is_readable_image(file: str) -> bool:
    """Decodes the file's header and data with the decoder training will use."""
    if not backend.is_tensorflow():
        try:
            decode_image_file(file)
            return True
        except (OSError, ValueError, SyntaxError):  # what Pillow raises for bad files
            return False
    tf = backend.tensorflow("decoding images")
    try:
        tf.io.decode_image(tf.io.read_file(file), channels=3, expand_animations=False)
        return True
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
        return False


def read_tfds(spec: str, data_dir: str | None = None) -> ImageSource:
    """Loads a TensorFlow Datasets image classification dataset.

    Args:
        spec: str. `"tfds:<name>[:<split>]"` or `"<name>[:<split>]"`, e.g.
            `"tfds:tf_flowers:train[:80%]"`. The split defaults to `"train"`.
        data_dir: str, optional. Where TFDS keeps prepared datasets.

    Returns:
        An `ImageSource` with the dataset's class names.
    """
    backend.tensorflow("TFDS datasets")
    import tensorflow_datasets as tfds  # lazy: needs TensorFlow, optional on JAX

    name, _, split = spec.removeprefix(TFDS_PREFIX).partition(":")
    split = split or "train"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as error:  # tfds raises its own DatasetNotFoundError
        raise DataError(
            f"Received TFDS dataset name {name!r}, which TFDS does not know: "
            f"{str(error).splitlines()[0][:300]}"
        ) from error
    if not _tfds_is_prepared(builder):
        _check_online(builder, name)
    try:
        dataset, info = tfds.load(name, split=split, as_supervised=True,
                                  with_info=True, data_dir=data_dir)
    except Exception as error:
        raise DataError(f"tfds.load({name!r}, split={split!r}) failed: {error}") from error
    label = info.features["label"] if "label" in info.features else None
    class_names = list(label.names) if label is not None and hasattr(label, "names") else None
    size = int(dataset.cardinality()) if int(dataset.cardinality()) >= 0 else None
    return ImageSource(class_names, size, dataset=dataset)


def _tfds_is_prepared(builder) -> bool:
    tf = backend.tensorflow("TFDS datasets")
    try:
        return tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json"))
    except Exception:  # noqa: BLE001 - any failure means "not prepared"
        return False


def _check_online(builder, name: str, timeout: float = 3.0) -> None:
    """Fails within seconds when the download hosts cannot be reached.

    TFDS retries a failed download with backoff for minutes; checking the
    hosts first turns that into an immediate, clear error.
    """
    urls = list(getattr(builder, "url_infos", None) or [])
    hosts = {urlparse(u).hostname for u in urls if urlparse(u).hostname}
    hosts = hosts or {"storage.googleapis.com"}
    for host in sorted(hosts):
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
        except OSError as error:
            raise DataError(
                f"The TFDS dataset {name!r} is not prepared in {builder.data_dir} "
                f"and its download host {host} cannot be reached ({error}): "
                "this machine seems to be offline. Prepare it on a connected "
                f"machine (`tfds build {name}`) and copy the folder into "
                "data_dir, or use a local image folder instead."
            ) from error


def _as_image_source(x, y, labels=None) -> ImageSource:
    """Wraps arrays, a dataset, a folder or a TFDS name as an `ImageSource`.

    `labels` (a dict of `labels_for_head` keyword arguments) checks and
    converts the labels of arrays, and matches a folder's class folders to
    its class names.
    """
    if isinstance(x, (str, os.PathLike)):
        if y is not None:
            raise DataError("Received labels y together with a folder or TFDS "
                            "name; the labels come from the source itself. Drop y.")
        x = os.fspath(x)
        if x.startswith(TFDS_PREFIX):
            return read_tfds(x)
        if os.path.isdir(x):
            return read_image_folder(x, (labels or {}).get("class_names"))
        raise DataError(
            f"Received data {x!r}, which is neither an existing folder nor a "
            f"TFDS name written '{TFDS_PREFIX}<name>[:<split>]'."
        )
    if backend.is_tf_dataset(x):
        backend.tensorflow("tf.data inputs")
        if y is not None:
            raise DataError("Received a tf.data.Dataset and separate labels y; "
                            "put the labels in the dataset as (image, label) pairs.")
        return _dataset_source(x)
    return _array_source(x, y, labels)


def _dataset_source(dataset) -> ImageSource:
    tf = backend.tensorflow("tf.data inputs")
    spec = dataset.element_spec
    has_labels = isinstance(spec, tuple)
    image_spec = spec[0] if has_labels else spec
    _check_dataset_spec(image_spec, spec[1] if has_labels else None)
    check_finite(dataset)
    rank = image_spec.shape.rank
    if rank == 4 or (rank == 3 and image_spec.shape[-1] not in (1, 3)):
        dataset = dataset.unbatch()  # batched: rebatch to our own batch size
    if not has_labels:
        dataset = dataset.map(lambda image: (image, tf.constant(-1, tf.int64)))
    n = int(dataset.cardinality())
    if n == 0:
        raise DataError("Received an empty tf.data.Dataset: it has no elements.")
    return ImageSource(None, n if n > 0 else None, has_labels, dataset=dataset)


def _check_dataset_spec(image_spec, label_spec) -> None:
    """Refuses, before anything runs, the tf.data elements the pipeline cannot read right."""
    if not hasattr(image_spec, "dtype") or not hasattr(image_spec, "shape"):
        raise DataError(f"Received a tf.data.Dataset of {image_spec}; expected images, or "
                        "(image, label) pairs.")
    dtype, shape = image_spec.dtype, image_spec.shape
    if dtype.is_integer and dtype.size > 1 and dtype.name.startswith("uint"):
        raise DataError(f"Received tf.data images of dtype {dtype.name}: {8 * dtype.size}-bit "
                        "pixels, but the models take 8-bit values 0-255. Convert them, e.g. "
                        "map(lambda x, y: (tf.cast(x, tf.float32) / 257.0, y)) for 16-bit.")
    if not (dtype.is_integer or dtype.is_floating):
        raise DataError(f"Received tf.data images of dtype {dtype.name}; expected decoded "
                        "pixels (numbers 0-255). Decode files with tf.io.decode_image, or "
                        "pass the folder of images instead.")
    # (H, W, 4) is RGBA; (B, H, W) grayscale batches have any width.
    if (shape.rank == 4 and shape[-1] not in (1, 3, None)) or \
            (shape.rank == 3 and shape[-1] == 4):
        raise DataError(f"Received tf.data images of shape {shape} with {shape[-1]} channels; "
                        "expected 1 (grayscale) or 3 (RGB). For RGBA drop the alpha channel: "
                        "map(lambda x, y: (x[..., :3], y)).")
    if getattr(getattr(label_spec, "dtype", None), "name", None) == "string":
        raise DataError("Received a tf.data.Dataset with string labels; expected class "
                        "indices 0..num_classes-1 (or one-hot rows). Map the names to "
                        "indices, e.g. with tf.lookup.StaticHashTable, or pass arrays or a "
                        "folder, whose class names are read for you.")


def _array_source(x, y, label_options=None) -> ImageSource:
    try:
        x = np.asarray(x)
    except Exception as error:
        raise DataError(f"Could not read the images as an array: {error}") from error
    if x.ndim == 0 or len(x) == 0:
        raise DataError(f"Received no images (an array of shape {x.shape}).")
    if x.dtype.kind in "USO" and x.ndim == 1:
        raise DataError(
            f"Received a list of {len(x)} names such as {str(x[0])[:80]!r}, not images. Give "
            "image arrays (N, H, W, 3), a folder with one subfolder of images per class, or "
            "for files, arrays read with e.g. np.stack([np.asarray(PIL.Image.open(f)."
            "convert('RGB').resize((W, H))) for f in files]).")
    if x.ndim == 3 and x.shape[-1] in (1, 3):
        one = "RGB" if x.shape[-1] == 3 else "grayscale"
        raise DataError(
            f"Received an array of shape {x.shape}: one {one} image, or {x.shape[0]} grayscale "
            f"images {x.shape[1]}x{x.shape[2]}? Give images with a batch axis: x[np.newaxis] "
            "for one image, (N, H, W) or (N, H, W, C) for several.")
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(
            f"Received images of shape {x.shape}; expected (N, H, W) or "
            "(N, H, W, C) with C=1 (grayscale) or C=3 (RGB). For RGBA images "
            "drop the alpha channel: x[..., :3]."
        )
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"Received images of dtype {x.dtype}; expected numbers (0-255).")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
        raise DataError(f"Received images with NaN or infinite pixels, at positions "
                        f"{bad[:10].tolist()}; fix or drop those images.")
    check_pixel_range(x)
    class_names = None
    if y is None:
        labels = np.full(len(x), -1, np.int64)
    else:
        if len(y) != len(x):
            raise DataError(f"Received {len(x)} images but {len(y)} labels; "
                            "expected one label per image.")
        labels = np.asarray(y)
        if label_options is not None:
            labels, class_names = labels_for_head(labels, what="images", **label_options)
    return ImageSource(class_names, len(x), y is not None, images=x, labels=labels)


def check_pixel_range(x: np.ndarray) -> None:
    """Refuses integer pixels above 255; warns when float images look scaled already."""
    if x.size == 0:
        return
    if np.issubdtype(x.dtype, np.integer) and x.dtype.itemsize > 1:
        high = int(x.max())
        if high > 255:
            raise DataError(
                f"Received integer images of dtype {x.dtype} with values up to {high}, but the "
                "models take 8-bit pixels 0-255 (read as such they would be mostly white). "
                "Convert them: (x / 257).astype('uint8') for 16-bit images, or "
                "x * (255 / x.max()) as floats for another range.")
    if not np.issubdtype(x.dtype, np.floating):
        return
    low, high = float(np.nanmin(x)), float(np.nanmax(x))
    if 0.0 < high <= 1.0:
        warn(f"Received images with values between {low:g} and {high:g}: they look scaled "
             f"to [{'-1' if low < 0 else '0'}, 1] already, but every model takes raw pixels "
             "in 0-255 and scales them itself (its preprocessing is inside). Pass the "
             "unscaled images: x * 255 for [0, 1], or the original uint8 arrays.")


def make_image_dataset(
    x,
    y=None,
    *,
    image_size: tuple[int, int],
    kind: str = "classification",
    num_classes: int | None = None,
    class_names=None,
    batch_size: int = 32,
    shuffle: bool = False,
    augmentation=None,
    seed=None,
    drop_remainder: bool = False,
) -> tuple:
    """Builds the batched pipeline the model trains, evaluates or predicts on.

    Args:
        x: arrays, a `tf.data.Dataset`, a folder path or `"tfds:<name>"`.
        y: labels for array inputs (None otherwise, or for prediction).
        image_size: `(height, width)` of the model input.
        kind: str. The head's kind (see `Head`), for label checks.
        num_classes: int. Classes (or outputs) of the head.
        class_names: list of str, optional. The head's class names, to map
            string labels of arrays.
        batch_size: int. Examples per batch.
        shuffle: bool. Shuffle every epoch (training).
        augmentation: a Keras layer (e.g. `keras.Sequential` of random
            layers) or a list of them, applied to training batches.
        seed: int or `EpochSeed`, optional. Shuffle seed.
        drop_remainder: bool. Drop a last partial batch (TPUs and several
            workers need equal batches).

    Returns:
        `(dataset, source)`: batches of `(float32 images, labels)` (a
        `tf.data.Dataset` on TensorFlow, a `batches.ExampleBatches`
        elsewhere), and the `ImageSource` with class names and size.

    Example:
        >>> ds, source = make_image_dataset("photos/", image_size=(224, 224),
        ...                                 num_classes=5, shuffle=True)
        >>> source.class_names
        ['cat', 'dog', 'fox', 'owl', 'yak']
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"Received batch_size={batch_size!r}; expected a positive int.")
    label_options = None if num_classes is None else dict(
        kind=kind, num_classes=num_classes, class_names=class_names)
    source = _as_image_source(x, y, label_options)
    height, width = image_size
    if not backend.is_tensorflow():
        return _image_batches(source, (height, width), batch_size, shuffle, augmentation, seed,
                              drop_remainder), source
    tf = backend.tensorflow("tf.data pipelines")

    def prepare(image, label):
        image = tf.convert_to_tensor(image)
        if image.shape.rank == 2:
            image = image[..., tf.newaxis]
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        if image.dtype.is_integer and image.dtype.size > 1:  # int32 of 16-bit values, say
            tf.debugging.assert_less_equal(
                image, tf.constant(255, image.dtype),
                message=f"Received integer images of dtype {image.dtype.name} with values "
                        "above 255; the models take 8-bit pixels 0-255: convert them")
        image = tf.cast(image, tf.float32)
        if tuple(image.shape[:2]) != (height, width):
            image = tf.image.resize(image, (height, width))
        image = tf.ensure_shape(image, (height, width, 3))
        return image, _prepare_label(label, kind, num_classes, source.has_labels)

    dataset = source.as_tf_dataset()
    if shuffle:
        dataset = shuffle_each_epoch(dataset, min(source.size or 10_000, 10_000), seed)
    dataset = dataset.map(as_written(prepare), num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    if augmentation is not None:
        augment = as_augmentation(augmentation)
        dataset = dataset.map(
            as_written(lambda images, labels: (augment(images, training=True), labels)),
            num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE), source


def _image_batches(source, size, batch_size, shuffle, augmentation, seed, drop_remainder):
    """`make_image_dataset` off TensorFlow: NumPy batches (labels checked by the source)."""
    augment = None if augmentation is None else as_augmentation(augmentation)

    def prepare(images, labels):
        if source.are_files:  # sizes differ: one at a time
            batch = np.stack([_resized(decode_image_file(file), size) for file in images])
        else:
            batch = _resized(images, size)
        if augment is not None:
            batch = keras.ops.convert_to_numpy(augment(batch, training=True))
        return batch, labels

    return ExampleBatches((source.images, source.labels), batch_size, prepare,
                          shuffle=shuffle, seed=seed, drop_remainder=drop_remainder)


def _resized(images, size) -> np.ndarray:
    """An image `(H, W[, C])` or a batch `(B, H, W, C)` as float32 RGB, resized bilinearly."""
    images = np.asarray(images, np.float32)
    if images.ndim == 2:
        images = images[..., np.newaxis]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.shape[-3:-1] != tuple(size):
        images = keras.ops.convert_to_numpy(keras.ops.image.resize(
            images, size, interpolation="bilinear", antialias=False))
    return images


def _prepare_label(label, kind, num_classes, has_labels):
    import tensorflow as tf  # lazy: TensorFlow is optional (Keras on JAX)

    if not has_labels or num_classes is None:
        return label
    if kind == "classification":
        label = tf.convert_to_tensor(label)
        if label.shape.rank == 1 and label.shape[0] == 1:  # (x, y[:, None]): an index
            label = label[0]
        elif label.shape.rank == 1 and label.shape[0] == num_classes:  # one-hot
            label = tf.argmax(label, axis=-1)
        elif label.shape.rank != 0:
            raise DataError(f"Received tf.data labels of shape {label.shape} per example; "
                            f"expected a class index (shape ()) or a one-hot row of "
                            f"{num_classes}. For several labels per example use "
                            "kind='multilabel'.")
        if label.dtype.is_floating:  # 1.7 is not class 1: refused as for arrays
            tf.debugging.assert_equal(
                label, tf.round(label),
                message=f"Received a class label that is not a whole number; expected class "
                        f"indices 0..{num_classes - 1} (for numeric targets use "
                        "kind='regression')")
        label = tf.cast(label, tf.int64)
        tf.debugging.assert_less(
            label, tf.constant(num_classes, tf.int64),
            message=f"a label is >= num_classes={num_classes}")
        tf.debugging.assert_non_negative(label, message="a label is negative")
        return label
    return tf.cast(label, tf.float32)


def as_augmentation(augmentation):
    if isinstance(augmentation, (list, tuple)):
        # A Pipeline (not a Sequential) runs in tf.data on any backend.
        return keras.layers.Pipeline(list(augmentation), name="augmentation")
    if callable(augmentation):
        return augmentation
    raise DataError(f"Received augmentation={augmentation!r}; expected a Keras "
                    "layer or a list of layers such as keras.layers.RandomFlip().")


def shift_augmentation(share: float, seed: int | None = None):
    """Random translations by up to `share` of the height and width (`FineTunePhase.shift`)."""
    return keras.layers.Pipeline([keras.layers.RandomTranslation(share, share, seed=seed)],
                                 name="shift")


def default_augmentation(seed: int | None = None):
    """Mild augmentation suited to most photographs: flips, rotation, zoom."""
    return keras.layers.Pipeline([
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomRotation(0.05, seed=seed),
        keras.layers.RandomZoom(0.1, seed=seed),
    ], name="augmentation")
