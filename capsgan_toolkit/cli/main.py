"""The ``capsgan`` command line: run, validate, plugins, eval, sample, compare.

Each command is a thin layer over :mod:`capsgan_toolkit.api`; the evaluation commands live
in :mod:`capsgan_toolkit.cli.evaluate` and ``compare`` in :mod:`capsgan_toolkit.cli.compare`,
and this module adds them to the group (no module imports the one that imports it).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from capsgan_toolkit import __version__, api
from capsgan_toolkit.cli.bench import bench_command
from capsgan_toolkit.cli.common import abort, console, friendly, option, warn
from capsgan_toolkit.cli.compare import compare_command
from capsgan_toolkit.cli.evaluate import eval_command, probe_command, sample_command
from capsgan_toolkit.cli.scaffold import new_plugin_command
from capsgan_toolkit.errors import CapsganError, Interrupted
from capsgan_toolkit.plugin.manager import load_plugins
from capsgan_toolkit.recipe.build import create
from capsgan_toolkit.recipe.toml_io import dumps_toml
from capsgan_toolkit.rundir.folder import RunDir

_STRICT = option("--strict-plugins", is_flag=True, default=False,
                 help="Treat a broken plugin or a plugin warning as an error (also: CAPSGAN_STRICT_PLUGINS=1).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="capsgan")
def cli():
    """capsgan: train and compare capsule-encoder GANs against CNN baselines."""


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. run.epochs=5.")
@_STRICT
@friendly
def validate(recipe, sets, strict_plugins):
    """Check RECIPE and print it with every default filled in."""
    plugins, resolved = api.load_recipe(recipe, sets, strict_plugins=strict_plugins, warn=warn)
    console.print(f"# {recipe}: valid", style="green", highlight=False)
    data = create(plugins, resolved, "data")
    note = getattr(data, "split_description", None)
    if note:
        console.print(f"# data: {note}", highlight=False, markup=False)
    console.print(dumps_toml(resolved.to_dict()), highlight=False, markup=False, soft_wrap=True)


@cli.command()
@option("--family", default=None, help="Only this family (encoder, generator, ...).")
@option("--params/--no-params", default=True, help="Show each component's params.")
@option("--json", "as_json", is_flag=True, default=False, help="Print the components as JSON (for scripts).")
@_STRICT
@friendly
def plugins(family, params, as_json, strict_plugins):
    """List every registered component by family, with its source and params."""
    loaded = load_plugins(strict=strict_plugins)
    for broken in loaded.broken:
        warn(f"{broken.describe()}. Its components are unavailable.")
    for line in getattr(loaded, "warnings", []):
        warn(line)
    families = [family] if family else loaded.registry.families
    for fam in families:
        if fam not in loaded.registry.families:
            raise CapsganError(f'Unknown family "{fam}". Families: {", ".join(loaded.registry.families)}.')
    if as_json:
        click.echo(json.dumps({fam: [{"name": c.name, "source": c.source, "distribution": loaded.sources.get(c.source),
                                      "description": c.description, "params": c.params_model.model_json_schema()}
                                     for c in loaded.registry.components(fam)] for fam in families}, indent=2))
        return
    for fam in families:
        title = f"{fam} ({len(loaded.registry.list(fam))})"
        if not params:
            table = Table(title=title, title_justify="left")
            table.add_column("name", style="bold cyan", no_wrap=True)
            table.add_column("source")
            table.add_column("description")
            for comp in loaded.registry.components(fam):
                table.add_row(Text(comp.name), Text(f"{comp.source} ({loaded.sources.get(comp.source, '?')})"),
                              Text(comp.description))
            console.print(table)
            continue
        # One block per component and one line per param, wrapped with a hanging indent, so it reads
        # at 80 columns: a param's name, default and constraints are never cut.
        console.print(Text(title, style="bold"), highlight=False)
        for comp in loaded.registry.components(fam):
            head = Text.assemble("  ", (comp.name, "bold cyan"),
                                 f"  {comp.source} ({loaded.sources.get(comp.source, '?')})")
            console.print(head, highlight=False, soft_wrap=True)
            for line in _wrap(comp.description, 4, 6):
                console.print(Text(line, style="italic"), highlight=False, soft_wrap=True)
            for key, line in _param_lines(comp.params_model):
                text = Text(line)
                text.stylize("cyan", 4, 4 + len(key))
                console.print(text, highlight=False, soft_wrap=True)
        console.print()


_NBSP = "\u00a0"


def _wrap(text: str, indent: int, hanging: int, keep: str = "") -> list[str]:
    """Wrap ``keep + text`` to the console's width; ``keep`` (name, default, constraints) is never split."""
    import textwrap

    width = max(40, console.width)
    lines = textwrap.wrap(keep.replace(" ", _NBSP) + text, width=width, initial_indent=" " * indent,
                          subsequent_indent=" " * hanging, break_long_words=False, break_on_hyphens=False)
    return [line.replace(_NBSP, " ") for line in lines] or [" " * indent]


def _param_lines(model) -> list[tuple[str, str]]:
    """``(key, text)`` per param: ``name = default  [constraints]  description``, wrapped."""
    if not model.model_fields:
        return [("", "    (no params)")]
    out = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        keep = f"{key} = {_default(field)}" + "".join(f"  [{c}]" for c in _constraints(field))
        for i, line in enumerate(_wrap(field.description or "", 4, 8, keep + ("  " if field.description else ""))):
            out.append((key if i == 0 else "", line.rstrip()))
    return out


def _toml(value) -> str:
    """A value as a recipe writes it: ``true``, ``"text"``, ``[0.5, 0.999]``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def _default(field) -> str:
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    return "(unset)" if value is None else _toml(value)


def _constraints(field) -> list[str]:
    """Bounds as ``0 < x <= 1`` and the choices of a Literal as ``"a" | "b"``."""
    import typing

    bounds = {}
    for meta in field.metadata:
        for attr in ("gt", "ge", "lt", "le", "min_length", "max_length", "multiple_of"):
            if getattr(meta, attr, None) is not None:
                bounds[attr] = getattr(meta, attr)
    out = []
    low = next(((op, bounds[a]) for a, op in (("gt", "<"), ("ge", "<=")) if a in bounds), None)
    high = next(((op, bounds[a]) for a, op in (("lt", "<"), ("le", "<=")) if a in bounds), None)
    if low and high:
        out.append(f"{_toml(low[1])} {low[0]} x {high[0]} {_toml(high[1])}")
    elif low:
        out.append(f"x {'>' if low[0] == '<' else '>='} {_toml(low[1])}")
    elif high:
        out.append(f"x {high[0]} {_toml(high[1])}")
    if "min_length" in bounds or "max_length" in bounds:
        out.append(f"{bounds.get('min_length', 0)} <= length" + (f" <= {bounds['max_length']}"
                                                                  if "max_length" in bounds else ""))
    if "multiple_of" in bounds:
        out.append(f"multiple of {_toml(bounds['multiple_of'])}")

    def choices(annotation) -> list:
        if typing.get_origin(annotation) is typing.Literal:
            return list(typing.get_args(annotation))
        return [c for arg in typing.get_args(annotation) for c in choices(arg)]

    found = choices(field.annotation)
    if found:
        out.append(" | ".join(_toml(c) for c in found))
    return out


@cli.command()
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@option("--out", type=click.Path(file_okay=False), default=None, help="Run folder (default: runs/<run.name>).")
@option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. run.epochs=5.")
@option("--resume", "resume", type=click.Path(file_okay=False), default=None,
        help="Continue the run in this folder ('latest': the recipe's default folder).")
@option("--overwrite", is_flag=True, default=False, help="Delete an existing run folder first.")
@option("--quiet", is_flag=True, default=False, help="No progress bar or epoch lines.")
@_STRICT
@friendly
def run(recipe, out, sets, resume, overwrite, quiet, strict_plugins):
    """Train RECIPE (a TOML file) into a run folder."""
    if recipe is None and resume is None:
        raise CapsganError("Give a RECIPE to train, or --resume RUN_DIR to continue a run.")
    if resume is not None and overwrite:
        raise CapsganError("--resume and --overwrite contradict each other; choose one.")
    out_console = None if quiet else console
    if resume is not None:
        loaded = None  # the recipe is read, and its plugins loaded, once: here for latest, else in api.train
        if resume == "latest":
            if recipe is None:
                raise CapsganError("--resume latest needs the RECIPE whose latest run to continue.")
            loaded = api.load_recipe(recipe, sets, strict_plugins=strict_plugins)  # warnings: shown by api.train
            resume = str(RunDir.default_path(loaded[1]))
        RunDir(resume).check_resumable()  # refuses a folder that holds no run (changes nothing: no lock yet)
        summary = api.train(recipe, out=resume, sets=sets, resume=True, console=out_console,
                            strict_plugins=strict_plugins, loaded=loaded)
        out = resume
    else:
        summary = api.train(recipe, out=out, sets=sets, overwrite=overwrite, console=out_console,
                            strict_plugins=strict_plugins)
    if not quiet and summary:  # empty on the ranks other than 0 of a torchrun run
        acc = summary.get("test_acc")
        shown = f"test accuracy {acc:.3f}, " if acc is not None else ""
        console.print(f"[green]done[/]: {shown}{summary['train_time_s']:.0f}s training. "
                      f"Run folder: {out or Path('runs') / summary['name']}", highlight=False)


cli.add_command(eval_command)
cli.add_command(sample_command)
cli.add_command(probe_command)
cli.add_command(bench_command)
cli.add_command(new_plugin_command)


cli.add_command(compare_command)


def main(argv=None):
    """Entry point of the ``capsgan`` console script."""
    try:
        cli.main(args=argv, prog_name="capsgan", standalone_mode=True)
    except SystemExit as exc:
        if exc.code == Interrupted.exit_code:
            # Stopped by a signal, checkpoint written: another Ctrl-C while Python shuts down leaves
            # at once, without the traceback an interrupted interpreter exit would print.
            signal.signal(signal.SIGINT, lambda *_: os._exit(Interrupted.exit_code))
        raise
    except KeyboardInterrupt:
        abort()
