"""``capsgan bench``: the command line of :mod:`capsgan_toolkit.tools.bench`."""

from __future__ import annotations

import json

import click

from capsgan_toolkit.cli.common import DEVICES, console, friendly, option
from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.tools.bench import footer, render, run_bench


def _shape(text: str | None):
    if text is None:
        return None
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise click.BadParameter(f"expected C,H,W such as 1,28,28; got {text!r}", param_hint="--image-shape")
    return shape


@click.command("bench")
@click.argument("recipe", type=click.Path(dir_okay=False))
@option("--baseline", type=click.Path(dir_okay=False), default=None,
        help="A second recipe, measured in the same run and shown side by side with ratios (RECIPE / BASELINE).")
@option("--batch", type=click.IntRange(min=1), default=None, help="Images per batch (default: the recipe's data.batch_size).")
@option("--steps", type=click.IntRange(min=1), default=10, help="Timed iterations of each measurement.")
@option("--warmup", type=click.IntRange(min=0), default=2, help="Untimed iterations before each measurement.")
@option("--device", type=DEVICES, default=None, help="Device (default: the recipe's run.device).")
@option("--image-shape", default=None, metavar="C,H,W",
        help="Image shape to use when the recipe's data set cannot be built (files missing).")
@option("--classes", type=click.IntRange(min=1), default=None, help="Classes, with --image-shape.")
@option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (both recipes).")
@option("--baseline-set", "baseline_sets", multiple=True, metavar="KEY=VALUE",
        help="Override a key of the baseline only; without --baseline the baseline is RECIPE itself, e.g. "
             "--set speed.channels_last=true --baseline-set speed.channels_last=false.")
@option("--json", "as_json", is_flag=True, default=False, help="Print the numbers as JSON.")
@friendly
def bench_command(recipe, baseline, batch, steps, warmup, device, image_shape, classes, sets, baseline_sets, as_json):
    """Measure RECIPE's speed: img/s of each part and of the training step, FLOPs, share of peak, memory."""
    shape = _shape(image_shape)
    if (shape is None) != (classes is None):
        raise CapsganError("--image-shape and --classes go together.")
    if baseline_sets and baseline is None:
        baseline = recipe
    report = run_bench(recipe, baseline, baseline_sets, batch=batch, steps=steps, warmup=warmup, device=device,
                       image_shape=shape, classes=classes, sets=sets)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    console.print(render(report))
    for line in footer(report):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
