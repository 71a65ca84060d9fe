"""The pictures a learner wants: both phases' curves, and forgetting.

Figures are built with `matplotlib.figure.Figure` directly (no `pyplot`), so
drawing never opens a window nor changes the global backend; they render
with Agg when saved. Every function returns the figure and saves it when a
path is given.
"""

from __future__ import annotations

import math


def _figure(rows: int, cols: int, width: float = 4.2, height: float = 3.2):
    try:
        from matplotlib.figure import Figure  # lazy: optional (plots)
    except ImportError as error:
        raise ImportError("Plotting needs matplotlib: pip install matplotlib "
                          "(or keras-transfer[demo]).") from error
    figure = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, axes


def _save(figure, path):
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure


def _history_dict(history) -> tuple[dict, list]:
    """`(metrics dict, [(phase name, first epoch, epochs)])` of any history."""
    phases = [(p.name, p.first_epoch, p.epochs_run) for p in getattr(history, "phases", [])]
    values = getattr(history, "history", history)
    if not isinstance(values, dict) or not values:
        raise ValueError(f"Received history of type {type(history).__name__}; expected "
                         "a TransferHistory, a keras History or a dict of lists.")
    return values, phases


_RATE_KEYS = ("learning_rate", "lr")


def plot_history(history, metrics=None, path=None, title=None):
    """Draws training and validation curves of both phases.

    One panel per metric (training solid, validation dashed), each running
    across all phases. Every phase after the first is shaded, its start
    marked by a vertical line and its name written at the top, so a jump or
    a drop at the switch is easy to see. Values are printed in full (no
    hidden offset such as "+2.302" on a flat loss). The learning rate is
    drawn on a log scale over its positive values; epochs without a rate or
    at a rate of 0 (the start of a warmup) leave a gap.

    Args:
        history: a `TransferHistory` (from `fit`), a `keras.callbacks.History`
            or a dict `{metric: [value per epoch]}`.
        metrics: list of str, optional. Metrics to draw (without `val_`);
            default: all of them, the loss first, the learning rate last.
        path: str, optional. Where to save the figure (PNG, SVG, PDF...).
        title: str, optional. Figure title.

    Returns:
        The `matplotlib.figure.Figure`.

    Example:
        >>> history = model.fit(x_train, y_train, head_epochs=5, fine_tune_epochs=5, verbose=0)
        >>> kt.plot_history(history, ["loss", "accuracy"], path="curves.png")
        <Figure size ... Axes>
    """
    values, phases = _history_dict(history)
    names = [k for k in values if not k.startswith("val_")]
    names += [k[4:] for k in values if k.startswith("val_") and k[4:] not in names]
    if metrics is None:
        metrics = sorted(names, key=lambda k: (k in _RATE_KEYS, k != "loss"))
    else:
        unknown = [m for m in metrics if m not in names]
        if unknown:
            raise ValueError(f"Received metrics {unknown}, which the history lacks; "
                             f"it has {sorted(names)}.")
    if not metrics:
        raise ValueError("Received an empty history: nothing to draw.")
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    figure, axes = _figure(rows, cols)
    for index, axis in enumerate(axes.flat):
        if index >= len(metrics):
            axis.set_visible(False)
            continue
        name = metrics[index]
        rate = name in _RATE_KEYS
        for key, style, label in ((name, "-", "train"), (f"val_{name}", "--", "validation")):
            if key in values:
                series = [float(v) for v in values[key]]
                if rate:  # a log axis has no place for 0: leave a gap
                    series = [v if v > 0 else math.nan for v in series]
                axis.plot(range(1, len(series) + 1), series, style, marker="o",
                          markersize=3, label=label)
        _mark_phases(axis, phases)
        axis.set_title(name)
        axis.set_xlabel("epoch")
        if rate and any(v > 0 for v in values.get(name, [])):
            axis.set_yscale("log", nonpositive="mask")
        else:
            axis.ticklabel_format(axis="y", useOffset=False)
        axis.grid(alpha=0.3)
        if not rate:  # the rate has one curve: its title names it
            axis.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def _mark_phases(axis, phases) -> None:
    """Shades every phase after the first, marks its start and names it on top."""
    ticks, labels = [], []
    for number, (phase, first, count) in enumerate(phases):
        if not count:
            continue
        if number:
            axis.axvspan(first + 0.5, first + count + 0.5, color="tab:orange", alpha=0.08)
            axis.axvline(first + 0.5, color="tab:orange", linewidth=1)
        ticks.append(first + 0.5 + count / 2)
        labels.append(phase.replace("_", "-"))
    if ticks:  # names above the panel, where no curve can hide them
        top = axis.secondary_xaxis("top")
        top.set_xticks(ticks, labels=labels)
        top.tick_params(length=0, labelsize="small", labelcolor="dimgray")


def plot_forgetting(report, path=None, title=None):
    """Draws a `ForgettingReport`: representation drift and weight change.

    Left: linear CKA and mean cosine similarity between the original and
    fine-tuned activations at each block (1 = unchanged). Right: relative
    weight change of each block's weights. The title gives the accuracy
    kept on the earlier task when the report has one.

    Args:
        report: a `ForgettingReport` (from `forgetting_report`).
        path: str, optional. Where to save the figure.
        title: str, optional. Figure title (default says what it shows).

    Returns:
        The `matplotlib.figure.Figure`.

    Example:
        >>> original = kt.snapshot_backbone(model)
        >>> report = kt.forgetting_report(original, model, x_test)
        >>> report.plot("forgetting.png")
        <Figure size ... Axes>
    """
    rows = report.blocks
    if not rows:
        raise ValueError("Received a report without blocks: nothing to draw.")
    labels = [row["layer"] for row in rows]
    positions = list(range(len(rows)))
    figure, axes = _figure(1, 2, width=max(4.5, 0.55 * len(rows) + 2.5), height=3.8)
    drift, weights = axes[0]
    drift.plot(positions, [row["cka"] for row in rows], "o-", label="linear CKA")
    drift.plot(positions, [row["cosine"] for row in rows], "s--", label="mean cosine")
    drift.set_ylim(min(0.0, *(row["cosine"] for row in rows if row["cosine"] == row["cosine"])),
                   1.05)
    drift.axhline(1.0, color="grey", linewidth=0.8)
    drift.set_ylabel("similarity to the original")
    drift.set_title("Representation drift per block")
    weights.bar(positions, [row["weight_change"] for row in rows], color="tab:red", alpha=0.7)
    weights.set_ylabel("||W_ft - W_0|| / ||W_0||")
    weights.set_title("Relative weight change per block")
    for axis in (drift, weights):
        axis.set_xticks(positions)
        axis.set_xticklabels(labels, rotation=45, ha="right", fontsize="small")
        axis.grid(alpha=0.3)
    drift.legend(fontsize="small")
    if title is None:
        title = f"Forgetting ({report.probe_size} probe {report.probe_kind})"
        if report.earlier_task is not None:
            task = report.earlier_task
            title += (f": earlier-task accuracy {task['original_accuracy']:.3f} -> "
                      f"{task['finetuned_accuracy']:.3f} (retained {task['retained']:.1%})")
    figure.suptitle(title)
    return _save(figure, path)
