"""Fine-tuning throughput: keras_transfer versus the same network in plain Keras.

What it measures
    Images per second of the fine-tuning phase (phase 2: backbone unfrozen,
    BatchNormalization kept frozen, Adam with the warmup + cosine schedule)
    for two models that compute the same thing:

    * ``keras_transfer``: ``kt.ImageTransferModel(backbone, num_classes,
      weights=None, input_shape=(S, S, 3), pooling="avg")`` trained with
      ``model.fit(x, y, phases=[kt.FineTunePhase(epochs=E)])``, i.e. the
      library's own fit on numpy arrays (its data pipeline, callbacks,
      unfreezing and recompilation included).
    * ``hand-written``: the Keras transfer-learning guide written out by hand:
      ``keras.Input`` -> the same preprocessing written with ``keras.ops`` ->
      the ``keras.applications`` backbone (``include_top=False``, called with
      ``training=False``) -> GlobalAveragePooling2D -> Dense(softmax). The
      backbone is unfrozen with every BatchNormalization layer set
      ``trainable=False``, compiled with ``Adam(kt.WarmupDecay(...))`` (same
      peak rate, warmup share and cosine decay as the library) and trained
      with ``keras.Model.fit`` on the batches of ``kt.make_image_dataset``,
      the same tf.data pipeline the library builds, so the comparison is
      about the model and its training loop, not the input pipeline.

    Every fit runs E epochs; a callback records each epoch's wall time and
    the first epoch of every fit is dropped, so graph tracing, compilation
    and the optimizer's variable creation are excluded on both sides. Each
    side is fitted ``--rounds`` times, alternating which goes first, and the
    median over rounds is reported. Both models get a fresh optimizer and a
    recompile per round, as the library does per phase.

How to read the output
    ``images/s`` rows give the per-round throughput and the median for each
    side. ``ratio ours / hand-written`` is the median throughput of
    keras_transfer divided by the median of the hand-written model (the
    median of the paired per-round ratios is printed beside it): 1.00x
    means parity, above 1.0 means the library is faster; the target is
    >= 1.0x. ``CPU ms/image`` is the process CPU time (all threads) per
    image and ``by CPU time`` the same ratio computed from it (hand-written
    CPU per image / ours); it moves less than wall time when other programs
    share the cores. The load average is printed at the start and the end:
    when it exceeds the core count, wall-time ratios can swing by 20% or
    more between runs, so trust the CPU-time ratio and the per-round spread
    more. The trainable/frozen parameter counts of both models are printed
    so you can check that the same weights train on both sides. A last line
    times passes over the input pipeline alone (the library's versus a
    minimal tf.data pipeline), for context only.

    Nothing is asserted: the script prints ratios measured in one run.

Usage:
    python benchmarks/finetune_throughput.py            # defaults, ~2 min on 2 cores
    python benchmarks/finetune_throughput.py --quick    # smaller, under 1 min
    python benchmarks/finetune_throughput.py --backbone resnet50 --size 128
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_transfer as kt  # noqa: E402
from handwritten import pooled_features  # noqa: E402  (benchmarks/handwritten.py)
from machine import print_load  # noqa: E402  (benchmarks/machine.py)

# The library's fine-tuning defaults (TransferModel.fit), mirrored by hand.
PEAK_LEARNING_RATE = 1e-5
WARMUP_FRACTION = 0.1
DECAY = "cosine"


class EpochTimer(keras.callbacks.Callback):
    """Records the wall time of every epoch of a `fit` call.

    Attributes:
        times: list of float. Wall-clock seconds per epoch, in order.
        cpu_times: list of float. CPU seconds of this process (all threads)
            per epoch, in order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self._start = self._cpu_start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu_start)


def build_handwritten(backbone: str, input_shape: tuple[int, int, int],
                      num_classes: int) -> keras.Model:
    """Builds the plain-Keras model, backbone unfrozen except BatchNormalization.

    Only the constructor name and preprocessing mode are looked up in the
    keras_transfer registry (so `--backbone` works for any network); the
    model itself is plain Keras.

    Args:
        backbone: str. A keras_transfer registry name, e.g. `"mobilenet_v2"`.
        input_shape: `(height, width, 3)`.
        num_classes: int.

    Returns:
        An uncompiled functional `keras.Model` taking float32 0-255 images.
    """
    inputs = keras.Input(shape=input_shape, dtype="float32")
    features = pooled_features(backbone, inputs)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(features)
    return keras.Model(inputs, outputs, name="handwritten")


def param_counts(model: keras.Model) -> tuple[int, int]:
    """Returns `(trainable, frozen)` parameter counts."""
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    frozen = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return trainable, frozen


@dataclasses.dataclass
class Measurement:
    """Throughput of one fit, its first (tracing) epoch dropped.

    Attributes:
        images_per_s: float. Images per wall-clock second.
        cpu_ms_per_image: float. Process CPU milliseconds (all threads) per
            image; less sensitive than wall time to other programs running.
    """

    images_per_s: float
    cpu_ms_per_image: float

    @classmethod
    def from_timer(cls, timer: EpochTimer, images_per_epoch: int) -> Measurement:
        """Builds the measurement from the epochs of one fit, minus the first."""
        images = images_per_epoch * (len(timer.times) - 1)
        return cls(images / sum(timer.times[1:]), 1e3 * sum(timer.cpu_times[1:]) / images)


def run_ours(model: kt.ImageTransferModel, x: np.ndarray, y: np.ndarray,
             epochs: int, batch_size: int) -> Measurement:
    """One library fine-tuning fit (a `FineTunePhase` alone) on the numpy arrays."""
    timer = EpochTimer()
    phase = kt.FineTunePhase(epochs=epochs, learning_rate=PEAK_LEARNING_RATE,
                             warmup=WARMUP_FRACTION, decay=DECAY)
    model.fit(x, y, phases=[phase], batch_size=batch_size, callbacks=[timer], verbose=0)
    return Measurement.from_timer(timer, len(x))


def run_handwritten(model: keras.Model, dataset: tf.data.Dataset, images: int,
                    steps: int, epochs: int) -> Measurement:
    """One plain-Keras fit, with a fresh optimizer and a recompile as the library does."""
    total = steps * epochs
    schedule = kt.WarmupDecay(PEAK_LEARNING_RATE, total_steps=total,
                              warmup_steps=int(round(WARMUP_FRACTION * total)),
                              decay=DECAY)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    timer = EpochTimer()
    model.fit(dataset, epochs=epochs, callbacks=[timer], verbose=0, shuffle=False)
    return Measurement.from_timer(timer, images)


def pipeline_throughput(dataset: tf.data.Dataset, images: int, passes: int = 3) -> float:
    """Images/s of iterating `dataset` alone (best of `passes`, after one warmup pass)."""
    for _ in dataset:
        pass
    best = math.inf
    for _ in range(passes):
        start = time.perf_counter()
        for _ in dataset:
            pass
        best = min(best, time.perf_counter() - start)
    return images / best


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="mobilenet_v2", help="registry name (default mobilenet_v2)")
    parser.add_argument("--size", type=int, default=96, help="input side in pixels (default 96)")
    parser.add_argument("--images", type=int, default=384, help="random training images (default 384)")
    parser.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs per fit; the first is dropped as warmup (default 3)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="fits per side, interleaved; the median is reported (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smaller run: 128 images, 2 epochs per fit, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.epochs, args.rounds = 128, 2, 2
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch of every fit is dropped)")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark and prints the table."""
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    input_shape = (args.size, args.size, 3)
    x = rng.integers(0, 256, size=(args.images, *input_shape), dtype=np.uint8)
    y = rng.integers(0, args.classes, size=(args.images,), dtype=np.int64)

    dataset, _ = kt.make_image_dataset(
        x, y, image_size=input_shape[:2], num_classes=args.classes,
        batch_size=args.batch_size, shuffle=True, seed=args.seed)
    steps = kt.data.steps_of(dataset)

    print(f"keras {keras.__version__}, tensorflow {tf.__version__}, "
          f"{os.cpu_count()} CPU cores, GPUs: {len(tf.config.list_physical_devices('GPU'))}")
    print(f"backbone={args.backbone} weights=None input={input_shape} "
          f"images={args.images} batch={args.batch_size} ({steps} steps/epoch) "
          f"classes={args.classes}; {args.rounds} rounds x {args.epochs} epochs "
          f"per side, first epoch of each fit dropped")
    print_load()

    ours = kt.ImageTransferModel(args.backbone, args.classes, weights=None,
                                 input_shape=input_shape, pooling="avg")
    hand = build_handwritten(args.backbone, input_shape, args.classes)

    sides = ("keras_transfer", "hand-written")
    results: dict[str, list[Measurement]] = {side: [] for side in sides}
    for round_index in range(args.rounds):
        order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
        for side in order:
            if side == "keras_transfer":
                result = run_ours(ours, x, y, args.epochs, args.batch_size)
            else:
                result = run_handwritten(hand, dataset, args.images, steps, args.epochs)
            results[side].append(result)
            print(f"  round {round_index + 1}: {side:<15} {result.images_per_s:8.1f} images/s"
                  f"  {result.cpu_ms_per_image:6.1f} CPU ms/image", flush=True)

    params = {"keras_transfer": param_counts(ours), "hand-written": param_counts(hand)}
    rate = {side: statistics.median(r.images_per_s for r in results[side]) for side in sides}
    cpu = {side: statistics.median(r.cpu_ms_per_image for r in results[side]) for side in sides}
    paired = [a.images_per_s / b.images_per_s
              for a, b in zip(results["keras_transfer"], results["hand-written"])]

    print()
    print(f"{'':<16}{'images/s':>10}{'per round':>24}{'CPU ms/image':>14}"
          f"{'trainable':>12}{'frozen':>9}")
    for side in sides:
        rounds = " ".join(f"{r.images_per_s:.1f}" for r in results[side])
        print(f"{side:<16}{rate[side]:>10.1f}{rounds:>24}{cpu[side]:>14.1f}"
              f"{params[side][0]:>12,}{params[side][1]:>9,}")
    if params["keras_transfer"] != params["hand-written"]:
        print("NOTE: the two models do not train the same parameters; not like for like.")
    ratio = rate["keras_transfer"] / rate["hand-written"]
    print(f"ratio ours / hand-written (fine-tune images/s, medians): {ratio:.2f}x "
          f"(target >= 1.0x); median of per-round ratios {statistics.median(paired):.2f}x; "
          f"by CPU time {cpu['hand-written'] / cpu['keras_transfer']:.2f}x")

    plain = (tf.data.Dataset.from_tensor_slices((x, y))
             .shuffle(len(x), seed=args.seed)
             .map(lambda image, label: (tf.cast(image, tf.float32), label),
                  num_parallel_calls=tf.data.AUTOTUNE)
             .batch(args.batch_size).prefetch(tf.data.AUTOTUNE))
    library_rate = pipeline_throughput(dataset, args.images)
    plain_rate = pipeline_throughput(plain, args.images)
    print(f"context, input pipeline alone: kt.make_image_dataset {library_rate:,.0f} images/s, "
          f"minimal tf.data {plain_rate:,.0f} images/s "
          f"(model step {rate['hand-written']:,.0f} images/s)")
    print_load(end=True)


if __name__ == "__main__":
    main()
