"""`capsgan compare` end to end: tiny arms trained, evaluated (and probed) and reported through the CLI."""

from __future__ import annotations

import copy
import json
import re

import pytest
from click.testing import CliRunner
from helpers import TINY_RECIPE, write_toml

from capsgan_toolkit.cli.compare import compare_command
from capsgan_toolkit.rundir.folder import RunDir

SPEC = """
title = "tiny end-to-end"
baseline = "dcgan"
seeds = 2
[budget]
epochs = 2
[eval]
metrics = ["acc", "rec", "gen_fid", "gen_condacc"]
num_images = 32
features = { domain = { plugin = "domain_classifier", epochs = 1, channels = 8, feature_dim = 16 } }
[[arms]]
label = "dcgan"
recipe = "tiny_dcgan.toml"
[[arms]]
label = "cnn"
recipe = "tiny.toml"
"""


def _tiny_dcgan() -> dict:
    recipe = copy.deepcopy(TINY_RECIPE)
    del recipe["encoder"]
    recipe["objective"] = {"plugin": "dcgan", "latent_rows": 10, "latent_dim": 4, "conditional": True}
    recipe["losses"] = {"adversarial": {"plugin": "nonsaturating"}}
    recipe["optim"] = {"generator": {"lr": 1e-3}, "discriminator": {"lr": 1e-3}}
    recipe["gate"] = {"plugin": "always"}
    return recipe


@pytest.mark.slow
def test_compare_trains_reports_reuses_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSGAN_CACHE", str(tmp_path / "cache"))  # the domain classifier is trained once, here
    write_toml(tmp_path / "tiny.toml", TINY_RECIPE)
    write_toml(tmp_path / "tiny_dcgan.toml", _tiny_dcgan())
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC, encoding="utf-8")
    out = tmp_path / "cmp"
    args = [str(spec), "--out", str(out), "--jobs", "2", "--devices", "cpu"]

    result = CliRunner().invoke(compare_command, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output + "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    assert "4 to do" in result.output
    for name in ("compare.json", "compare.md", "compare.html"):
        assert (out / name).is_file(), name
    report = json.loads((out / "compare.json").read_text())
    assert [a["label"] for a in report["arms"]] == ["dcgan", "cnn"] and report["seeds"] == [0, 1]
    names = {m["name"] for m in report["metrics"]}
    assert {"gen_fid32_test_domain", "gen_condacc32_domain", "acc32_test"} <= names
    fid = next(m for m in report["metrics"] if m["name"] == "gen_fid32_test_domain")
    assert set(fid["arms"]) == {"dcgan", "cnn"} and fid["vs_baseline"]["cnn"]["n"] == 2
    acc = next(m for m in report["metrics"] if m["name"] == "acc32_test")
    assert set(acc["arms"]) == {"cnn"}  # the DCGAN has no encoder
    costs = {c["name"] for c in report["costs"]}
    assert {"parameters.generator", "flops_per_image.generator", "images_per_s", "peak_memory_bytes"} <= costs
    assert all(d["status"] in ("meant", "other") for d in report["fairness"]["differences"])
    # The contrast (no question: the arms differ in more than [encoder]), its floors and the headline first.
    assert [(c["a"], c["b"], c["question"]) for c in report["contrasts"]] == [("cnn", "dcgan", False)]
    floors = report["floors"]
    assert floors["data"]["num_classes"] == 10 and floors["data"]["mean_image_mse"]["rec_mse32_test"] > 0
    assert {c["floor"] for c in floors["arms"]["cnn"]["checks"]} == {"acc", "gen_condacc", "rec_mse", "gen_fid"}
    assert all(c["passed"] is not None for s in floors["arms"].values() for c in s["checks"])
    # The untrained generators' FIDs: measured once per arm (seed 0) and kept for the next report.
    assert {a: (u["seed"], u["reused"]) for a, u in floors["untrained_fid"].items()} == {
        "dcgan": (0, False), "cnn": (0, False)}
    assert all(u["fid"]["gen_fid32_test_domain"] > 0 for u in floors["untrained_fid"].values())
    assert len(json.loads((out / "untrained_fid.json").read_text())["entries"]) == 2
    assert floors["arms"]["dcgan"]["status"] in ("learned", "did not learn")
    md = (out / "compare.md").read_text()
    assert next(line for line in md.splitlines() if line.startswith("## ")) == "## Headline"
    assert "**cnn vs dcgan (the recipes differ in" in md
    runs = {(arm, seed): RunDir(out / "runs" / arm / f"seed-{seed}") for arm in ("dcgan", "cnn") for seed in (0, 1)}
    assert all(rd.is_finished() and rd.read_eval() for rd in runs.values())
    assert runs["cnn", 1].read_recipe()["run"]["seed"] == 1

    # A re-run trains and evaluates nothing.
    stamps = {key: (rd.checkpoints_dir / "final.pt").stat().st_mtime_ns for key, rd in runs.items()}
    evals = {key: rd.eval_file.stat().st_mtime_ns for key, rd in runs.items()}
    result = CliRunner().invoke(compare_command, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "4 done, 0 to do" in result.output and "Measuring the FID" not in result.output
    again = json.loads((out / "compare.json").read_text())["floors"]
    assert all(u["reused"] for u in again["untrained_fid"].values()) and again["arms"] == floors["arms"]
    assert stamps == {key: (rd.checkpoints_dir / "final.pt").stat().st_mtime_ns for key, rd in runs.items()}
    assert evals == {key: rd.eval_file.stat().st_mtime_ns for key, rd in runs.items()}

    # Killed after its first epoch: the re-run resumes it from the epoch-1 checkpoint, to the same numbers.
    rd = runs["cnn", 1]
    before = rd.read_eval()["metrics"]
    for name in ("final.pt",):
        (rd.checkpoints_dir / name).unlink()
    for path in rd.checkpoints_dir.glob("step_*.pt"):
        if path.name != "step_000000003.pt":
            path.unlink()
    rd.summary_file.unlink()
    rd.eval_file.unlink()
    result = CliRunner().invoke(compare_command, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "3 done, 1 to do" in result.output
    assert rd.read_eval()["metrics"] == pytest.approx(before, rel=1e-6, abs=1e-9)


PROBE_SPEC = """
title = "tiny probe"
baseline = "dcgan"
seeds = 1
probe = true
probe_images = 20
[budget]
epochs = 1
[eval]
metrics = ["acc"]
[[arms]]
label = "dcgan"
recipe = "tiny_dcgan.toml"
[[arms]]
label = "cnn"
recipe = "tiny.toml"
"""


def test_compare_with_probe_shows_the_spatial_structure_section(tmp_path):
    write_toml(tmp_path / "tiny.toml", TINY_RECIPE)
    write_toml(tmp_path / "tiny_dcgan.toml", _tiny_dcgan())
    spec = tmp_path / "spec.toml"
    spec.write_text(PROBE_SPEC, encoding="utf-8")
    out = tmp_path / "cmp"
    result = CliRunner().invoke(compare_command, [str(spec), "--out", str(out), "--in-process"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for arm in ("dcgan", "cnn"):
        assert RunDir(out / "runs" / arm / "seed-0").probe_file.is_file()
    section = json.loads((out / "compare.json").read_text())["probe"]
    assert section["arms"]["dcgan"] == {"status": "n/a", "reason": "the dcgan objective has no encoder"}
    cnn = section["arms"]["cnn"]
    assert cnn["status"] == "measured" and set(cnn["values"]) == {"acc", "true_class_length", "rec_ssim", "rec_acc",
                                                                  "rec_mse01"}
    assert all(0 <= cnn["values"]["acc"][p]["mean"] <= 1 for p in section["perturbations"])
    md = (out / "compare.md").read_text()
    body = md[md.index("## Spatial structure (the report's hypothesis)"):md.index("## Fairness")]
    row = next(line for line in body.splitlines() if line.startswith("| quadrants swapped |"))
    dcgan_cell, cnn_cell = row.split(" | ")[1:3]
    assert dcgan_cell == "n/a" and re.match(r"\d\.\d{3}", cnn_cell)
    assert "- dcgan: n/a, the dcgan objective has no encoder." in body
    assert 'id="probe"' in (out / "compare.html").read_text()
    # One seed: every contrast says so, and the headline comes first.
    report = json.loads((out / "compare.json").read_text())
    acc = next(m for m in report["metrics"] if m["name"].startswith("acc"))
    assert acc["contrasts"] == {} and report["holm"]["tests"] == 0
    assert md.index("## Headline") < md.index("## Did every arm learn?") < md.index("## Spatial structure")
