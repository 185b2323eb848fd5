"""What a run writes for people to look at: metrics.jsonl, sample grids, curves.png."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from capsgan_toolkit.rundir import writes


class MetricsLog:
    """Append-only JSON-lines log; each row is flushed and fsynced so a crash keeps it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, row: dict[str, Any]) -> None:
        writes.append_text(self.path, json.dumps(row, sort_keys=True, allow_nan=True) + "\n")

    def truncate_after(self, step: int, epoch: int | None = None) -> None:
        """Drop rows logged after ``step`` (used on resume: they will be logged again).

        With ``epoch`` (the epoch a checkpoint resumes in), end-of-epoch rows (any kind but
        ``train``) of that epoch or later are dropped too: a checkpoint taken after the
        epoch's last step but before its end-of-epoch work shares that step with them.
        A torn last line left by a crash is dropped as well.
        """
        if not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step
                and (epoch is None or r.get("kind") in ("train", "event") or r.get("epoch", -1) < epoch)]
        writes.write_text(self.path, "".join(json.dumps(row, sort_keys=True, allow_nan=True) + "\n" for row in kept),
                          durable=True)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read metrics.jsonl, ignoring a torn last line left by a crash."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map images in [-1, 1] to uint8 in [0, 255]."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int) -> Path:
    """Save images in [-1, 1] ``(N, C, H, W)`` as one PNG grid."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(to_uint8(images.cpu()), nrow=nrow, padding=2, pad_value=255)
    array = grid.permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        array = array[:, :, 0]
    image = Image.fromarray(array)
    return writes.write_rendered(path, lambda fh: image.save(fh, format="PNG"))


def save_class_rows(rows: list[tuple[str, torch.Tensor]], path: str | Path, *, min_cell: int = 64) -> Path:
    """Save one labelled row of images per class, upscaled (nearest neighbour) to cells of at least ``min_cell`` px.

    ``rows`` is ``[(label, images (N, C, H, W) in [-1, 1]), ...]``; shorter rows are left blank
    on the right. The label of each row is written in a white margin on its left.
    """
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    side = rows[0][1].shape[-1]
    scale = max(1, -(-min_cell // side))  # ceil: small images are enlarged, never blurred
    cell, pad = side * scale, 2
    width = max(r[1].shape[0] for r in rows)
    label_w = 8 + 7 * max(len(label) for label, _ in rows)
    canvas = Image.new("RGB", (label_w + width * (cell + pad) + pad, len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, images) in enumerate(rows):
        up = torch.nn.functional.interpolate(images.detach().float().cpu(), scale_factor=scale, mode="nearest")
        grid = make_grid(to_uint8(up), nrow=images.shape[0], padding=pad, pad_value=255)
        array = grid.permute(1, 2, 0).numpy()
        tile = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).convert("RGB")
        y = i * (cell + pad)
        canvas.paste(tile, (label_w, y))
        draw.text((4, y + cell // 2 - 5), label, fill=(0, 0, 0))
    return writes.write_rendered(path, lambda fh: canvas.save(fh, format="PNG"))


def save_pairs(real: torch.Tensor, recon: torch.Tensor, path: str | Path, *, min_cell: int = 0) -> Path:
    """Save real images (odd rows) above their reconstructions (even rows).

    With ``min_cell``, images smaller than that are enlarged (nearest neighbour, a whole factor) first.
    """
    scale = max(1, -(-min_cell // real.shape[-1])) if min_cell else 1
    if scale > 1:
        real = torch.nn.functional.interpolate(real.detach().float(), scale_factor=scale, mode="nearest")
        recon = torch.nn.functional.interpolate(recon.detach().float(), scale_factor=scale, mode="nearest")
    n = real.shape[0]
    nrow = min(n, 8)
    rows = []
    for start in range(0, n, nrow):
        pad = max(0, start + nrow - n)  # blank cells keep each pair in one column
        blank = torch.ones((pad, *real.shape[1:]), dtype=real.dtype, device=real.device)
        rows.append(torch.cat([real[start:start + nrow], blank]))
        rows.append(torch.cat([recon[start:start + nrow], blank]))
    return save_grid(torch.cat(rows), path, nrow=nrow)


def _series(rows: Iterable[dict], key: str, kind: str = "train") -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if row.get("kind") == kind and isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(row["step"])
            ys.append(value)
    return xs, ys


def _legend(ax, **kwargs) -> None:
    """A legend where the panel has labelled lines (a short run may have none: no warning, no empty box)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def plot_curves(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Draw losses, encoder accuracy and discriminator accuracy against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for key in sorted({k for r in rows if r.get("kind") == "train" for k in r if k.startswith("loss_")}):
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, label=key[5:])
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_title("losses")
    ax.set_xlabel("step")
    _legend(ax, fontsize=8)

    ax = axes[1]
    xs, ys = _series(rows, "encoder_acc")
    ax.plot(xs, ys, label="train (running)")
    for key, label in (("test_acc", "test"),):
        xs, ys = _series(rows, key, kind="epoch")
        if xs:
            ax.plot(xs, ys, "o-", label=label)
    ax.set_ylim(0, 1.02)
    ax.set_title("encoder accuracy")
    ax.set_xlabel("step")
    _legend(ax, fontsize=8)

    ax = axes[2]
    xs, ys = _series(rows, "disc_acc")
    if xs:
        ax.plot(xs, ys, label="discriminator (running)")
    for flag, colour in (("gate_generator", "tab:green"), ("gate_discriminator", "tab:red")):
        xs, ys = _series(rows, flag)
        if xs:
            ax.fill_between(xs, 0, [0.05 * y for y in ys], step="post", alpha=0.4, color=colour,
                            label=flag.replace("gate_", "") + " on")
    ax.axhline(0.5, color="grey", lw=0.5, ls="--")
    ax.set_ylim(0, 1.02)
    ax.set_title("discriminator accuracy and gate")
    ax.set_xlabel("step")
    _legend(ax, fontsize=8)

    extra = [k for k in sorted({k for r in rows if r.get("kind") == "eval" for k in r}) if k not in ("kind", "step", "epoch")]
    if extra:
        sub = ax.twinx()
        for key in extra[:4]:
            xs, ys = _series(rows, key, kind="eval")
            if xs:
                sub.plot(xs, ys, "s--", label=key)
        _legend(sub, fontsize=7, loc="lower right")

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        return writes.write_rendered(path, lambda fh: fig.savefig(fh, format="png", dpi=90))
    finally:
        plt.close(fig)


@torch.no_grad()
def save_traversal(encoder, generator, images: torch.Tensor, path: str | Path, *,
                   span: float = 0.25, steps: int = 11) -> Path:
    """Save a capsule traversal: each dimension of the predicted capsule swept over ``±span``.

    For each image, row ``d`` shows the generator's output as dimension ``d`` of the
    predicted class capsule moves from ``-span`` to ``+span`` around its encoded value
    (Sabour et al. 2017, figure 4, uses steps of 0.05 in [-0.25, 0.25]); the other
    capsules are left as the encoder's latent gives them.
    """
    was_training = encoder.training, generator.training
    encoder.eval(), generator.eval()
    capsules = encoder(images)
    latent = encoder.to_latent(capsules)
    predicted = encoder.class_scores(capsules).argmax(1)
    b, _, dim = latent.shape
    deltas = torch.linspace(-span, span, steps, device=latent.device)
    # (B, D, steps, K, D): one latent per (image, dimension, step)
    sweep = latent[:, None, None].repeat(1, dim, steps, 1, 1)
    index = torch.arange(dim, device=latent.device)
    for i in range(b):  # B is a handful of images; the sweep itself is batched
        sweep[i, index, :, predicted[i], index] += deltas
    out = generator(sweep.reshape(b * dim * steps, *latent.shape[1:]))
    encoder.train(was_training[0]), generator.train(was_training[1])
    return save_grid(out, path, nrow=steps)
