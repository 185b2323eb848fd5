"""``[speed] cuda_graphs`` (capsgan_toolkit.step.cuda_graphs): one graph per call of a step, gradients and state as eager.

On a CPU the graphs are played by :func:`_emulated_graphs`, a stand-in for
``torch.cuda.make_graphed_callables`` with its contract: it runs the function a few times to warm
up and capture (side effects included), then every replay writes the *same* output tensor, and the
backward returns gradients for the inputs that required them at capture. A wrapper that replayed
one graph for two calls of a step, lost a gradient, or let the warm-up runs move BatchNorm's
statistics would train different weights than eager mode; the real graphs are checked against
eager mode on a GPU by test_real_cuda_graphs_train_as_eager.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_recipe, write_toml

from capsgan_toolkit import api
from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.rundir.checkpoint import load_checkpoint
from capsgan_toolkit.step import speed
from capsgan_toolkit.step.cuda_graphs import GraphedCalls

CAPTURES: list[tuple] = []


def _emulated_graphs(fn, sample_args, num_warmup_iters=3):
    sample = [a for a in sample_args]
    for _ in range(num_warmup_iters + 1):  # warm-up and capture run the function
        out = fn(*sample)
    CAPTURES.append(tuple(a.shape for a in sample))
    static = out.detach().clone()  # the graph's output memory, rewritten by every replay

    class Replay(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            with torch.enable_grad():
                ins = [i.detach().requires_grad_(i.requires_grad) if not isinstance(i, torch.nn.Parameter) else i
                       for i in inputs]
                result = fn(*ins)
            ctx.saved = (ins, result)
            static.copy_(result.detach())
            return static.detach()

        @staticmethod
        def backward(ctx, grad):
            ins, result = ctx.saved
            need = [i for i in ins if i.requires_grad]
            grads = iter(torch.autograd.grad(result, need, grad, allow_unused=True) if need else ())
            return tuple(next(grads) if i.requires_grad else None for i in ins)

    return lambda *inputs: Replay.apply(*inputs)


@pytest.fixture
def emulated(monkeypatch):
    import capsgan_toolkit.step.cuda_graphs as cg

    CAPTURES.clear()
    monkeypatch.setattr(speed, "graphs_available", lambda device: True)
    real_init = cg.GraphedCalls.__init__

    def init(self, module, name, **kwargs):
        real_init(self, module, name, make=_emulated_graphs, on_device=lambda t: True)

    monkeypatch.setattr(cg.GraphedCalls, "__init__", init)
    return CAPTURES


def _train(tmp_path, name, **speed_options):
    data = tiny_recipe()
    data["run"]["epochs"] = 2
    data["gate"] = {"plugin": "accuracy_band", "warmup_epochs": 0}
    data["speed"] = speed_options
    summary = api.train(write_toml(tmp_path / f"{name}.toml", data), out=tmp_path / name)
    rows = [r for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
            if r.get("kind") == "train"]
    return summary, load_checkpoint(tmp_path / name / "checkpoints" / "final.pt")["models"], rows


def test_graphed_training_equals_eager_training(tmp_path, emulated):
    _, eager, eager_rows = _train(tmp_path, "eager")
    assert not emulated
    summary, graphed, rows = _train(tmp_path, "graphed", cuda_graphs=True)
    assert emulated  # the stand-in captured the models' calls
    for model, state in eager.items():  # weights and BatchNorm statistics, bit for bit
        for key, value in state.items():
            assert torch.equal(value, graphed[model][key]), f"{model}.{key}"
    drop = {"images_per_s", "time", "elapsed", "seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == \
           [{k: v for k, v in r.items() if k not in drop} for r in eager_rows]  # losses and diagnostics too


def _bn_model():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def test_one_graph_per_call_and_signature_reused_across_steps():
    CAPTURES.clear()
    model = _bn_model()
    graphed = GraphedCalls(model, "encoder", make=_emulated_graphs, on_device=lambda t: True)
    x = torch.randn(5, 3)
    model(x)  # before any step: eager
    assert not CAPTURES
    for _ in range(3):  # three steps of two calls each
        graphed.new_step()
        model(x), model(x)
    assert len(CAPTURES) == 2  # call 0 and call 1 of a step, captured once each
    graphed.new_step()
    model(torch.randn(2, 3))  # a smaller last batch: its own graph
    for p in model.parameters():
        p.requires_grad_(False)
    graphed.new_step()
    model(x)  # frozen parameters (the discriminator during the generator's step): its own graph
    assert len(CAPTURES) == 4
    model.eval()
    model(x)  # evaluation runs the module's own forward
    model.train()
    graphed.end_step()
    model(x), model(x)  # and so do calls outside a training step (a benchmark's forward timing, say)
    assert len(CAPTURES) == 4


def test_capture_leaves_batchnorm_statistics_as_one_step_moves_them():
    torch.manual_seed(0)
    eager, graphed_model = _bn_model(), _bn_model()
    graphed_model.load_state_dict(eager.state_dict())
    GraphedCalls(graphed_model, "encoder", make=_emulated_graphs, on_device=lambda t: True).new_step()
    x = torch.randn(6, 3)
    eager(x), graphed_model(x)
    for key, value in eager.state_dict().items():
        assert torch.equal(value, graphed_model.state_dict()[key]), key
    assert int(graphed_model[1].num_batches_tracked) == 1


def test_attributes_the_forward_assigns_are_assigned_after_each_replay():
    class Noting(torch.nn.Linear):
        def forward(self, x):
            y = super().forward(x)
            self.note = y.detach()
            return y

    def capture_once(fn, args):  # a replay runs no Python: only the capture ran the forward
        static = fn(*args).detach()
        return lambda *inputs: static

    model = Noting(3, 2)
    graphed = GraphedCalls(model, "encoder", make=capture_once, on_device=lambda t: True)
    graphed.new_step()
    model(torch.ones(1, 3))
    captured_note = model.note
    model.note = None  # as a reader that clears it (the capsnet's diagnostics)
    graphed.new_step()
    model(torch.ones(1, 3))
    assert model.note is captured_note


def test_a_model_that_cannot_be_captured_is_a_clear_error():
    def refuse(fn, args):
        raise RuntimeError("operation not permitted when stream is capturing")

    model = _bn_model()
    GraphedCalls(model, "discriminator", make=refuse, on_device=lambda t: True).new_step()
    with pytest.raises(CapsganError, match=r"cuda_graphs.*discriminator.*speed.cuda_graphs = false"):
        model(torch.randn(4, 3))
    assert int(model[1].num_batches_tracked) == 0  # the failed capture moved no statistics


def test_auto_runs_a_model_that_cannot_be_captured_eagerly_with_one_note(capsys):
    def refuse(fn, args):
        raise RuntimeError("operation not permitted when stream is capturing")

    torch.manual_seed(0)
    model, eager = _bn_model(), _bn_model()
    eager.load_state_dict(model.state_dict())
    graphed = GraphedCalls(model, "discriminator", make=refuse, on_device=lambda t: True, fallback=True)
    x = torch.randn(4, 3)
    for _ in range(3):
        graphed.new_step()
        assert torch.equal(model(x), eager(x))  # the eager forward, BatchNorm statistics moved once per call
    assert graphed.eager_only and not graphed.graphs
    for key, value in eager.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    err = capsys.readouterr().err
    assert err.count('speed.cuda_graphs = "auto": the discriminator runs eagerly') == 1
    assert "RuntimeError: operation not permitted when stream is capturing" in err


def test_auto_trains_capturable_models_as_graphs(tmp_path, emulated):
    _, eager, _ = _train(tmp_path, "eager")
    _, graphed, _ = _train(tmp_path, "auto", cuda_graphs="auto")
    assert emulated
    for model, state in eager.items():
        for key, value in state.items():
            assert torch.equal(value, graphed[model][key]), f"{model}.{key}"


def test_cuda_graphs_with_compile_is_refused_and_off_cuda_ignored():
    from capsgan_toolkit.step.speed import Speed, SpeedSection

    built = type("B", (), {"modules": lambda self: {"encoder": _bn_model()}})()
    with pytest.raises(CapsganError, match="cuda_graphs and speed.compile"):
        Speed(SpeedSection(cuda_graphs=True, compile=True), torch.device("cuda"), built)
    assert Speed(SpeedSection(cuda_graphs=True), torch.device("cpu"), built).graphed == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on one by benchmarks/gpu.sh)")
def test_real_cuda_graphs_train_as_eager(tmp_path):
    data = tiny_recipe()
    data["run"].update(epochs=2, device="cuda")
    data["gate"] = {"plugin": "accuracy_band", "warmup_epochs": 0}
    runs = {}
    for name, on in (("eager", False), ("graphed", True)):
        data["speed"] = {"cuda_graphs": on}
        api.train(write_toml(tmp_path / f"{name}.toml", data), out=tmp_path / name)
        runs[name] = load_checkpoint(tmp_path / name / "checkpoints" / "final.pt")["models"]
    worst = max((x.float() - runs["graphed"][m][k].float()).abs().max().item()
                for m in runs["eager"] for k, x in runs["eager"][m].items() if x.is_floating_point())
    assert worst < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on one by benchmarks/gpu.sh)")
def test_real_auto_falls_back_for_a_forward_that_reads_to_the_host(capsys):
    class Syncing(torch.nn.Linear):
        def forward(self, x):
            y = super().forward(x)
            return y * 0 if y.abs().sum().item() > 1e12 else y  # a host read: not allowed while capturing

    model = Syncing(3, 2).cuda()
    graphed = GraphedCalls(model, "encoder", fallback=True)
    x = torch.randn(4, 3, device="cuda", requires_grad=True)
    for _ in range(2):
        graphed.new_step()
        model(x).sum().backward()
    assert graphed.eager_only and "the encoder runs eagerly" in capsys.readouterr().err
    assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()
