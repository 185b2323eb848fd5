"""The comparison itself (``compare.json``), its Markdown page and its terminal table.

``compare.json`` (``"schema": 1``) holds, for every metric, its protocol, its direction and
per arm the seeds' values, mean, std and 95 % interval, and per arm against the baseline the
paired differences, their intervals and the verdict. Costs follow the same layout. The
fairness record lists every key on which the arms' recipes differ. ``probe`` holds the
spatial-structure probe's numbers when runs were probed (:mod:`.probe_section`), else ``null``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from capsgan_toolkit.compare import probe_section, stats
from capsgan_toolkit.compare.collect import COST_PROTOCOL, RunRecord
from capsgan_toolkit.compare.fairness import Fairness

SCHEMA = 1
FEW_SEEDS_NOTE = (
    "Few seeds give wide intervals: with n seeds the 95% t-interval of a mean is t(n-1) x std / sqrt(n) wide on "
    "each side (t = 12.7 for 2 seeds, 4.3 for 3, 2.8 for 5), so 'not distinguishable' means 'these seeds cannot "
    "tell', not 'equal'. Add seeds to narrow the intervals."
)


def _describe(name: str) -> str:
    try:
        from capsgan_toolkit.catalogue import describe
    except ImportError:
        return ""
    try:
        return describe(name)
    except (KeyError, LookupError, ValueError):
        return ""


def _metric_entry(name: str, arms: dict[str, list[RunRecord]], baseline: str, values_of, protocol_of) -> dict:
    direction = stats.direction(name)
    per_arm = {arm: stats.summarize({r.seed: values_of(r).get(name) for r in runs if name in values_of(r)})
               for arm, runs in arms.items()}
    per_arm = {arm: s for arm, s in per_arm.items() if s["n"]}
    entry: dict[str, Any] = {"name": name, "direction": direction, "description": _describe(name),
                             "protocol": None, "arms": per_arm, "vs_baseline": {}}
    protocols = [protocol_of(r, name) for runs in arms.values() for r in runs if name in values_of(r)]
    entry["protocol"] = protocols[0] if protocols else {}
    differing = sorted({k for p in protocols for k in set(p) | set(protocols[0])
                        if p.get(k) != protocols[0].get(k)})
    if differing:
        entry["protocol_differs"] = differing
    base = per_arm.get(baseline)
    if base is not None:
        for arm, summary in per_arm.items():
            if arm == baseline:
                continue
            cmp = stats.paired(summary["values"], base["values"], direction)
            cmp["ratio"] = (summary["mean"] / base["mean"]) if base["mean"] else None
            entry["vs_baseline"][arm] = cmp
    return entry


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def build_report(arms: dict[str, list[RunRecord]], *, baseline: str, fairness: Fairness, title: str,
                 description: str = "", budget: str = "", source: str = "", arm_info: dict[str, dict] | None = None,
                 eval_protocol: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compute every statistic of a comparison.

    Args:
        arms: arm label -> its finished, evaluated runs (one per seed); the baseline first is nicest.
        baseline: the label every other arm is compared with.
        fairness: the differences between the arms' recipes.
        title, description, budget, source: shown in the outputs.
        arm_info: per arm, extra fields to record (recipe path, overrides, description).
        eval_protocol: the ``[eval]`` table every arm was evaluated with.

    Returns:
        The ``compare.json`` dict.
    """
    from capsgan_toolkit import __version__

    records = [r for runs in arms.values() for r in runs]
    quality_names: list[str] = []
    for rec in records:
        for name in rec.quality():
            if name not in quality_names:
                quality_names.append(name)
    cost_names: list[str] = []
    for rec in records:
        for name in rec.costs():
            if name not in cost_names:
                cost_names.append(name)
    order = ["images_per_s", "seconds_per_epoch", "train_time_s", "peak_memory_bytes"]
    cost_names.sort(key=lambda n: (order.index(n) if n in order else len(order) + (0 if n.startswith("param") else 1), n))

    def cost_protocol(rec: RunRecord, name: str) -> dict[str, Any]:
        return {"source": "summary.json", "what": COST_PROTOCOL.get(name.split(".")[0], name), "device": rec.device}

    metrics = [_metric_entry(n, arms, baseline, RunRecord.quality, RunRecord.protocol) for n in quality_names]
    costs = [_metric_entry(n, arms, baseline, RunRecord.costs, cost_protocol) for n in cost_names]
    for entry in costs:
        entry["protocol"].pop("device", None)
        entry.pop("protocol_differs", None)  # the device is listed per arm
    seeds = sorted({r.seed for r in records})
    max_n = max((len(runs) for runs in arms.values()), default=0)
    notes = [FEW_SEEDS_NOTE] if max_n < 10 else []
    for diff in fairness.allowed:
        notes.append(f"CONFOUND: the arms differ in {diff.key} (allowed by --allow-difference): "
                     + ", ".join(f"{arm} {diff.shown(arm)}" for arm in diff.values))
    return _jsonable({
        "schema": SCHEMA,
        "tool": "capsgan compare",
        "toolkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "title": title,
        "description": description,
        "source": source,
        "baseline": baseline,
        "budget": budget,
        "seeds": seeds,
        "confidence": stats.CONFIDENCE,
        "statistics": stats.METHODS,
        "eval_protocol": eval_protocol if eval_protocol is not None else (records[0].eval_protocol() if records else None),
        "arms": [{"label": arm, **(arm_info or {}).get(arm, {}),
                  "devices": sorted({r.device for r in runs}),
                  "runs": [{"seed": r.seed, "run_dir": str(r.path)} for r in sorted(runs, key=lambda r: r.seed)]}
                 for arm, runs in arms.items()],
        "fairness": fairness.to_dict(),
        "metrics": metrics,
        "costs": costs,
        "probe": probe_section.build(arms),
        "notes": notes,
    })


def write_json(report: dict[str, Any], path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


# ------------------------------------------------------------------ formatting


def fmt(value: float | None, name: str = "") -> str:
    """Format a number for people: memory in MiB, counts with SI suffixes, else 4 significant digits."""
    if value is None:
        return "-"
    if name.startswith("peak_memory"):
        return f"{value / 2**20:,.0f} MiB"
    if name.startswith(("parameters", "flops")):
        for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(value) >= size:
                return f"{value / size:.3g}{unit}"
        return f"{value:.0f}"
    return f"{value:.4g}"


def cell(entry: dict, arm: str) -> str:
    """``mean ± half-width`` of an arm's 95 % interval (± std when only the std exists)."""
    s = entry["arms"].get(arm)
    if s is None:
        return "-"
    name = entry["name"]
    if s["ci95"] and s["ci95"][1] > s["ci95"][0]:
        half = (s["ci95"][1] - s["ci95"][0]) / 2
        return f"{fmt(s['mean'], name)} ± {fmt(half, name)}"
    return fmt(s["mean"], name)  # one seed, or the same value on every seed


def diff_cell(entry: dict, arm: str, ratio: bool = False) -> tuple[str, str]:
    """Return (text, verdict) of an arm's paired difference against the baseline.

    With ``ratio`` (the cost tables) the text is the ratio of the means, and the verdict
    is given only when the seeds tell (better or worse).
    """
    cmp = entry["vs_baseline"].get(arm)
    if cmp is None or cmp["mean"] is None:
        return "", ""
    name = entry["name"]
    if ratio:
        verdict = cmp["verdict"] if cmp["verdict"] in ("better", "worse") else ""
        return (f"×{cmp['ratio']:.2f} baseline" if cmp.get("ratio") is not None else ""), verdict
    sign = "+" if cmp["mean"] >= 0 else ""
    text = f"Δ {sign}{fmt(cmp['mean'], name)}"
    if cmp["ci95_t"]:
        text += f" [{fmt(cmp['ci95_t'][0], name)}, {fmt(cmp['ci95_t'][1], name)}]"
    return text, cmp["verdict"]


def verdict_style(verdict: str) -> str:
    return {"better": "green", "worse": "red"}.get(verdict, "dim")


def arm_labels(report: dict) -> list[str]:
    return [a["label"] for a in report["arms"]]


def write_markdown(report: dict[str, Any], path: Path) -> Path:
    """Write compare.md: the same tables as the HTML page, without pictures."""
    arms = arm_labels(report)
    base = report["baseline"]
    out = [f"# {report['title']}", ""]
    if report["description"]:
        out += [report["description"], ""]
    out += [f"Baseline: **{base}**. Seeds: {', '.join(map(str, report['seeds']))}. Budget: {report['budget'] or '-'}.",
            ""]
    for note in report["notes"]:
        out += [f"> **{'Confound' if note.startswith('CONFOUND') else 'Note'}:** {note.removeprefix('CONFOUND: ')}", ""]
    for section, key in (("Quality", "metrics"), ("Cost", "costs")):
        out += [f"## {section}", "",
                "Mean ± half-width of the 95% t-interval over seeds; Δ: mean paired difference to the baseline "
                "[95% t-interval] and verdict.", "",
                "| metric | " + " | ".join(f"{a}{' (baseline)' if a == base else ''}" for a in arms) + " |",
                "|---|" + "---|" * len(arms)]
        for entry in report[key]:
            arrow = {"lower": " ↓", "higher": " ↑"}.get(entry["direction"] or "", "")
            cells = []
            for arm in arms:
                text, verdict = diff_cell(entry, arm, ratio=key == "costs")
                shown = f" **{verdict}**" if verdict else ""
                cells.append(cell(entry, arm) + (f"<br>{text}{shown}" if text else ""))
            out.append(f"| `{entry['name']}`{arrow} | " + " | ".join(cells) + " |")
        out.append("")
    if report.get("probe"):
        out += probe_section.markdown(report["probe"], base)
    out += ["## Fairness", "", "Every recipe key on which the arms differ.", "",
            "| key | status | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    for d in report["fairness"]["differences"]:
        status = d["status"] if d["status"] != "allowed" else "**ALLOWED CONFOUND**"
        out.append(f"| `{d['key']}` | {status} | " + " | ".join(f"`{d['values'].get(a, '-')}`" for a in arms) + " |")
    out += ["", "## Protocol", "", "```json", json.dumps(report["eval_protocol"], indent=2), "```", "",
            "## Statistics", ""]
    out += [f"- {k}: {v}" for k, v in report["statistics"].items()]
    out += ["", "## Runs", ""]
    for arm in report["arms"]:
        out.append(f"- **{arm['label']}** ({', '.join(arm['devices'])}): "
                   + ", ".join(f"seed {r['seed']} `{r['run_dir']}`" for r in arm["runs"]))
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def print_terminal(report: dict[str, Any], console) -> None:
    """Print the quality and cost tables, differences coloured by verdict, and the notes."""
    from rich.table import Table
    from rich.text import Text

    arms = arm_labels(report)
    base = report["baseline"]
    for section, key in (("quality", "metrics"), ("cost", "costs")):
        table = Table(title=f"{report['title']}: {section} (mean ± 95% CI over {len(report['seeds'])} seeds; "
                            f"Δ vs {base})", title_justify="left", show_lines=True)
        table.add_column("metric", style="bold cyan")
        for arm in arms:
            table.add_column(arm + (" (baseline)" if arm == base else ""), justify="right")
        for entry in report[key]:
            arrow = {"lower": " ↓", "higher": " ↑"}.get(entry["direction"] or "", "")
            row = [Text(entry["name"] + arrow)]
            for arm in arms:
                text = Text(cell(entry, arm))
                diff, verdict = diff_cell(entry, arm, ratio=key == "costs")
                if diff:
                    text.append(f"\n{diff} ", style=verdict_style(verdict))
                    text.append(verdict, style="bold " + verdict_style(verdict))
                row.append(text)
            table.add_row(*row)
        console.print(table)
    if report.get("probe"):
        probe_section.print_terminal(report["probe"], console)
    for d in report["fairness"]["differences"]:
        if d["status"] == "allowed":
            console.print(Text(f"CONFOUND {d['key']}: " + ", ".join(f"{a} {v}" for a, v in d["values"].items()),
                               style="bold red"))
    if report["notes"] and not report["notes"][0].startswith("CONFOUND"):
        console.print(Text(report["notes"][0], style="yellow"))
