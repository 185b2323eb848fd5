"""MLflow tracking through the typed run events (``[output] mlflow = true`` or a tracking URI).

An observer plugin (:mod:`capsgan_toolkit.rundir.trackers`): it adds no component and never
sees a model. With ``output.mlflow = true`` the run logs to a local MLflow store inside its own
folder, ``RUN_DIR/mlruns`` (``mlflow ui --backend-store-uri RUN_DIR/mlruns`` shows it); a text
value is a tracking URI instead (``"http://host:5000"``, ``"sqlite:///mlflow.db"``,
``"databricks"``). The experiment is ``output.experiment``; the MLflow run is named after
``run.name``. What it logs, through :class:`mlflow.tracking.MlflowClient`:

- parameters: the resolved recipe, one dotted key each (``optim.encoder_generator.lr``), and
  the recipe as ``recipe.toml`` among the artifacts;
- metrics: ``train/<key>`` for every number of the ``metrics.jsonl`` rows of kind "train" at
  the row's step, ``epoch/<key>`` for the epoch rows, ``eval/<key>`` for every evaluation
  (periodic ones, and ``capsgan eval`` of the finished run, which the run folder's
  ``trackers.json`` ties to its MLflow run), ``summary/<key>`` for the run's summary;
- artifacts: each epoch's sample picture under ``samples/``, and at the end ``curves.png``,
  ``traversal.png`` and ``summary.json``.

A resumed run continues the same MLflow run (its id is in ``RUN_DIR/trackers.json``). MLflow
keeps every value it was given, so the steps a resume or the divergence guard's rollback trains
again are logged a second time at the same step (the charts draw the latest). The local store is
MLflow's file store, which MLflow keeps in maintenance mode and refuses unless
``MLFLOW_ALLOW_FILE_STORE`` is set: this plugin sets it (unless the user did) for that store
only. The ``mlflow-skinny`` package is an optional extra: ``pip install "capsgan-toolkit[mlflow]"``;
recipe validation refuses ``output.mlflow`` without it, before anything is trained.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from capsgan_toolkit import __version__
from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.rundir.tail import NewRows, numbers
from capsgan_toolkit.rundir.trackers import TrackerRun, Trackers, flat_recipe, read_state, run_label, update_state

INSTALL_HINT = 'pip install "capsgan-toolkit[mlflow]"'
STORE = "mlruns"
"""The local store's folder inside the run folder (``output.mlflow = true``)."""

_BATCH = 1000  # MLflow's limit of metrics per log_batch call
_PARAM_BATCH = 100  # ... and of parameters


def tracking_uri(setting: bool | str, run_dir: Path) -> str:
    """The tracking URI of ``output.mlflow``: ``true`` is the local store ``RUN_DIR/mlruns``."""
    return (Path(run_dir).absolute() / STORE).as_uri() if setting is True else str(setting)


def _client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise CapsganError(f"output.mlflow needs the mlflow package ({exc}). Install it with {INSTALL_HINT}, "
                           "or set output.mlflow = false.") from None
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


def _log_metrics(client, run_id: str, points: list[tuple[str, float, int]]) -> None:
    """Log ``(key, value, step)`` points, in batches of MLflow's largest size."""
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    metrics = [Metric(key, value, stamp, step) for key, value, step in points]
    for start in range(0, len(metrics), _BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + _BATCH])


def _log_values(client, run_id: str, prefix: str, values: dict[str, float], step: int) -> None:
    _log_metrics(client, run_id, [(f"{prefix}/{key}", value, step) for key, value in values.items()])


class MlflowRun(TrackerRun):
    """One training run logged to one MLflow run."""

    def __init__(self, run_dir: Path, recipe: dict[str, Any], setting: bool | str, resumed_at: int | None):
        uri = tracking_uri(setting, run_dir)
        self.client = _client(uri)
        state = read_state(run_dir).get("mlflow") or {}
        continued = (resumed_at is not None and state.get("uri") == uri
                     and _exists(self.client, state.get("run_id", "")))
        experiment, name = run_label(recipe, run_dir)
        if continued:
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            resumed_at = None  # a new MLflow run gets every row already in metrics.jsonl
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
            run = self.client.create_run(experiment_id, run_name=name,
                                         tags={"capsgan.run_dir": str(Path(run_dir).absolute()),
                                               "capsgan.toolkit_version": __version__})
            self.run_id = run.info.run_id
            self._log_recipe(recipe)
            update_state(run_dir, "mlflow", {"uri": uri, "run_id": self.run_id, "experiment": experiment})
        super().__init__(run_dir, resumed_at=resumed_at)

    def _log_recipe(self, recipe: dict[str, Any]) -> None:
        from mlflow.entities import Param

        from capsgan_toolkit.recipe.toml_io import dumps_toml

        params = [Param(key, value[:6000]) for key, value in sorted(flat_recipe(recipe).items())]
        for start in range(0, len(params), _PARAM_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + _PARAM_BATCH])
        self.client.log_text(self.run_id, dumps_toml(recipe), "recipe.toml")

    def log_rows(self, found: NewRows) -> None:
        _log_metrics(self.client, self.run_id, [(f"train/{key}", value, int(row.get("step", 0)))
                                                for row in found.rows for key, value in numbers(row).items()])

    def log_values(self, prefix: str, values: dict[str, float], step: int) -> None:
        _log_values(self.client, self.run_id, prefix, values, step)

    def log_picture(self, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), "samples")

    def finish(self, summary: dict[str, Any]) -> None:
        self.log_values("summary", numbers(summary, frozenset()), int(summary.get("steps") or 0))
        for name in ("curves.png", "traversal.png", "summary.json"):
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        self.client.set_terminated(self.run_id, status="FINISHED")

    def abandon(self) -> None:
        self.client.set_terminated(self.run_id, status="KILLED")


def _exists(client, run_id: str) -> bool:
    if not run_id:
        return False
    try:
        client.get_run(run_id)
    except Exception:  # noqa: BLE001 - deleted, or another store
        return False
    return True


def _after_training(run_dir: Path, state: dict[str, Any], event) -> None:
    """``capsgan eval`` of a run logged to MLflow: its results join that MLflow run."""
    client = _client(state["uri"])
    _log_values(client, state["run_id"], "eval", numbers(event.metrics), event.step)
    if (run_dir / "eval.json").is_file():
        client.log_artifact(state["run_id"], str(run_dir / "eval.json"))


_TRACKERS = Trackers("mlflow", lambda recipe: (recipe.get("output") or {}).get("mlflow", False), MlflowRun,
                     _after_training)


# The run-event hooks (pluggy finds them by these names): Trackers turns the events into TrackerRun calls.
(capsgan_run_start, capsgan_epoch_end, capsgan_checkpoint_saved, capsgan_evaluation_done,
 capsgan_run_end) = _TRACKERS.hookimpls()
