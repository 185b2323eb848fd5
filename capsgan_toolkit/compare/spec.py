"""The comparison spec: arms, baseline, seeds, one budget and one evaluation protocol.

A spec is a TOML file validated like a recipe (unknown keys rejected, every error names
its dotted key)::

    title = "capsule vs CNN encoder vs plain DCGAN"
    baseline = "dcgan"                 # optional: the cost tables' reference (default: the first arm)
    seeds = 2                          # or a list: [0, 1, 2]
    key_metrics = ["gen_fid", "acc"]   # optional: the headline's metrics (stems or result keys)
    set = ["run.log_every=10"]         # optional overrides for every arm
    probe = true                       # optional: `capsgan probe` every run (spatial structure)
    probe_images = 500                 # test images the probe uses

    [budget]
    epochs = 3                         # or steps = N, or minutes = M: one for every arm

    [eval]                             # one protocol for every arm (eval.* overrides)
    metrics = ["acc", "rec", "gen_fid"]
    num_images = 500

    [[arms]]
    label = "capsule"
    recipe = "quickstart.toml"         # relative to this file
    set = ["encoder.primary_types=16"] # optional --set-style overrides

    [[contrasts]]                      # optional: the pairs compared (default: every pair)
    a = "capsule"
    b = "cnn"

The spec turns into recipe overrides: the budget into ``run.epochs`` / ``run.max_steps`` /
``run.max_minutes``, the ``[eval]`` table into ``eval.*``, each seed into ``run.seed``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.recipe.toml_io import read_toml, toml_value

LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CompareError(CapsganError):
    """A comparison that cannot run: a bad spec, unfair arms, mixed protocols, missing runs."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _key_values(value: list[str]) -> list[str]:
    """Check that every entry of a ``set`` list is ``key.path=value`` (the arms' and the spec's)."""
    for text in value:
        if "=" not in text or not text.split("=", 1)[0].strip():
            raise ValueError(f'"{text}" is not key.path=value, for example encoder.primary_types=32')
    return value


class ArmSpec(_Strict):
    label: str = Field(description="Name of the arm in every output; also its folder runs/<label>/.")
    recipe: str = Field(description="The arm's recipe, relative to the spec file.")
    set: list[str] = Field(default_factory=list, description="--set-style overrides, e.g. encoder.primary_types=32.")
    optional: bool = Field(False, description="Run only when asked for (--arm LABEL or --with-optional).")
    description: str = Field("", description="One line shown under the arm's label in the report.")

    @field_validator("label")
    @classmethod
    def _folder_safe(cls, value: str) -> str:
        if not LABEL.match(value):
            raise ValueError("use letters, digits, '_', '-' and '.' only (the label names a folder)")
        return value

    @field_validator("set")
    @classmethod
    def _key_value(cls, value: list[str]) -> list[str]:
        return _key_values(value)


class BudgetSpec(_Strict):
    epochs: int | None = Field(None, ge=1, description="Training epochs of every arm (run.epochs).")
    steps: int | None = Field(None, ge=1, description="Optimizer steps of every arm (run.max_steps).")
    minutes: float | None = Field(None, gt=0, description="Wall-clock minutes of every arm (run.max_minutes).")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("epochs", "steps", "minutes") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of epochs, steps and minutes" + (f" (got {', '.join(given)})" if given else ""))
        return self

    def overrides(self) -> list[str]:
        """Return the recipe overrides that impose this budget."""
        if self.epochs is not None:
            return [f"run.epochs={self.epochs}"]
        if self.steps is not None:
            return [f"run.max_steps={self.steps}"]
        return [f"run.max_minutes={self.minutes!r}"]

    def describe(self) -> str:
        if self.epochs is not None:
            return f"{self.epochs} epochs"
        if self.steps is not None:
            return f"{self.steps} steps"
        return f"{self.minutes:g} minutes of training"


class ExecutorSpec(_Strict):
    """Where ``capsgan compare --executor slurm|local`` runs each arm x seed (submitit's parameters)."""

    partition: str = Field("", description="SLURM partition (empty: the cluster's default).")
    minutes: int = Field(24 * 60, ge=1, description="Time limit of each job in minutes (one run, its evaluation "
                                                    "and probe).")
    gpus: int = Field(0, ge=0, description="GPUs per job.")
    cpus: int = Field(4, ge=1, description="CPU cores per job.")
    mem_gb: float | None = Field(None, gt=0, description="Memory per job in GiB (unset: the cluster's default).")
    parallel: int = Field(32, ge=1, description="Jobs of the array running at once (SLURM's array throttle).")
    setup: list[str] = Field(default_factory=list, description='Shell lines run before each SLURM job, e.g. '
                                                              '"module load cuda".')


class EvalSpec(_Strict):
    metrics: list[str] | None = Field(None, description="eval.metrics of every arm.")
    num_images: int | None = Field(None, ge=10, description="eval.num_images of every arm.")
    features: dict[str, dict[str, Any]] | None = Field(
        None, description="eval.features of every arm: label -> {plugin = ..., params}.")
    reference_split: Literal["test", "train"] | None = Field(None, description="eval.reference_split of every arm.")
    seed: int | None = Field(None, ge=0, description="eval.seed of every arm.")
    prior_images: int | None = Field(None, ge=0, description="eval.prior_images of every arm.")

    @field_validator("features")
    @classmethod
    def _plugin_named(cls, value):
        for label, table in (value or {}).items():
            if not isinstance(table, dict) or not isinstance(table.get("plugin"), str):
                raise ValueError(f'feature extractor "{label}" needs a table with a plugin name, '
                                 'e.g. { plugin = "domain_classifier" }')
        return value

    def overrides(self) -> list[str]:
        """Return ``eval.*`` overrides, the whole protocol in --set form (sorted, stable)."""
        out = []
        for key, value in sorted(self.model_dump(exclude_none=True).items()):
            out.append(f"eval.{key}={toml_inline(value)}")
        return out


class ContrastSpec(_Strict):
    a: str = Field(description="Label of the first arm; differences are a(seed k) - b(seed k).")
    b: str = Field(description="Label of the second arm.")


DEFAULT_KEY_METRICS = ("gen_fid", "gen_condacc", "acc", "rec_mse", "rec_acc")
"""The headline's metrics when a spec names none: result-key stems, the first key of each that was measured."""


class CompareSpec(_Strict):
    title: str = Field("", description="Title of the report (default: the spec file's name).")
    description: str = Field("", description="A paragraph shown under the title.")
    baseline: str = Field("", description="Label of the cost tables' reference arm, which always runs "
                                          "(default: the first arm).")
    contrasts: list[ContrastSpec] = Field(
        default_factory=list, description="Pairs of arms compared seed by seed (default: every pair of arms).")
    key_metrics: list[str] = Field(
        default_factory=lambda: list(DEFAULT_KEY_METRICS),
        description="The headline's metrics: result-key stems (gen_fid) or result keys (gen_fid500_test_domain).")
    seeds: list[int] = Field(description="Seeds every arm is trained with: a list, or a count N for 0..N-1.")
    budget: BudgetSpec = Field(description="One training budget for every arm.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="One evaluation protocol for every arm.")
    set: list[str] = Field(
        default_factory=list, description="--set-style overrides applied to every arm (before the arm's own).")
    probe: bool = Field(False, description="Run the spatial-structure probe (`capsgan probe`) on every trained run "
                                           "and add its section to the report.")
    probe_images: int = Field(500, ge=10, description="Test images the probe uses (every class in turn).")
    allow_difference: list[str] = Field(
        default_factory=list, description="Recipe keys allowed to differ between arms (shown in red).")
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec,
                                   description="Job parameters of `capsgan compare --executor slurm|local`.")
    arms: list[ArmSpec] = Field(min_length=2, description="The arms, each a recipe (and overrides).")

    @field_validator("set")
    @classmethod
    def _key_value(cls, value: list[str]) -> list[str]:
        return _key_values(value)

    @field_validator("seeds", mode="before")
    @classmethod
    def _count_or_list(cls, value):
        if isinstance(value, bool):
            raise ValueError("give a count (an integer) or a list of integer seeds")
        if isinstance(value, int):
            if value < 1:
                raise ValueError("give at least one seed")
            return list(range(value))
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("give at least one seed")
        if len(set(value)) != len(value):
            raise ValueError("seeds repeat")
        if any(s < 0 for s in value):
            raise ValueError("seeds are non-negative integers")
        return value

    @model_validator(mode="after")
    def _labels(self):
        labels = [arm.label for arm in self.arms]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"arm label {dup[0]!r} is used twice")
        if not self.baseline:
            self.baseline = labels[0]
        if self.baseline not in labels:
            raise ValueError(f"baseline {self.baseline!r} is not an arm label; the arms are: {', '.join(labels)}")
        seen: set[frozenset[str]] = set()
        for i, c in enumerate(self.contrasts):
            unknown = [x for x in (c.a, c.b) if x not in labels]
            if unknown:
                raise ValueError(f"contrasts.{i}: {unknown[0]!r} is not an arm label; the arms are: {', '.join(labels)}")
            if c.a == c.b:
                raise ValueError(f"contrasts.{i}: an arm cannot be contrasted with itself ({c.a!r})")
            if frozenset((c.a, c.b)) in seen:
                raise ValueError(f"contrasts.{i}: {c.a} vs {c.b} is given twice")
            seen.add(frozenset((c.a, c.b)))
        return self

    def contrast_pairs(self) -> list[tuple[str, str]]:
        return [(c.a, c.b) for c in self.contrasts]

    def arm(self, label: str) -> ArmSpec:
        return next(a for a in self.arms if a.label == label)

    def selected(self, labels: tuple[str, ...] = (), with_optional: bool = False) -> list[ArmSpec]:
        """Return the arms to run: those named (all if none), optional ones only when named or asked for."""
        known = [a.label for a in self.arms]
        unknown = [x for x in labels if x not in known]
        if unknown:
            raise CompareError(f"--arm {unknown[0]}: no such arm. The arms are: {', '.join(known)}.")
        if labels:
            chosen = [a for a in self.arms if a.label in labels]
        else:
            chosen = [a for a in self.arms if with_optional or not a.optional]
        if self.baseline not in [a.label for a in chosen]:
            chosen.insert(0, self.arm(self.baseline))  # the baseline always runs: every verdict needs it
        return chosen


class LoadedSpec:
    """A validated spec and the file it came from (arm recipes are relative to it)."""

    def __init__(self, spec: CompareSpec, path: Path):
        self.spec = spec
        self.path = path

    @property
    def title(self) -> str:
        return self.spec.title or self.path.stem

    def recipe_path(self, arm: ArmSpec) -> Path:
        return (self.path.parent / arm.recipe).resolve()

    def overrides(self, arm: ArmSpec, seed: int) -> list[str]:
        """Return every override of one run: the common ones, the arm's, the budget, the protocol, seed and name."""
        return [*self.spec.set, *arm.set, *self.spec.budget.overrides(), *self.spec.eval.overrides(),
                f"run.seed={seed}", f"run.name={toml_inline(f'{arm.label}-seed-{seed}')}"]


def load_spec(path: str | Path, *, seeds: int | list[int] | None = None) -> LoadedSpec:
    """Read and validate a comparison spec.

    Args:
        path: the spec file.
        seeds: seeds replacing the spec's own (``capsgan compare --seeds``): a count N or a list.

    Raises:
        CompareError: unreadable file, bad TOML, or a spec that does not validate (every
            problem listed with its dotted key), or an arm whose recipe file is missing.
    """
    path = Path(path)
    try:
        data = read_toml(path)
    except CapsganError as exc:
        raise CompareError(str(exc).replace("recipe", "comparison spec")) from None
    if seeds is not None:
        data["seeds"] = seeds
    try:
        spec = CompareSpec.model_validate(data)
    except ValidationError as exc:
        text = _format_errors(exc, path)
        raise CompareError(text if seeds is None else text.replace("  - seeds:", "  - seeds (from --seeds):")) from None
    loaded = LoadedSpec(spec, path)
    missing = [(i, a) for i, a in enumerate(spec.arms) if not loaded.recipe_path(a).is_file()]
    if missing:
        lines = [f"  - arms.{i}.recipe: no such file {loaded.recipe_path(a)} (arm {a.label!r})" for i, a in missing]
        raise CompareError(f"{path}: the comparison spec is not valid:\n" + "\n".join(lines)
                           + "\nRecipe paths are relative to the spec file.")
    return loaded


def _format_errors(exc: ValidationError, path: Path) -> str:
    errors = exc.errors()
    lines = [f"{path}: the comparison spec is not valid ({len(errors)} problem{'s' if len(errors) != 1 else ''}):"]
    for err in errors:
        key = ".".join(str(p) for p in err["loc"]) or "<top level>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        value = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(value, dict) else f" (got {_short(value)})"
        lines.append(f"  - {key}: {msg}{shown}")
    lines.append("Fix these keys in the spec (see docs/compare.md).")
    return "\n".join(lines)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def toml_inline(value: Any) -> str:
    """Write a plain value as an inline TOML value (what ``--set key=value`` parses back)."""
    return toml_value(value)
