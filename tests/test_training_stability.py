"""Schedules, clipping and the divergence guard, through real training runs of the tiny recipe."""

from __future__ import annotations

import copy
import json

import torch
from helpers import TINY_RECIPE, invoke, write_toml

from capsgan_toolkit.rundir import checkpoint as ckpt
from capsgan_toolkit.rundir.reporting import read_metrics


def _run(tmp_path, recipe, *extra, name="run"):
    path = write_toml(tmp_path / f"{name}.toml", recipe)
    result = invoke("run", path, "--out", tmp_path / name, "--quiet", *extra)
    return result, tmp_path / name


def _absurd(action: str) -> dict:
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["run"].update(epochs=3, divergence={"min_steps": 2, "patience": 1, "loss_factor": 1.5,
                                               "action": action, "max_rollbacks": 1})
    recipe["optim"]["encoder_generator"] = {"lr": 5.0}  # absurd: the classification loss jumps at once
    return recipe


def test_an_absurd_learning_rate_is_reported_as_a_divergence(tmp_path):
    result, run = _run(tmp_path, _absurd("warn"))
    assert result.exit_code == 0, result.output
    events = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "event"]
    assert events and events[0]["event"] == "divergence"
    first = events[0]
    assert first["reason"].startswith("loss_spike") and first["loss"] > 1.5 * first["level"]
    assert json.loads((run / "summary.json").read_text())["divergence_events"] == len(events)


def test_rollback_restores_the_last_checkpoint_and_lowers_the_learning_rate(tmp_path):
    result, run = _run(tmp_path, _absurd("rollback"))
    assert result.exit_code == 0, result.output
    rows = read_metrics(run / "metrics.jsonl")
    rollbacks = [r for r in rows if r.get("event") == "rollback"]
    assert len(rollbacks) == 1
    back = rollbacks[0]
    assert back["step"] <= back["diverged_at_step"] and back["lr_scale"] == 0.5
    final = ckpt.load_checkpoint(run / "checkpoints" / "final.pt")
    lr = final["optimizers"]["encoder_generator"]["param_groups"][0]["lr"]
    assert abs(lr - 2.5) < 1e-9  # 5.0 x 0.5: the lower rate survives into the checkpoint
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) == 9  # steps re-run after the rollback


def test_warm_up_learning_rate_is_logged_and_resume_mid_warm_up_is_exact(tmp_path):
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["optim"]["encoder_generator"] = {"lr": 1e-3, "warmup_steps": 5, "clip_norm": 1.0}
    result, straight = _run(tmp_path, recipe, name="straight")
    assert result.exit_code == 0, result.output
    train = [r for r in read_metrics(straight / "metrics.jsonl") if r["kind"] == "train"]
    # After step s (1-based) the scheduler has stepped s times: lr = 1e-3 * min(1, (s + 1) / 5).
    assert [round(r["lr_encoder_generator"], 12) for r in train] == [round(1e-3 * min(1, (s + 1) / 5), 12)
                                                                      for s in range(1, 7)]
    assert all(r["grad_norm_encoder_generator"] > 0 for r in train)

    short = copy.deepcopy(recipe)
    short["run"]["epochs"] = 1  # stops after step 3, inside the 5-step warm-up
    result, resumed = _run(tmp_path, short, name="resumed")
    assert result.exit_code == 0, result.output
    result = invoke("run", "--resume", resumed, "--set", "run.epochs=2", "--quiet")
    assert result.exit_code == 0, result.output
    a = ckpt.load_checkpoint(straight / "checkpoints" / "final.pt")
    b = ckpt.load_checkpoint(resumed / "checkpoints" / "final.pt")
    _assert_same_weights(a, b)
    assert a["schedulers"] == b["schedulers"]


def _assert_same_weights(a: dict, b: dict) -> None:
    """Two checkpoints hold bitwise equal weights, part by part."""
    for part, weights in a["models"].items():
        for key, value in weights.items():
            assert torch.equal(value, b["models"][part][key]), f"{part}.{key}"


def test_a_step_budget_that_stops_mid_epoch_resumes_the_rest_of_that_epoch(tmp_path):
    recipe = copy.deepcopy(TINY_RECIPE)  # 2 epochs x 3 steps
    result, straight = _run(tmp_path, recipe, name="straight")
    assert result.exit_code == 0, result.output
    budget = copy.deepcopy(recipe)
    budget["run"]["max_steps"] = 4  # stops after the first step of epoch 1
    result, stopped = _run(tmp_path, budget, name="stopped")
    assert result.exit_code == 0, result.output
    final = ckpt.load_checkpoint(stopped / "checkpoints" / "final.pt")
    assert final["position"] == {"epoch": 1, "batch_in_epoch": 1, "step": 4}
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["stopped_by"] == "run.max_steps" and summary["epochs"] == 1 and summary["steps"] == 4
    result = invoke("run", "--resume", stopped, "--set", "run.max_steps=0", "--quiet")
    assert result.exit_code == 0, result.output
    a = ckpt.load_checkpoint(straight / "checkpoints" / "final.pt")
    b = ckpt.load_checkpoint(stopped / "checkpoints" / "final.pt")
    assert b["position"] == a["position"] == {"epoch": 2, "batch_in_epoch": 0, "step": 6}
    _assert_same_weights(a, b)
    epochs = [r["epoch"] for r in read_metrics(stopped / "metrics.jsonl") if r["kind"] == "epoch"]
    assert epochs == [0, 1]  # the partial epoch's row was replaced by the whole epoch's


def test_end_of_epoch_work_leaves_the_random_stream_of_a_dropout_encoder_alone(tmp_path):
    """A step budget stops epoch 1 after its first step, and the end-of-epoch work (test accuracy, pictures)
    runs there: it must not draw from the global RNG, or the resumed run's dropout masks differ."""
    recipe = copy.deepcopy(TINY_RECIPE)  # 2 epochs x 3 steps
    recipe["encoder"]["dropout"] = 0.5  # every training step draws from the global RNG
    result, straight = _run(tmp_path, recipe, name="straight")
    assert result.exit_code == 0, result.output
    budget = copy.deepcopy(recipe)
    budget["run"]["max_steps"] = 4
    result, stopped = _run(tmp_path, budget, name="stopped")
    assert result.exit_code == 0, result.output
    result = invoke("run", "--resume", stopped, "--set", "run.max_steps=0", "--quiet")
    assert result.exit_code == 0, result.output
    a = ckpt.load_checkpoint(straight / "checkpoints" / "final.pt")
    b = ckpt.load_checkpoint(stopped / "checkpoints" / "final.pt")
    assert b["position"] == a["position"] == {"epoch": 2, "batch_in_epoch": 0, "step": 6}
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    _assert_same_weights(a, b)
