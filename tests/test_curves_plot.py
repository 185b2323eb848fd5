"""curves.png: a short run's plot draws without matplotlib warnings."""

from __future__ import annotations

import warnings

from capsgan_toolkit.rundir.reporting import plot_curves


def test_a_run_with_nothing_labelled_to_plot_draws_without_legend_warnings(tmp_path):
    # Two steps of an encoder-free run: no losses logged yet, no test accuracy, no gate flags.
    rows = [{"kind": "train", "step": 1, "disc_acc": 0.5}, {"kind": "train", "step": 2, "disc_acc": 0.6}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "No artists with labels found to put in legend" would raise
        out = plot_curves(rows, tmp_path / "curves.png", title="short")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_labelled_lines_still_get_their_legend(tmp_path):
    rows = [{"kind": "train", "step": s, "loss_reconstruction": 1.0 / s, "encoder_acc": 0.1 * s} for s in (1, 2, 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_curves(rows, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
