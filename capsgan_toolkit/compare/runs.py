"""Compare run folders that exist (``capsgan compare RUN_DIR RUN_DIR ...``): group them into arms, check
fairness and one protocol, write the report (DIR/compare.json, compare.md, compare.html)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from rich.console import Console

from capsgan_toolkit.compare.collect import RunRecord, fairness_recipe, protocol_differences, read_run
from capsgan_toolkit.compare.fairness import compare_recipes
from capsgan_toolkit.compare.outputs import write_outputs
from capsgan_toolkit.compare.spec import CompareError
from capsgan_toolkit.recipe.diff import GROUP_IGNORED, flatten, matches_any

# ------------------------------------------------------------------ existing run folders

_SEED_SUFFIX = re.compile(r"[-_.]?seed[-_]?\d+$")


def _group_key(record: RunRecord) -> str:
    flat = flatten(record.recipe)
    kept = {k: v for k, v in flat.items() if not matches_any(k, GROUP_IGNORED)}
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
