"""Weights & Biases tracking through the typed run events (``[output] wandb = "offline"`` or ``"online"``).

An observer plugin (:mod:`capsgan_toolkit.rundir.trackers`): it adds no component and never
sees a model. It opens a W&B run with ``wandb.init`` in the run folder (``RUN_DIR/wandb/``),
project ``output.experiment``, named after ``run.name``:

- ``"offline"``: everything stays on this machine, in ``RUN_DIR/wandb/offline-run-*``;
  ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it later. No account needed.
- ``"online"``: streamed to the W&B server as the run trains (``wandb login`` first, or
  ``WANDB_API_KEY`` in the environment).

What it logs: the resolved recipe as the run's config; ``train/<key>`` for every number of the
``metrics.jsonl`` rows of kind "train" at the row's step; ``epoch/<key>`` and the epoch's sample
picture (``samples``); ``eval/<key>`` for every evaluation; the run's summary (and the results of
``capsgan eval`` of the finished run, which ``RUN_DIR/trackers.json`` ties to its W&B run) in
the W&B run's summary. The toolkit's own console output is left alone (``console = "off"``).

A resumed run continues the same W&B run (its id is in ``RUN_DIR/trackers.json``). W&B's steps
only go forward: the steps a resume or the divergence guard's rollback trains again keep the
values W&B first received, and logging goes on from the first step after them. The ``wandb``
package is an optional extra: ``pip install "capsgan-toolkit[wandb]"``; recipe validation refuses
``output.wandb`` without it, before anything is trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.rundir.tail import NewRows, numbers
from capsgan_toolkit.rundir.trackers import TrackerRun, Trackers, read_state, run_label, update_state

INSTALL_HINT = 'pip install "capsgan-toolkit[wandb]"'


def _wandb():
    try:
        import wandb
    except ImportError as exc:
        raise CapsganError(f"output.wandb needs the wandb package ({exc}). Install it with {INSTALL_HINT}, "
                           "or set output.wandb = false.") from None
    return wandb


def _init(run_dir: Path, mode: str, project: str, name: str, run_id: str | None,
          config: dict[str, Any] | None):
    wandb = _wandb()
    return wandb.init(dir=str(run_dir), mode=mode, project=project, name=name, id=run_id, resume="allow",
                      config=config, reinit="create_new",
                      settings=wandb.Settings(console="off", quiet=True, x_disable_stats=True))


class WandbRun(TrackerRun):
    """One training run logged to one W&B run."""

    def __init__(self, run_dir: Path, recipe: dict[str, Any], mode: str, resumed_at: int | None):
        state = read_state(run_dir).get("wandb") or {}
        continued = resumed_at is not None and bool(state.get("id"))
        project, name = run_label(recipe, run_dir)
        self.run = _init(run_dir, mode, project, name, state["id"] if continued else None, recipe)
        self.last_step = resumed_at if continued and resumed_at is not None else -1
        update_state(run_dir, "wandb", {"id": self.run.id, "mode": mode, "project": project, "name": name})
        super().__init__(run_dir, resumed_at=resumed_at if continued else None)

    def _log(self, values: dict[str, Any], step: int) -> None:
        if step < self.last_step:  # W&B's steps only go forward: a step trained again keeps its first values
            return
        self.run.log(values, step=step)
        self.last_step = step

    def log_rows(self, found: NewRows) -> None:
        for row in found.rows:
            self._log({f"train/{key}": value for key, value in numbers(row).items()}, int(row.get("step", 0)))

    def log_values(self, prefix: str, values: dict[str, float], step: int) -> None:
        self._log({f"{prefix}/{key}": value for key, value in values.items()}, step)

    def log_picture(self, path: Path, step: int) -> None:
        self._log({"samples": _wandb().Image(str(path))}, step)

    def finish(self, summary: dict[str, Any]) -> None:
        self.run.summary.update({f"summary/{key}": value for key, value in numbers(summary, frozenset()).items()})
        self.run.finish()

    def abandon(self) -> None:
        self.run.finish(exit_code=1)


def _after_training(run_dir: Path, state: dict[str, Any], event) -> None:
    """``capsgan eval`` of a run logged to W&B: its results join that run's summary."""
    run = _init(run_dir, state.get("mode", "offline"), state.get("project", "capsgan"), state.get("name", ""),
                state["id"], None)
    run.summary.update({f"eval/{key}": value for key, value in numbers(event.metrics).items()})
    run.finish()


_TRACKERS = Trackers("wandb", lambda recipe: (recipe.get("output") or {}).get("wandb", False), WandbRun,
                     _after_training)


# The run-event hooks (pluggy finds them by these names): Trackers turns the events into TrackerRun calls.
(capsgan_run_start, capsgan_epoch_end, capsgan_checkpoint_saved, capsgan_evaluation_done,
 capsgan_run_end) = _TRACKERS.hookimpls()
