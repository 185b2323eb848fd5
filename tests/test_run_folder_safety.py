"""Run folders nobody can lose (issue 23): one writer at a time, a safe --overwrite, plain run names,
compare workers that die with their parent.

Real processes, no mocks: the second writer is a ``python -m capsgan_toolkit`` subprocess (a lock
held by this process is re-entrant for this process, so the contender must be another one), and
the worker's parent is a small Python process killed with SIGKILL. See docs/reliability.md.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_RECIPE, invoke, write_toml

from capsgan_toolkit.rundir.folder import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _capsgan(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "capsgan_toolkit", *map(str, args)], capture_output=True, text=True,
                          env=_env(), cwd=cwd, timeout=240)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (the lock file aside) -> a digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def _train_rows(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]
    return [row["step"] for row in rows if row.get("kind") == "train"]


def _one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def tiny_run(tmp_path) -> tuple[Path, Path]:
    """A finished tiny run (recipe, run folder), trained in this process."""
    recipe = write_toml(tmp_path / "tiny.toml", copy.deepcopy(TINY_RECIPE))
    run = tmp_path / "run"
    result = invoke("run", recipe, "--out", run, "--quiet")
    assert result.exit_code == 0, result.output
    return Path(recipe), run


# ---------------------------------------------------------------------------- one writer at a time


def test_a_second_writer_is_refused_while_another_process_holds_the_lock(tiny_run, tmp_path):
    recipe, run = tiny_run
    before = _snapshot(run)
    with RunDir(run).lock("holding it for a test"):  # a live writer: this process
        for args in (["run", "--resume", run, "--set", "run.epochs=3", "--quiet"],
                     ["run", recipe, "--out", run, "--overwrite", "--quiet"],
                     ["eval", run, "--metrics", "acc"], ["probe", run, "--n", "10"], ["sample", run, "--n", "4"]):
            done = _capsgan(*args, cwd=tmp_path)
            message = _one_line(done.stderr)
            assert done.returncode == 2, done.stderr
            assert "Traceback" not in done.stderr
            assert f"process {os.getpid()}" in message and "in use" in message and str(run) in message, message
            assert "holding it for a test" in message, message
            assert _snapshot(run) == before, f"{args[1]}: the run folder changed"
    # Lock released: the resume goes ahead, and every step is logged once.
    result = invoke("run", "--resume", run, "--set", "run.epochs=3", "--quiet")
    assert result.exit_code == 0, result.output
    steps = _train_rows(run)
    assert len(steps) == len(set(steps)) and max(steps) == 9, steps


def test_two_concurrent_resumes_of_one_folder_one_is_refused_and_rows_stay_unique(tmp_path):
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["run"].update(epochs=200, steps_per_epoch=0)  # trains until stopped
    recipe["data"]["num_train"] = 400
    recipe_file = write_toml(tmp_path / "long.toml", recipe)
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "capsgan_toolkit", "run", recipe_file, "--out", run, "--quiet"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file():
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start training"
            time.sleep(0.2)
        second = _capsgan("run", "--resume", run, "--quiet", cwd=tmp_path)
        assert first.poll() is None, "the first run ended before the second was refused: the test proves nothing"
        message = _one_line(second.stderr)
        assert second.returncode == 2 and f"process {first.pid}" in message and "in use" in message, message
    finally:
        first.send_signal(signal.SIGTERM)  # checkpoints and stops
        _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    steps = _train_rows(run)
    assert steps and len(steps) == len(set(steps)), "metrics rows written twice"


# ---------------------------------------------------------------------------- a safe --overwrite


def test_overwrite_of_a_folder_that_holds_no_run_is_refused_and_deletes_nothing(tmp_path):
    recipe = write_toml(tmp_path / "tiny.toml", copy.deepcopy(TINY_RECIPE))
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me", encoding="utf-8")
    (mine / "recipe.toml").write_text("[run]\nname = 'mine'\n", encoding="utf-8")  # a recipe, but no run
    (mine / "sub" / "data.bin").write_bytes(b"\0" * 10)
    before = _snapshot(mine)
    result = invoke("run", recipe, "--out", mine, "--overwrite", "--quiet")
    message = _one_line(result.output)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert str(mine) in message and "does not hold a run" in message and "nothing in it was deleted" in message, message
    assert _snapshot(mine) == before and sorted(p.name for p in mine.iterdir()) == ["notes.txt", "recipe.toml", "sub"]


def test_overwrite_of_a_finished_run_starts_it_again(tiny_run):
    recipe, run = tiny_run
    (run / "checkpoints" / "step_000000999.pt").write_bytes(b"old")  # from the run being replaced
    result = invoke("run", recipe, "--out", run, "--overwrite", "--quiet")
    assert result.exit_code == 0, result.output
    assert not (run / "checkpoints" / "step_000000999.pt").exists()
    assert _train_rows(run) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("name", ["", ".", "../x", "/abs"])
def test_run_name_must_be_one_plain_folder_name(tmp_path, monkeypatch, name):
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["run"]["name"] = str(tmp_path / "abs") if name == "/abs" else name
    work = tmp_path / "work"
    work.mkdir()
    write_toml(work / "bad.toml", recipe)
    monkeypatch.chdir(work)
    result = invoke("run", "bad.toml", "--quiet", "--overwrite", catch_exceptions=True)
    message = _one_line(result.output)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert "run.name" in message and "one plain folder name" in message and "--out" in message, message
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bad.toml", "work"], "something was created"


# ---------------------------------------------------------------------------- workers die with their parent


PARENT = textwrap.dedent("""
    import json, subprocess, sys
    from capsgan_toolkit.compare.lifeline import child_options
    steps = [{"action": "train", "recipe": sys.argv[1], "out": sys.argv[2], "sets": [], "resume": False}]
    with open(sys.argv[3], "a") as log:  # started as the compare runner starts its workers
        worker = subprocess.Popen([sys.executable, "-m", "capsgan_toolkit.compare.worker", json.dumps(steps)],
                                  stdout=log, stderr=subprocess.STDOUT, **child_options())
    print(worker.pid, flush=True)
    worker.wait()
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not yet reaped by its new parent) counts as dead
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_a_compare_worker_dies_within_5s_of_its_parent_killed_and_its_run_resumes(tmp_path):
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["run"].update(epochs=200, steps_per_epoch=0)  # trains until stopped; the kill lands mid-epoch
    recipe["data"]["num_train"] = 2000
    recipe_file = write_toml(tmp_path / "long.toml", recipe)
    (tmp_path / "parent.py").write_text(PARENT, encoding="utf-8")
    run, log = tmp_path / "run", tmp_path / "worker.log"
    parent = subprocess.Popen([sys.executable, "parent.py", recipe_file, run, log], stdout=subprocess.PIPE, text=True,
                              env=_env(), cwd=tmp_path)
    worker = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file():
            assert parent.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        parent.kill()
        parent.wait()
        killed = time.monotonic()
        while _alive(worker) and time.monotonic() - killed < 5:
            time.sleep(0.05)
        assert not _alive(worker), f"the worker outlived its parent by 5 s:\n{log.read_text()}"
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)
    assert "Stopped by SIGTERM" in log.read_text(), log.read_text()
    assert (run / "checkpoints" / "interrupt.pt").is_file()
    assert RunDir(run).check_resumable() is not None


# ------------------------------------------------------------------ received run folders run no code

_EVIL = textwrap.dedent("""
    from pathlib import Path
    Path(__file__).with_name("IMPORTED").write_text("the run folder's module ran")
""")


def _name_a_module_in(run: Path, module: str) -> None:
    """Make the run's saved recipe (in every checkpoint and recipe.toml) name ``module`` in run.plugins."""
    from capsgan_toolkit.recipe.toml_io import dumps_toml, read_toml
    from capsgan_toolkit.rundir import checkpoint as ckpt

    for path in (run / "checkpoints").glob("*.pt"):
        state = ckpt.load_checkpoint(path)
        state["recipe"]["run"]["plugins"] = [module]
        ckpt.save_checkpoint(state, path)
    recipe = read_toml(run / "recipe.toml")
    recipe["run"]["plugins"] = [module]
    (run / "recipe.toml").write_text(dumps_toml(recipe) + "\n", encoding="utf-8")


@pytest.mark.parametrize("command", [["eval", "."], ["sample", "."], ["probe", ".", "--n", "10"],
                                     ["run", "--resume", "."]])
def test_a_received_run_folder_does_not_import_a_module_it_carries(tiny_run, command):
    _, run = tiny_run
    (run / "evil_plugin.py").write_text(_EVIL, encoding="utf-8")
    _name_a_module_in(run, "evil_plugin")
    if command[0] == "run":
        (run / "summary.json").unlink()  # unfinished: a resume reads the folder's recipe and its plugins
    done = _capsgan(*command, cwd=run)  # python -m puts the current folder, the run folder, on sys.path
    message = _one_line(done.stderr + done.stdout)
    assert done.returncode == 2, message
    assert not (run / "IMPORTED").exists(), "the module carried by the run folder was imported"
    assert 'names plugin module "evil_plugin" (run.plugins), which is found only in the current folder' in message
    assert str(run / "evil_plugin.py") in message and "PYTHONPATH" in message and "Traceback" not in message


def test_a_module_the_user_puts_on_pythonpath_is_imported(tiny_run, tmp_path):
    _, run = tiny_run
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "user_plugin.py").write_text(_EVIL, encoding="utf-8")
    _name_a_module_in(run, "user_plugin")
    done = subprocess.run([sys.executable, "-m", "capsgan_toolkit", "eval", str(run), "--metrics", "acc"],
                          capture_output=True, text=True, env={**_env(), "PYTHONPATH": str(trusted)}, cwd=tmp_path,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (trusted / "IMPORTED").exists()


# ------------------------------------------------------------------ a real capsgan compare, killed

_KILL_SPEC = """
title = "killed and re-run"
baseline = "a"
seeds = 1
[budget]
epochs = 2
[eval]
metrics = ["acc"]
num_images = 32
[[arms]]
label = "a"
recipe = "long.toml"
[[arms]]
label = "b"
recipe = "long.toml"
set = ["encoder.channels=12"]
"""


def _lock_holder(folder: Path) -> int | None:
    try:
        return json.loads((folder / ".lock").read_text(encoding="utf-8"))["pid"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_compare_leaves_no_worker_and_its_re_run_resumes_exactly(tmp_path, signum):
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["run"]["steps_per_epoch"] = 0  # whole epochs of 2000 images: long enough to be stopped mid-epoch
    recipe["data"]["num_train"] = 2000
    write_toml(tmp_path / "long.toml", recipe)
    (tmp_path / "spec.toml").write_text(_KILL_SPEC, encoding="utf-8")
    out, run = tmp_path / "cmp", tmp_path / "cmp" / "runs" / "a" / "seed-0"
    args = [sys.executable, "-m", "capsgan_toolkit", "compare", "spec.toml", "--out", str(out), "--quiet"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                             cwd=tmp_path)
    worker = None
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").is_file() and (worker := _lock_holder(run))):
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
            time.sleep(0.1)
        if signum == signal.SIGTERM:  # meanwhile a second comparison on the same folder is refused at once
            second = _capsgan("compare", "spec.toml", "--out", out, "--quiet", cwd=tmp_path)
            message = _one_line(second.stdout + second.stderr)
            assert second.returncode == 2, message
            assert f"The comparison folder {out} is in use: process {first.pid}" in message, message
        first.send_signal(signum)
        sent = time.monotonic()
        while _alive(worker) and time.monotonic() - sent < 5:
            time.sleep(0.05)
        assert not _alive(worker), "a compare worker outlived its killed parent by 5 s"
        first.wait(timeout=60)
    finally:
        for pid in (first.pid, worker):
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert (run / "checkpoints" / "interrupt.pt").is_file()  # the worker stopped after its step, checkpointed

    again = _capsgan("compare", "spec.toml", "--out", out, "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "training " + str(run) + " (resume=True)" in (out / "logs" / "a-seed-0.log").read_text()
    steps = _train_rows(run)
    total = json.loads((run / "summary.json").read_text(encoding="utf-8"))["steps"]
    assert steps == list(range(1, total + 1)), "metrics rows repeated or missing after the resume"
    reference = tmp_path / "reference"  # the same recipe, never interrupted
    assert invoke("run", run / "recipe.toml", "--out", reference, "--quiet").exit_code == 0
    from capsgan_toolkit.rundir import checkpoint as ckpt

    resumed = ckpt.load_checkpoint(run / "checkpoints" / "final.pt")["models"]
    straight = ckpt.load_checkpoint(reference / "checkpoints" / "final.pt")["models"]
    for model, tensors in straight.items():
        for key, tensor in tensors.items():
            assert torch.equal(resumed[model][key], tensor), f"{model}.{key} differs after the resume"
