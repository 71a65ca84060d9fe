"""Fine-tuning the top of a network on its cached frozen bottom versus the whole network.

What it measures
    Wall time per epoch of `FineTunePhase(unfreeze=N)` done two ways on the
    same images, from the same weights:

    * ``bottom cached``: `feature_cache="auto"` (the default): the frozen
      bottom runs once over the data (its outputs written to a cold cache),
      then every step runs the unfrozen top only.
    * ``whole network``: `feature_cache=False`: every step runs the whole
      network forward (and back through the top), as before.

    The first epoch of each includes tracing; the per-epoch figure is the
    median of the later epochs. The extraction of the bottom (once) is
    reported apart, and the total of each run. The two fine-tuned models
    then predict the same images: the largest difference of their
    probabilities is printed (target <= 1e-5: the same computation, only
    the frozen part is not recomputed). Nothing is asserted.

    Backbone: MobileNetV2 from keras.applications with random weights (the
    time does not depend on them; its residual adds cross the cut), at 96 px;
    data: random images of 10 classes.

Usage:
    python benchmarks/fine_tune_cache.py                # 512 images, top 20 layers, 5 epochs
    python benchmarks/fine_tune_cache.py --images 512 --unfreeze 40 --epochs 4
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import numpy as np  # noqa: E402
from machine import print_load  # noqa: E402  (benchmarks/machine.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--unfreeze", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import keras

    import keras_transfer as kt

    logging.getLogger("keras_transfer").setLevel(logging.ERROR)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8)
    y = rng.integers(0, 10, args.images)
    shape = (args.size, args.size, 3)
    cached = kt.ImageTransferModel("mobilenet_v2", 10, weights=None, input_shape=shape)
    whole = kt.ImageTransferModel("mobilenet_v2", 10, weights=None, input_shape=shape)
    whole.set_weights(cached.get_weights())
    cached.predict(x[:args.batch_size])  # warm up the thread pools outside the timings
    print(f"MobileNetV2 at {args.size} px, {args.images} random images of 10 classes, top "
          f"{args.unfreeze} layers with weights unfrozen, {args.epochs} epochs, batch "
          f"{args.batch_size}; {os.cpu_count()} CPU cores")
    print_load()

    class EpochTimes(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times, self.cpu = [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.started[0])
            self.cpu.append(time.process_time() - self.started[1])

    before = cached.predict(x)
    results = {}
    root = tempfile.mkdtemp(prefix="fine_tune_cache_bench_")
    for name, model, cache in (("bottom cached", cached, "auto"), ("whole network", whole, False)):
        timer = EpochTimes()
        start = time.perf_counter()
        model.fit(x, y, batch_size=args.batch_size, shuffle=False, seed=0, verbose=0,
                  callbacks=[timer],
                  phases=[kt.FineTunePhase(epochs=args.epochs, unfreeze=args.unfreeze,
                                           learning_rate=1e-4, feature_cache=cache,
                                           cache_dir=root)])
        total = time.perf_counter() - start
        later = timer.times[1:] or timer.times
        results[name] = (statistics.median(later), timer.times[0], total - sum(timer.times),
                         total, statistics.median(timer.cpu[1:] or timer.cpu))
    print_load(end=True)
    for name, (epoch, first, outside, total, cpu) in results.items():
        print(f"{name:14}: {epoch:6.2f} s per epoch ({cpu:6.2f} s CPU; first epoch {first:6.2f} "
              f"s, outside the epochs {outside:6.2f} s: extraction and set-up), total "
              f"{total:6.1f} s")
    ratio = results["whole network"][0] / results["bottom cached"][0]
    cpu_ratio = results["whole network"][4] / results["bottom cached"][4]
    print(f"per-epoch speedup: {ratio:.1f}x wall, {cpu_ratio:.1f}x CPU time (target >= 3x); "
          f"total: {results['whole network'][3] / results['bottom cached'][3]:.2f}x")
    after = cached.predict(x)
    difference = np.abs(after - whole.predict(x)).max()
    print(f"largest difference of the predicted probabilities: {difference:.2e} "
          f"(target <= 1e-5); fine-tuning moved them by up to "
          f"{np.abs(after - before).max():.2e}")


if __name__ == "__main__":
    main()
