"""The `setfit` package with its defaults, on the text splits of `transfer_quality.py`.

SetFit (Tunstall et al. 2022) is the reference for few-shot text
classification with a sentence encoder: contrastive tuning on pairs drawn
from the labels, then scikit-learn's `LogisticRegression()` on the tuned
embeddings. It needs PyTorch, so it is never a dependency of this project:
it runs in a side environment, by default `/work/setfit-venv`:

    python3 -m venv /work/setfit-venv
    /work/setfit-venv/bin/pip install torch==2.13.0 setfit

This script runs twice over: in the project's environment it builds the
same splits as `transfer_quality.py` (same loaders, same seeds) and the
same MiniLM folder (`kt.minilm_path()`), writes them to a temporary JSON
file, and runs itself with `--worker` in the side environment, offline
(`HF_HUB_OFFLINE=1`), where only the standard library and setfit are
imported. Without the side environment it says so and exits.

Printed per task and seed: accuracy on the test split, the training time
(`Trainer.train()`: the contrastive phase and the head), wall and CPU (the
process's CPU seconds, all threads: steadier than wall time on a shared
machine), and the number of training examples. setfit's default
(`sampling_strategy="oversampling"`) draws every pair of training texts
once (each text with itself too), the rarer kind repeated to balance
them: 5,100 pairs (319 steps of 16) on yelp and 14,336 (896 steps) on
topics, against 250 and 320 steps for `kt.ContrastivePhase()`; on a shared
2-core machine topics takes about an hour: `--max-steps` gives an estimate.

Run: `python benchmarks/setfit_side.py [--tasks yelp topics] [--seeds 0]
[--python /work/setfit-venv/bin/python] [--max-steps N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SIDE_PYTHON = os.environ.get("SETFIT_PYTHON", "/work/setfit-venv/bin/python")


def worker(path: str) -> None:
    """Runs setfit with its defaults on the split in `path` (side environment)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    with open(path, encoding="utf-8") as file:
        split = json.load(file)
    model = SetFitModel.from_pretrained(split["model"])
    # Only what a run needs changed: no checkpoints, no reporting, quiet.
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="setfit-"), seed=split["seed"],
                             report_to="none", save_strategy="no", show_progress_bar=False,
                             max_steps=split["max_steps"])
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict(
        {"text": split["x_train"], "label": split["y_train"]}))
    start, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    predicted = model.predict(split["x_test"], as_numpy=True)
    predict_s = time.perf_counter() - start
    accuracy = sum(int(p) == int(y) for p, y in zip(predicted, split["y_test"])) \
        / len(split["y_test"])
    print("RESULT " + json.dumps({"accuracy": accuracy, "train_s": train_s,
                                  "train_cpu_s": train_cpu_s,
                                  "predict_s": predict_s,
                                  "pairs": len(trainer.train_dataset) if hasattr(
                                      trainer.train_dataset, "__len__") else None}),
          flush=True)


def run(task: str, seed: int, python: str, max_steps: int = -1) -> dict | None:
    """setfit's accuracy and times on one task and seed, or None without its data."""
    import keras_transfer as kt
    from transfer_quality import TASKS

    kind, load, _, _ = TASKS[task]
    if kind != "text":
        raise SystemExit(f"{task} is not a text task.")
    data = load(seed)
    if data is None:
        return None
    x_train, y_train, x_test, y_test = data
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump({"model": kt.minilm_path(), "seed": seed, "max_steps": max_steps,
                   "x_train": list(x_train),
                   "y_train": [int(v) for v in y_train], "x_test": list(x_test),
                   "y_test": [int(v) for v in y_test]}, file)
    try:
        done = subprocess.run([python, os.path.abspath(__file__), "--worker", file.name],
                              capture_output=True, text=True, check=False)
    finally:
        os.remove(file.name)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"setfit failed on {task} seed {seed}:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["yelp", "topics"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--python", default=SIDE_PYTHON,
                        help="the side environment's python (default: $SETFIT_PYTHON or "
                             "/work/setfit-venv/bin/python)")
    parser.add_argument("--max-steps", type=int, default=-1,
                        help="stop setfit's contrastive phase after this many steps, to time "
                             "a step on a busy machine (default: setfit's own budget)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if not os.path.isfile(args.python):
        print(f"setfit: not measured: no side environment at {args.python} (see this "
              "script's docstring to make one).")
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import print_load

    print_load()
    for task in args.tasks:
        for seed in args.seeds:
            result = run(task, seed, args.python, args.max_steps)
            if result is None:
                print(f"{task}: skipped (its data is not installed here)")
                break
            print(f"{task} seed {seed}: setfit {result['accuracy']:.3f}, train "
                  f"{result['train_s']:.0f} s wall, {result['train_cpu_s']:.0f} s CPU "
                  f"({result['pairs']} examples), predict {result['predict_s']:.1f} s",
                  flush=True)
    print_load(end=True)


if __name__ == "__main__":
    main()
