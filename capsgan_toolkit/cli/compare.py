"""``capsgan compare``: train and compare a spec's arms, or compare run folders that exist.

Two forms::

    capsgan compare SPEC.toml --out DIR        # train every arm x seed, evaluate, report
    capsgan compare RUN_DIR RUN_DIR ... --out DIR   # report on runs that exist (one protocol)

Both write DIR/compare.json, DIR/compare.md and DIR/compare.html and print the headline (per contrast,
the capsule-vs-CNN question first: which arm is better, at what Holm-adjusted confidence) and the tables.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import click
from rich.console import Console

from capsgan_toolkit.cli.common import friendly, option
from capsgan_toolkit.compare.runner import Runner, parse_shard
from capsgan_toolkit.compare.runs import compare_runs
from capsgan_toolkit.compare.spec import CompareError, load_spec


@click.command("compare")
@click.argument("sources", nargs=-1, required=True, metavar="SPEC.toml | RUN_DIR...")
@option("--out", type=click.Path(file_okay=False), default=None,
        help="Comparison folder (default: compare/<spec name>, or compare/report for run folders).")
@option("--allow-difference", "allow", multiple=True, metavar="KEY",
        help="Let the arms differ in KEY (or a table such as data; steps: the optimizer steps and images each run "
             "trained) although a fair comparison needs it equal; shown in red in every output.")
@option("--baseline", default=None,
        help="The cost tables' reference arm (default: the spec's, else its first arm; for run folders: the first "
             "arm). Every pair of arms is compared unless the spec names [[contrasts]].")
@option("--arm", "arm_labels", multiple=True, metavar="LABEL", help="Only these arms of the spec (and the baseline).")
@option("--with-optional", is_flag=True, default=False, help="Also run the spec's optional arms.")
@option("--seeds", "seeds_text", default=None, metavar="N | A,B,...",
        help="Seeds of every arm instead of the spec's: a count N (seeds 0..N-1) or a comma-separated list. "
             "Runs already in the folder for those seeds are reused.")
@option("--jobs", type=click.IntRange(min=1), default=1, help="Runs at once (each run is its own worker process).")
@option("--devices", default=None, metavar="D1,D2,...",
        help="Devices handed to the runs in turn: cpu, cuda, cuda:0, cuda:1, mps (default: each recipe's run.device).")
@option("--executor", type=click.Choice(["slurm", "local"]), default=None,
        help="Run each arm x seed as a submitit job: slurm (submit and return; the spec's [executor] table sets "
             "partition, time, GPUs, CPUs, memory) or local (this machine, waiting for the jobs).")
@option("--shard", default=None, metavar="K/N",
        help="Run only the K-th of N slices of the sorted grid (array jobs); no report until a plain re-run.")
@option("--quiet", is_flag=True, default=False, help="No progress bar or table.")
@click.option("--in-process", is_flag=True, default=False, hidden=True,
              help="Train in this process (tests, debugging); peak memory then accumulates over runs.")
@friendly(aborted="finished runs and checkpoints are kept; run the same command again to continue.")
def compare_command(sources, out, allow, baseline, arm_labels, with_optional, seeds_text, jobs, devices, executor,
                    shard, quiet, in_process):
    """Compare arms under one budget, seeds and protocol: train (SPEC.toml) or read (RUN_DIRs), then report.

    With a spec, every arm x seed is trained into OUT/runs/<arm>/seed-<k>/ and evaluated;
    re-running reuses finished runs, resumes unfinished ones and re-evaluates only what the
    protocol changed. With run folders (LABEL=RUN_DIR names an arm), they are compared as they are.
    """
    console = None if quiet else Console()
    first = Path(sources[0])
    if len(sources) == 1 and first.suffix == ".toml" and not first.is_dir():
        loaded = load_spec(first, seeds=None if seeds_text is None else parse_seeds(seeds_text))
        if baseline is not None:
            if baseline not in [a.label for a in loaded.spec.arms]:
                raise CompareError(f"--baseline {baseline}: no such arm in {first}.")
            loaded.spec.baseline = baseline
        arms = loaded.spec.selected(tuple(arm_labels), with_optional)
        device_list = [d.strip() for d in devices.split(",") if d.strip()] if devices else []
        if executor is not None:
            for name, value in (("--shard", shard), ("--devices", devices), ("--jobs", jobs > 1),
                                ("--in-process", in_process)):
                if value:
                    raise CompareError(f"{name} does not go with --executor (the executor places the jobs; its "
                                       "resources come from the spec's [executor] table).")
        folder = Path(out) if out else Path("compare") / first.stem
        submit = None
        if executor is not None:
            from capsgan_toolkit.compare import executor as executors

            submit = functools.partial(executors.run_jobs, kind=executor)
        runner = Runner(loaded, folder, arms=arms, allow=list(allow), jobs=jobs, devices=device_list,
                        part=parse_shard(shard), console=console, in_process=in_process, submit=submit)
        # One comparison writes a folder at a time; shards share theirs by design (each run keeps its own lock).
        with contextlib.nullcontext() if shard else _folder_lock(folder):
            runner.run()
        return
    if any(Path(s).suffix == ".toml" for s in sources if not Path(s).is_dir()):
        raise CompareError("Give either one comparison spec (a .toml file) or run folders, not both.")
    for name, value in (("--arm", arm_labels), ("--with-optional", with_optional), ("--seeds", seeds_text),
                        ("--shard", shard), ("--devices", devices), ("--jobs", jobs > 1), ("--executor", executor)):
        if value:
            raise CompareError(f"{name} applies to a comparison spec, not to existing run folders.")
    folder = Path(out) if out else Path("compare") / "report"
    with _folder_lock(folder):
        compare_runs(list(sources), folder, baseline=baseline, allow=list(allow), console=console)


def parse_seeds(text: str) -> int | list[int]:
    """Read ``--seeds``: ``5`` is a count (seeds 0..4), ``0,2,7`` (or ``7,``) a list; the spec checks the values."""
    try:
        if "," not in text:
            return int(text)
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise CompareError(f"--seeds {text}: give a count (5: seeds 0 to 4) or comma-separated integer seeds "
                           "(0,1,2).") from None


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Hold the comparison folder's exclusive lock: a second comparison writing it is refused at once.

    A folder made here is removed again if the comparison fails before writing anything into it.
    """
    import shutil

    from capsgan_toolkit.rundir.lock import LOCK_NAME, RunLock

    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with RunLock(folder, "comparing", kind="comparison folder"):
            yield
    except BaseException:
        if made and {p.name for p in folder.iterdir()} <= {LOCK_NAME}:
            shutil.rmtree(folder, ignore_errors=True)
        raise
