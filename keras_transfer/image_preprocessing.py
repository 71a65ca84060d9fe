"""`ImagePreprocessing`: raw 0-255 RGB pixels to what a backbone's weights expect.

A layer of its own module so that the networks built here
(`torchvision_models`) and the image component (`image.py`) both use it
without importing each other.
"""

from __future__ import annotations

import keras

# Preprocessing modes, as named by `keras.applications.imagenet_utils`:
# "caffe": RGB->BGR, minus the ImageNet mean, no scaling (VGG, ResNet v1).
# "tf": scale to [-1, 1] (Inception family, MobileNet v1/v2, ResNet v2, NASNet).
# "torch": scale to [0, 1], then ImageNet mean/std (DenseNet).
# "none": the network normalises its own input (EfficientNet, ConvNeXt,
#   MobileNetV3): pass raw 0-255 pixels straight in.
PREPROCESSING_MODES = ("caffe", "tf", "torch", "none")

_IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
_IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="keras_transfer")
class ImagePreprocessing(keras.layers.Layer):
    """Maps raw 0-255 RGB pixels to what a backbone's weights expect.

    Args:
        mode: str. `"caffe"` (RGB->BGR minus the ImageNet mean), `"tf"`
            (scale to [-1, 1]), `"torch"` (scale to [0, 1], ImageNet mean and
            std) or `"none"` (the backbone normalises its own input).

    Example:
        >>> keras.ops.convert_to_numpy(ImagePreprocessing("tf")(np.full((1, 2, 2, 3), 255.0)))[0, 0, 0]
        array([1., 1., 1.], dtype=float32)
    """

    def __init__(self, mode="none", **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(f"Received mode={mode!r}; expected one of "
                             f"{PREPROCESSING_MODES}.")
        self.mode = mode

    def call(self, images):
        x = keras.ops.cast(images, self.compute_dtype)
        if self.mode == "caffe":
            return x[..., ::-1] - keras.ops.convert_to_tensor(_CAFFE_MEAN_BGR, x.dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = keras.ops.convert_to_tensor(_IMAGENET_MEAN_RGB, x.dtype)
            std = keras.ops.convert_to_tensor(_IMAGENET_STD_RGB, x.dtype)
            return (x / 255.0 - mean) / std
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
