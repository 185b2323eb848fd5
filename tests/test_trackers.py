"""Experiment trackers ([output] mlflow, [output] wandb): real runs, read back with each tracker's own code.

MLflow: a local store in the run folder, read with ``mlflow.search_runs`` and ``MlflowClient``.
Weights & Biases: offline mode; the run's ``.wandb`` file is read record by record with W&B's own
protobuf definitions (``wandb.proto.wandb_internal_pb2``), the records ``wandb sync`` would upload.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import time
from pathlib import Path

import pytest
from helpers import invoke, tiny_recipe, write_toml

from capsgan_toolkit import api
from capsgan_toolkit.errors import RecipeError
from capsgan_toolkit.plugin.events import EpochEnd, RunEnd, RunStart
from capsgan_toolkit.recipe.schema import resolve
from capsgan_toolkit.rundir.trackers import read_state


def _train_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["kind"] == "train"]


def _recipe(**output) -> dict:
    data = tiny_recipe()
    data["output"].update(output)
    data["eval"] = {"metrics": ["acc"], "every_epochs": 1, "num_images": 16}
    return data


# ------------------------------------------------------------------ MLflow

mlflow = pytest.importorskip("mlflow", reason='mlflow is not installed (pip install "capsgan-toolkit[test]")')


def _mlflow_client(run_dir: Path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (run_dir / "mlruns").absolute().as_uri()
    mlflow.set_tracking_uri(uri)
    return mlflow.tracking.MlflowClient(tracking_uri=uri)


def test_a_run_with_mlflow_is_read_back_with_mlflows_own_search(tmp_path, monkeypatch):
    run = tmp_path / "run"
    api.train(write_toml(tmp_path / "r.toml", _recipe(mlflow=True, experiment="glyph-study")), out=run)
    client = _mlflow_client(run, monkeypatch)
    found = mlflow.search_runs(experiment_names=["glyph-study"], output_format="list")
    assert len(found) == 1
    logged = found[0]
    assert logged.info.run_name == "tiny" and logged.info.status == "FINISHED"
    assert read_state(run)["mlflow"]["run_id"] == logged.info.run_id
    params = logged.data.params  # the resolved recipe, one dotted key each
    assert params["optim.encoder_generator.lr"] == "0.001" and params["encoder.plugin"] == "cnn"
    assert params["run.epochs"] == "2" and params["output.mlflow"] == "true"
    # every training row at its step, with its values
    history = client.get_metric_history(logged.info.run_id, "train/loss_classification")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [m.step for m in history] == _train_steps(run) == [1, 2, 3, 4, 5, 6]
    assert [m.value for m in history] == pytest.approx([r["loss_classification"] for r in train])
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "epoch/test_acc")] == [3, 6]
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "eval/acc32_test")] == [3, 6]
    summary = json.loads((run / "summary.json").read_text())
    assert logged.data.metrics["summary/test_acc"] == pytest.approx(summary["test_acc"])
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"recipe.toml", "summary.json", "curves.png", "samples"} <= artifacts
    samples = [a.path for a in client.list_artifacts(logged.info.run_id, "samples")]
    assert len(samples) == 2 and all(p.endswith(".png") for p in samples)

    # `capsgan eval` of the finished run adds its results to the same MLflow run
    result = invoke("eval", run, "--metrics", "acc", "--num-images", 16)
    assert result.exit_code == 0, result.output
    evals = client.get_metric_history(logged.info.run_id, "eval/acc32_test")
    assert [m.step for m in evals] == [3, 6, 6]
    assert evals[-1].value == pytest.approx(json.loads((run / "eval.json").read_text())["metrics"]["acc32_test"])
    assert "eval.json" in {a.path for a in client.list_artifacts(logged.info.run_id)}


def test_a_resumed_run_continues_its_mlflow_run(tmp_path, monkeypatch):
    run = tmp_path / "run"
    recipe = write_toml(tmp_path / "r.toml", _recipe(mlflow=True))
    api.train(recipe, out=run, sets=["run.epochs=1"])
    first = read_state(run)["mlflow"]["run_id"]
    api.train(out=run, resume=True, sets=["run.epochs=2"])
    client = _mlflow_client(run, monkeypatch)
    found = mlflow.search_runs(experiment_names=["capsgan"], output_format="list")
    assert [r.info.run_id for r in found] == [first] and found[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(first, "train/loss_classification")]
    assert steps == [1, 2, 3, 4, 5, 6]  # the resume continued from its checkpoint at step 3: each step once


def test_a_tracker_that_fails_while_training_stops_logging_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    from capsgan_plugins import mlflow_logger

    def broken(self, found):
        raise ConnectionError("tracking server gone")

    monkeypatch.setattr(mlflow_logger.MlflowRun, "log_rows", broken)
    summary = api.train(write_toml(tmp_path / "r.toml", _recipe(mlflow=True)), out=tmp_path / "run")
    assert summary["steps"] == 6 and (tmp_path / "run" / "checkpoints" / "final.pt").is_file()
    err = capsys.readouterr().err
    assert err.count("mlflow logging stopped") == 1 and "tracking server gone" in err and "The run goes on" in err
    client = _mlflow_client(tmp_path / "run", monkeypatch)
    (logged,) = mlflow.search_runs(experiment_names=["capsgan"], output_format="list")
    assert logged.info.status == "KILLED"
    assert client.get_metric_history(logged.info.run_id, "train/loss_classification") == []


def test_a_training_stopped_without_its_end_leaves_its_mlflow_run_killed_at_exit(tmp_path, monkeypatch):
    from capsgan_plugins import mlflow_logger

    recipe = {"output": {"mlflow": True}, "run": {"name": "stopped"}}
    mlflow_logger.capsgan_run_start(RunStart(tmp_path, recipe, False, 0, 0))
    client = _mlflow_client(tmp_path, monkeypatch)
    (logged,) = mlflow.search_runs(experiment_names=["capsgan"], output_format="list")
    assert logged.info.status == "RUNNING"
    mlflow_logger._TRACKERS.close_all()  # what the process's exit does (registered with atexit)
    assert client.get_run(logged.info.run_id).info.status == "KILLED" and not mlflow_logger._TRACKERS.open


def test_a_tracker_that_cannot_start_stops_the_run_before_training_with_a_clear_message(tmp_path):
    bad = _recipe(mlflow="nosuchscheme://nowhere")
    result = invoke("run", write_toml(tmp_path / "r.toml", bad), "--out", tmp_path / "run", catch_exceptions=True)
    assert result.exit_code != 0
    assert "output.mlflow could not start logging" in result.output and "output.mlflow = false" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.parametrize(("key", "package", "value"), [("mlflow", "mlflow", True), ("wandb", "wandb", "offline")])
def test_without_the_package_the_recipe_is_refused_before_training(registry, monkeypatch, key, package, value):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(RecipeError) as info:
        resolve(_recipe(**{key: value}), registry)
    assert f"output.{key}" in str(info.value) and f'pip install "capsgan-toolkit[{key}]"' in str(info.value)
    resolve(_recipe(**{key: value}), registry, training=False)  # evaluating a trained run does not need it
    resolve(_recipe(), registry)


def test_bad_tracker_settings_are_named(registry):
    with pytest.raises(RecipeError, match="output.mlflow"):
        resolve(_recipe(mlflow=""), registry)
    with pytest.raises(RecipeError, match="output.wandb"):
        resolve(_recipe(wandb="cloud"), registry)


def test_nothing_is_logged_when_the_recipe_does_not_ask(tmp_path):
    from capsgan_plugins import mlflow_logger, wandb_logger

    recipe = {"output": {}, "run": {"name": "t"}}
    for plugin in (mlflow_logger, wandb_logger):
        plugin.capsgan_run_start(RunStart(tmp_path, recipe, False, 0, 0))
        plugin.capsgan_epoch_end(EpochEnd(tmp_path, 0, 3, {"kind": "epoch", "test_acc": 0.5}))
        plugin.capsgan_run_end(RunEnd(tmp_path, {}))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------ Weights & Biases (offline)

pytest.importorskip("wandb", reason='wandb is not installed (pip install "capsgan-toolkit[test]")')


def _wandb_records(path: Path) -> list:
    """The records of a finished run's .wandb file (W&B's block format: 32 KiB blocks of chunks, each a CRC,
    a length and a type, of protobuf records), once W&B's writer has written its "exit" record: ``run.finish()``
    returns when the service took the run's end, and the service's writer may still be closing the file."""
    deadline = time.monotonic() + 60
    while True:
        records = _read_wandb(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def _read_wandb(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def _history(records) -> dict[int, dict[str, str]]:
    rows: dict[int, dict[str, str]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = rows.setdefault(r.history.step.num, {})
            row.update({i.key or "/".join(i.nested_key): i.value_json for i in r.history.item})
    return rows


def _summary(records) -> dict[str, str]:
    out: dict[str, str] = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            out.update({u.key or "/".join(u.nested_key): u.value_json for u in r.summary.update})
    return out


def _wandb_files(run: Path) -> list[Path]:
    return sorted(run.glob("wandb/offline-run-*/run-*.wandb"))


def test_an_offline_wandb_run_folder_holds_the_metrics_config_and_pictures(tmp_path):
    run = tmp_path / "run"
    api.train(write_toml(tmp_path / "r.toml", _recipe(wandb="offline")), out=run)
    (file,) = _wandb_files(run)
    records = _wandb_records(file)
    state = read_state(run)["wandb"]
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert start.run_id == state["id"] and start.project == "capsgan" and start.display_name == "tiny"
    config = {u.key: json.loads(u.value_json) for u in start.config.update}
    assert config["optim"]["encoder_generator"]["lr"] == 0.001 and config["encoder"]["plugin"] == "cnn"
    history = _history(records)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert sorted(s for s, row in history.items() if "train/loss_classification" in row) == [1, 2, 3, 4, 5, 6]
    for row in train:
        assert json.loads(history[row["step"]]["train/loss_classification"]) == pytest.approx(row["loss_classification"])
    assert sorted(s for s, row in history.items() if "epoch/test_acc" in row) == [3, 6]
    assert sorted(s for s, row in history.items() if "eval/acc32_test" in row) == [3, 6]
    assert sorted(s for s, row in history.items() if "samples/_type" in row) == [3, 6]
    assert json.loads(history[3]["samples/_type"]) == "image-file" and json.loads(history[3]["samples/width"]) > 0
    summary = json.loads((run / "summary.json").read_text())
    assert json.loads(_summary(records)["summary/test_acc"]) == pytest.approx(summary["test_acc"])
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records)

    # `capsgan eval` of the finished run: its results go to the same W&B run's summary
    result = invoke("eval", run, "--metrics", "acc", "--num-images", 16)
    assert result.exit_code == 0, result.output
    later = [f for f in _wandb_files(run) if f != file]
    assert len(later) == 1
    again = _wandb_records(later[0])
    assert [r.run.run_id for r in again if r.WhichOneof("record_type") == "run"] == [state["id"]]
    value = json.loads((run / "eval.json").read_text())["metrics"]["acc32_test"]
    assert json.loads(_summary(again)["eval/acc32_test"]) == pytest.approx(value)


def test_a_resumed_run_continues_its_wandb_run_and_logs_each_step_once(tmp_path):
    run = tmp_path / "run"
    recipe = write_toml(tmp_path / "r.toml", _recipe(wandb="offline"))
    api.train(recipe, out=run, sets=["run.epochs=1"])
    first = read_state(run)["wandb"]["id"]
    api.train(out=run, resume=True, sets=["run.epochs=2"])
    files = _wandb_files(run)
    assert len(files) == 2
    steps = []
    for file in files:
        records = _wandb_records(file)
        assert [r.run.run_id for r in records if r.WhichOneof("record_type") == "run"] == [first]
        steps += sorted(s for s, row in _history(records).items() if "train/loss_classification" in row)
    assert steps == [1, 2, 3, 4, 5, 6]
