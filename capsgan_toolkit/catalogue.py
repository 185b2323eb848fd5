"""The metric catalogue: every number capsgan reports, written down once.

For each metric ``eval.metrics`` accepts (its *request name*, e.g. ``gen_fid``): the result
keys it produces with their exact pattern (``gen_fid{count}_{split}_{label}``: image count
as :func:`count_tag` writes it, split of the real images, feature extractor label), which
way is better and the unit; the protocol fields stored with it; whether it needs a feature
extractor or class logits; and what the objective must offer. Evaluation, the report
table, ``capsgan compare`` and docs/metrics.md read it (a test keeps the docs complete).
One reconstruction MSE: pixels in [0, 1] (``rec_mse…`` and the training row's
``test_rec_mse01`` are the same quantity). Imports neither torch nor the recipe.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Direction = Literal["lower", "higher"]
Capability = Literal["classifier", "reconstruction", "generation"]

KID_SUBSETS = 100  # KID: the number of random subsets torch-fidelity averages over


def kid_subset_size(num_generated: int, num_reference: int) -> int:
    """KID's subset size: half the smaller side, at most 1000 (torch-fidelity's default).

    torch-fidelity draws each subset without replacement; a subset as large as the set
    would hold every image, so all subsets would give the same value and a std of 0.
    """
    return max(2, min(1000, num_generated // 2, num_reference // 2))


def is_splits(num_generated: int) -> int:
    """Inception Score: the number of splits the generated images are divided into."""
    return min(10, num_generated)


def count_tag(n: int) -> str:
    """Write an image count the way result keys carry it: 1000 -> '1k', 500 -> '500'."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


@dataclass(frozen=True)
class ResultKey:
    """One number in eval.json (or in a training row): its key pattern, meaning, direction and unit."""

    stem: str
    pattern: str
    quantity: str
    direction: Direction
    unit: str
    fidelity_result: str | None = None  # torch-fidelity's name of the value, for scores it computes
    fidelity_std: str | None = None  # ... and of its standard deviation, when it has one

    @property
    def fields(self) -> tuple[str, ...]:  # the pattern's {fields}, in order
        return tuple(re.findall(r"\{(\w+)\}", self.pattern))


@dataclass(frozen=True)
class Metric:
    """A metric ``eval.metrics`` accepts, and everything about how it is computed."""

    name: str
    summary: str
    needs: Capability
    keys: tuple[ResultKey, ...]
    protocol: tuple[str, ...]
    feature_extractor: bool = False
    class_logits: bool = False
    conditional: bool = False  # needs generation that honours the requested classes
    fidelity_flag: str | None = None  # the torch_fidelity.calculate_metrics flag that computes it


_REF = ("reference_split", "num_reference", "reference_seed")
_FEATURES = ("feature_extractor", "image_format")
_REC_SCORE = ("metric", "images", "num_generated", *_REF, *_FEATURES)
_GEN_SCORE = ("metric", "images", "num_generated", "sample_seed", *_REF, *_FEATURES)
_KID = ("std", "kid_subsets", "kid_subset_size")
_FID_UNIT = "squared distance in feature space"
_KID_UNIT = "squared MMD in feature space (cubic polynomial kernel)"
_FRACTION = "fraction of images, 0 to 1"


def _fid(stem: str, what: str) -> ResultKey:
    return ResultKey(stem, stem + "{count}_{split}_{label}", f"FID of {what} against real images",
                     "lower", _FID_UNIT, "frechet_inception_distance")


def _kid(stem: str, what: str) -> ResultKey:
    return ResultKey(stem, stem + "{count}_{split}_{label}", f"KID of {what} against real images",
                     "lower", _KID_UNIT, "kernel_inception_distance_mean", "kernel_inception_distance_std")


_METRICS = (
    Metric("acc", "classifier accuracy on the whole test split", "classifier",
           (ResultKey("acc", "acc{count}_test", "accuracy of the objective's classifier on the whole test split",
                      "higher", _FRACTION),),
           ("metric", "images")),
    Metric("rec", "MSE, PSNR and SSIM of reconstructions of held-out images", "reconstruction",
           (ResultKey("rec_mse", "rec_mse{count}_{split}", "mean squared error of reconstructions",
                      "lower", "pixels in [0, 1]: mean of squared differences"),
            ResultKey("rec_psnr", "rec_psnr{count}_{split}", "PSNR of reconstructions (mean over images)",
                      "higher", "dB, pixels in [0, 1]; at most 100"),
            ResultKey("rec_ssim", "rec_ssim{count}_{split}", "SSIM of reconstructions (mean over images)",
                      "higher", "index, -1 to 1")),
           ("metric", "images", "pixels", *_REF)),
    Metric("rec_fid", "FID between reconstructions and their real images (per feature extractor)", "reconstruction",
           (_fid("rec_fid", "reconstructions"),), _REC_SCORE, feature_extractor=True, fidelity_flag="fid"),
    Metric("rec_kid", "KID between reconstructions and their real images (per feature extractor)", "reconstruction",
           (_kid("rec_kid", "reconstructions"),), _REC_SCORE + _KID, feature_extractor=True, fidelity_flag="kid"),
    Metric("gen_fid", "FID of new images (per feature extractor)", "generation",
           (_fid("gen_fid", "new images"),), _GEN_SCORE, feature_extractor=True, fidelity_flag="fid"),
    Metric("gen_kid", "KID of new images (per feature extractor)", "generation",
           (_kid("gen_kid", "new images"),), _GEN_SCORE + _KID, feature_extractor=True, fidelity_flag="kid"),
    Metric("gen_is", "Inception(-style) Score of new images (extractors with class logits)", "generation",
           (ResultKey("gen_is", "gen_is{count}_{label}", "Inception(-style) Score of new images", "higher",
                      "exp(mean KL divergence), 1 to the number of classes", "inception_score_mean",
                      "inception_score_std"),),
           ("metric", "images", "num_generated", "sample_seed", *_FEATURES, "std", "is_splits"),
           feature_extractor=True, class_logits=True, fidelity_flag="isc"),
    Metric("gen_prc", "precision and recall of new images (per feature extractor)", "generation",
           (ResultKey("gen_precision", "gen_precision{count}_{split}_{label}",
                      "precision of new images (share inside the real images' k=3 manifold)", "higher",
                      _FRACTION, "precision"),
            ResultKey("gen_recall", "gen_recall{count}_{split}_{label}",
                      "recall of new images (share of real images inside their k=3 manifold)", "higher",
                      _FRACTION, "recall")),
           _GEN_SCORE, feature_extractor=True, fidelity_flag="prc"),
    Metric("gen_condacc", "how often a domain classifier recognises the class a new image was made for",
           "generation",
           (ResultKey("gen_condacc", "gen_condacc{count}_{label}",
                      "class-conditional accuracy of new images, judged by the extractor's classifier",
                      "higher", _FRACTION),),
           ("metric", "images", "num_generated", "sample_seed", "feature_extractor"),
           feature_extractor=True, class_logits=True, conditional=True),
    Metric("rec_acc", "how often a domain classifier recognises the true class of a reconstruction "
           "(gen_condacc's ceiling)", "reconstruction",
           (ResultKey("rec_acc", "rec_acc{count}_{split}_{label}",
                      "accuracy of the extractor's classifier on reconstructions of held-out images (true labels)",
                      "higher", _FRACTION),),
           ("metric", "images", *_REF, "feature_extractor"),
           feature_extractor=True, class_logits=True),
)

CATALOGUE: dict[str, Metric] = {m.name: m for m in _METRICS}
"""Every metric by request name, in report order."""

EVAL_METRICS: dict[str, str] = {m.name: m.summary for m in _METRICS}
"""Names accepted in ``eval.metrics`` and ``capsgan eval --metrics``, with a one-line summary."""

FEATURE_METRICS: tuple[str, ...] = tuple(m.name for m in _METRICS if m.feature_extractor)
"""Metrics that need a feature extractor."""

FIDELITY_FLAGS: dict[str, str] = {m.name: m.fidelity_flag for m in _METRICS if m.fidelity_flag}
"""Request name -> the ``torch_fidelity.calculate_metrics`` flag computing it (``fid``, ``kid``, ``isc``, ``prc``)."""

EPOCH_TEST_ACC = "test_acc"
EPOCH_TEST_REC_MSE = "test_rec_mse01"
EPOCH_KEYS: dict[str, ResultKey] = {
    EPOCH_TEST_ACC: ResultKey(EPOCH_TEST_ACC, EPOCH_TEST_ACC, "classifier accuracy on the test split "
                              "(its first run.eval_batches batches; 0: all)", "higher", _FRACTION),
    EPOCH_TEST_REC_MSE: ResultKey(EPOCH_TEST_REC_MSE, EPOCH_TEST_REC_MSE, "mean squared error of reconstructions "
                                  "of the same test images (evaluation.scores.recon_mse01)", "lower",
                                  "pixels in [0, 1]: mean of squared differences"),
}
"""Keys of the training loop's per-epoch row (and summary.json) that measure the model."""

COST_KEYS: dict[str, ResultKey] = {k.stem: k for k in (
    ResultKey("images_per_s", "images_per_s", "training images per second, mean over the logged intervals "
              "(summary.json)", "higher", "images/s"),
    ResultKey("train_time_s", "train_time_s", "wall-clock seconds of training, evaluation excluded (summary.json)",
              "lower", "s"),
    ResultKey("seconds_per_epoch", "seconds_per_epoch", "seconds of training per epoch (summary.json; "
              "train_time_s / epochs when absent)", "lower", "s"),
    ResultKey("peak_memory_bytes", "peak_memory_bytes", "peak memory: CUDA max allocated on a GPU, the training "
              "process's max RSS on a CPU (summary.json)", "lower", "bytes"),
    ResultKey("parameters", "parameters.{label}", "trainable and frozen parameters of the part (summary.json)",
              "lower", "parameters"),
    ResultKey("flops_per_image", "flops_per_image.{label}", "forward FLOPs per image of the part, "
              "torch.utils.flop_counter (summary.json)", "lower", "FLOP"),
)}
"""What a run cost, from its summary.json (``capsgan compare``'s cost rows)."""

RESULT_KEYS: dict[str, ResultKey] = {k.stem: k for m in _METRICS for k in m.keys} | EPOCH_KEYS | COST_KEYS
"""Every result key by stem (``gen_fid``, ``rec_mse``, ``test_acc``, ``images_per_s``, ...)."""

_FIELD_RE = {"count": r"(?P<count>\d+k?)", "split": r"(?P<split>[a-z]+)", "label": r"(?P<label>[a-z][a-z0-9_]*)"}
_PATTERNS = [(re.compile("".join(_FIELD_RE[p[1:-1]] if p.startswith("{") else re.escape(p)
                                 for p in re.split(r"(\{\w+\})", k.pattern) if p) + "$"), k)
             for k in RESULT_KEYS.values()]


def result_key(stem: str, *, count: int | str | None = None, split: str | None = None,
               label: str | None = None) -> str:
    """Build a result key: ``result_key("gen_fid", count=1000, split="test", label="domain")`` gives
    ``gen_fid1k_test_domain``. Fields the stem's pattern lacks are ignored; an int count goes through :func:`count_tag`.
    """
    if stem not in RESULT_KEYS:
        raise KeyError(f"unknown result key stem {stem!r}; known: {', '.join(RESULT_KEYS)}")
    key = RESULT_KEYS[stem]
    values = {"count": count_tag(count) if isinstance(count, int) else count, "split": split, "label": label}
    missing = [f for f in key.fields if values[f] is None]
    if missing:
        raise ValueError(f"{key.pattern} needs {', '.join(missing)}")
    return key.pattern.format(**{f: values[f] for f in key.fields})


@dataclass(frozen=True)
class ParsedKey:
    """A result key taken apart: its catalogue :class:`ResultKey` and its field values."""

    key: ResultKey
    count: str | None = None
    split: str | None = None
    label: str | None = None


def parse(key: str) -> ParsedKey | None:
    """Take a result key apart (``gen_fid1k_test_domain``); ``None`` if it is not a catalogue key."""
    found = next(((m, info) for regex, info in _PATTERNS if (m := regex.match(key))), None)
    return ParsedKey(found[1], **found[0].groupdict()) if found else None


def _lookup(key: str) -> ResultKey | None:
    """A result key, a stem (``gen_fid``) or a request name with a single key (``gen_is``)."""
    parsed, entry = parse(key), CATALOGUE.get(key)
    if parsed is not None or key in RESULT_KEYS:
        return parsed.key if parsed is not None else RESULT_KEYS[key]
    return entry.keys[0] if entry is not None and len(entry.keys) == 1 else None


_UNSET: Any = object()


def direction(key: str, default: Any = _UNSET) -> Direction:
    """Return ``"lower"`` or ``"higher"``: which way a result key is better.

    Takes a result key (``gen_fid1k_test_domain``, ``test_rec_mse01``), a stem
    (``rec_psnr``) or a single-key request name (``gen_fid``). Unknown keys raise
    KeyError unless ``default`` is given.
    """
    info = _lookup(key)
    if info is None and default is _UNSET:
        raise KeyError(f"{key!r} is not a key of the metric catalogue")
    return default if info is None else info.direction


def resolution(key: str, num_images: int | None) -> float:
    """The smallest step a result key can move by: ``1 / num_images`` for a proportion, else 0 (continuous)."""
    info = _lookup(key)
    if info is None or info.unit != _FRACTION or not num_images:
        return 0.0
    return 1.0 / num_images


def describe(key: str) -> str:
    """One sentence for people: what a result key measures, on what, which way is better, its unit."""
    parsed = parse(key)
    info = parsed.key if parsed else _lookup(key)
    if info is None:
        raise KeyError(f"{key!r} is not a key of the metric catalogue")
    details = []
    if parsed and parsed.count:
        images = "new" if info.stem.startswith("gen_") else "held-out" if info.stem.startswith("rec_") else "test"
        details.append(f"{parsed.count} {images} images")
    if parsed and parsed.split and info.stem != "acc":
        details.append(f"real images from the {parsed.split} split")
    if parsed and parsed.label:
        details.append(f"features of extractor {parsed.label!r}")
    shown = f" ({', '.join(details)})" if details else ""
    return f"{info.quantity}{shown}. {info.direction.capitalize()} is better; unit: {info.unit}."


def missing_capability(entry: Metric, objective: Any, name: str) -> str | None:
    """Why ``objective`` cannot give ``entry`` (``None`` if it can); ``name`` is the objective's plugin name."""
    if not getattr(objective, f"has_{entry.needs}", False):
        modules = objective.modules() if hasattr(objective, "modules") else {}
        if entry.needs in ("classifier", "reconstruction") and "encoder" not in modules:
            return f"the {name} objective has no encoder"
        what = {"classifier": "classifies no images", "reconstruction": "reconstructs no images",
                "generation": "generates no images"}[entry.needs]
        return f"the {name} objective {what}"
    if entry.conditional and not getattr(objective, "conditional", True):
        return f"the {name} objective generates unconditionally: no class to recognise"
    return None


# -------------------------------------------------------------------- the [eval] table

PriorKind = Literal["gaussian", "true_slot", "mixture"]
"""The latent priors new images are drawn from (``objective.prior`` of ``reconstruction_gan``, ``eval.prior``);
:data:`capsgan_toolkit.evaluation.prior.PRIOR_KINDS` lists them."""


class FeatureSpec(BaseModel):
    """An ``eval.features.<label>`` table: a ``metric_features`` plugin name and its params."""

    model_config = ConfigDict(extra="allow")

    plugin: str = Field(description="Registered metric_features component name.")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class EvalSection(BaseModel):
    """Evaluation: which metrics, how often during training, on how many images."""

    model_config = ConfigDict(extra="forbid")

    metrics: list[str] = Field(
        default_factory=lambda: ["acc", "rec", "rec_fid", "gen_fid", "gen_kid", "gen_is", "gen_condacc", "rec_acc"],
        description=f"Metrics to compute; any of: {', '.join(EVAL_METRICS)}. Those the objective cannot give "
                    "are skipped, with the reason.")
    every_epochs: int = Field(0, ge=0, description='Epochs between evaluations during training (rows of kind '
                                                   '"eval"); 0: only `capsgan eval`.')
    num_images: int = Field(1000, ge=10, description="Generated images per score, and reference images (the whole "
                                                     "split when smaller).")
    reference_split: Literal["test", "train"] = Field("test", description="Split the reference images come from.")
    features: dict[str, FeatureSpec] = Field(
        default_factory=lambda: {"domain": FeatureSpec(plugin="domain_classifier")},
        description="Feature extractors by label (the label ends each score's name), each a metric_features component.")
    prior_images: int = Field(10000, ge=0, description="Training images encoded to fit the latent prior; 0: all.")
    prior: PriorKind | None = Field(
        None, description='Latent prior of the new images, chosen at evaluation: "gaussian", "true_slot" or '
                          '"mixture" (unset: the objective\'s own, objective.prior). Objectives without a latent '
                          "prior (dcgan) ignore it.")
    prior_components: int | None = Field(
        None, ge=2, le=16, description='Gaussians per class of prior = "mixture" (unset: objective.prior_components, '
                                       "else 3).")
    prior_temperature: float | None = Field(
        None, gt=0, le=2, description="Spread of the prior's draws around their class (or component) mean, as a "
                                      "multiple of the fitted spread; below 1 trades variety for fidelity (unset: "
                                      "objective.prior_temperature, else 1).")
    seed: int = Field(0, ge=0, description="Seed of the reference subset, prior samples and score subsets.")
    batch_size: int = Field(100, ge=1, description="Images per batch when encoding, generating and extracting "
                                                   "features.")
    cache_dir: str = Field("", description="Cache of trained domain extractors and reference features; empty: "
                                           "$CAPSGAN_CACHE or ~/.cache/capsgan.")

    @model_validator(mode="before")
    @classmethod
    def _legacy_inception_weights(cls, data: Any) -> Any:
        """Read ``eval.inception_weights`` of older recipes: it is now the Inception extractors' ``weights``."""
        if isinstance(data, dict) and "inception_weights" in data:
            data = dict(data)
            path = data.pop("inception_weights")
            if path and isinstance(data.get("features"), dict):
                data["features"] = {
                    label: ({**spec, "weights": path} if isinstance(spec, dict) and spec.get("plugin") == "inception"
                            and not spec.get("weights") else spec)
                    for label, spec in data["features"].items()}
        return data

    @model_validator(mode="after")
    def _known_names(self):
        unknown = [m for m in self.metrics if m not in EVAL_METRICS]
        if unknown:
            from capsgan_toolkit.plugin.registry import suggest

            raise ValueError(
                f"unknown metric {unknown[0]!r}.{suggest(unknown[0], list(EVAL_METRICS))} "
                f"Allowed: {', '.join(EVAL_METRICS)}"
            )
        bad = [label for label in self.features if not label.isidentifier() or label.lower() != label]
        if bad:
            raise ValueError(f"feature extractor label {bad[0]!r} must be a lowercase identifier (it ends result keys)")
        if self.prior_components is not None and self.prior != "mixture":
            raise ValueError(
                f'eval.prior_components ({self.prior_components}) sets the Gaussians per class of eval.prior = '
                f'"mixture", but eval.prior is {self.prior or "unset"}: set eval.prior = "mixture" or remove '
                "eval.prior_components.")
        return self


def add_inception(eval_table: dict, weights_path: str) -> dict:
    """Return a copy of an ``[eval]`` table that scores with Inception weights from ``weights_path``.

    Every ``inception`` extractor gets ``weights = weights_path``; with none, one labelled
    ``inception`` is added beside the configured ones (the default ``domain`` when the
    table names none). This is what ``capsgan eval --inception-weights FILE`` does.
    """
    table = copy.deepcopy(eval_table)
    table.pop("inception_weights", None)
    features = table.setdefault("features", {"domain": {"plugin": "domain_classifier"}})
    found = False
    for spec in features.values():
        if isinstance(spec, dict) and spec.get("plugin") == "inception":
            spec["weights"] = str(weights_path)
            found = True
    if not found:
        label = "inception" if "inception" not in features else "inception_weights_file"
        features[label] = {"plugin": "inception", "weights": str(weights_path)}
    return table


# ------------------------------------------------------------------------- reporting


def _images_column(proto: dict) -> str:
    gen, ref = proto.get("num_generated"), proto.get("num_reference")
    if gen is not None:
        return f"{gen} / {ref}, {proto['reference_split']}" if ref is not None else f"{gen} generated"
    return f"{ref} {proto['reference_split']}" if ref is not None else str(proto.get("images", ""))


def render_table(report, title: str = "evaluation"):
    """Return a rich Table of an evaluation report: each number with its std, direction and images; then skips.

    ``report`` has ``metrics`` (key -> value), ``protocol`` (key -> record) and
    ``skipped`` (name -> why), as :class:`capsgan_toolkit.evaluation.evaluator.EvalReport` does.
    """
    from rich.table import Column, Table

    table = Table(Column("metric", style="bold cyan"), Column("value", justify="right"), Column("±", justify="right"),
                  "better", "images (generated / reference, split)", title=title, title_justify="left")
    for name, value in report.metrics.items():
        proto = report.protocol.get(name, {})
        std = proto.get("std")
        better = {"lower": "lower ↓", "higher": "higher ↑"}.get(direction(name, None), "")
        table.add_row(name, f"{value:.4g}", "" if std is None else f"{std:.2g}", better, _images_column(proto))
    for name, why in report.skipped.items():
        table.add_row(f"[dim]{name}[/]", "[dim]skipped[/]", "", "", f"[dim]{why}[/]")
    return table


def markdown_table() -> str:
    """The catalogue as the Markdown table docs/metrics.md holds (a test keeps them equal)."""
    lines = ["| request | result key | measures | better | unit | needs | protocol fields |", "|---" * 7 + "|"]
    for m in _METRICS:
        need = m.needs + (", feature extractor" if m.feature_extractor else "") + (
            ", class logits" if m.class_logits else "") + (", conditional generation" if m.conditional else "")
        for i, k in enumerate(m.keys):
            first = i == 0
            lines.append(f"| {'`' + m.name + '`' if first else ''} | `{k.pattern}` | {k.quantity} | {k.direction} | "
                         f"{k.unit} | {need if first else ''} | {', '.join(m.protocol) if first else ''} |")
    for k in EPOCH_KEYS.values():
        lines.append(f"| (training row) | `{k.pattern}` | {k.quantity} | {k.direction} | {k.unit} | | |")
    for k in COST_KEYS.values():
        lines.append(f"| (cost, compare) | `{k.pattern}` | {k.quantity} | {k.direction} | {k.unit} | | |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m capsgan_toolkit.catalogue prints the docs table
    print(markdown_table())
