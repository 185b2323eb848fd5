"""The ``capsgan eval`` and ``capsgan sample`` commands (registered on the ``capsgan`` group)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from capsgan_toolkit import __version__
from capsgan_toolkit.cli import cli, console, friendly, option
from capsgan_toolkit.recipe import EVAL_METRICS

_DEVICES = click.Choice(["auto", "cpu", "cuda", "mps"])


def _metric_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


@cli.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@option("--metrics", default=None, metavar="A,B,...",
        help=f"Comma-separated metrics (default: the recipe's eval.metrics). Any of: {', '.join(EVAL_METRICS)}.")
@option("--num-images", type=click.IntRange(min=10), default=None,
        help="Generated and reference images per score (default: the recipe's eval.num_images).")
@option("--checkpoint", default=None, help="final, best, or a checkpoint file (default: final.pt, else the newest).")
@option("--inception-weights", type=click.Path(dir_okay=False), default=None,
        help="Local torch-fidelity Inception-v3 weights file; adds Inception scores (label 'inception').")
@option("--set", "sets", multiple=True, metavar="eval.KEY=VALUE", help="Override an [eval] key, e.g. eval.seed=1.")
@option("--device", type=_DEVICES, default=None, help="Where to run (default: the recipe's run.device).")
@option("--out", type=click.Path(dir_okay=False), default=None, help="JSON file to write (default: RUN_DIR/eval.json).")
@friendly
def eval_command(run_dir, metrics, num_images, checkpoint, inception_weights, sets, device, out):
    """Evaluate a trained run: accuracy, reconstructions, new images; write eval.json."""
    from capsgan_toolkit.evaluation import load_run

    overrides = {}
    if metrics is not None:
        overrides["metrics"] = _metric_list(metrics)
    if num_images is not None:
        overrides["num_images"] = num_images
    run = load_run(run_dir, checkpoint=checkpoint, eval_overrides=overrides, sets=tuple(sets), device=device,
                   inception_weights=inception_weights)
    from capsgan_toolkit.evaluation import preflight

    preflight(run.resolved, run.plugins.registry, run.components.info)  # missing weights fail before slow work
    console.print(f"Evaluating {run.checkpoint} (epoch {run.epoch}, step {run.step}) on {run.device}", highlight=False)
    start = time.perf_counter()
    report = run.evaluator(log=lambda text: console.print(text, highlight=False)).run()
    import torch_fidelity

    result = {
        "run_dir": str(run.run_dir), "checkpoint": str(run.checkpoint), "epoch": run.epoch, "step": run.step,
        "recipe_digest": run.resolved.digest(), "toolkit_version": __version__,
        "torch_fidelity_version": torch_fidelity.__version__, "device": str(run.device),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.perf_counter() - start, 2),
        "eval": run.resolved.to_dict()["eval"], **report.to_dict(),
    }
    path = Path(out) if out else Path(run.run_dir) / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    _print_report(report)
    console.print(f"Wrote {path}", highlight=False)


def _print_report(report) -> None:
    from capsgan_toolkit.catalogue import render_table

    console.print(render_table(report))
    for label, description in report.extractors.items():
        console.print(f"  features [bold]{label}[/]: {description}", highlight=False)


@cli.command("sample")
@click.argument("run_dir", type=click.Path(file_okay=False))
@option("--n", "n", type=click.IntRange(min=1), default=64, help="New samples and reconstruction pairs.")
@option("--class", "class_index", type=int, default=None, help="Only this class (default: all; a column each).")
@option("--span", type=click.FloatRange(min=0.0, min_open=True), default=0.25,
        help="Capsule traversals sweep each dimension over [-span, span] around its value.")
@option("--steps", type=click.IntRange(min=2), default=11, help="Values per dimension in a traversal.")
@option("--seed", type=int, default=0, help="Seed of the new samples.")
@option("--checkpoint", default=None, help="final, best, or a checkpoint file (default: final.pt, else the newest).")
@option("--device", type=_DEVICES, default=None, help="Where to run (default: the recipe's run.device).")
@option("--out", type=click.Path(file_okay=False), default=None, help="Folder (default: RUN_DIR/samples/sample).")
@friendly
def sample_command(run_dir, n, class_index, span, steps, seed, checkpoint, device, out):
    """Write grids of new samples, reconstructions and capsule traversals of a trained run."""
    from capsgan_toolkit.evaluation import load_run
    from capsgan_toolkit.sampling import write_samples

    run = load_run(run_dir, checkpoint=checkpoint, device=device)
    folder = Path(out) if out else Path(run.run_dir) / "samples" / "sample"
    paths = write_samples(run, folder, n=n, class_index=class_index, span=span, steps=steps, seed=seed)
    for path in paths:
        console.print(f"wrote {path}", highlight=False)
