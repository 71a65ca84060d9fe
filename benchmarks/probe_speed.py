"""How long the cross-validated linear probe takes, by problem size.

What it measures
    Wall and CPU time of `keras_transfer.probe.fit_linear_probe` (defaults:
    5-fold stratified CV, or leave-one-out below 50 examples, over the default
    grid of C, then the final fit) on synthetic features shaped like a
    backbone's: ReLU of a low-rank class signal plus noise, in the hundreds,
    so that the standardised features are correlated as real ones are. Shapes:
    pooled MobileNetV2-like features (D=1280), a flattened 7x7x512 VGG16 map
    (D=25,088) and a few in between.

    Then, against the tool a practitioner would use instead: scikit-learn's
    `LogisticRegressionCV` (lbfgs) on the same scaled features, with the same
    grid of C and the same 5 folds, on 1,200 x 1,280 features and 10 classes,
    both scored on 2,000 held-out rows of the same distribution.

How to read the output
    One line per shape: the probe's summary (C chosen, CV score, iterations,
    convergence), wall seconds and CPU seconds. CPU seconds are the cost on
    one core when the machine is busy (the wall time then includes waiting).
    Targets: N=1000, D=1280, K=10 well under 20 s on one core; N=30,
    D=25,088, K=6 a few seconds. The comparison prints both times, their
    ratio (issue 21's target: scikit-learn at least 3x the probe's time) and
    both test accuracies (the probe's at least scikit-learn's). Nothing is
    asserted.

Usage:
    python benchmarks/probe_speed.py            # about a minute on 2 cores
    python benchmarks/probe_speed.py --large    # adds N=5000 and N=20000 (minutes)
    python benchmarks/probe_speed.py --versus-sklearn-only
"""

import argparse
import os
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from machine import print_load  # noqa: E402

from keras_transfer import probe_solver  # noqa: E402
from keras_transfer.probe import DEFAULT_GRID, fit_linear_probe  # noqa: E402


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


def versus_sklearn(n: int = 1200, d: int = 1280, k: int = 10, test: int = 2000):
    """The probe against `LogisticRegressionCV` with the same grid, folds and scaling."""
    from sklearn.linear_model import LogisticRegressionCV
    from threadpoolctl import threadpool_limits

    x, y = backbone_like(n + test, d, k)
    x_train, y_train, x_test, y_test = x[:n], y[:n], x[n:], y[n:]
    wall = time.perf_counter()
    probe = fit_linear_probe(x_train, y_train, "classification", k)
    probe_s = time.perf_counter() - wall
    probe_accuracy = np.mean(probe.logits(x_test).argmax(axis=1) == y_test)
    # The probe's scaling, grid (in units of 1 / non-constant features) and folds.
    scaled, mean, scale, constant = probe_solver._standardize(x_train, "global")
    grid = [c / np.count_nonzero(~constant) for c in DEFAULT_GRID]
    fold_of, _ = probe_solver._assign_folds(n, y_train, 5, seed=0)
    folds = [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(5)]
    wall = time.perf_counter()
    # One BLAS thread, as the probe uses for products this size: with two on busy
    # cores, scikit-learn's run took 124 s, against 4.3 s with one.
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore")  # lbfgs may stop at max_iter on the weak end
        reference = LogisticRegressionCV(Cs=grid, cv=folds, scoring="accuracy",
                                         max_iter=1000).fit(scaled, y_train)
    sklearn_s = time.perf_counter() - wall
    sklearn_accuracy = reference.score((x_test - mean) / scale, y_test)
    print(f"versus LogisticRegressionCV (lbfgs, same {len(grid)} values of C, same 5 folds), "
          f"N={n}, D={d}, K={k}:\n"
          f"    probe   {probe_s:7.2f} s, C={probe.report.C:.4g}, test accuracy "
          f"{probe_accuracy:.3f} ({len(probe.report.grid)} values of C walked)\n"
          f"    sklearn {sklearn_s:7.2f} s, C={reference.C_[0]:.4g}, test accuracy "
          f"{sklearn_accuracy:.3f}\n"
          f"    sklearn / probe time: {sklearn_s / probe_s:.2f}x", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--large", action="store_true", help="also N=5000 and N=20000")
    parser.add_argument("--versus-sklearn-only", action="store_true",
                        help="only the comparison with LogisticRegressionCV")
    args = parser.parse_args()
    shapes = [(30, 25088, 6), (40, 8192, 8), (200, 1280, 10), (1000, 1280, 10), (2000, 512, 10)]
    if args.large:
        shapes += [(5000, 1280, 10), (20000, 1280, 10)]
    print_load()
    for n, d, k in [] if args.versus_sklearn_only else shapes:
        x, y = backbone_like(n, d, k)
        wall, cpu = time.perf_counter(), time.process_time()
        probe = fit_linear_probe(x, y, "classification", k)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"{probe.report.summary()}\n    wall {wall:.2f} s, CPU {cpu:.2f} s, "
              f"{probe.report.solver}, {probe.report.cv}", flush=True)
    versus_sklearn()
    print_load(end=True)


if __name__ == "__main__":
    main()
