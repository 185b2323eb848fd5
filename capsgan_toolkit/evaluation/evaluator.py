"""Evaluate a trained model through its objective: classification, reconstructions, new images.

What is measured (``eval.metrics``) and on how many images (``eval.num_images``) comes
from the recipe's ``[eval]`` table; each number is stored under a name that states its
protocol (``gen_fid1k_test_domain``: FID of 1000 generated images against 1000 test
images, domain-classifier features) and with a protocol record (extractor and its
weights' hash, image counts, split, seeds). Names, units and directions come from
:mod:`capsgan_toolkit.catalogue`; see docs/metrics.md.

The :class:`Evaluator` knows no algorithm: it asks the objective (``classify``,
``reconstruct``, ``prepare_generation`` and ``generate``) and puts what the objective
cannot give under ``skipped`` with the reason. It serves ``capsgan eval`` (a run
folder's checkpoint) and periodic evaluation during training (the live models), and
never touches the caller's random state, so a run evaluated every epoch trains exactly
as one that is not.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Subset

from capsgan_toolkit.catalogue import (
    CATALOGUE,
    FEATURE_METRICS,
    KID_SUBSETS,
    EvalSection,
    Metric,
    is_splits,
    kid_subset_size,
    missing_capability,
    result_key,
)
from capsgan_toolkit.data import batch_loader
from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.evaluation.prior import ClassGaussianPrior, encode_for_prior
from capsgan_toolkit.evaluation.scores import (
    cache_root,
    conditional_accuracy,
    fidelity_scores,
    fork_rng,
    psnr,
    recon_mse01,
    ssim,
    to_fidelity_images,
)
from capsgan_toolkit.interfaces import FeatureExtractor, FeatureSetup
from capsgan_toolkit.plugin.registry import Registry
from capsgan_toolkit.progress import Progress, as_progress, progress_task
from capsgan_toolkit.recipe.build import create
from capsgan_toolkit.recipe.schema import ResolvedRecipe


@dataclass
class EvalReport:
    """Numbers by result key, each with its protocol; requested metrics that could not run, with why."""

    metrics: dict[str, float] = field(default_factory=dict)
    protocol: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    extractors: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, value: float, **protocol: Any) -> None:
        self.metrics[name] = float(value)
        self.protocol[name] = protocol

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "protocol": self.protocol, "skipped": self.skipped,
                "extractors": self.extractors}


def data_id(resolved: ResolvedRecipe) -> str:
    """Identify the data set's content: its plugin and params, minus batching and workers, plus ``augment.crop``
    (every split is then the centre crop)."""
    table = {k: v for k, v in resolved.to_dict()["data"].items() if k not in ("batch_size", "num_workers")}
    if resolved.recipe.augment is not None and resolved.recipe.augment.crop:
        table["augment.crop"] = resolved.recipe.augment.crop
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()[:16]


def build_extractors(resolved: ResolvedRecipe, registry: Registry, info) -> dict[str, FeatureExtractor]:
    """Build the recipe's ``eval.features`` extractors, by label (through the registry, as every component)."""
    return {label: create(registry, resolved, f"eval.features.{label}", info=info)
            for label in resolved.recipe.eval.features}


def preflight(resolved: ResolvedRecipe, registry: Registry, info) -> None:
    """Fail now, not after training, if a requested feature extractor cannot run (weights missing offline)."""
    if not any(m in FEATURE_METRICS for m in resolved.recipe.eval.metrics):
        return
    for extractor in build_extractors(resolved, registry, info).values():
        extractor.check()


def _batches(dataset, indices: torch.Tensor, batch_size: int):
    return batch_loader(Subset(dataset, indices.tolist()), batch_size=batch_size)


def fit_prior(encoder, data, *, limit: int, seed: int, batch_size: int, device: torch.device,
              num_classes: int | None = None, progress=None) -> ClassGaussianPrior:
    """Fit the per-class Gaussian latent prior on (up to ``limit``, 0: all) training images.

    ``data`` is the training split, or a data set plugin (its ``train`` split is used).
    ``num_classes`` defaults to the data set's, else the encoder's. ``progress`` (a
    :class:`~capsgan_toolkit.progress.Progress` or a ``log(text)`` callable) shows the encoding.
    The objective's ``prepare_generation`` calls this for ``reconstruction_gan``.
    """
    split = data.split("train") if hasattr(data, "split") and hasattr(data, "info") else data
    if num_classes is None:
        num_classes = data.info.num_classes if hasattr(data, "info") else encoder.num_classes
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed + 1))
    order = order[:limit] if limit else order
    loader = _batches(split, order, batch_size)
    with progress_task(progress, f"Fitting the latent prior on {len(order)} training images", len(loader)) as advance:
        def counted():
            for batch in loader:
                yield batch
                advance(1)

        vectors, classes, mode = encode_for_prior(encoder, counted(), device=device)
    return ClassGaussianPrior.fit(vectors, classes, num_classes=num_classes, capsule_dim=encoder.capsule_dim,
                                  mode=mode)


def objective_name(objective, resolved: ResolvedRecipe | None = None) -> str:
    """The objective's plugin name, for messages: its ``name``, else the recipe's ``objective.plugin``."""
    name = getattr(objective, "name", None)
    if not name and resolved is not None:
        name = getattr(getattr(resolved.recipe, "objective", None), "plugin", None)
    return name or type(objective).__name__


def prepare_generation(objective, train_split, ev: EvalSection, *, device: torch.device, progress=None,
                       name: str | None = None) -> None:
    """Call ``objective.prepare_generation`` with the ``[eval]`` table's prior images, seed and batch size.

    ``eval.prior``, ``eval.prior_components`` and ``eval.prior_temperature`` (the latent prior chosen at
    evaluation) go along only when set: an objective whose ``prepare_generation`` does not take them still works where they are
    unset, and where they are set it is told so by name. ``capsgan eval``, periodic evaluation and
    ``capsgan sample`` all prepare through here.
    """
    chosen = {key: value for key, value in (("prior", ev.prior), ("prior_components", ev.prior_components),
                                            ("prior_temperature", ev.prior_temperature))
              if value is not None}
    if chosen:
        params = inspect.signature(objective.prepare_generation).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) and not set(chosen) <= set(params):
            raise CapsganError(
                f"eval.prior is {ev.prior!r}, but the {name or objective_name(objective)} objective's "
                "prepare_generation takes no prior argument: it cannot draw new images from another prior. "
                "Remove eval.prior (and eval.prior_components, eval.prior_temperature).")
    objective.prepare_generation(train_split, limit=ev.prior_images, seed=ev.seed, batch_size=ev.batch_size,
                                 device=device, progress=progress, **chosen)


_SCORE_TEXT = {
    "fid": lambda n_gen, n_ref: "fid",
    "kid": lambda n_gen, n_ref: (f"kid (cubic polynomial kernel, {KID_SUBSETS} subsets of "
                                 f"{kid_subset_size(n_gen, n_ref)} images)"),
    "is": lambda n_gen, n_ref: f"inception-style score ({is_splits(n_gen)} splits)",
    "precision": lambda n_gen, n_ref: "precision (k=3)",
    "recall": lambda n_gen, n_ref: "recall (k=3)",
}


class Evaluator:
    """Compute the recipe's metrics for whatever the objective can do.

    Args:
        resolved: the run's recipe (its ``[eval]`` table says what to compute).
        registry: the registry holding the ``metric_features`` components.
        objective: the trained objective (``modules``, ``has_classifier`` /
            ``has_reconstruction`` / ``has_generation``, ``classify``, ``reconstruct``,
            ``prepare_generation``, ``generate``; optionally ``conditional``,
            ``fitted_classes`` and ``generation_description``).
        dataset: the built data set.
        device: where to run.
        progress: ``None`` (quiet), a rich Console (progress bars with time left), a
            ``log(text)`` callable (lines only) or a :class:`~capsgan_toolkit.progress.Progress`.
    """

    def __init__(self, resolved: ResolvedRecipe, registry: Registry, *, objective, dataset, device: torch.device,
                 progress=None):
        self.resolved = resolved
        self.ev = resolved.recipe.eval
        self.objective, self.dataset, self.device = objective, dataset, device
        self.name = objective_name(objective, resolved)
        self.progress: Progress = as_progress(progress)
        self.extractors = build_extractors(resolved, registry, dataset.info)
        self.cache_dir = cache_root(self.ev.cache_dir)
        self.data_id = data_id(resolved)
        self._setups: dict[str, FeatureSetup] = {}

    def setup(self, label: str) -> FeatureSetup:
        """Prepare extractor ``label`` once (a domain classifier is trained or loaded from the cache)."""
        if label not in self._setups:
            self._setups[label] = self.extractors[label].prepare(
                self.dataset, data_id=self.data_id, cache_dir=self.cache_dir, device=self.device, log=self.progress)
        return self._setups[label]

    def run(self, metrics: list[str] | None = None, num_images: int | None = None) -> EvalReport:
        """Compute ``metrics`` (default: the recipe's) on ``num_images`` images (default: the recipe's)."""
        metrics = list(self.ev.metrics if metrics is None else metrics)
        unknown = [m for m in metrics if m not in CATALOGUE]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {', '.join(CATALOGUE)}")
        n = num_images or self.ev.num_images
        modules = self.objective.modules()
        modes = {name: m.training for name, m in modules.items()}
        for m in modules.values():
            m.eval()
        try:
            with fork_rng(self.device), torch.no_grad():
                return self._run([CATALOGUE[m] for m in metrics], n)
        finally:
            for name, m in modules.items():
                m.train(modes[name])

    # ------------------------------------------------------------------ the parts

    def _run(self, entries: list[Metric], n: int) -> EvalReport:
        report = EvalReport()
        ev, split_name = self.ev, self.ev.reference_split
        possible = []
        for entry in entries:
            why = missing_capability(entry, self.objective, self.name)
            if why is None:
                possible.append(entry)
            else:
                report.skipped[entry.name] = why
        if any(e.feature_extractor for e in possible):
            for label in self.extractors:
                report.extractors[label] = self.setup(label).description
        if any(e.name == "acc" for e in possible):
            self._accuracy(report)
        rec = [e for e in possible if e.needs == "reconstruction"]
        gen = [e for e in possible if e.needs == "generation"]
        if not rec and not gen:
            return report

        split = self.dataset.split(split_name)
        n_ref = min(n, len(split))
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(ev.seed))[:n_ref]
        batches = list(_batches(split, order, ev.batch_size))
        real = torch.cat([images for images, _ in batches])
        real_labels = torch.cat([torch.as_tensor(labels).long() for _, labels in batches])
        real_u8 = to_fidelity_images(real)
        base = {"reference_split": split_name, "num_reference": n_ref, "reference_seed": ev.seed,
                "image_format": "uint8 RGB (grayscale replicated)"}

        if rec:
            recon = self._batched(real, self.objective.reconstruct, f"Reconstructing {n_ref} {split_name} images")
            info = {**base, "images": f"reconstructions of {n_ref} {split_name} images (the {self.name} objective)",
                    "num_generated": n_ref, "pixels": "[0, 1]"}
            if any(e.name == "rec" for e in rec):
                entry = CATALOGUE["rec"]
                library = f"torchmetrics {importlib.metadata.version('torchmetrics')}"
                for stem, values, text in (
                        ("rec_mse", recon_mse01(recon, real), "mse (mean over pixels and images, float64)"),
                        ("rec_psnr", psnr(recon, real), f"psnr_db (mean over images; {library}, float64)"),
                        ("rec_ssim", ssim(recon, real),
                         f"ssim (gaussian 11x11, sigma 1.5, valid region; {library}, float32)")):
                    self._add(report, entry, result_key(stem, count=n_ref, split=split_name), values.mean(),
                              {**info, "metric": text})
            recon_u8 = to_fidelity_images(recon)
            self._scores(report, [e for e in rec if e.fidelity_flag], recon_u8, real_u8, n_ref, info,
                         "reconstructions")

        if gen:
            prepare_generation(self.objective, self.dataset.split("train"), ev, device=self.device,
                               progress=self.progress, name=self.name)
            fitted = getattr(self.objective, "fitted_classes", None) or range(self.dataset.info.num_classes)
            fitted = torch.as_tensor(list(fitted), dtype=torch.long)
            classes = fitted[torch.arange(n) % len(fitted)]
            sampler = torch.Generator().manual_seed(ev.seed + 2)
            fake = self._batched(classes, lambda c: self.objective.generate(c, sampler), f"Generating {n} new images")
            fake_u8 = to_fidelity_images(fake)
            how = getattr(self.objective, "generation_description", None)
            conditional = getattr(self.objective, "conditional", True)
            info = {**base, "num_generated": n, "sample_seed": ev.seed + 2,
                    "images": f"new images of the {self.name} objective" + (f" ({how})" if how else "")
                              + (", classes balanced" if conditional else ", unconditional")}
            self._scores(report, [e for e in gen if e.fidelity_flag], fake_u8, real_u8, n, info, "new images")
            if any(e.name == "gen_condacc" for e in gen):
                self._judged(report, "gen_condacc", fake_u8, classes,
                             lambda label: result_key("gen_condacc", count=n, label=label),
                             {**info, "metric": "class-conditional accuracy"})
        if any(e.name == "rec_acc" for e in rec):  # after gen_condacc: the ceiling it is read against
            self._judged(report, "rec_acc", recon_u8, real_labels,
                         lambda label: result_key("rec_acc", count=n_ref, split=split_name, label=label),
                         {**base, "images": f"reconstructions of {n_ref} {split_name} images (the {self.name} "
                                            "objective), judged against the real images' labels",
                          "metric": "accuracy (argmax of the extractor's class logits, true labels)"})
        return report

    @staticmethod
    def _add(report: EvalReport, entry: Metric, key: str, value, info: dict[str, Any]) -> None:
        """Add a number with exactly the protocol fields its catalogue entry names."""
        report.add(key, float(value), **{f: info[f] for f in entry.protocol})

    def _batched(self, inputs: torch.Tensor, fn, description: str) -> torch.Tensor:
        out = []
        size = self.ev.batch_size
        with self.progress.task(description, inputs.shape[0]) as advance:
            for start in range(0, inputs.shape[0], size):
                chunk = inputs[start:start + size]
                out.append(fn(chunk.to(self.device) if chunk.is_floating_point() else chunk).float().cpu())
                advance(chunk.shape[0])
        return torch.cat(out)

    def _accuracy(self, report: EvalReport) -> None:
        split = self.dataset.split("test")
        correct = 0
        loader = batch_loader(split, batch_size=self.ev.batch_size)
        for images, labels in self.progress.track(loader, f"Classifying the test split ({len(split)} images)"):
            scores = self.objective.classify(images.to(self.device))
            correct += (scores.argmax(1).cpu() == torch.as_tensor(labels)).sum().item()
        self._add(report, CATALOGUE["acc"], result_key("acc", count=len(split)), correct / max(len(split), 1),
                  {"metric": f"accuracy (argmax of the {self.name} objective's class scores)",
                   "images": f"the whole test split ({len(split)})"})

    def _scores(self, report: EvalReport, entries: list[Metric], images: torch.Tensor, real_u8: torch.Tensor,
                count: int, info: dict[str, Any], what: str) -> None:
        if not entries:
            return
        n_gen, n_ref = images.shape[0], real_u8.shape[0]
        for label in self.extractors:
            setup = self.setup(label)
            usable = [e for e in entries if e.fidelity_flag in setup.metrics]
            for e in entries:
                if e not in usable:
                    report.skipped[f"{e.name}@{label}"] = ("needs class logits, which this extractor lacks"
                                                           if e.class_logits else "not supported by this extractor")
            if not usable:
                continue
            cache = f"capsgan-{self.data_id}-{self.ev.reference_split}-n{n_ref}-s{self.ev.seed}-{setup.identity}"
            values = fidelity_scores(images, real_u8, setup, {e.fidelity_flag for e in usable}, reference_cache=cache,
                                     cache_dir=self.cache_dir, device=self.device, seed=self.ev.seed,
                                     batch_size=self.ev.batch_size, progress=self.progress,
                                     description=f"Scoring {n_gen} {what} in {label} features")
            common = {**info, "feature_extractor": setup.description, "kid_subsets": KID_SUBSETS,
                      "kid_subset_size": kid_subset_size(n_gen, n_ref), "is_splits": is_splits(n_gen)}
            for e in usable:
                for rk in e.keys:
                    record = {**common, "metric": _SCORE_TEXT[rk.stem.split("_", 1)[1]](n_gen, n_ref)}
                    if rk.fidelity_std:
                        record["std"] = values[rk.fidelity_std]
                    self._add(report, e, result_key(rk.stem, count=count, split=self.ev.reference_split, label=label),
                              values[rk.fidelity_result], record)

    def _judged(self, report: EvalReport, name: str, images_u8: torch.Tensor, classes: torch.Tensor,
                key: Callable[[str], str], info: dict[str, Any]) -> None:
        """Add ``name`` (``gen_condacc``, ``rec_acc``) per extractor: how often its classifier says ``classes``.

        ``key(label)`` is the result key for the extractor labelled ``label``.
        """
        entry = CATALOGUE[name]
        for label in self.extractors:
            setup = self.setup(label)
            if setup.classifier is None:
                report.skipped[f"{name}@{label}"] = "needs a classifier over the data set's classes"
                continue
            self._add(report, entry, key(label), conditional_accuracy(setup.classifier, images_u8, classes),
                      {**info, "feature_extractor": setup.description})
