"""`capsgan eval` and `capsgan sample` on a tiny run, periodic evaluation during training, offline errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import TINY_RECIPE, invoke, write_toml
from PIL import Image

from capsgan_toolkit.recipe.schema import resolve
from capsgan_toolkit.rundir.checkpoint import load_checkpoint
from capsgan_toolkit.rundir.reporting import read_metrics
from capsgan_toolkit.training.trainer import Trainer

DOMAIN = {"plugin": "domain_classifier", "epochs": 1, "channels": 8, "feature_dim": 16, "batch_size": 16}


def _eval_recipe(cache) -> dict:
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["eval"] = {"every_epochs": 1, "num_images": 32, "cache_dir": str(cache), "prior_images": 0,
                      "features": {"domain": dict(DOMAIN)}}
    return recipe


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A two-epoch tiny run with evaluation after each epoch."""
    root = tmp_path_factory.mktemp("evalrun")
    recipe = write_toml(root / "tiny.toml", _eval_recipe(root / "cache"))
    result = invoke("run", recipe, "--out", root / "run", "--quiet")
    assert result.exit_code == 0, result.output
    return root / "run"


def test_periodic_evaluation_logs_rows_and_leaves_training_unchanged(tiny_run, plugins, tmp_path):
    rows = read_metrics(tiny_run / "metrics.jsonl")
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1]
    for key in ("acc32_test", "rec_mse32_test", "rec_fid32_test_domain", "gen_fid32_test_domain",
                "gen_kid32_test_domain", "gen_is32_domain", "gen_condacc32_domain", "rec_acc32_test_domain"):
        assert key in evals[-1], key
    protocol = json.loads((tiny_run / "eval_protocol.json").read_text())
    assert protocol["protocol"]["gen_fid32_test_domain"]["num_reference"] == 32
    assert (tiny_run / "curves.png").is_file()

    # The same recipe without [eval] trains to the very same weights: evaluation draws no shared randomness.
    plain = resolve(copy.deepcopy(TINY_RECIPE), plugins.registry)
    (tmp_path / "checkpoints").mkdir()
    Trainer(plain, plugins, tmp_path).fit()
    assert not [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    with_eval = load_checkpoint(tiny_run / "checkpoints" / "final.pt")["models"]
    without = load_checkpoint(tmp_path / "checkpoints" / "final.pt")["models"]
    for name in ("encoder", "generator", "discriminator"):
        for key, value in without[name].items():
            assert torch.equal(value, with_eval[name][key]), f"{name}.{key}"


def test_evaluation_leaves_the_random_state_alone(tiny_run):
    from capsgan_toolkit.api import load_trained

    run = load_trained(tiny_run, device="cpu")
    before = torch.get_rng_state()
    report = run.evaluator().run(["acc", "rec", "gen_fid"], num_images=16)
    assert torch.equal(torch.get_rng_state(), before)
    assert set(report.metrics) >= {"acc32_test", "rec_mse16_test", "gen_fid16_test_domain"}


def test_eval_writes_every_number_with_its_protocol(tiny_run):
    result = invoke("eval", tiny_run)
    assert result.exit_code == 0, result.output
    report = json.loads((tiny_run / "eval.json").read_text())
    metrics, protocol = report["metrics"], report["protocol"]
    assert set(metrics) == {"acc32_test", "rec_mse32_test", "rec_psnr32_test", "rec_ssim32_test",
                            "rec_fid32_test_domain", "gen_fid32_test_domain", "gen_kid32_test_domain",
                            "gen_is32_domain", "gen_condacc32_domain", "rec_acc32_test_domain"}
    for name in metrics:
        assert name in result.output
    # rec_acc, the ceiling of gen_condacc (the same judge on reconstructions), sits beside it, and is read against it.
    output = " ".join(result.output.split())
    rows = [line for line in result.output.splitlines() if "_domain" in line and "│" in line]
    assert sum("rec_acc32" in line for line in rows) == 1, result.output
    assert [i for i, line in enumerate(rows) if "rec_acc32" in line] == [i + 1 for i, line in enumerate(rows)
                                                                         if "gen_condacc32" in line]
    assert (f"gen_condacc32_domain {metrics['gen_condacc32_domain']:.3f} against its ceiling rec_acc32_test_domain "
            f"{metrics['rec_acc32_test_domain']:.3f}") in output
    judge = protocol["rec_acc32_test_domain"]["feature_extractor"]
    assert judge == protocol["gen_condacc32_domain"]["feature_extractor"] and "blurred with sigma 1 / 2 px: " in judge
    assert f"features domain: {judge}" in output  # the judge's clean and blurred accuracy, shown
    for name in ("rec_fid32_test_domain", "gen_fid32_test_domain", "gen_kid32_test_domain"):
        entry = protocol[name]
        assert entry["num_generated"] == entry["num_reference"] == 32 and entry["reference_split"] == "test"
        assert entry["feature_extractor"].startswith("domain_classifier (weights sha256")
        assert metrics[name] >= -1e-6
    assert "std" in protocol["gen_kid32_test_domain"] and "std" in protocol["gen_is32_domain"]
    assert 1.0 - 1e-6 <= metrics["gen_is32_domain"] <= 10 + 1e-6
    assert 0 <= metrics["acc32_test"] <= 1 and 0 <= metrics["gen_condacc32_domain"] <= 1
    assert 0 <= metrics["rec_acc32_test_domain"] <= 1
    assert report["step"] == 6 and report["checkpoint"].endswith("final.pt")

    # Cross-checks against the trainer's own end-of-run numbers (same weights, same 32 test images).
    last = [r for r in read_metrics(tiny_run / "metrics.jsonl") if r["kind"] == "epoch"][-1]
    assert metrics["acc32_test"] == pytest.approx(last["test_acc"])
    assert metrics["rec_mse32_test"] == pytest.approx(last["test_rec_mse01"], rel=1e-4)  # one definition, one unit


def test_eval_options_choose_metrics_and_counts(tiny_run, tmp_path):
    out = tmp_path / "small.json"
    result = invoke("eval", tiny_run, "--metrics", "acc,rec", "--num-images", 16, "--out", out)
    assert result.exit_code == 0, result.output
    assert set(json.loads(out.read_text())["metrics"]) == {"acc32_test", "rec_mse16_test", "rec_psnr16_test",
                                                           "rec_ssim16_test"}

    result = invoke("eval", tiny_run, "--metrics", "gen_fidd")
    assert result.exit_code == 2 and "unknown metric 'gen_fidd'" in result.output and "gen_fid" in result.output
    result = invoke("eval", tiny_run, "--set", "run.epochs=3")
    assert result.exit_code == 2 and "only eval.* keys" in result.output
    result = invoke("eval", tiny_run, "--inception-weights", tmp_path / "missing.pth")
    assert result.exit_code == 2 and "missing.pth" in result.output and "does not exist" in result.output
    result = invoke("eval", tmp_path / "nowhere")
    assert result.exit_code == 2 and "not a run folder" in result.output


@pytest.mark.slow
def test_eval_adds_inception_scores_with_a_weights_file(tiny_run, tmp_path):
    """Plumbing only (random Inception weights): --inception-weights adds scores labelled 'inception'."""
    from helpers import random_inception_weights

    weights = random_inception_weights(tmp_path / "inception.pth")
    out = tmp_path / "inception.json"
    result = invoke("eval", tiny_run, "--metrics", "gen_fid,gen_is", "--num-images", 10,
                    "--inception-weights", weights, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert {"gen_fid10_test_inception", "gen_is10_inception", "gen_fid10_test_domain"} <= set(report["metrics"])
    assert "inception-v3-compat" in report["protocol"]["gen_fid10_test_inception"]["feature_extractor"]


def test_sample_writes_new_images_reconstructions_and_traversals(tiny_run, tmp_path):
    result = invoke("sample", tiny_run, "--n", 20, "--out", tmp_path / "all")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "all").iterdir())
    assert names == ["generated.png", "reconstructions.png"] + [f"traversal_class{k}.png" for k in range(10)]
    # New images: one labelled row per class, 2 each, glyphs of 28 px enlarged 3x (cells of 84 px + 2 padding)
    # after a label margin; traversals are D=4 rows of 11 steps per image (2), 28 px with 2-pixel padding.
    width, height = Image.open(tmp_path / "all" / "generated.png").size
    assert height == 10 * 86 + 2 and width > 2 * 86 + 2
    top_left = Image.open(tmp_path / "all" / "generated.png").convert("L").crop((0, 0, width - 2 * 86 - 2, 86))
    assert min(top_left.getextrema()) < 128  # the row's label is written in the margin
    assert Image.open(tmp_path / "all" / "traversal_class0.png").size == (11 * 30 + 2, 8 * 30 + 2)
    # 16 of the 20 pairs: whole rows of 8, real images above their reconstructions.
    assert Image.open(tmp_path / "all" / "reconstructions.png").size == (8 * 30 + 2, 4 * 30 + 2)

    result = invoke("sample", tiny_run, "--n", 4, "--class", 3, "--steps", 5, "--out", tmp_path / "three")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "three").iterdir()) == [
        "generated_class3.png", "reconstructions_class3.png", "traversal_class3.png"]
    width, height = Image.open(tmp_path / "three" / "generated_class3.png").size
    assert height == 86 + 2 and width > 4 * 86  # one row of the 4 images of class 3
    result = invoke("sample", tiny_run, "--class", 10)
    assert result.exit_code == 2 and "classes 0 to 9" in result.output


def test_run_refuses_inception_metrics_offline_before_training(monkeypatch, tmp_path):
    from helpers import offline

    offline(monkeypatch, tmp_path)
    recipe = _eval_recipe(tmp_path / "cache")
    recipe["eval"]["features"]["inception"] = {"plugin": "inception"}
    path = write_toml(tmp_path / "inception.toml", recipe)
    result = invoke("run", path, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "weights-inception-2015-12-05-6726825d.pth" in text and "--inception-weights" in text
    assert not list((tmp_path / "run" / "checkpoints").glob("*.pt"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
