"""The ``capsgan compare`` command (registered on the ``capsgan`` group by the CLI).

Two forms::

    capsgan compare SPEC.toml --out DIR        # train every arm x seed, evaluate, report
    capsgan compare RUN_DIR RUN_DIR ... --out DIR   # report on runs that exist (one protocol)

Both write DIR/compare.json, DIR/compare.md and DIR/compare.html and print the table.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.text import Text

from capsgan_toolkit.compare.collect import RunRecord, fairness_recipe, protocol_differences, read_run
from capsgan_toolkit.compare.fairness import compare_recipes, flatten
from capsgan_toolkit.compare.outputs import write_outputs
from capsgan_toolkit.compare.spec import CompareError
from capsgan_toolkit.errors import CapsganError, Interrupted

option = functools.partial(click.option, show_default=True)


# ------------------------------------------------------------------ existing run folders

_SEED_SUFFIX = re.compile(r"[-_.]?seed[-_]?\d+$")
_GROUP_IGNORED = ("run.seed", "run.name", "run.device", "run.threads", "eval.", "checkpoint.", "output.",
                  "run.log_every")


def _group_key(record: RunRecord) -> str:
    flat = flatten(record.recipe)
    kept = {k: v for k, v in flat.items()
            if not any(k == p or (p.endswith(".") and k.startswith(p)) for p in _GROUP_IGNORED)}
    return json.dumps(kept, sort_keys=True)


def _label_of(runs: list[RunRecord]) -> str:
    names = {_SEED_SUFFIX.sub("", str(r.recipe.get("run", {}).get("name", ""))) for r in runs}
    if len(names) == 1 and next(iter(names)):
        return next(iter(names))
    parents = {r.path.parent.name for r in runs if re.fullmatch(r"seed-\d+", r.path.name)}
    if len(parents) == 1:
        return next(iter(parents))
    return runs[0].path.name


def group_runs(sources: list[str]) -> dict[str, list[RunRecord]]:
    """Read run folders into arms: ``LABEL=RUN_DIR`` names the arm; plain folders are grouped by recipe.

    Runs whose recipes agree on every key but the seed, name, device, logging and
    evaluation form one arm, labelled by their common run name without a ``-seed-K`` suffix.
    """
    explicit: dict[str, list[RunRecord]] = {}
    plain: list[RunRecord] = []
    problems = []
    for text in sources:
        label, sep, path = text.partition("=")
        try:
            if sep and not Path(text).exists():
                explicit.setdefault(label, []).append(read_run(path, arm=label))
            else:
                plain.append(read_run(text))
        except CompareError as exc:
            problems.append(str(exc))
    if problems:  # every run that is not ready, at once
        raise CompareError("\n".join(problems))
    groups: dict[str, list[RunRecord]] = {}
    for rec in plain:
        groups.setdefault(_group_key(rec), []).append(rec)
    arms = dict(explicit)
    for runs in groups.values():
        label = base = _label_of(runs)
        i = 2
        while label in arms:
            label, i = f"{base}-{i}", i + 1
        arms[label] = runs
    for label, runs in arms.items():
        seeds = [r.seed for r in runs]
        dup = sorted({s for s in seeds if seeds.count(s) > 1})
        if dup:
            paths = ", ".join(str(r.path) for r in runs if r.seed == dup[0])
            raise CompareError(f"Arm {label!r} has two runs with seed {dup[0]} ({paths}); an arm needs one run per "
                               "seed. Name the arms explicitly with LABEL=RUN_DIR.")
        for r in runs:
            r.arm = label
        runs.sort(key=lambda r: r.seed)
    return arms


def compare_runs(sources: list[str], out: Path, *, baseline: str | None, allow: list[str],
                 console: Console | None) -> dict[str, Any]:
    """Report on existing, evaluated runs; refuse mixed protocols and unfair arms."""
    arms = group_runs(sources)
    if len(arms) < 2:
        only = next(iter(arms), "?")
        raise CompareError(f"All {sum(len(r) for r in arms.values())} runs form one arm ({only!r}): their recipes "
                           "differ only in seed, name, device or logging. Give runs of at least two arms, or name "
                           "the arms with LABEL=RUN_DIR.")
    problems = protocol_differences([r for runs in arms.values() for r in runs])
    if problems:
        raise CompareError("These runs were evaluated with different protocols, so their numbers do not compare:\n  "
                           + "\n  ".join(problems)
                           + "\nEvaluate them again with one protocol (`capsgan eval RUN_DIR --set eval.KEY=VALUE`).")
    baseline = baseline or next(iter(arms))
    if baseline not in arms:
        raise CompareError(f"--baseline {baseline}: no such arm. The arms are: {', '.join(arms)}.")
    arms = {baseline: arms.pop(baseline), **arms}
    fairness = compare_recipes({a: [fairness_recipe(r) for r in runs] for a, runs in arms.items()}, allow)
    fairness.check()
    return write_outputs(arms, out, baseline=baseline, fairness=fairness,
                         title=f"{len(arms)} arms: " + " vs ".join(arms), source="run folders",
                         budget=_budget_of(arms), console=console)


def _budget_of(arms: dict[str, list[RunRecord]]) -> str:
    parts = []
    for key in ("epochs", "max_steps", "max_minutes"):
        values = {r.recipe.get("run", {}).get(key) for runs in arms.values() for r in runs}
        values.discard(None)
        values.discard(0)
        if values:
            parts.append(f"run.{key} = {', '.join(map(str, sorted(values)))}")
    return "; ".join(parts)


# ------------------------------------------------------------------ the command


def _friendly(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CapsganError as exc:
            label = "[bold yellow]stopped:[/]" if isinstance(exc, Interrupted) else "[bold red]error:[/]"
            Console(stderr=True).print(label, Text(str(exc)), highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            Console(stderr=True).print("[red]aborted[/]: finished runs and checkpoints are kept; run the same "
                                       "command again to continue.", highlight=False)
            sys.exit(130)

    return wrapper


@click.command("compare")
@click.argument("sources", nargs=-1, required=True, metavar="SPEC.toml | RUN_DIR...")
@option("--out", type=click.Path(file_okay=False), default=None,
        help="Comparison folder (default: compare/<spec name>, or compare/report for run folders).")
@option("--allow-difference", "allow", multiple=True, metavar="KEY",
        help="Let the arms differ in KEY (or a table such as data) although a fair comparison needs it equal; "
             "shown in red in every output.")
@option("--baseline", default=None, help="Baseline arm (default: the spec's; for run folders: the first arm).")
@option("--arm", "arm_labels", multiple=True, metavar="LABEL", help="Only these arms of the spec (and the baseline).")
@option("--with-optional", is_flag=True, default=False, help="Also run the spec's optional arms.")
@option("--jobs", type=click.IntRange(min=1), default=1, help="Runs at once (each run is its own worker process).")
@option("--devices", default=None, metavar="D1,D2,...",
        help="Devices handed to the runs in turn: cpu, cuda, cuda:0, cuda:1, mps (default: each recipe's run.device).")
@option("--shard", default=None, metavar="K/N",
        help="Run only the K-th of N slices of the sorted grid (array jobs); no report until a plain re-run.")
@option("--quiet", is_flag=True, default=False, help="No progress bar or table.")
@click.option("--in-process", is_flag=True, default=False, hidden=True,
              help="Train in this process (tests, debugging); peak memory then accumulates over runs.")
@_friendly
def compare_command(sources, out, allow, baseline, arm_labels, with_optional, jobs, devices, shard, quiet,
                    in_process):
    """Compare arms under one budget, seeds and protocol: train (SPEC.toml) or read (RUN_DIRs), then report.

    With a spec, every arm x seed is trained into OUT/runs/<arm>/seed-<k>/ and evaluated;
    re-running reuses finished runs, resumes unfinished ones and re-evaluates only what the
    protocol changed. With run folders (LABEL=RUN_DIR names an arm), they are compared as they are.
    """
    console = None if quiet else Console()
    first = Path(sources[0])
    if len(sources) == 1 and first.suffix == ".toml" and not first.is_dir():
        from capsgan_toolkit.compare.runner import Runner, parse_shard
        from capsgan_toolkit.compare.spec import load_spec

        loaded = load_spec(first)
        if baseline is not None:
            if baseline not in [a.label for a in loaded.spec.arms]:
                raise CompareError(f"--baseline {baseline}: no such arm in {first}.")
            loaded.spec.baseline = baseline
        arms = loaded.spec.selected(tuple(arm_labels), with_optional)
        device_list = [d.strip() for d in devices.split(",") if d.strip()] if devices else []
        runner = Runner(loaded, Path(out) if out else Path("compare") / first.stem, arms=arms, allow=list(allow),
                        jobs=jobs, devices=device_list, part=parse_shard(shard), console=console,
                        in_process=in_process)
        runner.run()
        return
    if any(Path(s).suffix == ".toml" for s in sources if not Path(s).is_dir()):
        raise CompareError("Give either one comparison spec (a .toml file) or run folders, not both.")
    for name, value in (("--arm", arm_labels), ("--with-optional", with_optional), ("--shard", shard),
                        ("--devices", devices), ("--jobs", jobs > 1)):
        if value:
            raise CompareError(f"{name} applies to a comparison spec, not to existing run folders.")
    compare_runs(list(sources), Path(out) if out else Path("compare") / "report", baseline=baseline,
                 allow=list(allow), console=console)
