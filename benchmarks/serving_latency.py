"""Batch-1 serving latency: the SavedModel, ONNX and LiteRT exports versus Keras.

What it measures
    Wall-clock latency of classifying one image with the same randomly
    initialised ``kt.ImageTransferModel(backbone, num_classes, weights=None,
    input_shape=(S, S, 3), pooling="avg")`` (with ``--demo``: the demo's
    ImageNet MobileNetV2 at 128x128, its head solved on the demo's training
    patches), called these ways:

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
    * the bare compiled forward pass: a ``tf.function`` of the model's call
      on the float image (no input checks, no resize, no signature): the
      floor for TensorFlow's graph runtime here (XLA, ``jit_compile=True``,
      measured 10x slower than the SavedModel on this MobileNetV2 on CPU).
    * ``ONNX Runtime``: ``model.export(format="onnx")``, then an
      ``onnxruntime.InferenceSession`` on the uint8 image.
    * ``LiteRT float32`` and ``LiteRT int8``: ``model.export(format=
      "litert")`` (and ``quantize="int8"``, calibrated on training images),
      run by the ``ai_edge_litert`` interpreter's signature runner with as
      many threads as cores.

    Besides the latencies it prints each export's size, the largest
    difference between each float export's probabilities and Keras's on 32
    inputs (the demo's test patches with ``--demo``), and the int8 file's
    accuracy beside the float model's (``--demo``: on the demo's 320 test
    patches; otherwise on random labels, which says nothing).

    Every way is warmed up first (tracing excluded), then called
    ``--calls`` times in ``--rounds`` interleaved rounds (each round runs a
    block of calls of every way, rotating the order), so background load
    hits them all alike. Every call returns a numpy array, so each timing
    includes fetching the result.

How to read the output
    One row per way with p50 and p99 latency in milliseconds and its p50
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
    python benchmarks/serving_latency.py --demo      # the demo's model and patches, ~3 min
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
ONNX = "ONNX Runtime"
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
    parser.add_argument("--demo", action="store_true",
                        help="the demo's pretrained MobileNetV2 and photograph patches")
    parser.add_argument("--no-formats", dest="formats", action="store_false",
                        help="only the SavedModel and Keras (no ONNX or LiteRT)")
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.warmup = 40, 3
    if args.calls < 1 or args.rounds < 1 or args.warmup < 1:
        parser.error("--calls, --rounds and --warmup must be >= 1")
    args.rounds = min(args.rounds, args.calls)
    return args


def demo_model(seed: int):
    """The demo's model with its head solved on the training patches, and the test patches."""
    from keras_transfer import demo

    x_train, y_train, x_test, y_test = demo.photo_patches(demo.SHOTS, 40, seed)
    model = kt.ImageTransferModel("mobilenet_v2_torchvision", len(demo.PHOTOGRAPHS),
                                  weights="imagenet", input_shape=(demo.PATCH, demo.PATCH, 3),
                                  pooling="avg", class_names=demo.PHOTOGRAPHS)
    model.fit(x_train, y_train, phases=[kt.HeadPhase()], seed=seed, verbose=0)
    return model, x_train, x_test, y_test


def size_of(path: str) -> int:
    """Bytes of a file, or of every file under a folder."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv: list[str] | None = None) -> None:
    """Exports, loads, measures and prints the table."""
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    if args.demo:
        model, x_train, x_test, y_test = demo_model(args.seed)
        input_shape = model.backbone.input_shape_
    else:
        input_shape = (args.size, args.size, 3)
        model = kt.ImageTransferModel(args.backbone, args.classes, weights=None,
                                      input_shape=input_shape, pooling="avg")
        x_train = rng.integers(0, 256, size=(64, *input_shape), dtype=np.uint8)
        x_test = rng.integers(0, 256, size=(64, *input_shape), dtype=np.uint8)
        y_test = rng.integers(0, args.classes, 64)
    image = x_test[:1]
    tensor = tf.constant(image)

    print(f"keras {keras.__version__}, tensorflow {tf.__version__}, "
          f"{os.cpu_count()} CPU cores, GPUs: {len(tf.config.list_physical_devices('GPU'))}")
    print(f"backbone={'mobilenet_v2_torchvision (demo)' if args.demo else args.backbone} "
          f"weights={'imagenet' if args.demo else None} input={tuple(input_shape)} "
          f"classes={model.num_classes}; batch 1, {args.warmup} warmup + {args.calls} timed "
          f"calls per way in {args.rounds} interleaved rounds")
    print_load()

    forward = tf.function(lambda x: model(x, training=False))
    with tempfile.TemporaryDirectory(prefix="kt_serving_latency_") as tmp:
        start = time.perf_counter()
        path = model.export(os.path.join(tmp, "export"))
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        loaded = tf.saved_model.load(path)
        serve = loaded.signatures["serving_default"]
        load_s = time.perf_counter() - start
        float_image = tf.cast(tensor, tf.float32)

        ways = {
            SAVED_MODEL: lambda: serve(images=tensor)["probabilities"].numpy(),
            KERAS_PREDICT: lambda: keras.Model.predict(model, image, verbose=0),
            OUR_PREDICT: lambda: model.predict(image),
            "model.predict_on_batch(x)": lambda: model.predict_on_batch(image),
            "model(x, training=False)": lambda: model(image, training=False).numpy(),
            "bare compiled forward pass": lambda: forward(float_image).numpy(),
        }
        sizes = {"SavedModel (folder)": size_of(path)}
        gaps, int8 = {}, None
        if args.formats:
            from keras_transfer.export_litert import litert_runner
            from keras_transfer.export_onnx import onnx_runner

            files = {}
            for name, format, quantize in ((ONNX, "onnx", None),
                                           ("LiteRT float32", "litert", None),
                                           ("LiteRT int8", "litert", "int8")):
                start = time.perf_counter()
                folder = model.export(
                    os.path.join(tmp, name.replace(" ", "_")), format=format, quantize=quantize,
                    representative_data=x_train if quantize else None,
                    evaluation_data=(x_test, y_test) if quantize else None)
                metadata = kt.load_metadata(folder)
                files[name] = os.path.join(folder, metadata["file"])
                sizes[name] = metadata["file_bytes"]
                print(f"{name} export {time.perf_counter() - start:.1f} s")
                if quantize:
                    int8 = metadata["accuracy"]
            threads = os.cpu_count()
            runners = {ONNX: onnx_runner(files[ONNX]),
                       # One intra-op thread: no thread pool to wake (or spin) per call.
                       f"{ONNX}, 1 thread": onnx_runner(files[ONNX], threads=1),
                       "LiteRT float32": litert_runner(files["LiteRT float32"], threads),
                       "LiteRT int8": litert_runner(files["LiteRT int8"], threads)}
            probe = x_test[:32]
            expected = model.predict(probe)
            for name in (ONNX, "LiteRT float32"):
                got = np.concatenate([runners[name]({"images": probe[i:i + 1]})["probabilities"]
                                      for i in range(len(probe))])
                gaps[name] = float(np.abs(got - expected).max())
            for name, run in runners.items():
                ways[name] = (lambda run=run: run({"images": image}))
        # Keras's own predict gives the heads' logits; ours gives probabilities.
        difference = float(np.max(np.abs(ways[SAVED_MODEL]() - ways[OUR_PREDICT]())))
        latencies = measure(ways, args.calls, args.rounds, args.warmup)
        serve = loaded = runners = None  # release the files before their folder goes

    p50 = {name: float(np.percentile(ms, 50)) for name, ms in latencies.items()}
    p99 = {name: float(np.percentile(ms, 99)) for name, ms in latencies.items()}
    print(f"SavedModel export {export_s:.1f} s (trace, write, verify), load {load_s:.1f} s; "
          f"max |SavedModel - Keras| probability difference {difference:.2e}")
    for name, gap in gaps.items():
        print(f"max |{name} - Keras| probability difference on 32 inputs: {gap:.2e}")
    print("sizes: " + ", ".join(f"{name} {b / 1e6:.2f} MB" for name, b in sizes.items()))
    if int8:
        print(f"int8 accuracy {int8['export']:.4f} vs Keras float {int8['keras']:.4f} on "
              f"{int8['examples']} {'test patches' if args.demo else 'random images'}; "
              f"int8 file / float file: {sizes['LiteRT int8'] / sizes['LiteRT float32']:.2f}")
    print()
    print(f"{'':<36}{'p50 ms':>9}{'p99 ms':>9}{'p50 / Keras predict':>22}")
    for name in latencies:
        print(f"{name:<36}{p50[name]:>9.2f}{p99[name]:>9.2f}"
              f"{p50[name] / p50[KERAS_PREDICT]:>21.2f}x")
    ratio = p50[SAVED_MODEL] / p50[KERAS_PREDICT]
    print(f"ratio SavedModel p50 / Keras predict p50: {ratio:.2f}x (target <= 1.0x); "
          f"vs keras_transfer model.predict: {p50[SAVED_MODEL] / p50[OUR_PREDICT]:.2f}x")
    if ONNX in p50:
        print(f"ratio ONNX Runtime p50 / SavedModel p50: {p50[ONNX] / p50[SAVED_MODEL]:.2f}x "
              "(target <= 1.0x)")
    print_load(end=True)


if __name__ == "__main__":
    main()
