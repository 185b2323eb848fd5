"""The contract check of the objective family: a tiny recipe around it, trained two steps.

Import it from :mod:`capsgan_toolkit.testing`; this module is its implementation.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.testing.base import BATCH, _check_tensor, _Checker, check_params

# --------------------------------------------------------------------------- objectives

_KIT_PARTS: dict[str, dict[str, Any]] = {
    "encoder": {"plugin": "cnn", "channels": 4, "capsule_dim": 4, "latent": "true_class"},
    "generator": {"plugin": "dcgan", "base_channels": 4},
    "discriminator": {"plugin": "dcgan", "base_channels": 4},
    "losses.classification": {"plugin": "margin"},
    "losses.reconstruction": {"plugin": "mse"},
    "losses.adversarial": {"plugin": "minimax"},
}
"""Built-in parts :func:`check_objective` puts around an objective, per recipe key (tiny widths)."""


def _kit_recipe(objective: dict[str, Any], parts: Mapping[str, Mapping[str, Any] | None], steps: int) -> dict:
    recipe: dict[str, Any] = {
        "run": {"name": "capsgan-kit", "seed": 0, "epochs": 1, "device": "cpu", "steps_per_epoch": steps,
                "log_every": 1, "eval_batches": 1, "val_fraction": 0.0},
        "data": {"plugin": "glyphs", "image_size": 28, "channels": 1, "num_train": 40, "num_test": 20,
                 "batch_size": 8, "noise": 0.0},
        "objective": objective,
        "gate": {"plugin": "always"},
        "checkpoint": {"every_epochs": 0, "keep_last": 1},
        "output": {"sample_images": 4},
        "eval": {"metrics": ["acc"], "prior_images": 40},
    }
    for key, table in parts.items():
        if table is None:
            continue
        node = recipe
        *outer, last = key.split(".")
        for part in outer:
            node = node.setdefault(part, {})
        node[last] = dict(table)
    if "losses" in recipe:
        recipe["losses"].setdefault("generator_weight", 1.0)
    return recipe


def check_objective(objective_cls: type, params: Mapping[str, Any] | None = None, *,
                    parts: Mapping[str, Mapping[str, Any] | None] | None = None,
                    sets: Sequence[str] = (), steps: int = 2) -> None:
    """Check an objective by training it: a tiny recipe, the engine's contract checks, ``steps`` steps.

    The recipe uses the glyphs data set (28x28 grey, 10 classes) and, for each recipe key the
    objective declares in ``parts``, a tiny built-in (:data:`_KIT_PARTS`: ``cnn`` encoder,
    ``dcgan`` generator and discriminator, ``margin``/``mse``/``minimax`` losses). It checks that
    the recipe validates; :func:`capsgan_toolkit.recipe.build.build` with its contract checks
    (:func:`~capsgan_toolkit.recipe.build.check_contracts`) passes; ``optimizer_parameters()`` names
    exactly the declared ``optimizers``; training ``steps`` steps in a temporary run folder
    writes finite losses, changes the weights of every optimizer's parameters and a final
    checkpoint; a second run with the same seed logs the same losses; and what the objective
    says it can do works: ``classify`` gives finite ``(B, K)`` scores, ``reconstruct`` and
    ``generate`` images of the data set's shape in ``[-1, 1]``, ``generate`` the same images
    for the same ``torch.Generator`` seed.

    Args:
        objective_cls: the objective class. It need not be registered: an unregistered class
            is registered for the check under the name ``kit_objective``.
        params: its params (its ``[objective]`` table); ``None``: the defaults.
        parts: recipe tables to use instead of the built-ins, by recipe key
            (``{"encoder": {"plugin": "capsnet", ...}}``); ``None`` as a value leaves a key out.
        sets: ``--set`` style overrides applied to the tiny recipe last.
        steps: training steps.

    Raises:
        ContractViolation: naming the check and the component.
    """
    from capsgan_toolkit.objective import PART_KEYS, Objective
    from capsgan_toolkit.plugin.manager import load_plugins
    from capsgan_toolkit.recipe.build import build
    from capsgan_toolkit.recipe.schema import apply_overrides, resolve

    chk = _Checker("check_objective", "objective", objective_cls)
    chk.expect(isinstance(objective_cls, type) and issubclass(objective_cls, Objective), "base class",
               "it does not subclass capsgan_toolkit.objective.Objective")
    p = check_params(objective_cls, params)
    declared = dict(objective_cls.parts)
    unknown = sorted(set(declared) - set(PART_KEYS))
    chk.expect(not unknown, "declaration", f"parts names {unknown}; the recipe keys are {', '.join(PART_KEYS)}")
    chk.expect(bool(objective_cls.optimizers), "declaration", "optimizers is empty: name at least one optimizer")
    plugins = load_plugins()
    registry = plugins.registry
    name = next((registry.recipe_name(c) for c in registry.components("objective") if c.cls is objective_cls), None)
    if name is None:
        registry.current_source = "capsgan_toolkit.testing"
        try:
            with chk.running("register", "registering it"):
                registry.register("objective", "kit_objective", objective_cls)
        finally:
            registry.current_source = "<unknown>"
        name = "kit_objective"
    tables = {key: _KIT_PARTS[key] for key in declared}
    tables.update(parts or {})
    objective_table = {"plugin": name, **p.model_dump(mode="json", by_alias=True, exclude_none=True)}

    def fit(run_dir: Path):
        from capsgan_toolkit.training.trainer import Trainer

        data = _kit_recipe(objective_table, tables, steps)
        apply_overrides(data, list(sets))
        try:
            resolved = resolve(data, registry, source="the check_objective recipe")
        except CapsganError as exc:
            raise chk.fail("recipe", f"the tiny recipe around it does not validate (pass parts= or sets= to "
                           f"adapt it): {exc}") from None
        with chk.running("contracts", "building the recipe (with the engine's contract checks)"):
            built = build(resolved, plugins)
        objective = built.objective
        with chk.running("optimizers", "optimizer_parameters()"):
            groups = objective.optimizer_parameters()
        chk.expect(set(groups) == set(objective_cls.optimizers), "optimizers",
                   f"optimizer_parameters() names {sorted(groups)}; optimizers declares "
                   f"{sorted(objective_cls.optimizers)}")
        owned = {id(t) for m in objective.modules().values() for t in m.parameters()}
        for group, tensors in groups.items():
            chk.expect(all(id(t) in owned for t in tensors), "optimizers",
                       f'optimizer "{group}" steps parameters of no model in modules()')
        before = {group: [t.detach().clone() for t in tensors] for group, tensors in groups.items()}
        (run_dir / "checkpoints").mkdir(parents=True)
        with chk.running("training", f"training {steps} steps"):
            trainer = Trainer(resolved, plugins, run_dir, built=built)
            trainer.monitor.plot = lambda *args, **kwargs: None  # the loss-curve picture: slow, and not the objective's
            summary = trainer.fit()
        chk.expect(summary.get("steps") == steps, "training", f"the run made {summary.get('steps')} steps, not {steps}")
        chk.expect((run_dir / "checkpoints" / "final.pt").is_file(), "training", "no final checkpoint was written")
        for group, tensors in groups.items():
            if tensors:
                changed = any(not torch.equal(a, t.detach()) for a, t in zip(before[group], tensors))
                chk.expect(changed, "training", f'{steps} steps changed no parameter of optimizer "{group}": does '
                           "step() call update(...) with a loss that depends on them?")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r.get("kind") == "train"]
        chk.expect(len(train) == steps, "training", f"metrics.jsonl has {len(train)} training rows for {steps} steps")
        losses = [{k: v for k, v in r.items() if k.startswith("loss_")} for r in train]
        chk.expect(all(losses), "training", "step() reports no loss (StepResult.values is empty)")
        for row in losses:
            for key, value in row.items():
                chk.expect(isinstance(value, (int, float)) and math.isfinite(value), "finite", f"{key} is {value!r}")
        return built, losses

    with tempfile.TemporaryDirectory(prefix="capsgan-kit-") as tmp:
        built, losses = fit(Path(tmp) / "a")
        _, again = fit(Path(tmp) / "b")
    chk.expect(losses == again, "determinism", f"two runs with the same seed log different losses: {losses} and "
               f"{again}; draw random numbers from torch only and never from a fresh, unseeded generator")
    _check_trained_objective(chk, built)


def _check_trained_objective(chk: _Checker, built) -> None:
    objective, info = built.objective, built.info
    shape, k = tuple(info.image_shape), info.num_classes
    split = built.dataset.split("test")
    images = torch.stack([split[i][0] for i in range(BATCH)])
    objective.eval()
    with torch.no_grad():
        if objective.has_classifier:
            with chk.running("classify", "classify(images)"):
                scores = objective.classify(images)
            _check_tensor(chk, "classify", "classify(images)", scores, (BATCH, k))
        if objective.has_reconstruction:
            with chk.running("reconstruct", "reconstruct(images)"):
                recon = objective.reconstruct(images)
            _check_tensor(chk, "reconstruct", "reconstruct(images)", recon, (BATCH, *shape), (-1.0, 1.0))
        if objective.has_generation:
            with chk.running("generate", "prepare_generation(...)"):
                objective.prepare_generation(built.dataset.split("train"), limit=40, seed=0, batch_size=20,
                                             device=torch.device("cpu"))
            classes = torch.arange(BATCH) % k
            outs = []
            for _ in range(2):
                with chk.running("generate", "generate(classes, generator)"):
                    outs.append(objective.generate(classes, torch.Generator().manual_seed(5)))
            _check_tensor(chk, "generate", "generate(classes, generator)", outs[0], (BATCH, *shape), (-1.0, 1.0))
            chk.expect(torch.equal(outs[0], outs[1]), "determinism",
                       "generate gives different images for the same torch.Generator seed: draw the noise from it")
