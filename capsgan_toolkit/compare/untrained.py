"""The FID of an arm's generator untrained: the reference of the competence floor "FID below untrained".

A generator that learned anything makes images nearer the real ones than it made before its
first step. The reference is measured, not assumed: every part is built from the run's recipe
exactly as training starts it (:func:`~capsgan_toolkit.recipe.build.build` seeds every random
generator with ``run.seed`` first), no step is taken, and ``gen_fid`` is evaluated by the same
:class:`~capsgan_toolkit.evaluation.evaluator.Evaluator` with the ``[eval]`` table the run's
``eval.json`` was computed with (same feature extractors, image counts, split and seeds). The
evaluator does what it does for a trained run: an objective that samples from a prior fitted
on the encoder's latents (``reconstruction_gan``) fits it on the *untrained* encoder's latents of
``eval.prior_images`` training images; a noise-driven one (``dcgan``) draws its own noise.

Measured once per protocol, not per seed: the runs of a comparison that share the recipe minus
:data:`KEY_IGNORED` (training-only keys, the seed and the run's name) and the ``[eval]``
protocol (minus :data:`~capsgan_toolkit.compare.collect.PROTOCOL_IGNORED` and ``metrics``)
share one measurement, made with the lowest seed among them, and the result is kept in
``untrained_fid.json`` of the comparison folder, so a re-run of the report reuses it. A
measurement that fails (the data or the extractor's weights are not on this machine) is not
kept: its runs read "not checked", with the reason, and the next report tries again.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsgan_toolkit import __version__, catalogue
from capsgan_toolkit.compare.collect import PROTOCOL_IGNORED, RunRecord
from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.recipe.diff import flatten, matches_any
from capsgan_toolkit.rundir import writes

CACHE_FILE = "untrained_fid.json"
"""Where the measurements are kept, in the comparison folder."""
SCHEMA = 1

KEY_IGNORED: tuple[str, ...] = (
    "run.name", "run.seed", "run.epochs", "run.device", "run.threads", "run.steps_per_epoch", "run.log_every",
    "run.eval_batches", "run.running_momentum", "run.max_steps", "run.max_minutes", "run.on_nan", "run.divergence",
    "data.batch_size", "data.num_workers",
    "losses", "optim", "gate", "checkpoint", "output", "eval", "ema", "speed", "trained",
)
"""Recipe keys that do not change an untrained generator's images: how long and how it is trained, where,
what is logged, the seed (one measurement serves every seed of an arm). ``[augment]`` is ignored too, except
``augment.crop`` (every split is then the centre crop). Every other key, a new table included, is kept."""
EVAL_IGNORED = (*PROTOCOL_IGNORED, "metrics")
"""``[eval]`` keys left out of the key: incidental ones, and the metric list (only ``gen_fid`` is measured)."""

Measure = Callable[[dict[str, Any], dict[str, Any], str, Any], dict[str, Any]]


def fid_keys(rec: RunRecord) -> list[str]:
    """The run's ``gen_fid`` result keys (``gen_fid1k_test_domain``, ...)."""
    return [n for n in rec.quality() if (p := catalogue.parse(n)) is not None and p.key.stem == "gen_fid"]


def key_of(recipe: dict[str, Any], eval_table: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Return (cache key, what it is made of): the recipe minus :data:`KEY_IGNORED`, the protocol, the version."""
    kept = {k: v for k, v in flatten(recipe).items()
            if not matches_any(k, KEY_IGNORED) and not (k.startswith("augment.") and k != "augment.crop")}
    kept.pop("augment", None)  # an empty [augment] table
    proto = {k: v for k, v in eval_table.items() if k not in EVAL_IGNORED}
    what = {"recipe": kept, "eval": proto, "toolkit_version": __version__}
    text = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16], what


@contextlib.contextmanager
def _kept_state() -> Iterator[None]:
    """Keep the caller's random generators and torch thread count: building seeds and may set both."""
    import numpy as np
    import torch

    py, npy, threads = random.getstate(), np.random.get_state(), torch.get_num_threads()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_num_threads(threads)


def measure(recipe: dict[str, Any], eval_table: dict[str, Any], source: str, log=None) -> dict[str, Any]:
    """Build every part of ``recipe`` untrained and evaluate ``gen_fid`` with ``eval_table``.

    Returns ``{"fid": {result key: value}, "skipped": {name: why}, "extractors": {label: description},
    "device", "seconds"}``. ``log`` is the evaluator's progress (``None``: quiet).

    Raises:
        CapsganError, OSError, ValueError, ...: the recipe, the data or an extractor could not be built.
    """
    from capsgan_toolkit.evaluation.evaluator import Evaluator
    from capsgan_toolkit.plugin.manager import load_plugins
    from capsgan_toolkit.recipe.build import build, pick_device
    from capsgan_toolkit.recipe.schema import resolve

    start = time.perf_counter()
    data = copy.deepcopy(recipe)
    data["eval"] = {**copy.deepcopy(eval_table), "metrics": ["gen_fid"]}
    data.pop("trained", None)
    plugins = load_plugins(list((data.get("run") or {}).get("plugins") or []), received_from=source)
    resolved = resolve(data, plugins.registry, source=source, training=False)
    try:
        device = pick_device(resolved.recipe.run.device)
    except CapsganError:  # the run's device is not on this machine: the reference needs no speed
        import torch

        device = torch.device("cpu")
    with _kept_state():
        built = build(resolved, plugins, check=False)  # seeded with run.seed: the weights training starts from
        for module in built.modules().values():
            module.to(device).eval()
        report = Evaluator(resolved, plugins.registry, objective=built.objective, dataset=built.dataset,
                           device=device, progress=log).run(["gen_fid"])
    return {"fid": {k: v for k, v in report.metrics.items()
                    if (p := catalogue.parse(k)) is not None and p.key.stem == "gen_fid"},
            "skipped": dict(report.skipped), "extractors": dict(report.extractors), "device": str(device),
            "seconds": round(time.perf_counter() - start, 2)}


@dataclass
class Reference:
    """One run's untrained reference: FID by result key, or why there is none."""

    fid: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    seed: int | None = None  # the seed the untrained parts were built with
    key: str | None = None  # the cache key
    reused: bool = False  # read from untrained_fid.json, not measured by this report
    problem: str | None = None

    def why_missing(self, name: str) -> str:
        """Why this reference has no value for result key ``name``."""
        if self.problem:
            return self.problem
        parsed = catalogue.parse(name)
        label = parsed.label if parsed is not None else None
        reason = next((why for what, why in self.skipped.items() if what in ("gen_fid", f"gen_fid@{label}")), None)
        return f"the untrained generator gave no {name}" + (f" ({reason})" if reason else "")


def _read_cache(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
    writes.write_json(path, {"schema": SCHEMA, "entries": entries}, default=str)


def references(arms: dict[str, list[RunRecord]], cache_dir: Path | None = None, log=None,
               measure_fn: Measure | None = None) -> dict[tuple[str, int], Reference]:
    """Return the untrained reference of every run that reports a ``gen_fid``, measuring each protocol once.

    ``cache_dir``: the comparison folder; its ``untrained_fid.json`` is read, and written when a
    measurement is added (``None``: nothing kept beyond this call). ``log(text)``: progress lines.
    ``measure_fn``: the measurement (default :func:`measure`; tests pass a stand-in).
    """
    measure_fn = measure_fn or measure
    path = Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
    entries = _read_cache(path)
    groups: dict[str, list[tuple[str, RunRecord]]] = {}
    out: dict[tuple[str, int], Reference] = {}
    for arm, runs in arms.items():
        for rec in runs:
            if not fid_keys(rec):
                continue
            table = (rec.eval or {}).get("eval")
            if not isinstance(table, dict):
                out[arm, rec.seed] = Reference(problem="eval.json records no [eval] protocol to measure the untrained "
                                                       "generator with; re-evaluate the run")
                continue
            key, _ = key_of(rec.recipe, table)
            groups.setdefault(key, []).append((arm, rec))
    for key, members in groups.items():
        arm, first = min(members, key=lambda m: m[1].seed)
        table = (first.eval or {})["eval"]
        entry, reused, problem = entries.get(key), True, None
        if not isinstance(entry, dict) or not isinstance(entry.get("fid"), dict):
            reused, entry = False, None
            if log is not None:
                log(f"Measuring the FID of {arm}'s generator untrained (seed {first.seed}), once for this protocol")
            try:
                result = measure_fn(first.recipe, table, str(first.path / "recipe.toml"), log)
            except (CapsganError, OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as exc:
                problem = (f"the untrained generator's FID could not be measured from {first.path / 'recipe.toml'} "
                           f"({type(exc).__name__}: {exc})")
            else:
                _, what = key_of(first.recipe, table)
                entry = {**result, "seed": first.seed, "measured_from": str(first.path),
                         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "key": what}
                entries[key] = entry
                if path is not None:
                    _write_cache(path, entries)
        for member_arm, rec in members:
            if entry is None:
                out[member_arm, rec.seed] = Reference(key=key, problem=problem)
            else:
                out[member_arm, rec.seed] = Reference(
                    fid={k: float(v) for k, v in entry["fid"].items()}, skipped=dict(entry.get("skipped") or {}),
                    seed=entry.get("seed"), key=key, reused=reused)
    return out
