"""The comparison grid with a stand-in library API: reuse, resume, re-evaluation, shards, refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from helpers import TINY_RECIPE, write_toml

import capsgan_toolkit
from capsgan_toolkit.cli.compare import compare_command
from capsgan_toolkit.compare import untrained
from capsgan_toolkit.compare.runner import device_setup, parse_shard, plan, shard
from capsgan_toolkit.compare.spec import CompareError, load_spec
from capsgan_toolkit.recipe.schema import apply_overrides
from capsgan_toolkit.recipe.toml_io import dumps_toml, read_toml
from capsgan_toolkit.rundir.folder import RunDir


class FakeApi:
    """Writes run folders and eval.json files as the real API does, in no time, and counts calls."""

    def __init__(self):
        self.trained: list[tuple[str, bool]] = []
        self.evaluated: list[str] = []

    def load_recipe(self, path, sets=()):
        data = read_toml(path)
        apply_overrides(data, list(sets))
        return SimpleNamespace(registry=None), SimpleNamespace(to_dict=lambda: copy.deepcopy(data))

    def train(self, recipe, *, out, sets=(), resume=False, **_):
        _, resolved = self.load_recipe(recipe, sets)
        data = resolved.to_dict()
        rd = RunDir(out)
        self.trained.append((f"{rd.path.parent.name}/{rd.path.name}", resume))
        if not resume:
            RunDir.create(rd.path)
        rd.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        rd.recipe_file.write_text(dumps_toml(data) + "\n", encoding="utf-8")
        seed = data["run"]["seed"]
        rows = [{"kind": "train", "epoch": 0, "step": s, "loss_generator": 1.0 / s + seed, "gate_generator": 1.0}
                for s in range(1, 4)]
        rows.append({"kind": "epoch", "epoch": 0, "step": 3, "test_acc": 0.5})
        rd.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (rd.checkpoints_dir / "final.pt").write_bytes(b"x")
        summary = {"epochs": data["run"]["epochs"], "steps": 3, "train_time_s": 1.0 + seed, "images_per_s": 10.0,
                   "peak_memory_bytes": 1000, "device": "cpu", "parameters": {"generator": 10}}
        rd.write_summary(summary)
        return summary

    def evaluate(self, run_dir, *, sets=(), **_):
        rd = RunDir(run_dir)
        self.evaluated.append(f"{rd.path.parent.name}/{rd.path.name}")
        data = rd.read_recipe()
        apply_overrides(data, list(sets))
        channels = data["encoder"]["channels"]
        seed = data["run"]["seed"]
        n = data["eval"]["num_images"]
        result = {"metrics": {f"gen_fid{n}_test_domain": 30.0 - channels + 0.5 * seed},
                  "protocol": {f"gen_fid{n}_test_domain": {"num_generated": n}},
                  "eval": data["eval"], "step": 3}
        rd.write_eval(result)
        return result


@pytest.fixture
def fake_api(monkeypatch):
    api = FakeApi()
    monkeypatch.setattr(capsgan_toolkit, "api", api, raising=False)
    monkeypatch.setitem(__import__("sys").modules, "capsgan_toolkit.api", api)
    # The report's floor "FID below the generator untrained" would build and score the tiny recipe for real.
    monkeypatch.setattr(untrained, "measure", lambda recipe, table, source, log: {"fid": {}, "skipped": {}})
    return api


SPEC = """
title = "tiny"
baseline = "narrow"
seeds = 2
[budget]
epochs = 1
[eval]
metrics = ["gen_fid"]
num_images = 50
[[arms]]
label = "narrow"
recipe = "tiny.toml"
set = ["encoder.channels=4"]
[[arms]]
label = "wide"
recipe = "tiny.toml"
set = ["encoder.channels=8"]
"""


def _spec(tmp_path, text=SPEC) -> Path:
    write_toml(tmp_path / "tiny.toml", TINY_RECIPE)
    path = tmp_path / "spec.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _compare(spec, out, *args):
    return CliRunner().invoke(compare_command, [str(spec), "--out", str(out), "--in-process", *args],
                              env={"COLUMNS": "200"})


def test_grid_trains_evaluates_reports_then_reuses(fake_api, tmp_path):
    spec, out = _spec(tmp_path), tmp_path / "cmp"
    result = _compare(spec, out)
    assert result.exit_code == 0, result.output
    assert sorted(fake_api.trained) == [("narrow/seed-0", False), ("narrow/seed-1", False),
                                        ("wide/seed-0", False), ("wide/seed-1", False)]
    assert len(fake_api.evaluated) == 4
    for arm in ("narrow", "wide"):
        for seed in (0, 1):
            rd = RunDir(out / "runs" / arm / f"seed-{seed}")
            assert rd.is_finished()
            recipe = rd.read_recipe()
            assert recipe["run"]["seed"] == seed and recipe["run"]["name"] == f"{arm}-seed-{seed}"
            assert recipe["run"]["epochs"] == 1 and recipe["eval"]["num_images"] == 50
    report = json.loads((out / "compare.json").read_text())
    fid = report["metrics"][0]
    assert fid["name"] == "gen_fid50_test_domain"
    assert fid["vs_baseline"]["wide"]["differences"] == {"0": -4.0, "1": -4.0}
    # the same -4 on both seeds: two seeds and no spread give no verdict
    assert fid["vs_baseline"]["wide"]["verdict"].startswith("too few seeds (2")
    assert report["budget"] == "1 epochs" and (out / "compare.html").is_file() and (out / "compare.md").is_file()
    assert "wide" in result.output and "too few seeds" in result.output

    fake_api.trained.clear(), fake_api.evaluated.clear()
    result = _compare(spec, out)
    assert result.exit_code == 0, result.output
    assert fake_api.trained == [] and fake_api.evaluated == []  # a re-run does no work
    assert "4 done, 0 to do" in result.output


def test_changed_protocol_reevaluates_only(fake_api, tmp_path):
    spec, out = _spec(tmp_path), tmp_path / "cmp"
    assert _compare(spec, out).exit_code == 0
    fake_api.trained.clear(), fake_api.evaluated.clear()
    spec.write_text(SPEC.replace("num_images = 50", "num_images = 60"), encoding="utf-8")
    result = _compare(spec, out)
    assert result.exit_code == 0, result.output
    assert fake_api.trained == [] and len(fake_api.evaluated) == 4
    report = json.loads((out / "compare.json").read_text())
    assert [m["name"] for m in report["metrics"]] == ["gen_fid60_test_domain"]


def test_unfinished_runs_resume(fake_api, tmp_path):
    spec, out = _spec(tmp_path), tmp_path / "cmp"
    assert _compare(spec, out).exit_code == 0
    fake_api.trained.clear(), fake_api.evaluated.clear()
    rd = RunDir(out / "runs" / "wide" / "seed-1")
    rd.summary_file.unlink()  # as if killed before the end
    (rd.checkpoints_dir / "final.pt").unlink()
    rd.eval_file.unlink()
    result = _compare(spec, out)
    assert result.exit_code == 0, result.output
    assert fake_api.trained == [("wide/seed-1", True)] and fake_api.evaluated == ["wide/seed-1"]


def test_shards_split_the_grid_and_a_plain_run_merges(fake_api, tmp_path):
    spec, out = _spec(tmp_path), tmp_path / "cmp"
    result = _compare(spec, out, "--shard", "1/2")
    assert result.exit_code == 0, result.output
    assert sorted(fake_api.evaluated) == ["narrow/seed-0", "wide/seed-0"]
    assert not (out / "compare.json").exists() and "without --shard" in result.output
    result = _compare(spec, out, "--shard", "2/2")
    assert result.exit_code == 0, result.output
    assert sorted(fake_api.evaluated) == ["narrow/seed-0", "narrow/seed-1", "wide/seed-0", "wide/seed-1"]
    fake_api.trained.clear()
    result = _compare(spec, out)
    assert result.exit_code == 0, result.output
    assert fake_api.trained == [] and (out / "compare.json").is_file()


def test_report_refused_while_runs_are_missing(fake_api, tmp_path, monkeypatch):
    spec, out = _spec(tmp_path), tmp_path / "cmp"
    assert _compare(spec, out, "--shard", "1/2").exit_code == 0
    from capsgan_toolkit.compare.runner import Runner

    loaded = load_spec(spec)
    runner = Runner(loaded, out, arms=loaded.spec.selected(), allow=[])
    runner.resolve()
    with pytest.raises(CompareError, match="Not every run is finished"):
        runner.write_report()


def test_unfair_arms_are_refused_before_training(fake_api, tmp_path):
    text = SPEC.replace('set = ["encoder.channels=8"]', 'set = ["encoder.channels=8", "data.batch_size=16"]')
    spec, out = _spec(tmp_path, text), tmp_path / "cmp"
    result = _compare(spec, out)
    assert result.exit_code == 2
    assert "data.batch_size: narrow 8, wide 16" in result.output
    assert fake_api.trained == [] and not (out / "runs").exists()
    # Allowed, the arms train; but 3 steps of 8 and 3 steps of 16 are not the same training images: once the runs
    # have finished, their summary.json says so and the report is refused until that is allowed too.
    result = _compare(spec, out, "--allow-difference", "data.batch_size")
    assert result.exit_code == 2 and len(fake_api.trained) == 4
    assert "trained.images: narrow 24, wide 48" in result.output and "--allow-difference steps" in result.output
    assert not (out / "compare.json").exists()
    result = _compare(spec, out, "--allow-difference", "data.batch_size", "--allow-difference", "steps")
    assert result.exit_code == 0, result.output
    assert "CONFOUND data.batch_size" in result.output and "CONFOUND trained.images" in result.output
    # The spec can allow them too.
    spec.write_text('allow_difference = ["data.batch_size", "images"]\n' + text, encoding="utf-8")
    assert _compare(spec, tmp_path / "cmp2").exit_code == 0


def test_a_changed_recipe_is_not_silently_reused(fake_api, tmp_path):
    spec, out = _spec(tmp_path), tmp_path / "cmp"
    assert _compare(spec, out).exit_code == 0
    fake_api.trained.clear()
    spec.write_text(SPEC.replace("epochs = 1", "epochs = 2"), encoding="utf-8")
    result = _compare(spec, out)
    assert result.exit_code == 2 and "run.epochs: 1 -> 2" in result.output
    assert fake_api.trained == []


def test_arm_selection(fake_api, tmp_path):
    text = SPEC + '\n[[arms]]\nlabel = "extra"\nrecipe = "tiny.toml"\noptional = true\nset = ["encoder.channels=6"]\n'
    spec, out = _spec(tmp_path, text), tmp_path / "cmp"
    assert _compare(spec, out).exit_code == 0
    assert {p.name for p in (out / "runs").iterdir()} == {"narrow", "wide"}
    assert _compare(spec, out, "--arm", "extra").exit_code == 0
    assert {p.name for p in (out / "runs").iterdir()} == {"narrow", "wide", "extra"}
    report = json.loads((out / "compare.json").read_text())
    assert [a["label"] for a in report["arms"]] == ["narrow", "extra"]
    result = _compare(spec, out, "--arm", "nope")
    assert result.exit_code == 2 and "no such arm" in result.output


@pytest.fixture
def fake_probe(monkeypatch):
    """Stand in for `capsgan probe`: writes probe.json as the real one does (accuracy only) and counts calls."""
    import capsgan_toolkit.tools.probe as probe_module

    probed: list[str] = []

    def write_probe(run_dir, *, n=1000, **_):
        rd = RunDir(run_dir)
        probed.append(f"{rd.path.parent.name}/{rd.path.name}")
        seed = rd.read_recipe()["run"]["seed"]
        rows = [{"probe": "none", "images": n, "acc": 0.8}, {"probe": "rotate 30", "images": n, "acc": 0.4 + 0.1 * seed}]
        rd.probe_file.write_text(json.dumps({"checkpoint": "final.pt", "step": 3, "n": n, "images": n,
                                             "columns": {"acc": probe_module.COLUMNS["acc"]}, "skipped": {},
                                             "rows": rows}), encoding="utf-8")

    monkeypatch.setattr(probe_module, "write_probe", write_probe)
    return probed


def test_probe_runs_once_per_run_and_again_only_when_asked_differently(fake_api, fake_probe, tmp_path):
    spec, out = _spec(tmp_path), tmp_path / "cmp"
    assert _compare(spec, out).exit_code == 0
    assert fake_probe == [] and json.loads((out / "compare.json").read_text())["probe"] is None
    # Turned on for finished runs: they are probed, not trained or evaluated again.
    fake_api.trained.clear(), fake_api.evaluated.clear()
    spec.write_text("probe = true\nprobe_images = 40\n" + SPEC, encoding="utf-8")
    result = _compare(spec, out)
    assert result.exit_code == 0, result.output
    assert fake_api.trained == [] and fake_api.evaluated == [] and len(fake_probe) == 4
    section = json.loads((out / "compare.json").read_text())["probe"]
    assert section["images"] == [40] and section["reference"] == "narrow"
    assert section["arms"]["wide"]["change"]["acc"]["rotate 30"]["values"] == {"0": pytest.approx(-0.5),
                                                                                "1": pytest.approx(-0.375)}
    assert "## Spatial structure (the report's hypothesis)" in (out / "compare.md").read_text()
    # A re-run does nothing; another image count probes again; a lost probe.json is probed alone.
    fake_probe.clear()
    assert _compare(spec, out).exit_code == 0 and fake_probe == []
    spec.write_text("probe = true\nprobe_images = 50\n" + SPEC, encoding="utf-8")
    assert _compare(spec, out).exit_code == 0 and len(fake_probe) == 4
    fake_probe.clear()
    RunDir(out / "runs" / "wide" / "seed-1").probe_file.unlink()
    result = _compare(spec, out)
    assert result.exit_code == 0 and fake_probe == ["wide/seed-1"] and "3 done, 1 to do" in result.output
    assert fake_api.trained == [] and fake_api.evaluated == []


def test_plan_shard_and_devices(tmp_path):
    loaded = load_spec(_spec(tmp_path, SPEC.replace("seeds = 2", "seeds = [3, 1, 2]")))
    jobs = plan(loaded, tmp_path / "o", loaded.spec.arms)
    assert [j.name for j in jobs] == ["narrow/seed-1", "narrow/seed-2", "narrow/seed-3",
                                      "wide/seed-1", "wide/seed-2", "wide/seed-3"]
    parts = [shard(jobs, (k, 4)) for k in range(1, 5)]
    assert sorted(j.name for p in parts for j in p) == sorted(j.name for j in jobs)
    assert [j.name for j in parts[0]] == ["narrow/seed-1", "wide/seed-2"]
    assert parse_shard("2/3") == (2, 3)
    for bad in ("0/3", "4/3", "x", "1/0"):
        with pytest.raises(CompareError):
            parse_shard(bad)
    assert device_setup("cuda:1", 2) == (['run.device="cuda"'], {"CUDA_VISIBLE_DEVICES": "1"})
    sets, env = device_setup("cpu", 2)
    assert sets == ['run.device="cpu"'] and int(env["OMP_NUM_THREADS"]) >= 1
    with pytest.raises(CompareError):
        device_setup("tpu", 1)


def test_a_run_trained_before_a_key_existed_is_reused_as_that_keys_default(registry):
    from helpers import tiny_recipe

    from capsgan_toolkit.compare.runner import stale_keys
    from capsgan_toolkit.recipe.schema import resolve, with_defaults

    desired = resolve(tiny_recipe(), registry).to_dict()
    saved = copy.deepcopy(desired)  # as written by a toolkit that had neither key yet
    del saved["data"]["rotation"], saved["output"]["mlflow"]
    assert stale_keys(saved, desired) == ["data.rotation: (absent) -> 180.0", "output.mlflow: (absent) -> False"]
    assert stale_keys(with_defaults(saved, registry), desired) == []
    turned = copy.deepcopy(desired)
    turned["data"]["rotation"] = 30.0
    assert stale_keys(with_defaults(saved, registry), turned) == ["data.rotation: 180.0 -> 30.0"]
    saved["encoder"]["channels"] = 99  # a saved value is kept as it was
    assert stale_keys(with_defaults(saved, registry), desired) == ["encoder.channels: 99 -> 8"]
