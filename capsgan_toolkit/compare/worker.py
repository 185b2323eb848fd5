"""A worker process of ``capsgan compare --jobs/--devices``: train and evaluate one run.

Run as ``python -m capsgan_toolkit.compare.worker STEPS_JSON``; each step is
``{"action": "train", "recipe", "out", "sets", "resume"}`` or
``{"action": "evaluate", "run_dir", "sets", "desired"}`` (evaluated only when the run's
eval.json is missing or not from the desired protocol) or ``{"action": "probe", "run_dir",
"images"}`` (probed only when probe.json is missing or not current). Exit codes are the toolkit's.

The log says how long each part took (``... done in S s``, and ``started in S s`` for the
process start and imports): ``benchmarks/compare_split.py`` reads them.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _since_process_start() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere since this module was imported)."""
    try:
        ticks = int(open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


def main(argv: list[str]) -> int:
    from capsgan_toolkit.compare.lifeline import hold_on_to_parent

    hold_on_to_parent()  # first, before the slow imports: SIGTERM when capsgan compare dies
    from capsgan_toolkit import api
    from capsgan_toolkit.compare.runner import needs_evaluation, needs_probe, probe_run
    from capsgan_toolkit.errors import CapsganError
    from capsgan_toolkit.rundir.folder import RunDir
    from capsgan_toolkit.rundir.lock import describe_process

    steps = json.loads(argv[0])
    print(f"started in {_since_process_start():.1f} s (process start and imports)", flush=True)
    describe_process(f"a worker of capsgan compare (parent pid {os.getppid()}), {steps[0]['action']} "
                     f"{steps[0].get('out') or steps[0].get('run_dir')}")
    try:
        for step in steps:
            start = time.perf_counter()
            if step["action"] == "train":
                print(f"training {step['out']} (resume={step['resume']})", flush=True)
                api.train(step["recipe"], out=step["out"], sets=step["sets"], resume=step["resume"])
                print(f"training done in {time.perf_counter() - start:.1f} s", flush=True)
            elif step["action"] == "evaluate":
                why = needs_evaluation(RunDir(step["run_dir"]), step["desired"])
                if why:
                    print(f"evaluating {step['run_dir']} ({why})", flush=True)
                    api.evaluate(step["run_dir"], sets=step["sets"], trusted_plugins=step.get("trusted_plugins", ()))
                    print(f"evaluating done in {time.perf_counter() - start:.1f} s", flush=True)
            elif step["action"] == "probe":
                why = needs_probe(RunDir(step["run_dir"]), step["images"])
                if why:
                    print(f"probing {step['run_dir']} ({why})", flush=True)
                    probe_run(step["run_dir"], step["images"], step.get("trusted_plugins", ()))
                    print(f"probing done in {time.perf_counter() - start:.1f} s", flush=True)
            else:
                raise ValueError(f"unknown worker action {step['action']!r}")
    except CapsganError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:  # before training installed its handlers: nothing to save yet
        print("stopped: interrupted before the first checkpoint; the next run starts it again", file=sys.stderr,
              flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
