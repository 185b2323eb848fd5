"""The spatial-structure probe: what a trained encoder keeps when test images are turned, moved or scrambled.

The source report's motivation is that capsules keep spatial structure that CNNs lose. The
probe measures it on a trained run, on the same test images as they are, rotated (15/30/45
degrees), shifted (2/4 pixels) and with their quadrants swapped (the parts of the image in the
wrong places: the "face with mouth and eye swapped" of the report's introduction): encoder
accuracy, the mean length of the true class's capsule, and how well the generator reproduces
such inputs (SSIM and MSE of the reconstruction against the perturbed image, and whether the
encoder still finds the true class in the reconstruction). Rotations and shifts resample with
the image's own border, so no black corners appear.

``probe.json`` (written by :func:`write_probe`, read by ``capsgan compare``) holds the
checkpoint and its step, ``n`` (the images asked for), ``images`` (those used), ``columns``
(each measured column's meaning, direction and unit), ``skipped`` (column -> why the objective
cannot give it) and ``rows`` (one per perturbation: ``probe``, ``images`` and the columns).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from capsgan_toolkit.data import class_balanced_indices, split_labels
from capsgan_toolkit.rundir import writes


def _affine(images: torch.Tensor, degrees: float = 0.0, dx: float = 0.0, dy: float = 0.0) -> torch.Tensor:
    """Rotate by ``degrees`` and shift by (dx, dy) pixels, filling with the border pixels."""
    b, _, h, w = images.shape
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), -2 * dx / w], [math.sin(a), math.cos(a), -2 * dy / h]],
                         dtype=images.dtype).expand(b, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _swap_quadrants(images: torch.Tensor) -> torch.Tensor:
    """Exchange the top-left with the bottom-right and the top-right with the bottom-left quarter."""
    h, w = images.shape[-2] // 2, images.shape[-1] // 2
    out = images.clone()
    out[..., :h, :w], out[..., h:2 * h, w:2 * w] = images[..., h:2 * h, w:2 * w], images[..., :h, :w]
    out[..., :h, w:2 * w], out[..., h:2 * h, :w] = images[..., h:2 * h, :w], images[..., :h, w:2 * w]
    return out


PERTURBATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda x: x,
    "rotate 15": lambda x: _affine(x, 15), "rotate 30": lambda x: _affine(x, 30), "rotate 45": lambda x: _affine(x, 45),
    "shift 2 px": lambda x: _affine(x, dx=2, dy=2), "shift 4 px": lambda x: _affine(x, dx=4, dy=4),
    "quadrants swapped": _swap_quadrants,
}
"""Name -> what is done to the test images (batched, in [-1, 1])."""


COLUMNS: dict[str, dict[str, str]] = {
    "acc": {"header": "accuracy", "needs": "classifier", "direction": "higher", "unit": "fraction, 0 to 1",
            "quantity": "accuracy of the objective's classifier on the perturbed test images"},
    "true_class_length": {
        "header": "true-class length", "needs": "encoder", "direction": "higher", "unit": "0 to 1",
        "quantity": "mean length of the true class's capsule (the encoder's class score) on the perturbed images"},
    "rec_ssim": {
        "header": "recon SSIM", "needs": "reconstruction", "direction": "higher", "unit": "index, -1 to 1",
        "quantity": "SSIM between the reconstruction of a perturbed image and that image (metrics.ssim)"},
    "rec_acc": {
        "header": "recon keeps class", "needs": "classifier+reconstruction", "direction": "higher",
        "unit": "fraction, 0 to 1",
        "quantity": "accuracy of the encoder on its own reconstructions of the perturbed images (true labels)"},
    "rec_mse01": {
        "header": "recon MSE", "needs": "reconstruction", "direction": "lower",
        "unit": "pixels in [0, 1]", "quantity": "MSE between the reconstruction of a perturbed image and that image "
                                                "(metrics.recon_mse01)"},
}
"""The probe's columns, in report order: what each measures, which way is better, and what it needs."""


def unmeasured(run) -> dict[str, str]:
    """Return column -> why this run's objective cannot give it (columns it can give are absent)."""
    obj, name = run.objective, run.resolved.recipe.objective.plugin
    has = {"classifier": obj.has_classifier, "reconstruction": obj.has_reconstruction,
           "encoder": run.built.parts.encoder is not None}
    why = {"encoder": f"the {name} objective has no encoder",
           "classifier": f"the {name} objective classifies no images",
           "reconstruction": f"the {name} objective reconstructs no images"}
    if not has["encoder"]:
        why["classifier"] = why["reconstruction"] = why["encoder"]
    out = {}
    for column, info in COLUMNS.items():
        lacking = [need for need in info["needs"].split("+") if not has[need]]
        if lacking:
            out[column] = why[lacking[-1]]
    return out


@torch.no_grad()
def probe(run, *, n: int = 1000, batch_size: int = 100) -> list[dict[str, Any]]:
    """Measure a loaded run (:func:`capsgan_toolkit.api.load_trained`) on perturbed test images.

    Returns one row per perturbation: ``probe`` (its name), ``images`` and each column of
    :data:`COLUMNS` the objective can give (mean over the images); the others are absent
    (:func:`unmeasured` says why).
    """
    from capsgan_toolkit.evaluation.scores import recon_mse01, ssim

    obj, encoder, device = run.objective, run.built.parts.encoder, run.device
    columns = [c for c in COLUMNS if c not in unmeasured(run)]
    images, labels = _test_images(run, n)
    obj.eval()
    rows = []
    for name, perturb in PERTURBATIONS.items():
        sums = dict.fromkeys(columns, 0.0)
        for start in range(0, len(images), batch_size):
            x = perturb(images[start:start + batch_size]).to(device)
            y = labels[start:start + batch_size].to(device)
            scores, recon = obj.classify_and_reconstruct(x)  # one encoder pass where the objective shares it
            if "acc" in sums:
                sums["acc"] += (scores.argmax(1) == y).sum().item()
            if "true_class_length" in sums:
                sums["true_class_length"] += encoder.class_scores(encoder(x)).gather(1, y[:, None]).sum().item()
            if "rec_ssim" in sums:
                sums["rec_ssim"] += ssim(recon, x).sum().item()
                sums["rec_mse01"] += recon_mse01(recon, x).sum().item()
                if "rec_acc" in sums:
                    sums["rec_acc"] += (obj.classify(recon).argmax(1) == y).sum().item()
        rows.append({"probe": name, "images": len(images), **{k: v / len(images) for k, v in sums.items()}})
    return rows


def _test_images(run, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` test images (every class in turn; fewer when the split is smaller) and their labels."""
    test = run.built.dataset.split("test")
    labels_all = split_labels(test)
    picked = class_balanced_indices(labels_all, min(n, len(test)))
    return torch.stack([test[i][0] for i in picked]), torch.tensor([labels_all[i] for i in picked])


@torch.no_grad()
def picture_rows(run, rows: list[dict[str, Any]], count: int = 8) -> list[tuple[str, torch.Tensor]]:
    """Labelled rows for probe.png: per perturbation, ``count`` perturbed test images (one per class) with
    their accuracy, and below them (where the objective reconstructs) their reconstructions with SSIM and
    the share whose reconstruction keeps the class."""
    images, _ = _test_images(run, count)
    out = []
    for row, perturb in zip(rows, PERTURBATIONS.values()):
        x = perturb(images)
        name = "as they are" if row["probe"] == "none" else row["probe"]
        out.append((name + (f": accuracy {row['acc']:.2f}" if "acc" in row else ""), x))
        if "rec_ssim" in row:
            kept = f", class kept {row['rec_acc']:.2f}" if "rec_acc" in row else ""
            out.append((f"  reconstructed: SSIM {row['rec_ssim']:.2f}{kept}",
                        run.objective.reconstruct(x.to(run.device)).cpu()))
    return out


def write_probe(run_dir, *, n: int = 1000, checkpoint: str | None = None, device: str | None = None,
                trusted_plugins=()) -> dict[str, Any]:
    """Load a trained run, probe it, write probe.json and probe.png into its folder; return probe.json's content.

    Holds the folder's lock throughout: refused at once while another process writes the folder.
    ``trusted_plugins``: see :func:`capsgan_toolkit.api.load_trained`.
    """
    from pathlib import Path

    from capsgan_toolkit.rundir.folder import RunDir

    if not Path(run_dir).is_dir():  # load_trained says what is missing
        return _write_probe(run_dir, n=n, checkpoint=checkpoint, device=device, trusted_plugins=trusted_plugins)
    with RunDir(run_dir).lock("probing"):
        return _write_probe(run_dir, n=n, checkpoint=checkpoint, device=device, trusted_plugins=trusted_plugins)


def _write_probe(run_dir, *, n: int, checkpoint: str | None, device: str | None, trusted_plugins) -> dict[str, Any]:
    from capsgan_toolkit.api import load_trained
    from capsgan_toolkit.rundir.reporting import save_class_rows

    run = load_trained(run_dir, checkpoint=checkpoint, device=device, trusted_plugins=trusted_plugins)
    rows = probe(run, n=n)
    skipped = unmeasured(run)
    result = {"checkpoint": str(run.checkpoint), "step": run.step, "weights": run.weights, "n": n,
              "images": rows[0]["images"], "columns": {k: v for k, v in COLUMNS.items() if k not in skipped},
              "skipped": skipped, "rows": rows}
    writes.write_json(run.rd.probe_file, result)
    save_class_rows(picture_rows(run, rows), run.rd.probe_picture_file)
    return result
