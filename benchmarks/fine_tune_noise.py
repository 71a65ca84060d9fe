"""How much of a fine-tuned accuracy is the start, and how much the shuffle?

What it measures
    On the tasks and splits of `transfer_quality.py` (same seeds, same data),
    fine-tunes with the default `FineTunePhase()` from two starting heads:

    * `ours`: the head `HeadPhase()` solves (the library's probe);
    * `sklearn`: a per-feature `StandardScaler` + scikit-learn
      `LogisticRegression`, C from 13 values in [1e-4, 1e2] by stratified
      5-fold CV accuracy (ties to the lower log loss), folded into the
      Dense layer: the probe of the issue-#8 study;

    and repeats each fine-tune with `--repeats` shuffle seeds (the data
    split and the starting weights stay the same; only the order of the
    batches changes). It prints, per seed and start, the starting head's
    test accuracy, its training loss and kernel norm, and the fine-tuned
    test accuracy of every repeat, then each start's mean over seeds.

How to read the output
    The spread between repeats of one start on one split is the noise of
    the fine-tune itself; differences between starts or recipes smaller
    than it are not evidence. Nothing is asserted.

Usage:
    python benchmarks/fine_tune_noise.py --tasks yelp --seeds 0 1 2 --repeats 2
    (each yelp fine-tune takes 2-5 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import transfer_quality as tq  # noqa: E402
from machine import print_load  # noqa: E402

STARTS = ("ours", "sklearn")


def sklearn_head(features, labels, num_classes, seed):
    """The study's probe as `(C, kernel, bias)` for a `Dense(num_classes)` on raw features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    def scaler(rows):
        fitted = StandardScaler().fit(rows.astype(np.float64))
        # A constant column's float32 std is ~1e-30, not 0: keep its scale at 1.
        tiny = fitted.scale_ < 1e-3 * np.median(fitted.scale_)
        fitted.scale_ = np.where(tiny, 1.0, fitted.scale_)
        return fitted

    folds = StratifiedKFold(min(5, int(np.bincount(labels).min())), shuffle=True,
                            random_state=seed)
    scores = []
    for c in np.logspace(-4, 2, 13):
        accuracy, loss = [], []
        for train, held in folds.split(features, labels):
            scale = scaler(features[train])
            model = LogisticRegression(C=c, max_iter=5000).fit(
                scale.transform(features[train]), labels[train])
            p = model.predict_proba(scale.transform(features[held]))
            accuracy.append(np.mean(p.argmax(1) == labels[held]))
            loss.append(log_loss(labels[held], p, labels=np.arange(num_classes)))
        scores.append((np.mean(accuracy), -np.mean(loss), c))
    c = max(scores)[2]
    scale = scaler(features)
    model = LogisticRegression(C=c, max_iter=10000).fit(scale.transform(features), labels)
    coef, intercept = model.coef_, model.intercept_
    if num_classes == 2:  # one logit z becomes softmax logits (-z/2, z/2)
        coef, intercept = np.concatenate([-coef, coef]) / 2, np.concatenate(
            [-intercept, intercept]) / 2
    kernel = (coef / scale.scale_).T
    bias = intercept - (scale.mean_ / scale.scale_) @ coef.T
    return float(c), kernel.astype("float32"), bias.astype("float32")


def train_loss(model, x, y) -> float:
    p = np.clip(model.predict(x, batch_size=64, verbose=0), 1e-7, 1.0)
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def run(task, seed, starts, repeats, batch_size) -> list[dict]:
    import keras

    import keras_transfer as kt

    _, load, build, num_classes = tq.TASKS[task]
    data = load(seed)
    if data is None:
        return []
    x_train, y_train, x_test, y_test = data
    keras.utils.set_random_seed(seed)
    model = build(num_classes)
    model.fit(x_train, y_train, phases=[kt.HeadPhase()], seed=seed, verbose=0,
              batch_size=batch_size)
    solved = model.get_weights()
    dense = model.head.layers[-1]
    heads = {"ours": dense.get_weights()}
    if "sklearn" in starts:
        features = tq.pooled_features(model, x_train, y_train)
        heads["sklearn"] = list(sklearn_head(features, y_train, num_classes, seed)[1:])
    rows = []
    for start in starts:
        model.set_weights(solved)
        dense.set_weights(heads[start])
        row = {"seed": seed, "start": start,
               "start_accuracy": model.evaluate(x_test, y_test, batch_size=64)["accuracy"],
               "start_loss": train_loss(model, x_train, y_train),
               "kernel_norm": float(np.linalg.norm(heads[start][0])), "fine_tuned": []}
        begun = time.perf_counter()
        for repeat in range(repeats):
            model.set_weights(solved)
            dense.set_weights(heads[start])
            shuffle = seed + 100 * repeat
            keras.utils.set_random_seed(shuffle)
            model.fit(x_train, y_train, phases=[kt.FineTunePhase()], seed=shuffle, verbose=0,
                      batch_size=batch_size)
            row["fine_tuned"].append(model.evaluate(x_test, y_test, batch_size=64)["accuracy"])
        row["seconds"] = (time.perf_counter() - begun) / repeats
        print(f"{task} seed {seed} {start:8} head {row['start_accuracy']:.3f} (train loss "
              f"{row['start_loss']:.3f}, |kernel| {row['kernel_norm']:.2f}) -> fine-tuned "
              + " ".join(f"{a:.3f}" for a in row["fine_tuned"])
              + f" ({row['seconds']:.0f} s each)", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["yelp"], choices=list(tq.TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--starts", nargs="+", default=list(STARTS), choices=STARTS)
    parser.add_argument("--repeats", type=int, default=2, help="shuffle seeds per start")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    print_load()
    for task in args.tasks:
        rows = [r for seed in args.seeds
                for r in run(task, seed, args.starts, args.repeats, args.batch_size)]
        for start in args.starts:
            mine = [r for r in rows if r["start"] == start]
            if not mine:
                continue
            tuned = np.array([r["fine_tuned"] for r in mine])  # seeds x repeats
            spread = np.mean(tuned.max(axis=1) - tuned.min(axis=1))
            print(f"{task} {start:8}: head {np.mean([r['start_accuracy'] for r in mine]):.3f}"
                  f", fine-tuned {tuned.mean():.3f} (per repeat "
                  + " ".join(f"{m:.3f}" for m in tuned.mean(axis=0))
                  + f"; mean range between repeats of one seed {spread:.3f})")
    print_load(end=True)


if __name__ == "__main__":
    main()
