"""TensorBoard logging ([output] tensorboard = true): real event files, read back with tensorboard's own reader."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import tiny_recipe, write_toml

from capsgan_toolkit import api
from capsgan_toolkit.errors import RecipeError
from capsgan_toolkit.plugin.events import EpochEnd, RunEnd, RunStart
from capsgan_toolkit.recipe.schema import resolve

pytest.importorskip("tensorboard", reason='the tensorboard package is not installed (pip install "capsgan-toolkit[test]")')

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from capsgan_plugins import tensorboard_logger  # noqa: E402


def _events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    return acc


def _steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def _recipe(**run) -> dict:
    data = tiny_recipe()
    data["output"]["tensorboard"] = True
    data["run"].update(run)
    return data


def test_training_writes_scalars_samples_and_capsule_histograms(tmp_path):
    api.train(write_toml(tmp_path / "r.toml", _recipe()), out=tmp_path / "run")
    acc = _events(tmp_path / "run")
    tags = acc.Tags()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]

    assert _steps(acc, "train/loss_classification") == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in acc.Scalars("train/loss_classification")] == pytest.approx(
        [r["loss_classification"] for r in train])
    for tag in ("train/encoder_acc", "train/gate_warmup", "train/gate_generator", "train/lr_encoder_generator",
                "train/loss_reconstruction", "epoch/test_acc", "epoch/val_acc", "epoch/test_rec_mse01"):
        assert tag in tags["scalars"], tag
    assert _steps(acc, "train/gate_warmup") == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in acc.Scalars("train/gate_warmup")] == [1, 1, 1, 0, 0, 0]  # warm-up: the first epoch
    assert _steps(acc, "epoch/test_acc") == [3, 6]

    assert tags["images"] == ["samples"]
    images = acc.Images("samples")
    assert [i.step for i in images] == [3, 6] and images[0].width > 0 and images[0].height > 0

    assert {"capsules/capsule_length", "capsules/capsule_length_true_class"} <= set(tags["histograms"])
    lengths = acc.Histograms("capsules/capsule_length")
    assert [h.step for h in lengths] == [3, 6]
    assert lengths[0].histogram_value.num == 4 * 10  # output.sample_images = 4 images x 10 classes
    assert acc.Histograms("capsules/capsule_length_true_class")[0].histogram_value.num == 4
    assert "recipe/text_summary" in tags["tensors"]


def test_a_resumed_run_appends_each_step_once(tmp_path):
    recipe = write_toml(tmp_path / "r.toml", _recipe())
    api.train(recipe, out=tmp_path / "run", sets=["run.epochs=1"])
    api.train(out=tmp_path / "run", resume=True, sets=["run.epochs=2"])
    acc = _events(tmp_path / "run")
    assert _steps(acc, "train/loss_classification") == [1, 2, 3, 4, 5, 6]
    assert _steps(acc, "epoch/test_acc") == [3, 6]
    assert [i.step for i in acc.Images("samples")] == [3, 6]


def _row(step: int, loss: float) -> str:
    return json.dumps({"kind": "train", "epoch": 0, "step": step, "loss_classification": loss}, sort_keys=True) + "\n"


def _start(run_dir: Path, *, resumed: bool, step: int) -> None:
    recipe = {"output": {"tensorboard": True}, "run": {"name": "t"}}
    tensorboard_logger.capsgan_run_start(RunStart(run_dir, recipe, resumed, 0, step))


def test_turned_on_at_a_resume_it_logs_the_earlier_rows_too(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(_row(s, float(s)) for s in range(1, 4)))
    _start(tmp_path, resumed=True, step=3)
    tensorboard_logger.capsgan_run_end(RunEnd(tmp_path, {}))
    assert _steps(_events(tmp_path), "train/loss_classification") == [1, 2, 3]


def test_steps_after_the_resumed_checkpoint_are_purged_and_logged_once(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(_row(s, float(s)) for s in range(1, 6)))
    _start(tmp_path, resumed=False, step=0)
    tensorboard_logger.capsgan_epoch_end(EpochEnd(tmp_path, 0, 5, {"kind": "epoch", "test_acc": 0.5}))
    tensorboard_logger._LOGGERS.pop(str(tmp_path.absolute())).close()  # the process died after step 5
    # The resume from step 3 truncated metrics.jsonl to its checkpoint, then trained steps 4 and 5 again.
    metrics.write_text("".join(_row(s, float(s)) for s in range(1, 4)))
    _start(tmp_path, resumed=True, step=3)
    with open(metrics, "a") as fh:
        fh.write(_row(4, 40.0) + _row(5, 50.0))
    tensorboard_logger.capsgan_run_end(RunEnd(tmp_path, {}))
    acc = _events(tmp_path)
    losses = [(e.step, e.value) for e in acc.Scalars("train/loss_classification")]
    assert losses == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert acc.Scalars("epoch/test_acc") == []  # logged at step 5 by the attempt the resume replaced


def test_a_rollback_rewriting_metrics_hides_the_abandoned_steps(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(_row(s, float(s)) for s in range(1, 6)))
    _start(tmp_path, resumed=False, step=0)
    tensorboard_logger.capsgan_epoch_end(EpochEnd(tmp_path, 0, 5, {"kind": "epoch"}))
    # The divergence guard went back to step 2: metrics.jsonl is rewritten (a new file) and continued.
    rewritten = tmp_path / "metrics.jsonl.tmp"
    rewritten.write_text("".join(_row(s, float(s)) for s in range(1, 3)) + _row(3, 30.0) + _row(4, 40.0))
    rewritten.replace(metrics)
    tensorboard_logger.capsgan_run_end(RunEnd(tmp_path, {}))
    acc = _events(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("train/loss_classification")] == [
        (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_nothing_is_written_when_the_recipe_does_not_ask(tmp_path):
    assert tiny_recipe()["output"].get("tensorboard") is None
    recipe = {"output": {"tensorboard": False}}
    tensorboard_logger.capsgan_run_start(RunStart(tmp_path, recipe, False, 0, 0))
    tensorboard_logger.capsgan_epoch_end(EpochEnd(tmp_path, 0, 3, {"kind": "epoch", "test_acc": 0.5}))
    tensorboard_logger.capsgan_run_end(RunEnd(tmp_path, {}))
    assert not (tmp_path / "tensorboard").exists()


def test_without_the_package_the_recipe_is_refused_before_training(registry, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(RecipeError) as info:
        resolve(_recipe(), registry)
    text = str(info.value)
    assert "output.tensorboard" in text and 'pip install "capsgan-toolkit[tensorboard]"' in text
    resolve(_recipe(), registry, training=False)  # evaluating a trained run needs no tensorboard
    data = _recipe()
    data["output"]["tensorboard"] = False
    resolve(data, registry)
