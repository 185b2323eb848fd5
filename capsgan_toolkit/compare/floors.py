"""Competence floors: did each arm learn anything at this budget, before it is compared?

A verdict between two arms that both failed to learn says nothing about either model. Each
run (arm x seed) is checked against floors the report states:

- **conditional generation above chance**: ``gen_condacc`` > 1/K + margin, K the data set's
  classes (a generator that ignores the class it is asked for scores 1/K);
- **encoder accuracy above chance**: ``acc`` (eval.json; else the trainer's ``test_acc``)
  > 1/K + margin;
- **reconstruction better than the mean image**: ``rec_mse`` below the MSE of predicting the
  reference split's mean image on the very images eval.json scored (same split, count and
  seed); the trainer's ``test_rec_mse01`` (when eval.json has no ``rec_mse``) is held to the
  mean image's MSE over the whole test split.

The margin above chance is :data:`CHANCE_MARGIN` (0.05) or :data:`CHANCE_SE` binomial standard
errors of a proportion at chance over the images it was measured on, whichever is larger:
3 x sqrt(p(1 - p) / n) keeps a run that guesses from passing by luck when few images are
scored (n = 32, K = 10: 0.159), 0.05 keeps "barely above chance" from counting as learning
when many are (n = 10,000: 0.009).

- **FID below the same generator untrained**: each ``gen_fid`` below the FID of the run's recipe's
  generator at initialisation (built with the seed, no training step), scored with the same
  ``[eval]`` protocol (:mod:`.untrained`: measured once per recipe and protocol, not per seed, and
  kept in the comparison folder's ``untrained_fid.json``).

K and the mean image come from the data set, built from the run's (resolved) recipe's ``[data]``
(and ``[augment]`` crop) as training built it, once per data table. Where that fails (the
data are not on this machine) the floors that need it are "not checked", with the reason; so
is the FID floor where the untrained generator could not be measured.

An arm with any run under a floor "did not learn at this budget": its numbers stay in every
table, its contrasts get no verdict and leave the Holm family.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsgan_toolkit import catalogue
from capsgan_toolkit.compare import untrained
from capsgan_toolkit.compare.collect import RunRecord
from capsgan_toolkit.errors import CapsganError

CHANCE_MARGIN = 0.05
"""Least margin above chance (1/K) a proportion must clear."""
CHANCE_SE = 3.0
"""Binomial standard errors at chance a proportion must clear, when that is more than :data:`CHANCE_MARGIN`."""

RULES = {
    "gen_condacc": "conditional accuracy of new images above chance: > 1/K + max(0.05, 3 x sqrt((1/K)(1 - 1/K) / n)), "
                   "n the images it was measured on",
    "acc": "encoder accuracy above chance: > 1/K + max(0.05, 3 x sqrt((1/K)(1 - 1/K) / n)) (test_acc: n unknown, + 0.05)",
    "rec_mse": "reconstruction MSE below the MSE of predicting the reference split's mean image on the same images",
    "gen_fid": "FID of new images below the FID of the same recipe's generator untrained (built with the arm's lowest "
               "seed, no training step; for an encoder's prior, fitted on the untrained encoder's latents), scored "
               "with the same protocol (extractor, images, split, seeds); measured once per protocol, kept in "
               f"{untrained.CACHE_FILE}",
}
LOWER_IS_BETTER = ("rec_mse", "gen_fid")
"""Floors a run must stay under (the others it must clear)."""
DID_NOT_LEARN = "did not learn at this budget"


@dataclass
class DataReference:
    """What the floors need from a run's data: the number of classes and mean-image MSEs (by result key)."""

    num_classes: int | None = None
    mean_image_mse: dict[str, float] = field(default_factory=dict)
    problem: str | None = None  # why the data could not be read, when they could not
    untrained: untrained.Reference | None = None  # the FID of the generator untrained (runs with a gen_fid)


class _Data:
    """A data set built from a recipe's ``[data]`` table, with its split means cached."""

    def __init__(self, recipe: dict[str, Any], source: str):
        from capsgan_toolkit.plugin.manager import load_plugins
        from capsgan_toolkit.recipe.build import create
        from capsgan_toolkit.recipe.schema import resolve
        from capsgan_toolkit.step.augment import wrap_dataset

        extra = (recipe.get("run") or {}).get("plugins") or []
        plugins = load_plugins(list(extra), received_from=source)
        resolved = resolve(copy.deepcopy(recipe), plugins.registry, source=source, training=False)
        self.dataset = wrap_dataset(create(plugins, resolved, "data"), resolved.recipe.augment, source)
        self.num_classes = int(self.dataset.info.num_classes)
        self._splits: dict[str, Any] = {}

    def _images(self, split: str):
        """Every image of a split in [0, 1], float64 ``(N, C, H, W)`` (read once)."""
        import torch

        from capsgan_toolkit.data import batch_loader

        if split not in self._splits:
            part = self.dataset.split(split)  # type: ignore[arg-type]
            chunks = [images.double() for images, _ in batch_loader(part, batch_size=500)]
            self._splits[split] = ((torch.cat(chunks).clamp(-1, 1) + 1) / 2) if chunks else torch.zeros(0)
        return self._splits[split]

    def mean_image_mse(self, split: str, count: int | None, seed: int | None) -> float:
        """MSE (pixels in [0, 1]) of predicting the split's mean image, on the images evaluation scored.

        ``count`` and ``seed`` pick them as the evaluator does (the first ``count`` of a permutation
        seeded with ``seed``); ``None``: the whole split.
        """
        import torch

        images = self._images(split)
        if images.shape[0] == 0:
            raise ValueError(f"the {split} split is empty")
        mean = images.mean(dim=0, keepdim=True)
        if count is not None and seed is not None:
            n = min(int(count), images.shape[0])
            order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(int(seed)))[:n]
            images = images[order]
        return float((images - mean).pow(2).mean())


def _count(text: str | None) -> int | None:
    if not text:
        return None
    return int(text[:-1]) * 1000 if text.endswith("k") else int(text)


def _stem(key: str) -> str:
    parsed = catalogue.parse(key)
    return parsed.key.stem if parsed is not None else key


def references(arms: dict[str, list[RunRecord]], cache_dir: Path | None = None,
               log: Callable[[str], None] | None = None) -> dict[tuple[str, int], DataReference]:
    """Return each run's :class:`DataReference`, building each distinct data table once.

    The untrained generators' FIDs come from :func:`.untrained.references`, kept in ``cache_dir``
    (the comparison folder; ``None``: measured, not kept); ``log(text)`` shows that work.
    """
    built: dict[str, _Data | str] = {}
    out: dict[tuple[str, int], DataReference] = {}
    for arm, runs in arms.items():
        for rec in runs:
            key = json.dumps([rec.recipe.get("data"), rec.recipe.get("augment"),
                              (rec.recipe.get("run") or {}).get("plugins")], sort_keys=True, default=str)
            if key not in built:
                try:
                    built[key] = _Data(rec.recipe, str(rec.path / "recipe.toml"))
                except (CapsganError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
                    built[key] = f"the data set could not be built from {rec.path / 'recipe.toml'} ({exc})"
            data = built[key]
            if isinstance(data, str):
                out[arm, rec.seed] = DataReference(problem=data)
                continue
            ref = DataReference(num_classes=data.num_classes)
            try:
                for name in rec.quality():
                    if _stem(name) == "rec_mse":
                        proto = rec.protocol(name)
                        ref.mean_image_mse[name] = data.mean_image_mse(
                            str(proto.get("reference_split") or catalogue.parse(name).split or "test"),  # type: ignore[union-attr]
                            proto.get("num_reference") or _count(catalogue.parse(name).count),  # type: ignore[union-attr]
                            proto.get("reference_seed", 0))
                    elif name == catalogue.EPOCH_TEST_REC_MSE:
                        ref.mean_image_mse[name] = data.mean_image_mse("test", None, None)
            except (CapsganError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
                ref.problem = f"the data's mean image could not be computed ({exc})"
            out[arm, rec.seed] = ref
    for run, reference in untrained.references(arms, cache_dir, log).items():
        out[run].untrained = reference
    return out


def chance_floor(num_classes: int, images: int | None) -> tuple[float, float]:
    """Return (chance, floor) for a proportion over ``images`` images (``None``: unknown) with ``num_classes``."""
    chance = 1.0 / num_classes
    margin = CHANCE_MARGIN
    if images:
        margin = max(margin, CHANCE_SE * math.sqrt(chance * (1.0 - chance) / images))
    return chance, chance + margin


def _pick(names: list[str], stem: str, fallback: str) -> list[str]:
    found = [n for n in names if _stem(n) == stem]
    return found or ([fallback] if fallback in names else [])


def check_run(rec: RunRecord, ref: DataReference) -> list[dict[str, Any]]:
    """Check one run against every floor its numbers allow; one dict per check (``passed``: None = not checked)."""
    values = rec.quality()
    names = list(values)
    checks: list[dict[str, Any]] = []

    def add(floor: str, name: str, threshold: float | None, passed: bool | None, rule: str) -> None:
        checks.append({"seed": rec.seed, "floor": floor, "metric": name, "value": values[name],
                       "threshold": threshold, "passed": passed, "rule": rule})

    for floor, stem, fallback in (("gen_condacc", "gen_condacc", ""), ("acc", "acc", catalogue.EPOCH_TEST_ACC)):
        for name in _pick(names, stem, fallback):
            if ref.num_classes is None:
                add(floor, name, None, None, f"not checked: {ref.problem or 'number of classes unknown'}")
                continue
            proto = rec.protocol(name)
            parsed = catalogue.parse(name)
            images = proto.get("num_generated") if floor == "gen_condacc" else None
            images = images or (_count(parsed.count) if parsed is not None else None)
            chance, threshold = chance_floor(ref.num_classes, images if isinstance(images, int) else None)
            add(floor, name, threshold, values[name] > threshold,
                f"> chance {chance:.3g} + margin = {threshold:.3g}" + (f" ({images} images)" if images else ""))
    for name in _pick(names, "rec_mse", catalogue.EPOCH_TEST_REC_MSE):
        reference = ref.mean_image_mse.get(name)
        if reference is None:
            add("rec_mse", name, None, None, f"not checked: {ref.problem or 'no mean image for these images'}")
            continue
        add("rec_mse", name, reference, values[name] < reference, f"< mean image's MSE {reference:.4g}")
    for name in _pick(names, "gen_fid", ""):
        base = ref.untrained or untrained.Reference(problem="the untrained generator was not measured")
        if name not in base.fid:
            add("gen_fid", name, None, None, f"not checked: {base.why_missing(name)}")
            continue
        add("gen_fid", name, base.fid[name], values[name] < base.fid[name],
            f"< untrained generator's FID {base.fid[name]:.4g} (seed {base.seed})")
    return checks


def check(arms: dict[str, list[RunRecord]], refs: dict[tuple[str, int], DataReference] | None = None, *,
          cache_dir: Path | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Check every run; return compare.json's ``floors``: the rules, the data's numbers and each arm's status.

    An arm's status: "learned" (every check passed), "did not learn" (a run is under a floor) or
    "not checked" (no floor could be applied: no such metric measured, or the data unavailable).
    ``refs``: what :func:`references` would read (given: nothing is read or measured); ``cache_dir``
    and ``log`` go to it.
    """
    refs = references(arms, cache_dir, log) if refs is None else refs
    out: dict[str, Any] = {"rules": RULES, "margin": {"least": CHANCE_MARGIN, "standard_errors": CHANCE_SE},
                           "data": None, "untrained_fid": _untrained_table(arms, refs), "arms": {}}
    for arm, runs in arms.items():
        checks = [c for rec in runs for c in check_run(rec, refs.get((arm, rec.seed), DataReference(
            problem="no data reference")))]
        failed = [c for c in checks if c["passed"] is False]
        applied = [c for c in checks if c["passed"] is not None]
        status = "did not learn" if failed else ("learned" if applied else "not checked")
        out["arms"][arm] = {"status": status, "checks": checks,
                            "failed": [describe(c) for c in failed]}
    if refs:  # what the runs' data gave (one data set unless a data difference was allowed)
        classes = next((r.num_classes for r in refs.values() if r.num_classes), None)
        out["data"] = {"num_classes": classes, "chance": (1.0 / classes) if classes else None,
                       "mean_image_mse": {k: v for r in refs.values() for k, v in r.mean_image_mse.items()},
                       "problem": next((r.problem for r in refs.values() if r.problem), None)}
    return out


def _untrained_table(arms: dict[str, list[RunRecord]], refs: dict[tuple[str, int], DataReference]) -> dict:
    """compare.json's ``floors.untrained_fid``: per arm, the untrained reference its runs were held to."""
    out: dict[str, Any] = {}
    for arm, runs in arms.items():
        found = [r.untrained for rec in runs if (r := refs.get((arm, rec.seed))) is not None and r.untrained]
        if found:
            u = found[0]
            out[arm] = {"fid": u.fid, "seed": u.seed, "key": u.key, "reused": u.reused, "problem": u.problem}
    return out


def describe(c: dict[str, Any]) -> str:
    """One failed (or passed) check in words: ``seed 1: gen_condacc500_domain 0.102, needs > 0.15``."""
    op = "<" if c["floor"] in LOWER_IS_BETTER else ">"
    need = f"needs {op} {c['threshold']:.3g}" if c["threshold"] is not None else c["rule"]
    return f"seed {c['seed']}: {c['metric']} {c['value']:.3g}, {need}"


def excluded(floors: dict | None) -> set[str]:
    """Arms left out of verdicts: those that did not learn."""
    return {arm for arm, s in ((floors or {}).get("arms") or {}).items() if s["status"] == "did not learn"}
