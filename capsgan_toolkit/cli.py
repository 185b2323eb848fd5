"""The ``capsgan`` command line: run, validate, plugins (and the evaluation commands)."""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from capsgan_toolkit import __version__
from capsgan_toolkit.errors import CapsganError, Interrupted, RecipeError
from capsgan_toolkit.plugin_manager import PluginSet, load_plugins
from capsgan_toolkit.recipe import ResolvedRecipe, apply_overrides, dumps_toml, read_toml, resolve

console = Console()
err_console = Console(stderr=True)

option = functools.partial(click.option, show_default=True)  # every option shows its default


def _fail(exc: CapsganError) -> None:
    label = "[bold yellow]stopped:[/]" if isinstance(exc, Interrupted) else "[bold red]error:[/]"
    try:
        err_console.print(f"{label} {exc}", highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        pass  # a second Ctrl-C while the first stop is reported: keep the exit code, not click's "Aborted!"
    sys.exit(exc.exit_code)


def friendly(func):
    """Turn user errors into one clear message and an exit code, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CapsganError as exc:
            _fail(exc)
        except KeyboardInterrupt:
            # Caught here, inside the command: click would turn it into "Aborted!" and exit code 1.
            _abort()

    return wrapper


def _abort() -> None:
    err_console.print("[red]aborted[/]: interrupted at once (a second Ctrl-C, or one before training began); "
                      "checkpoints already on disk are intact. Resume with `capsgan run --resume RUN_DIR`.",
                      highlight=False, soft_wrap=True)
    sys.exit(130)


def _warn_broken(plugins: PluginSet) -> None:
    for broken in plugins.broken:
        err_console.print("[yellow]warning:[/] ", Text(f"{broken.describe()}. Its components are unavailable."),
                          highlight=False, soft_wrap=True)


def load_recipe_with_plugins(path: str | Path, sets: tuple[str, ...] = ()) -> tuple[PluginSet, ResolvedRecipe]:
    """Read a recipe, load the plugins it needs, and validate it."""
    data = read_toml(path)
    applied = apply_overrides(data, list(sets))
    extra = data.get("run", {}).get("plugins", []) if isinstance(data.get("run"), dict) else []
    if not isinstance(extra, list) or not all(isinstance(x, str) for x in extra):
        raise RecipeError(f"{path}: run.plugins must be a list of module names, got {extra!r}.")
    plugins = load_plugins(extra)
    _warn_broken(plugins)
    return plugins, resolve(data, plugins.registry, source=str(path), overrides=applied)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="capsgan")
def cli():
    """capsgan: train and compare capsule-encoder GANs against CNN baselines."""


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. run.epochs=5.")
@friendly
def validate(recipe, sets):
    """Check RECIPE and print it with every default filled in."""
    _, resolved = load_recipe_with_plugins(recipe, sets)
    console.print(f"# {recipe}: valid", style="green", highlight=False)
    console.print(dumps_toml(resolved.to_dict()), highlight=False, markup=False, soft_wrap=True)


@cli.command()
@option("--family", default=None, help="Only this family (encoder, generator, ...).")
@option("--params/--no-params", default=True, help="Show each component's params.")
@friendly
def plugins(family, params):
    """List every registered component by family, with its source and params."""
    loaded = load_plugins()
    _warn_broken(loaded)
    families = [family] if family else loaded.registry.families
    for fam in families:
        if fam not in loaded.registry.families:
            raise CapsganError(f'Unknown family "{fam}". Families: {", ".join(loaded.registry.families)}.')
        table = Table(title=f"{fam} ({len(loaded.registry.list(fam))})", title_justify="left", show_lines=params)
        table.add_column("name", style="bold cyan")
        table.add_column("source")
        table.add_column("description")
        if params:
            table.add_column("params (default)")
        for comp in loaded.registry.components(fam):
            row = [Text(comp.name), Text(f"{comp.source} ({loaded.sources.get(comp.source, '?')})"),
                   Text((comp.role + ": " if comp.role else "") + comp.description)]
            if params:
                row.append(Text(_describe_params(comp.params_model)))
            table.add_row(*row)
        console.print(table)


def _describe_params(model) -> str:
    lines = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        note = f"  # {field.description}" if field.description else ""
        lines.append(f"{key} = {default}{note}")
    return "\n".join(lines) or "-"


@cli.command()
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@option("--out", type=click.Path(file_okay=False), default=None, help="Run folder (default: runs/<run.name>).")
@option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. run.epochs=5.")
@option("--resume", "resume", type=click.Path(file_okay=False), default=None,
              help="Continue the run in this folder ('latest': the recipe's default folder).")
@option("--overwrite", is_flag=True, default=False, help="Delete an existing run folder first.")
@option("--quiet", is_flag=True, default=False, help="No progress bar or epoch lines.")
@friendly
def run(recipe, out, sets, resume, overwrite, quiet):
    """Train RECIPE (a TOML file) into a run folder."""
    from capsgan_toolkit import runs
    from capsgan_toolkit.trainer import Trainer

    if recipe is None and resume is None:
        raise CapsganError("Give a RECIPE to train, or --resume RUN_DIR to continue a run.")
    if resume is not None and overwrite:
        raise CapsganError("--resume and --overwrite contradict each other; choose one.")
    if resume is not None:
        if resume == "latest":
            if recipe is None:
                raise CapsganError("--resume latest needs the RECIPE whose latest run to continue.")
            _, probe = load_recipe_with_plugins(recipe, sets)
            resume = str(runs.default_run_dir(probe))
        run_dir = Path(resume)
        checkpoint_path = runs.resume_checkpoint(run_dir)
        plugins, resolved = load_recipe_with_plugins(recipe or run_dir / "recipe.toml", sets)
        from capsgan_toolkit.checkpoint import load_checkpoint

        # A run stopped before its first checkpoint has nothing to break: it starts over.
        saved = load_checkpoint(checkpoint_path) if checkpoint_path is not None else None
        changes = runs.breaking_changes(saved["recipe"], resolved.to_dict()) if saved is not None else []
        if changes:
            raise CapsganError(
                f"Cannot resume {run_dir} with this recipe: these keys changed in ways that break the run:\n  "
                + "\n  ".join(changes)
                + "\nResume with the run's own recipe (omit RECIPE), or start a new run with --out."
            )
        runs.write_recipe(resolved, run_dir)
        if checkpoint_path is None:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # rows of the attempt that left no checkpoint
        if not quiet:
            console.print(f"Resuming {run_dir} from {checkpoint_path.name}" if checkpoint_path is not None
                          else f"{run_dir} holds no checkpoint yet: starting it from the beginning", highlight=False)
    else:
        plugins, resolved = load_recipe_with_plugins(recipe, sets)
        run_dir = runs.prepare_new(Path(out) if out else runs.default_run_dir(resolved), overwrite=overwrite)
        runs.write_recipe(resolved, run_dir)
        checkpoint_path = None
    try:
        trainer = Trainer(resolved, plugins, run_dir, console=None if quiet else console, resume_from=checkpoint_path)
    except CapsganError:
        if resume is None:
            runs.discard_unstarted(run_dir)  # e.g. a missing data set: the same command works once fixed
        raise
    if not quiet:
        console.print(
            f"Training [bold]{resolved.recipe.run.name}[/] on {trainer.device}: "
            f"encoder {resolved.recipe.encoder.plugin}, generator {resolved.recipe.generator.plugin}, "
            f"data {resolved.recipe.data.plugin} ({len(trainer.train_set)} train images) -> {run_dir}",
            highlight=False,
        )
    summary = trainer.fit()
    import json

    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if not quiet:
        console.print(
            f"[green]done[/]: test accuracy {summary['test_acc']:.3f}, {summary['train_time_s']:.0f}s training. "
            f"Run folder: {run_dir}", highlight=False,
        )


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
        _abort()


from capsgan_toolkit import cli_eval  # noqa: E402,F401  (registers eval and sample)
