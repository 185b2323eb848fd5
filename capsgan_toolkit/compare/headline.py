"""The headline: for each contrast (the question first) and key metric, the answer in plain words.

Each line says which arm is better with its Holm-adjusted p-value, or "not distinguishable with
N seeds (about M needed)", or that an arm did not learn at this budget (no verdict). The
headline is computed once (compare.json's ``headline``) and printed the same way by compare.md,
compare.html and the terminal.
"""

from __future__ import annotations

from typing import Any

from capsgan_toolkit import catalogue
from capsgan_toolkit.compare import stats
from capsgan_toolkit.compare.contrasts import name as contrast_name

FALLBACK = {"acc": catalogue.EPOCH_TEST_ACC, "rec_mse": catalogue.EPOCH_TEST_REC_MSE}
"""A key-metric stem -> the trainer's summary.json number used when eval.json has none."""


def key_metric_names(names: list[str], wanted: list[str] | tuple[str, ...]) -> list[str]:
    """Pick the headline's metrics from a report's metric names (in report order).

    Each wanted entry is a result key (taken as it is) or a stem (``gen_fid``: the first result
    key of that stem, e.g. the first feature extractor's; ``acc`` and ``rec_mse`` fall back to
    the trainer's ``test_acc`` and ``test_rec_mse01``).
    """
    out: list[str] = []
    for want in wanted:
        if want in names:
            out.append(want)
            continue
        found = [n for n in names if (p := catalogue.parse(n)) is not None and p.key.stem == want]
        if not found and want in FALLBACK and FALLBACK[want] in names:
            found = [FALLBACK[want]]
        out.extend(found[:1])
    return list(dict.fromkeys(out))


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def line(entry: dict[str, Any], contrast: dict[str, Any]) -> dict[str, Any] | None:
    """One headline line: a metric of a contrast (``None`` when an arm lacks the metric)."""
    key = contrast_name(contrast)
    cmp = (entry.get("contrasts") or {}).get(key)
    if cmp is None:
        return None
    a, b = contrast["a"], contrast["b"]
    verdict = cmp["verdict"]
    arrow = {"lower": "lower is better", "higher": "higher is better"}.get(entry["direction"] or "", "")
    detail = ""
    if cmp["mean"] is not None:
        detail = f"Δ {a} − {b} {cmp['mean']:+.3g}"
        if cmp.get("ci95_t"):
            detail += f" [{_fmt(cmp['ci95_t'][0])}, {_fmt(cmp['ci95_t'][1])}]"
    if verdict in ("better", "worse"):
        winner = a if verdict == "better" else b
        text = f"{winner} is better"
        detail += f", Holm-adjusted p = {cmp['p_holm']:.2g} ({cmp['n']} seeds)"
        style = "decided"
    elif verdict in ("higher", "lower"):
        text = f"{a} is {verdict} than {b}"
        detail += f", Holm-adjusted p = {cmp['p_holm']:.2g} ({cmp['n']} seeds)"
        style = "decided"
    else:
        text = verdict
        style = "excluded" if cmp.get("excluded") else "undecided"
    return {"metric": entry["name"], "direction": arrow, "verdict": verdict, "text": text, "detail": detail,
            "style": style, "winner": (a if verdict == "better" else b) if verdict in ("better", "worse") else None}


def build(report: dict[str, Any], key_metrics: list[str] | tuple[str, ...]) -> list[dict[str, Any]]:
    """Return compare.json's ``headline``: per contrast, its lines and a cost line."""
    names = key_metric_names([m["name"] for m in report["metrics"]], key_metrics)
    by_name = {m["name"]: m for m in report["metrics"]}
    costs = {c["name"]: c for c in report["costs"]}
    floors = report.get("floors") or {"arms": {}}
    out = []
    for contrast in report["contrasts"]:
        a, b = contrast["a"], contrast["b"]
        failed = [x for x in (a, b) if (floors["arms"].get(x) or {}).get("status") == "did not learn"]
        item: dict[str, Any] = {"contrast": contrast_name(contrast), "a": a, "b": b,
                                "question": contrast["question"], "differs_in": contrast["differs_in"],
                                "did_not_learn": {x: floors["arms"][x]["failed"] for x in failed}, "lines": []}
        for metric in names:
            got = line(by_name[metric], contrast)
            if got is not None:
                item["lines"].append(got)
        item["cost"] = cost_line(costs, a, b)
        out.append(item)
    return out


def cost_line(costs: dict[str, dict], a: str, b: str) -> str:
    """``a`` against ``b`` in cost, as ratios of the means: training time per epoch, parameters, FLOPs per image."""
    parts = []
    for key, what in (("seconds_per_epoch", "the seconds per epoch"), ("parameters.total", "the parameters"),
                      ("flops_per_image.total", "the FLOPs per image")):
        entry = costs.get(key)
        if entry is None:
            continue
        sa, sb = entry["arms"].get(a), entry["arms"].get(b)
        if sa and sb and sb["mean"]:
            parts.append(f"×{sa['mean'] / sb['mean']:.2f} {what}")
    return f"{a} takes " + ", ".join(parts) + f" of {b}" if parts else ""


def contrast_title(item: dict[str, Any]) -> str:
    """``capsule vs cnn: the question (the recipes differ only in [encoder])`` or what else differs."""
    if item["question"]:
        return f"{item['contrast']}: the question (the recipes differ only in [encoder])"
    differs = ", ".join(f"[{t}]" for t in item["differs_in"]) or "nothing but the seeds"
    return f"{item['contrast']} (the recipes differ in {differs})"


def did_not_learn_text(item: dict[str, Any]) -> list[str]:
    """``cnn did not learn at this budget (seed 0: gen_condacc500_domain 0.1, needs > 0.15): no verdict``."""
    out = []
    for arm, failed in item["did_not_learn"].items():
        shown = "; ".join(failed[:2]) + (f"; {len(failed) - 2} more" if len(failed) > 2 else "")
        out.append(f"{arm} did not learn at this budget ({shown}): no verdict, its numbers are below")
    return out


def holm_sentence(report: dict[str, Any]) -> str:
    holm = report["holm"]
    left_out = holm.get("excluded") or []
    return (f"Verdicts hold the report to a family-wise {int(100 * stats.CONFIDENCE)}% level: Holm's correction over "
            f"the {holm['tests']} paired test{'s' if holm['tests'] != 1 else ''} of every contrast x quality metric"
            + (f" ({', '.join(left_out)} left out: did not learn)" if left_out else "")
            + ". A better/worse needs at least 3 paired seeds.")
