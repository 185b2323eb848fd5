"""The benchmark scripts that docs quote still run (tiny sizes; the numbers themselves are theirs to print)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_bench_loading_reads_the_same_tensors_both_ways(tmp_path):
    out = _run(str(ROOT / "benchmarks" / "bench_loading.py"), "--num-train", "300", "--batch", "32",
               "--repeats", "1", cwd=tmp_path)
    assert "same tensors: True" in out
    assert re.search(r"item by item\s+\d+\.\d+ s/epoch", out) and re.search(r"whole batches\s+\d+\.\d+ s/epoch", out)


@pytest.mark.parametrize("decoder", ["recipe", "mlp", "project8", "upsample"])
def test_decoder_steps_trains_and_draws_its_picture(tmp_path, decoder):
    picture = tmp_path / "ae.png"
    out = _run(str(ROOT / "benchmarks" / "decoder_steps.py"), str(ROOT / "recipes" / "quickstart.toml"),
               "--steps", "3", "--set", "data.num_train=200", "--set", "data.num_test=40", "--margin",
               "--decoder", decoder, "--out", str(picture), cwd=tmp_path)
    found = re.search(r"test MSE (\d+\.\d+), SSIM (-?\d+\.\d+) on 40 images", out)
    mse, ssim = float(found.group(1)), float(found.group(2))
    assert 0.0 < mse < 1.0 and -1.0 <= ssim <= 1.0  # [0, 1] pixel units
    batch = tomllib.loads((ROOT / "recipes" / "quickstart.toml").read_text(encoding="utf-8"))["data"]["batch_size"]
    assert f"decoder {decoder}, MSE + classification, 3 steps of {batch}" in out
    assert picture.stat().st_size > 0 and picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_conv_paths_times_both_paths_of_each_convolution(tmp_path):
    out = _run(str(ROOT / "benchmarks" / "bench_conv_paths.py"), str(ROOT / "recipes" / "quickstart.toml"),
               "--repeats", "3", cwd=tmp_path)
    rows = [line.split() for line in out.splitlines() if "quickstart.toml" in line]
    assert [(r[1], r[-4]) for r in rows] == [("conv1", "fwd"), ("conv1", "fwd+bwd"), ("primary", "fwd"),
                                             ("primary", "fwd+bwd")]
    for r in rows:
        gemm, library, ratio = float(r[-3]), float(r[-2]), float(r[-1])
        assert gemm > 0 and library > 0 and abs(ratio - library / gemm) <= 0.1 * ratio + 0.02  # times print rounded


def test_compare_split_times_every_part_of_a_tiny_comparison(tmp_path):
    import copy

    from helpers import TINY_RECIPE, write_toml

    write_toml(tmp_path / "tiny.toml", copy.deepcopy(TINY_RECIPE))
    (tmp_path / "spec.toml").write_text(
        'title = "split"\nbaseline = "a"\nseeds = 1\nprobe = true\nprobe_images = 20\n[budget]\nepochs = 2\n'
        '[eval]\nmetrics = ["acc", "rec"]\nnum_images = 16\n'
        '[[arms]]\nlabel = "a"\nrecipe = "tiny.toml"\n[[arms]]\nlabel = "b"\nrecipe = "tiny.toml"\n'
        'set = ["encoder.channels=12"]\n', encoding="utf-8")
    out = _run(str(ROOT / "benchmarks" / "compare_split.py"), "spec.toml", "--out", str(tmp_path / "cmp"), "--cold",
               cwd=tmp_path)
    assert re.search(r"capsgan compare spec.toml: exit 0, \d+\.\d s; load before [\d.]+ [\d.]+ [\d.]+, after", out)
    for run in ("a-seed-0", "b-seed-0"):  # every part of every worker was timed
        parts = re.search(rf"{run}\s+([\d.]+)s\s+([\d.]+)s\s+([\d.]+)s\s+([\d.]+)s", out)
        assert parts and all(float(v) > 0 for v in parts.groups()), out
    assert re.search(r"everything but training: \d+% of the wall time", out), out
    assert re.search(r"evaluation \+ probe per run: \d+% of training", out), out
