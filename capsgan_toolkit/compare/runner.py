"""The grid of a comparison: every arm x seed trained, resumed or reused, evaluated, reported.

Runs live in ``OUT/runs/<arm>/seed-<k>/``. A re-run of the same command:

- reuses a finished run (``RunDir.is_finished()``) whose recipe still matches the spec
  (a changed recipe is refused, naming the keys: delete the run or choose another --out);
- resumes an unfinished one exactly (``api.train(..., resume=True)``);
- evaluates a run only when its eval.json is missing, was computed from another
  checkpoint, or with another protocol than the spec's ``[eval]``;
- with ``probe = true``, probes a run (``capsgan probe``) only when its probe.json is missing,
  from another checkpoint or with another image count.

Every run trains and evaluates in its own worker process
(``python -m capsgan_toolkit.compare.worker``): a run's peak memory (the process's max RSS on
a CPU) is then its own, not the maximum over the runs before it, and no global state (threads,
random generators, caches) leaks from one run to the next. ``--jobs N`` runs N workers at once,
``--devices`` pins them to devices in turn;
``--shard K/N`` runs the K-th of N deterministic slices of the sorted grid and writes no
report (a plain re-run afterwards merges every finished run into one).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsgan_toolkit.compare.collect import (
    PROTOCOL_IGNORED,
    fairness_recipe,
    protocol_differences,
    read_probe,
    read_run,
)
from capsgan_toolkit.compare.fairness import Fairness, compare_recipes
from capsgan_toolkit.compare.lifeline import Terminated, child_options, stop_on_termination
from capsgan_toolkit.compare.spec import ArmSpec, CompareError, LoadedSpec
from capsgan_toolkit.errors import Interrupted
from capsgan_toolkit.progress import rich_bars
from capsgan_toolkit.recipe.diff import RERUN_IGNORED, recipe_diff
from capsgan_toolkit.recipe.schema import with_defaults
from capsgan_toolkit.rundir.folder import RunDir


@dataclass
class Job:
    """One run of the grid."""

    arm: str
    seed: int
    recipe: Path
    sets: list[str]
    path: Path
    desired: dict[str, Any] = field(default_factory=dict)
    device: str | None = None

    @property
    def name(self) -> str:
        return f"{self.arm}/seed-{self.seed}"


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """Parse ``K/N`` (1 <= K <= N)."""
    if text is None:
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise CompareError(f"--shard {text}: expected K/N, for example 1/4 (K from 1 to N).") from None
    if not (n >= 1 and 1 <= k <= n):
        raise CompareError(f"--shard {text}: K must be between 1 and N (got K={k}, N={n}).")
    return k, n


def plan(loaded: LoadedSpec, out: Path, arms: list[ArmSpec]) -> list[Job]:
    """Return the grid, sorted by arm label then seed (the order shards slice)."""
    jobs = [Job(arm.label, seed, loaded.recipe_path(arm), loaded.overrides(arm, seed),
                out / "runs" / arm.label / f"seed-{seed}")
            for arm in arms for seed in loaded.spec.seeds]
    return sorted(jobs, key=lambda j: (j.arm, j.seed))


def shard(jobs: list[Job], part: tuple[int, int] | None) -> list[Job]:
    """Return the K-th of N slices of the sorted grid (job i goes to slice i mod N)."""
    if part is None:
        return jobs
    k, n = part
    return [job for i, job in enumerate(jobs) if i % n == k - 1]


def device_setup(device: str | None, jobs: int) -> tuple[list[str], dict[str, str]]:
    """Return the overrides and environment that put one run on ``device``."""
    env: dict[str, str] = {}
    if device is None:
        sets = []
    elif device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        sets = ['run.device="cuda"']
    elif device in ("cpu", "cuda", "mps", "auto"):
        sets = [f'run.device="{device}"']
    else:
        raise CompareError(f"--devices: unknown device {device!r}; use cpu, cuda, cuda:K or mps.")
    if device in (None, "cpu", "auto") and jobs > 1:
        threads = str(max(1, (os.cpu_count() or 1) // jobs))  # share the cores, do not oversubscribe them
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return sets, env


def stale_keys(trained: dict[str, Any], desired: dict[str, Any]) -> list[str]:
    """Return ``key: trained -> spec`` for each key where a trained run's recipe differs from the spec's."""
    return [str(change) for change in recipe_diff(trained, desired, ignore=RERUN_IGNORED)]


def _eval_table(table: dict[str, Any] | None) -> dict[str, Any] | None:
    if not isinstance(table, dict):
        return None
    return {k: v for k, v in table.items() if k not in PROTOCOL_IGNORED}


def needs_evaluation(rd: RunDir, desired: dict[str, Any]) -> str | None:
    """Return why a finished run must be evaluated again, or ``None`` when its eval.json is current."""
    result = rd.read_eval()
    if result is None:
        return "not evaluated yet"
    if _eval_table(result.get("eval")) != _eval_table(desired.get("eval")):
        return "the evaluation protocol changed"
    summary = rd.read_summary() or {}
    if "step" in result and "steps" in summary and result["step"] != summary["steps"]:
        return "eval.json is from another checkpoint"
    return None


def needs_probe(rd: RunDir, images: int | None) -> str | None:
    """Return why a finished run must be probed with ``images`` test images (``None``: no probe asked, or current)."""
    if images is None:
        return None
    found = read_probe(rd)
    if found is None or "columns" not in found:
        return "not probed yet" if found is None else "probe.json is from an older capsgan"
    if found.get("n") != images:
        return "the probe's image count changed"
    steps = (rd.read_summary() or {}).get("steps")
    return "probe.json is from another checkpoint" if steps is not None and found.get("step") != steps else None


def probe_run(run_dir: Path, images: int, trusted_plugins=()) -> None:
    """Probe one finished run (probe.json, probe.png), as ``capsgan probe RUN_DIR --n images`` does."""
    from capsgan_toolkit.tools import probe

    probe.write_probe(run_dir, n=images, trusted_plugins=trusted_plugins)


def recipe_modules(recipe: str | Path, sets=()) -> list[str]:
    """The ``run.plugins`` modules of the user's own recipe (and ``--set``s): its runs may import them."""
    from capsgan_toolkit.recipe.schema import apply_overrides
    from capsgan_toolkit.recipe.toml_io import read_toml

    data = read_toml(recipe)
    apply_overrides(data, list(sets))
    modules = (data.get("run") or {}).get("plugins") or []
    return [m for m in modules if isinstance(m, str)] if isinstance(modules, list) else []


class Runner:
    """Train, evaluate and report one comparison spec.

    Args:
        loaded: the validated spec.
        out: the comparison folder.
        arms: the arms to run (``LoadedSpec.spec.selected``).
        allow: keys allowed to differ (the spec's plus ``--allow-difference``).
        jobs: worker processes at once.
        devices: devices handed to the runs in turn (``cpu``, ``cuda:0``, ...).
        part: ``(K, N)`` to run only the K-th shard of the grid.
        console: a rich console for progress and the report (``None``: quiet).
        in_process: train and evaluate in this process, one run after the other (for tests
            and debugging; peak memory then accumulates over the runs).
        submit: ``submit(runner, todo)`` hands the runs with work left to an executor instead of
            worker processes of this one, and returns whether they finished (then the report is
            written) or only were submitted (:func:`capsgan_toolkit.compare.executor.run_jobs`).
    """

    def __init__(self, loaded: LoadedSpec, out: Path, *, arms: list[ArmSpec], allow: list[str], jobs: int = 1,
                 devices: list[str] | None = None, part: tuple[int, int] | None = None, console=None,
                 in_process: bool = False, submit: Callable[[Runner, list], bool] | None = None):
        self.in_process, self.submit = in_process, submit
        self.loaded, self.out, self.arms = loaded, Path(out), arms
        self.allow = list(dict.fromkeys([*loaded.spec.allow_difference, *allow]))
        self.jobs, self.devices, self.part, self.console = max(1, jobs), list(devices or []), part, console
        self.grid = plan(loaded, self.out, arms)
        self.mine = shard(self.grid, part)
        self.probe_images = loaded.spec.probe_images if loaded.spec.probe else None

    # ------------------------------------------------------------------ before training

    def resolve(self) -> Fairness:
        """Resolve every run's recipe and refuse unfair arms before any training."""
        from capsgan_toolkit import api

        registries = {}  # each run's saved recipe is completed with its own plugins' defaults
        for job in self.grid:
            plugins, resolved = api.load_recipe(job.recipe, job.sets)
            job.desired, registries[job.path] = resolved.to_dict(), plugins.registry
        by_arm: dict[str, list[dict]] = {}
        for job in self.grid:
            by_arm.setdefault(job.arm, []).append(job.desired)
        fairness = compare_recipes(by_arm, self.allow)
        fairness.check()
        stale = []
        for job in self.mine:
            rd = RunDir(job.path)
            if rd.is_run():
                changed = stale_keys(with_defaults(rd.read_recipe(), registries[job.path]), job.desired)
                if changed:
                    stale.append(f"  {job.path}:\n    " + "\n    ".join(changed))
        if stale:
            raise CompareError("These runs were trained with another recipe than the spec now gives (keys: "
                               "trained -> spec):\n" + "\n".join(stale)
                               + "\nDelete those run folders to train them again, or use another --out.")
        return fairness

    # ------------------------------------------------------------------ the grid

    def todo(self) -> list[tuple[Job, str, str | None]]:
        """Return (job, training state, why it needs evaluation) for the jobs with work left."""
        out = []
        for job in self.mine:
            rd = RunDir(job.path)
            state = "finished" if rd.is_finished() else ("unfinished" if rd.is_run() else "new")
            why = "not trained yet" if state != "finished" else (
                needs_evaluation(rd, job.desired) or needs_probe(rd, self.probe_images))
            if state != "finished" or why:
                out.append((job, state, why))
        return out

    def run(self) -> dict[str, Any] | None:
        """Do what is left of the grid; write and return the report (``None`` for a shard)."""
        self.resolve()
        todo = self.todo()
        self._say(f"{self.loaded.title}: {len(self.grid)} runs ({len(self.arms)} arms x {len(self.loaded.spec.seeds)} "
                  f"seeds){f', shard {self.part[0]}/{self.part[1]}: {len(self.mine)} of them' if self.part else ''}; "
                  f"{len(self.mine) - len(todo)} done, {len(todo)} to do -> {self.out}")
        if todo:
            (self.out / "runs").mkdir(parents=True, exist_ok=True)
            if self.submit is not None:
                if not self.submit(self, todo):
                    return None  # submitted to a cluster: the report comes from a later plain run
            elif self.in_process:
                self._run_here(todo)
            else:
                self._run_workers(todo)
        if self.part is not None:
            self._say(f"shard {self.part[0]}/{self.part[1]} done. When every shard is done, run the same command "
                      "without --shard to write the report.")
            return None
        return self.write_report()

    def _progress(self):
        return rich_bars(self.console, "{task.description}", head="[bold]compare[/]", remaining=False,
                         disable=self.console is None, transient=False)

    def _say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False)

    def _eval_sets(self) -> list[str]:
        return self.loaded.spec.eval.overrides()

    def _run_here(self, todo) -> None:
        from capsgan_toolkit import api

        sets, env = device_setup(self.devices[0] if self.devices else None, 1)
        if env.get("CUDA_VISIBLE_DEVICES") not in (None, "0"):
            raise CompareError("Training in this process can use cuda:0 only; drop --in-process to use other devices.")
        with self._progress() as progress:
            task = progress.add_task("", total=len(todo))
            for job, state, _ in todo:
                if state != "finished":
                    progress.update(task, description=f"{job.name}: {'resuming' if state == 'unfinished' else 'training'}")
                    api.train(job.recipe, out=job.path, sets=[*job.sets, *sets], resume=state == "unfinished")
                if why := needs_evaluation(RunDir(job.path), job.desired):
                    progress.update(task, description=f"{job.name}: evaluating ({why})")
                    api.evaluate(job.path, sets=self._eval_sets(), trusted_plugins=recipe_modules(job.recipe, job.sets))
                if self.probe_images is not None and (why := needs_probe(RunDir(job.path), self.probe_images)):
                    progress.update(task, description=f"{job.name}: probing ({why})")
                    probe_run(job.path, self.probe_images, recipe_modules(job.recipe, job.sets))
                progress.advance(task)
                self._say(f"  {job.name} done")

    def log_file(self, job: Job) -> Path:
        return self.out / "logs" / f"{job.arm}-seed-{job.seed}.log"

    def steps(self, job: Job, state: str, sets: list[str]) -> list[dict[str, Any]]:
        """What one worker does for ``job`` (see :mod:`capsgan_toolkit.compare.worker`)."""
        steps: list[dict[str, Any]] = []
        if state != "finished":
            steps.append({"action": "train", "recipe": str(job.recipe), "out": str(job.path),
                          "sets": [*job.sets, *sets], "resume": state == "unfinished"})
        trusted = recipe_modules(job.recipe, job.sets)  # the spec's recipe is the user's own
        steps.append({"action": "evaluate", "run_dir": str(job.path), "sets": self._eval_sets(),
                      "desired": job.desired, "trusted_plugins": trusted})
        if self.probe_images is not None:
            steps.append({"action": "probe", "run_dir": str(job.path), "images": self.probe_images,
                          "trusted_plugins": trusted})
        return steps

    def _worker(self, job: Job, state: str, devices: queue.Queue[str | None], progress, task) -> tuple[Job, int, Path]:
        log = self.log_file(job)
        if self._stopping.is_set():
            return job, 130, log
        device = devices.get()  # a free device: two runs never share one while another idles
        try:
            if self._stopping.is_set():
                return job, 130, log
            sets, env = device_setup(device, self.jobs)
            log.parent.mkdir(parents=True, exist_ok=True)
            steps = self.steps(job, state, sets)
            with open(log, "a", encoding="utf-8") as fh, self._lock:
                # Its own session: a Ctrl-C reaches this process only, which passes one SIGINT on,
                # so each worker checkpoints and stops (a second SIGINT would make it stop at once).
                # It dies with this process however this one ends (lifeline: SIGTERM on the parent's death).
                options = child_options()
                proc = subprocess.Popen([sys.executable, "-m", "capsgan_toolkit.compare.worker", json.dumps(steps)],
                                        stdout=fh, stderr=subprocess.STDOUT, **{**options, "env": {**options["env"], **env}})
                self._running[job.name] = proc
            progress.update(task, description="running " + ", ".join(sorted(self._running)))
            code = proc.wait()
            with self._lock:
                self._running.pop(job.name, None)
            return job, code, log
        finally:
            devices.put(device)

    def _stop_workers(self) -> None:
        self._stopping.set()
        with self._lock:
            running = list(self._running.values())
        for proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in running:
            proc.wait()

    def _run_workers(self, todo) -> None:
        devices: queue.Queue = queue.Queue()
        for i in range(self.jobs):
            devices.put(self.devices[i % len(self.devices)] if self.devices else None)
        self._stopping, self._lock = threading.Event(), threading.Lock()
        self._running: dict[str, subprocess.Popen[bytes]] = {}  # job name -> its worker process
        failures = []
        pool = ThreadPoolExecutor(max_workers=self.jobs)
        try:
            with stop_on_termination(), self._progress() as progress:
                task = progress.add_task(f"{self.jobs} at once", total=len(todo))
                futures = [pool.submit(self._worker, job, state, devices, progress, task) for job, state, _ in todo]
                for future in as_completed(futures):
                    job, code, log = future.result()
                    progress.advance(task)
                    if code == 0:
                        self._say(f"  {job.name} done")
                    else:
                        failures.append((job, code, log))
                        self._say(f"  [red]{job.name} failed[/] (exit {code}); see {log}")
        except BaseException as exc:  # Ctrl-C, SIGTERM, SIGHUP: stop the running workers cleanly, start no new one
            self._stop_workers()
            pool.shutdown(wait=True, cancel_futures=True)
            if isinstance(exc, Terminated):
                raise Interrupted(f"capsgan compare stopped by {signal.Signals(exc.signum).name}: every worker "
                                  "checkpointed and stopped. Run the same command again to resume; finished runs "
                                  "are kept.") from None
            raise
        pool.shutdown(wait=True)
        if failures:
            tails = []
            for job, code, log in failures:
                lines = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
                tails.append(f"  {job.name} (exit {code}, log {log}):\n    " + "\n    ".join(lines))
            raise CompareError(f"{len(failures)} run(s) failed:\n" + "\n".join(tails)
                               + "\nFix the cause and run the same command again: finished runs are kept.")

    # ------------------------------------------------------------------ the report

    def write_report(self) -> dict[str, Any]:
        from capsgan_toolkit.compare.outputs import write_outputs

        missing = [job for job in self.grid if not RunDir(job.path).is_finished() or needs_evaluation(
            RunDir(job.path), job.desired) or needs_probe(RunDir(job.path), self.probe_images)]
        if missing:
            done = "finished, evaluated and probed" if self.probe_images else "finished and evaluated"
            raise CompareError(f"Not every run is {done}: " + ", ".join(j.name for j in missing)
                               + ". Run the same command again (without --shard) to finish them.")
        arms: dict[str, list] = {}
        for job in self.grid:
            arms.setdefault(job.arm, []).append(read_run(job.path, arm=job.arm))
        baseline = self.loaded.spec.baseline
        arms = {baseline: arms.pop(baseline), **arms}
        problems = protocol_differences([r for runs in arms.values() for r in runs])
        if problems:
            raise CompareError("The runs were evaluated with different protocols:\n  " + "\n  ".join(problems))
        fairness = compare_recipes({a: [fairness_recipe(r) for r in runs] for a, runs in arms.items()}, self.allow)
        fairness.check()
        spec = self.loaded.spec
        info = {arm.label: {"recipe": str(self.loaded.recipe_path(arm)), "set": arm.set,
                            "description": arm.description, "optional": arm.optional} for arm in self.arms}
        return write_outputs(arms, self.out, baseline=baseline, fairness=fairness, title=self.loaded.title,
                             description=spec.description, budget=spec.budget.describe(),
                             source=str(self.loaded.path), arm_info=info, contrasts=spec.contrast_pairs(),
                             key_metrics=spec.key_metrics, console=self.console)
