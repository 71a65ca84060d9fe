"""The report of a training run: a summary table and `metrics.json` + `history.png`.

What `keras-transfer train` prints after training and writes into the
export's `report/` folder; usable from Python on any `TransferHistory`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import sys

from keras_transfer.plots import plot_history


def summary_table(history) -> str:
    """A table of the last epoch of every phase: epochs, parameters, metrics.

    Args:
        history: the `TransferHistory` that `fit` returned.

    Returns:
        The table as text, one row per phase.
    """
    keys = [k for k in history.history if k != "learning_rate"]
    train = sorted((k for k in keys if not k.startswith("val_")), key=lambda k: k != "loss")
    keys = train + [f"val_{k}" for k in train if f"val_{k}" in history.history]
    header = ["phase", "epochs", "trainable", *keys]
    rows = [header]
    for phase in history.phases:
        if not phase.epochs_run:
            continue
        last = phase.first_epoch + phase.epochs_run - 1
        values = [history.history[k][last] for k in keys]
        rows.append([phase.name, f"{phase.first_epoch + 1}-{last + 1}",
                     f"{phase.trainable_params:,}",
                     *("-" if math.isnan(v) else f"{v:.4f}" for v in values)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    return "Training summary (last epoch of each phase)\n" + "\n".join(lines)


def write_report(history, metrics: dict, folder: str, evaluated_on: str = "") -> str:
    """Writes `metrics.json` (final metrics, phases, history) and `history.png`.

    Args:
        history: the `TransferHistory` that `fit` returned.
        metrics: dict. The final metrics.
        folder: str. Where to write (created).
        evaluated_on: str. What the final metrics were measured on.

    Returns:
        The folder.
    """
    os.makedirs(folder, exist_ok=True)
    report = _json_ready({
        "metrics": dict(metrics),
        "evaluated_on": evaluated_on,
        "phases": [dataclasses.asdict(p) for p in history.phases],
        "history": history.history,
    })
    with open(os.path.join(folder, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, allow_nan=False)
    try:
        plot_history(history, path=os.path.join(folder, "history.png"))
    except ImportError as error:
        print(f"Warning: no history plot ({error}); pip install matplotlib to get one.",
              file=sys.stderr)
    return folder


def _json_ready(value):
    """`value` with every number a float or int and NaN or infinity as None (strict JSON).

    A phase's details may hold numbers that are undefined for it (e.g. the
    fine-tune policy's evidence when there was no probe).
    """
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return None
    return int(value) if isinstance(value, numbers.Integral) else number
