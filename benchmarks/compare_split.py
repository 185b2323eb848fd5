"""Where a comparison's time goes: training, evaluation, probe and worker start-up, per run and in all.

Runs ``capsgan compare SPEC --out OUT`` (from a cold cache with ``--cold``: a fresh folder and
``CAPSGAN_CACHE``, so the judge and the reference features are computed too), times the whole
command, then reads each worker's log (``OUT/logs/ARM-seed-K.log``: ``started in S s``,
``training done in S s``, ``evaluating done in S s``, ``probing done in S s``) and prints the
split, with the machine's load before and after. Whatever is not in a worker (planning, the
untrained-generator floors, the report) is the rest of the wall time (with ``--jobs 1``).

Usage::

    python benchmarks/compare_split.py recipes/compare_quickstart.toml --out /tmp/split --cold
    python benchmarks/compare_split.py --read /tmp/split        # the split of a folder's logs only
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PARTS = {"start-up": r"started in ([\d.]+) s", "training": r"training done in ([\d.]+) s",
         "evaluation": r"evaluating done in ([\d.]+) s", "probe": r"probing done in ([\d.]+) s"}


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"


def split(out: Path) -> dict[str, dict[str, float]]:
    """Run name -> part -> seconds, from the logs of the comparison folder ``out`` (every start of a worker)."""
    runs: dict[str, dict[str, float]] = {}
    for log in sorted((out / "logs").glob("*.log")):
        text = log.read_text(encoding="utf-8", errors="replace")
        runs[log.stem] = {part: sum(float(v) for v in re.findall(pattern, text)) for part, pattern in PARTS.items()}
    return runs


def report(runs: dict[str, dict[str, float]], total: float | None) -> None:
    header = f"{'run':<28}" + "".join(f"{p:>12}" for p in PARTS) + f"{'outside training':>18}"
    print(header)
    sums = dict.fromkeys(PARTS, 0.0)
    for name, parts in runs.items():
        outside = sum(v for p, v in parts.items() if p != "training")
        share = outside / max(parts["training"], 1e-9)
        print(f"{name:<28}" + "".join(f"{parts[p]:>11.1f}s" for p in PARTS) + f"{share:>17.0%}")
        for p in PARTS:
            sums[p] += parts[p]
    print(f"{'all runs':<28}" + "".join(f"{sums[p]:>11.1f}s" for p in PARTS))
    in_workers = sum(sums.values())
    if total is not None:
        rest = max(total - in_workers, 0.0)
        print(f"\nwall time {total:.1f} s: training {sums['training'] / total:.0%}, evaluation "
              f"{sums['evaluation'] / total:.0%}, probe {sums['probe'] / total:.0%}, worker start-up "
              f"{sums['start-up'] / total:.0%}, the rest (planning, floors, report; with --jobs 1) {rest / total:.0%}")
        print(f"everything but training: {(total - sums['training']) / total:.0%} of the wall time")
    if sums["training"]:
        print(f"evaluation + probe per run: {(sums['evaluation'] + sums['probe']) / sums['training']:.0%} of training")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", nargs="?", help="the comparison spec to run")
    parser.add_argument("--out", type=Path, help="the comparison folder")
    parser.add_argument("--cold", action="store_true", help="a fresh folder and cache (judge and features computed)")
    parser.add_argument("--read", type=Path, help="only read the logs of this comparison folder")
    args = parser.parse_args()
    if args.read:
        report(split(args.read), None)
        return 0
    if not args.spec or not args.out:
        parser.error("give SPEC and --out (or --read FOLDER)")
    env = dict(os.environ)
    if args.cold:
        if args.out.exists() and any(args.out.iterdir()):
            parser.error(f"--cold needs a new or empty --out folder; {args.out} holds files")
        env["CAPSGAN_CACHE"] = tempfile.mkdtemp(prefix="capsgan-cache-")
    before = _load()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "capsgan_toolkit", "compare", args.spec, "--out", str(args.out),
                           "--jobs", "1", "--quiet"], env=env)
    total = time.perf_counter() - start
    print(f"capsgan compare {args.spec}: exit {done.returncode}, {total:.1f} s; load before {before}, after {_load()}"
          f"{'; cold cache ' + env['CAPSGAN_CACHE'] if args.cold else ''}\n")
    report(split(args.out), total)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
