"""Learning-rate schedules, gradient clipping and the divergence guard (capsgan_toolkit/step/optim.py).

Expected values are computed here by hand (plain float64 formulas), never with lr_at.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from pydantic import ValidationError

from capsgan_toolkit.step.divergence import DivergenceGuard, DivergenceSpec
from capsgan_toolkit.step.optim import (
    OptimizerSpec,
    build_optimizer,
    clip_gradients,
    lr_at,
    scale_learning_rates,
)


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


def _train_lrs(opt, sched, model, steps, seed=1):
    """Run ``steps`` real training steps; return the lr each update used."""
    g = torch.Generator().manual_seed(seed)
    used = []
    for _ in range(steps):
        x = torch.randn(8, 4, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return used


# --------------------------------------------------------------------------- specs


def test_optimizer_spec_defaults_match_the_old_adam_section():
    spec = OptimizerSpec()
    assert (spec.lr, spec.betas, spec.weight_decay) == (1e-4, (0.5, 0.999), 0.0)
    assert (spec.schedule, spec.warmup_steps, spec.clip_norm) == ("constant", 0, 0.0)
    for name, field in OptimizerSpec.model_fields.items():
        assert field.description, name
    for name, field in DivergenceSpec.model_fields.items():
        assert field.description, name


@pytest.mark.parametrize("bad", [
    {"lr": 0.0}, {"betas": (1.0, 0.999)}, {"schedule": "linear"}, {"warmup_steps": -1},
    {"min_lr_ratio": 1.5}, {"schedule": "step"}, {"step_gamma": 0.0}, {"clip_norm": -1.0}, {"lrr": 1e-3},
])
def test_optimizer_spec_rejects(bad):
    with pytest.raises(ValidationError):
        OptimizerSpec(**bad)


@pytest.mark.parametrize("bad", [{"loss_factor": 1.0}, {"lr_factor": 1.0}, {"action": "stop"}, {"patience": 0},
                                 {"accuracy_drop": 1.0}, {"factor": 2.0}])
def test_divergence_spec_rejects(bad):
    with pytest.raises(ValidationError):
        DivergenceSpec(**bad)


def test_spec_round_trips_through_json_dump():
    spec = OptimizerSpec(lr=3e-3, schedule="cosine", warmup_steps=100, min_lr_ratio=0.1, clip_norm=5.0)
    assert OptimizerSpec.model_validate(json.loads(json.dumps(spec.model_dump(mode="json")))) == spec


# --------------------------------------------------------------------------- schedules


def test_linear_warmup_then_constant():
    lr, w = 0.01, 4
    spec = OptimizerSpec(lr=lr, warmup_steps=w)
    expected = [lr * 1 / 4, lr * 2 / 4, lr * 3 / 4, lr, lr, lr]
    model = _tiny_model()
    opt, sched = build_optimizer(spec, model.parameters(), total_steps=100)
    used = _train_lrs(opt, sched, model, len(expected))
    assert used == pytest.approx(expected, rel=1e-15)
    assert [lr_at(spec, s, 100) for s in range(6)] == used  # the scheduler puts exactly lr_at in the optimizer
    assert used[0] == pytest.approx(0.0025)


def test_cosine_with_warmup():
    lr, w, total, r = 1e-3, 10, 110, 0.1
    spec = OptimizerSpec(lr=lr, schedule="cosine", warmup_steps=w, min_lr_ratio=r)

    def hand(s):
        if s < w:
            return lr * (s + 1) / w
        p = min(1.0, (s - w) / (total - w))
        return lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p)))

    for s in (0, 9, 10, 35, 60, 109, 110, 500):
        assert lr_at(spec, s, total) == pytest.approx(hand(s), rel=1e-12), s
    assert lr_at(spec, 9, total) == pytest.approx(1e-3)
    assert lr_at(spec, 60, total) == pytest.approx(5.5e-4)  # halfway: r + (1 - r) / 2
    assert lr_at(spec, 110, total) == pytest.approx(1e-4)  # the floor from the last step on
    model = _tiny_model()
    opt, sched = build_optimizer(spec, model.parameters(), total_steps=total)
    used = _train_lrs(opt, sched, model, 40)
    assert used == pytest.approx([hand(s) for s in range(40)], rel=1e-12)


def test_step_decay_counts_from_the_end_of_warmup():
    spec = OptimizerSpec(lr=0.1, schedule="step", warmup_steps=2, step_every=3, step_gamma=0.5)
    expected = [0.05, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025]
    assert [lr_at(spec, s, 0) for s in range(10)] == pytest.approx(expected, rel=1e-15)
    model = _tiny_model()
    opt, sched = build_optimizer(spec, model.parameters(), total_steps=0)
    assert _train_lrs(opt, sched, model, 10) == pytest.approx(expected, rel=1e-15)


def test_build_optimizer_passes_adam_settings():
    spec = OptimizerSpec(lr=2e-3, betas=(0.9, 0.99), weight_decay=1e-4)
    opt, _ = build_optimizer(spec, _tiny_model().parameters(), total_steps=10)
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.Adam)
    assert (group["lr"], group["betas"], group["weight_decay"]) == (2e-3, (0.9, 0.99), 1e-4)


def _adam_float64(params0, grads, lr, betas, eps=1e-8, weight_decay=0.0):
    """Adam (Kingma and Ba, Algorithm 1, with torch's L2 weight decay) in plain float64."""
    b1, b2 = betas
    out = []
    for p, gs in zip(params0, grads):
        p, m, v = p.double().clone(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64)
        for t, g in enumerate(gs, start=1):
            g = g.double() + weight_decay * p
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            p = p - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        out.append(p)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_adam_is_torchs_fused_kernel_and_computes_adam(dtype):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, dtype=dtype)),
              torch.nn.Parameter(torch.randn(2, 3, 4, 4, dtype=dtype).contiguous(memory_format=torch.channels_last))]
    start = [p.detach().clone() for p in params]
    spec = OptimizerSpec(lr=1e-2, betas=(0.5, 0.999), weight_decay=1e-3)
    opt, _ = build_optimizer(spec, params, total_steps=10)
    assert opt.param_groups[0]["fused"] is True
    grads = [[torch.randn_like(p) for _ in range(6)] for p in params]
    for step in range(6):
        for p, g in zip(params, grads):
            p.grad = g[step].clone()
        opt.step()
    expected = _adam_float64(start, grads, 1e-2, (0.5, 0.999), weight_decay=1e-3)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=0, atol=tol)
    assert params[1].is_contiguous(memory_format=torch.channels_last)  # the layout survives the update


def test_fused_adam_only_where_every_parameter_is_a_floating_cpu_tensor():
    cpu = torch.nn.Parameter(torch.randn(3))
    assert build_optimizer(OptimizerSpec(), [{"params": [cpu]}], total_steps=1)[0].param_groups[0]["fused"] is True
    meta = torch.nn.Parameter(torch.randn(3, device="meta"))
    assert not build_optimizer(OptimizerSpec(), [cpu, meta], total_steps=1)[0].param_groups[0]["fused"]


def test_a_torch_without_the_fused_cpu_kernel_gets_the_default_adam(monkeypatch):
    real = torch.optim.Adam

    class OldTorchAdam(real):  # torch < 2.4 refuses fused=True for CPU tensors, with this error
        def __init__(self, params, *args, fused=None, **kwargs):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of "
                                   "supported devices: ['cuda'].")
            super().__init__(params, *args, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", OldTorchAdam)
    opt, _ = build_optimizer(OptimizerSpec(lr=2e-3), _tiny_model().parameters(), total_steps=1)
    assert isinstance(opt, real) and not opt.param_groups[0]["fused"] and opt.param_groups[0]["lr"] == 2e-3


def test_a_checkpoint_of_the_unfused_adam_resumes_unfused_and_exact():
    """Older runs saved the default implementation's state: resuming keeps it, so the run stays exact."""
    model = _tiny_model()
    old = torch.optim.Adam(model.parameters(), lr=1e-2)  # what build_optimizer made before it fused
    _train_lrs(old, torch.optim.lr_scheduler.LambdaLR(old, lambda s: 1.0), model, 3)
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": old.state_dict()}, saved)
    straight = _tiny_model()
    straight.load_state_dict(model.state_dict())
    _train_lrs(old, torch.optim.lr_scheduler.LambdaLR(old, lambda s: 1.0), model, 4, seed=2)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    opt, sched = build_optimizer(OptimizerSpec(lr=1e-2, betas=(0.9, 0.999)), straight.parameters(), total_steps=10)
    straight.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    assert not opt.param_groups[0]["fused"]
    _train_lrs(opt, sched, straight, 4, seed=2)
    for a, b in zip(model.parameters(), straight.parameters()):
        assert torch.equal(a, b)


def test_cosine_needs_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        build_optimizer(OptimizerSpec(schedule="cosine"), _tiny_model().parameters(), total_steps=0)


def _roundtrip(obj):
    """Through bytes, loaded as checkpoints are (weights_only)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_resume_mid_warmup_gives_the_same_lrs_and_weights():
    spec = OptimizerSpec(lr=0.05, schedule="cosine", warmup_steps=10, min_lr_ratio=0.2)
    total = 30
    model = _tiny_model()
    opt, sched = build_optimizer(spec, model.parameters(), total_steps=total)
    _train_lrs(opt, sched, model, 4, seed=3)
    saved = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    straight = _train_lrs(opt, sched, model, 12, seed=4)
    straight_weights = [p.detach().clone() for p in model.parameters()]

    model2 = _tiny_model(seed=99)
    opt2, sched2 = build_optimizer(spec, model2.parameters(), total_steps=total)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    resumed = _train_lrs(opt2, sched2, model2, 12, seed=4)
    assert resumed == straight  # exactly
    hand = [0.05 * (s + 1) / 10 for s in range(4, 10)]
    assert resumed[:6] == pytest.approx(hand, rel=1e-15)
    for a, b in zip(straight_weights, model2.parameters()):
        assert torch.equal(a, b)


def test_scale_learning_rates_survives_a_state_round_trip():
    lr, w = 0.01, 8
    spec = OptimizerSpec(lr=lr, warmup_steps=w)
    model = _tiny_model()
    opt, sched = build_optimizer(spec, model.parameters(), total_steps=50)
    _train_lrs(opt, sched, model, 3)
    scale_learning_rates({"a": opt}, {"a": sched}, 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * lr * 4 / w, rel=1e-15)  # the next update's lr
    assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]
    saved = _roundtrip({"opt": opt.state_dict(), "sched": sched.state_dict()})
    straight = _train_lrs(opt, sched, model, 8)

    model2 = _tiny_model()
    opt2, sched2 = build_optimizer(spec, model2.parameters(), total_steps=50)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    resumed = _train_lrs(opt2, sched2, model2, 8)
    expected = [0.5 * lr * min(1.0, (s + 1) / w) for s in range(3, 11)]
    assert straight == pytest.approx(expected, rel=1e-15)
    assert resumed == straight


def test_scale_learning_rates_without_scheduler():
    opt = torch.optim.Adam(_tiny_model().parameters(), lr=0.2)
    scale_learning_rates([opt], None, 0.25)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    with pytest.raises(ValueError):
        scale_learning_rates(opt, None, 0.0)


# --------------------------------------------------------------------------- clipping


def _params_with_grads(grads):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(len(g), dtype=torch.float64))
        p.grad = torch.tensor(g, dtype=torch.float64)
        params.append(p)
    return params


def test_clip_norm_is_the_hand_global_norm_and_clips_to_it():
    grads = [[3.0, 4.0], [12.0], [-0.5, 0.25, 2.0]]
    hand = math.sqrt(sum(x * x for g in grads for x in g))
    params = _params_with_grads(grads)
    assert clip_gradients(params, 0.0) == pytest.approx(hand, rel=1e-15)
    assert [p.grad.tolist() for p in params] == grads  # 0: measured, untouched
    assert clip_gradients(params, 1e3) == pytest.approx(hand, rel=1e-15)
    assert [p.grad.tolist() for p in params] == grads  # under the bar: untouched

    pre = clip_gradients(params, 5.0)
    assert pre == pytest.approx(hand, rel=1e-15)
    coef = 5.0 / (hand + 1e-6)
    for p, g in zip(params, grads):
        assert p.grad.tolist() == pytest.approx([x * coef for x in g], rel=1e-12)
    after = math.sqrt(sum(x * x for p in params for x in p.grad.tolist()))
    assert after == pytest.approx(5.0, rel=1e-6)


def test_clip_random_float32_grads_and_edge_cases():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    torch.manual_seed(0)
    model(torch.randn(7, 6)).pow(2).sum().backward()
    flat = [float(x) for p in model.parameters() for x in p.grad.flatten().tolist()]
    hand = math.sqrt(sum(x * x for x in flat))
    assert clip_gradients(model.parameters(), 0.1) == pytest.approx(hand, rel=1e-5)
    after = math.sqrt(sum(float(x) ** 2 for p in model.parameters() for x in p.grad.flatten().tolist()))
    assert after == pytest.approx(0.1, rel=1e-5)

    fresh = torch.nn.Linear(2, 2)
    assert clip_gradients(fresh.parameters(), 1.0) == 0.0  # no gradients yet
    bad = _params_with_grads([[1.0, float("inf")]])
    assert math.isinf(clip_gradients(bad, 1.0))
    assert bad[0].grad.tolist() == [1.0, float("inf")]  # left for the caller's NaN handling


# --------------------------------------------------------------------------- divergence guard


def _noisy(base, i):
    return base * (1.0 + 0.1 * math.sin(1.7 * i))  # deterministic wiggle, +-10%


def test_guard_fires_once_on_a_loss_spike_and_again_on_a_new_episode():
    guard = DivergenceGuard(DivergenceSpec(min_steps=50, patience=3, loss_factor=3.0))
    events = []
    losses = ([_noisy(1.0, i) for i in range(200)] + [6.0] * 20 + [_noisy(1.0, i) for i in range(100)]
              + [8.0] * 5)
    for step, loss in enumerate(losses):
        if (ev := guard.update(step, loss)) is not None:
            events.append(ev)
    assert [ev["step"] for ev in events] == [202, 322]
    first = events[0]
    assert first["event"] == "divergence" and first["reason"] == "loss_spike"
    assert first["since_step"] == 200 and first["loss"] == 6.0 and first["episode"] == 1
    assert first["level"] == pytest.approx(1.0, abs=0.05)
    assert first["threshold"] == pytest.approx(3 * first["level"])
    assert first["action"] == "warn" and "step 202" in first["message"]
    assert events[1]["episode"] == 2


def test_guard_ignores_noise_a_falling_loss_and_the_first_steps():
    guard = DivergenceGuard(DivergenceSpec(min_steps=20))
    for step in range(20):
        assert guard.update(step, 100.0 if step == 10 else 1.0) is None  # before min_steps
    for step in range(20, 600):
        loss = _noisy(2.0 * math.exp(-step / 150) + 0.05, step)
        acc = min(0.9, step / 400)
        assert guard.update(step, loss, acc) is None


def test_single_outlier_does_not_fire_and_does_not_move_the_level():
    guard = DivergenceGuard(DivergenceSpec(min_steps=10, patience=3))
    for step in range(50):
        guard.update(step, 1.0)
    assert guard.update(50, 50.0) is None
    assert guard.level == pytest.approx(1.0, rel=1e-12)
    assert guard.update(51, 1.0) is None


def test_guard_fires_on_accuracy_collapse():
    guard = DivergenceGuard(DivergenceSpec(min_steps=10, accuracy_drop=0.5, accuracy_floor=0.3, patience=2))
    events = []
    accs = [min(0.83, 0.01 * i) for i in range(120)] + [0.83 * 0.9 ** k for k in range(1, 40)]
    for step, acc in enumerate(accs):
        if (ev := guard.update(step, None, acc)) is not None:
            events.append(ev)
    # 0.83 * 0.9**k < 0.415 first at k = 7 (step 126); patience 2 -> step 127
    k = next(k for k in range(1, 40) if 0.83 * 0.9 ** k < 0.5 * 0.83)
    assert k == 7
    assert len(events) == 1
    ev = events[0]
    assert ev["reason"] == "accuracy_collapse" and ev["step"] == 120 + k and ev["since_step"] == 119 + k
    assert ev["best_accuracy"] == pytest.approx(0.83) and ev["accuracy"] == pytest.approx(0.83 * 0.9 ** (k + 1))
    assert ev["loss"] is None and ev["level"] is None


def test_no_accuracy_check_below_the_floor():
    guard = DivergenceGuard(DivergenceSpec(min_steps=0, accuracy_floor=0.3, patience=1))
    for step, acc in enumerate([0.25, 0.2, 0.01, 0.0]):
        assert guard.update(step, None, acc) is None


def test_disabled_guard_never_fires():
    guard = DivergenceGuard(DivergenceSpec(enabled=False, min_steps=0, patience=1))
    assert all(guard.update(s, 1.0 if s < 5 else 1e6, 0.9 if s < 5 else 0.0) is None for s in range(20))


def test_guard_state_round_trips_exactly():
    spec = DivergenceSpec(min_steps=30, patience=3)
    seq = [(_noisy(1.0, i), min(0.8, i / 50)) for i in range(100)] + [(5.0, 0.8)] * 2
    tail = [(5.0, 0.7)] * 3 + [(_noisy(1.0, i), 0.8) for i in range(40)] + [(9.0, 0.1)] * 6
    a = DivergenceGuard(spec)
    for step, (loss, acc) in enumerate(seq):
        a.update(step, loss, acc)
    state = json.loads(json.dumps(a.state_dict()))  # plain values only
    assert all(type(v) in (int, float, bool) for v in a.state_dict().values())
    assert _roundtrip(a.state_dict()) == a.state_dict()
    b = DivergenceGuard(spec)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    ev_a = [a.update(len(seq) + i, loss, acc) for i, (loss, acc) in enumerate(tail)]
    ev_b = [b.update(len(seq) + i, loss, acc) for i, (loss, acc) in enumerate(tail)]
    assert ev_a == ev_b
    assert sum(ev is not None for ev in ev_a) == 2  # the spike started before the save, then a new episode
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="lacks"):
        b.load_state_dict({"seen": 1})


def test_rollback_bookkeeping():
    spec = DivergenceSpec(min_steps=5, patience=1, action="rollback", lr_factor=0.5, max_rollbacks=2)
    guard = DivergenceGuard(spec)
    for step in range(10):
        guard.update(step, 1.0)
    checkpoint = guard.state_dict()
    for step in range(10, 15):
        guard.update(step, 1.0)
    ev = guard.update(15, 10.0)
    assert ev["action"] == "rollback" and ev["lr_factor"] == 0.5
    assert guard.rollback(checkpoint) == 0.5
    assert guard.state_dict()["seen"] == checkpoint["seen"] and guard.rollbacks == 1 and guard.episodes == 1
    assert not guard.in_episode
    # the same spike again after going back to the same checkpoint: 0.25 relative to its lrs
    ev = guard.update(10, 10.0)
    assert ev["action"] == "rollback" and ev["episode"] == 2
    assert guard.rollback(checkpoint) == pytest.approx(0.25)
    assert guard.lr_scale == pytest.approx(0.25)
    # a later checkpoint already holds the 0.25 scale: the next factor is 0.5 relative to it
    later = guard.state_dict()
    ev = guard.update(11, 10.0)
    assert ev["action"] == "warn" and ev["lr_factor"] is None and "no rollback left" in ev["message"]
    assert later["lr_scale"] == pytest.approx(0.25)


def _classifier_run(lr_schedule, guard_spec, steps):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x_all = torch.randn(512, 20, generator=g)
    y_all = (x_all @ torch.randn(20, 5, generator=g)).argmax(1)  # a learnable labelling
    model = torch.nn.Linear(20, 5)
    guard = DivergenceGuard(guard_spec)
    opt = sched = None
    events, running, norms = [], None, []
    for step in range(steps):
        if (spec := lr_schedule(step)) is not None:
            opt, sched = build_optimizer(spec, model.parameters(), total_steps=steps) if opt is None else (opt, sched)
            if spec.lr != opt.param_groups[0]["initial_lr"]:
                scale_learning_rates(opt, sched, spec.lr / opt.param_groups[0]["initial_lr"])
        idx = torch.randint(0, 512, (32,), generator=g)
        out = model(x_all[idx])
        loss = torch.nn.functional.cross_entropy(out, y_all[idx])
        acc = (out.argmax(1) == y_all[idx]).float().mean().item()
        running = acc if running is None else 0.9 * running + 0.1 * acc
        opt.zero_grad()
        loss.backward()
        norms.append(clip_gradients(model.parameters(), 0.0))
        opt.step()
        sched.step()
        if (ev := guard.update(step, loss.item(), running)) is not None:
            events.append(ev)
    return events, running


def test_absurd_learning_rate_on_a_real_model_makes_the_guard_fire():
    events, _ = _classifier_run(lambda s: OptimizerSpec(lr=1e3) if s == 0 else None,
                                DivergenceSpec(min_steps=1), 40)
    assert len(events) == 1 and events[0]["reason"].startswith("loss_spike")
    assert events[0]["since_step"] == 1 and events[0]["loss"] > 100 * events[0]["level"]


def test_learning_rate_jump_after_good_training_makes_the_guard_fire():
    # 80 good steps at lr 1e-2 (accuracy climbs, no event), then lr 1e3 from step 80.
    def schedule(s):
        return OptimizerSpec(lr=1e-2) if s == 0 else OptimizerSpec(lr=1e3) if s == 80 else None

    events, _ = _classifier_run(schedule, DivergenceSpec(min_steps=30), 120)
    assert len(events) == 1
    ev = events[0]
    assert 80 <= ev["since_step"] <= 83 and ev["reason"].startswith("loss_spike")
    assert ev["best_accuracy"] > 0.7 and ev["level"] < 1.2


def test_a_sane_learning_rate_does_not_fire():
    events, running = _classifier_run(lambda s: OptimizerSpec(lr=1e-2) if s == 0 else None,
                                      DivergenceSpec(min_steps=30), 150)
    assert events == [] and running > 0.8
