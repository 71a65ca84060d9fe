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

import contextvars
import dataclasses
import functools
import logging
import os
import socket
from urllib.parse import urlparse

import numpy as np
import tensorflow as tf

from keras_transfer.errors import DataError

logger = logging.getLogger("keras_transfer")

# What `tf.io.decode_image` reads, and image files it does not (named when skipped).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
OTHER_IMAGE_EXTENSIONS = (".tif", ".tiff", ".heic", ".heif", ".avif", ".jp2", ".ppm", ".pgm")
TFDS_PREFIX = "tfds:"


# The warnings given so far in the current `fit`/`evaluate`/`predict` call.
_given = contextvars.ContextVar("keras_transfer_warnings_given", default=None)


def warn(message: str) -> None:
    """Logs a warning about the data, once per `fit`/`evaluate`/`predict` call.

    The same data is read more than once in one call (to check it, to cache
    its features, per phase): its warnings are given the first time only.
    """
    given = _given.get()
    if given is not None:
        if message in given:
            return
        given.add(message)
    logger.warning(message)


def warns_once(method):
    """Decorates a method so that each data warning shows once per call (see `warn`)."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        if _given.get() is not None:  # nested in another call
            return method(*args, **kwargs)
        token = _given.set(set())
        try:
            return method(*args, **kwargs)
        finally:
            _given.reset(token)

    return wrapper


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

    def load(file, label):
        image = tf.io.decode_image(tf.io.read_file(file), channels=3,
                                   expand_animations=False)
        return image, label

    dataset = tf.data.Dataset.from_tensor_slices((files, labels)).map(
        load, num_parallel_calls=tf.data.AUTOTUNE)
    return ImageSource(dataset, names, len(files))


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
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise DataError("Received a tf.data.Dataset and separate labels y; "
                            "put the labels in the dataset as (image, label) pairs.")
        return _dataset_source(x)
    return _array_source(x, y, labels)


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


def _array_source(x, y, label_options=None) -> ImageSource:
    try:
        x = np.asarray(x)
    except Exception as error:
        raise DataError(f"Could not read the images as an array: {error}") from error
    if x.ndim == 0 or len(x) == 0:
        raise DataError(f"Received no images (an array of shape {x.shape}).")
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
    _check_pixel_range(x)
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
    dataset = tf.data.Dataset.from_tensor_slices((x, labels))
    return ImageSource(dataset, class_names, len(x), y is not None)


def _check_pixel_range(x: np.ndarray) -> None:
    """Warns when float images look scaled already: the models take 0-255."""
    if not np.issubdtype(x.dtype, np.floating) or x.size == 0:
        return
    low, high = float(np.nanmin(x)), float(np.nanmax(x))
    if 0.0 < high <= 1.0:
        warn(f"Received images with values between {low:g} and {high:g}: they look scaled "
             f"to [{'-1' if low < 0 else '0'}, 1] already, but every model takes raw pixels "
             "in 0-255 and scales them itself (its preprocessing is inside). Pass the "
             "unscaled images: x * 255 for [0, 1], or the original uint8 arrays.")


def labels_for_head(values, head=None, *, kind: str = "classification",
                    num_classes: int | None = None, class_names=None,
                    what: str = "examples") -> tuple[np.ndarray, list | None]:
    """Checks labels against a head and returns them as the head trains on them.

    Classification labels may be integer class indices, integral floats,
    strings of integers (as a CSV file holds them), class names (mapped to
    indices of `class_names`, or of their sorted set), or one-hot rows.
    Multi-label targets are `(N, num_classes)` rows of 0/1; regression
    targets are finite numbers of shape `(N,)` or `(N, num_classes)`.

    Args:
        values: the labels, one per example.
        head: a `Head`, optional: gives `kind`, `num_classes` and
            `class_names`.
        kind, num_classes, class_names: used when no head is given.
        what: str. What the examples are, for messages (`"images"`).

    Returns:
        `(labels, class names)`: int64 indices `(N,)` (classification) or
        float32 targets, and the class names when the labels were names.

    Raises:
        DataError: naming the offending values and what to do.
    """
    if head is not None:
        kind, num_classes, class_names = head.kind, head.num_classes, head.class_names
    try:
        labels = np.asarray(values)
    except ValueError as error:  # ragged
        raise DataError(f"Received labels that do not form an array: {error}") from error
    if labels.ndim == 0 or len(labels) == 0:
        raise DataError(f"Received no labels (an array of shape {labels.shape}).")
    if labels.dtype.kind in "OUS":
        labels = _labels_from_strings(labels, kind, class_names, what)
        if isinstance(labels, tuple):  # class names
            labels, class_names = labels
            _check_range(labels, num_classes)
            return labels, class_names
    if labels.dtype.kind not in "biuf":
        raise DataError(f"Received labels of dtype {labels.dtype}; expected numbers or "
                        "class names.")
    if not np.all(np.isfinite(labels)):
        bad = np.flatnonzero(~np.isfinite(labels.reshape(len(labels), -1)).all(axis=1))
        raise DataError(f"Received NaN or infinite labels at positions {bad[:10].tolist()}; "
                        "remove those examples or fill in their labels.")
    if kind == "classification":
        if labels.ndim == 2 and labels.shape[1] == num_classes and np.isin(labels, (0, 1)).all() \
                and (labels.sum(axis=1) == 1).all():
            labels = labels.argmax(axis=1)  # one-hot rows
        if labels.ndim != 1:
            raise DataError(f"Received labels of shape {labels.shape}; expected integer class "
                            f"indices of shape (N,) or one-hot rows (N, {num_classes}). "
                            "For several labels per example use kind='multilabel'.")
        fractional = labels[np.mod(labels, 1) != 0]
        if fractional.size:
            raise DataError(
                f"Received class labels that are not whole numbers: "
                f"{sorted(set(fractional.tolist()))[:5]}. Expected class indices 0.."
                f"{(num_classes or 2) - 1}; for numeric targets use kind='regression'.")
        labels = labels.astype(np.int64)
        _check_range(labels, num_classes)
        return labels, None
    labels = labels.astype(np.float32)
    if kind == "multilabel":
        if labels.ndim != 2 or labels.shape[1] != num_classes:
            raise DataError(f"Received multilabel targets of shape {labels.shape}; "
                            f"expected (N, {num_classes}) of 0/1.")
        if not np.isin(labels, (0, 1)).all():
            raise DataError("Received multilabel targets other than 0 and 1.")
        return labels, None
    if labels.ndim == 1 and num_classes == 1:
        labels = labels[:, np.newaxis]
    if labels.ndim != 2 or labels.shape[1] != num_classes:
        raise DataError(
            f"Received regression targets of shape {labels.shape}; expected "
            f"(N, {num_classes})" + (" or (N,)" if num_classes == 1 else "") + ".")
    return labels, None


def _labels_from_strings(labels, kind, class_names, what):
    """Labels read as text: numbers parsed, or class names mapped to indices."""
    texts = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v
             for v in labels.reshape(-1).tolist()]
    blank = [i for i, v in enumerate(texts) if v is None or not str(v).strip()]
    if blank:
        raise DataError(f"Received missing or blank labels at positions {blank[:10]}; every "
                        f"one of the {what} needs a label. Fill them in or drop those rows.")
    texts = [str(v).strip() for v in texts]
    try:
        numbers = np.asarray([float(v) for v in texts]).reshape(labels.shape)
    except ValueError:
        numbers = None
    if numbers is not None and not (kind == "classification" and class_names is not None):
        return numbers
    if kind != "classification":
        raise DataError(f"Received labels such as {texts[:3]} for a {kind} head; expected "
                        "numbers.")
    if labels.ndim != 1:
        raise DataError(f"Received class names of shape {labels.shape}; expected one per "
                        "example.")
    names = list(class_names) if class_names is not None else sorted(set(texts))
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(texts) - set(index))
    if unknown:
        raise DataError(f"Received labels {unknown[:10]} that are not among the class names "
                        f"{names[:20]}.")
    return np.asarray([index[t] for t in texts], np.int64), names


def _check_range(labels, num_classes):
    if num_classes is None:
        return
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(
            f"Received labels outside num_classes={num_classes}: "
            f"{sorted(set(bad.tolist()))[:10]}. Expected integers in "
            f"[0, {num_classes - 1}]; raise num_classes or re-index the labels.")


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
) -> tuple[tf.data.Dataset, ImageSource]:
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
        `(dataset, source)`: batches of `(float32 images, labels)`, and the
        `ImageSource` with class names and size.

    Example:
        >>> ds, source = make_image_dataset("photos/", image_size=(224, 224),
        ...                                 num_classes=5, shuffle=True)
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"Received batch_size={batch_size!r}; expected a positive int.")
    label_options = None if num_classes is None else dict(
        kind=kind, num_classes=num_classes, class_names=class_names)
    source = _as_image_source(x, y, label_options)
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
        return image, _prepare_label(label, kind, num_classes, source.has_labels)

    dataset = source.dataset
    if shuffle:
        dataset = shuffle_each_epoch(dataset, min(source.size or 10_000, 10_000), seed)
    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    if augmentation is not None:
        augment = as_augmentation(augmentation)
        dataset = dataset.map(lambda images, labels: (augment(images, training=True), labels),
                              num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE), source


class EpochSeed:
    """A shuffle seed that gives epoch e an order that depends on (seed, e) only.

    With `reshuffle_each_iteration`, tf.data draws the order of each pass
    from a sequence that starts over in a new process, so a run resumed at
    epoch e would train on epoch 0's order again. A pipeline shuffled with an
    `EpochSeed` (`shuffle_each_epoch`) reads the epoch from a variable when
    each pass starts; training sets it at the start of every epoch
    (`training.fit_phase` adds the callback). The order is then the same in
    an uninterrupted run, a resumed one, and on every worker.

    Args:
        seed: int. The base seed.

    Example:
        >>> seed = EpochSeed(7)
        >>> batches = shuffle_each_epoch(dataset, 1000, seed).batch(32)
        >>> seed.set_epoch(3)   # the next pass is epoch 3's order
    """

    def __init__(self, seed: int):
        self.seed = int(seed)
        with tf.init_scope():
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="shuffle_epoch")

    def set_epoch(self, epoch: int) -> None:
        self.epoch.assign(int(epoch))

    def tensor(self) -> tf.Tensor:
        """This pass's seed; read inside a dataset function, when the pass starts."""
        return tf.constant(self.seed, tf.int64) * 1_000_003 + self.epoch.read_value()

    def __int__(self) -> int:
        return self.seed

    def __repr__(self) -> str:
        return f"EpochSeed({self.seed})"


def shuffle_each_epoch(dataset: tf.data.Dataset, buffer_size: int, seed=None):
    """`dataset.shuffle` in a new order every pass.

    Args:
        dataset: the dataset to shuffle.
        buffer_size: int. Elements in the shuffle buffer.
        seed: None, an int (tf.data's own sequence of orders), or an
            `EpochSeed` (the order of epoch e depends on (seed, e) only).

    Returns:
        The shuffled dataset, with the cardinality of `dataset`.
    """
    if not isinstance(seed, EpochSeed):
        return dataset.shuffle(buffer_size, seed=seed, reshuffle_each_iteration=True)
    cardinality = int(dataset.cardinality())

    def one_pass(_):
        # This runs when a pass starts, so it reads that pass's epoch. The
        # function's graph gets no global seed: the order then depends on
        # (seed, epoch) only, and TensorFlow's check of a (0, tensor) seed
        # pair, which fails after tf.random.set_seed(0), is not reached.
        tf.compat.v1.get_default_graph().seed = None
        return dataset.shuffle(buffer_size, seed=seed.tensor(), reshuffle_each_iteration=False)

    shuffled = tf.data.Dataset.from_tensors(0).flat_map(one_pass)
    if cardinality >= 0:
        shuffled = shuffled.apply(tf.data.experimental.assert_cardinality(cardinality))
    return shuffled


def _prepare_label(label, kind, num_classes, has_labels):
    if not has_labels or num_classes is None:
        return label
    if kind == "classification":
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


def as_augmentation(augmentation):
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
    """Texts and their labels as read from a source, before any check against a head.

    Attributes:
        texts: list of str.
        labels: the labels as given (a list or array; strings when read from
            a file), or None.
    """

    texts: list
    labels: object = None


def read_text_file(path: str, text_column: str = "text", label_column: str | None = "label",
                   delimiter: str | None = None) -> TextSource:
    """Reads a CSV or TSV file with named text and label columns.

    Cells may be quoted and hold newlines; a UTF-8 byte-order mark is
    dropped. Labels stay strings here: the head they are for decides whether
    they are class names, class indices or numbers (`labels_for_head`).

    Args:
        path: str. A `.csv` or `.tsv` file with a header row (the delimiter
            is guessed from the extension unless given).
        text_column: str. Name of the column holding the texts.
        label_column: str or None. Name of the label column (None for
            unlabelled text).
        delimiter: str, optional. Field separator.

    Returns:
        A `TextSource`.
    """
    import csv
    import io

    if not os.path.isfile(path):
        raise DataError(f"Received text file {path!r}, which does not exist.")
    delimiter = delimiter or ("\t" if path.lower().endswith((".tsv", ".tab")) else ",")
    text = read_utf8(path)
    rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))
    if not rows:
        raise DataError(f"{path!r} has a header but no rows, or is empty.")
    columns = list(rows[0].keys())
    for column in (text_column, label_column):
        if column is not None and column not in columns:
            raise DataError(f"{path!r} has no column {column!r}; its columns are {columns}. "
                            "Pass text_column= and label_column= to pick them.")
    short = [i + 2 for i, row in enumerate(rows) if None in row.values()]
    if short:
        raise DataError(f"{path!r} has rows with fewer fields than its header, at lines "
                        f"{short[:10]} (counting the header as line 1); fill them in.")
    texts = [row[text_column] for row in rows]
    if label_column is None:
        return TextSource(texts)
    return TextSource(texts, [row[label_column] for row in rows])


def read_utf8(path: str) -> str:
    """Reads a text file, naming the first line that is not UTF-8; drops a BOM.

    Args:
        path: str. The file.

    Returns:
        Its text, line endings as they are.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"{path!r} is not valid UTF-8 at line {line} (byte {error.start}: "
            f"{raw[max(error.start - 10, 0):error.start + 10]!r}). Re-save the file as UTF-8."
        ) from error


def read_utf8_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file, without line endings (see `read_utf8`)."""
    return read_utf8(path).splitlines()


def as_text_source(x, y=None, *, text_column="text",
                   label_column="label") -> TextSource | tf.data.Dataset:
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
        source = TextSource([_decode(t) for t in x], y)
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


def _decode(text):
    if isinstance(text, bytes):
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"Received a bytes text that is not UTF-8 ({text[:40]!r}); "
                            "decode it to str first.") from error
    return text


# ------------------------------------------------------------ several heads
SAMPLINGS = ("round_robin", "proportional")


def task_schedule(batches: dict, sampling: str = "round_robin", seed=None) -> list[str]:
    """The order in which one training epoch takes batches from the heads' data.

    `"round_robin"` takes one batch from each head's data in turn until the
    largest has been seen once; smaller ones start over when they run out, so
    every head trains for the same number of steps. `"proportional"` takes
    every batch of every head once, in a random order, so each step draws a
    head in proportion to the batches it has left. (The training pipeline
    reshuffles the proportional order every epoch.)

    Args:
        batches: dict. `{head name: batches per pass over its data}`.
        sampling: str. `"round_robin"` or `"proportional"`.
        seed: int, optional. Seed of the proportional order.

    Returns:
        A list of head names, one per step of the epoch.

    Example:
        >>> task_schedule({"a": 3, "b": 1})
        ['a', 'b', 'a', 'b', 'a', 'b']
        >>> sorted(task_schedule({"a": 3, "b": 1}, "proportional"))
        ['a', 'a', 'a', 'b']
    """
    check_sampling(sampling)
    names = list(batches)
    if sampling == "round_robin":
        return names * max(batches.values())
    order = [name for name in names for _ in range(batches[name])]
    np.random.default_rng(seed).shuffle(order)
    return order


def check_sampling(sampling) -> str:
    if sampling not in SAMPLINGS:
        raise ValueError(f"Received sampling={sampling!r}; expected one of {SAMPLINGS}.")
    return sampling


def join_heads(datasets: dict, heads: dict, *, training: bool, sampling: str = "round_robin",
               seed=None, class_weights: dict | None = None) -> tuple[tf.data.Dataset, int]:
    """Joins each head's batches into the one pipeline a model with N heads trains on.

    Every batch holds the data of ONE head, with targets for all heads and a
    mask per head (1 for the head the batch belongs to, 0 for the others) as
    Keras sample weights, so each head's loss and metrics count its own
    examples only. Class weights, when given, multiply the mask.

    Args:
        datasets: dict `{head name: batches of (inputs, labels)}`, any subset
            of `heads`.
        heads: dict `{head name: Head}`, every head of the model, in order.
        training: bool. Interleave the heads by `sampling`; otherwise their
            data follow one another.
        sampling: str. `"round_robin"` or `"proportional"` (see
            `task_schedule`).
        seed: int or `EpochSeed`, optional. Seed of the proportional order.
        class_weights: dict, optional. `{head name: 1-D array of a weight
            per class}`.

    Returns:
        `(dataset, steps)`: batches of `(inputs, {head: targets},
        {head: mask})`, and the number of batches in one pass.
    """
    class_weights = class_weights or {}

    def router(name):
        table = class_weights.get(name)
        table = None if table is None else tf.constant(table, tf.float32)

        def route(inputs, labels):
            n = tf.shape(labels)[0]
            targets, masks = {}, {}
            for other, spec in heads.items():
                shape = (n,) if spec.kind == "classification" else (n, spec.num_classes)
                dtype = tf.int64 if spec.kind == "classification" else tf.float32
                if other == name:
                    targets[other] = tf.reshape(tf.cast(labels, dtype), shape)
                    mask = tf.ones((n,), tf.float32)
                    if table is not None:
                        mask = tf.gather(table, targets[other])
                    masks[other] = mask
                else:
                    targets[other] = tf.zeros(shape, dtype)
                    masks[other] = tf.zeros((n,), tf.float32)
            return inputs, targets, masks

        return route

    names = [name for name in heads if name in datasets]
    routed = [datasets[n].map(router(n), num_parallel_calls=tf.data.AUTOTUNE) for n in names]
    batches = {n: steps_of(datasets[n], n) for n in names}
    if not training or len(names) == 1:
        joint = routed[0]
        for dataset in routed[1:]:
            joint = joint.concatenate(dataset)
        steps = sum(batches.values())
    else:
        schedule = task_schedule(batches, sampling, None if seed is None else int(seed))
        steps = len(schedule)
        choice = tf.data.Dataset.from_tensor_slices(
            np.array([names.index(n) for n in schedule], np.int64))
        if sampling == "proportional":
            # Every batch once per epoch, in a new random order each epoch.
            choice = shuffle_each_epoch(choice, steps, seed)
        else:
            routed = [d.repeat() for d in routed]  # smaller heads' data start over
        joint = tf.data.Dataset.choose_from_datasets(routed, choice)
    joint = joint.apply(tf.data.experimental.assert_cardinality(steps))
    return joint.prefetch(tf.data.AUTOTUNE), steps


def weigh_classes(dataset: tf.data.Dataset, class_weight) -> tf.data.Dataset:
    """Adds Keras sample weights `class_weight[label]` to `(inputs, labels)` batches."""
    table = tf.constant(class_weight, tf.float32)
    return dataset.map(lambda inputs, labels: (inputs, labels, tf.gather(table, labels)),
                       num_parallel_calls=tf.data.AUTOTUNE)


def steps_of(dataset: tf.data.Dataset, name: str | None = None) -> int:
    """Batches in one pass of a finite dataset (counted if unknown).

    Raises:
        DataError: for an infinite or empty dataset, naming the head.
    """
    where = f"Head {name!r}: " if name else ""
    n = int(dataset.cardinality())
    if n == tf.data.INFINITE_CARDINALITY:
        raise DataError(f"{where}Received an infinite dataset; repeat() is not needed, "
                        "each epoch is one pass over the data.")
    if n < 0:
        n = sum(1 for _ in dataset)
    if n == 0:
        raise DataError(f"{where}The data is empty: it yields no batches.")
    return n
