"""Fairness: every recipe key on which the arms differ, and which differences are refused.

Three kinds of keys:

- meant to differ (the thing being compared): ``encoder.*``, ``objective.*``,
  ``generator.*``, ``discriminator.*``, ``losses.*``, ``optim.*``, ``gate.*``, ``run.name``;
- must match (a difference confounds the comparison): ``data.*`` (data set, image size,
  batch size, ...), the budget (``run.epochs``, ``run.steps_per_epoch``, ``run.max_steps``,
  ``run.max_minutes``), the evaluation protocol (``eval.*`` but the incidental
  ``eval.every_epochs``, ``eval.cache_dir``, ``eval.batch_size``), the seed set
  (``run.seed``, compared as the set of seeds of each arm) and what training did
  (``trained.steps``, the optimizer steps, and ``trained.images``, the training images seen,
  read from each finished run's summary.json: a minutes budget or a run stopped early gives
  unequal ones). A difference is refused unless ``--allow-difference KEY`` (or the spec's
  ``allow_difference``) names the key or a table above it (``steps`` names ``trained``);
  allowed differences are then shown in red in every output;
- other keys (device, logging, checkpoints, ...): shown, never refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from capsgan_toolkit.compare.spec import CompareError
from capsgan_toolkit.recipe.diff import ABSENT, PER_RUN, flatten, under

MEANT = ("encoder", "objective", "generator", "discriminator", "losses", "optim", "gate")
MEANT_KEYS = ("run.name",)
MUST_MATCH = ("data", "trained")
MUST_MATCH_KEYS = ("run.epochs", "run.steps_per_epoch", "run.max_steps", "run.max_minutes", "run.seed")
INCIDENTAL_EVAL = ("eval.every_epochs", "eval.cache_dir", "eval.batch_size")
ALIASES = {"seeds": "run.seed", "seed": "run.seed", "image_size": "data.image_size", "batch_size": "data.batch_size",
           "steps": "trained", "images": "trained"}
TRAINED = "trained"
"""The pseudo-table of what each run's training did (from summary.json): ``trained.steps``, ``trained.images``."""


def category(key: str) -> str:
    """Return "meant", "must_match" or "other" for a dotted recipe key."""
    if key in MEANT_KEYS or any(under(key, t) for t in MEANT):
        return "meant"
    if key in MUST_MATCH_KEYS or any(under(key, t) for t in MUST_MATCH):
        return "must_match"
    if under(key, "eval") and not any(under(key, t) for t in INCIDENTAL_EVAL):
        return "must_match"
    return "other"


def show(value: Any) -> str:
    if value is ABSENT:
        return ABSENT
    return json.dumps(value, sort_keys=True) if not isinstance(value, str) else value


@dataclass
class Difference:
    """One key on which the arms differ: each arm's value(s), its category and whether it is allowed."""

    key: str
    category: str
    values: dict[str, list[str]]
    allowed: bool = False

    @property
    def status(self) -> str:
        if self.category != "must_match":
            return self.category
        return "allowed" if self.allowed else "refused"

    def shown(self, arm: str) -> str:
        vals = self.values.get(arm, [])
        if self.key == "run.seed":
            return ", ".join(vals) if vals else "(none)"
        return vals[0] if len(vals) == 1 else "varies: " + " | ".join(vals)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "category": self.category, "status": self.status,
                "values": {arm: self.shown(arm) for arm in self.values}}


@dataclass
class Fairness:
    """Every difference between the arms, and the keys allowed to differ."""

    differences: list[Difference] = field(default_factory=list)
    allow: list[str] = field(default_factory=list)

    @property
    def refused(self) -> list[Difference]:
        return [d for d in self.differences if d.status == "refused"]

    @property
    def allowed(self) -> list[Difference]:
        return [d for d in self.differences if d.status == "allowed"]

    def check(self) -> None:
        """Raise :class:`CompareError` naming every refused difference and how to allow it."""
        refused = self.refused
        if not refused:
            return
        arms = list(refused[0].values)
        lines = [f"The arms differ where a fair comparison needs them equal ({len(refused)} key"
                 f"{'s' if len(refused) != 1 else ''}):"]
        for d in refused:
            lines.append(f"  - {d.key}: " + ", ".join(f"{arm} {d.shown(arm)}" for arm in arms))
        keys = " ".join(dict.fromkeys(f"--allow-difference {'steps' if under(d.key, TRAINED) else d.key}"
                                      for d in refused))
        if any(under(d.key, TRAINED) for d in refused):
            lines.append("trained.steps and trained.images are each run's optimizer steps and training images seen "
                         "(summary.json): a minutes budget, a different batch size or a run stopped early trains "
                         "the arms unequally.")
        lines.append("Make the arms' recipes agree (an arm's `set` in the spec can fix a key), or accept the "
                     f"confound with {keys} (it is then shown in red in every output).")
        raise CompareError("\n".join(lines))

    def to_dict(self) -> dict[str, Any]:
        return {"allow": self.allow, "differences": [d.to_dict() for d in self.differences],
                "allowed_differences": [d.key for d in self.allowed],
                "categories": {"meant": "meant to differ (what is compared)",
                               "must_match": "must match unless allowed (data, budget, eval protocol, seed set, "
                                             "steps and images trained)",
                               "other": "incidental (device, logging, checkpoints)"}}


def is_allowed(key: str, allow: list[str]) -> bool:
    for entry in allow:
        entry = ALIASES.get(entry, entry).removesuffix(".*").rstrip(".")
        if under(key, entry):
            return True
    return False


def compare_recipes(recipes: dict[str, list[dict[str, Any]]], allow: Sequence[str] = ()) -> Fairness:
    """List every dotted key on which the arms differ.

    Args:
        recipes: arm label -> the resolved recipe dict of each of its runs (one per seed).
        allow: keys (or tables) allowed to differ although they must match.

    Returns:
        The :class:`Fairness` record; call ``check()`` to refuse what is not allowed.
    """
    allow = list(allow)
    flat = {arm: [flatten(r) for r in runs] for arm, runs in recipes.items()}
    keys = sorted({k for runs in flat.values() for r in runs for k in r})
    out = []
    for key in keys:
        values: dict[str, list[str]] = {}
        for arm, runs in flat.items():
            seen: list[str] = []
            for r in runs:
                text = show(r.get(key, ABSENT))
                if text not in seen:
                    seen.append(text)
            values[arm] = sorted(seen, key=_seed_order) if key == "run.seed" else seen
        differs = len({tuple(v) for v in values.values()}) > 1
        if key not in PER_RUN:  # one arm's runs disagreeing is a difference too
            differs = differs or any(len(v) > 1 for v in values.values())
        if differs:
            out.append(Difference(key, category(key), values, allowed=is_allowed(key, allow)))
    rank = {"refused": 0, "allowed": 1, "meant": 2, "other": 3}
    out.sort(key=lambda d: rank[d.status])  # the confounds first; stable, so keys stay sorted within
    return Fairness(out, allow)


def _seed_order(text: str):
    try:
        return (0, int(text))
    except ValueError:
        return (1, text)


def display_rows(differences: list[dict[str, Any]], arms: list[str]) -> list[dict[str, Any]]:
    """Rows of the fairness table for people: refused and allowed keys, then meant-to-differ, then incidental.

    Rows that differ only because some arms lack the key (``(absent)``) while the arms that have
    it agree are collapsed into one row per table and status: ``encoder.*`` (9 keys), with the
    common value where there is one and "set" otherwise. Refused and allowed rows are never
    collapsed. Each row: ``{key, status, values, keys}`` (``keys``: the collapsed keys).
    """
    rank = {"refused": 0, "allowed": 1, "meant": 2, "other": 3}
    rows: list[dict[str, Any]] = []
    groups: dict[tuple, dict[str, Any]] = {}
    for d in sorted(differences, key=lambda d: rank.get(d["status"], 4)):
        values = d["values"]
        present = {a: v for a, v in values.items() if v != ABSENT}
        if d["status"] in ("refused", "allowed") or len(present) == len(values) or len(set(present.values())) > 1:
            rows.append({"key": d["key"], "status": d["status"], "values": values, "keys": [d["key"]]})
            continue
        table = d["key"].split(".")[0]
        absent = tuple(sorted(a for a in values if a not in present))
        group_key = (table, d["status"], absent)
        if group_key not in groups:
            groups[group_key] = {"key": f"{table}.*", "status": d["status"], "values": {}, "keys": []}
            rows.append(groups[group_key])
        groups[group_key]["keys"].append(d["key"])
        groups[group_key].setdefault("_present", []).append(present)
    for row in rows:
        present_list = row.pop("_present", None)
        if present_list is None:
            continue
        if len(row["keys"]) == 1:
            row["key"] = row["keys"][0]
        for arm in arms:
            if arm not in present_list[0]:
                row["values"][arm] = ABSENT
            elif len(row["keys"]) == 1:
                row["values"][arm] = present_list[0][arm]
            else:
                row["values"][arm] = f"set ({len(row['keys'])} keys)"
    return rows
