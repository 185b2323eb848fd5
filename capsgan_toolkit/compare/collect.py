"""Read finished run folders into records: numbers with their protocols, curves, pictures.

Numbers come from two files of a run folder:

- ``eval.json`` (``capsgan eval`` / the comparison's evaluation): the quality metrics,
  each with its protocol record;
- ``summary.json`` (written when training ends): the trainer's end-of-training test numbers
  (``test_*``) and the costs: parameters per part, FLOPs per image per part (when the
  trainer recorded them), training images/s, seconds per epoch, peak memory, wall time, device;
- ``probe.json`` (``capsgan probe``, when present): the spatial-structure probe's rows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsgan_toolkit.catalogue import COST_KEYS
from capsgan_toolkit.compare.spec import CompareError
from capsgan_toolkit.rundir.folder import RunDir

PROTOCOL_IGNORED = ("every_epochs", "cache_dir", "batch_size")
"""``[eval]`` keys that do not change what a number means (when, where cached, batching)."""

COST_PROTOCOL = {stem: key.quantity for stem, key in COST_KEYS.items()}
"""Cost row stem -> how it was measured (from the metric catalogue)."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class RunRecord:
    """One finished, evaluated run of one arm."""

    rundir: RunDir
    arm: str
    seed: int
    recipe: dict[str, Any]
    summary: dict[str, Any]
    eval: dict[str, Any] | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    probe: dict[str, Any] | None = None  # probe.json, when the run was probed

    @property
    def path(self) -> Path:
        return self.rundir.path

    def quality(self) -> dict[str, float]:
        """Quality numbers: eval.json's metrics, and the trainer's end-of-training ``test_*`` numbers."""
        out: dict[str, float] = {}
        for name, value in ((self.eval or {}).get("metrics") or {}).items():
            if (number := _number(value)) is not None:
                out[name] = number
        for name, value in self.summary.items():
            if name.startswith("test_") and (number := _number(value)) is not None and name not in out:
                out[name] = number
        return out

    def protocol(self, name: str) -> dict[str, Any]:
        """Return the protocol record of a quality number."""
        record = ((self.eval or {}).get("protocol") or {}).get(name)
        if record is not None:
            return dict(record)
        if name in self.summary:
            return {"source": "summary.json", "images": "test split at the end of training (the trainer's "
                    "end-of-epoch evaluation, run.eval_batches batches)", "epochs": self.summary.get("epochs")}
        return {}

    def costs(self) -> dict[str, float]:
        """Cost numbers from summary.json, by name (``parameters.encoder``, ``flops_per_image.total``, ...)."""
        s = self.summary
        out: dict[str, float] = {}
        for name in ("images_per_s", "train_time_s", "peak_memory_bytes"):
            if (number := _number(s.get(name))) is not None:
                out[name] = number
        epochs = _number(s.get("epochs"))
        per_epoch, train_time = _number(s.get("seconds_per_epoch")), _number(s.get("train_time_s"))
        if per_epoch is not None:
            out["seconds_per_epoch"] = per_epoch
        elif train_time is not None and epochs:
            out["seconds_per_epoch"] = train_time / epochs
        for table in ("parameters", "flops_per_image"):
            parts = s.get(table)
            if isinstance(parts, dict):
                numbers = {k: number for k, v in parts.items() if (number := _number(v)) is not None}
                for part, value in numbers.items():
                    out[f"{table}.{part}"] = value
                if numbers and "total" not in numbers:
                    out[f"{table}.total"] = sum(numbers.values())
        return out

    @property
    def device(self) -> str:
        return str(self.summary.get("device", "?"))

    def eval_protocol(self) -> dict[str, Any] | None:
        """Return the ``[eval]`` table the numbers were computed with, minus incidental keys."""
        table = (self.eval or {}).get("eval")
        if not isinstance(table, dict):
            return None
        return {k: v for k, v in table.items() if k not in PROTOCOL_IGNORED}

    def last_sample(self) -> Path | None:
        files = self.rundir.sample_files()
        return files[-1] if files else None


def read_run(path: str | Path, *, arm: str | None = None, require_eval: bool = True) -> RunRecord:
    """Read one run folder.

    Raises:
        CompareError: not a run folder, not finished, or not evaluated (``require_eval``).
    """
    rd = RunDir(path)
    if not rd.is_run():
        raise CompareError(f"{rd.path} is not a run folder (no recipe.toml).")
    summary = rd.read_summary()
    if not rd.is_finished() or summary is None:
        raise CompareError(f"{rd.path} has not finished training (no summary.json or final checkpoint). "
                           f"Finish it with `capsgan run --resume {rd.path}`.")
    evaluation = rd.read_eval()
    if require_eval and evaluation is None:
        raise CompareError(f"{rd.path} has not been evaluated (no eval.json). Evaluate it with "
                           f"`capsgan eval {rd.path}` (the same options for every run), then compare again.")
    recipe = rd.read_recipe()
    seed = int(recipe.get("run", {}).get("seed", 0))
    return RunRecord(rundir=rd, arm=arm or str(recipe.get("run", {}).get("name", rd.path.name)), seed=seed,
                     recipe=recipe, summary=summary, eval=evaluation, rows=rd.read_metrics(), probe=read_probe(rd))


def read_probe(rd: RunDir) -> dict[str, Any] | None:
    """Return a run folder's probe.json (``capsgan probe``), or ``None`` when it has none or it is unreadable."""
    try:
        data = json.loads(rd.probe_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("rows"), list) else None


def trained(record: RunRecord) -> dict[str, Any]:
    """What the run's training did, from summary.json: optimizer ``steps`` and training ``images`` seen.

    ``images`` is summary.json's ``images`` (or ``images_seen``) when it has one, else steps x
    ``data.batch_size`` of the run's recipe.
    """
    s = record.summary
    out: dict[str, Any] = {}
    steps = s.get("steps")
    if isinstance(steps, int) and not isinstance(steps, bool):
        out["steps"] = steps
    images = next((s[k] for k in ("images", "images_seen") if isinstance(s.get(k), int)), None)
    batch = (record.recipe.get("data") or {}).get("batch_size")
    if images is None and "steps" in out and isinstance(batch, int):
        images = out["steps"] * batch
    if images is not None:
        out["images"] = images
    return out


def fairness_recipe(record: RunRecord) -> dict[str, Any]:
    """The recipe the fairness check compares: the run's, with ``[eval]`` replaced by the protocol used, and a
    ``trained`` table of the steps and images its training did (:func:`trained`)."""
    recipe = dict(record.recipe)
    table = (record.eval or {}).get("eval")
    if isinstance(table, dict):
        recipe["eval"] = table
    done = trained(record)
    if done:
        recipe["trained"] = done
    return recipe


def protocol_differences(records: list[RunRecord]) -> list[str]:
    """Return ``key: run=value, ...`` lines for each ``[eval]`` key the runs were evaluated with differently."""
    from capsgan_toolkit.compare.fairness import show
    from capsgan_toolkit.recipe.diff import flatten

    tables = {}
    for rec in records:
        proto = rec.eval_protocol()
        tables[str(rec.path)] = flatten(proto) if proto is not None else None
    missing = [p for p, t in tables.items() if t is None]
    lines = [f"{p}: eval.json records no protocol ([eval] table); re-evaluate it" for p in missing]
    present = {p: t for p, t in tables.items() if t is not None}
    keys = sorted({k for t in present.values() for k in t})
    for key in keys:
        values = {p: show(t.get(key, "(absent)")) for p, t in present.items()}
        if len(set(values.values())) > 1:
            lines.append(f"eval.{key}: " + ", ".join(f"{p}={v}" for p, v in values.items()))
    return lines
