"""Insight tools on cases whose answers are known by hand."""

import math
from types import SimpleNamespace

from matplotlib.figure import Figure

from keras_transfer.plots import plot_history


def two_phase_history(rate_start=0.0):
    """A flat loss near ln(10) (matplotlib would offset it by +2.3026)."""
    return SimpleNamespace(
        history={"loss": [2.302585, 2.302581, 2.302577, 2.302574, 2.302570, 2.302566],
                 "val_loss": [2.302584, 2.302582, 2.302578, 2.302575, 2.302572, 2.302569],
                 "accuracy": [0.1, 0.12, 0.13, 0.2, 0.3, 0.35],
                 "val_accuracy": [0.1, 0.1, 0.12, 0.2, 0.25, 0.3],
                 "learning_rate": [1e-3, 1e-3, 1e-3, rate_start, 5e-6, math.nan]},
        phases=[SimpleNamespace(name="head", first_epoch=0, epochs_run=3),
                SimpleNamespace(name="fine_tune", first_epoch=3, epochs_run=3)])


def test_plot_history_has_no_offset_and_a_positive_log_rate_axis(tmp_path):
    path = tmp_path / "history.png"
    figure = plot_history(two_phase_history(), path=str(path))
    assert isinstance(figure, Figure) and path.stat().st_size > 1000
    figure.draw_without_rendering()
    loss, accuracy, rate = figure.axes
    assert [loss.get_title(), accuracy.get_title(), rate.get_title()] == \
        ["loss", "accuracy", "learning_rate"]
    for axis in (loss, accuracy, rate):
        assert axis.yaxis.get_offset_text().get_text() == ""
        # both phases drawn, the boundary marked between epochs 3 and 4
        assert any(list(line.get_xdata()) == [3.5, 3.5] for line in axis.lines)
    assert "2.302585" in [t.get_text() for t in loss.get_yticklabels()]
    assert rate.get_yscale() == "log"
    low, high = rate.get_ylim()
    assert 0 < low < 5e-6 and high > 1e-3
    assert all(tick > 0 for tick in rate.get_yticks())
    # a rate of 0 everywhere cannot be drawn on a log scale: linear, no error
    flat = two_phase_history()
    flat.history["learning_rate"] = [0.0] * 6
    assert plot_history(flat, ["learning_rate"]).axes[0].get_yscale() == "linear"
    assert len(plot_history(flat.history).axes) == 3  # a bare dict has no phases
