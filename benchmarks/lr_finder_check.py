"""Is the finder's suggestion near the best rate of a sweep? (issue 24: within a factor of 3)

For each task and seed: the head phase (the probe), then
`model.find_learning_rate(x, y, unfreeze="all")` and, from the same head
weights, a short fine-tune at each rate of a sweep (`--rates`, same steps);
prints the suggestion, each rate's test accuracy and final training loss,
and the ratio between the suggestion and the sweep's best rate (by test
accuracy, ties to the lower loss). A second line lists the rates whose
accuracy is within one binomial standard error of the best (one seed cannot
tell them apart) and the smallest factor from the suggestion to one of them.
With several seeds, a last line per task compares the best rate of the
seed-averaged sweep with the geometric mean of the suggestions.

Run: `python benchmarks/lr_finder_check.py --tasks digits textures --seeds 0 [--steps 60]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))


def main():
    import keras

    import keras_transfer as kt
    import transfer_quality as tq

    tasks = tq.TASKS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["digits"], choices=list(tasks))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--rates", nargs="+", type=float, default=[1e-5, 1e-4, 1e-3])
    parser.add_argument("--steps", type=int, default=60, help="steps of each sweep run")
    args = parser.parse_args()
    for task in args.tasks:
        _, load, build, num_classes = tasks[task]
        suggestions, accuracies = [], []  # per seed
        for seed in args.seeds:
            x_train, y_train, x_test, y_test = load(seed)
            keras.utils.set_random_seed(seed)
            model = build(num_classes)
            model.fit(x_train, y_train, phases=[kt.HeadPhase()], seed=seed, verbose=0)
            weights = model.get_weights()
            start = time.perf_counter()
            found = model.find_learning_rate(x_train, y_train, unfreeze="all", start=1e-7,
                                             end=1.0, steps=100, seed=seed)
            seconds = time.perf_counter() - start
            print(f"{task} seed {seed}: suggestion {found.suggestion:.2g} (minimum "
                  f"{found.minimum_rate:.2g}, {len(found.rates)} batches, {seconds:.0f} s)",
                  flush=True)
            results = []
            for rate in args.rates:
                model.set_weights(weights)
                keras.utils.set_random_seed(seed)
                history = model.fit(x_train, y_train, seed=seed, verbose=0, phases=[
                    kt.FineTunePhase(learning_rate=rate, min_steps=args.steps,
                                     policy="always")])
                accuracy = model.evaluate(x_test, y_test, batch_size=64)["accuracy"]
                loss = history.history["loss"][-1]
                results.append((accuracy, -loss, rate))
                print(f"  {task} seed {seed} rate {rate:.0e}: test {accuracy:.3f}, final "
                      f"training loss {loss:.4f}", flush=True)
            best_accuracy, _, best = max(results)
            ratio = max(found.suggestion / best, best / found.suggestion)
            print(f"  {task} seed {seed}: best rate {best:.0e}, suggestion "
                  f"{found.suggestion:.2g}: a factor {ratio:.1f} "
                  f"({'within' if ratio <= 3 else 'NOT within'} 3)", flush=True)
            # One seed's best rate is noisy: rates within one binomial standard error of
            # the best accuracy on this test set are as good, as far as it can tell.
            error = (best_accuracy * (1 - best_accuracy) / len(y_test)) ** 0.5
            tied = [rate for accuracy, _, rate in results if accuracy >= best_accuracy - error]
            closest = min(max(found.suggestion / r, r / found.suggestion) for r in tied)
            print(f"  {task} seed {seed}: rates within one standard error ({error:.3f}) of the "
                  f"best: {', '.join(f'{r:.0e}' for r in tied)}; the closest is a factor "
                  f"{closest:.1f} from the suggestion", flush=True)
            suggestions.append(found.suggestion)
            accuracies.append([accuracy for accuracy, _, _ in results])
        if len(args.seeds) > 1:
            print(across_seeds(task, args.rates, suggestions, accuracies), flush=True)


def across_seeds(task, rates, suggestions, accuracies) -> str:
    """The seeds together: the best rate of the mean sweep against the geometric mean suggestion.

    Averaging the sweep's accuracies over seeds is what one seed's best rate
    cannot give: which rate is best on this task, not on this draw.
    """
    import numpy as np

    mean = np.mean(accuracies, axis=0)
    best = rates[int(np.argmax(mean))]
    suggestion = float(np.exp(np.mean(np.log(suggestions))))
    ratio = max(suggestion / best, best / suggestion)
    sweep = ", ".join(f"{rate:.0e} {value:.3f}" for rate, value in zip(rates, mean))
    return (f"{task}, {len(suggestions)} seeds: mean test accuracy per rate: {sweep}; best "
            f"{best:.0e}; geometric mean suggestion {suggestion:.2g}: a factor {ratio:.1f} "
            f"({'within' if ratio <= 3 else 'NOT within'} 3)")


if __name__ == "__main__":
    main()
