"""Tests of ``capsgan bench``: the table, the JSON fields, the baseline's ratios, the data fallback, FLOP counts."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import invoke, tiny_recipe, write_toml

from capsgan_toolkit.evaluation.flops import count_flops
from capsgan_toolkit.tools.bench import cpu_tensor_peak, peak_for, time_each


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    tiny = write_toml(folder / "tiny.toml", tiny_recipe())
    wide = tiny_recipe()
    wide["run"]["name"] = "wide"
    wide["encoder"]["channels"] = 16
    dcgan = tiny_recipe()
    dcgan["run"]["name"] = "tiny-dcgan"
    for key in ("encoder", "losses", "optim", "gate"):
        del dcgan[key]
    dcgan["objective"] = {"plugin": "dcgan", "conditional": True}
    dcgan["losses"] = {"adversarial": {"plugin": "nonsaturating"}}
    dcgan["gate"] = {"plugin": "always"}
    missing = tiny_recipe()
    missing["data"] = {"plugin": "image_folder", "root": str(folder / "no-such-folder"), "batch_size": 8}
    return {"tiny": tiny, "wide": write_toml(folder / "wide.toml", wide), "dcgan": write_toml(folder / "dcgan.toml", dcgan),
            "missing": write_toml(folder / "missing.toml", missing)}


def test_bench_prints_the_table(recipes):
    result = invoke("bench", recipes["tiny"], "--steps", "2", "--warmup", "1")
    assert result.exit_code == 0, result.output
    for label in ("E forward img/s", "G forward img/s", "D forward img/s", "step img/s", "step FLOP/img",
                  "% of matmul rate", "step peak MiB", "matmul reference: float32 2048^3"):
        assert label in result.output, label


def test_bench_json_fields(recipes):
    result = invoke("bench", recipes["tiny"], "--steps", "2", "--warmup", "1", "--batch", "4", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["machine"]["device"] == "cpu" and report["machine"]["cores"] >= 1
    assert report["matmul"]["float32_flops_per_s"] > 0
    (res,) = report["results"]
    assert res["batch"] == 4 and res["steps"] == 2 and res["image_shape"] == [1, 28, 28] and res["classes"] == 10
    assert set(res["parts"]) == {"encoder", "generator", "discriminator"}
    for part in res["parts"].values():
        assert part["images_per_s"] > 0 and part["flops_per_image"] > 0 and part["best_s"] <= part["median_s"]
    step = res["step"]
    for key in ("images_per_s", "flops_per_image", "flops_per_s", "share_of_matmul", "peak_memory_bytes"):
        assert step[key] > 0, key
    # Forward and backward of every part: more than the three forwards together.
    assert step["flops_per_image"] > sum(p["flops_per_image"] for p in res["parts"].values())
    assert "ratios" not in report


def test_bench_baseline_side_by_side_with_ratios(recipes):
    result = invoke("bench", recipes["wide"], "--baseline", recipes["tiny"], "--steps", "1", "--warmup", "0", "--json")
    report = json.loads(result.output)
    wide, tiny = report["results"]
    assert (wide["name"], tiny["name"]) == ("wide", "tiny")
    ratios = report["ratios"]
    assert ratios["encoder_flops_per_image"] == pytest.approx(
        wide["parts"]["encoder"]["flops_per_image"] / tiny["parts"]["encoder"]["flops_per_image"])
    assert ratios["encoder_flops_per_image"] > 1  # twice the channels
    assert ratios["generator_flops_per_image"] == pytest.approx(1.0)
    assert ratios["step_images_per_s"] == pytest.approx(wide["step"]["images_per_s"] / tiny["step"]["images_per_s"])
    table = invoke("bench", recipes["wide"], "--baseline", recipes["tiny"], "--steps", "1", "--warmup", "0")
    assert "ratio" in table.output and "(tiny.toml)" in table.output and "(wide.toml)" in table.output


def test_baseline_set_measures_a_speed_option_against_the_same_recipe(recipes):
    result = invoke("bench", recipes["tiny"], "--set", "speed.channels_last=true", "--baseline-set",
                    "speed.channels_last=false", "--steps", "1", "--warmup", "0", "--json")
    report = json.loads(result.output)
    first, baseline = report["results"]
    assert first["recipe"] == baseline["recipe"] == recipes["tiny"]
    assert first["speed"] == {"channels_last": True} and baseline["speed"] == {}
    assert report["ratios"]["step_images_per_s"] > 0


def test_bench_a_dcgan_objective_without_encoder(recipes):
    # The generator's and discriminator's inputs are recorded during a real step, without
    # changing them: the generator's update must still reach the generator through D.
    report = json.loads(invoke("bench", recipes["dcgan"], "--steps", "1", "--warmup", "0", "--json").output)
    res = report["results"][0]
    assert set(res["parts"]) == {"generator", "discriminator"}
    assert res["parts"]["discriminator"]["flops_per_image"] > 0  # D sees image + class planes
    assert res["step"]["flops_per_image"] > 2 * res["parts"]["generator"]["flops_per_image"]


def test_missing_data_needs_the_shape_then_uses_it(recipes):
    result = invoke("bench", recipes["missing"], "--steps", "1", catch_exceptions=True)
    assert result.exit_code != 0 and "--image-shape" in result.output
    result = invoke("bench", recipes["missing"], "--steps", "1", "--warmup", "0", "--image-shape", "3,32,32",
                    "--classes", "5", "--json")
    report = json.loads(result.output)
    assert report["results"][0]["image_shape"] == [3, 32, 32] and report["results"][0]["classes"] == 5
    assert "could not be built" in report["notes"][0]
    bad = invoke("bench", recipes["missing"], "--image-shape", "3,32", "--classes", "5", catch_exceptions=True)
    assert bad.exit_code != 0 and "C,H,W" in bad.output


@pytest.mark.parametrize("bias", [False, True])
def test_flops_of_a_linear_layer_are_two_per_multiply_add(bias):
    layer = torch.nn.Linear(48, 20, bias=bias)
    x = torch.randn(7, 48)
    assert count_flops(lambda: layer(x)) == 7 * 2 * 48 * 20
    # Forward and backward of a layer whose input needs no gradient: forward + weight gradient.
    assert count_flops(lambda: layer(x).sum().backward()) == 2 * 7 * 2 * 48 * 20


def test_time_each_and_peak_table():
    calls = []
    times = time_each(lambda: calls.append(1), torch.device("cpu"), steps=3, warmup=2)
    assert len(times) == 3 and len(calls) == 5 and min(times) >= 0
    assert peak_for("NVIDIA H100 80GB HBM3")[0] == "H100 SXM"
    assert peak_for("NVIDIA H100 PCIe")[0] == "H100 PCIe"
    assert peak_for("NVIDIA L40S") is None and peak_for("Tesla T4") is None


def test_cpu_tensor_peak_sees_a_temporary():
    def fn():
        big = torch.ones(10 * 2**20 // 4)  # 10 MiB, freed at once
        return float(big.sum())

    peak = cpu_tensor_peak(fn)
    assert peak is None or peak >= 10 * 2**20
