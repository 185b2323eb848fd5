"""The third-party example package in examples/capsgan-example-encoder, used as a user would."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from pydantic import ValidationError

from capsgan_toolkit import hookimpl
from capsgan_toolkit.errors import RecipeError
from capsgan_toolkit.interfaces import Encoder, EncoderParams
from capsgan_toolkit.plugin.manager import load_plugins
from capsgan_toolkit.recipe.schema import resolve_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "capsgan-example-encoder"
MODULE = "capsgan_example_encoder"
RECIPE = EXAMPLE / "recipes" / "example.toml"

# --set style overrides that shrink the example recipe to a few seconds on a CPU.
TINY = [
    "run.device=cpu", "run.epochs=1", "run.steps_per_epoch=3", "run.log_every=1", "run.eval_batches=1",
    "data.num_train=48", "data.num_test=16", "data.batch_size=8",
    "encoder.embed_dim=4", "encoder.hidden=16",
    "generator.base_channels=4", "discriminator.base_channels=4",
    'gate={plugin="always"}',  # G and D train from the first step, so every code path runs
    "output.sample_images=4",
]


@pytest.fixture
def example(monkeypatch):
    """The plugins with the example module named explicitly, as a recipe's run.plugins would."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    loaded = load_plugins([MODULE])
    assert not loaded.broken, loaded.broken
    return loaded


def _encoder(example, params=None, image_shape=(1, 28, 28), num_classes=10):
    return example.registry.create("encoder", "patch_mlp", params or {}, image_shape=image_shape,
                                   num_classes=num_classes)


def test_pyproject_declares_the_capsgan_entry_point():
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["name"] == "capsgan-example-encoder"
    assert project["entry-points"]["capsgan"] == {"example_encoder": MODULE}
    assert any(dep.replace(" ", "").startswith("capsgan-toolkit") for dep in project["dependencies"])
    assert (EXAMPLE / MODULE / "__init__.py").is_file()


def test_example_registers_its_encoder_with_documented_params(example):
    comp = example.registry.get("encoder", "patch_mlp")
    assert comp.source == MODULE
    assert example.sources[MODULE] == "recipe run.plugins"
    assert issubclass(comp.cls, Encoder) and issubclass(comp.params_model, EncoderParams)
    for name, field in comp.params_model.model_fields.items():
        assert field.description, f"patch_mlp param {name} has no description"
    with pytest.raises(ValidationError, match="extra"):
        comp.params_model.model_validate({"patch_sise": 4})
    assert "cnn" in example.registry.list("encoder")  # the built-ins are still there


def _reference_forward(enc, images: np.ndarray) -> np.ndarray:
    """The patch-MLP encoder in float64 numpy, patches cut by reshaping (no convolution)."""
    w = {k: v.detach().double().numpy() for k, v in enc.state_dict().items()}
    b, c, h, wd = images.shape
    p = enc.params.patch_size
    patches = images.reshape(b, c, h // p, p, wd // p, p).transpose(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(b, h // p, wd // p, c * p * p)
    embed = w["embed.weight"].reshape(len(w["embed.bias"]), -1)
    feat = np.maximum(patches @ embed.T + w["embed.bias"], 0.0)  # (B, gh, gw, E)
    feat = feat.transpose(0, 3, 1, 2).reshape(b, -1)  # channel-major, as a conv output flattens
    hidden = np.maximum(feat @ w["mix.weight"].T + w["mix.bias"], 0.0)
    s = (hidden @ w["head.weight"].T + w["head.bias"]).reshape(b, enc.num_classes, enc.capsule_dim)
    norm = np.linalg.norm(s, axis=-1, keepdims=True)
    return s * norm / (1.0 + norm**2)  # squash: |s|^2 / (1 + |s|^2) * s / |s|


@pytest.mark.parametrize(
    "image_shape, params",
    [((1, 8, 8), {"patch_size": 4, "embed_dim": 3, "hidden": 12, "capsule_dim": 5}),
     ((3, 6, 9), {"patch_size": 3, "embed_dim": 2, "hidden": 7, "capsule_dim": 4})],
    ids=["grey-square", "rgb-wide"],
)
def test_forward_matches_float64_reference(example, image_shape, params):
    torch.manual_seed(0)
    enc = _encoder(example, params, image_shape=image_shape, num_classes=3).eval()
    images = torch.rand(4, *image_shape) * 2 - 1
    capsules = enc(images)
    assert capsules.shape == (4, 3, params["capsule_dim"])
    want = _reference_forward(enc, images.double().numpy())
    np.testing.assert_allclose(capsules.detach().double().numpy(), want, rtol=1e-4, atol=1e-6)
    lengths = enc.class_scores(capsules)
    assert (lengths >= 0).all() and (lengths < 1).all()


def test_training_forward_logs_diagnostics_and_gradients_are_finite(example):
    torch.manual_seed(0)
    enc = _encoder(example, {"embed_dim": 2, "hidden": 8, "capsule_dim": 3}).train()
    capsules = enc(torch.rand(2, 1, 28, 28) * 2 - 1)
    assert enc.diagnostics["capsule_length_mean"] == pytest.approx(enc.class_scores(capsules).mean().item())
    capsules.pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())


def test_squash_gradient_is_finite_at_zero_length(example):
    squash = sys.modules[MODULE].squash  # imported by the example fixture
    s = torch.zeros(2, 3, 4, requires_grad=True)
    out = squash(s)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.isfinite(s.grad).all()


def test_patch_size_that_does_not_divide_the_image_is_a_clear_error(example):
    with pytest.raises(RecipeError, match=r"patch_size = 5 does not divide the 28x28 images.*1, 2, 4, 7, 14, 28"):
        _encoder(example, {"patch_size": 5})


def test_example_recipe_validates_and_reports_typos(example):
    resolved = resolve_file(RECIPE, example.registry)
    assert resolved.recipe.encoder.plugin == "patch_mlp"
    assert resolved.recipe.data.plugin == "glyphs"
    assert resolved.params["encoder"].patch_size == 4
    with pytest.raises(RecipeError, match=r"encoder\.patch_sise: unknown key .*--set encoder\.patch_sise=3"):
        resolve_file(RECIPE, example.registry, ["encoder.patch_sise=3"])


def test_example_recipe_trains_a_few_steps(example, tmp_path):
    from capsgan_toolkit.training.trainer import Trainer

    events = []

    class Observer:
        @hookimpl
        def capsgan_run_start(self, event):
            events.append(("run_start", event))

        @hookimpl
        def capsgan_epoch_end(self, event):
            events.append(("epoch_end", event))

        @hookimpl
        def capsgan_run_end(self, event):
            events.append(("run_end", event))

    example.manager.register(Observer(), name="observer")
    resolved = resolve_file(RECIPE, example.registry, TINY)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    trainer = Trainer(resolved, example, run_dir)
    assert type(trainer.built.parts.encoder).__module__ == MODULE
    before = {k: v.clone() for k, v in trainer.built.parts.encoder.state_dict().items()}
    summary = trainer.fit()
    assert summary["steps"] == 3 and summary["epochs"] == 1
    assert (run_dir / "checkpoints" / "final.pt").is_file()
    after = trainer.built.parts.encoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "training did not change the encoder"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 3 and all("capsule_length_mean" in r for r in train)
    assert all(r["gate_generator"] == 1.0 and r["gate_discriminator"] == 1.0 for r in train)
    assert all(r["loss_reconstruction"] > 0 and "loss_adversarial" in r for r in train)
    assert [e for e, _ in events] == ["run_start", "epoch_end", "run_end"]
    assert events[0][1].recipe["encoder"]["plugin"] == "patch_mlp"
    assert events[1][1].metrics["step"] == 3 and events[2][1].summary == summary
