"""How long the cross-validated linear probe takes, by problem size.

What it measures
    Wall and CPU time of `keras_transfer.probe.fit_linear_probe` (defaults:
    5-fold stratified CV, or leave-one-out below 50 examples, over the default
    grid of C, then the final fit) on synthetic features shaped like a
    backbone's: ReLU of a low-rank class signal plus noise, in the hundreds,
    so that the standardised features are correlated as real ones are. Shapes:
    pooled MobileNetV2-like features (D=1280), a flattened 7x7x512 VGG16 map
    (D=25,088) and a few in between.

How to read the output
    One line per shape: the probe's summary (C chosen, CV score, iterations,
    convergence), wall seconds and CPU seconds. CPU seconds are the cost on
    one core when the machine is busy (the wall time then includes waiting).
    Targets: N=1000, D=1280, K=10 well under 20 s on one core; N=30,
    D=25,088, K=6 a few seconds. Nothing is asserted.

Usage:
    python benchmarks/probe_speed.py            # about a minute on 2 cores
    python benchmarks/probe_speed.py --large    # adds N=5000 and N=20000 (minutes)
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from machine import print_load  # noqa: E402

from keras_transfer.probe import fit_linear_probe  # noqa: E402


def backbone_like(n: int, d: int, k: int, seed: int = 0, rank: int = 50, signal: float = 0.4):
    """ReLU features of a rank-`rank` class signal plus noise, as float32.

    With `signal=0.4`, a probe on 1,000 examples reaches about 0.8 accuracy:
    C ends inside the grid, as on real features (easier data puts it at the
    weak end, where fits cost the most iterations).
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % k
    latent = rng.normal(size=(k, rank))[labels] * signal + rng.normal(size=(n, rank))
    mixed = latent @ rng.normal(size=(rank, d)) / np.sqrt(rank)
    features = np.maximum(mixed + 0.3 * rng.normal(size=(n, d)) + 0.5, 0.0) * 50
    return features.astype(np.float32), labels


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--large", action="store_true", help="also N=5000 and N=20000")
    args = parser.parse_args()
    shapes = [(30, 25088, 6), (40, 8192, 8), (200, 1280, 10), (1000, 1280, 10), (2000, 512, 10)]
    if args.large:
        shapes += [(5000, 1280, 10), (20000, 1280, 10)]
    print_load()
    for n, d, k in shapes:
        x, y = backbone_like(n, d, k)
        wall, cpu = time.perf_counter(), time.process_time()
        probe = fit_linear_probe(x, y, "classification", k)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"{probe.report.summary()}\n    wall {wall:.2f} s, CPU {cpu:.2f} s, "
              f"{probe.report.solver}, {probe.report.cv}", flush=True)
    print_load(end=True)


if __name__ == "__main__":
    main()
