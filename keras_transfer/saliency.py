"""Where an image model looked: Grad-CAM heat maps, overlaid and plotted.

`grad_cam` weighs a convolutional layer's feature maps by the gradients of
a class's logit (per position by default, as LayerCAM does, which stays
right for Flatten heads); `model_grad_cam` does it for a trained
`ImageTransferModel`; `overlay_heatmap` and `plot_grad_cam` show the maps
on the images. Unlike `insight`, this module needs TensorFlow.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
from PIL import Image

from keras_transfer.backend import tensorflow
from keras_transfer.errors import DataError
from keras_transfer.insight import _as_uint8, _divide, _image_grid
from keras_transfer.plots import _save


def last_conv_layer(network) -> str:
    """The name of the last layer of `network` whose output is a 4-D feature map.

    For a `keras.applications` backbone without its top this is the last
    convolutional block's activation (MobileNetV2: `"out_relu"`), the layer
    Grad-CAM looks at by default.

    Args:
        network: a functional `keras.Model`.

    Returns:
        str, the layer name.

    Example:
        >>> kt.last_conv_layer(model.backbone.network)
        'out_relu'
    """
    for layer in reversed(network.layers):
        if type(layer).__name__ == "InputLayer":
            continue
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):  # a layer called more than once has no one output
            continue
        if len(shape) == 4:
            return layer.name
    raise ValueError(f"Received network '{network.name}', which has no layer with a 4-D "
                     "(batch, height, width, channels) output; pass layer_name.")


def head_logits(head):
    """A function mapping features to a Keras head's outputs before its activation.

    Grad-CAM needs the class scores before softmax: softmax probabilities
    saturate, and their gradients vanish for the confident predictions one
    most wants to explain. This runs every layer of `head` but the last (in
    inference mode), then the last Dense layer without its activation.

    Args:
        head: a `keras.Sequential` (or any model with `.layers`) ending in a
            `Dense` layer, such as `build_head` makes.

    Returns:
        A callable `features -> logits`.

    Example:
        >>> network, softmax_head = model.backbone.network, model.head
        >>> x = model.backbone.preprocessor(images)
        >>> heatmaps = kt.grad_cam(network, None, kt.head_logits(softmax_head), x)
    """
    layers = list(getattr(head, "layers", []))
    if not layers or not isinstance(layers[-1], keras.layers.Dense):
        raise ValueError(f"Received head {getattr(head, 'name', head)!r}, which does not "
                         "end in a Dense layer; pass a function that returns logits.")
    *body, last = layers

    def logits(features):
        x = features
        for layer in body:
            x = layer(x, training=False)
        x = keras.ops.matmul(keras.ops.cast(x, last.kernel.dtype), last.kernel)
        return x + last.bias if last.use_bias else x

    return logits


CAM_METHODS = ("layercam", "gradcam")


def grad_cam(network, layer_name: str | None, head_fn, preprocessed_images,
             class_index=None, batch_size: int = 32, method: str = "layercam") -> np.ndarray:
    """Grad-CAM heat maps: where in each image the evidence for a class lies.

    The gradient of the class logit with respect to the feature map of
    `layer_name` says how much each activation adds to the class. The
    original Grad-CAM (Selvaraju et al., 2017; `method="gradcam"`) averages
    it over space into one weight per channel, then sums the weighted
    channels. That suits a head that pools the map first, but a Flatten
    head (this library's default) weighs every position differently, and
    the average throws away where the evidence lies. Trained on a task
    decided by the quadrant of a square, with a Flatten head, the original
    drew an empty map (all 0: the averages cancel) for every test image.
    The default `method="layercam"` (Jiang et al., 2021) keeps each
    position's own positive gradient, `relu(sum over channels of
    relu(gradient) * activation)`, and put its peak in the square's
    quadrant for every one. For pooling heads the two agree but for
    channels of negative weight, which LayerCAM drops. It needs the
    TensorFlow backend.

    Args:
        network: a functional `keras.Model` (the backbone) taking the
            preprocessed images.
        layer_name: str or None. A layer of `network` with a 4-D
            (batch, height, width, channels) output; None: the last one
            (`last_conv_layer`).
        head_fn: callable mapping the network's output to class LOGITS
            `(batch, classes)`: a transfer model's head (heads output
            logits), or `head_logits(head)` for a head ending in softmax.
        preprocessed_images: `(N, H, W, C)` array, as the network takes it.
        class_index: None (the predicted class of each image), an int (one
            class for all) or a sequence of N ints.
        batch_size: int. Images per gradient computation.
        method: `"layercam"` (default) or `"gradcam"`, as above.

    Returns:
        float32 array `(N, h, w)` in [0, 1] at the layer's resolution
        (1 at each map's maximum; all 0 where no evidence was found).
        `overlay_heatmap` upsamples it to the image.

    Example:
        >>> x = model.backbone.preprocessor(images)
        >>> heatmaps = kt.grad_cam(model.backbone.network, None, model.head, x)
        >>> kt.plot_grad_cam(images, heatmaps)
        <Figure size ... Axes>
    """
    # The gradients come from tf.GradientTape: on another backend, load the
    # .keras file with KERAS_BACKEND=tensorflow to explain the model.
    tf = tensorflow("Grad-CAM")
    if method not in CAM_METHODS:
        raise ValueError(f"Received method={method!r}; expected one of {CAM_METHODS}.")
    layer_name = layer_name or last_conv_layer(network)
    layer = network.get_layer(layer_name)
    if len(network.outputs) != 1:
        raise ValueError(f"Received network '{network.name}' with {len(network.outputs)} "
                         "outputs; expected one output for head_fn.")
    if len(layer.output.shape) != 4:
        raise ValueError(f"Received layer_name={layer_name!r}, whose output has shape "
                         f"{layer.output.shape}; expected a 4-D feature map.")
    probe = keras.Model(network.inputs, [layer.output, network.outputs[0]])
    images = np.asarray(preprocessed_images)
    if images.ndim != 4:
        raise DataError(f"Received preprocessed_images of shape {images.shape}; expected a "
                        "batch (N, height, width, channels).")
    classes = None
    if class_index is not None:
        classes = np.asarray(class_index, dtype=np.int64)
        if classes.ndim > 1 or classes.size not in (1, len(images)):
            raise DataError(f"Received class_index of shape {classes.shape} for "
                            f"{len(images)} images; expected None, one int or one per image.")
        classes = np.broadcast_to(classes.reshape(-1), (len(images),))
    heatmaps = []
    for start in range(0, len(images), batch_size):
        batch = tf.convert_to_tensor(images[start:start + batch_size])
        with tf.GradientTape() as tape:
            feature_map, output = probe(batch, training=False)
            logits = tf.cast(head_fn(output), tf.float32)
            chosen = (tf.argmax(logits, axis=-1) if classes is None
                      else tf.constant(classes[start:start + batch_size]))
            # Examples are independent, so the gradient of the sum is each one's own.
            score = tf.reduce_sum(tf.gather(logits, chosen, axis=1, batch_dims=1))
        gradients = tape.gradient(score, feature_map)
        if gradients is None:
            raise ValueError(f"Received layer_name={layer_name!r}, which the logits do not "
                             "depend on; pick a layer on the path to the network's output.")
        gradients = tf.cast(gradients, tf.float32)
        if method == "gradcam":  # one weight per channel
            weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
        else:  # one weight per position and channel
            weights = tf.nn.relu(gradients)
        cam = tf.nn.relu(tf.reduce_sum(weights * tf.cast(feature_map, tf.float32), axis=-1))
        heatmaps.append(cam.numpy())
    cam = np.concatenate(heatmaps) if heatmaps else np.zeros((0, 0, 0), np.float32)
    peak = cam.max(axis=(1, 2), keepdims=True) if len(cam) else 1.0
    return _divide(cam, peak).astype(np.float32)


def model_grad_cam(model, images, *, head: str | None = None, layer_name: str | None = None,
                   class_index=None, batch_size: int = 32,
                   method: str = "layercam") -> np.ndarray:
    """Grad-CAM heat maps of an image transfer model on raw images (see `grad_cam`).

    Args:
        model: an image `TransferModel` (e.g. `ImageTransferModel`).
        images: raw images `(N, H, W, 3)` in 0-255 at the model's input size.
        head: str, optional. Which head's classes (needed with several heads).
        layer_name: str, optional. A backbone layer with a 4-D output;
            default the last one (`last_conv_layer`).
        class_index, batch_size, method: as for `grad_cam`.

    Returns:
        float32 array `(N, h, w)` in [0, 1].

    Example:
        >>> heatmaps = kt.model_grad_cam(model, x_test[:8])
        >>> heatmaps.shape
        (8, 1, 1)
        >>> kt.plot_grad_cam(x_test[:8], heatmaps, path="grad_cam.png")
        <Figure size ... Axes>
    """
    if not hasattr(getattr(model, "backbone", None), "image_size"):
        raise ValueError(f"Received {type(model).__name__}; model_grad_cam needs an image "
                         "transfer model (kt.ImageTransferModel or kt.MultiTaskModel).")
    head_layer = model.heads[model.resolve_head(head, "whose classes to explain")]
    preprocessed = model.backbone.preprocessor(np.asarray(images, np.float32))
    return grad_cam(model.backbone.network, layer_name, head_layer, preprocessed,
                    class_index=class_index, batch_size=batch_size, method=method)


def overlay_heatmap(image, heatmap, alpha: float = 0.4, colormap: str = "jet") -> np.ndarray:
    """Lays a heat map, upsampled to the image, over the image.

    Args:
        image: `(H, W)`, `(H, W, 1)` or `(H, W, 3)`, uint8 or floats in 0-255.
        heatmap: `(h, w)` array in [0, 1] (from `grad_cam`), any resolution.
        alpha: float. Opacity of the heat map.
        colormap: str. A matplotlib colormap name.

    Returns:
        uint8 RGB array `(H, W, 3)`.

    Example:
        >>> blended = kt.overlay_heatmap(images[0], heatmaps[0])
        >>> blended.shape, blended.dtype
        ((32, 32, 3), dtype('uint8'))
    """
    from matplotlib import colormaps  # lazy: optional (plots)

    image = _as_uint8(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    image = image[..., :3]
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2:
        raise DataError(f"Received a heatmap of shape {heatmap.shape}; expected (height, "
                        "width), one map of grad_cam's output.")
    height, width = image.shape[:2]
    upsampled = np.asarray(Image.fromarray(heatmap).resize(
        (width, height), Image.Resampling.BILINEAR))
    colours = colormaps[colormap](np.clip(upsampled, 0, 1))[..., :3] * 255
    blended = (1 - alpha) * image + alpha * colours
    return np.clip(blended, 0, 255).round().astype(np.uint8)


def plot_grad_cam(images, heatmaps, titles: Sequence[str] | None = None, path=None,
                  alpha: float = 0.4, columns: int | None = None):
    """Shows Grad-CAM heat maps over their images, in a grid.

    Args:
        images: raw images `(N, H, W[, C])`, uint8 or floats in 0-255, or a
            sequence of them.
        heatmaps: `(N, h, w)` array in [0, 1], from `grad_cam`.
        titles: sequence of N str, optional (e.g. predicted class names).
        path: str, optional. Where to save the figure.
        alpha: float. Opacity of the heat maps.
        columns: int, optional. Grid width (default: about square).

    Returns:
        The `matplotlib.figure.Figure`.

    Example:
        >>> kt.plot_grad_cam(images, heatmaps, [names[i] for i in predicted], path="cam.png")
        <Figure size ... Axes>
    """
    if len(images) != len(heatmaps) or not len(images):
        raise DataError(f"Received {len(images)} images and {len(heatmaps)} heat maps; "
                        "expected one heat map per image, at least one.")
    if titles is not None and len(titles) != len(images):
        raise DataError(f"Received {len(titles)} titles for {len(images)} images.")
    figure, cells = _image_grid(len(images), columns)
    for number, axis in enumerate(cells[:len(images)]):
        axis.imshow(overlay_heatmap(images[number], heatmaps[number], alpha))
        if titles is not None:
            axis.set_title(str(titles[number]), fontsize="small")
    return _save(figure, path)
