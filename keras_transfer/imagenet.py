"""The 1,000 ImageNet classes by name, offline.

`keras.applications.imagenet_utils.decode_predictions` downloads its class
index at run time. KerasHub, a dependency of this toolkit, ships the same
names in the package (`keras_hub.utils.imagenet_id_to_name`), in the class
order that torchvision and Keras both use (0 "tench" ... 999 "toilet_tissue").

Example:

```python
from keras_transfer.imagenet import imagenet_top_k
imagenet_top_k(probabilities, k=3)
# [(285, 'Egyptian_cat', 0.717), (282, 'tiger_cat', 0.147), (281, 'tabby', 0.129)]
```
"""

from __future__ import annotations

import functools

import numpy as np

from keras_transfer.errors import DataError

NUM_IMAGENET_CLASSES = 1000


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
    """The names of the 1,000 ImageNet-1k classes, by class index.

    Returns:
        A tuple of 1,000 names as Keras spells them (`"Egyptian_cat"`).
    """
    import keras_hub

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
