"""The benchmark scripts that docs quote still run (tiny sizes; the numbers themselves are theirs to print)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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


def test_decoder_steps_trains_and_draws_its_picture(tmp_path):
    picture = tmp_path / "ae.png"
    out = _run(str(ROOT / "benchmarks" / "decoder_steps.py"), str(ROOT / "recipes" / "quickstart.toml"),
               "--steps", "3", "--set", "data.num_train=200", "--set", "data.num_test=40", "--margin",
               "--out", str(picture), cwd=tmp_path)
    mse = float(re.search(r"test MSE (\d+\.\d+) on 40 images", out).group(1))
    assert 0.0 < mse < 1.0  # [0, 1] pixel units
    assert "MSE + classification, 3 steps of 32" in out
    assert picture.stat().st_size > 0 and picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
