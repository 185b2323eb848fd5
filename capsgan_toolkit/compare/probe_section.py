"""The report's spatial-structure section: the probe's numbers (``capsgan probe``) per arm, over seeds.

For each probe column (accuracy first) and perturbation: per arm, the mean over seeds with the
half-width of its 95 % t-interval, and the relative change against the same arm on the images
as they are (``value / value_as_they_are - 1``, computed per seed, then summarised the same
way). The report's hypothesis is that capsules lose less: every encoder arm after the first
one probed (the reference) is compared with it by the paired difference of the accuracy's
relative change, seed by seed, with the verdict rules of :mod:`.stats`. An arm whose
objective has no encoder shows "n/a" with the probe's reason; an arm without probe.json shows
"not probed".
"""

from __future__ import annotations

from typing import Any

from capsgan_toolkit.compare import stats
from capsgan_toolkit.compare.collect import RunRecord

TITLE = "Spatial structure (the report's hypothesis)"
INTRO = ("The report's motivation: capsules keep spatial structure that CNNs lose. `capsgan probe` measures each "
         "run on the same test images as they are, turned, moved and with their quadrants swapped. Each cell: mean "
         "± half-width of the 95% t-interval over seeds; below it, the relative change against the same arm on "
         "the images as they are (per seed, then averaged); for the accuracy, each encoder arm after the first is "
         "compared with it by the paired difference of that change (positive: it loses less).")
SHOWN = {"none": "as they are"}
LIMITS = {"acc": (0.0, 1.0), "rec_acc": (0.0, 1.0), "true_class_length": (0.0, 1.0), "rec_mse01": (0.0, 1.0),
          "rec_ssim": (-1.0, 1.0)}
"""The range of each probe column's mean (a capsule's length is squashed into [0, 1]); intervals stay inside."""


def build(arms: dict[str, list[RunRecord]]) -> dict[str, Any] | None:
    """Return the section's numbers (compare.json's ``probe``), or ``None`` when no run was probed."""
    probes = [r.probe for runs in arms.values() for r in runs if r.probe is not None and "columns" in r.probe]
    if not probes:
        return None
    perturbations = list(dict.fromkeys(row["probe"] for probe in probes for row in probe["rows"]))
    columns: dict[str, dict] = {}
    for probe in probes:
        for name, info in probe["columns"].items():
            columns.setdefault(name, info)
    section: dict[str, Any] = {"title": TITLE, "images": sorted({probe.get("images") for probe in probes}),
                               "perturbations": perturbations, "columns": columns, "arms": {}, "reference": None,
                               "paired": {}}
    for arm, runs in arms.items():
        section["arms"][arm] = _arm(runs, perturbations, columns)
    measured = [a for a, s in section["arms"].items() if s["status"] == "measured" and "acc" in s["values"]]
    if measured:
        ref = section["reference"] = measured[0]
        base = section["arms"][ref]["change"]["acc"]
        for arm in measured[1:]:
            change = section["arms"][arm]["change"]["acc"]
            section["paired"][arm] = {p: stats.paired(change[p]["values"], base[p]["values"], "higher")
                                      for p in perturbations if p in change and p in base}
    return section


def _arm(runs: list[RunRecord], perturbations: list[str], columns: dict[str, dict]) -> dict[str, Any]:
    records = [(r.seed, r.probe) for r in runs if r.probe is not None and "columns" in r.probe]  # (seed, probe.json)
    if not records:
        old = any(r.probe is not None for r in runs)
        return {"status": "not probed", "reason": "probe.json is from an older capsgan; run `capsgan probe` again"
                if old else "no probe.json; run `capsgan probe RUN_DIR` on its runs"}
    skipped = {c: why for _, probe in records for c, why in (probe.get("skipped") or {}).items()}
    names = [c for c in columns if any(c in probe["columns"] for _, probe in records)]
    if not names:
        return {"status": "n/a", "reason": "; ".join(sorted(set(skipped.values()))) or "nothing measured"}
    values: dict[str, dict] = {}
    change: dict[str, dict] = {}
    for c in names:
        by = {p: {seed: row[c] for seed, probe in records for row in probe["rows"]
                  if row.get("probe") == p and isinstance(row.get(c), (int, float))} for p in perturbations}
        limits = LIMITS.get(c, stats.UNBOUNDED)
        values[c] = {p: stats.summarize(v, limits) for p, v in by.items()}
        clean = by.get("none", {})
        floor = -1.0 if limits[0] >= 0 else -float("inf")  # a non-negative quantity loses at most all of itself
        change[c] = {p: stats.summarize({s: v / clean[s] - 1 for s, v in by[p].items() if clean.get(s)},
                                        (floor, float("inf")))
                     for p in perturbations if p != "none"}
    return {"status": "measured", "seeds": sorted(seed for seed, _ in records), "values": values, "change": change,
            "skipped": {c: why for c, why in skipped.items() if c not in names}}


# ------------------------------------------------------------------ formatting


def _half(s: dict) -> float | None:
    ci = s.get("ci95")
    return (ci[1] - ci[0]) / 2 if ci and ci[1] > ci[0] else None


def _value(s: dict) -> str:
    if s["mean"] is None:
        return "-"
    if s.get("clipped") and s["ci95"]:  # the column's range cut the interval: show both ends
        return f"{s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"
    half = _half(s)
    return f"{s['mean']:.3f}" + (f" ± {half:.3f}" if half is not None else "")


def _change(s: dict) -> str:
    if s["mean"] is None:
        return ""
    half = _half(s)
    return f"{100 * s['mean']:+.1f} %" + (f" ± {100 * half:.1f}" if half is not None else "")


def _paired(cmp: dict, ref: str) -> tuple[str, str]:
    if cmp["mean"] is None:
        return "", ""
    text = f"vs {ref}: Δ {100 * cmp['mean']:+.1f} pts"
    if cmp["ci95_t"]:
        text += f" [{100 * cmp['ci95_t'][0]:+.1f}, {100 * cmp['ci95_t'][1]:+.1f}]"
    return text, cmp["verdict"]


def tables(section: dict[str, Any], columns: list[str] | None = None) -> list[dict[str, Any]]:
    """Return one table per column: ``title``, ``quantity``, ``arms`` and ``rows`` of (perturbation, cells), each
    cell a list of (text, verdict) lines; verdicts are "" except on the paired comparison lines."""
    arms, ref = list(section["arms"]), section["reference"]
    out = []
    for c in columns or list(section["columns"]):
        info = section["columns"][c]
        rows = []
        for p in section["perturbations"]:
            cells = []
            for arm in arms:
                a = section["arms"][arm]
                if a["status"] != "measured" or c not in a["values"]:
                    cells.append([("n/a" if a["status"] != "not probed" else "not probed", "")])
                    continue
                lines = [(_value(a["values"][c][p]), "")]
                if p != "none" and a["change"][c].get(p, {}).get("mean") is not None:
                    lines.append((_change(a["change"][c][p]), ""))
                if c == "acc" and p != "none" and p in section["paired"].get(arm, {}):
                    lines.append(_paired(section["paired"][arm][p], ref))
                cells.append([line for line in lines if line[0]])
            rows.append((SHOWN.get(p, p), cells))
        arrow = {"higher": " ↑", "lower": " ↓"}.get(info.get("direction", ""), "")
        out.append({"column": c, "title": info.get("header", c) + arrow, "quantity": info.get("quantity", ""),
                    "arms": arms, "rows": rows})
    return out


def notes(section: dict[str, Any]) -> list[str]:
    """One line per arm that is not probed or lacks some columns, with the reason."""
    out = []
    for arm, a in section["arms"].items():
        if a["status"] != "measured":
            out.append(f"{arm}: {a['status']}, {a['reason']}.")
        for c, why in (a.get("skipped") or {}).items():
            out.append(f"{arm}: {section['columns'].get(c, {}).get('header', c)} n/a, {why}.")
    if len(section["images"]) > 1:
        out.append(f"The runs were probed on different numbers of test images: {section['images']}.")
    return out


def markdown(section: dict[str, Any], baseline: str) -> list[str]:
    """The section as Markdown lines."""
    images = ", ".join(map(str, section["images"]))
    out = [f"## {TITLE}", "", INTRO + f" Test images per run: {images}.", ""]
    for table in tables(section):
        out += [f"### {table['title']}", "", table["quantity"] + ".", "",
                "| test images | " + " | ".join(f"{a}{' (baseline)' if a == baseline else ''}" for a in table["arms"])
                + " |", "|---|" + "---|" * len(table["arms"])]
        for name, cells in table["rows"]:
            out.append(f"| {name} | " + " | ".join(
                "<br>".join(text + (f" **{verdict}**" if verdict in ("better", "worse") else
                                    f" {verdict}" if verdict else "") for text, verdict in lines)
                for lines in cells) + " |")
        out.append("")
    out += [f"- {line}" for line in notes(section)]
    return out + [""]


def print_terminal(section: dict[str, Any], console) -> None:
    """Print the accuracy table (the hypothesis's headline) and the notes."""
    from rich.table import Table
    from rich.text import Text

    for t in tables(section, [c for c in ("acc",) if c in section["columns"]] or None)[:1]:
        table = Table(title=f"{TITLE}: {t['title']}", title_justify="left", show_lines=True)
        table.add_column("test images", style="bold cyan")
        for arm in t["arms"]:
            table.add_column(arm, justify="right")
        for name, cells in t["rows"]:
            row = [Text(name)]
            for lines in cells:
                text = Text()
                for i, (line, verdict) in enumerate(lines):
                    text.append(("\n" if i else "") + line + (f" {verdict}" if verdict else ""),
                                style={"better": "green", "worse": "red"}.get(verdict, "dim" if i else ""))
                row.append(text)
            table.add_row(*row)
        console.print(table)
    for line in notes(section):
        console.print(Text(line, style="dim"))


def html(section: dict[str, Any], baseline: str) -> str:
    """The section's tables and notes as an HTML fragment (escaped)."""
    from markupsafe import escape

    parts = [f"<p>{escape(INTRO)} Test images per run: {escape(', '.join(map(str, section['images'])))}.</p>"]
    for table in tables(section):
        parts.append(f"<h3>{escape(table['title'])}</h3><p><small>{escape(table['quantity'])}.</small></p>")
        head = "".join(f"<th>{escape(a)}{' (baseline)' if a == baseline else ''}</th>" for a in table["arms"])
        parts.append(f"<table class=\"probe\"><tr><th>test images</th>{head}</tr>")
        for name, cells in table["rows"]:
            tds = "".join("<td>" + "".join(
                (f"<span class=\"diff {({'better': 'better', 'worse': 'worse'}).get(verdict, 'undecided')}\">"
                 f"{escape(text)} {escape(verdict)}</span>" if i else f"{escape(text)}")
                for i, (text, verdict) in enumerate(lines)) + "</td>" for lines in cells)
            parts.append(f"<tr><td>{escape(name)}</td>{tds}</tr>")
        parts.append("</table>")
    if notes(section):
        parts.append("<ul>" + "".join(f"<li>{escape(line)}</li>" for line in notes(section)) + "</ul>")
    return "\n".join(parts)
