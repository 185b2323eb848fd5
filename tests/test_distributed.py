"""Training on two CPU processes (torchrun, gloo): identical ranks, equivalence to one process, resume.

Each test starts real processes with ``python -m torch.distributed.run`` (torchrun), so these
exercise the process group, the sharded batches, the gradient all-reduce and rank 0's writing
exactly as a user's ``torchrun --nproc_per_node 2 -m capsgan_toolkit run RECIPE`` does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from helpers import invoke, tiny_recipe, write_toml

from capsgan_toolkit import api
from capsgan_toolkit.rundir.checkpoint import load_checkpoint

# A worker that trains like `capsgan run` and then saves its own rank's weights, so the test can
# compare the ranks (rank 1 writes nothing into the run folder by design).
WORKER = r'''
import sys
import torch
from capsgan_toolkit import api
from capsgan_toolkit.step import distributed
from capsgan_toolkit.recipe.build import build
from capsgan_toolkit.rundir.folder import RunDir
from capsgan_toolkit.training.trainer import Trainer

recipe, out, dump = sys.argv[1:4]
dist = distributed.setup("cpu")
plugins, resolved = api.load_recipe(recipe)
built = build(resolved, plugins)
if dist.is_main:
    RunDir.create(out).write_recipe(resolved)
dist.barrier()
Trainer(resolved, plugins, out, built=built).fit()
torch.save({n: m.state_dict() for n, m in built.modules().items()}, f"{dump}.rank{dist.rank}.pt")
distributed.teardown()
'''


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(*args, nproc: int = 2, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run ``torchrun --standalone --nproc_per_node nproc ARGS`` (returns the Popen with ``popen`` given)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    if popen:
        return subprocess.Popen(cmd, env=_env(), **popen)
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)


def gan_recipe(tmp_path: Path, *, batch_size: int, name: str = "r.toml", **run) -> str:
    """The tiny GAN recipe without BatchNorm (per-rank batch statistics would differ from one process's)."""
    data = tiny_recipe()
    data["data"]["batch_size"] = batch_size
    data["encoder"]["batch_norm"] = False
    data["generator"]["batch_norm"] = False
    data["discriminator"]["batch_norm"] = False
    data["run"].update(run)
    return write_toml(tmp_path / name, data)


def models(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The models' weights in a checkpoint, or in a worker's dump."""
    if path.parent.name == "checkpoints":
        return load_checkpoint(path, "cpu")["models"]
    return torch.load(path, map_location="cpu", weights_only=True)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((x.double() - b[m][k].double()).abs().max().item()
               for m in a for k, x in a[m].items() if x.is_floating_point())


def test_two_ranks_stay_identical_and_match_one_process_with_the_same_global_batch(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER, encoding="utf-8")
    two = torchrun(worker, gan_recipe(tmp_path, batch_size=4, name="two.toml"), tmp_path / "two", tmp_path / "dump")
    assert two.returncode == 0, two.stderr[-3000:]
    rank0, rank1 = models(tmp_path / "dump.rank0.pt"), models(tmp_path / "dump.rank1.pt")
    assert max_difference(rank0, rank1) == 0.0  # same averaged gradients, same steps, same buffers
    # Rank 0 alone wrote the run folder; its final.pt is rank 0's weights.
    assert max_difference(models(tmp_path / "two" / "checkpoints" / "final.pt"), rank0) == 0.0

    api.train(gan_recipe(tmp_path, batch_size=8, name="one.toml"), out=tmp_path / "one")
    one = models(tmp_path / "one" / "checkpoints" / "final.pt")
    # 6 steps of Adam (lr 1e-3) on a global batch of 8 split 4 + 4: the mean of the ranks' mean
    # gradients is the global mean gradient up to float32 summation order.
    assert max_difference(one, rank0) < 1e-5  # measured: 8e-8 after 12 steps (docs/performance.md)
    rows = [line for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert rows, "rank 0 wrote no metrics"
    assert not list((tmp_path / "two").glob("*rank1*"))


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux: from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _wait_for_lock_free(folder, timeout: float = 30.0) -> None:
    from capsgan_toolkit.errors import RunFolderError
    from capsgan_toolkit.rundir.lock import RunLock

    deadline = time.monotonic() + timeout
    while True:
        try:
            RunLock(folder, "test").acquire().release()
            return
        except RunFolderError:
            assert time.monotonic() < deadline, f"{folder} still locked {timeout} s after its job was killed"
            time.sleep(0.1)


def test_a_killed_or_stopped_two_process_run_resumes_exactly(tmp_path):
    recipe = gan_recipe(tmp_path, batch_size=4, epochs=4, steps_per_epoch=3)
    straight = torchrun("-m", "capsgan_toolkit", "run", recipe, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert straight.stdout.count("done: test accuracy") == 1  # rank 0 alone reports

    killed_dir = tmp_path / "killed"
    proc = torchrun("-m", "capsgan_toolkit", "run", recipe, "--out", killed_dir, "--quiet",
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((killed_dir / "checkpoints").glob("step_*.pt")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no periodic checkpoint appeared"
        time.sleep(0.05)
    job = _descendants(proc.pid)  # torchrun's workers need not share its process group
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job dies at once, as when a node is lost
    for pid in job:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    _wait_for_lock_free(killed_dir)  # the kernel releases the run folder's lock as the workers end
    assert not (killed_dir / "checkpoints" / "final.pt").exists(), "the run finished before it was killed"

    # One process refuses the checkpoint (the global batch would change), and loses nothing.
    result = invoke("run", "--resume", killed_dir, catch_exceptions=True)
    assert result.exit_code != 0
    assert "2 process(es)" in result.output and "torchrun --nproc_per_node" in result.output

    resumed = torchrun("-m", "capsgan_toolkit", "run", "--resume", killed_dir, "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = models(tmp_path / "straight" / "checkpoints" / "final.pt")
    b = models(killed_dir / "checkpoints" / "final.pt")
    assert max_difference(a, b) == 0.0

    # SIGTERM to torchrun (a scheduler's preemption): torchrun passes it to both workers, they
    # agree on one step to stop at, rank 0 writes interrupt.pt, and the resume ends where the
    # uninterrupted run ends.
    stopped_dir = tmp_path / "stopped"
    proc = torchrun("-m", "capsgan_toolkit", "run", recipe, "--out", stopped_dir, "--quiet",
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while '"kind": "train"' not in _read(stopped_dir / "metrics.jsonl") and proc.poll() is None:
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert (stopped_dir / "checkpoints" / "interrupt.pt").exists(), output[-3000:]
    assert not (stopped_dir / "checkpoints" / "final.pt").exists()
    resumed = torchrun("-m", "capsgan_toolkit", "run", "--resume", stopped_dir, "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max_difference(a, models(stopped_dir / "checkpoints" / "final.pt")) == 0.0


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""

