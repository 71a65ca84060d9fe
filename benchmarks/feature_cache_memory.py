"""Peak memory of feature extraction (and of head training on the cache) for 1k versus 10k images.

What it measures
    Each measurement runs in a fresh Python process and reports that
    process's peak resident memory (``VmHWM`` of ``/proc/self/status``, the
    high-water mark of RSS since the process started, TensorFlow import and
    model build included), so nothing from one run leaks into another:

    * ``extract N``: ``extract_features`` on N images with MobileNetV2
      (random weights) at SxS (default 96x96: a 3x3x1280 float32 feature map,
      46 KB per image, so 10k images make 470 MB of features, enough that
      holding them would show). The images come from a generator-backed
      ``tf.data.Dataset`` that draws each image from its index, so the input
      itself never sits in memory either.
    * ``train N``: one epoch of head training (``model.head.fit``) on the
      shuffled feature stream of that cache (``FeatureCache.dataset``), read
      back from the shards.

    Each child also reports its resident memory just before the measured
    step (``baseline``), so ``growth = peak - baseline`` shows what the step
    itself added.

How to read the output
    One row per run: peak, baseline and growth in MiB. The ratio lines divide
    the 10k peak by the 1k peak for each step; the target is within 10%
    (ratio <= 1.10), i.e. memory does not grow with the dataset (features go
    to disk shard by shard while they are computed, and training streams
    them back through a shuffle buffer bounded in bytes). Nothing is
    asserted: the script prints ratios measured in one run.

Usage:
    python benchmarks/feature_cache_memory.py                  # ~2 min on 2 cores
    python benchmarks/feature_cache_memory.py --sizes 1000 10000 --image-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def memory_mib() -> dict:
    """`{"peak": VmHWM, "now": VmRSS}` of this process, in MiB."""
    from keras_transfer.memory import process_memory

    return {k: v / 2**20 for k, v in process_memory().items()}


def image_dataset(n: int, size: int):
    """`n` images made one at a time from their index: nothing held in memory."""
    import numpy as np
    import tensorflow as tf

    def generate():
        for index in range(n):
            rng = np.random.default_rng(index)
            yield rng.integers(0, 256, (size, size, 3), dtype=np.uint8), index % 10

    spec = (tf.TensorSpec((size, size, 3), tf.uint8), tf.TensorSpec((), tf.int64))
    return tf.data.Dataset.from_generator(generate, output_signature=spec)


def child(args) -> None:
    sys.path.insert(0, ROOT)
    import keras

    import keras_transfer as kt
    from keras_transfer import feature_cache as features

    model = kt.ImageTransferModel("mobilenet_v2", 10, weights=None, pooling="avg",
                                  input_shape=(args.image_size, args.image_size, 3))
    result = {}
    if args.child == "extract":
        data = image_dataset(args.n, args.image_size)
        result["baseline"] = memory_mib()["now"]
        cache = features.extract_features(model, data, batch_size=args.batch_size,
                                          cache_dir=args.root)
        result.update(path=cache.path, examples=cache.num_examples,
                      shards=len(cache.manifest["shards"]),
                      megabytes=sum(s["features"]["bytes"] for s in cache.manifest["shards"]) / 1e6)
    else:
        with open(os.path.join(args.path, features.MANIFEST)) as file:
            cache = features.FeatureCache(args.path, json.load(file), reused=True)
        head = model.head
        head.compile(optimizer=keras.optimizers.Adam(1e-3),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                     metrics=["accuracy"])
        result["baseline"] = memory_mib()["now"]
        head.fit(cache.dataset(args.batch_size, shuffle=True, seed=0), epochs=1, verbose=0)
        result["examples"] = cache.num_examples
    result["peak"] = memory_mib()["peak"]
    print("RESULT " + json.dumps(result))


def run(mode: str, args, **extra) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", mode,
               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size)]
    for name, value in extra.items():
        command += [f"--{name}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{mode} {extra} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[1000, 10000])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--child", choices=["extract", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    root = tempfile.mkdtemp(prefix="feature_cache_memory_")
    print(f"MobileNetV2 (random weights) at {args.image_size}x{args.image_size}, batch "
          f"{args.batch_size}, generator-backed input; each row is a fresh process")
    rows = {}
    try:
        for n in args.sizes:
            extract = run("extract", args, n=n, root=os.path.join(root, str(n)))
            train = run("train", args, path=extract["path"])
            rows[n] = (extract, train)
            for name, result in (("extract", extract), ("train", train)):
                growth = result["peak"] - result["baseline"]
                print(f"{name:7s} {n:6d} images: peak {result['peak']:7.0f} MiB, baseline "
                      f"{result['baseline']:7.0f} MiB, growth {growth:6.0f} MiB"
                      + (f"  ({extract['megabytes']:.0f} MB of features in {extract['shards']} "
                         "shard(s) on disk)" if name == "extract" else ""))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    small, large = args.sizes
    for index, name in enumerate(("extraction", "head training")):
        ratio = rows[large][index]["peak"] / rows[small][index]["peak"]
        print(f"peak memory ratio, {name}, {large} / {small} images: {ratio:.3f} "
              f"(target <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'})")


if __name__ == "__main__":
    main()
