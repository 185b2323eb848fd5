"""``compare.html``: one self-contained page (no network), charts and pictures inlined as data: URIs.

Sections: the headline (first: per contrast, the question first, the answer in words), the
competence floors (arms that did not learn in red), the contrasts' tables, the quality table,
metric bars with 95 % error bars (within the metric's range; a log axis where the arms span a
decade or more; an arm whose mean dwarfs the others' marked) and every seed's value, learning
curves of every arm overlaid (mean and min-max band over seeds), gate timelines, the last
sample grids of every run side by side (a row per seed, captioned: which rows are real images
and which reconstructions), the spatial-structure probe (when the runs were probed), the
fairness table, the cost table, the protocol and the statistics used, with a visible note on
few seeds.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from capsgan_toolkit.compare import stats
from capsgan_toolkit.compare.collect import RunRecord
from capsgan_toolkit.compare.report import arm_labels, cell, diff_cell, fmt
from capsgan_toolkit.rundir import writes

GATE_KEYS = ("gate_warmup", "gate_generator", "gate_discriminator")
_TRAIN_SKIP = {"epoch", "step", "images_per_s", "skipped_steps", "batch_acc", *GATE_KEYS}
_EPOCH_SKIP = {"epoch", "step", "time_s", "encoder_acc", "disc_acc"}
MAX_PANELS = 12
LOG_SPAN = 10.0
"""A metric whose positive values span this factor or more is drawn on a log axis."""
DWARF = 10.0
"""An arm whose mean is this many times every other arm's dwarfs them: its bar is marked."""


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_uri(fig) -> str:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return data_uri(buf.getvalue())


def _colors(arms: list[str]) -> dict[str, Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return {arm: cmap(i % 10) for i, arm in enumerate(arms)}


def _grid(n: int, ncols: int = 4, size=(3.6, 2.8)):
    plt = _pyplot()
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def axis_plan(entry: dict, arms: list[str]) -> dict[str, Any]:
    """How to draw one metric: ``log`` axis or not, and the arms whose mean dwarfs the others (arm -> factor).

    A log axis where every value drawn is positive and the largest is :data:`LOG_SPAN` times
    the smallest or more; an arm dwarfs the rest when its mean is :data:`DWARF` times the
    largest of the other arms' means or more.
    """
    summaries = {a: entry["arms"][a] for a in arms if a in entry["arms"] and entry["arms"][a]["mean"] is not None}
    values = [v for s in summaries.values() for v in s["values"].values()] + [s["mean"] for s in summaries.values()]
    log = bool(values) and min(values) > 0 and max(values) / min(values) >= LOG_SPAN
    dwarfs = {}
    if len(summaries) >= 2:
        for arm, s in summaries.items():
            others = [o["mean"] for a, o in summaries.items() if a != arm]
            top = max(others)
            if s["mean"] > 0 and top > 0 and s["mean"] / top >= DWARF:
                dwarfs[arm] = s["mean"] / top
    return {"log": log, "dwarfs": dwarfs}


def error_bar(entry: dict, arm: str, log_floor: float | None = None) -> tuple[float, float] | None:
    """(below, above) the mean of an arm's 95 % interval, inside the metric's range (and above ``log_floor``)."""
    s = entry["arms"].get(arm)
    if s is None or not s["ci95"]:
        return None
    lo, hi = stats.clip(s["ci95"], stats.bounds(entry["name"])) or (s["mean"], s["mean"])
    if log_floor is not None:
        lo = max(lo, log_floor)
    return max(0.0, s["mean"] - lo), max(0.0, hi - s["mean"])


def bars_figure(report: dict, key: str = "metrics") -> str | None:
    """Bars of each metric's mean per arm, 95 % error bars within the metric's range, a dot per seed; a log axis
    where the values span a decade, and a red mark on an arm whose mean dwarfs the others'."""
    entries = [e for e in report[key] if e["arms"]][:MAX_PANELS * 2]
    if not entries:
        return None
    arms = arm_labels(report)
    colors = _colors(arms)
    fig, axes = _grid(len(entries))
    for ax, entry in zip(axes, entries):
        plan = axis_plan(entry, arms)
        shown = [entry["arms"][a] for a in arms if a in entry["arms"]]
        floor = None
        if plan["log"]:
            floor = min(min(s["values"].values()) for s in shown) / 3  # the axis starts below the smallest value
            ax.set_yscale("log")
        xs, labels = [], []
        for i, arm in enumerate(arms):
            s = entry["arms"].get(arm)
            if s is None:
                continue
            err = error_bar(entry, arm, floor)
            yerr = [[err[0]], [err[1]]] if err else None
            dwarf = arm in plan["dwarfs"]
            bottom = floor if floor is not None else 0.0  # on a log axis a bar starts at the axis' foot, not 0
            ax.bar(i, s["mean"] - bottom, bottom=bottom, color=colors[arm], alpha=0.75, yerr=yerr, capsize=4,
                   hatch="//" if arm == report["baseline"] else None,
                   edgecolor="#c01010" if dwarf else "black", linewidth=2.0 if dwarf else 0.5)
            vals = list(s["values"].values())
            ax.scatter([i] * len(vals), vals, color="black", s=10, zorder=3)
            if dwarf:
                ax.annotate(f"×{plan['dwarfs'][arm]:.0f} the others", (i, s["mean"]), textcoords="offset points",
                            xytext=(0, 4), ha="center", fontsize=7, color="#c01010", fontweight="bold")
            xs.append(i)
            labels.append(arm)
        if floor is not None:
            ax.set_ylim(bottom=floor)
        ax.set_xticks(xs, labels, rotation=20, fontsize=8)
        arrow = {"lower": " (lower is better)", "higher": " (higher is better)"}.get(entry["direction"] or "", "")
        ax.set_title(entry["name"] + arrow + (", log axis" if plan["log"] else ""), fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return _figure_uri(fig)


def probe_figure(report: dict) -> str | None:
    """Accuracy per perturbation, a line per probed arm: the mean over seeds with its 95 % t-interval."""
    section = report.get("probe") or {}
    arms = [a for a, s in (section.get("arms") or {}).items() if s["status"] == "measured" and "acc" in s["values"]]
    if not arms:
        return None
    names, colors = section["perturbations"], _colors(arm_labels(report))
    fig, ax = _pyplot().subplots(figsize=(7.5, 3.2))
    for arm in arms:
        cells = [section["arms"][arm]["values"]["acc"][p] for p in names]
        means = [c["mean"] for c in cells]
        cis = [stats.clip(c["ci95"], (0.0, 1.0)) if c["ci95"] else None for c in cells]  # an accuracy: in [0, 1]
        err = [[max(0.0, m - ci[0]) if ci else 0 for m, ci in zip(means, cis)],
               [max(0.0, ci[1] - m) if ci else 0 for m, ci in zip(means, cis)]]
        ax.errorbar(range(len(names)), means, yerr=err, color=colors[arm], marker="o", capsize=3, label=arm)
    ax.set_xticks(range(len(names)), [n if n != "none" else "as they are" for n in names], rotation=20, fontsize=8)
    ax.set_ylabel("accuracy", fontsize=8)
    ax.set_title("probe accuracy per perturbation: mean over seeds, 95% t-interval", fontsize=9)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _figure_uri(fig)


def _series(rows: list[dict], key: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    x_key = "epoch" if kind == "epoch" else "step"
    for row in rows:
        value = row.get(key)
        if row.get("kind") == kind and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value) and isinstance(row.get(x_key), (int, float)):
            xs.append(row[x_key] + (1 if kind == "epoch" else 0))
            ys.append(float(value))
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def _over_seeds(runs: list[RunRecord], key: str, kind: str):
    """Return grid, mean, min and max of a curve over an arm's seeds (each interpolated on the union grid)."""
    series = [s for s in (_series(r.rows, key, kind) for r in runs) if s[0].size]
    if not series:
        return None
    grid = np.unique(np.concatenate([xs for xs, _ in series]))
    stack = np.full((len(series), grid.size), np.nan)
    for i, (xs, ys) in enumerate(series):
        order = np.argsort(xs, kind="stable")
        xs, ys = xs[order], ys[order]
        inside = (grid >= xs[0]) & (grid <= xs[-1])
        stack[i, inside] = np.interp(grid[inside], xs, ys)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return grid, np.nanmean(stack, 0), np.nanmin(stack, 0), np.nanmax(stack, 0)


def curve_keys(arms: dict[str, list[RunRecord]]) -> list[tuple[str, str]]:
    """Return (kind, key) of every curve worth drawing: losses and accuracies per step, test numbers per epoch."""
    out: list[tuple[str, str]] = []
    for kind, skip in (("epoch", _EPOCH_SKIP), ("train", _TRAIN_SKIP)):
        for runs in arms.values():
            for r in runs:
                for row in r.rows:
                    if row.get("kind") != kind:
                        continue
                    for k, v in row.items():
                        if k in skip or k == "kind" or (kind, k) in out:
                            continue
                        if isinstance(v, (int, float)) and not isinstance(v, bool):
                            out.append((kind, k))
    epoch = sorted(k for k in out if k[0] == "epoch")
    train = sorted((k for k in out if k[0] == "train"), key=lambda k: (not k[1].startswith("loss_"), k[1]))
    return (epoch + train)[:MAX_PANELS]


def curves_figure(arms: dict[str, list[RunRecord]]) -> str | None:
    """Learning curves, every arm overlaid: the mean over seeds and a min-max band."""
    keys = curve_keys(arms)
    if not keys:
        return None
    colors = _colors(list(arms))
    fig, axes = _grid(len(keys), ncols=3, size=(4.6, 3.0))
    for ax, (kind, key) in zip(axes, keys):
        for arm, runs in arms.items():
            found = _over_seeds(runs, key, kind)
            if found is None:
                continue
            grid, mean, lo, hi = found
            ax.plot(grid, mean, color=colors[arm], label=f"{arm} (n={len(runs)})", lw=1.4)
            if len(runs) > 1:
                ax.fill_between(grid, lo, hi, color=colors[arm], alpha=0.2, lw=0)
        ax.set_title(f"{key} ({'per epoch' if kind == 'epoch' else 'per logged step'})", fontsize=9)
        ax.set_xlabel("epoch" if kind == "epoch" else "step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _figure_uri(fig)


def gates_figure(arms: dict[str, list[RunRecord]]) -> str | None:
    """Per arm, the share of seeds (and steps of each log interval) with each gate phase on."""
    have = [(arm, runs) for arm, runs in arms.items()
            if any(any(k in row for k in GATE_KEYS) for r in runs for row in r.rows)]
    if not have:
        return None
    fig, axes = _grid(len(have), ncols=3, size=(4.6, 2.6))
    styles = {"gate_warmup": ("tab:gray", "warm-up"), "gate_generator": ("tab:blue", "generator loss on"),
              "gate_discriminator": ("tab:red", "discriminator trained")}
    for ax, (arm, runs) in zip(axes, have):
        for key in GATE_KEYS:
            found = _over_seeds(runs, key, "train")
            if found is None:
                continue
            grid, mean, _, _ = found
            color, label = styles[key]
            ax.step(grid, mean, where="post", color=color, label=label, lw=1.3)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{arm}: gate phases (mean over {len(runs)} seeds)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    return _figure_uri(fig)


SAMPLE_CAPTIONS = {
    "pairs": "real test images in rows 1, 3, 5, ...; each row below them (2, 4, 6, ...) holds their reconstructions",
    "new": "new images only, one per class of the sample test images: no real images",
    "unknown": ("the run's last sample grid: real test images above their reconstructions (rows 1, 3, 5, ... real) "
                "where the objective reconstructs, new images where it only generates"),
}


def sample_kind(runs: list[RunRecord]) -> str:
    """What an arm's sample grids hold: "pairs" (real images above reconstructions: the runs have reconstruction
    numbers), "new" images (generation numbers and no encoder), or "unknown"."""
    names = {n for r in runs for n in r.quality()}
    if any(n.startswith("rec_") or n == "test_rec_mse01" for n in names):
        return "pairs"
    if any(n.startswith("gen_") for n in names) and not any(r.recipe.get("encoder") for r in runs):
        return "new"
    return "unknown"


def sample_table(arms: dict[str, list[RunRecord]]) -> list[dict[str, Any]]:
    """Rows (one per seed) of each arm's last sample grid, inlined."""
    seeds = sorted({r.seed for runs in arms.values() for r in runs})
    rows = []
    for seed in seeds:
        cells = []
        for arm, runs in arms.items():
            rec = next((r for r in runs if r.seed == seed), None)
            path = rec.last_sample() if rec else None
            cells.append({"arm": arm, "uri": data_uri(path.read_bytes()) if path else None,
                          "caption": f"{arm}, seed {seed}: {path.name}" if path else f"{arm}, seed {seed}: no samples"})
        rows.append({"seed": seed, "cells": cells})
    return rows


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{{ r.title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1250px; color: #222; background: #fff; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
.better, .decided { color: #0a7a12; font-weight: bold; } .worse { color: #c01010; font-weight: bold; }
.undecided { color: #777; } .diff { font-size: 0.85em; display: block; }
.confound, tr.allowed td, .not-learned { color: #c01010; font-weight: bold; }
tr.refused td { color: #c01010; } tr.meant td { color: #1f4e96; } tr.other td { color: #666; }
.note { background: #fff7d6; border-left: 5px solid #e0b000; padding: 0.6em 1em; margin: 0.8em 0; }
.alarm { background: #ffe3e3; border-left: 5px solid #c01010; padding: 0.6em 1em; margin: 0.8em 0; }
.headline { background: #f3f7ff; border-left: 5px solid #1f4e96; padding: 0.4em 1em; }
.headline li { margin: 0.2em 0; } .headline .question { font-size: 1.1em; }
img.chart { max-width: 100%; } figure { display: inline-block; margin: 0.3em; text-align: center; }
figcaption { font-size: 0.8em; color: #555; } code { font-size: 0.9em; }
.samples td { text-align: center; } .samples img { width: 260px; image-rendering: pixelated; }
td.verdict, td.floor-result { text-align: left; }
</style></head>
<body>
<h1 id="title">{{ r.title }}</h1>

<h2 id="headline">Headline</h2>
<div class="headline">
{% if not has_question %}<p>No two arms differ only in [encoder]: this report has no capsule-vs-CNN contrast.</p>{% endif %}
<ul>{% for item in r.headline %}<li class="{{ 'question' if item.question else 'contrast' }}"><b>{{ contrast_title(item) }}</b>
<ul>{% for text in not_learned(item) %}<li class="not-learned">{{ text }}</li>{% endfor %}
{% for line in item.lines if line.style != "excluded" %}<li><code>{{ line.metric }}</code> ({{ line.direction }}):
<span class="{{ line.style }}">{{ line.text }}</span>{% if line.detail %}: {{ line.detail }}{% endif %}</li>{% endfor %}
{% if not item.lines %}<li class="undecided">no key metric both arms measure</li>{% endif %}
{% if item.cost %}<li class="undecided">cost: {{ item.cost }}</li>{% endif %}</ul></li>{% endfor %}</ul>
<p><small>{{ holm }}</small></p>
</div>

{% if r.description %}<p>{{ r.description }}</p>{% endif %}
<p>Arms: {{ arms|join(", ") }} &middot; seeds: {{ r.seeds|join(", ") }} &middot; budget: {{ r.budget or "-" }}
&middot; cost reference: <b>{{ r.baseline }}</b> &middot; made by capsgan {{ r.toolkit_version }} on {{ r.created }}</p>
<div class="note" id="few-seeds-note"><b>Read the intervals before the means.</b> {{ few_seeds }}</div>
{% for d in allowed %}<div class="alarm confound">Confound allowed by --allow-difference: the arms differ in
<code>{{ d.key }}</code> ({% for a, v in d["values"].items() %}{{ a }}: {{ v }}{% if not loop.last %}; {% endif %}{% endfor %}).
Every difference below may come from it.</div>{% endfor %}
{% for n in other_notes %}<div class="note">{{ n }}</div>{% endfor %}

<h2 id="floors">Did every arm learn?</h2>
<p>Each run against these floors; an arm with a run under one <span class="not-learned">did not learn at this budget</span>
and gets no verdict (its numbers stay in every table).</p>
<ul>{% for k, v in r.floors.rules.items() %}<li><b>{{ k }}</b>: {{ v }}</li>{% endfor %}</ul>
<table><tr><th>arm</th><th>metric</th><th>values by seed</th><th>floor</th><th>result</th></tr>
{% for row in floor_rows %}<tr{% if row.result.startswith("under the floor") %} class="not-learned"{% endif %}><td{% if row.status == "did not learn" %} class="not-learned"{% endif %}>{{ row.arm }}{% if row.status == "did not learn" %}: did not learn at this budget{% endif %}</td>
<td><code>{{ row.metric }}</code></td><td>{{ row["values"] }}</td><td>{{ row.floor }}</td><td class="floor-result">{{ row.result }}</td></tr>{% endfor %}
</table>

<h2 id="contrasts">Contrasts</h2>
<p>Paired differences a &minus; b, seed by seed: mean [95% t-interval]; p: the paired t-test's, in brackets Holm-adjusted.</p>
{% for c in contrast_tables %}<h3>{{ c.title }}</h3>
<table><tr><th>metric</th><th>{{ c.a }}</th><th>{{ c.b }}</th><th>&Delta; {{ c.a }} &minus; {{ c.b }}</th><th>p (Holm)</th><th>verdict</th></tr>
{% for row in c.rows %}<tr><td><code>{{ row.name }}</code>{{ row.arrow }}</td><td>{{ row.a }}</td><td>{{ row.b }}</td><td>{{ row.diff }}</td><td>{{ row.p }}</td>
<td class="verdict {{ row.cls }}">{{ row.verdict }}</td></tr>{% endfor %}
</table>{% endfor %}

<h2 id="quality">Quality</h2>
<p>Mean &plusmn; half-width of the 95% t-interval over seeds ([lo, hi] where the metric's range cut it).</p>
{{ table(r.metrics) }}

<h2 id="bars">Metrics by arm</h2>
<p>Bars at the mean, error bars at the 95% interval (never outside the metric's range), a dot per seed; a log axis where
the values span a decade or more; a red edge and label on an arm whose mean is {{ dwarf }} times the others' or more.</p>
{% if bars %}<img class="chart" alt="metric bars with 95% error bars" src="{{ bars }}">{% else %}<p>No metrics.</p>{% endif %}

<h2 id="curves">Learning curves</h2>
<p>Mean over seeds (line) and the band from the lowest to the highest seed.</p>
{% if curves %}<img class="chart" alt="learning curves" src="{{ curves }}">{% else %}<p>No curves in metrics.jsonl.</p>{% endif %}

<h2 id="gates">Gate timelines</h2>
<p>Share of the seeds' logged steps in each phase of the training schedule (1: every step of every seed).</p>
{% if gates %}<img class="chart" alt="gate timelines" src="{{ gates }}">{% else %}<p>No gate columns in metrics.jsonl.</p>{% endif %}

<h2 id="samples">Samples and reconstructions</h2>
<p>Each run's last sample grid (samples/epoch_*.png), a row per seed, a column per arm. What each arm's grid holds:</p>
<ul id="sample-captions">{% for a, text in sample_captions.items() %}<li><b>{{ a }}</b>: {{ text }}</li>{% endfor %}</ul>
<table class="samples"><tr><th>seed</th>{% for a in arms %}<th>{{ a }}<br><small>{{ sample_captions[a] }}</small></th>{% endfor %}</tr>
{% for row in samples %}<tr><td>{{ row.seed }}</td>{% for c in row.cells %}<td>
{% if c.uri %}<figure><img alt="{{ c.caption }}" src="{{ c.uri }}"><figcaption>{{ c.caption }}</figcaption></figure>
{% else %}<span class="undecided">{{ c.caption }}</span>{% endif %}</td>{% endfor %}</tr>{% endfor %}
</table>

{% if probe %}<h2 id="probe">{{ probe_title }}</h2>
{% if probe_chart %}<img class="chart" alt="probe accuracy per perturbation" src="{{ probe_chart }}">{% endif %}
{{ probe }}{% endif %}

<h2 id="fairness">Fairness</h2>
<p>Every recipe key on which the arms differ, and the steps and images they trained: refused or
<span class="confound">allowed</span> keys first, then those <span style="color:#1f4e96">meant to differ</span>, then
<span style="color:#666">incidental</span> ones; keys only some arms have are collapsed into one row per table.</p>
<table><tr><th>key</th><th>status</th>{% for a in arms %}<th>{{ a }}</th>{% endfor %}</tr>
{% for d in fairness_rows %}<tr class="{{ d.status }}"><td><code>{{ d.key }}</code>{% if d["keys"]|length > 1 %}<br><small>{{ d["keys"]|join(", ") }}</small>{% endif %}</td><td>{{ d.status }}</td>
{% for a in arms %}<td><code>{{ d["values"].get(a, "-") }}</code></td>{% endfor %}</tr>{% endfor %}
</table>

<h2 id="costs">Cost</h2>
<p>Devices: {% for a in r.arms %}{{ a.label }}: {{ a.devices|join(", ") }}{% if not loop.last %}; {% endif %}{% endfor %}.
Below each value: the ratio to {{ r.baseline }} and the cost verdict (parameters and FLOPs are counts, compared exactly;
timings and memory by the paired t-interval, not Holm-corrected).</p>
{{ table(r.costs, True) }}
{% if cost_bars %}<img class="chart" alt="cost bars" src="{{ cost_bars }}">{% endif %}

<h2 id="protocol">Protocol and statistics</h2>
<pre>{{ protocol }}</pre>
<ul>{% for k, v in r.statistics.items() %}<li><b>{{ k }}</b>: {{ v }}</li>{% endfor %}</ul>
<h3>Runs</h3>
<ul>{% for a in r.arms %}<li><b>{{ a.label }}</b>: {% for run in a.runs %}seed {{ run.seed }} <code>{{ run.run_dir }}</code>{% if not loop.last %}, {% endif %}{% endfor %}</li>{% endfor %}</ul>
</body></html>
"""

_TABLE = """<table><tr><th>metric</th>{% for a in arms %}<th>{{ a }}{% if a == base and ratio %} (reference){% endif %}</th>{% endfor %}</tr>
{% for row in rows %}<tr><td><code>{{ row.name }}</code>{{ row.arrow }}{% if row.description %}<br><small>{{ row.description }}</small>{% endif %}</td>
{% for c in row.cells %}<td{% if c.not_learned %} class="not-learned"{% endif %}>{{ c.value }}{% if c.diff %}<span class="diff {{ c.cls }}">{{ c.diff }} {{ c.verdict }}</span>{% endif %}</td>{% endfor %}</tr>
{% endfor %}</table>"""


def render_html(report: dict[str, Any], arms: dict[str, list[RunRecord]]) -> str:
    """Return the whole page as one string."""
    import json

    from jinja2 import Environment
    from markupsafe import Markup

    from capsgan_toolkit.compare import headline, probe_section
    from capsgan_toolkit.compare.contrasts import name as contrast_name
    from capsgan_toolkit.compare.fairness import display_rows
    from capsgan_toolkit.compare.report import FEW_SEEDS_NOTE, arrow, diff_text, floor_rows, p_text, verdict_style

    env = Environment(autoescape=True)
    labels = arm_labels(report)
    table_template = env.from_string(_TABLE)
    failed = {a for a, s in report["floors"]["arms"].items() if s["status"] == "did not learn"}

    def table(entries, ratio=False):
        rows = []
        for entry in entries:
            cells = []
            for arm in labels:
                diff, verdict = diff_cell(entry, arm, ratio=True) if ratio else ("", "")
                cls = {"green": "better", "red": "worse"}.get(verdict_style(verdict), "undecided")
                cells.append({"value": cell(entry, arm), "diff": diff, "verdict": verdict, "cls": cls,
                              "not_learned": not ratio and arm in failed and arm in entry["arms"]})
            rows.append({"name": entry["name"], "arrow": arrow(entry), "description": entry.get("description"),
                         "cells": cells})
        return Markup(table_template.render(rows=rows, arms=labels, base=report["baseline"], ratio=ratio))

    contrast_tables = []
    for c in report["contrasts"]:
        key = contrast_name(c)
        rows = []
        for entry in report["metrics"]:
            cmp = entry["contrasts"].get(key)
            if cmp is None or cmp["mean"] is None:
                continue
            cls = {"green": "better", "red": "worse"}.get(verdict_style(cmp["verdict"]), "undecided")
            rows.append({"name": entry["name"], "arrow": arrow(entry), "a": cell(entry, c["a"]),
                         "b": cell(entry, c["b"]), "diff": diff_text(entry, cmp), "p": p_text(cmp),
                         "verdict": cmp["verdict"], "cls": cls})
        contrast_tables.append({"title": key + (" (the question)" if c["question"] else ""), "a": c["a"], "b": c["b"],
                                "rows": rows})
    cost_entries = [e for e in report["costs"] if not e["name"].startswith(("parameters.", "flops_per_image."))
                    or e["name"].endswith(".total")]
    page = env.from_string(_TEMPLATE).render(
        r=report, arms=labels, table=table, few_seeds=FEW_SEEDS_NOTE, dwarf=f"{DWARF:g}",
        has_question=any(item["question"] for item in report["headline"]),
        contrast_title=headline.contrast_title, not_learned=headline.did_not_learn_text,
        holm=headline.holm_sentence(report), floor_rows=floor_rows(report), contrast_tables=contrast_tables,
        other_notes=[n for n in report["notes"] if n != FEW_SEEDS_NOTE and not n.startswith("CONFOUND")],
        allowed=[d for d in report["fairness"]["differences"] if d["status"] == "allowed"],
        fairness_rows=display_rows(report["fairness"]["differences"], labels),
        bars=bars_figure(report), cost_bars=bars_figure({**report, "costs": cost_entries}, "costs"),
        curves=curves_figure(arms), gates=gates_figure(arms), samples=sample_table(arms),
        sample_captions={a: SAMPLE_CAPTIONS[sample_kind(arms[a])] for a in labels if a in arms},
        protocol=json.dumps(report["eval_protocol"], indent=2), probe_title=probe_section.TITLE,
        probe=Markup(probe_section.html(report["probe"], report["baseline"])) if report.get("probe") else None,
        probe_chart=probe_figure(report))
    return page


def write_html(report: dict[str, Any], arms: dict[str, list[RunRecord]], path: Path) -> Path:
    return writes.write_text(path, render_html(report, arms))


__all__ = ["render_html", "write_html", "fmt"]
