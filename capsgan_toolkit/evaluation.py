"""Evaluate a trained model: encoder accuracy, reconstructions, and new images from a latent prior.

What is measured (``eval.metrics``) and on how many images (``eval.num_images``) comes
from the recipe's ``[eval]`` table; each number is stored under a name that states its
protocol (``gen_fid1k_test_domain``: FID of 1000 generated images against 1000 test
images, domain-classifier features) and with a protocol record (extractor and its
weights' hash, image counts, split, seeds). See docs/metrics.md.

The same :class:`Evaluator` serves ``capsgan eval`` (a run folder's checkpoint) and
periodic evaluation during training (the trainer's live models). It never touches the
caller's random state, so a run evaluated every epoch trains exactly as one that is not.
"""

from __future__ import annotations

import copy
import hashlib
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Subset

from capsgan_toolkit import checkpoint as ckpt
from capsgan_toolkit.build import Components, build_components, pick_device
from capsgan_toolkit.errors import CheckpointError, RecipeError, RunFolderError
from capsgan_toolkit.interfaces import FeatureExtractor, FeatureSetup
from capsgan_toolkit.metrics import (
    FIDELITY_FLAGS, cache_root, conditional_accuracy, count_tag, fidelity_scores, fork_rng, mse, psnr, ssim,
    to_fidelity_images,
)
from capsgan_toolkit.plugin_manager import PluginSet, load_plugins
from capsgan_toolkit.prior import ClassGaussianPrior, encode_for_prior
from capsgan_toolkit.recipe import ResolvedRecipe, apply_overrides, resolve
from capsgan_toolkit.registry import Registry

FEATURE_METRICS = ("rec_fid", "rec_kid", "gen_fid", "gen_kid", "gen_is", "gen_prc", "gen_condacc")
"""Metrics that need a feature extractor."""

_GEN_SCORES = {"gen_fid": "fid", "gen_kid": "kid", "gen_is": "is", "gen_prc": "prc"}
_REC_SCORES = {"rec_fid": "fid", "rec_kid": "kid"}
_TRAINER_EVALUATORS: "weakref.WeakKeyDictionary[Any, Evaluator]" = weakref.WeakKeyDictionary()


@dataclass
class EvalReport:
    """Numbers by name, each with its protocol; requested metrics that could not run, with why."""

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
    """Identify the data set's content: its plugin and params, minus batching and workers."""
    table = {k: v for k, v in resolved.to_dict()["data"].items() if k not in ("batch_size", "num_workers")}
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()[:16]


def build_extractors(resolved: ResolvedRecipe, registry: Registry, info) -> dict[str, FeatureExtractor]:
    """Build the recipe's ``eval.features`` extractors, by label."""
    weights = resolved.recipe.eval.inception_weights or None
    out = {}
    for label, spec in resolved.recipe.eval.features.items():
        comp = registry.get("metric_features", spec.plugin)
        out[label] = comp.cls(resolved.params[f"eval.features.{label}"], info=info, inception_weights=weights)
    return out


def preflight(resolved: ResolvedRecipe, registry: Registry, info) -> None:
    """Fail now, not after training, if a requested feature extractor cannot run (weights missing offline)."""
    if not any(m in FEATURE_METRICS for m in resolved.recipe.eval.metrics):
        return
    for extractor in build_extractors(resolved, registry, info).values():
        extractor.check()


def _batches(dataset, indices: torch.Tensor, batch_size: int):
    return DataLoader(Subset(dataset, indices.tolist()), batch_size=batch_size, shuffle=False)


def fit_prior(encoder, dataset, *, limit: int, seed: int, batch_size: int, device: torch.device) -> ClassGaussianPrior:
    """Fit the per-class Gaussian latent prior on (up to ``limit``, 0: all) training images."""
    split = dataset.split("train")
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed + 1))
    order = order[:limit] if limit else order
    vectors, classes, mode = encode_for_prior(encoder, _batches(split, order, batch_size), device=device)
    return ClassGaussianPrior.fit(vectors, classes, num_classes=dataset.info.num_classes,
                                  capsule_dim=encoder.capsule_dim, mode=mode)


class Evaluator:
    """Compute the recipe's metrics for an encoder and generator.

    Args:
        resolved: the run's recipe (its ``[eval]`` table says what to compute).
        registry: the registry holding the ``metric_features`` components.
        dataset, encoder, generator: the built (and loaded) components.
        device: where to run.
        log: receives progress lines for people (``None``: quiet).
    """

    def __init__(self, resolved: ResolvedRecipe, registry: Registry, *, dataset, encoder, generator,
                 device: torch.device, log: Callable[[str], None] | None = None):
        self.resolved = resolved
        self.ev = resolved.recipe.eval
        self.dataset, self.encoder, self.generator = dataset, encoder, generator
        self.device = device
        self.log = log
        self.extractors = build_extractors(resolved, registry, dataset.info)
        self.cache_dir = cache_root(self.ev.cache_dir)
        self.data_id = data_id(resolved)
        self._setups: dict[str, FeatureSetup] = {}

    def setup(self, label: str) -> FeatureSetup:
        """Prepare extractor ``label`` once (a domain classifier is trained or loaded from the cache)."""
        if label not in self._setups:
            self._setups[label] = self.extractors[label].prepare(
                self.dataset, data_id=self.data_id, cache_dir=self.cache_dir, device=self.device, log=self.log)
        return self._setups[label]

    def run(self, metrics: list[str] | None = None, num_images: int | None = None) -> EvalReport:
        """Compute ``metrics`` (default: the recipe's) on ``num_images`` images (default: the recipe's)."""
        metrics = list(self.ev.metrics if metrics is None else metrics)
        n = num_images or self.ev.num_images
        modes = (self.encoder.training, self.generator.training)
        self.encoder.eval(), self.generator.eval()
        try:
            with fork_rng(self.device), torch.no_grad():
                return self._run(metrics, n)
        finally:
            self.encoder.train(modes[0]), self.generator.train(modes[1])

    # ------------------------------------------------------------------ the parts

    def _run(self, metrics: list[str], n: int) -> EvalReport:
        report = EvalReport()
        ev, split_name = self.ev, self.ev.reference_split
        wanted_labels = list(self.extractors) if any(m in FEATURE_METRICS for m in metrics) else []
        for label in wanted_labels:
            report.extractors[label] = self.setup(label).description
        if "acc" in metrics:
            self._accuracy(report)
        split = self.dataset.split(split_name)
        n_ref = min(n, len(split))
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(ev.seed))[:n_ref]
        reference = []
        for images, _ in _batches(split, order, ev.batch_size):
            reference.append(images)
        real = torch.cat(reference)
        real_u8 = to_fidelity_images(real)
        base = {"reference_split": split_name, "num_reference": n_ref, "reference_seed": ev.seed}

        if any(m.startswith("rec") for m in metrics):
            recon = self._reconstruct(real)
            tag = f"{count_tag(n_ref)}_{split_name}"
            if "rec" in metrics:
                pixel = {"images": f"reconstructions of {n_ref} {split_name} images (predicted-class latent)",
                         "pixels": "[0, 1]", **base}
                report.add(f"rec_mse{tag}", mse(recon, real).mean(), metric="mse", **pixel)
                report.add(f"rec_psnr{tag}", psnr(recon, real).mean(), metric="psnr_db (mean over images)", **pixel)
                report.add(f"rec_ssim{tag}", ssim(recon, real).mean(),
                           metric="ssim (gaussian 11x11, sigma 1.5, valid region)", **pixel)
            self._scores(report, metrics, _REC_SCORES, to_fidelity_images(recon), real_u8, "rec", tag,
                         {"images": "reconstructions of the reference images", "num_generated": n_ref, **base})

        if any(m.startswith("gen") for m in metrics):
            prior = fit_prior(self.encoder, self.dataset, limit=ev.prior_images, seed=ev.seed,
                              batch_size=ev.batch_size, device=self.device)
            classes = prior.balanced_classes(n)
            fake = self._generate(prior, classes)
            fake_u8 = to_fidelity_images(fake)
            info = {"images": f"new images from the class_gaussian latent prior ({prior.mode} mode, fitted on "
                              f"{int(prior.counts.sum())} training images), classes balanced",
                    "num_generated": n, "sample_seed": ev.seed + 2, **base}
            self._scores(report, metrics, _GEN_SCORES, fake_u8, real_u8, "gen", f"{count_tag(n)}_{split_name}", info)
            if "gen_condacc" in metrics:
                for label in wanted_labels:
                    setup = self.setup(label)
                    if setup.classifier is None:
                        report.skipped[f"gen_condacc@{label}"] = "needs a classifier over the data set's classes"
                        continue
                    report.add(f"gen_condacc{count_tag(n)}_{label}", conditional_accuracy(setup.classifier, fake_u8, classes),
                               metric="class-conditional accuracy", feature_extractor=setup.description,
                               **{k: v for k, v in info.items() if not k.startswith(("reference", "num_ref"))})
        return report

    def _accuracy(self, report: EvalReport) -> None:
        split = self.dataset.split("test")
        correct = 0
        for images, labels in DataLoader(split, batch_size=self.ev.batch_size, shuffle=False):
            scores = self.encoder.class_scores(self.encoder(images.to(self.device)))
            correct += (scores.argmax(1).cpu() == torch.as_tensor(labels)).sum().item()
        report.add(f"acc{count_tag(len(split))}_test", correct / max(len(split), 1),
                   metric="encoder accuracy (longest class capsule)", images=f"the whole test split ({len(split)})")

    def _reconstruct(self, real: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, real.shape[0], self.ev.batch_size):
            x = real[start:start + self.ev.batch_size].to(self.device)
            out.append(self.generator(self.encoder.to_latent(self.encoder(x))).float().cpu())
        return torch.cat(out)

    def _generate(self, prior: ClassGaussianPrior, classes: torch.Tensor) -> torch.Tensor:
        latents = prior.sample(classes, torch.Generator().manual_seed(self.ev.seed + 2))
        out = []
        for start in range(0, latents.shape[0], self.ev.batch_size):
            out.append(self.generator(latents[start:start + self.ev.batch_size].to(self.device)).float().cpu())
        return torch.cat(out)

    def _scores(self, report: EvalReport, metrics: list[str], table: dict[str, str], images: torch.Tensor,
                real_u8: torch.Tensor, prefix: str, tag: str, info: dict[str, Any]) -> None:
        requested = {table[m] for m in metrics if m in table}
        if not requested:
            return
        for label in self.extractors:
            setup = self.setup(label)
            scores = {s for s in requested if FIDELITY_FLAGS[s] in setup.metrics}
            for missing in sorted(requested - scores):
                report.skipped[f"{prefix}_{missing}@{label}"] = (
                    "needs class logits, which this extractor lacks" if missing == "is" else "not supported")
            if not scores:
                continue
            cache = (f"capsgan-{self.data_id}-{self.ev.reference_split}-n{real_u8.shape[0]}-"
                     f"s{self.ev.seed}-{setup.identity}")
            values = fidelity_scores(images, real_u8, setup, scores, reference_cache=cache, cache_dir=self.cache_dir,
                                     device=self.device, seed=self.ev.seed, batch_size=self.ev.batch_size)
            common = {"feature_extractor": setup.description, "image_format": "uint8 RGB (grayscale replicated)",
                      **info}
            count = tag.split("_", 1)[0]
            if "fid" in values:
                report.add(f"{prefix}_fid{tag}_{label}", values["fid"], metric="fid", **common)
            if "kid" in values:
                report.add(f"{prefix}_kid{tag}_{label}", values["kid"], metric="kid (poly kernel, subsets of "
                           f"{min(1000, images.shape[0], real_u8.shape[0])})", std=values["kid_std"], **common)
            if "is" in values:
                is_info = {k: v for k, v in common.items() if not k.startswith(("reference", "num_ref"))}
                report.add(f"{prefix}_is{count}_{label}", values["is"], metric="inception-style score "
                           f"({min(10, images.shape[0])} splits)", std=values["is_std"], **is_info)
            if "precision" in values:
                report.add(f"{prefix}_precision{tag}_{label}", values["precision"], metric="precision (k=3)", **common)
                report.add(f"{prefix}_recall{tag}_{label}", values["recall"], metric="recall (k=3)", **common)


def periodic_evaluation(trainer) -> dict[str, Any] | None:
    """Evaluate during training when ``eval.every_epochs`` says so; append a row of kind "eval".

    Called at the end of each epoch by the trainer; returns the row, or ``None`` when
    this epoch has no evaluation.
    """
    ev = trainer.recipe.eval
    done = trainer.epoch + 1
    if not ev.every_epochs or not ev.metrics or (done % ev.every_epochs and done != trainer.recipe.run.epochs):
        return None
    evaluator = _TRAINER_EVALUATORS.get(trainer)  # one per trainer: extractors are prepared once
    if evaluator is None:
        log = None if trainer.console is None else (lambda text: trainer.console.print(text, highlight=False))
        evaluator = Evaluator(trainer.resolved, trainer.plugins.registry, dataset=trainer.c.dataset,
                              encoder=trainer.c.encoder, generator=trainer.c.generator, device=trainer.device, log=log)
        _TRAINER_EVALUATORS[trainer] = evaluator
    report = evaluator.run()
    row = {"kind": "eval", "epoch": trainer.epoch, "step": trainer.step, **report.metrics}
    trainer.metrics.append(row)
    protocol = {"epoch": trainer.epoch, "step": trainer.step, **report.to_dict()}
    (trainer.run_dir / "eval_protocol.json").write_text(json.dumps(protocol, indent=2) + "\n", encoding="utf-8")
    if trainer.console is not None:
        shown = "  ".join(f"{k} {v:.4g}" for k, v in report.metrics.items())
        trainer.console.print(f"  eval: {shown}", highlight=False)
    return row


# ------------------------------------------------------------------ trained runs


@dataclass
class LoadedRun:
    """A run folder's checkpoint, rebuilt: recipe, plugins, components with their weights."""

    run_dir: Path
    checkpoint: Path
    epoch: int
    step: int
    resolved: ResolvedRecipe
    plugins: PluginSet
    components: Components
    device: torch.device

    def evaluator(self, log: Callable[[str], None] | None = None) -> Evaluator:
        c = self.components
        return Evaluator(self.resolved, self.plugins.registry, dataset=c.dataset, encoder=c.encoder,
                         generator=c.generator, device=self.device, log=log)


def find_checkpoint(run_dir, which: str | None = None) -> Path:
    """Return the checkpoint of ``run_dir`` to evaluate: ``final``/``best``/a file name or path; default final, else newest."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir} is not a run folder (no such folder).")
    folder = run_dir / "checkpoints"
    if which:
        for candidate in (Path(which), folder / which, folder / f"{which}.pt"):
            if candidate.is_file():
                return candidate
        raise RunFolderError(f'No checkpoint "{which}" in {folder}. Use final, best, or a .pt file of that folder.')
    if (folder / "final.pt").is_file():
        return folder / "final.pt"
    found = ckpt.latest(folder)
    if found is None:
        raise RunFolderError(f"{run_dir} holds no checkpoint (checkpoints/ is empty or missing); train it first.")
    return found


def load_run(run_dir, *, checkpoint: str | None = None, eval_overrides: dict[str, Any] | None = None,
             sets: tuple[str, ...] = (), device: str | None = None, inception_weights: str | None = None) -> LoadedRun:
    """Rebuild a trained run from its folder for evaluation or sampling.

    Args:
        run_dir: the run folder.
        checkpoint: ``final``, ``best``, a file name in checkpoints/ or a path (default: final, else newest).
        eval_overrides: ``[eval]`` keys to replace (from command-line options).
        sets: ``eval.key=value`` overrides; other keys would change the model and are refused.
        device: ``auto``/``cpu``/``cuda``/``mps`` (default: the recipe's run.device).
        inception_weights: a local Inception weights file; adds an ``inception`` extractor
            to ``eval.features`` unless one is configured.
    """
    path = find_checkpoint(run_dir, checkpoint)
    state = ckpt.load_checkpoint(path)
    data = copy.deepcopy(state["recipe"])
    for text in sets:
        if not text.split("=", 1)[0].strip().startswith("eval."):
            raise RecipeError(f"--set {text}: only eval.* keys can change when evaluating a trained run "
                              "(the others describe the model that was trained).")
    applied = apply_overrides(data, list(sets))
    section = data.setdefault("eval", {})
    section.update(eval_overrides or {})
    if inception_weights:
        section["inception_weights"] = str(inception_weights)
        features = section.setdefault("features", {"domain": {"plugin": "domain_classifier"}})
        if not any(isinstance(t, dict) and t.get("plugin") == "inception" for t in features.values()):
            features["inception"] = {"plugin": "inception"}
    plugins = load_plugins(data.get("run", {}).get("plugins", []))
    resolved = resolve(data, plugins.registry, source=f"{path} (the run's recipe)", overrides=applied)
    target = pick_device(device or resolved.recipe.run.device)
    components = build_components(resolved, plugins.registry)
    try:
        for name in ("encoder", "generator"):
            getattr(components, name).load_state_dict(state["models"][name])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path} does not fit the models of its own recipe ({str(exc).splitlines()[0]}); "
                              "the plugins changed since it was trained.") from None
    for module in (components.encoder, components.generator):
        module.to(target).eval()
    position = state.get("position", {})
    return LoadedRun(run_dir=path.parent.parent, checkpoint=path, epoch=position.get("epoch", 0),
                     step=position.get("step", 0), resolved=resolved, plugins=plugins, components=components,
                     device=target)
