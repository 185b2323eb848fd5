"""The reconstruction GAN's options beyond the report: which parts each loss term trains, the
generation path, class consistency, feature matching, R1, the generator weight's meaning, the
projection discriminator, bad params, exact resume with every option on, and the defaults unchanged."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_RECIPE, write_toml

from capsgan_toolkit import api
from capsgan_toolkit.errors import RecipeError
from capsgan_toolkit.interfaces import Discriminator, Phases
from capsgan_toolkit.recipe.build import build
from capsgan_toolkit.recipe.schema import resolve
from capsgan_toolkit.rundir import checkpoint as ckpt
from capsgan_toolkit.training.monitor import Monitor

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

EVERY_OPTION = {"prior_adversarial_weight": 0.5, "class_consistency_weight": 0.1, "feature_matching_weight": 1.0,
                "r1_weight": 2.0}
CAPSNET = {"plugin": "capsnet", "conv1_channels": 8, "conv1_kernel": 5, "primary_types": 2, "primary_kernel": 5,
           "class_dim": 4, "latent": "all"}


def _recipe(objective: dict | None = None, *, encoder: dict | None = None, discriminator: dict | None = None,
            **losses) -> dict:
    recipe = copy.deepcopy(TINY_RECIPE)
    if objective is not None:
        recipe["objective"] = {"plugin": "reconstruction_gan", **objective}
    if encoder is not None:
        recipe["encoder"] = encoder
    if discriminator is not None:
        recipe["discriminator"].update(discriminator)
    recipe["losses"].update(losses)
    return recipe


def _build(plugins, recipe):
    return build(resolve(recipe, plugins.registry), plugins)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(8, 1, 28, 28, generator=g) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values() if g is not None])


class _Recorder:
    """An ``update`` that steps like the loop (SGD here) and records, before each backward, the parts
    each loss term's gradient reaches, the loss and its terms, and afterwards every part's gradient."""

    def __init__(self, built, hook=None):
        self.built, self.hook = built, hook
        self.modules = built.modules()
        self.opts = {n: torch.optim.SGD(p, lr=0.05) for n, p in built.objective.optimizer_parameters().items() if p}
        self.reach: dict[str, set[str]] = {}
        self.calls: list[tuple[str, torch.Tensor, dict, dict]] = []

    def __call__(self, name, loss, terms):
        if self.hook is not None:
            self.hook(name, loss, terms)
        for term, value in terms.items():
            reached = set()
            for part, module in self.modules.items():
                params = [p for p in module.parameters() if p.requires_grad]
                grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
                if any(g is not None and bool(g.abs().sum() > 0) for g in grads):
                    reached.add(part)
            self.reach[term] = reached
        opt = self.opts[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = {part: {n: (p.grad.clone() if p.grad is not None else None) for n, p in m.named_parameters()}
                 for part, m in self.modules.items()}
        self.calls.append((name, loss.detach(), {k: v.detach() for k, v in terms.items()}, grads))
        opt.step()
        return True


def _count_calls(built) -> dict[str, int]:
    counts = dict.fromkeys(built.modules(), 0)
    for name, module in built.modules().items():
        module.register_forward_hook(lambda *_a, _n=name: counts.__setitem__(_n, counts[_n] + 1))
    return counts


# ------------------------------------------------------------------ the defaults are the report's algorithm


def test_the_options_leave_the_resolved_recipe_and_so_every_run_digest_as_they_were(registry):
    resolved = resolve(copy.deepcopy(TINY_RECIPE), registry).to_dict()
    assert resolved["objective"] == {"plugin": "reconstruction_gan"}  # unset options are left out
    assert "projection_classes" not in resolved["discriminator"]
    on = resolve(_recipe(EVERY_OPTION, discriminator={"projection_classes": 10}), registry).to_dict()
    assert on["objective"] == {"plugin": "reconstruction_gan", **EVERY_OPTION}


def test_the_default_step_is_the_reports_step_computed_by_hand(plugins):
    """The objective's gradients against the report's step written out here, part by part."""
    images, labels = _batch()
    built = _build(plugins, _recipe(generator_weight=0.3, adversarial_weight=0.7, reconstruction_weight=1.5))
    counts = _count_calls(built)
    update = _Recorder(built)
    built.objective.step(images, labels, Phases(generator=True, discriminator=True), update)
    assert counts == {"encoder": 1, "generator": 1, "discriminator": 3}  # no extra pass of any model

    hand = _build(plugins, _recipe(generator_weight=0.3, adversarial_weight=0.7, reconstruction_weight=1.5)).parts
    e, g, d = hand.encoder, hand.generator, hand.discriminator
    capsules = e(images)
    fake = g(e.to_latent(capsules, labels))
    d_loss = F.softplus(-d(images)).mean() + F.softplus(d(fake.detach())).mean()  # BCE, the minimax D loss
    d_grads = torch.autograd.grad(d_loss, list(d.parameters()))
    with torch.no_grad():
        for p, grad in zip(d.parameters(), d_grads):
            p -= 0.05 * grad  # the recorder's SGD step of D
    for p in d.parameters():
        p.requires_grad_(False)
    margin = hand.classification(capsules, labels)
    total = margin + 0.3 * (1.5 * F.mse_loss(fake, images) - 0.7 * F.softplus(d(fake)).mean())
    want = torch.autograd.grad(total, list(e.parameters()) + list(g.parameters()))
    (_, d_loss_seen, _, d_seen), (_, _, _, g_seen) = update.calls
    assert torch.allclose(d_loss_seen, d_loss.detach())
    assert torch.allclose(_flat(d_seen["discriminator"]), torch.cat([x.flatten() for x in d_grads]), atol=1e-6)
    n_enc = len(list(e.parameters()))
    assert torch.allclose(_flat(g_seen["encoder"]), torch.cat([x.flatten() for x in want[:n_enc]]), atol=1e-6)
    assert torch.allclose(_flat(g_seen["generator"]), torch.cat([x.flatten() for x in want[n_enc:]]), atol=1e-6)


# ------------------------------------------------------------------ which parts each term trains

REACH = {"classification": {"encoder"}, "reconstruction": {"encoder", "generator"},
         "adversarial": {"encoder", "generator"}, "feature_matching": {"encoder", "generator"},
         "prior_adversarial": {"generator"}, "class_consistency": {"generator"},
         "discriminator": {"discriminator"}, "r1": {"discriminator"}}


@pytest.mark.parametrize("encoder", [None, CAPSNET], ids=["cnn", "capsnet"])
@pytest.mark.parametrize("mode", [None, "encoder"])
def test_each_term_trains_the_parts_it_should_and_no_others(plugins, encoder, mode):
    options = {**EVERY_OPTION, **({"generator_weight_mode": mode} if mode else {})}
    built = _build(plugins, _recipe(options, encoder=encoder, discriminator={"projection_classes": 10},
                                    adversarial={"plugin": "nonsaturating"}))
    update = _Recorder(built)
    result = built.objective.step(*_batch(), Phases(generator=True, discriminator=True), update)
    assert update.reach == REACH
    assert set(result.values) == set(REACH)
    assert [c[0] for c in update.calls] == ["discriminator", "encoder_generator"]
    assert all(p.requires_grad for m in built.modules().values() for p in m.parameters())  # unfrozen again


def test_the_discriminator_judges_images_from_the_batch_prior_only_with_the_generation_path(plugins):
    seen = {}
    for weight in (None, 0.0):
        built = _build(plugins, _recipe({"prior_adversarial_weight": weight} if weight is not None else {}))
        counts = _count_calls(built)
        update = _Recorder(built)
        torch.manual_seed(0)
        built.objective.step(*_batch(), Phases(generator=True, discriminator=True), update)
        seen[weight] = (dict(counts), update.calls[0][1])
    # D step: real, reconstructions (+ prior images); G step: reconstructions (+ prior images)
    assert seen[None][0] == {"encoder": 1, "generator": 1, "discriminator": 3}
    assert seen[0.0][0] == {"encoder": 1, "generator": 2, "discriminator": 5}
    assert not torch.equal(seen[None][1], seen[0.0][1])  # D's loss now also covers the prior's images


# ------------------------------------------------------------------ class consistency: the encoder is a fixed judge


@pytest.mark.parametrize("encoder", [None, CAPSNET], ids=["cnn-batchnorm", "capsnet-diagnostics"])
def test_class_consistency_leaves_the_encoder_exactly_as_it_was(plugins, encoder):
    images, labels = _batch()
    after = {}
    for weight in (None, 0.5):
        built = _build(plugins, _recipe({"class_consistency_weight": weight} if weight is not None else {},
                                        encoder=encoder))
        update = _Recorder(built)
        built.objective.step(images, labels, Phases(generator=True, discriminator=False), update)
        e = built.parts.encoder
        after[weight] = ({k: v.clone() for k, v in e.state_dict().items()}, update.calls[-1][3],
                         dict(e.diagnostics), update.calls[-1][2])
    (state0, grads0, diag0, _), (state1, grads1, diag1, terms1) = after[None], after[0.5]
    assert "class_consistency" in terms1 and terms1["class_consistency"] > 0
    # Weights and buffers (BatchNorm's running statistics) after the step: what training alone made of them.
    assert all(torch.equal(state0[k], state1[k]) for k in state0), [k for k in state0 if not torch.equal(state0[k],
                                                                                                            state1[k])]
    assert torch.equal(_flat(grads0["encoder"]), _flat(grads1["encoder"]))
    assert not torch.equal(_flat(grads0["generator"]), _flat(grads1["generator"]))
    assert diag0 == diag1  # the capsnet's diagnostics describe the training batch, not the judged images
    if encoder is None:
        assert any("running_mean" in k for k in state0)


# ------------------------------------------------------------------ the generator weight


def test_generator_weight_mode_encoder_scales_only_the_gradient_into_the_encoder(plugins):
    images, labels = _batch()

    def grads(objective=None, weight=1.0, generator=True):
        built = _build(plugins, _recipe(objective, generator_weight=weight))
        update = _Recorder(built)
        built.objective.step(images, labels, Phases(generator=generator, discriminator=False), update)
        g = update.calls[-1][3]
        return _flat(g["encoder"]), (_flat(g["generator"]) if generator else None)

    shared_enc, shared_gen = grads(weight=1.0)
    class_enc, _ = grads(generator=False)  # the classification loss alone
    enc, gen = grads(objective={"generator_weight_mode": "encoder"}, weight=0.25)
    old_enc, old_gen = grads(weight=0.25)
    assert torch.allclose(gen, shared_gen, atol=1e-7)  # the generator trains on its unscaled loss
    assert torch.allclose(enc, class_enc + 0.25 * (shared_enc - class_enc), atol=1e-7)
    # "shared" (the default): the generator's gradient carries the weight too (which Adam then divides out)
    assert torch.allclose(old_gen, 0.25 * shared_gen, atol=1e-7)
    assert torch.allclose(old_enc, enc, atol=1e-7)


# ------------------------------------------------------------------ R1 and feature matching, by hand


def test_r1_in_the_discriminator_step_is_half_gamma_times_the_mean_squared_input_gradient(plugins):
    images, labels = _batch()
    built = _build(plugins, _recipe({"r1_weight": 3.0}))
    d_before = copy.deepcopy(built.parts.discriminator)
    update = _Recorder(built)
    built.objective.step(images, labels, Phases(generator=True, discriminator=True), update)
    name, loss, terms, _ = update.calls[0]
    real = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(d_before(real).sum(), real)
    want = grad.pow(2).sum((1, 2, 3)).mean()
    assert name == "discriminator" and torch.allclose(terms["r1"], want, rtol=1e-5)
    assert torch.allclose(loss, terms["discriminator"] + 1.5 * want, rtol=1e-5)


@pytest.mark.parametrize("upsampling", ["transposed", "nearest"])
def test_feature_matching_is_the_mean_over_blocks_of_the_feature_mse(plugins, upsampling):
    images, labels = _batch()
    recipe = _recipe({"feature_matching_weight": 2.0})
    recipe["generator"]["upsampling"] = upsampling
    built = _build(plugins, recipe)
    want = {}

    def by_hand(name, loss, terms):
        if name != "encoder_generator":
            return
        e, g, d = (copy.deepcopy(m) for m in (built.parts.encoder, built.parts.generator, built.parts.discriminator))
        maps = []
        for m in d.features:
            if isinstance(m, torch.nn.LeakyReLU):
                m.register_forward_hook(lambda _m, _i, out: maps.append(out.clone()))
        with torch.no_grad():
            d(g(e.to_latent(e(images), labels)))
            d(images)
        half = len(maps) // 2
        want["fm"] = torch.stack([F.mse_loss(f, r) for f, r in zip(maps[:half], maps[half:])]).mean()

    update = _Recorder(built, hook=by_hand)
    built.objective.step(images, labels, Phases(generator=True, discriminator=True), update)
    terms = update.calls[-1][2]
    assert torch.allclose(terms["feature_matching"], want["fm"], rtol=1e-5)
    assert update.reach["feature_matching"] == {"encoder", "generator"}


# ------------------------------------------------------------------ the projection discriminator in the objectives


def test_the_projection_discriminator_is_trained_on_each_images_class(plugins):
    built = _build(plugins, _recipe(discriminator={"projection_classes": 10}))
    update = _Recorder(built)
    built.objective.step(*_batch(), Phases(generator=True, discriminator=True), update)
    d_grads = update.calls[0][3]["discriminator"]
    assert d_grads["embed.weight"] is not None and d_grads["embed.weight"][[0, 1, 2]].abs().sum() > 0
    assert d_grads["embed.weight"][3:].abs().sum() == 0  # classes not in the batch: untouched
    with pytest.raises(RecipeError, match=r"projection_classes is 5, but the data set has 10 classes"):
        _build(plugins, _recipe(discriminator={"projection_classes": 5}))


def test_the_dcgan_objective_takes_a_projection_discriminator_only_when_conditional(plugins):
    recipe = {"run": dict(TINY_RECIPE["run"]), "data": TINY_RECIPE["data"],
              "objective": {"plugin": "dcgan", "latent_rows": 4, "latent_dim": 4, "conditional": False},
              "generator": {"plugin": "dcgan", "base_channels": 8},
              "discriminator": {"plugin": "dcgan", "base_channels": 8, "projection_classes": 10},
              "losses": {"adversarial": {"plugin": "hinge"}}}
    with pytest.raises(RecipeError, match="objective.conditional = true"):
        _build(plugins, recipe)
    recipe["objective"]["conditional"] = True
    built = _build(plugins, recipe)
    update = _Recorder(built)
    built.objective.step(*_batch(), Phases(generator=True, discriminator=True), update)
    assert update.calls[0][3]["discriminator"]["embed.weight"].abs().sum() > 0


# ------------------------------------------------------------------ bad params


def test_bad_option_values_are_refused_with_the_key_named(registry):
    no_disc = _recipe({"r1_weight": 1.0, "feature_matching_weight": 1.0})
    del no_disc["discriminator"], no_disc["losses"]["adversarial"]
    with pytest.raises(RecipeError) as info:
        resolve(no_disc, registry)
    text = str(info.value)
    assert "objective.r1_weight: needs a discriminator" in text and "objective.feature_matching_weight" in text
    with pytest.raises(RecipeError, match=r'prior_components \(4\) sets the Gaussians per class of prior = "mixture"'):
        resolve(_recipe({"prior": "true_slot", "prior_components": 4}), registry)
    with pytest.raises(RecipeError, match="objective.class_consistency_weight"):
        resolve(_recipe({"class_consistency_weight": -0.1}), registry)
    with pytest.raises(RecipeError, match="objective.generator_weight_mode"):
        resolve(_recipe({"generator_weight_mode": "generator"}), registry)


class _PlainDiscriminator(Discriminator):
    def __init__(self, params, *, image_shape):
        super().__init__(params, image_shape=image_shape)
        self.linear = torch.nn.Linear(28 * 28, 1)

    def forward(self, images):
        return self.linear(images.flatten(1)).squeeze(1)


def test_feature_matching_needs_a_discriminator_that_gives_its_features():
    from capsgan_toolkit.plugin.manager import load_plugins

    plugins = load_plugins()  # its own: the session's shared plugin set stays as installed
    plugins.registry.current_source = "plain_disc_test"
    try:
        plugins.registry.register("discriminator", "plain", _PlainDiscriminator)
    finally:
        plugins.registry.current_source = "<unknown>"
    recipe = _recipe({"feature_matching_weight": 1.0})
    recipe["discriminator"] = {"plugin": "plain"}
    with pytest.raises(RecipeError, match="has no forward_with_features"):
        _build(plugins, recipe)
    recipe["objective"] = {"plugin": "reconstruction_gan", "r1_weight": 1.0, "prior_adversarial_weight": 1.0}
    built = _build(plugins, recipe)  # the other options need only a discriminator's logits
    built.objective.step(*_batch(), Phases(generator=True, discriminator=True), _Recorder(built))


# ------------------------------------------------------------------ exact resume with every option on


def _crash_before_saving(monkeypatch, name: str) -> None:
    """Make the trainer die like a killed process when it is about to save checkpoint ``name``."""
    from capsgan_toolkit.training.trainer import Trainer

    original = Trainer.save

    def save(self, which):
        if which == name:
            monkeypatch.setattr(Trainer, "save", original)
            raise KeyboardInterrupt  # leaves the files as they are, as SIGKILL would
        return original(self, which)

    monkeypatch.setattr(Trainer, "save", save)


def test_a_run_killed_mid_epoch_resumes_exactly_with_every_option_on(tmp_path, monkeypatch):
    """Killed after step 5's work, before its checkpoint: the resume starts from step 4's and must end
    exactly where the uninterrupted run ends (every option draws random numbers and runs extra passes)."""
    recipe = _recipe({**EVERY_OPTION, "generator_weight_mode": "encoder", "prior": "true_slot"},
                     discriminator={"projection_classes": 10}, adversarial={"plugin": "nonsaturating"})
    recipe["gate"] = {"plugin": "always"}
    recipe["generator"]["upsampling"] = "nearest"
    recipe["ema"] = {"decay": 0.6}
    recipe["checkpoint"] = {"every_epochs": 1, "every_minutes": 1e-7, "keep_last": 3}  # after every step
    path = write_toml(tmp_path / "r.toml", recipe)
    monkeypatch.setattr(Monitor, "plot", lambda self: None)  # the curves take most of the time, and change nothing
    api.train(path, out=tmp_path / "straight")
    _crash_before_saving(monkeypatch, ckpt.periodic_name(5))
    with pytest.raises(KeyboardInterrupt):
        api.train(path, out=tmp_path / "resumed")
    assert ckpt.load_checkpoint(ckpt.latest(tmp_path / "resumed" / "checkpoints"))["position"] == \
        {"epoch": 1, "batch_in_epoch": 1, "step": 4}
    api.train(out=tmp_path / "resumed", resume=True)
    a = ckpt.load_checkpoint(tmp_path / "straight" / "checkpoints" / "final.pt")
    b = ckpt.load_checkpoint(tmp_path / "resumed" / "checkpoints" / "final.pt")
    assert a["position"] == b["position"] and a["position"]["step"] == 6
    for where, mine, theirs in (("models", a["models"], b["models"]), ("ema", a["ema"]["models"], b["ema"]["models"])):
        for name, weights in mine.items():
            for k, value in weights.items():
                assert torch.equal(value, theirs[name][k]), (where, name, k)
    for name, state in a["optimizers"].items():
        for index, slot in state["state"].items():
            for k, value in slot.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizers"][name]["state"][index][k]))

    def train_rows(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("images_per_s", "time_s")} for r in rows if r["kind"] == "train"]

    straight, resumed = train_rows(tmp_path / "straight"), train_rows(tmp_path / "resumed")
    assert straight == resumed and len(straight) == 6
    assert {f"loss_{t}" for t in ("prior_adversarial", "class_consistency", "feature_matching", "r1")} <= set(straight[-1])
