"""Image files read with Pillow, the way TensorFlow's decoder reads them.

Used where TensorFlow does not decode: the data path on other backends,
ImageNet predictions on files, and ONNX or LiteRT predictions
(`runtime_predict`), which import neither Keras nor TensorFlow.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def decode_image_file(file: str) -> np.ndarray:
    """An image file as a `(H, W, 3)` uint8 array (Pillow; the first frame of a GIF)."""
    with Image.open(file) as image:
        return np.asarray(pil_rgb(image))


def pil_rgb(image):
    """A PIL image as 8-bit RGB, 16-bit images scaled (not clipped) to 0-255.

    Pillow reads a 16-bit grayscale PNG as mode `"I;16"`, and its
    `convert("RGB")` clips every value above 255 to white; TensorFlow's
    decoder scales them instead (value / 257), and so does this.
    """
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, np.float64)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")
