"""`capsgan probe`: the perturbations against hand-made images, and the command on a tiny run."""

from __future__ import annotations

import json

import torch

from capsgan_toolkit.probe import PERTURBATIONS, _affine, _swap_quadrants
from helpers import TINY_RECIPE, invoke, write_toml


def test_perturbations_do_what_they_say():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 2, 8, 8, generator=g) * 2 - 1
    assert torch.allclose(_affine(images), images, atol=1e-5)  # no turn, no shift: the image itself
    # A one-pixel bright square moves by the shift (interior, so the border fill plays no part).
    dot = -torch.ones(1, 1, 8, 8)
    dot[0, 0, 3, 3] = 1.0
    moved = _affine(dot, dx=2, dy=1)
    assert moved[0, 0].argmax().item() == 4 * 8 + 5
    # A quarter turn of a square image moves the top-left corner's pixel to the bottom-left.
    corner = -torch.ones(1, 1, 8, 8)
    corner[0, 0, 1, 1] = 1.0
    turned = _affine(corner, degrees=90)
    assert turned[0, 0].argmax().item() == 6 * 8 + 1
    # Swapping quadrants: each quarter lands diagonally opposite, and twice is the identity.
    quarters = torch.zeros(1, 1, 4, 4)
    quarters[..., :2, :2], quarters[..., :2, 2:], quarters[..., 2:, :2], quarters[..., 2:, 2:] = 1, 2, 3, 4
    swapped = _swap_quadrants(quarters)
    assert swapped[0, 0, 0, 0] == 4 and swapped[0, 0, 0, 3] == 3 and swapped[0, 0, 3, 0] == 2 and swapped[0, 0, 3, 3] == 1
    assert torch.equal(_swap_quadrants(swapped), quarters)


def test_probe_writes_a_row_per_perturbation(tmp_path):
    path = write_toml(tmp_path / "tiny.toml", TINY_RECIPE)
    assert invoke("run", path, "--out", tmp_path / "run", "--quiet").exit_code == 0
    result = invoke("probe", tmp_path / "run", "--n", 20)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "probe.json").read_text())
    rows = {row["probe"]: row for row in report["rows"]}
    assert list(rows) == list(PERTURBATIONS)
    for row in rows.values():
        assert row["images"] == 20 and 0 <= row["acc"] <= 1 and 0 <= row["true_class_length"] <= 1
        assert 0 <= row["rec_mse01"] <= 1
    assert (tmp_path / "run" / "probe.png").is_file() and "quadrants swapped" in result.output
