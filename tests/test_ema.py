"""The EMA generator ([ema]): the average against a float64 hand computation, its place in the
training loop, checkpoints and exact resume, and the averaged weights used for pictures and evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_recipe, write_toml
from torch import nn

from capsgan_toolkit import api
from capsgan_toolkit.errors import RecipeError
from capsgan_toolkit.recipe.schema import resolve
from capsgan_toolkit.rundir import checkpoint as ckpt
from capsgan_toolkit.rundir.folder import RunDir
from capsgan_toolkit.step.ema import EMA, EmaSection
from capsgan_toolkit.training.trainer import Trainer


def _formula(history: list[dict[str, torch.Tensor]], decay: float, warmup: bool) -> dict[str, torch.Tensor]:
    """e_0 = theta_0; e_t = d_t e_(t-1) + (1 - d_t) theta_t, in float64 (the ema module's docstring)."""
    ema = {k: v.double().clone() for k, v in history[0].items()}
    for t, theta in enumerate(history[1:], start=1):
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        for k in ema:
            ema[k] = d * ema[k] + (1 - d) * theta[k].double()
    return ema


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


@pytest.mark.parametrize("warmup", [False, True], ids=["constant-decay", "warmup"])
def test_ema_equals_the_float64_formula_over_the_recorded_parameter_history(warmup):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    ema = EMA({"generator": model}, 0.9, warmup=warmup, optimizers={"g"})
    history = [_params(model)]
    for _ in range(25):
        loss = model(torch.randn(16, 5)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
        history.append(_params(model))
    expected = _formula(history, 0.9, warmup)
    shadow = ema.shadow["generator"]
    for key, value in expected.items():
        assert torch.allclose(shadow[key].double(), value, rtol=0, atol=1e-6), key
    assert not torch.allclose(shadow["2.weight"], history[-1]["2.weight"])  # really an average, not a copy
    # Buffers are copied, not averaged.
    assert torch.equal(shadow["1.running_mean"], model[1].running_mean)
    assert int(shadow["1.num_batches_tracked"]) == 25
    assert ema.updates == 25


def test_ema_updates_once_per_step_and_only_after_an_applied_step_of_an_averaged_model():
    model = nn.Linear(2, 2)
    ema = EMA({"generator": model}, 0.5, warmup=False, optimizers={"encoder_generator"})
    outcomes = {"encoder_generator": True, "discriminator": True}
    update = ema.wrap(lambda name, loss, terms: outcomes[name])
    update("discriminator", None, {})
    ema.end_step()
    assert ema.updates == 0  # only the discriminator stepped
    update("discriminator", None, {})
    update("encoder_generator", None, {})
    update("encoder_generator", None, {})
    ema.end_step()
    assert ema.updates == 1  # once per training step
    outcomes["encoder_generator"] = False  # a step skipped for a NaN (run.on_nan = "skip")
    update("encoder_generator", None, {})
    ema.end_step()
    assert ema.updates == 1


def test_applied_swaps_the_average_in_and_back_out_without_touching_the_rng():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = EMA({"generator": model}, 0.5, warmup=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    raw, ids = _params(model), [id(p) for p in model.parameters()]
    rng = torch.get_rng_state()
    with ema.applied():
        for key, value in _params(model).items():
            assert torch.equal(value, ema.shadow["generator"][key])
    assert torch.equal(torch.get_rng_state(), rng)
    assert [id(p) for p in model.parameters()] == ids  # the optimizer's parameters stay the same objects
    for key, value in _params(model).items():
        assert torch.equal(value, raw[key])
    with pytest.raises(RuntimeError), ema.applied():
        raise RuntimeError("restored also on an error")
    assert all(torch.equal(v, raw[k]) for k, v in _params(model).items())


def test_ema_state_round_trips_and_refuses_other_models():
    model = nn.Linear(3, 2)
    ema = EMA({"generator": model}, 0.99)
    ema.update()
    other = EMA({"generator": nn.Linear(3, 2)}, 0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    assert all(torch.equal(other.shadow["generator"][k], v) for k, v in ema.shadow["generator"].items())
    with pytest.raises(KeyError, match="shape"):
        EMA({"generator": nn.Linear(3, 4)}, 0.99).load_state_dict(ema.state_dict())
    with pytest.raises(KeyError):
        EMA({"encoder": nn.Linear(3, 2)}, 0.99).load_state_dict(ema.state_dict())


# ------------------------------------------------------------------ recipes


def test_recipe_ema_section_defaults_and_errors(registry):
    assert resolve(tiny_recipe(), registry).recipe.ema is None  # no [ema]: off
    data = tiny_recipe()
    data["ema"] = {"decay": 0.999}
    section = resolve(data, registry).recipe.ema
    assert (section.decay, section.encoder, section.warmup) == (0.999, False, True)
    assert EmaSection().decay == 0.0
    data["ema"] = {"decay": 1.0}
    with pytest.raises(RecipeError, match="ema.decay"):
        resolve(data, registry)
    classifier = {k: v for k, v in tiny_recipe().items() if k not in ("generator", "discriminator", "optim", "gate")}
    classifier["objective"] = {"plugin": "classifier"}
    classifier["losses"] = {"classification": {"plugin": "margin"}}
    classifier["ema"] = {"decay": 0.9}
    with pytest.raises(RecipeError, match="no \\[generator\\] to average.*ema.encoder = true"):
        resolve(classifier, registry)
    classifier["ema"]["encoder"] = True
    assert resolve(classifier, registry).recipe.ema.encoder


# ------------------------------------------------------------------ in training


def _ema_recipe(**ema) -> dict:
    data = tiny_recipe()
    data["ema"] = {"decay": 0.6, "warmup": False, **ema}
    return data


def test_training_keeps_the_formula_s_average_in_every_checkpoint_and_uses_it_for_pictures(tmp_path, monkeypatch):
    plugins, resolved = api.load_recipe(write_toml(tmp_path / "r.toml", _ema_recipe(encoder=True)))
    trainer = Trainer(resolved, plugins, RunDir.create(tmp_path / "run").path)
    parts = trainer.built.parts
    history = {"generator": [_params(parts.generator)], "encoder": [_params(parts.encoder)]}
    step = trainer.train_step

    def recorded(images, labels):
        step(images, labels)
        for name in history:
            history[name].append(_params(getattr(parts, name)))

    monkeypatch.setattr(trainer, "train_step", recorded)
    seen = []  # the generator's weights whenever the samples or the evaluation run it
    parts.generator.register_forward_pre_hook(lambda m, args: seen.append((trainer.pos.step, m.training, _params(m))))
    trainer.fit()

    state = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt")
    assert state["ema"]["updates"] == 6 and set(state["ema"]["models"]) == {"generator", "encoder"}
    for name, recorded_history in history.items():
        expected = _formula(recorded_history, 0.6, warmup=False)
        for key, value in expected.items():
            assert torch.allclose(state["ema"]["models"][name][key].double(), value, rtol=0, atol=1e-6), (name, key)
        for key, value in recorded_history[-1].items():  # the trained weights stay in "models"
            assert torch.equal(state["models"][name][key], value)
    periodic = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "step_000000003.pt")
    assert periodic["ema"]["updates"] == 3

    # The end-of-epoch pictures ran the generator with the average of that moment, then the
    # training weights were back (the next steps started from them: the history shows it).
    # The epoch's test metrics come first, with the trained weights; the pictures after them.
    at_end = [weights for s, training, weights in seen if s == 6 and not training]
    assert len(at_end) >= 2, "no picture ran the generator at the end"
    for key, value in at_end[0].items():
        assert torch.equal(value, history["generator"][-1][key]), key
    for key, value in at_end[-1].items():
        assert torch.equal(value, state["ema"]["models"]["generator"][key]), key
    for key, value in _params(parts.generator).items():
        assert torch.equal(value, history["generator"][-1][key])


def test_periodic_evaluation_runs_on_the_average(tmp_path, monkeypatch):
    import capsgan_toolkit.evaluation.evaluator as evaluation

    data = _ema_recipe()
    data["run"]["epochs"], data["gate"] = 1, {"plugin": "always"}  # the generator trains from the first step
    data["eval"] = {"metrics": ["rec"], "every_epochs": 1}
    plugins, resolved = api.load_recipe(write_toml(tmp_path / "r.toml", data))
    trainer = Trainer(resolved, plugins, RunDir.create(tmp_path / "run").path)
    seen = {}

    class FakeEvaluator:
        def __init__(self, *args, objective, **kwargs):
            self.objective = objective

        def run(self):
            seen["weights"] = _params(self.objective.p.generator)
            return evaluation.EvalReport(metrics={"rec_mse16_test": 0.5}, protocol={"rec_mse16_test": {}})

    monkeypatch.setattr(evaluation, "Evaluator", FakeEvaluator)
    trainer.fit()
    shadow = trainer.ema.shadow["generator"]
    assert all(torch.equal(v, shadow[k]) for k, v in seen["weights"].items())
    assert not all(torch.equal(v, shadow[k]) for k, v in _params(trainer.built.parts.generator).items())


def test_exact_resume_keeps_the_average(tmp_path):
    """Two epochs straight == one epoch, then a resume from its final checkpoint for the second."""
    recipe = write_toml(tmp_path / "r.toml", _ema_recipe(decay=0.9, warmup=True))
    api.train(recipe, out=tmp_path / "straight")
    api.train(recipe, out=tmp_path / "resumed", sets=["run.epochs=1"])
    api.train(out=tmp_path / "resumed", resume=True, sets=["run.epochs=2"])
    a = ckpt.load_checkpoint(tmp_path / "straight" / "checkpoints" / "final.pt")
    b = ckpt.load_checkpoint(tmp_path / "resumed" / "checkpoints" / "final.pt")
    assert a["ema"]["updates"] == b["ema"]["updates"] == 6
    for name, weights in a["ema"]["models"].items():
        for key, value in weights.items():
            assert torch.equal(value, b["ema"]["models"][name][key]), (name, key)
    for name, weights in a["models"].items():
        for key, value in weights.items():
            assert torch.equal(value, b["models"][name][key]), (name, key)


def test_evaluation_and_sampling_load_the_average(tmp_path):
    data = _ema_recipe()
    data["run"]["epochs"], data["gate"] = 1, {"plugin": "always"}  # the generator trains from the first step
    api.train(write_toml(tmp_path / "r.toml", data), out=tmp_path / "run")
    state = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt")

    run = api.load_trained(tmp_path / "run")
    assert run.weights == "ema" and run.ema["models"] == ["generator"] and run.ema["updates"] == 3
    for key, value in run.built.parts.generator.state_dict().items():
        assert torch.equal(value, state["ema"]["models"]["generator"][key]), key
    for key, value in run.built.parts.encoder.state_dict().items():  # not averaged: the trained weights
        assert torch.equal(value, state["models"]["encoder"][key]), key

    raw = api.load_trained(tmp_path / "run", use_ema=False)
    assert raw.weights == "raw"
    for key, value in raw.built.parts.generator.state_dict().items():
        assert torch.equal(value, state["models"]["generator"][key]), key
    assert not torch.equal(state["models"]["generator"]["project.weight"],
                           state["ema"]["models"]["generator"]["project.weight"])  # the two differ

    result = api.evaluate(tmp_path / "run", metrics=["rec"], num_images=16)
    assert result["weights"] == "ema" and result["ema"]["decay"] == 0.6
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["weights"] == "ema"


def test_a_run_without_ema_is_evaluated_with_its_trained_weights(tmp_path):
    data = tiny_recipe()
    data["run"]["epochs"] = 1
    api.train(write_toml(tmp_path / "r.toml", data), out=tmp_path / "run")
    assert ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt")["ema"] is None
    result = api.evaluate(tmp_path / "run", metrics=["rec"], num_images=16)
    assert result["weights"] == "raw" and "ema" not in result
