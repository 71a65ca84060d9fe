"""Batch-1 serving latency: the exported SavedModel versus Keras predict.

What it measures
    Wall-clock latency of classifying one image with the same randomly
    initialised ``kt.ImageTransferModel(backbone, num_classes, weights=None,
    input_shape=(S, S, 3), pooling="avg")``, called five ways:

    * ``SavedModel serving_default``: ``model.export()`` into a temporary
      folder, ``tf.saved_model.load``, then
      ``loaded.signatures["serving_default"](images=<uint8 [1, S, S, 3]>)``
      and ``.numpy()`` of its ``"probabilities"`` (how TF Serving-style
      Python clients call an export).
    * ``keras.Model.predict(model, x)``: the stock Keras ``predict`` on the
      uint8 numpy image (Keras' own data adapter, its cached
      ``predict_function``). This is the baseline of the headline ratio.
    * ``model.predict(x)``: keras_transfer's override, which first builds
      its tf.data pipeline (``make_image_dataset``) and then calls Keras
      ``predict`` on it: what a library user calls.
    * ``model.predict_on_batch(x)``: Keras' low-overhead one-batch API.
    * ``model(x, training=False)``: a direct eager call, then ``.numpy()``.

    Every way is warmed up first (tracing excluded), then called
    ``--calls`` times in ``--rounds`` interleaved rounds (each round runs a
    block of calls of every way, rotating the order), so background load
    hits them all alike. Every call returns a numpy array, so each timing
    includes fetching the result.

How to read the output
    One row per way with p50 and p90 latency in milliseconds and its p50
    relative to Keras predict. The headline line is ``ratio SavedModel p50 /
    Keras predict p50``: below 1.0x means the SavedModel answers one image
    faster than ``keras.Model.predict`` (the target is <= 1.0x); the same
    ratio against ``model.predict`` (the library override) is printed
    beside it. The export and load times and the largest difference
    between the SavedModel's and Keras' probabilities are printed for
    context (the difference should be ~1e-6: the same model), and so is
    the load average at the start and the end: above the core count, other
    programs compete for the CPU and p90 in particular gets noisy.

    Nothing is asserted: the script prints ratios measured in one run.

Usage:
    python benchmarks/serving_latency.py             # defaults, ~1 min on 2 cores
    python benchmarks/serving_latency.py --quick     # smaller, ~30 s
    python benchmarks/serving_latency.py --backbone efficientnet_b0 --size 224
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_transfer as kt  # noqa: E402
from machine import print_load  # noqa: E402  (benchmarks/machine.py)

SAVED_MODEL = "SavedModel serving_default"
KERAS_PREDICT = "keras.Model.predict(model, x)"
OUR_PREDICT = "model.predict(x) [keras_transfer]"


def measure(ways: dict[str, Callable[[], object]], calls: int, rounds: int,
            warmup: int) -> dict[str, np.ndarray]:
    """Times every way, interleaved.

    Args:
        ways: name -> a function of no arguments that runs one request.
        calls: int. Timed calls per way, in total.
        rounds: int. The calls are split into this many blocks; each round
            runs one block of every way, the order rotating every round.
        warmup: int. Untimed calls per way before timing starts.

    Returns:
        name -> latencies in milliseconds.
    """
    for fn in ways.values():
        for _ in range(warmup):
            fn()
    names = list(ways)
    samples: dict[str, list[float]] = {name: [] for name in names}
    blocks = [calls // rounds + (1 if i < calls % rounds else 0) for i in range(rounds)]
    for round_index, block in enumerate(blocks):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            fn = ways[name]
            for _ in range(block):
                start = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: np.asarray(values) for name, values in samples.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="mobilenet_v2", help="registry name (default mobilenet_v2)")
    parser.add_argument("--size", type=int, default=96, help="input side in pixels (default 96)")
    parser.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per way (default 200)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="interleaved blocks the calls are split into (default 4)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls per way first (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smaller run: 40 calls, 3 warmup calls")
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.warmup = 40, 3
    if args.calls < 1 or args.rounds < 1 or args.warmup < 1:
        parser.error("--calls, --rounds and --warmup must be >= 1")
    args.rounds = min(args.rounds, args.calls)
    return args


def main(argv: list[str] | None = None) -> None:
    """Exports, loads, measures and prints the table."""
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    input_shape = (args.size, args.size, 3)
    image = rng.integers(0, 256, size=(1, *input_shape), dtype=np.uint8)
    tensor = tf.constant(image)

    print(f"keras {keras.__version__}, tensorflow {tf.__version__}, "
          f"{os.cpu_count()} CPU cores, GPUs: {len(tf.config.list_physical_devices('GPU'))}")
    print(f"backbone={args.backbone} weights=None input={input_shape} classes={args.classes}; "
          f"batch 1, {args.warmup} warmup + {args.calls} timed calls per way in "
          f"{args.rounds} interleaved rounds")
    print_load()

    model = kt.ImageTransferModel(args.backbone, args.classes, weights=None,
                                  input_shape=input_shape, pooling="avg")

    with tempfile.TemporaryDirectory(prefix="kt_serving_latency_") as tmp:
        start = time.perf_counter()
        path = model.export(os.path.join(tmp, "export"))
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        loaded = tf.saved_model.load(path)
        serve = loaded.signatures["serving_default"]
        load_s = time.perf_counter() - start

        ways = {
            SAVED_MODEL: lambda: serve(images=tensor)["probabilities"].numpy(),
            KERAS_PREDICT: lambda: keras.Model.predict(model, image, verbose=0),
            OUR_PREDICT: lambda: model.predict(image),
            "model.predict_on_batch(x)": lambda: model.predict_on_batch(image),
            "model(x, training=False)": lambda: model(image, training=False).numpy(),
        }
        difference = float(np.max(np.abs(ways[SAVED_MODEL]() - ways[KERAS_PREDICT]())))
        latencies = measure(ways, args.calls, args.rounds, args.warmup)
        serve = loaded = None  # release the SavedModel before its folder goes

    p50 = {name: float(np.percentile(ms, 50)) for name, ms in latencies.items()}
    p90 = {name: float(np.percentile(ms, 90)) for name, ms in latencies.items()}
    print(f"export {export_s:.1f} s (trace, write, verify), load {load_s:.1f} s; "
          f"max |SavedModel - Keras| probability difference {difference:.2e}")
    print()
    print(f"{'':<36}{'p50 ms':>9}{'p90 ms':>9}{'p50 / Keras predict':>22}")
    for name in latencies:
        print(f"{name:<36}{p50[name]:>9.2f}{p90[name]:>9.2f}{p50[name] / p50[KERAS_PREDICT]:>21.2f}x")
    ratio = p50[SAVED_MODEL] / p50[KERAS_PREDICT]
    print(f"ratio SavedModel p50 / Keras predict p50: {ratio:.2f}x (target <= 1.0x); "
          f"vs keras_transfer model.predict: {p50[SAVED_MODEL] / p50[OUR_PREDICT]:.2f}x")
    print_load(end=True)


if __name__ == "__main__":
    main()
