"""Recipe differences: one ``flatten``, one ``recipe_diff``, and every list of keys allowed to differ.

Each rule that lets two recipes differ in some keys lives here, side by side, so a reader sees
at once what a resume, a re-run of a comparison and the grouping of run folders ignore:

- :data:`RESUMABLE` (``capsgan run --resume``): keys that may change between a run and its resume;
- :data:`RERUN_IGNORED` (``capsgan compare`` on a spec it ran before): keys whose change does not
  make a trained run stale;
- :data:`GROUP_IGNORED` (grouping existing run folders into arms): keys that vary between the
  seeds of one arm or do not change what is learned;
- :data:`PER_RUN` (a comparison's fairness check): keys expected to vary between the runs of one
  arm, so the runs of an arm disagreeing on them is no difference.

A pattern names a key (``run.epochs``) or a whole table (``eval`` or ``eval.``). The fairness
categories of a comparison (meant to differ, must match, other) are in
:mod:`capsgan_toolkit.compare.fairness`, built on :func:`under`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

ABSENT = "(absent)"
"""The value shown for a key that one of the recipes does not have."""

RESUMABLE: tuple[str, ...] = (
    "run.epochs", "run.device", "run.threads", "run.eval_batches", "run.log_every", "run.name",
    "run.max_steps", "run.max_minutes", "checkpoint", "output", "eval",
    "speed.channels_last", "speed.compile", "speed.cudnn_benchmark", "speed.pin_memory",
    "speed.data_on_device", "speed.cuda_graphs",
)
RERUN_IGNORED: tuple[str, ...] = ("eval", "run.device", "run.threads")
GROUP_IGNORED: tuple[str, ...] = ("run.seed", "run.name", "run.device", "run.threads", "run.log_every", "eval",
                                  "checkpoint", "output")
PER_RUN: tuple[str, ...] = ("run.seed", "run.name", "run.device")


def under(key: str, pattern: str) -> bool:
    """Whether dotted ``key`` is ``pattern`` or lies in the table ``pattern`` (a trailing ``.`` is optional)."""
    table = pattern.rstrip(".")
    return key == table or key.startswith(table + ".")


def matches_any(key: str, patterns: Iterable[str]) -> bool:
    return any(under(key, p) for p in patterns)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Return ``{"a.b.c": value}`` for nested tables; an empty table and a list stay values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


class Change(NamedTuple):
    """One key whose value differs between two recipes (:data:`ABSENT` where a recipe lacks it)."""

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        show = lambda v: ABSENT if v is ABSENT else repr(v)  # noqa: E731
        return f"{self.key}: {show(self.old)} -> {show(self.new)}"


def recipe_diff(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[Change]:
    """Return the keys on which two (nested) recipes differ, sorted, except those under ``ignore``."""
    ignore = tuple(ignore)
    a, b = flatten(old), flatten(new)
    return [Change(key, a.get(key, ABSENT), b.get(key, ABSENT)) for key in sorted(set(a) | set(b))
            if a.get(key, ABSENT) != b.get(key, ABSENT) and not matches_any(key, ignore)]
