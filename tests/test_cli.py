"""The command line end to end: plugins, validate, run (the quickstart, a few steps), errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import invoke, write_toml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--set", "run.epochs=2", "--set", "run.steps_per_epoch=3", "--set", "run.log_every=1",
        "--set", "data.num_train=256", "--set", "data.num_test=64", "--set", "run.eval_batches=1"]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "qs"
    result = invoke("run", ROOT / "recipes" / "quickstart.toml", "--out", out, "--quiet", *FAST)
    assert result.exit_code == 0, result.output
    return out


def test_plugins_lists_every_family_with_sources_and_params():
    result = invoke("plugins")
    assert result.exit_code == 0
    for family in ("objective", "encoder", "generator", "discriminator", "classification_loss", "reconstruction_loss",
                   "adversarial_loss", "gate", "dataset", "metric_features"):
        assert family in result.output
    for name in ("reconstruction_gan", "classifier", "capsnet", "cnn", "dcgan", "margin", "minimax", "accuracy_band",
                 "glyphs", "mnist", "domain_classifier"):
        assert name in result.output
    assert "builtin_gates" in result.output and "warmup_epochs" in result.output


def test_validate_prints_the_resolved_recipe():
    result = invoke("validate", ROOT / "recipes" / "quickstart.toml", "--set", "run.epochs=9")
    assert result.exit_code == 0
    assert "epochs = 9" in result.output and "discriminator_max_disc_acc" in result.output


def test_quickstart_run_folder_has_everything(quickstart_run):
    out = quickstart_run
    for name in ("recipe.toml", "metrics.jsonl", "curves.png", "summary.json",
                 "samples/epoch_001.png", "samples/epoch_002.png", "checkpoints/final.pt"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7))
    for key in ("epoch", "step", "loss_classification", "encoder_acc", "disc_acc", "gate", "images_per_s"):
        assert key in train[-1], key
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [0, 1]
    with Image.open(out / "curves.png") as img:
        assert img.size[0] > 500
    with Image.open(out / "samples" / "epoch_002.png") as img:
        assert img.size[0] > 100
    with Image.open(out / "traversal.png") as img:  # 2 images x 16 capsule dims rows, 11 steps
        assert img.size == (11 * 34 + 2, 2 * 16 * 34 + 2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and 0.0 <= summary["test_acc"] <= 1.0


def test_existing_run_folder_is_refused_then_overwritten_on_request(quickstart_run, tmp_path):
    out = tmp_path / "again"
    assert invoke("run", ROOT / "recipes" / "quickstart_cnn.toml", "--out", out, "--quiet", *FAST).exit_code == 0
    before = (out / "metrics.jsonl").read_bytes()
    result = invoke("run", ROOT / "recipes" / "quickstart_cnn.toml", "--out", out, "--quiet", *FAST)
    assert result.exit_code == 2
    assert "exists already" in result.output and "--resume" in result.output and "--overwrite" in result.output
    assert (out / "metrics.jsonl").read_bytes() == before  # nothing lost
    result = invoke("run", ROOT / "recipes" / "quickstart_cnn.toml", "--out", out, "--quiet", "--overwrite", *FAST)
    assert result.exit_code == 0


def test_resume_continues_a_finished_run_with_more_epochs(tmp_path):
    out = tmp_path / "r"
    assert invoke("run", ROOT / "recipes" / "quickstart_cnn.toml", "--out", out, "--quiet", *FAST).exit_code == 0
    result = invoke("run", "--resume", out, "--quiet", "--set", "run.epochs=3")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == list(range(1, 10))


def test_resume_refuses_a_recipe_that_breaks_the_run(tmp_path):
    out = tmp_path / "r"
    assert invoke("run", ROOT / "recipes" / "quickstart_cnn.toml", "--out", out, "--quiet", *FAST).exit_code == 0
    result = invoke("run", "--resume", out, "--quiet", "--set", "encoder.channels=16")
    assert result.exit_code == 2
    assert "encoder.channels: 32 -> 16" in result.output


def _forget_newer_keys(state: dict) -> None:
    """Make a saved recipe look written before data.rotation and the tracker keys existed."""
    for key in ("mlflow", "wandb", "experiment"):
        del state["recipe"]["output"][key]
    del state["recipe"]["data"]["rotation"]


def test_a_run_saved_before_a_key_existed_resumes_as_that_keys_default(tiny_recipe, tmp_path):
    from capsgan_toolkit.rundir.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "r"
    tiny_recipe["run"]["epochs"] = 1
    assert invoke("run", write_toml(tmp_path / "r.toml", tiny_recipe), "--out", out, "--quiet").exit_code == 0
    final = out / "checkpoints" / "final.pt"
    state = load_checkpoint(final)
    assert state["recipe"]["data"]["rotation"] == 180  # the glyphs' default
    _forget_newer_keys(state)
    save_checkpoint(state, final)
    result = invoke("run", "--resume", out, "--quiet", "--set", "run.epochs=2")
    assert result.exit_code == 0, result.output  # (absent) -> the default is no change
    state = load_checkpoint(final)
    assert state["recipe"]["data"]["rotation"] == 180  # the resumed recipe says it now
    _forget_newer_keys(state)
    save_checkpoint(state, final)
    result = invoke("run", "--resume", out, "--quiet", "--set", "run.epochs=3", "--set", "data.rotation=30")
    assert result.exit_code == 2 and "data.rotation: 180.0 -> 30.0" in result.output, result.output


def test_bad_recipe_exits_nonzero_without_traceback(tiny_recipe, tmp_path):
    tiny_recipe["encoder"]["plugin"] = "capsnett"
    path = write_toml(tmp_path / "bad.toml", tiny_recipe)
    proc = subprocess.run([sys.executable, "-m", "capsgan_toolkit", "run", path, "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "encoder.plugin" in proc.stderr and 'Did you mean "capsnet"' in proc.stderr
    assert not (tmp_path / "o").exists()


def test_run_needs_a_recipe_or_resume():
    result = invoke("run")
    assert result.exit_code == 2 and "--resume" in result.output


def test_traversal_sweeps_one_dimension_per_row():
    import torch

    from capsgan_toolkit.interfaces import Encoder, EncoderParams
    from capsgan_toolkit.rundir.reporting import save_traversal

    class FixedEncoder(Encoder):
        def forward(self, images):
            caps = torch.zeros(images.shape[0], 3, 2)
            caps[:, 1] = torch.tensor([0.5, 0.1])  # class 1 predicted
            return caps

    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, latent):
            seen.append(latent.clone())
            return torch.zeros(latent.shape[0], 1, 4, 4)

    enc = FixedEncoder(EncoderParams(), image_shape=(1, 4, 4), num_classes=3)
    save_traversal(enc, Recorder(), torch.zeros(1, 1, 4, 4), Path(__import__("tempfile").mkdtemp()) / "t.png",
                   span=0.2, steps=3)
    latents = seen[0].view(2, 3, 3, 2)  # (dim, step, K, D)
    expected = torch.tensor([-0.2, 0.0, 0.2])
    assert torch.allclose(latents[0, :, 1, 0], 0.5 + expected)  # dim 0 swept
    assert torch.allclose(latents[0, :, 1, 1], torch.full((3,), 0.1))  # dim 1 untouched
    assert torch.allclose(latents[1, :, 1, 1], 0.1 + expected)
    assert torch.count_nonzero(latents[:, :, [0, 2]]) == 0  # other capsules untouched


def test_sample_pairs_keep_each_reconstruction_under_its_image(tmp_path):
    import torch

    from capsgan_toolkit.rundir.reporting import save_pairs

    real = torch.full((10, 1, 2, 2), -1.0)  # black
    recon = torch.full((10, 1, 2, 2), 1.0)  # white
    save_pairs(real, recon, tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as img:
        grid = torch.tensor(__import__("numpy").array(img.convert("L")), dtype=torch.long)
    cell = lambda r, c: grid[2 + r * 4, 2 + c * 4].item()  # noqa: E731 - top-left pixel of cell (r, c)
    assert [cell(0, c) for c in range(8)] == [0] * 8 and [cell(1, c) for c in range(8)] == [255] * 8
    assert [cell(2, c) for c in range(2)] == [0, 0] and [cell(3, c) for c in range(2)] == [255, 255]


def test_resume_latest_continues_the_recipes_default_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = ROOT / "recipes" / "quickstart_cnn.toml"
    assert invoke("run", recipe, "--quiet", *FAST).exit_code == 0
    run_dir = tmp_path / "runs" / "quickstart-cnn"
    assert (run_dir / "checkpoints" / "final.pt").is_file()
    result = invoke("run", recipe, "--resume", "latest", "--quiet", "--set", "run.epochs=3", *FAST[2:])
    assert result.exit_code == 0, result.output
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "epoch"]
    assert epochs == [0, 1, 2]


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                    reason="real Fashion-MNIST files absent: install Debian's dataset-fashion-mnist")
def test_trains_briefly_on_real_fashion_mnist(tmp_path, tiny_recipe):
    tiny_recipe["data"] = {"plugin": "fashion_mnist", "subset": 2048, "batch_size": 32}
    tiny_recipe["encoder"] = {"plugin": "cnn", "channels": 16, "batch_norm": False, "latent": "true_class"}
    tiny_recipe["gate"] = {"plugin": "always"}
    tiny_recipe["run"].update({"epochs": 1, "steps_per_epoch": 60, "log_every": 20, "eval_batches": 8})
    path = write_toml(tmp_path / "fashion.toml", tiny_recipe)
    out = tmp_path / "run"
    result = invoke("run", path, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_acc"] > 0.4  # 10 classes: chance is 0.1
