"""Turning what a user has into batched `tf.data` pipelines of images.

Sources: numpy arrays `(N, H, W)`, `(N, H, W, 1)` or `(N, H, W, 3)`; a
`tf.data.Dataset` of `(image, label)` pairs, batched or not; a folder with one
subfolder of images per class; or a TensorFlow Datasets name written
`"tfds:<name>[:<split>]"`. Every pipeline resizes to the model's input size,
turns grayscale into RGB, keeps raw 0-255 values as float32 (the model does
its own preprocessing), batches and prefetches. Random augmentation layers,
if given, run on training batches only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from urllib.parse import urlparse

import numpy as np
import tensorflow as tf

from keras_transfer.errors import DataError

logger = logging.getLogger("keras_transfer")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
TFDS_PREFIX = "tfds:"


@dataclasses.dataclass
class ImageSource:
    """Images and labels read from a source, before batching.

    Attributes:
        dataset: unbatched `tf.data.Dataset` of `(image, label)` (labels
            are `-1` placeholders when the source has none).
        class_names: list of str, or None when the source does not name them.
        size: number of examples, or None when unknown.
        has_labels: bool.
    """

    dataset: tf.data.Dataset
    class_names: list | None
    size: int | None
    has_labels: bool = True


def read_image_folder(path: str) -> ImageSource:
    """Reads a folder with one subfolder of images per class.

    Every file is checked before training starts, and unreadable ones are
    named, so a broken file does not stop a run halfway through.

    Args:
        path: str. The folder; subfolder names are the class names (sorted).

    Returns:
        An `ImageSource`.
    """
    class_names = folder_class_names(path)
    files, labels = [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(path, name)
        for file in sorted(os.listdir(folder)):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                files.append(os.path.join(folder, file))
                labels.append(label)
    if not files:
        raise DataError(
            f"The folder {path!r} has class subfolders {class_names} but no "
            f"image files ({', '.join(IMAGE_EXTENSIONS)}) in them."
        )
    unreadable = [f for f in files if not _is_readable_image(f)]
    if unreadable:
        shown = "\n  ".join(unreadable[:20])
        more = f"\n  ... and {len(unreadable) - 20} more" if len(unreadable) > 20 else ""
        raise DataError(
            f"{len(unreadable)} of {len(files)} image files in {path!r} cannot "
            f"be decoded:\n  {shown}{more}\nRemove or replace them and run again."
        )

    def load(file, label):
        image = tf.io.decode_image(tf.io.read_file(file), channels=3,
                                   expand_animations=False)
        return image, label

    dataset = tf.data.Dataset.from_tensor_slices((files, labels)).map(
        load, num_parallel_calls=tf.data.AUTOTUNE)
    return ImageSource(dataset, class_names, len(files))


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
    import tensorflow_datasets as tfds

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
    return ImageSource(dataset, class_names, size)


def _tfds_is_prepared(builder) -> bool:
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


def _as_image_source(x, y) -> ImageSource:
    """Wraps arrays, a dataset, a folder or a TFDS name as an `ImageSource`."""
    if isinstance(x, (str, os.PathLike)):
        if y is not None:
            raise DataError("Received labels y together with a folder or TFDS "
                            "name; the labels come from the source itself. Drop y.")
        x = os.fspath(x)
        if x.startswith(TFDS_PREFIX):
            return read_tfds(x)
        if os.path.isdir(x):
            return read_image_folder(x)
        raise DataError(
            f"Received data {x!r}, which is neither an existing folder nor a "
            f"TFDS name written '{TFDS_PREFIX}<name>[:<split>]'."
        )
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise DataError("Received a tf.data.Dataset and separate labels y; "
                            "put the labels in the dataset as (image, label) pairs.")
        return _dataset_source(x)
    return _array_source(x, y)


def _dataset_source(dataset: tf.data.Dataset) -> ImageSource:
    spec = dataset.element_spec
    has_labels = isinstance(spec, tuple)
    image_spec = spec[0] if has_labels else spec
    rank = image_spec.shape.rank
    if rank == 4 or (rank == 3 and image_spec.shape[-1] not in (1, 3)):
        dataset = dataset.unbatch()  # batched: rebatch to our own batch size
    if not has_labels:
        dataset = dataset.map(lambda image: (image, tf.constant(-1, tf.int64)))
    n = int(dataset.cardinality())
    if n == 0:
        raise DataError("Received an empty tf.data.Dataset: it has no elements.")
    return ImageSource(dataset, None, n if n > 0 else None, has_labels)


def _array_source(x, y) -> ImageSource:
    try:
        x = np.asarray(x)
    except Exception as error:
        raise DataError(f"Could not read the images as an array: {error}") from error
    if x.ndim == 0 or len(x) == 0:
        raise DataError(f"Received no images (an array of shape {x.shape}).")
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
    if y is None:
        labels = np.full(len(x), -1, np.int64)
    else:
        labels = np.asarray(y)
        if len(labels) != len(x):
            raise DataError(f"Received {len(x)} images but {len(labels)} labels; "
                            "expected one label per image.")
    dataset = tf.data.Dataset.from_tensor_slices((x, labels))
    return ImageSource(dataset, None, len(x), y is not None)


def check_labels(labels, task: str, num_classes: int) -> None:
    """Raises a clear error for labels the head cannot learn."""
    labels = np.asarray(labels)
    if task == "classification":
        if labels.ndim == 2 and labels.shape[1] == num_classes:
            return  # one-hot; converted by the pipeline
        if labels.ndim != 1 or not np.all(np.equal(np.mod(labels, 1), 0)):
            raise DataError(f"Received labels of shape {labels.shape}; expected "
                            "integer class indices of shape (N,).")
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.size:
            raise DataError(
                f"Received labels outside num_classes={num_classes}: "
                f"{sorted(set(bad.tolist()))[:10]}. Expected integers in "
                f"[0, {num_classes - 1}]; raise num_classes or re-index the labels."
            )
    elif task == "multilabel":
        if labels.ndim != 2 or labels.shape[1] != num_classes:
            raise DataError(f"Received multilabel targets of shape {labels.shape}; "
                            f"expected (N, {num_classes}) of 0/1.")
        if not np.isin(labels, (0, 1)).all():
            raise DataError("Received multilabel targets other than 0 and 1.")


def make_image_dataset(
    x,
    y=None,
    *,
    image_size: tuple[int, int],
    task: str = "classification",
    num_classes: int | None = None,
    batch_size: int = 32,
    shuffle: bool = False,
    augmentation=None,
    seed: int | None = None,
) -> tuple[tf.data.Dataset, ImageSource]:
    """Builds the batched pipeline the model trains, evaluates or predicts on.

    Args:
        x: arrays, a `tf.data.Dataset`, a folder path or `"tfds:<name>"`.
        y: labels for array inputs (None otherwise, or for prediction).
        image_size: `(height, width)` of the model input.
        task: str. Task of the head, for label checks.
        num_classes: int. Classes (or outputs) of the head.
        batch_size: int. Examples per batch.
        shuffle: bool. Shuffle every epoch (training).
        augmentation: a Keras layer (e.g. `keras.Sequential` of random
            layers) or a list of them, applied to training batches.
        seed: int, optional. Shuffle seed.

    Returns:
        `(dataset, source)`: batches of `(float32 images, labels)`, and the
        `ImageSource` with class names and size.

    Example:
        >>> ds, source = make_image_dataset("photos/", image_size=(224, 224),
        ...                                 num_classes=5, shuffle=True)
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"Received batch_size={batch_size!r}; expected a positive int.")
    source = _as_image_source(x, y)
    if y is not None and num_classes is not None:
        check_labels(y, task, num_classes)
    height, width = image_size

    def prepare(image, label):
        image = tf.convert_to_tensor(image)
        if image.shape.rank == 2:
            image = image[..., tf.newaxis]
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        image = tf.cast(image, tf.float32)
        if tuple(image.shape[:2]) != (height, width):
            image = tf.image.resize(image, (height, width))
        image = tf.ensure_shape(image, (height, width, 3))
        return image, _prepare_label(label, task, num_classes, source.has_labels)

    dataset = source.dataset
    if shuffle:
        dataset = dataset.shuffle(min(source.size or 10_000, 10_000), seed=seed,
                                  reshuffle_each_iteration=True)
    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size)
    if augmentation is not None:
        augment = _as_augmentation(augmentation)
        dataset = dataset.map(lambda images, labels: (augment(images, training=True), labels),
                              num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE), source


def _prepare_label(label, task, num_classes, has_labels):
    if not has_labels or num_classes is None:
        return label
    if task == "classification":
        label = tf.convert_to_tensor(label)
        if label.shape.rank == 1:  # one-hot
            label = tf.argmax(label, axis=-1)
        label = tf.cast(label, tf.int64)
        tf.debugging.assert_less(
            label, tf.constant(num_classes, tf.int64),
            message=f"a label is >= num_classes={num_classes}")
        tf.debugging.assert_non_negative(label, message="a label is negative")
        return label
    return tf.cast(label, tf.float32)


def _as_augmentation(augmentation):
    import keras

    if isinstance(augmentation, (list, tuple)):
        return keras.Sequential(list(augmentation), name="augmentation")
    if callable(augmentation):
        return augmentation
    raise DataError(f"Received augmentation={augmentation!r}; expected a Keras "
                    "layer or a list of layers such as keras.layers.RandomFlip().")


def default_augmentation(seed: int | None = None):
    """Mild augmentation suited to most photographs: flips, rotation, zoom."""
    import keras

    return keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomRotation(0.05, seed=seed),
        keras.layers.RandomZoom(0.1, seed=seed),
    ], name="augmentation")


# ------------------------------------------------------------------ text
@dataclasses.dataclass
class TextSource:
    """Texts and labels read from a source.

    Attributes:
        texts: list of str.
        labels: numpy array of label indices or targets, or None.
        class_names: list of str when the labels were names, else None.
    """

    texts: list
    labels: np.ndarray | None
    class_names: list | None = None


def read_text_file(path: str, text_column: str = "text", label_column: str | None = "label",
                   delimiter: str | None = None) -> TextSource:
    """Reads a CSV or TSV file with named text and label columns.

    Args:
        path: str. A `.csv` or `.tsv` file with a header row (the delimiter
            is guessed from the extension unless given).
        text_column: str. Name of the column holding the texts.
        label_column: str or None. Name of the label column (None for
            unlabelled text).
        delimiter: str, optional. Field separator.

    Returns:
        A `TextSource`; string labels are turned into indices of
        `class_names` (sorted), integer labels are kept.
    """
    import csv

    if not os.path.isfile(path):
        raise DataError(f"Received text file {path!r}, which does not exist.")
    delimiter = delimiter or ("\t" if path.lower().endswith((".tsv", ".tab")) else ",")
    lines = read_utf8_lines(path)
    rows = list(csv.DictReader(lines, delimiter=delimiter))
    if not rows:
        raise DataError(f"{path!r} has a header but no rows, or is empty.")
    columns = list(rows[0].keys())
    for column in (text_column, label_column):
        if column is not None and column not in columns:
            raise DataError(f"{path!r} has no column {column!r}; its columns are {columns}. "
                            "Pass text_column= and label_column= to pick them.")
    texts = [row[text_column] or "" for row in rows]
    if label_column is None:
        return TextSource(texts, None)
    labels, class_names = encode_labels([row[label_column] for row in rows])
    return TextSource(texts, labels, class_names)


def read_utf8_lines(path: str) -> list[str]:
    """Reads a text file's lines, naming the first line that is not UTF-8.

    Args:
        path: str. The file.

    Returns:
        The lines, without line endings.
    """
    with open(path, "rb") as f:
        raw = f.read().splitlines()
    lines = []
    for number, line in enumerate(raw, start=1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise DataError(
                f"{path!r} is not valid UTF-8 at line {number} (byte {error.start}: "
                f"{line[max(error.start - 10, 0):error.start + 10]!r}). Re-save the "
                "file as UTF-8."
            ) from error
    return lines


def encode_labels(values, class_names=None):
    """Turns labels into indices; names become indices of sorted class names.

    Returns:
        `(labels, class_names)`: class_names is None for numeric labels.
    """
    values = list(values)
    try:
        return np.asarray([int(v) for v in values]), class_names
    except (TypeError, ValueError):
        pass
    names = class_names or sorted({str(v) for v in values})
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({str(v) for v in values} - set(index))
    if unknown:
        raise DataError(f"Received labels {unknown[:10]} that are not among the "
                        f"class names {names}.")
    return np.asarray([index[str(v)] for v in values]), names


def as_text_source(x, y=None, *, text_column="text", label_column="label",
                   class_names=None) -> TextSource | tf.data.Dataset:
    """Wraps a list of strings, a CSV/TSV path or a dataset of strings.

    Returns:
        A `TextSource` for lists and files, or the `tf.data.Dataset` as is.
    """
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise DataError("Received a tf.data.Dataset and separate labels y; "
                            "put the labels in the dataset as (text, label) pairs.")
        return x
    if isinstance(x, (str, os.PathLike)):
        if y is not None:
            raise DataError("Received labels y together with a file; the labels come "
                            "from its label column. Drop y or pass a list of texts.")
        source = read_text_file(os.fspath(x), text_column, label_column)
    else:
        if isinstance(x, np.ndarray):
            x = x.tolist()
        if not isinstance(x, (list, tuple)):
            raise DataError(f"Received texts of type {type(x).__name__}; expected a list "
                            "of strings, a CSV/TSV path or a tf.data.Dataset.")
        texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in x]
        labels, names = (None, None) if y is None else encode_labels(y, class_names)
        source = TextSource(texts, labels, names)
    if not source.texts:
        raise DataError("Received no texts: the list is empty.")
    not_str = [i for i, t in enumerate(source.texts) if not isinstance(t, str)]
    if not_str:
        raise DataError(f"Received non-string texts at positions {not_str[:10]}.")
    empty = [i for i, t in enumerate(source.texts) if not t.strip()]
    if empty:
        raise DataError(f"Received {len(empty)} empty strings, at positions {empty[:10]}. "
                        "Remove them or give them some text.")
    if source.labels is not None and len(source.labels) != len(source.texts):
        raise DataError(f"Received {len(source.texts)} texts but {len(source.labels)} "
                        "labels; expected one label per text.")
    return source
