"""The ``capsgan eval`` and ``capsgan sample`` commands (:mod:`capsgan_toolkit.cli.main` adds them to the group)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from capsgan_toolkit.catalogue import EVAL_METRICS
from capsgan_toolkit.cli.common import DEVICES, console, friendly, option


def _metric_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


@click.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@option("--metrics", default=None, metavar="A,B,...",
        help=f"Comma-separated metrics (default: the recipe's eval.metrics). Any of: {', '.join(EVAL_METRICS)}.")
@option("--num-images", type=click.IntRange(min=10), default=None,
        help="Generated and reference images per score (default: the recipe's eval.num_images).")
@option("--checkpoint", default=None, help="final, best, or a checkpoint file (default: final.pt, else the newest).")
@option("--inception-weights", type=click.Path(dir_okay=False), default=None,
        help="Local torch-fidelity Inception-v3 weights file; adds Inception scores (label 'inception').")
@option("--set", "sets", multiple=True, metavar="eval.KEY=VALUE", help="Override an [eval] key, e.g. eval.seed=1.")
@option("--device", type=DEVICES, default=None, help="Where to run (default: the recipe's run.device).")
@option("--out", type=click.Path(dir_okay=False), default=None, help="JSON file to write (default: RUN_DIR/eval.json).")
@friendly
def eval_command(run_dir, metrics, num_images, checkpoint, inception_weights, sets, device, out):
    """Evaluate a trained run: accuracy, reconstructions, new images; write eval.json."""
    from capsgan_toolkit.api import evaluate
    from capsgan_toolkit.evaluation.evaluator import EvalReport

    result = evaluate(run_dir, checkpoint=checkpoint, metrics=_metric_list(metrics), num_images=num_images,
                      sets=tuple(sets), device=device, inception_weights=inception_weights, out=out, console=console)
    _print_report(EvalReport(metrics=result["metrics"], protocol=result["protocol"], skipped=result["skipped"],
                             extractors=result["extractors"]))
    console.print(f"Wrote {Path(out) if out else Path(result['run_dir']) / 'eval.json'}", highlight=False)


def _print_report(report) -> None:
    from capsgan_toolkit.catalogue import render_table

    console.print(render_table(report))
    for line in _ceiling_lines(report.metrics):
        console.print(line, highlight=False)
    for label, description in report.extractors.items():
        console.print(f"  features [bold]{label}[/]: {description}", highlight=False)


def _ceiling_lines(metrics: dict[str, float]) -> list[str]:
    """Read each gen_condacc against rec_acc of the same judge: its accuracy on reconstructions, the ceiling."""
    from capsgan_toolkit.catalogue import parse

    parsed = {key: parse(key) for key in metrics}
    lines = []
    for key, found in parsed.items():
        if found is None or found.key.stem != "gen_condacc":
            continue
        ceiling = next((k for k, p in parsed.items() if p is not None and p.key.stem == "rec_acc"
                        and p.label == found.label), None)
        if ceiling is not None:
            lines.append(f"  {key} {metrics[key]:.3f} against its ceiling {ceiling} {metrics[ceiling]:.3f} "
                         f"(the same judge on reconstructions of real images)")
    return lines


@click.command("sample")
@click.argument("run_dir", type=click.Path(file_okay=False))
@option("--n", "n", type=click.IntRange(min=1), default=64, help="New samples and reconstruction pairs.")
@option("--class", "class_index", type=int, default=None, help="Only this class (default: all; a column each).")
@option("--span", type=click.FloatRange(min=0.0, min_open=True), default=0.25,
        help="Capsule traversals sweep each dimension over [-span, span] around its value.")
@option("--steps", type=click.IntRange(min=2), default=11, help="Values per dimension in a traversal.")
@option("--seed", type=int, default=0, help="Seed of the new samples.")
@option("--checkpoint", default=None, help="final, best, or a checkpoint file (default: final.pt, else the newest).")
@option("--device", type=DEVICES, default=None, help="Where to run (default: the recipe's run.device).")
@option("--set", "sets", multiple=True, metavar="eval.KEY=VALUE",
        help="Override an [eval] key, e.g. eval.prior=mixture (the latent prior of the new samples).")
@option("--out", type=click.Path(file_okay=False), default=None, help="Folder (default: RUN_DIR/samples/sample).")
@friendly
def sample_command(run_dir, n, class_index, span, steps, seed, checkpoint, device, sets, out):
    """Write grids of new samples, reconstructions and capsule traversals of a trained run."""
    from capsgan_toolkit.api import load_trained
    from capsgan_toolkit.rundir.folder import RunDir
    from capsgan_toolkit.tools.sampling import write_samples

    run = load_trained(run_dir, checkpoint=checkpoint, sets=tuple(sets), device=device)
    folder = Path(out) if out else Path(run.run_dir) / "samples" / "sample"
    inside = folder.resolve().is_relative_to(Path(run.run_dir).resolve())
    with RunDir(run.run_dir).lock("sampling") if inside else contextlib.nullcontext():  # writes into the run folder
        paths = write_samples(run, folder, n=n, class_index=class_index, span=span, steps=steps, seed=seed)
    how = getattr(run.objective, "generation_description", None) if run.objective.has_generation else None
    if how:
        console.print(f"new samples: {how}", highlight=False)
    for path in paths:
        console.print(f"wrote {path}", highlight=False)


@click.command("probe")
@click.argument("run_dir", type=click.Path(file_okay=False))
@option("--n", "n", type=click.IntRange(min=10), default=1000, help="Test images (every class in turn).")
@option("--checkpoint", default=None, help="final, best, or a checkpoint file (default: final.pt, else the newest).")
@option("--device", type=DEVICES, default=None, help="Where to run (default: the recipe's run.device).")
@friendly
def probe_command(run_dir, n, checkpoint, device):
    """Measure what encoder and generator keep of turned, moved and scrambled test images; write probe.json, .png."""
    from rich.table import Table

    from capsgan_toolkit.rundir.folder import RunDir
    from capsgan_toolkit.tools import probe as probing

    result = probing.write_probe(run_dir, n=n, checkpoint=checkpoint, device=device)
    table = Table(title=f"spatial-structure probe ({result['images']} test images)", title_justify="left")
    table.add_column("test images", no_wrap=True)
    for info in result["columns"].values():
        table.add_column(info["header"] + {"higher": " ↑", "lower": " ↓"}[info["direction"]], justify="right")
    for row in result["rows"]:
        table.add_row(row["probe"], *(f"{row[c]:.3f}" for c in result["columns"]))
    console.print(table)
    for column, why in result["skipped"].items():
        console.print(f"[dim]{probing.COLUMNS[column]['header']}: not measured, {why}[/]", highlight=False)
    rd = RunDir(run_dir)
    console.print(f"Wrote {rd.probe_file} and {rd.probe_picture_file}", highlight=False)
