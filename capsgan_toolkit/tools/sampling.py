"""Pictures of a trained model: new samples, reconstructions and capsule traversals.

New samples come from the objective (the latent prior of :mod:`capsgan_toolkit.evaluation.prior` for the
reconstruction GAN: ``eval.prior`` where set, else the objective's own; noise for a DCGAN).
A traversal takes two test images of a class, encodes them, and sweeps each of the D
dimensions of the predicted capsule over ``[-span, span]`` around its value, one row
per dimension and image, as Sabour et al. (2017) do to show what each capsule dimension encodes
(:func:`capsgan_toolkit.rundir.reporting.save_traversal`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.evaluation.evaluator import prepare_generation
from capsgan_toolkit.evaluation.scores import fork_rng
from capsgan_toolkit.rundir.reporting import save_class_rows, save_pairs, save_traversal


def _test_images(dataset, classes: list[int], per_class: int) -> dict[int, torch.Tensor]:
    """Return up to ``per_class`` test images of each class in ``classes``, in split order."""
    split = dataset.split("test")
    found: dict[int, list[torch.Tensor]] = {k: [] for k in classes}
    for index in range(len(split)):
        image, label = split[index]
        label = int(label)
        if label in found and len(found[label]) < per_class:
            found[label].append(image)
        if all(len(v) >= per_class for v in found.values()):
            break
    return {k: torch.stack(v) for k, v in found.items() if v}


def _generate(fn, inputs: torch.Tensor, device: torch.device, batch_size: int = 128) -> torch.Tensor:
    out = []
    for start in range(0, inputs.shape[0], batch_size):
        out.append(fn(inputs[start:start + batch_size].to(device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def write_samples(run, out_dir: str | Path, *, n: int = 64, class_index: int | None = None,
                  span: float = 0.25, steps: int = 11, seed: int = 0) -> list[Path]:
    """Write new samples, reconstructions and traversals of ``run`` into ``out_dir``.

    What is written depends on the run's objective: new samples where it generates (from the
    latent prior, or noise for a DCGAN), reconstructions where it reconstructs, capsule
    traversals where it has an encoder and a generator.

    Args:
        run: the :class:`~capsgan_toolkit.api.LoadedRun`.
        out_dir: destination folder (created).
        n: new samples and reconstruction pairs.
        class_index: only this class (default: every class; in the samples grid each
            column is a class).
        span, steps: traversal range and number of values per dimension.
        seed: seed of the new samples.

    Returns:
        The written PNG files.
    """
    built, ev, obj = run.built, run.resolved.recipe.eval, run.objective
    num_classes = built.info.num_classes
    if class_index is not None and not 0 <= class_index < num_classes:
        raise CapsganError(f"--class {class_index} is out of range: this data set has classes 0 to {num_classes - 1}.")
    if n < 1 or steps < 2:
        raise CapsganError("--n must be at least 1 and --steps at least 2.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if class_index is None else f"_class{class_index}"
    written = []
    with fork_rng(run.device):
        if obj.has_generation:
            prepare_generation(obj, built.dataset.split("train"), ev, device=run.device)
            wanted = list(range(num_classes)) if class_index is None else [class_index]
            if obj.conditional:  # one labelled row per class, drawn from that class's prior (or noise)
                fitted = set(getattr(obj, "fitted_classes", wanted))
                wanted = [k for k in wanted if k in fitted]
                per_row = max(1, math.ceil(n / len(wanted))) if class_index is None else n
                classes = torch.tensor([k for k in wanted for _ in range(per_row)], dtype=torch.long)
                fake = obj.generate(classes, torch.Generator().manual_seed(seed))
                names = built.info.class_names or tuple(str(k) for k in range(num_classes))
                rows = [(f"{k} {names[k]}", fake[i * per_row:(i + 1) * per_row]) for i, k in enumerate(wanted)]
                written.append(save_class_rows(rows, out / f"generated{suffix}.png"))
            else:  # an unconditional generator: classes mean nothing, one upscaled grid
                fake = obj.generate(torch.zeros(n, dtype=torch.long), torch.Generator().manual_seed(seed))
                side = math.ceil(math.sqrt(n))
                rows = [("", fake[i:i + side]) for i in range(0, n, side)]
                written.append(save_class_rows(rows, out / f"generated{suffix}.png"))
        if not obj.has_reconstruction:
            return written
        wanted = list(range(num_classes)) if class_index is None else [class_index]
        per_class = _test_images(built.dataset, wanted, max(2, math.ceil(n / len(wanted))))
        if not per_class:
            raise CapsganError(f"The test split has no image of class {class_index} to reconstruct or traverse.")
        depth = max(v.shape[0] for v in per_class.values())
        # Round-robin over classes, so every class shows up even when n is small.
        real = torch.stack([v[i] for i in range(depth) for v in per_class.values() if i < v.shape[0]])[:n]
        if real.shape[0] > 8:  # save_pairs lays out rows of 8 pairs: keep whole rows so pairs stay aligned
            real = real[: real.shape[0] - real.shape[0] % 8]
        recon = _generate(obj.reconstruct, real, run.device)
        written.append(save_pairs(real, recon, out / f"reconstructions{suffix}.png"))
        encoder, generator = built.parts.encoder, built.parts.generator
        for k, images in per_class.items():
            written.append(save_traversal(encoder, generator, images[:2].to(run.device),
                                          out / f"traversal_class{k}.png", span=span, steps=steps))
    return written
