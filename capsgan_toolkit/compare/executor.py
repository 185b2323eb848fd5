"""Comparisons beyond one machine: every arm x seed as a job of submitit (SLURM, or its local executor).

``capsgan compare SPEC --executor slurm`` submits one job per run that has work left (an array
of them, at most ``[executor] parallel`` at once), with the spec's ``[executor]`` parameters
(partition, time, GPUs, CPUs, memory, setup lines), and returns: the runs train on the cluster.
Run ``capsgan compare SPEC --out DIR`` (no ``--executor``) once they are done to write the report;
it trains nothing that finished, and resumes what a job left unfinished (a job that hit its time
limit was stopped by SIGTERM after its current step, with ``interrupt.pt`` written).

``--executor local`` runs the same jobs through submitit's local executor on this machine (all at
once) and waits for them, then writes the report: the same code path as SLURM, to check a spec
before submitting it.

Each job runs :func:`run_job`, which is a compare worker (:mod:`capsgan_toolkit.compare.worker`)
in the job's own process: it trains, evaluates and probes one run under the run folder's lock,
and appends to ``OUT/logs/ARM-seed-K.log`` (submitit's own logs are in ``OUT/submitit/``).
"""

from __future__ import annotations

import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from capsgan_toolkit.compare.spec import CompareError

EXECUTORS = ("slurm", "local")


def run_job(steps: list[dict[str, Any]], log: str) -> None:
    """One arm x seed, inside a submitit job: the compare worker's steps, its output appended to ``log``."""
    from capsgan_toolkit.compare import worker

    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as fh, redirect_stdout(fh), redirect_stderr(fh):
        code = worker.main([json.dumps(steps)])
    if code:
        raise RuntimeError(f"the compare worker stopped with exit code {code}; see {log}")


def _executor(runner, kind: str):
    try:
        import submitit
    except ImportError:
        raise CompareError(f"--executor {kind} needs submitit, which is not installed here: "
                           'pip install "capsgan-toolkit[cluster]" (or pip install submitit).') from None
    spec = runner.loaded.spec.executor
    try:
        executor = submitit.AutoExecutor(folder=runner.out / "submitit", cluster=kind)
    except RuntimeError as exc:  # e.g. no srun on this machine
        raise CompareError(f"--executor {kind}: submitit cannot use {kind} here ({exc}). Run the command on the "
                           "cluster's login node, or use --executor local to run the jobs on this machine.") from None
    params: dict[str, Any] = {"name": f"capsgan-{runner.out.name}", "timeout_min": spec.minutes,
                              "cpus_per_task": spec.cpus, "gpus_per_node": spec.gpus, "tasks_per_node": 1,
                              "nodes": 1}
    if spec.mem_gb is not None:
        params["mem_gb"] = spec.mem_gb
    if kind == "slurm":
        params["slurm_array_parallelism"] = spec.parallel
        if spec.partition:
            params["slurm_partition"] = spec.partition
        if spec.setup:
            params["slurm_setup"] = list(spec.setup)
    executor.update_parameters(**params)
    return executor


def run_jobs(runner, todo, kind: str) -> bool:
    """Submit one job per run of ``todo``; return whether they all finished here (``local``) or were submitted.

    Raises:
        CompareError: submitit is missing, or (``local``) a job failed (its log's last lines shown).
    """
    if kind not in EXECUTORS:
        raise CompareError(f"--executor {kind}: unknown executor; use {' or '.join(EXECUTORS)}.")
    executor = _executor(runner, kind)
    sets = [] if runner.loaded.spec.executor.gpus == 0 else ['run.device="cuda"']
    work = [(job, runner.steps(job, state, sets), runner.log_file(job)) for job, state, _ in todo]
    with executor.batch():
        submitted = [(job, executor.submit(run_job, steps, str(log)), log) for job, steps, log in work]
    runner._say(f"submitted {len(submitted)} job(s) to {kind} (submitit logs in {runner.out / 'submitit'}): "
                + ", ".join(f"{job.name} {handle.job_id}" for job, handle, _ in submitted))
    if kind == "slurm":
        runner._say(f"When they are done, write the report with: capsgan compare {runner.loaded.path} --out "
                    f"{runner.out}")
        return False
    failures = []
    for job, handle, log in submitted:
        try:
            handle.result()
            runner._say(f"  {job.name} done")
        except Exception as exc:  # submitit re-raises the job's error here
            lines = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:] if log.exists() else []
            failures.append(f"  {job.name} ({str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}; "
                            f"log {log}):\n    " + "\n    ".join(lines))
    if failures:
        raise CompareError(f"{len(failures)} job(s) failed:\n" + "\n".join(failures)
                           + "\nFix the cause and run the same command again: finished runs are kept.")
    return True
