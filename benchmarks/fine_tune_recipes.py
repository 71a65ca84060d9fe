"""Which fine-tuning recipe earns its time after the probe? Several recipes from one head.

For each task and seed: the head phase (the probe) once, its evidence
printed (cross-validated accuracy and log-loss, the latter as a share of
chance's log K), then every recipe fine-tunes a copy starting from the same
head weights; test accuracy and wall time of each. Tasks are those of
`transfer_quality.py` (the demo's among them).

A recipe's name may end in "+shift" (fit's augmentation: random translations),
"+aug" (translations, a small rotation and zoom) or "+head" (the head solved
again after the fine-tune).

Run: `python benchmarks/fine_tune_recipes.py --tasks digits demo --seeds 0 1
[--recipes old strong 1e-3x300s+shift ...]`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402


def recipes():
    import keras_transfer as kt

    return {
        "old": kt.FineTunePhase(learning_rate=1e-5),
        "default": kt.FineTunePhase(),
        "1e-4x30": kt.FineTunePhase(epochs=30, learning_rate=1e-4),
        "ld.8@3e-4x30": kt.FineTunePhase(epochs=30, learning_rate=3e-4, layer_decay=0.8),
        "ld.7@1e-3x30": kt.FineTunePhase(epochs=30, learning_rate=1e-3, layer_decay=0.7),
        "range1e-6..1e-4x30": kt.FineTunePhase(epochs=30, learning_rate=(1e-6, 1e-4)),
        "ld.8@3e-4x30bn": kt.FineTunePhase(epochs=30, learning_rate=3e-4, layer_decay=0.8,
                                          train_batchnorm=True, batchnorm_momentum=0.9),
        "ld.8@3e-4x300s": kt.FineTunePhase(min_steps=300, learning_rate=3e-4, layer_decay=0.8),
        "ld.8@1e-4x300s": kt.FineTunePhase(min_steps=300, learning_rate=1e-4, layer_decay=0.8),
        "ld.8@1e-4x100s": kt.FineTunePhase(learning_rate=1e-4, layer_decay=0.8),
        # Issue 24, far domain (digits): BatchNorm training, more steps, higher rates, shifts.
        "strong": kt.FineTunePhase(learning_rate=1e-4, min_steps=120),
        "bn@1e-4x120s": kt.FineTunePhase(learning_rate=1e-4, min_steps=120,
                                         train_batchnorm=True, batchnorm_momentum=0.9),
        "1e-4x300s": kt.FineTunePhase(learning_rate=1e-4, min_steps=300),
        "3e-4x300s": kt.FineTunePhase(learning_rate=3e-4, min_steps=300),
        "3e-4x500s": kt.FineTunePhase(learning_rate=3e-4, min_steps=500),
        "1e-3x300s": kt.FineTunePhase(learning_rate=1e-3, min_steps=300),
        "1e-3x300s1c": kt.FineTunePhase(learning_rate=1e-3, min_steps=300, decay="one_cycle",
                                        warmup=0.25, weight_decay=0.01),
        # The policy's STRONG, its shifts made by the phase (not fit's augmentation).
        "1e-3x300s.1": kt.FineTunePhase(learning_rate=1e-3, min_steps=300, shift=0.1),
    }


def augmentation(extras, seed):
    """fit's augmentation for a recipe's extras: "shift", random translations by up
    to a tenth of the image; "aug", with a small rotation and zoom too; else None."""
    import keras

    layers = [keras.layers.RandomTranslation(0.1, 0.1, seed=seed)]
    if "aug" in extras:
        layers += [keras.layers.RandomRotation(0.03, seed=seed),
                   keras.layers.RandomZoom(0.1, seed=seed)]
    elif "shift" not in extras:
        return None
    return keras.layers.Pipeline(layers, name="augmentation")


def recipe(name, table):
    """`(phases, extras)`: "+shift" trains on shifted images, "+head" solves the head again."""
    import keras_transfer as kt

    base, *extras = name.split("+")
    return [table[base], *([kt.HeadPhase()] if "head" in extras else [])], extras


def main():
    import keras

    import transfer_quality as tq

    tasks = tq.TASKS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "demo"], choices=list(tasks))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--recipes", nargs="+")
    args = parser.parse_args()
    import keras_transfer as kt

    table = recipes()
    names = [] if args.recipes == ["none"] else args.recipes or list(table)  # none: heads only
    for name in names:
        recipe(name, table)  # unknown names fail before any training
    for task in args.tasks:
        _, load, build, num_classes = tasks[task]
        for seed in args.seeds:
            x_train, y_train, x_test, y_test = load(seed)
            keras.utils.set_random_seed(seed)
            model = build(num_classes)
            start = time.perf_counter()
            history = model.fit(x_train, y_train, phases=[kt.HeadPhase()], seed=seed, verbose=0)
            head_s = time.perf_counter() - start
            details = history.phases[0].details.get("head", {})
            head = model.evaluate(x_test, y_test, batch_size=64)["accuracy"]
            ratio = details.get("held_out_log_loss", math.nan) / math.log(num_classes)
            print(f"{task} seed {seed}: head {head:.3f} ({head_s:.0f} s); probe cv "
                  f"{details.get('best_score', math.nan):.3f} scoring {details.get('scoring')}, "
                  f"held-out log-loss {details.get('held_out_log_loss', math.nan):.4f} "
                  f"= {ratio:.3f} log K, training log-loss "
                  f"{details.get('training_log_loss', math.nan):.4f}", flush=True)
            weights = model.get_weights()
            for name in names:
                model.set_weights(weights)
                keras.utils.set_random_seed(seed)
                start = time.perf_counter()
                phases, extras = recipe(name, table)
                history = model.fit(x_train, y_train, phases=phases, seed=seed, verbose=0,
                                    augmentation=augmentation(extras, seed))
                seconds = time.perf_counter() - start
                accuracy = model.evaluate(x_test, y_test, batch_size=64)["accuracy"]
                record = history.phases[0]
                note = {k: v for k, v in record.details.items()
                        if k not in ("group_rates", "policy")}
                print(f"  {task} seed {seed} {name:20} {accuracy:.3f} ({accuracy - head:+.3f}) "
                      f"{seconds:5.0f} s {record.epochs_run} epochs "
                      f"loss {history.history.get('loss', [math.nan])[-1]:.4f} {note or ''}",
                      flush=True)


if __name__ == "__main__":
    main()
