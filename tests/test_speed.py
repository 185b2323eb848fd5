"""The recipe's [speed] options: each changes how a step runs, not what it computes."""

from __future__ import annotations

import pytest
import torch
from helpers import invoke, tiny_recipe, write_toml

from capsgan_toolkit import api
from capsgan_toolkit.rundir.checkpoint import load_checkpoint


def _train(tmp_path, name: str, **speed) -> dict:
    data = tiny_recipe()
    data["run"]["epochs"] = 1
    if speed:
        data["speed"] = speed
    summary = api.train(write_toml(tmp_path / f"{name}.toml", data), out=tmp_path / name)
    return summary, load_checkpoint(tmp_path / name / "checkpoints" / "final.pt")["models"]


def _max_difference(a: dict, b: dict) -> float:
    return max((x - b[m][k]).abs().max().item() for m in a for k, x in a[m].items() if x.is_floating_point())


def test_channels_last_trains_the_same_weights_up_to_rounding(tmp_path):
    _, plain = _train(tmp_path, "plain")
    _, nhwc = _train(tmp_path, "nhwc", channels_last=True)
    assert 0 <= _max_difference(plain, nhwc) < 1e-4


def test_channels_last_puts_conv_weights_and_batches_in_nhwc(tmp_path):
    from capsgan_toolkit.recipe.build import build
    from capsgan_toolkit.step.speed import Speed, SpeedSection

    plugins, resolved = api.load_recipe(write_toml(tmp_path / "r.toml", tiny_recipe()))
    built = build(resolved, plugins)
    speed = Speed(SpeedSection(channels_last=True), torch.device("cpu"), built)
    convs = [m.weight for m in built.modules()["generator"].modules()
             if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs if w.shape[-1] > 1)
    batch = speed.batch(torch.randn(2, 3, 8, 8))
    assert batch.is_contiguous(memory_format=torch.channels_last) and not batch.is_contiguous()


def test_bf16_autocast_runs_forward_passes_in_bfloat16_and_keeps_weights_float32(tmp_path):
    from capsgan_toolkit.step.speed import Speed, SpeedSection

    speed = Speed(SpeedSection(precision="bf16"), torch.device("cpu"), type("B", (), {"modules": lambda self: {}})())
    layer = torch.nn.Linear(4, 4)
    with speed.autocast():
        out = layer(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    summary, weights = _train(tmp_path, "bf16", precision="bf16")
    assert summary["steps"] == 3
    assert all(t.dtype == torch.float32 for m in weights.values() for t in m.values() if t.is_floating_point())
    assert all(torch.isfinite(t).all() for m in weights.values() for t in m.values() if t.is_floating_point())


def test_tf32_turns_on_tf32_matmuls_on_cuda_only_and_each_run_sets_its_own(tmp_path):
    from capsgan_toolkit.step.speed import Speed, SpeedSection

    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    nothing = type("B", (), {"modules": lambda self: {}})()
    try:
        matmul.allow_tf32 = False
        speed = Speed(SpeedSection(precision="tf32"), torch.device("cpu"), nothing)
        assert matmul.allow_tf32 is False  # not on a CPU: "tf32" is float32 there, without autocast
        with speed.autocast():
            assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32
        Speed(SpeedSection(precision="tf32"), torch.device("cuda"), nothing)  # builds nothing on the device
        assert matmul.allow_tf32 is True
        Speed(SpeedSection(), torch.device("cuda"), nothing)  # the process's next run, float32
        assert matmul.allow_tf32 is False
    finally:
        matmul.allow_tf32 = before
    summary, weights = _train(tmp_path, "tf32", precision="tf32")  # on a CPU: the float32 run, bit for bit
    _, plain = _train(tmp_path, "plain")
    assert summary["steps"] == 3 and _max_difference(plain, weights) == 0


def test_speed_keys_are_validated_and_listed_in_validate(tmp_path):
    data = tiny_recipe()
    data["speed"] = {"precision": "fp8"}
    result = invoke("validate", write_toml(tmp_path / "bad.toml", data), catch_exceptions=True)
    assert result.exit_code != 0 and "speed.precision" in result.output and "bf16" in result.output
    data["speed"] = {"channels_last": True}
    result = invoke("validate", write_toml(tmp_path / "good.toml", data))
    assert result.exit_code == 0 and "channels_last" in result.output


def test_resume_may_change_layout_options_but_not_the_precision(tmp_path):
    data = tiny_recipe()
    api.train(write_toml(tmp_path / "r.toml", data), out=tmp_path / "run", sets=["run.max_steps=2"])
    summary = api.train(None, out=tmp_path / "run", resume=True, sets=["run.max_steps=0", "speed.channels_last=true"])
    assert summary["steps"] > 2  # it continued with the new layout
    api.train(write_toml(tmp_path / "r2.toml", data), out=tmp_path / "run2", sets=["run.max_steps=2"])
    with pytest.raises(Exception, match="speed.precision"):
        api.train(None, out=tmp_path / "run2", resume=True, sets=["run.max_steps=0", "speed.precision=\"bf16\""])


@pytest.mark.slow
def test_compiled_models_train_to_the_same_weights_up_to_rounding(tmp_path):
    _, plain = _train(tmp_path, "plain")
    _, compiled = _train(tmp_path, "compiled", compile=True)
    assert _max_difference(plain, compiled) < 1e-3


def _raise_from(filename: str, exc: BaseException):
    """Raise ``exc`` from a frame whose file is ``filename`` (as code torch.compile generated would)."""
    code = compile("def fail(exc):\n    raise exc\n", filename, "exec")
    namespace: dict = {}
    exec(code, namespace)
    namespace["fail"](exc)


@pytest.mark.parametrize("compile_on, filename, translated", [
    (True, "/tmp/torchinductor_root/yh/cyhy.py", True),  # generated kernel wrapper code
    (True, "/venv/lib/python3.12/site-packages/torch/_dynamo/eval_frame.py", True),
    (True, "/work/plugins/capsule.py", False),  # a failure in the model's own code stays as it is
    (False, "/tmp/torchinductor_root/yh/cyhy.py", False),  # compile off: not the compiler's doing
])
def test_a_failure_inside_torch_compile_becomes_a_clear_error(compile_on, filename, translated):
    from capsgan_toolkit.errors import CapsganError
    from capsgan_toolkit.step.speed import Speed, SpeedSection

    class Built:
        def modules(self):
            return {}

    speed = Speed(SpeedSection(compile=compile_on), torch.device("cpu"), Built())
    boom = AssertionError("expected size 64==64, stride 196==1 at dim=1")
    with pytest.raises(Exception) as info:
        with speed.step():
            _raise_from(filename, boom)
    if translated:
        assert isinstance(info.value, CapsganError) and info.value.__cause__ is boom
        message = str(info.value)
        assert "speed.compile = false" in message and "AssertionError: expected size 64==64" in message
    else:
        assert info.value is boom
