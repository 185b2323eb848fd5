"""The comparison itself (``compare.json``), its Markdown page and its terminal output.

``compare.json`` (``"schema": 2``) holds the headline (per contrast and key metric, the
answer in words), the contrasts (pairs of arms, the question first), the competence floors
(:mod:`.floors`: did each arm learn?), Holm's family, and for every metric its protocol, its
direction, per arm the seeds' values, mean, std and 95 % interval (within the metric's range),
per contrast the paired differences, their intervals, p-values and verdict, and per arm against
the baseline the same (``vs_baseline``, kept for scripts). Costs follow the same layout, with a
cost verdict. The fairness record lists every key on which the arms' recipes (and the steps
and images they trained) differ. ``probe`` holds the spatial-structure probe's numbers when
runs were probed (:mod:`.probe_section`), else ``null``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capsgan_toolkit import __version__, catalogue
from capsgan_toolkit.compare import contrasts as contrast_plan
from capsgan_toolkit.compare import floors as floor_checks
from capsgan_toolkit.compare import headline, probe_section, stats
from capsgan_toolkit.compare.collect import COST_PROTOCOL, RunRecord
from capsgan_toolkit.compare.fairness import Fairness, display_rows
from capsgan_toolkit.compare.spec import DEFAULT_KEY_METRICS
from capsgan_toolkit.rundir import writes

SCHEMA = 2
FEW_SEEDS_NOTE = (
    "Few seeds give wide intervals: with n seeds the 95% t-interval of a mean is t(n-1) x std / sqrt(n) wide on "
    "each side (t = 12.7 for 2 seeds, 4.3 for 3, 2.8 for 5), so 'not distinguishable' means 'these seeds cannot "
    "tell', not 'equal'. No verdict is read from fewer than 3 paired seeds. Add seeds to narrow the intervals."
)
COST_WORDS = {"images_per_s": ("faster", "slower"), "seconds_per_epoch": ("faster", "slower"),
              "train_time_s": ("faster", "slower"), "peak_memory_bytes": ("less memory", "more memory")}
EXACT_COSTS = ("parameters", "flops_per_image")
"""Cost rows that are counts, not measurements: compared exactly, without statistics."""


def _describe(name: str) -> str:
    try:
        return catalogue.describe(name)
    except (KeyError, LookupError, ValueError):
        return ""


def _resolution(name: str, protocol: dict[str, Any]) -> float:
    images = next((protocol.get(k) for k in ("num_images", "num_generated") if protocol.get(k)), None)
    return catalogue.resolution(name, images if isinstance(images, int) else None)


def _metric_entry(name: str, arms: dict[str, list[RunRecord]], values_of, protocol_of) -> dict:
    direction = stats.direction(name)
    limits = stats.bounds(name)
    per_arm = {arm: stats.summarize({r.seed: values_of(r).get(name) for r in runs if name in values_of(r)}, limits)
               for arm, runs in arms.items()}
    per_arm = {arm: s for arm, s in per_arm.items() if s["n"]}
    entry: dict[str, Any] = {"name": name, "direction": direction, "description": _describe(name),
                             "range": [limits[0], limits[1]], "protocol": None, "arms": per_arm,
                             "contrasts": {}, "vs_baseline": {}}
    protocols = [protocol_of(r, name) for runs in arms.values() for r in runs if name in values_of(r)]
    entry["protocol"] = protocols[0] if protocols else {}
    differing = sorted({k for p in protocols for k in set(p) | set(protocols[0])
                        if p.get(k) != protocols[0].get(k)})
    if differing:
        entry["protocol_differs"] = differing
    entry["resolution"] = _resolution(name, entry["protocol"])
    return entry


def _paired(entry: dict, a: str, b: str) -> dict[str, Any] | None:
    sa, sb = entry["arms"].get(a), entry["arms"].get(b)
    if sa is None or sb is None:
        return None
    cmp = stats.paired(sa["values"], sb["values"], entry["direction"], resolution=entry["resolution"],
                       limits=stats.difference_bounds(entry["name"]))
    cmp["ratio"] = (sa["mean"] / sb["mean"]) if sb["mean"] else None
    return cmp


def cost_verdict(entry: dict, cmp: dict) -> str:
    """A cost row's verdict: counts (parameters, FLOPs) exactly; timings and memory from the paired t-interval."""
    name = entry["name"]
    words = COST_WORDS.get(name.split(".")[0], ("better", "worse"))
    if name.split(".")[0] in EXACT_COSTS:
        diffs = list(cmp["differences"].values())
        if diffs and all(d == diffs[0] for d in diffs):
            return "equal" if diffs[0] == 0 else ("smaller" if diffs[0] < 0 else "larger")
    verdict = cmp["verdict"]
    if verdict == "better":
        return words[0]
    if verdict == "worse":
        return words[1]
    return short_verdict(verdict)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:  # NaN
        return None
    if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
        return None  # an open end of a range
    return obj


def _metric_names(records: list[RunRecord], getter) -> list[str]:
    names: list[str] = []
    for rec in records:
        for name in getter(rec):
            if name not in names:
                names.append(name)
    return names


def build_report(arms: dict[str, list[RunRecord]], *, baseline: str, fairness: Fairness, title: str,
                 description: str = "", budget: str = "", source: str = "", arm_info: dict[str, dict] | None = None,
                 eval_protocol: dict[str, Any] | None = None, contrasts: list[tuple[str, str]] | None = None,
                 key_metrics: list[str] | tuple[str, ...] | None = None,
                 data_refs: dict[tuple[str, int], floor_checks.DataReference] | None = None,
                 cache_dir: Path | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Compute every statistic of a comparison.

    Args:
        arms: arm label -> its finished, evaluated runs (one per seed).
        baseline: the cost tables' reference arm (``vs_baseline``).
        fairness: the differences between the arms' recipes.
        title, description, budget, source: shown in the outputs.
        arm_info: per arm, extra fields to record (recipe path, overrides, description).
        eval_protocol: the ``[eval]`` table every arm was evaluated with.
        contrasts: the pairs of arms to compare (a, b); ``None`` or empty: every pair.
        key_metrics: the headline's metrics (stems or result keys; default :data:`DEFAULT_KEY_METRICS`).
        data_refs: per (arm, seed), what the floors need from the data (default: read from the data, and the
            untrained generators' FIDs measured).
        cache_dir: where the untrained generators' FIDs are kept (the comparison folder; ``None``: not kept).
        log: receives a line when the floors measure something (``None``: quiet).

    Returns:
        The ``compare.json`` dict.
    """
    plan, contrast_notes = contrast_plan.plan(arms, contrasts, baseline)
    arms = {a: arms[a] for a in contrast_plan.arm_order(list(arms), plan)}
    if baseline not in arms:
        baseline = next(iter(arms))
    records = [r for runs in arms.values() for r in runs]
    quality_names = _metric_names(records, RunRecord.quality)
    cost_names = _metric_names(records, RunRecord.costs)
    order = ["images_per_s", "seconds_per_epoch", "train_time_s", "peak_memory_bytes"]
    cost_names.sort(key=lambda n: (order.index(n) if n in order else len(order) + (0 if n.startswith("param") else 1), n))

    def cost_protocol(rec: RunRecord, name: str) -> dict[str, Any]:
        return {"source": "summary.json", "what": COST_PROTOCOL.get(name.split(".")[0], name), "device": rec.device}

    floors = floor_checks.check(arms, data_refs, cache_dir=cache_dir, log=log)
    left_out = floor_checks.excluded(floors)
    metrics = [_metric_entry(n, arms, RunRecord.quality, RunRecord.protocol) for n in quality_names]
    costs = [_metric_entry(n, arms, RunRecord.costs, cost_protocol) for n in cost_names]
    for entry in costs:
        entry["protocol"].pop("device", None)
        entry.pop("protocol_differs", None)  # the device is listed per arm

    # Every contrast x quality metric: one family for Holm, arms that did not learn left out.
    for entry in metrics:
        for c in plan:
            cmp = _paired(entry, c["a"], c["b"])
            if cmp is not None:
                cmp["excluded"] = [x for x in (c["a"], c["b"]) if x in left_out]
                entry["contrasts"][contrast_plan.name(c)] = cmp
    tests = {(i, key): (None if cmp["excluded"] else cmp["p_value"])
             for i, entry in enumerate(metrics) for key, cmp in entry["contrasts"].items()}
    family = sum(p is not None for p in tests.values())
    for (i, key), adjusted in stats.holm(tests).items():
        entry, cmp = metrics[i], metrics[i]["contrasts"][key]
        cmp["p_holm"] = adjusted
        cmp["verdict"] = _verdict(entry, cmp, adjusted, family)
    # vs_baseline: the contrasts with the baseline, read as arm - baseline.
    for entry in metrics:
        for c in plan:
            if baseline not in (c["a"], c["b"]):
                continue
            arm = c["b"] if c["a"] == baseline else c["a"]
            key = contrast_plan.name(c)
            if key not in entry["contrasts"]:
                continue
            cmp = _paired(entry, arm, baseline)
            assert cmp is not None
            cmp["excluded"] = entry["contrasts"][key]["excluded"]
            cmp["p_holm"] = entry["contrasts"][key]["p_holm"]
            cmp["verdict"] = _verdict(entry, cmp, cmp["p_holm"], family)
            entry["vs_baseline"][arm] = cmp
    for entry in costs:  # costs: every arm against the baseline, and each contrast; not in Holm's family
        for arm in arms:
            if arm != baseline and (cmp := _paired(entry, arm, baseline)) is not None:
                cmp["cost_verdict"] = cost_verdict(entry, cmp)
                entry["vs_baseline"][arm] = cmp
        for c in plan:
            if (cmp := _paired(entry, c["a"], c["b"])) is not None:
                cmp["cost_verdict"] = cost_verdict(entry, cmp)
                entry["contrasts"][contrast_plan.name(c)] = cmp

    seeds = sorted({r.seed for r in records})
    max_n = max((len(runs) for runs in arms.values()), default=0)
    notes = [FEW_SEEDS_NOTE] if max_n < 10 else []
    notes += contrast_notes
    for diff in fairness.allowed:
        notes.append(f"CONFOUND: the arms differ in {diff.key} (allowed by --allow-difference): "
                     + ", ".join(f"{arm} {diff.shown(arm)}" for arm in diff.values))
    report = {
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
        "contrasts": plan,
        "holm": {"tests": family, "alpha": stats.ALPHA, "excluded": sorted(left_out),
                 "family": "every contrast x quality metric both arms have, with a p-value (a spread over >= 2 "
                           "seeds); arms that did not learn left out"},
        "floors": floors,
        "fairness": fairness.to_dict(),
        "metrics": metrics,
        "costs": costs,
        "probe": probe_section.build(arms),
        "notes": notes,
    }
    report["headline"] = headline.build(report, list(key_metrics) if key_metrics else list(DEFAULT_KEY_METRICS))
    return _jsonable(report)


def _verdict(entry: dict, cmp: dict, p_holm: float | None, family: int) -> str:
    """The verdict shown for one paired test; ``seeds_needed`` is re-planned at the family's Bonferroni level."""
    cmp["seeds_needed"] = stats.seeds_needed(list(cmp["differences"].values()), entry["resolution"],
                                             confidence=1.0 - stats.ALPHA / max(1, family))
    if cmp["excluded"]:
        return " and ".join(cmp["excluded"]) + f" {floor_checks.DID_NOT_LEARN}: no verdict"
    return stats.final_verdict(cmp, entry["direction"], resolution=entry["resolution"], p_holm=p_holm, tests=family)


def write_json(report: dict[str, Any], path: Path) -> Path:
    return writes.write_json(path, report)


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
    """``mean ± half-width`` of an arm's 95 % interval; ``mean [lo, hi]`` where the metric's range cut it."""
    s = entry["arms"].get(arm)
    if s is None:
        return "-"
    name = entry["name"]
    if s["ci95"] and s["ci95"][1] > s["ci95"][0]:
        if s.get("clipped"):
            return f"{fmt(s['mean'], name)} [{fmt(s['ci95'][0], name)}, {fmt(s['ci95'][1], name)}]"
        half = (s["ci95"][1] - s["ci95"][0]) / 2
        return f"{fmt(s['mean'], name)} ± {fmt(half, name)}"
    return fmt(s["mean"], name)  # one seed, or the same value on every seed


def diff_text(entry: dict, cmp: dict) -> str:
    """``Δ +1.2 [0.3, 2.1]``: the mean paired difference and its 95 % t-interval."""
    name = entry["name"]
    sign = "+" if cmp["mean"] >= 0 else ""
    text = f"Δ {sign}{fmt(cmp['mean'], name)}"
    if cmp["ci95_t"]:
        text += f" [{fmt(cmp['ci95_t'][0], name)}, {fmt(cmp['ci95_t'][1], name)}]"
    return text


def diff_cell(entry: dict, arm: str, ratio: bool = False) -> tuple[str, str]:
    """Return (text, verdict) of an arm against the baseline: a quality row's paired difference, a cost row's ratio
    of the means with its cost verdict."""
    cmp = entry["vs_baseline"].get(arm)
    if cmp is None or cmp["mean"] is None:
        return "", ""
    if ratio:
        return (f"×{cmp['ratio']:.2f}" if cmp.get("ratio") is not None else ""), cmp.get("cost_verdict", "")
    return diff_text(entry, cmp), cmp["verdict"]


def p_text(cmp: dict) -> str:
    if cmp.get("p_value") is None:
        return "-"
    held = f" ({cmp['p_holm']:.2g})" if cmp.get("p_holm") is not None else " (left out)"
    return f"{cmp['p_value']:.2g}{held}"


def short_verdict(verdict: str) -> str:
    """A verdict in a few words, for narrow tables (the headline has the whole sentence)."""
    if verdict.startswith("not distinguishable"):
        return "not distinguishable" + (" after Holm" if "Holm" in verdict else "")
    if verdict.startswith("too few seeds"):
        return "too few seeds"
    return verdict.removesuffix(": no verdict")


def verdict_style(verdict: str) -> str:
    if verdict in ("better", "faster", "smaller", "less memory"):
        return "green"
    if verdict in ("worse", "slower", "larger", "more memory") or floor_checks.DID_NOT_LEARN in verdict:
        return "red"
    return "dim"


def arm_labels(report: dict) -> list[str]:
    return [a["label"] for a in report["arms"]]


def arrow(entry: dict) -> str:
    return {"lower": " ↓", "higher": " ↑"}.get(entry["direction"] or "", "")


def floor_rows(report: dict) -> list[dict[str, Any]]:
    """Per arm and checked metric: the seeds' values, the floor, and whether every seed cleared it."""
    rows = []
    for arm, s in (report.get("floors") or {}).get("arms", {}).items():
        by: dict[str, list[dict]] = {}
        for c in s["checks"]:
            by.setdefault(c["metric"], []).append(c)
        if not by:
            rows.append({"arm": arm, "status": s["status"], "metric": "-", "values": "-", "floor": "-",
                         "result": "no floor applies: none of gen_condacc, acc, rec_mse, gen_fid measured"})
        for metric, checks in by.items():
            floors_seen = {c["rule"] for c in checks}
            failed = [c for c in checks if c["passed"] is False]
            unchecked = all(c["passed"] is None for c in checks)
            rows.append({"arm": arm, "status": s["status"], "metric": metric,
                         "values": ", ".join(f"{c['value']:.3g}" for c in sorted(checks, key=lambda c: c["seed"])),
                         "floor": "; ".join(sorted(floors_seen)),
                         "result": "not checked" if unchecked else (
                             "under the floor: seed " + ", ".join(str(c["seed"]) for c in failed) if failed
                             else "every seed clears it")})
    return rows


def headline_markdown(report: dict) -> list[str]:
    out = ["## Headline", ""]
    if not any(item["question"] for item in report["headline"]):
        out += ["No two arms differ only in [encoder]: this report has no capsule-vs-CNN contrast.", ""]
    for item in report["headline"]:
        out.append(f"- **{headline.contrast_title(item)}**")
        for text in headline.did_not_learn_text(item):
            out.append(f"  - <span style=\"color:#c01010\">**{text}**</span>")
        for line in item["lines"]:
            if line["style"] == "excluded":
                continue
            shown = f"**{line['text']}**" if line["style"] == "decided" else line["text"]
            detail = f": {line['detail']}" if line["detail"] else ""
            out.append(f"  - `{line['metric']}` ({line['direction']}): {shown}{detail}")
        if not item["lines"]:
            out.append("  - no key metric both arms measure")
        if item["cost"]:
            out.append(f"  - cost: {item['cost']}")
    out += ["", headline.holm_sentence(report), ""]
    return out


def _md(text: str) -> str:
    """A table cell's text with its pipes escaped (``varies: a | b`` would split the cell)."""
    return str(text).replace("|", "\\|")


def write_markdown(report: dict[str, Any], path: Path) -> Path:
    """Write compare.md: the headline first, then the same tables as the HTML page, without pictures."""
    arms = arm_labels(report)
    base = report["baseline"]
    out = [f"# {report['title']}", ""]
    out += headline_markdown(report)
    if report["description"]:
        out += [report["description"], ""]
    out += [f"Arms: {', '.join(arms)}. Seeds: {', '.join(map(str, report['seeds']))}. "
            f"Budget: {report['budget'] or '-'}. Cost reference: **{base}**.", ""]
    for note in report["notes"]:
        out += [f"> **{'Confound' if note.startswith('CONFOUND') else 'Note'}:** {note.removeprefix('CONFOUND: ')}", ""]
    out += ["## Did every arm learn?", "",
            "Each run against the floors below; an arm with a run under a floor "
            f"<span style=\"color:#c01010\">**{floor_checks.DID_NOT_LEARN}**</span> and gets no verdict "
            "(its numbers stay in every table).", ""]
    out += [f"- {k}: {v}" for k, v in report["floors"]["rules"].items()] + [""]
    out += ["| arm | metric | values by seed | floor | result |", "|---|---|---|---|---|"]
    for row in floor_rows(report):
        status = (f"<span style=\"color:#c01010\">**{row['arm']}: {floor_checks.DID_NOT_LEARN}**</span>"
                  if row["status"] == "did not learn" else row["arm"])
        out.append(f"| {status} | `{row['metric']}` | {row['values']} | {row['floor']} | {row['result']} |")
    out += ["", "## Contrasts", "",
            "Paired differences a − b seed by seed: mean [95% t-interval]; p: the paired t-test's, (Holm-adjusted).", ""]
    for c in report["contrasts"]:
        key = contrast_plan.name(c)
        out += [f"### {key}{' (the question)' if c['question'] else ''}", "",
                f"| metric | {c['a']} | {c['b']} | Δ {c['a']} − {c['b']} | p (Holm) | verdict |",
                "|---|---|---|---|---|---|"]
        for entry in report["metrics"]:
            cmp = entry["contrasts"].get(key)
            if cmp is None or cmp["mean"] is None:
                continue
            verdict = f"**{cmp['verdict']}**" if stats.has_verdict(cmp["verdict"]) else cmp["verdict"]
            out.append(f"| `{entry['name']}`{arrow(entry)} | {cell(entry, c['a'])} | {cell(entry, c['b'])} | "
                       f"{diff_text(entry, cmp)} | {p_text(cmp)} | {verdict} |")
        out.append("")
    for section, key in (("Quality", "metrics"), ("Cost", "costs")):
        explain = ("Mean ± half-width of the 95% t-interval over seeds ([lo, hi] where the metric's range cut it)."
                   if key == "metrics" else
                   f"Mean ± half-width of the 95% t-interval; below it the ratio to {base} and the cost verdict "
                   "(counts compared exactly; timings and memory by the paired t-interval, not Holm-corrected).")
        out += [f"## {section}", "", explain, "",
                "| metric | " + " | ".join(f"{a}{' (reference)' if a == base and key == 'costs' else ''}" for a in arms)
                + " |", "|---|" + "---|" * len(arms)]
        for entry in report[key]:
            cells = []
            for arm in arms:
                text, verdict = diff_cell(entry, arm, ratio=True) if key == "costs" else ("", "")
                cells.append(cell(entry, arm) + (f"<br>{text} {verdict}".rstrip() if text else ""))
            out.append(f"| `{entry['name']}`{arrow(entry)} | " + " | ".join(cells) + " |")
        out.append("")
    if report.get("probe"):
        out += probe_section.markdown(report["probe"], base)
    out += ["## Fairness", "", "Every recipe key on which the arms differ (and the steps and images they trained): "
            "refused or allowed keys first, then those meant to differ; keys only some arms have are collapsed.", "",
            "| key | status | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    for d in display_rows(report["fairness"]["differences"], arms):
        status = d["status"] if d["status"] != "allowed" else "**ALLOWED CONFOUND**"
        key = f"`{d['key']}`" + (f" ({len(d['keys'])} keys: {', '.join(k.split('.', 1)[-1] for k in d['keys'])})"
                                 if len(d["keys"]) > 1 else "")
        out.append(f"| {key} | {status} | " + " | ".join(f"`{_md(d['values'].get(a, '-'))}`" for a in arms) + " |")
    out += ["", "## Protocol", "", "```json", json.dumps(report["eval_protocol"], indent=2), "```", "",
            "## Statistics", ""]
    out += [f"- {k}: {v}" for k, v in report["statistics"].items()]
    out += ["", "## Runs", ""]
    for arm in report["arms"]:
        out.append(f"- **{arm['label']}** ({', '.join(arm['devices'])}): "
                   + ", ".join(f"seed {r['seed']} `{r['run_dir']}`" for r in arm["runs"]))
    return writes.write_text(path, "\n".join(out) + "\n")


# ------------------------------------------------------------------ the terminal

NAME_WIDTH = 22
"""Widest line of a metric name in the terminal tables; longer names wrap at an underscore or a dot."""


def wrap_name(name: str, width: int = NAME_WIDTH) -> str:
    """Break a metric name into lines of at most ``width`` characters after ``_`` or ``.`` (never inside a word
    unless a word alone is longer), so an 80-column table shows it whole."""
    pieces, current = [], ""
    for token in _tokens(name):
        if current and len(current) + len(token) > width:
            pieces.append(current)
            current = ""
        while len(token) > width:
            pieces.append(token[:width])
            token = token[width:]
        current += token
    if current:
        pieces.append(current)
    return "\n".join(pieces)


def _tokens(name: str) -> list[str]:
    out, current = [], ""
    for ch in name:
        current += ch
        if ch in "_.":
            out.append(current)
            current = ""
    if current:
        out.append(current)
    return out


def print_terminal(report: dict[str, Any], console) -> None:
    """Print the headline, the arms that did not learn, the contrasts, the quality and cost tables, the notes."""
    from rich.table import Column, Table
    from rich.text import Text

    arms = arm_labels(report)
    base = report["baseline"]
    console.print(Text(f"{report['title']}: headline", style="bold"))
    for item in report["headline"]:
        console.print(Text(headline.contrast_title(item), style="bold cyan"))
        for warning in headline.did_not_learn_text(item):
            console.print(Text("  " + warning, style="bold red"))
        for line in item["lines"]:
            if line["style"] == "excluded":
                continue
            out = Text(f"  {line['metric']} ({line['direction']}): ")
            out.append(line["text"], style="bold green" if line["style"] == "decided" else "dim")
            if line["detail"]:
                out.append(f"; {line['detail']}")
            console.print(out)
        if item["cost"]:
            console.print(Text(f"  cost: {item['cost']}", style="dim"))
    console.print(Text(headline.holm_sentence(report), style="dim"))
    width = max([len(e["name"]) for e in report["metrics"] + report["costs"]] + [6])
    width = min(width, NAME_WIDTH)

    def name_column() -> Column:
        return Column("metric", style="bold cyan", no_wrap=True, min_width=width, max_width=width)

    for c in report["contrasts"]:
        key = contrast_plan.name(c)
        table = Table(name_column(), Column(c["a"], justify="right"), Column(c["b"], justify="right"),
                      Column(f"Δ {c['a']} − {c['b']}", justify="right"),
                      Column("verdict", overflow="fold"),
                      title=f"{key}{' (the question)' if c['question'] else ''}: mean ± 95% CI over "
                            f"{len(report['seeds'])} seeds", title_justify="left", show_lines=True)
        for entry in report["metrics"]:
            cmp = entry["contrasts"].get(key)
            if cmp is None or cmp["mean"] is None:
                continue
            table.add_row(Text(wrap_name(entry["name"] + arrow(entry), width)), cell(entry, c["a"]),
                          cell(entry, c["b"]), diff_text(entry, cmp),
                          Text(short_verdict(cmp["verdict"]), style=verdict_style(cmp["verdict"])))
        console.print(table)
    for section, key in (("quality", "metrics"), ("cost", "costs")):
        columns = [name_column(), *(Column(a + (" (ref.)" if a == base and key == "costs" else ""), justify="right")
                                    for a in arms)]
        table = Table(*columns, title=f"{report['title']}: {section} (mean ± 95% CI over {len(report['seeds'])} "
                                      f"seeds{'; ratio to ' + base if key == 'costs' else ''})",
                      title_justify="left", show_lines=True)
        for entry in report[key]:
            row: list[Any] = [Text(wrap_name(entry["name"] + arrow(entry), width))]
            for arm in arms:
                text = Text(cell(entry, arm))
                diff, verdict = diff_cell(entry, arm, ratio=True) if key == "costs" else ("", "")
                if diff:
                    text.append(f"\n{diff} ", style="dim")
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
