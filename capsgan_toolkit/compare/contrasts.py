"""Which pairs of arms a report compares, and which of them ask the question.

A contrast is a pair of arms (a, b) compared seed by seed: every difference is a(seed k) -
b(seed k). A spec's ``[[contrasts]]`` names them; without it every pair of arms is a contrast,
the question arms first. A *question* contrast is one whose arms' recipes differ only in
``[encoder]`` (seed, name, device, logging and evaluation aside): the capsule encoder against
the CNN encoder, everything else equal. Question contrasts come first in every output. In a
pair built by default the arm with a capsule encoder is ``a`` in a question pair, and the
baseline is ``b`` in any other (differences read "new arm minus baseline").
"""

from __future__ import annotations

from typing import Any

from capsgan_toolkit.compare.collect import RunRecord
from capsgan_toolkit.recipe.diff import GROUP_IGNORED, recipe_diff, under


def differing_tables(a: RunRecord, b: RunRecord) -> list[str]:
    """Top-level recipe tables (``run.epochs`` counts as ``run``) on which two runs' recipes differ."""
    tables = [change.key.split(".")[0] for change in recipe_diff(a.recipe, b.recipe, ignore=GROUP_IGNORED)]
    return sorted(set(tables))


def is_question(a: RunRecord, b: RunRecord) -> bool:
    """Whether two runs' recipes differ in ``[encoder]`` and nowhere else."""
    changes = recipe_diff(a.recipe, b.recipe, ignore=GROUP_IGNORED)
    return bool(changes) and all(under(change.key, "encoder") for change in changes)


def _capsule(rec: RunRecord) -> bool:
    return "caps" in str((rec.recipe.get("encoder") or {}).get("plugin", "")).lower()


def plan(arms: dict[str, list[RunRecord]], explicit: list[tuple[str, str]] | None = None,
         baseline: str | None = None) -> tuple[list[dict], list[str]]:
    """Return the contrasts (question ones first) and notes on contrasts that could not be made.

    Args:
        arms: arm label -> its runs, in the spec's arm order.
        explicit: the spec's ``[[contrasts]]`` as (a, b) pairs, kept as given; ``None`` or empty: every pair.
        baseline: the arm put second in a default pair that is not a question.

    Returns:
        ``([{a, b, question, differs_in, source}], notes)``.
    """
    labels = list(arms)
    notes: list[str] = []
    pairs: list[tuple[str, str]] = []
    source = "spec" if explicit else "every pair"
    if explicit:
        for a, b in explicit:
            missing = [x for x in (a, b) if x not in arms]
            if missing:
                notes.append(f"Contrast {a} vs {b} left out: no runs of {', '.join(missing)} in this report.")
            elif (a, b) not in pairs and (b, a) not in pairs:
                pairs.append((a, b))
    else:
        asked = [{"a": a, "b": b, "question": True} for i, a in enumerate(labels) for b in labels[i + 1:]
                 if is_question(arms[a][0], arms[b][0])]
        order = arm_order(labels, asked)
        pairs = [(a, b) for i, a in enumerate(order) for b in order[i + 1:]]
    out = []
    for a, b in pairs:
        first_a, first_b = arms[a][0], arms[b][0]
        question = is_question(first_a, first_b)
        swap = (_capsule(first_b) and not _capsule(first_a)) if question else a == baseline
        if swap and not explicit:
            a, b, first_a, first_b = b, a, first_b, first_a
        out.append({"a": a, "b": b, "question": question, "differs_in": differing_tables(first_a, first_b),
                    "source": source})
    out.sort(key=lambda c: not c["question"])  # stable: the question first, the given order within
    return out, notes


def arm_order(labels: list[str], contrasts: list[dict[str, Any]]) -> list[str]:
    """The arms in report order: those of question contrasts first, then the others as given."""
    first = [x for c in contrasts if c["question"] for x in (c["a"], c["b"])]
    return list(dict.fromkeys([*first, *labels]))


def name(contrast: dict[str, Any]) -> str:
    return f"{contrast['a']} vs {contrast['b']}"
