"""Write a comparison's outputs: compare.json, compare.md, compare.html and the terminal table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from capsgan_toolkit.compare.collect import RunRecord
from capsgan_toolkit.compare.fairness import Fairness


def write_outputs(arms: dict[str, list[RunRecord]], out: Path, *, baseline: str, fairness: Fairness, title: str,
                  description: str = "", budget: str = "", source: str = "", arm_info: dict | None = None,
                  contrasts: list[tuple[str, str]] | None = None, key_metrics: list[str] | None = None,
                  console: Console | None = None) -> dict[str, Any]:
    """Compute the comparison and write compare.json, compare.md and compare.html into ``out``.

    ``contrasts`` are the pairs of arms compared (default: every pair); ``key_metrics`` the headline's.
    The untrained generators' FIDs (a competence floor) are measured once and kept in ``out/untrained_fid.json``.
    """
    from capsgan_toolkit.compare import html, report  # matplotlib and jinja2 load only when a report is written

    out.mkdir(parents=True, exist_ok=True)
    log = None if console is None else (lambda text: console.print(text, highlight=False))
    data = report.build_report(arms, baseline=baseline, fairness=fairness, title=title, description=description,
                               budget=budget, source=source, arm_info=arm_info, contrasts=contrasts,
                               key_metrics=key_metrics, cache_dir=out, log=log)
    arms = {a["label"]: arms[a["label"]] for a in data["arms"]}  # the report's order: the question arms first
    paths = [report.write_json(data, out / "compare.json"), report.write_markdown(data, out / "compare.md"),
             html.write_html(data, arms, out / "compare.html")]
    if console is not None:
        report.print_terminal(data, console)
        console.print("Wrote " + ", ".join(str(p) for p in paths), highlight=False)
    return data
