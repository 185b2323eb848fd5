"""`capsgan probe`: the perturbations and the columns against hand-made images and models, and the command on a
tiny run."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY_RECIPE, invoke, write_toml
from PIL import Image

from capsgan_toolkit.objective import Objective
from capsgan_toolkit.tools.probe import COLUMNS, PERTURBATIONS, _affine, _swap_quadrants, probe, unmeasured


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


# ------------------------------------------------------------------ the columns, on hand-made models


class _Encoder:
    """Two classes; capsule 1's length is sigmoid(image mean), capsule 0's is 1 - that."""

    def __call__(self, x):
        p = torch.sigmoid(x.mean(dim=(1, 2, 3)))
        return torch.stack([torch.stack([1 - p, torch.zeros_like(p)], 1), torch.stack([p, torch.zeros_like(p)], 1)], 1)

    def class_scores(self, capsules):
        return capsules.norm(dim=-1)


class _Objective:
    """Classifies by the encoder (class 1 when the image mean is positive); reconstructs with ``reconstruct``."""

    classify_and_reconstruct = Objective.classify_and_reconstruct  # the interface's default: one call each

    def __init__(self, reconstruct=None, classifier=True):
        self.has_classifier, self.has_reconstruction = classifier, reconstruct is not None
        self._reconstruct = reconstruct

    def eval(self):
        return self

    def classify(self, images):
        return _Encoder().class_scores(_Encoder()(images))

    def reconstruct(self, images):
        return self._reconstruct(images)


def _run(images, labels, objective, *, encoder=True, name="fake"):
    split = list(zip(images, labels.tolist()))
    built = SimpleNamespace(parts=SimpleNamespace(encoder=_Encoder() if encoder else None),
                            dataset=SimpleNamespace(split=lambda which: split))
    return SimpleNamespace(objective=objective, built=built, device=torch.device("cpu"),
                           resolved=SimpleNamespace(recipe=SimpleNamespace(objective=SimpleNamespace(plugin=name))))


def test_columns_on_flat_images_match_closed_forms():
    # Flat images stay flat under every perturbation (border fill), so each column has a closed form.
    # Labels alternate 0, 1; the image of index 6 (class 0) is bright, so it is taken for class 1.
    values = [-0.8, 0.6, -0.4, 0.2, -0.1, 0.9, 0.3, 0.5]
    labels = torch.tensor([0, 1] * 4)
    images = torch.stack([torch.full((1, 8, 8), v) for v in values])
    b = 0.2  # every reconstruction is flat at 0.2 (0.6 in [0, 1] pixels): the encoder calls it class 1
    run = _run(images, labels, _Objective(lambda x: torch.full_like(x, b)))
    rows = probe(run, n=8, batch_size=3)
    assert [r["probe"] for r in rows] == list(PERTURBATIONS) and unmeasured(run) == {}

    a01, b01, c1 = [(v + 1) / 2 for v in values], (b + 1) / 2, 0.01 ** 2
    # SSIM of two flat images: no variance or covariance, so only the luminance term is left.
    ssim = sum((2 * a * b01 + c1) / (a * a + b01 * b01 + c1) for a in a01) / 8
    mse = sum((a - b01) ** 2 for a in a01) / 8
    sig = [1 / (1 + math.exp(-v)) for v in values]
    length = sum(s if y == 1 else 1 - s for s, y in zip(sig, labels.tolist())) / 8
    for row in rows:
        assert row["images"] == 8
        assert row["acc"] == pytest.approx(7 / 8)
        assert row["rec_acc"] == pytest.approx(4 / 8)  # class 1 for every reconstruction: right for half
        assert row["rec_ssim"] == pytest.approx(ssim, abs=1e-3)  # float32 SSIM on flat images (docs/metrics.md)
        assert row["rec_mse01"] == pytest.approx(mse, abs=1e-6)
        assert row["true_class_length"] == pytest.approx(length, abs=1e-5)


def test_identity_reconstruction_is_perfect_and_keeps_what_the_encoder_sees():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(10, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.tensor([0, 1] * 5)
    rows = probe(_run(images, labels, _Objective(lambda x: x)), n=10)
    for row, perturb in zip(rows, PERTURBATIONS.values()):
        seen = perturb(images).mean(dim=(1, 2, 3)) > 0  # the hand classifier, applied directly
        assert row["acc"] == pytest.approx((seen.long() == labels).float().mean().item())
        assert row["rec_acc"] == pytest.approx(row["acc"])
        assert row["rec_ssim"] == pytest.approx(1.0, abs=1e-6) and row["rec_mse01"] == pytest.approx(0.0, abs=1e-12)


def test_columns_an_objective_cannot_give_are_absent_with_the_reason():
    images, labels = torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    run = _run(images, labels, _Objective(), name="classifier")
    why = "the classifier objective reconstructs no images"
    assert unmeasured(run) == {"rec_ssim": why, "rec_acc": why, "rec_mse01": why}
    assert all(set(r) == {"probe", "images", "acc", "true_class_length"} for r in probe(run, n=4))
    run = _run(images, labels, _Objective(classifier=False), encoder=False, name="dcgan")
    assert unmeasured(run) == dict.fromkeys(COLUMNS, "the dcgan objective has no encoder")
    assert all(set(r) == {"probe", "images"} for r in probe(run, n=4))


# ------------------------------------------------------------------ the command


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
        assert 0 <= row["rec_mse01"] <= 1 and -1 <= row["rec_ssim"] <= 1 and 0 <= row["rec_acc"] <= 1
    assert list(report["columns"]) == list(COLUMNS) and report["skipped"] == {}
    assert report["n"] == report["images"] == 20 and report["step"] == 6
    assert "quadrants swapped" in result.output and "SSIM" in result.output
    # probe.png: per perturbation a row of test images and a row of their reconstructions (28 px cells
    # enlarged 3x, 2 px gaps).
    with Image.open(tmp_path / "run" / "probe.png") as picture:
        assert picture.height == 2 * len(PERTURBATIONS) * (3 * 28 + 2) + 2
