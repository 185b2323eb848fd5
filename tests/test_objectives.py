"""The objectives: each trains through the command line, and the report's algorithm does what the gate says."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import TINY_RECIPE, invoke, write_toml

from capsgan_toolkit.errors import ContractError, RecipeError
from capsgan_toolkit.interfaces import Encoder, EncoderParams, Phases
from capsgan_toolkit.recipe.build import build
from capsgan_toolkit.recipe.schema import resolve

DCGAN = {
    "run": {"name": "tiny-dcgan", "seed": 0, "epochs": 1, "device": "cpu", "steps_per_epoch": 3, "log_every": 1},
    "data": TINY_RECIPE["data"],
    "objective": {"plugin": "dcgan", "latent_rows": 4, "latent_dim": 4, "conditional": True},
    "generator": {"plugin": "dcgan", "base_channels": 8},
    "discriminator": {"plugin": "dcgan", "base_channels": 8},
    "losses": {"adversarial": {"plugin": "nonsaturating"}},
    "eval": {"metrics": ["acc", "rec", "gen_fid"], "num_images": 16, "prior_images": 0,
             "features": {"domain": {"plugin": "domain_classifier", "epochs": 1, "channels": 8, "feature_dim": 16,
                                     "batch_size": 16}}},
}
CLASSIFIER = {
    "run": {"name": "tiny-cls", "seed": 0, "epochs": 1, "device": "cpu", "steps_per_epoch": 3, "log_every": 1},
    "data": TINY_RECIPE["data"],
    "objective": {"plugin": "classifier"},
    "encoder": TINY_RECIPE["encoder"],
    "losses": {"classification": {"plugin": "margin"}},
}


@pytest.mark.parametrize("recipe", [TINY_RECIPE, DCGAN, CLASSIFIER], ids=["reconstruction_gan", "dcgan", "classifier"])
def test_every_objective_trains_a_few_steps_through_the_cli(recipe, tmp_path):
    path = write_toml(tmp_path / "r.toml", copy.deepcopy(recipe))
    result = invoke("run", path, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 * recipe["run"]["epochs"] and summary["objective"] == recipe.get(
        "objective", {"plugin": "reconstruction_gan"})["plugin"]
    models = set(summary["parameters"])
    expected = {"reconstruction_gan": {"encoder", "generator", "discriminator"},
                "dcgan": {"generator", "discriminator"}, "classifier": {"encoder"}}[summary["objective"]]
    assert models == expected
    has_picture = summary["objective"] != "classifier"
    assert bool(list((tmp_path / "run" / "samples").glob("epoch_*.png"))) == has_picture


def test_dcgan_is_evaluated_with_the_same_protocol_and_says_what_it_lacks(tmp_path):
    path = write_toml(tmp_path / "r.toml", copy.deepcopy(DCGAN))
    assert invoke("run", path, "--out", tmp_path / "run", "--quiet").exit_code == 0
    result = invoke("eval", tmp_path / "run", "--set", f"eval.cache_dir={tmp_path / 'cache'}")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert "gen_fid16_test_domain" in report["metrics"]
    assert not any(k.startswith(("acc", "rec")) for k in report["metrics"])
    assert any("encoder" in why for why in report["skipped"].values()), report["skipped"]


def test_a_recipe_must_fit_its_objective(registry):
    dcgan_with_encoder = copy.deepcopy(DCGAN)
    dcgan_with_encoder["encoder"] = {"plugin": "cnn"}
    with pytest.raises(RecipeError, match=r'encoder: the "dcgan" objective uses no \[encoder\]'):
        resolve(dcgan_with_encoder, registry)
    missing = copy.deepcopy(CLASSIFIER)
    del missing["encoder"]
    with pytest.raises(RecipeError, match=r'encoder: the "classifier" objective needs the \[encoder\] table'):
        resolve(missing, registry)
    bad_optim = copy.deepcopy(CLASSIFIER)
    bad_optim["optim"] = {"encoder_generator": {"lr": 1e-3}}
    with pytest.raises(RecipeError, match=r'optim.encoder_generator: the "classifier" objective has no optimizer'):
        resolve(bad_optim, registry)


# ----------------------------------------------------------------- the report's algorithm, step by step


class _Recorder:
    """An ``update`` that back-propagates and steps like the loop, and records each call's gradients."""

    def __init__(self, built):
        self.built = built
        self.params = built.objective.optimizer_parameters()
        self.opts = {n: torch.optim.SGD(p, lr=0.1) for n, p in self.params.items() if p}
        self.calls = []

    def __call__(self, name, loss, terms):
        opt = self.opts[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = {part: {n: (p.grad.clone() if p.grad is not None else None) for n, p in m.named_parameters()}
                 for part, m in self.built.modules().items()}
        self.calls.append((name, sorted(terms), grads))
        opt.step()
        return True


def _built(registry_plugins, **losses):
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["losses"].update(losses)
    return build(resolve(recipe, registry_plugins.registry), registry_plugins)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(8, 1, 28, 28, generator=g) * 2 - 1, torch.arange(8) % 10


def _weights(module):
    """The trainable weights (BatchNorm's running statistics move whenever D measures its accuracy)."""
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_discriminator_weights_do_not_move_when_the_gate_stops_it(plugins):
    built = _built(plugins)
    d_before = _weights(built.parts.discriminator)
    update = _Recorder(built)
    built.objective.step(*_batch(), Phases(generator=True, discriminator=False), update)
    assert [c[0] for c in update.calls] == ["encoder_generator"]
    assert _same(d_before, _weights(built.parts.discriminator))


def test_generator_weights_do_not_move_when_its_loss_is_dropped(plugins):
    built = _built(plugins)
    g_before = _weights(built.parts.generator)
    update = _Recorder(built)
    built.objective.step(*_batch(), Phases(generator=False, discriminator=True), update)
    assert [c[0] for c in update.calls] == ["discriminator", "encoder_generator"]
    assert update.calls[1][1] == ["classification"]  # only the classification loss trains the encoder
    assert _same(g_before, _weights(built.parts.generator))


def test_discriminator_trains_on_detached_fakes_and_does_no_backward_work_in_the_generator_step(plugins):
    built = _built(plugins)
    update = _Recorder(built)
    built.objective.step(*_batch(), Phases(generator=True, discriminator=True), update)
    (d_name, d_terms, d_grads), (g_name, g_terms, g_grads) = update.calls
    assert d_name == "discriminator" and d_terms == ["discriminator"]
    # D's loss reaches neither the encoder nor the generator: the fakes were detached.
    assert all(g is None for part in ("encoder", "generator") for g in d_grads[part].values())
    assert any(g is not None for g in d_grads["discriminator"].values())
    assert g_name == "encoder_generator" and g_terms == ["adversarial", "classification", "reconstruction"]
    # The generator step adds no gradient to D's weights (D is frozen while G is scored): they are
    # still exactly what D's own step left.
    assert all(torch.equal(g_grads["discriminator"][n], d_grads["discriminator"][n]) for n in d_grads["discriminator"])


def test_the_adversarial_term_reaches_the_encoder(plugins):
    images, labels = _batch()
    grads = []
    for weight in (0.0, 1.0):
        built = _built(plugins, adversarial_weight=weight, reconstruction_weight=0.0)
        update = _Recorder(built)
        built.objective.step(images, labels, Phases(generator=True, discriminator=False), update)
        grads.append(torch.cat([g.flatten() for g in update.calls[-1][2]["encoder"].values()]))
    assert not torch.allclose(grads[0], grads[1]), "the adversarial loss changed no encoder gradient"


class _WrongShapeEncoder(Encoder):
    """An encoder that forgets the capsule dimension: returns (B, K) instead of (B, K, D)."""

    def __init__(self, params: EncoderParams, *, image_shape, num_classes):
        super().__init__(params, image_shape=image_shape, num_classes=num_classes)
        self.capsule_dim = 4
        self.linear = torch.nn.Linear(28 * 28, num_classes)

    def forward(self, images):
        return self.linear(images.flatten(1))


def _contract_error(name: str, encoder_cls, source: str) -> str:
    """Build the tiny recipe with ``encoder_cls`` registered as encoder ``name``; return the ContractError's text."""
    from capsgan_toolkit.plugin.manager import load_plugins

    plugins = load_plugins()  # its own: the session's shared plugin set stays as installed
    plugins.registry.current_source = source
    try:
        plugins.registry.register("encoder", name, encoder_cls)
    finally:
        plugins.registry.current_source = "<unknown>"
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["encoder"] = {"plugin": name}
    with pytest.raises(ContractError) as info:
        build(resolve(recipe, plugins.registry), plugins)
    return str(info.value)


def test_a_wrong_shape_encoder_is_named_before_any_run_folder_exists(tmp_path):
    text = _contract_error("wrong_shape", _WrongShapeEncoder, "wrong_shape_test")
    assert 'the encoder "wrong_shape" of [encoder] (from wrong_shape_test)' in text
    assert "returned shape (2, 10)" in text and "(B, K, D) = (2, 10, 4)" in text
    assert "no run folder was made" in text


class _WrongShapeWhenTraining(_WrongShapeEncoder):
    """Right shape in eval mode, (B, K) in training mode: only a training-mode check finds it."""

    def forward(self, images):
        scores = self.linear(images.flatten(1))
        return scores if self.training else scores.unsqueeze(-1).expand(-1, -1, self.capsule_dim)


def test_an_encoder_wrong_only_in_training_mode_is_named_before_any_run_folder_exists(tmp_path):
    text = _contract_error("wrong_when_training", _WrongShapeWhenTraining, "wrong_when_training_test")
    assert "returned shape (2, 10) in training mode" in text and "(B, K, D) = (2, 10, 4)" in text


def test_the_contract_check_changes_no_weight_buffer_or_random_state(plugins):
    recipe = copy.deepcopy(TINY_RECIPE)  # the tiny generator and discriminator have BatchNorm
    checked = build(resolve(recipe, plugins.registry), plugins, check=True)
    after_check = torch.random.get_rng_state()
    plain = build(resolve(recipe, plugins.registry), plugins, check=False)
    assert torch.equal(after_check, torch.random.get_rng_state())
    for name, module in plain.modules().items():
        theirs = checked.modules()[name].state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(value, theirs[key]), f"{name}.{key} changed by the contract check"
        assert checked.modules()[name].training == module.training


def test_classify_and_reconstruct_in_one_encoder_pass_equals_the_two_calls(plugins):
    built = _built(plugins)
    objective, encoder = built.objective.eval(), built.parts.encoder
    images, _ = _batch()
    calls = []
    hook = encoder.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        scores, recon = objective.classify_and_reconstruct(images)
        assert len(calls) == 1  # the encoder ran once for both
        assert torch.equal(scores, objective.classify(images)) and torch.equal(recon, objective.reconstruct(images))
    hook.remove()
