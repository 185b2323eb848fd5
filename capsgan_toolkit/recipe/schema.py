"""Recipes: TOML files validated by pydantic, component params by each component's own model.

A recipe has one table per component holding the plugin's name and its own params
side by side::

    [encoder]
    plugin = "capsnet"
    primary_types = 64

Validation runs in two passes. The first checks the recipe's own structure (this
module's models, unknown keys rejected); the second resolves every ``plugin`` name
in the registry and validates the remaining keys against that component's
``Params``. Every error of a pass is reported at once, with the file, the dotted
key, the bad value and what is allowed; the second pass runs once the first is clean.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from capsgan_toolkit.catalogue import EvalSection, FeatureSpec
from capsgan_toolkit.errors import CapsganError, RecipeError, RegistryError
from capsgan_toolkit.interfaces import SLOTS
from capsgan_toolkit.plugin.registry import Registry, suggest
from capsgan_toolkit.recipe.toml_io import read_toml
from capsgan_toolkit.step.augment import AugmentSection
from capsgan_toolkit.step.divergence import DivergenceSpec
from capsgan_toolkit.step.ema import EmaSection
from capsgan_toolkit.step.optim import OptimizerSpec
from capsgan_toolkit.step.speed import SpeedSection


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ComponentSpec(BaseModel):
    """A component table: ``plugin`` plus the component's own params (validated later)."""

    model_config = ConfigDict(extra="allow")

    plugin: str = Field(description="Registered component name.")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RunSection(_Strict):
    name: str = Field("run", description="Run name; the default run folder is runs/<name>: one plain folder name "
                      "(no / or \\, not empty, not . or ..); --out writes elsewhere.")
    seed: int = Field(0, description="Seed for every random number generator.")
    epochs: int = Field(10, ge=1, description="Training epochs.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Where to train.")
    steps_per_epoch: int = Field(0, ge=0, description="Cap on steps per epoch; 0 means the whole training split.")
    log_every: int = Field(20, ge=1, description="Steps between metrics.jsonl rows.")
    eval_batches: int = Field(0, ge=0, description="Test batches for encoder accuracy per epoch; 0 means all.")
    running_momentum: float = Field(
        0.9, ge=0.0, lt=1.0, description="Momentum of the running encoder and discriminator accuracies."
    )
    max_steps: int = Field(0, ge=0, description="Stop after this many steps in all (a compute budget); 0: no limit.")
    max_minutes: float = Field(
        0.0, ge=0.0, description="Stop after this many minutes of training (a wall-clock budget); 0: no limit."
    )
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="Seeded share of the training split held out to choose best.pt (never the test split); 0: no best.pt.",
    )
    threads: int = Field(0, ge=0, description="CPU threads for torch; 0 leaves torch's default.")
    on_nan: Literal["stop", "skip"] = Field(
        "stop", description="On a NaN/Inf loss or gradient: stop with an error, or skip the step and count it."
    )
    plugins: list[str] = Field(
        default_factory=list, description="Extra plugin modules to import by name (besides installed entry points)."
    )
    divergence: DivergenceSpec = Field(
        default_factory=DivergenceSpec, description="Watch for a loss spike or accuracy collapse (docs/training-stability.md)."
    )

    @field_validator("name")
    @classmethod
    def _plain_folder_name(cls, name: str) -> str:
        """One folder name inside runs/: a recipe from someone else must not aim --overwrite at another folder."""
        bad = ("it is empty" if not name.strip() else "it is . or .." if name.strip() in (".", "..")
               else "it holds a path separator (/ or \\)" if "/" in name or "\\" in name
               else "it holds a NUL character" if "\0" in name
               else "it is an absolute path" if Path(name).is_absolute() or Path(name).drive else None)
        if bad:
            raise ValueError(f"run.name must be one plain folder name (the run goes to runs/<run.name>), but {bad}. "
                             "To write the run elsewhere, give the folder with --out")
        return name


class LossesSection(_Strict):
    classification: ComponentSpec | None = Field(None, description="Loss on the class capsules.")
    reconstruction: ComponentSpec | None = Field(None, description="Loss between reconstruction and input.")
    adversarial: ComponentSpec | None = Field(
        None, description="Adversarial loss; omit it for an L2-only generator (no discriminator is trained)."
    )
    generator_weight: float = Field(0.01, ge=0.0, description="Weight of (reconstruction + adversarial) vs classification.")
    reconstruction_weight: float = Field(1.0, ge=0.0, description="Weight of the reconstruction term inside the generator loss.")
    adversarial_weight: float = Field(1.0, ge=0.0, description="Weight of the adversarial term inside the generator loss.")

    def weights(self) -> dict[str, float]:
        return {"generator_weight": self.generator_weight, "reconstruction_weight": self.reconstruction_weight,
                "adversarial_weight": self.adversarial_weight}


class CheckpointSection(_Strict):
    every_epochs: int = Field(1, ge=0, description="Epochs between checkpoints; 0 keeps only the final one.")
    every_minutes: float = Field(0.0, ge=0.0, description="Also checkpoint after this many minutes; 0 turns it off.")
    keep_last: int = Field(3, ge=1, description="Periodic checkpoints kept besides the final one.")


class OutputSection(_Strict):
    samples_every_epochs: int = Field(1, ge=1, description="Epochs between sample grids.")
    sample_images: int = Field(16, ge=1, le=256, description="Real/reconstruction pairs in a sample grid.")
    tensorboard: bool = Field(False, description="Write TensorBoard events to RUN_DIR/tensorboard/ (the tensorboard extra).")
    mlflow: bool | str = Field(False, description='Log to MLflow (the mlflow extra): true: a local store in '
                                                  'RUN_DIR/mlruns; a text: a tracking URI ("http://host:5000", '
                                                  '"sqlite:///mlflow.db"); false: off.')
    wandb: Literal[False, "offline", "online"] = Field(
        False, description='Log to Weights & Biases (the wandb extra): "offline" (RUN_DIR/wandb, `wandb sync` '
                           'later), "online" (after `wandb login`), or false: off.')
    experiment: str = Field("capsgan", min_length=1, description="The MLflow experiment or W&B project the run is "
                                                                 "logged under.")

    @field_validator("mlflow")
    @classmethod
    def _a_uri(cls, value: bool | str) -> bool | str:
        if isinstance(value, str) and not value.strip():
            raise ValueError('give a tracking URI (e.g. "http://localhost:5000"), or true for a local store in '
                             "RUN_DIR/mlruns, or false")
        return value



class Recipe(_Strict):
    """A whole, validated recipe."""

    run: RunSection = Field(default_factory=RunSection)
    data: ComponentSpec
    objective: ComponentSpec = Field(default_factory=lambda: ComponentSpec(plugin="reconstruction_gan"))
    encoder: ComponentSpec | None = None
    generator: ComponentSpec | None = None
    discriminator: ComponentSpec | None = None
    losses: LossesSection = Field(default_factory=LossesSection)
    optim: dict[str, OptimizerSpec] = Field(
        default_factory=dict, description="Optimizer settings by the objective's optimizer names."
    )
    gate: ComponentSpec = Field(default_factory=lambda: ComponentSpec(plugin="always"))
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    output: OutputSection = Field(default_factory=OutputSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    ema: EmaSection | None = Field(None, description="Exponential moving average of the generator (off when absent).")
    augment: AugmentSection | None = Field(
        None, description="Random shifts, crops and flips of the training batches (off when absent).")
    speed: SpeedSection = Field(default_factory=SpeedSection, description="Speed options (docs/performance.md).")

    def spec(self, key: str) -> ComponentSpec | None:
        """Return the component table at a dotted slot key (``losses.adversarial``), or ``None``."""
        node: Any = self
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
        return node

    def component_slots(self) -> list[tuple[str, str, ComponentSpec | FeatureSpec]]:
        """Return ``(dotted key, family, spec)`` for every component table present."""
        slots: list[tuple[str, str, ComponentSpec | FeatureSpec]] = [
            (key, family, spec) for key, family in SLOTS if (spec := self.spec(key)) is not None]
        for label, feature in self.eval.features.items():
            slots.append((f"eval.features.{label}", "metric_features", feature))
        return slots


class ResolvedRecipe:
    """A recipe whose component params are validated instances of each component's model."""

    def __init__(self, recipe: Recipe, params: dict[str, BaseModel], source: str,
                 optim: dict[str, BaseModel] | None = None):
        self.recipe = recipe
        self.params = params
        self.source = source
        self.optim = optim if optim is not None else dict(recipe.optim)

    def to_dict(self) -> dict[str, Any]:
        """Return the recipe with every default filled in (plain TOML-able values)."""
        data = self.recipe.model_dump(mode="json", exclude_none=True)
        data["optim"] = {name: spec.model_dump(mode="json") for name, spec in self.optim.items()}
        for key, model in self.params.items():
            table = _dig(data, key)
            plugin = table["plugin"]
            table.clear()
            table["plugin"] = plugin
            table.update(model.model_dump(mode="json", by_alias=True, exclude_none=True))
        return data

    def digest(self) -> str:
        """Return a SHA-256 of the resolved recipe (the identity of a run)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def _dig(data: dict, dotted: str) -> dict:
    for part in dotted.split("."):
        data = data[part]
    return data


def format_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _format_errors(errors: list[tuple[str, str, Any]], source: str, overrides: dict[str, str],
                   hints: list[str] | None = None) -> str:
    lines = [f"{source}: the recipe is not valid ({len(errors)} problem{'s' if len(errors) != 1 else ''}):"]
    for key, msg, value in errors:
        origin = f" (from --set {key}={overrides[key]})" if key in overrides else ""
        shown = "" if value is _MISSING else f" (got {format_value(value)})"
        lines.append(f"  - {key or '<top level>'}: {msg}{shown}{origin}")
    lines.extend(hints or [])
    lines.append("Fix these keys in the recipe (see docs/recipes.md, or `capsgan plugins` for component params).")
    return "\n".join(lines)


def _switched_plugin_hint(key: str, plugin: str, errors: list[tuple[str, str, Any]], overrides: dict[str, str]) -> str | None:
    """A hint when ``--set KEY.plugin=X`` left the recipe's parameters of its former plugin behind."""
    if f"{key}.plugin" not in overrides or not any(msg == "unknown key" for _, msg, _ in errors):
        return None
    return (f"{key}.plugin was changed with --set, but [{key}] still holds the parameters of the recipe's own "
            f"plugin, which \"{plugin}\" does not take. Replace the whole table instead: "
            f"--set '{key}={{plugin=\"{plugin}\"}}' (then set its own parameters with --set {key}.NAME=VALUE; "
            f"`capsgan plugins` lists them).")


_MISSING = object()


def _pydantic_errors(exc: ValidationError, prefix: str = "") -> list[tuple[str, str, Any]]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        key = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        value = _MISSING if err["type"] in ("missing",) else err.get("input", _MISSING)
        if err["type"] == "extra_forbidden" or isinstance(value, dict):
            value = value if not isinstance(value, dict) else _MISSING
        out.append((key, msg, value))
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.path=value``; the value is read as TOML, else taken as a string."""
    if "=" not in text:
        raise RecipeError(f'--set "{text}": expected key.path=value, for example --set run.epochs=5.')
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f'--set "{text}": the key "{key}" is not a dotted path such as encoder.primary_types.')
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def apply_overrides(data: dict, overrides: list[str]) -> dict[str, str]:
    """Apply ``--set`` overrides to the raw recipe dict in place; return key -> raw text."""
    applied = {}
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(
                    f'--set {text}: "{".".join(parts[: i + 1])}" is a value, not a table, so it has no key "{parts[i + 1]}".'
                )
            node = child
        node[parts[-1]] = value
        applied[key] = text.split("=", 1)[1]
    return applied


def resolve(data: dict, registry: Registry, *, source: str = "<recipe>", overrides: dict[str, str] | None = None,
            training: bool = True) -> ResolvedRecipe:
    """Validate a raw recipe dict in both passes and return a :class:`ResolvedRecipe`.

    ``training``: also check the packages training needs (``output.tensorboard``); off for a trained run.

    Raises:
        RecipeError: listing every problem with its dotted key.
    """
    overrides = overrides or {}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_errors(_pydantic_errors(exc), source, overrides)) from None

    errors: list[tuple[str, str, Any]] = []
    hints: list[str] = []
    params: dict[str, BaseModel] = {}
    for key, family, spec in recipe.component_slots():
        try:
            comp = registry.get(family, spec.plugin)
        except RegistryError as exc:
            names = registry.list(family)
            detail = str(exc) if "clash" in str(exc).lower() or ":" in spec.plugin else (
                f'unknown {family} "{spec.plugin}".{suggest(spec.plugin, names)} '
                f"Allowed: {', '.join(names) or '(none registered)'}")
            errors.append((f"{key}.plugin", detail, _MISSING))
            continue
        try:
            params[key] = comp.params_model.model_validate(spec.params)
        except ValidationError as exc:
            slot_errors = _pydantic_errors(exc, key)
            errors.extend(slot_errors)
            hint = _switched_plugin_hint(key, spec.plugin, slot_errors, overrides)
            if hint:
                hints.append(hint)
    optim: dict[str, BaseModel] = {}
    if "objective.plugin" not in {e[0] for e in errors}:
        objective = registry.get("objective", recipe.objective.plugin).cls
        errors.extend(_objective_errors(recipe, objective))
        optim = _resolve_optim(recipe, objective, data.get("optim") or {}, errors)
    errors.extend((key, msg, _MISSING) for key, msg in (recipe.ema.check(recipe) if recipe.ema else []))
    errors.extend((key, msg, _MISSING) for key, msg in (recipe.augment.check() if recipe.augment else []))
    if training and recipe.output.tensorboard and importlib.util.find_spec("tensorboard") is None:
        errors.append(("output.tensorboard", 'needs the tensorboard package, which is not installed here: '
                       'pip install "capsgan-toolkit[tensorboard]" (or set output.tensorboard = false)', True))
    if training and recipe.output.mlflow is not False and importlib.util.find_spec("mlflow") is None:
        errors.append(("output.mlflow", 'needs the mlflow package, which is not installed here: '
                       'pip install "capsgan-toolkit[mlflow]" (or set output.mlflow = false)', True))
    if training and recipe.output.wandb is not False and importlib.util.find_spec("wandb") is None:
        errors.append(("output.wandb", 'needs the wandb package, which is not installed here: '
                       'pip install "capsgan-toolkit[wandb]" (or set output.wandb = false)', True))
    if errors:
        raise RecipeError(_format_errors(errors, source, overrides, hints))
    return ResolvedRecipe(recipe, params, source, optim)


def _objective_errors(recipe: Recipe, objective) -> list[tuple[str, str, Any]]:
    """Check that the recipe has the tables the objective needs and none it would ignore."""
    name, errors = recipe.objective.plugin, []
    for key, _family in SLOTS:
        if key in ("data", "objective", "gate"):
            continue
        present = recipe.spec(key) is not None
        if key not in objective.parts and present:
            errors.append((key, f'the "{name}" objective uses no [{key}]; remove it (or choose another objective)',
                           _MISSING))
        elif objective.parts.get(key) and not present:
            errors.append((key, f'the "{name}" objective needs the [{key}] table', _MISSING))
    check = getattr(objective, "check_recipe", None)
    if check is not None:
        errors.extend((key, msg, _MISSING) for key, msg in check(recipe))
    return errors


def _resolve_optim(recipe: Recipe, objective, raw: dict, errors: list) -> dict[str, BaseModel]:
    """Fill each of the objective's optimizers from its defaults and the recipe's ``[optim.<name>]``."""
    out: dict[str, BaseModel] = {}
    for name in recipe.optim:
        if name not in objective.optimizers:
            errors.append((f"optim.{name}", f'the "{recipe.objective.plugin}" objective has no optimizer "{name}".'
                           f"{suggest(name, list(objective.optimizers))} Its optimizers: "
                           f"{', '.join(objective.optimizers)}", _MISSING))
    for name, defaults in objective.optimizers.items():
        entry = raw.get(name)
        given = entry if isinstance(entry, dict) else {}
        try:
            out[name] = OptimizerSpec.model_validate({**defaults, **given})
        except ValidationError as exc:
            errors.extend(_pydantic_errors(exc, f"optim.{name}"))
    return out


def with_defaults(saved: dict[str, Any], registry: Registry | None) -> dict[str, Any]:
    """A saved (resolved) recipe with the keys added to the toolkit since it was written, at their defaults.

    A run trained before a key existed trained as that key's default does (a new key's default
    keeps the old behaviour), so a resume or a comparison's re-run compares the saved recipe
    with this, not with the bare file: ``(absent) -> default`` is no change, ``(absent) -> any
    other value`` still is. Every key the saved recipe has keeps its saved value. A saved
    recipe that no longer validates, or no ``registry`` to validate it with, returns it as it is.
    """
    if registry is None:
        return saved
    try:
        filled = resolve(saved, registry, training=False).to_dict()
    except CapsganError:
        return saved

    def overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in top.items():
            out[key] = overlay(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    return overlay(filled, saved)


def resolve_file(path: str | Path, registry: Registry, overrides: list[str] | None = None) -> ResolvedRecipe:
    """Read, override and validate a recipe file against a registry whose plugins are loaded already.

    :func:`capsgan_toolkit.api.load_recipe` is the one commands call: it loads the plugins the
    recipe names first, then resolves.

    Args:
        path: the TOML recipe.
        registry: the filled component registry.
        overrides: ``key.path=value`` strings from ``--set``.

    Returns:
        The :class:`ResolvedRecipe`.

    Raises:
        RecipeError: unreadable file, bad TOML, or a recipe that does not validate.
    """
    data = read_toml(path)
    applied = apply_overrides(data, overrides or [])
    return resolve(data, registry, source=str(path), overrides=applied)
