"""Training that loses nothing: exact resume after SIGKILL, signals, numerical faults, a full disk.

The kill-and-resume tests run ``python -m capsgan_toolkit run`` in subprocesses, kill
them with SIGKILL at seeded random points (one of them while a checkpoint is being
written) and resume with ``--resume`` until the run is done; the final checkpoint and
metrics.jsonl must match an uninterrupted run. The recipe checkpoints after every
step (``checkpoint.every_minutes`` of a few microseconds), logs every second
step (so checkpoints hold half-filled metric intervals) and uses the ``rng_mse`` test
loss, whose target jitter comes from the torch, NumPy and Python generators: a resume
that restored any of them wrongly would end with other weights.

A tally of kill points and signals, and the stops each run went through, is printed at
the end of the module (see docs/reliability.md). Bad input (recipes, checkpoints, data,
plugins) is tested in test_reliability_inputs.py.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import TINY_RECIPE, FullDiskAt, write_toml

from capsgan_toolkit.cli.main import cli
from capsgan_toolkit.errors import CheckpointError
from capsgan_toolkit.rundir import checkpoint as ckpt
from capsgan_toolkit.rundir import writes
from capsgan_toolkit.rundir.reporting import read_metrics

TESTS = Path(__file__).resolve().parent
FAULTS = "plugins_for_tests.faults"
TIMING_KEYS = {"images_per_s", "time_s"}
EVENTS: list[list[str]] = []  # what each kill-and-resume run went through, printed with the tally
LAST_SIGNAL_STEP = 8  # of 10: a signal sent later may land in the last epoch's end, where the run just completes
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

TALLY = {"kill points": 0, "of them during a checkpoint write": 0, "signals": 0,
         "runs compared with the uninterrupted one": 0}


@pytest.fixture(scope="module", autouse=True)
def _report_tally(request):
    yield
    _print_tally(request, "reliability tally", TALLY)
    if EVENTS:
        _print_tally(request, "stops, per run", {f"run {i}": "; ".join(e) for i, e in enumerate(EVENTS, 1)})


def _print_tally(request, title: str, tally: dict) -> None:
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write("\n")
            reporter.write_line(f"{title}: " + ", ".join(f"{k}: {v}" for k, v in tally.items()))


# ---------------------------------------------------------------------------- recipes and runs


def _resume_recipe() -> dict:
    """The tiny recipe, made to checkpoint after every step and to use every RNG."""
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["run"].update(name="reliable", epochs=2, steps_per_epoch=5, log_every=2, eval_batches=1,
                         threads=1, plugins=[FAULTS])
    recipe["losses"]["reconstruction"] = {"plugin": "rng_mse"}
    recipe["gate"]["generator_min_disc_acc"] = 0.0  # after the warm-up epoch G trains every step
    # A few microseconds: in practice a checkpoint after every step.
    recipe["checkpoint"] = {"every_epochs": 1, "every_minutes": 1e-7, "keep_last": 2}
    recipe["output"] = {"sample_images": 2}
    return recipe


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("CAPSGAN_DATA", None)
    return env


def _launch(args: list, log: Path) -> subprocess.Popen:
    with open(log, "a", encoding="utf-8") as err:
        return subprocess.Popen([sys.executable, "-m", "capsgan_toolkit", "run", *map(str, args), "--quiet"],
                                stdout=subprocess.DEVNULL, stderr=err, env=_env(), cwd=log.parent)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the resume recipe, in a subprocess like the interrupted ones."""
    base = tmp_path_factory.mktemp("reference")
    recipe = write_toml(base / "reliable.toml", _resume_recipe())
    log = base / "stderr.txt"
    assert _finish(_launch([recipe, "--out", base / "run"], log)) == 0, log.read_text()
    return base / "run"


def _new_run(tmp_path) -> tuple[Path, Path, Path]:
    recipe = write_toml(tmp_path / "reliable.toml", _resume_recipe())
    return Path(recipe), tmp_path / "run", tmp_path / "stderr.txt"


# ---------------------------------------------------------------------------- comparing runs


def _same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, where
        assert torch.allclose(a.double(), b.double(), rtol=0.0, atol=1e-6, equal_nan=True), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6, f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _training_state(path: Path) -> dict:
    """What must not differ after a resume: all of a checkpoint but its timing."""
    state = ckpt.load_checkpoint(path)
    running = dict(state["running"])
    running.pop("elapsed")
    running["interval"] = {k: v for k, v in running["interval"].items() if k not in ("time",)}
    return {"models": state["models"], "optimizers": state["optimizers"], "schedulers": state["schedulers"],
            "gate": state["gate"], "guard": state["guard"],
            "position": state["position"], "running": running, "rng": state["rng"],
            "recipe_digest": state["recipe_digest"]}


def _rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]  # every line whole: no torn line left behind
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def _assert_like_reference(run_dir: Path, reference: Path) -> None:
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if ".tmp-" in p.name) == []
    _same(_training_state(run_dir / "checkpoints" / "final.pt"),
          _training_state(reference / "checkpoints" / "final.pt"), "final.pt")
    rows, expected = _rows(run_dir), _rows(reference)
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == sorted(set(steps)), f"duplicate or unordered steps: {steps}"
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [0, 1]
    _same(rows, expected, "metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["skipped_steps"] == 0
    TALLY["runs compared with the uninterrupted one"] += 1


def test_reference_run_has_every_step_once(reference):
    rows = _rows(reference)
    assert [r["step"] for r in rows if r["kind"] == "train"] == [2, 4, 6, 8, 10]
    assert [(r["epoch"], r["step"]) for r in rows if r["kind"] == "epoch"] == [(0, 5), (1, 10)]
    # The rng_mse loss really ran, so the RNG states matter to the result.
    assert all("loss_reconstruction" in r for r in rows if r["kind"] == "train" and r["epoch"] == 1)


# ---------------------------------------------------------------------------- SIGKILL and resume


def _progress(run_dir: Path) -> int:
    """Return the furthest step the run folder shows (checkpoint names and metrics rows)."""
    steps = [int(m.group(1)) for p in ckpt.list_periodic(run_dir / "checkpoints")
             if (m := re.match(r"step_(\d+)\.pt$", p.name))]
    steps += [r.get("step", 0) for r in read_metrics(run_dir / "metrics.jsonl")]
    return max(steps, default=0)


def _writing(run_dir: Path) -> bool:
    try:
        return any(".tmp-" in name for name in os.listdir(run_dir / "checkpoints"))
    except FileNotFoundError:
        return False


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 180) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; False if it ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if ready():
            proc.kill()
            proc.wait()
            return True
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError("the run neither progressed nor ended")
        time.sleep(0.0005)
    return False


def _check_checkpoints_loadable(run_dir: Path) -> None:
    """Every checkpoint a kill left behind loads: none is torn."""
    for path in sorted((run_dir / "checkpoints").glob("*.pt")):
        ckpt.load_checkpoint(path)


def _signal_and_check(proc: subprocess.Popen, signum: int, run_dir: Path, log: Path, target: int) -> int:
    """Send ``signum`` once the run reaches ``target``; check the clean stop; return its step."""
    _wait_until(proc, lambda: _progress(run_dir) >= target)
    proc.send_signal(signum)
    TALLY["signals"] += 1
    assert _finish(proc, 120) == 130, log.read_text()
    err = log.read_text()
    assert f"Stopped by {signal.Signals(signum).name}" in err and "Traceback" not in err, err
    assert f"Resume with: capsgan run --resume {run_dir}" in err
    saved = ckpt.load_checkpoint(run_dir / "checkpoints" / "interrupt.pt")
    step = saved["position"]["step"]
    assert step >= target and ckpt.latest(run_dir / "checkpoints").name == "interrupt.pt"
    assert max(r["step"] for r in read_metrics(run_dir / "metrics.jsonl")) <= step
    return step


def _run_with_kills(recipe: Path, run_dir: Path, logs: Path, kinds: list[str], rng: random.Random) -> list[str]:
    """Start the run, stop it once per entry of ``kinds``, resume until done; return what happened.

    Kinds: ``startup`` (SIGKILL a random moment after the run folder is made, often
    before the first checkpoint), ``step`` (SIGKILL a random moment 1-2 steps further
    on), ``write`` (SIGKILL while a checkpoint's temporary file exists; retried until one
    kill lands inside a write), ``SIGINT``/``SIGTERM`` (a clean stop 1-3 steps further on).
    """
    events, kinds, retries, launch = [], list(kinds), 0, 0
    while kinds:
        kind = kinds.pop(0)
        log = logs / f"launch{launch}.txt"
        proc = _launch([recipe, "--out", run_dir] if launch == 0 else ["--resume", run_dir], log)
        launch += 1
        if kind in ("SIGINT", "SIGTERM") and _progress(run_dir) + 3 > LAST_SIGNAL_STEP:
            kind = "step"  # too close to the end: the run could finish before the signal lands
        if kind in ("SIGINT", "SIGTERM"):
            step = _signal_and_check(proc, getattr(signal, kind), run_dir, log, _progress(run_dir) + rng.randint(1, 3))
            events.append(f"{kind}: stopped cleanly at step {step}")
            continue
        if kind == "startup":
            delay, marker, start = rng.uniform(0.0, 0.1), run_dir / "recipe.toml", [None]

            def ready():
                if start[0] is None and marker.exists():
                    start[0] = time.monotonic()
                return start[0] is not None and time.monotonic() - start[0] >= delay
        elif kind == "step":
            target, delay, reached = _progress(run_dir) + rng.randint(1, 2), rng.uniform(0.0, 0.05), [None]

            def ready():
                if reached[0] is None and _progress(run_dir) >= target:
                    reached[0] = time.monotonic()
                return reached[0] is not None and time.monotonic() - reached[0] >= delay
        else:
            def ready():
                return _writing(run_dir)
        if not _kill_when(proc, ready):
            assert proc.returncode == 0, log.read_text()
            events.append(f"{kind}: the run ended first")
            break
        TALLY["kill points"] += 1
        in_write = _writing(run_dir)  # the temporary file outlived the process: killed mid-write
        TALLY["of them during a checkpoint write"] += in_write
        events.append(f"{kind}: killed at step {_progress(run_dir)}" + (" during a checkpoint write" if in_write else ""))
        if kind == "write" and not in_write and retries < 4:
            retries += 1
            kinds.insert(0, "write")
        _check_checkpoints_loadable(run_dir)
    EVENTS.append(events)
    while not (run_dir / "summary.json").exists():
        log = logs / f"launch{launch}.txt"
        launch += 1
        assert _finish(_launch(["--resume", run_dir], log)) == 0, log.read_text()
    return events


def test_sigkill_mid_write_sigint_and_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(reference, tmp_path):
    recipe, run_dir, _ = _new_run(tmp_path)
    events = _run_with_kills(recipe, run_dir, tmp_path, ["write", "SIGINT", "step"], random.Random(5))
    assert any("during a checkpoint write" in e for e in events), events
    assert any("SIGINT: stopped cleanly" in e for e in events), events
    _assert_like_reference(run_dir, reference)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_random_points_then_resume_matches_uninterrupted_run(reference, tmp_path, seed):
    rng = random.Random(seed)
    kinds = ["startup"] + [rng.choice(["step", "step", "write", "SIGTERM"]) for _ in range(5)]
    recipe, run_dir, _ = _new_run(tmp_path)
    events = _run_with_kills(recipe, run_dir, tmp_path, kinds, rng)
    assert sum("killed" in e for e in events) >= 3, events
    _assert_like_reference(run_dir, reference)


def _crash_on(monkeypatch, name: str | None):
    """Make the trainer die like a killed process when it first saves ``name`` (None: any checkpoint)."""
    from capsgan_toolkit.training.trainer import Trainer

    original = Trainer.save

    def save(self, which):
        if name is None or which == name:
            monkeypatch.setattr(Trainer, "save", original)
            raise KeyboardInterrupt  # leaves the files as they are, as SIGKILL would
        return original(self, which)

    monkeypatch.setattr(Trainer, "save", save)


def test_crash_between_the_epoch_row_and_the_epoch_checkpoint_duplicates_nothing(in_process, monkeypatch,
                                                                                   reference, tmp_path):
    # The epoch's last step was checkpointed, then its end-of-epoch row was written, then the process died
    # before the end-of-epoch checkpoint: both files hold that step, and the row must not appear twice.
    recipe, run_dir, _ = _new_run(tmp_path)
    _crash_on(monkeypatch, "best.pt")
    assert in_process("run", recipe, "--out", run_dir, "--quiet").exit_code == 130
    assert [r["kind"] for r in read_metrics(run_dir / "metrics.jsonl")][-1] == "epoch"
    assert ckpt.load_checkpoint(ckpt.latest(run_dir / "checkpoints"))["position"] == \
        {"epoch": 0, "batch_in_epoch": 5, "step": 5}
    result = in_process("run", "--resume", run_dir, "--quiet")
    assert result.exit_code == 0, result.output
    _assert_like_reference(run_dir, reference)


def test_run_killed_before_its_first_checkpoint_resumes_from_the_start(in_process, monkeypatch,
                                                                      reference, tmp_path):
    recipe, run_dir, _ = _new_run(tmp_path)
    _crash_on(monkeypatch, None)
    assert in_process("run", recipe, "--out", run_dir, "--quiet").exit_code == 130
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "epoch": 0, "loss_cl')  # a torn row
    (run_dir / "checkpoints" / ".step_000000001.pt.tmp-99999").write_bytes(b"CAPSGAN-CKPT 1\n")
    assert ckpt.latest(run_dir / "checkpoints") is None
    result = in_process("run", "--resume", run_dir)
    assert result.exit_code == 0, result.output
    assert "holds no checkpoint yet: starting it from the beginning" in " ".join(result.output.split())
    _assert_like_reference(run_dir, reference)


def test_latest_checkpoint_is_chosen_by_step_not_by_modification_time(tmp_path):
    def save(name, step):
        return ckpt.save_checkpoint({"format": ckpt.FORMAT_VERSION, "position": {"step": step}}, tmp_path / name)

    older, interrupt, newer = save("step_000000004.pt", 4), save("interrupt.pt", 6), save("step_000000008.pt", 8)
    for age, path in enumerate([older, interrupt, newer]):  # as after `cp -r`: the oldest looks newest
        os.utime(path, ns=(10**18 - age * 10**9, 10**18 - age * 10**9))
    assert ckpt.latest(tmp_path) == newer
    newer.unlink()
    assert ckpt.latest(tmp_path) == interrupt  # the interrupt file holds step 6 > 4
    save("final.pt", 6)
    assert ckpt.latest(tmp_path).name == "final.pt"  # same step: final wins
    (tmp_path / "final.pt").write_bytes(b"garbage")
    assert ckpt.latest(tmp_path) == interrupt  # an unreadable file is passed over
    assert ckpt.latest(tmp_path / "missing") is None


# ---------------------------------------------------------------------------- signals


def _wait_until(proc: subprocess.Popen, ready, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before the signal could be sent"
        assert time.monotonic() < deadline, "the run did not progress"
        time.sleep(0.001)


@pytest.mark.slow  # SIGINT runs in the default suite inside the kill-and-resume test above
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_finishes_the_step_saves_and_resumes_exactly(reference, tmp_path, signum):
    recipe, run_dir, log = _new_run(tmp_path)
    proc = _launch([recipe, "--out", run_dir], log)
    _signal_and_check(proc, signum, run_dir, log, random.Random(int(signum)).randint(2, LAST_SIGNAL_STEP))
    assert _finish(_launch(["--resume", run_dir], log)) == 0, log.read_text()
    _assert_like_reference(run_dir, reference)


def test_second_sigint_aborts_at_once_and_leaves_loadable_checkpoints(tmp_path):
    recipe, run_dir, _ = _new_run(tmp_path)
    outcomes = []
    for attempt in range(3):  # two signals can coalesce into one; then it is a clean stop, and we retry
        log = tmp_path / f"stderr{attempt}.txt"
        proc = _launch([recipe, "--out", run_dir] if attempt == 0 else ["--resume", run_dir], log)
        start = _progress(run_dir)
        _wait_until(proc, lambda: _progress(run_dir) >= start + 2)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        TALLY["signals"] += 2
        assert _finish(proc, 120) == 130
        err = log.read_text()
        assert "Traceback" not in err, err
        outcomes.append("aborted" if "aborted" in err else "stopped")
        assert not _writing(run_dir), "a temporary checkpoint file was left behind"
        _check_checkpoints_loadable(run_dir)
        assert ckpt.latest(run_dir / "checkpoints") is not None
        if outcomes[-1] == "aborted":
            break
    assert outcomes[-1] == "aborted", outcomes


# ---------------------------------------------------------------------------- numerical faults


@pytest.fixture
def in_process(monkeypatch):
    """Run the CLI in this process with the test plugins importable; restore torch's thread count."""
    monkeypatch.syspath_prepend(str(TESTS))
    threads = torch.get_num_threads()
    yield lambda *args: CliRunner().invoke(cli, [str(a) for a in args])
    torch.set_num_threads(threads)


def _nan_recipe(tmp_path, at_steps: list[int], **run) -> str:
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["run"].update(plugins=[FAULTS], eval_batches=1, **run)
    recipe["losses"]["classification"] = {"plugin": "nan_at_step", "at_steps": at_steps}
    return write_toml(tmp_path / "nan.toml", recipe)


def test_nan_loss_stops_with_loss_step_and_component_named_and_keeps_the_checkpoint(in_process, tmp_path):
    run_dir = tmp_path / "run"
    result = in_process("run", _nan_recipe(tmp_path, [4]), "--out", run_dir, "--quiet")
    assert result.exit_code == 3 and isinstance(result.exception, SystemExit), result.output
    text = " ".join(result.output.split())
    assert "Step 4 (epoch 1" in text and "NaN or Inf" in text
    assert 'classification (losses.classification, plugin "nan_at_step"), which trains the encoder' in text
    assert "step_000000003.pt" in text and 'run.on_nan = "skip"' in text
    state = ckpt.load_checkpoint(run_dir / "checkpoints" / "step_000000003.pt")
    assert state["position"] == {"epoch": 1, "batch_in_epoch": 0, "step": 3}
    assert all(torch.isfinite(t).all() for m in state["models"].values() for t in m.values())
    assert not (run_dir / "checkpoints" / "final.pt").exists()
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3]


def test_a_model_whose_output_turns_nan_is_named_not_only_the_loss_it_reaches(in_process, tmp_path):
    # A third-party encoder whose capsules turn NaN at step 3: the first loss to see it is whichever the
    # objective checks first, but the message must lead the user to the encoder.
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["run"].update(plugins=[FAULTS], eval_batches=1)
    recipe["encoder"] = {**recipe["encoder"], "plugin": "nan_cnn_at_step", "at_steps": [3]}
    recipe["gate"] = {"plugin": "always"}
    run_dir = tmp_path / "run"
    result = in_process("run", write_toml(tmp_path / "nan_encoder.toml", recipe), "--out", run_dir, "--quiet")
    assert result.exit_code == 3, result.output
    text = " ".join(result.output.split())
    assert "Step 3 " in text and "NaN or Inf" in text
    assert 'It started in the encoder ([encoder] plugin "nan_cnn_at_step"): the first model whose output' in text


def test_a_loss_that_turns_nan_by_itself_names_no_model(in_process, tmp_path):
    result = in_process("run", _nan_recipe(tmp_path, [2]), "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 3, result.output
    assert "It started in" not in result.output  # every model's output was finite: the loss is the culprit


def test_nan_loss_with_on_nan_skip_skips_and_counts_the_steps(in_process, tmp_path):
    recipe = _nan_recipe(tmp_path, [2, 4], on_nan="skip", epochs=1, steps_per_epoch=4)
    run_dir = tmp_path / "run"
    result = in_process("run", recipe, "--out", run_dir, "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["skipped_steps"] == 2 and summary["steps"] == 4
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 2]
    assert math.isnan(rows[1]["loss_classification"])  # the skipped step's loss is recorded as it was
    final = ckpt.load_checkpoint(run_dir / "checkpoints" / "final.pt")
    assert all(torch.isfinite(t).all() for m in final["models"].values() for t in m.values())
    # The encoder/generator optimizer stepped on the 2 good steps only.
    assert max(int(s["step"]) for s in final["optimizers"]["encoder_generator"]["state"].values()) == 2


def test_on_nan_skip_puts_back_the_buffers_a_skipped_step_changed(in_process, tmp_path):
    # The encoder's capsules turn NaN at step 2: the generator's BatchNorm sees NaN in that forward pass
    # before any loss is checked. The step is skipped, and its running statistics must be put back.
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["run"].update(plugins=[FAULTS], eval_batches=1, on_nan="skip", epochs=1, steps_per_epoch=4)
    recipe["encoder"] = {**recipe["encoder"], "plugin": "nan_cnn_at_step", "at_steps": [2]}
    recipe["generator"] = {**recipe["generator"], "batch_norm": True}
    recipe["gate"] = {"plugin": "always"}  # the generator and discriminator run from the first step
    run_dir = tmp_path / "run"
    result = in_process("run", write_toml(tmp_path / "nan_encoder.toml", recipe), "--out", run_dir, "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "summary.json").read_text())["skipped_steps"] == 1
    final = ckpt.load_checkpoint(run_dir / "checkpoints" / "final.pt")
    running = {f"{m}.{k}": t for m, state in final["models"].items() for k, t in state.items() if "running_" in k}
    assert running, "the tiny generator should have BatchNorm running statistics"
    bad = [k for k, t in running.items() if not torch.isfinite(t).all()]
    assert not bad, f"NaN running statistics saved after a skipped step: {bad}"
    assert all(torch.isfinite(t).all() for m in final["models"].values() for t in m.values())


# ---------------------------------------------------------------------------- a full disk


def test_full_disk_keeps_the_previous_checkpoint_and_leaves_no_temporary(monkeypatch, tmp_path):
    path = ckpt.save_checkpoint({"format": ckpt.FORMAT_VERSION, "w": torch.arange(5.0)}, tmp_path / "step.pt")
    before = path.read_bytes()
    monkeypatch.setattr(writes, "open", FullDiskAt("step.pt"), raising=False)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        ckpt.save_checkpoint({"format": ckpt.FORMAT_VERSION, "w": torch.zeros(1000)}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["step.pt"]
    assert torch.equal(ckpt.load_checkpoint(path)["w"], torch.arange(5.0))


def _temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*.tmp-*"))


@pytest.mark.parametrize("name, nth", [("step_*.pt", 3), ("metrics.jsonl", 3), ("epoch_001.png", 1),
                                       ("curves.png", 1), ("traversal.png", 1), ("summary.json", 1)])
def test_full_disk_at_each_file_a_run_writes_stops_cleanly_and_the_run_resumes_exactly(
        in_process, monkeypatch, reference, tmp_path, name, nth):
    recipe, run_dir, _ = _new_run(tmp_path)
    full = FullDiskAt(name, nth=nth)
    monkeypatch.setattr(writes, "open", full, raising=False)
    result = in_process("run", recipe, "--out", run_dir, "--quiet")
    assert full.hits == 1, f"{name} was never written"
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    message = " ".join(result.output.split())
    written = re.search(r"Could not write (\S+): ", message)
    assert written and written.group(1).startswith(str(run_dir)) and fnmatch.fnmatch(Path(written.group(1)).name, name)
    assert "No space left on device" in message and "free on that disk" in message and "resume" in message, message
    assert _temporaries(run_dir) == []
    _rows(run_dir)  # every metrics line whole: a failed append is cut back off
    _check_checkpoints_loadable(run_dir)
    monkeypatch.undo()  # space freed
    monkeypatch.syspath_prepend(str(TESTS))
    result = in_process("run", "--resume", run_dir, "--quiet")
    assert result.exit_code == 0, result.output
    _assert_like_reference(run_dir, reference)
    assert _temporaries(run_dir) == []


@pytest.mark.parametrize("command, name", [("eval", "eval.json"), ("probe", "probe.json"), ("probe", "probe.png")])
def test_full_disk_at_eval_and_probe_outputs_leaves_the_previous_file_and_no_temporary(
        in_process, monkeypatch, reference, tmp_path, command, name):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    options = ["--metrics", "acc", "--num-images", "10"] if command == "eval" else ["--n", "10"]
    assert in_process(command, run_dir, *options).exit_code == 0
    before = (run_dir / name).read_bytes()
    monkeypatch.setattr(writes, "open", FullDiskAt(name), raising=False)
    result = in_process(command, run_dir, *options)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    message = " ".join(result.output.split())
    assert f"Could not write {run_dir / name}: No space left on device" in message, message
    assert "The previous version of the file is intact" in message
    assert (run_dir / name).read_bytes() == before and _temporaries(run_dir) == []
