"""What every experiment-tracker plugin shares: the run events turned into tracker calls.

A tracker plugin (MLflow, Weights & Biases, or a third party's) is an observer: it adds no
component, implements the run-event hooks, and never sees a model. This module does the
bookkeeping they all need, so a plugin only says how to talk to its tracker:

- :class:`TrackerRun`: one run's connection. The engine's events become calls of its
  methods: the new "train" rows of ``metrics.jsonl`` (read with
  :class:`~capsgan_toolkit.rundir.tail.MetricsTail`, so a resume or the divergence guard's
  rollback is seen), the epoch's row and sample picture, each evaluation, and the summary at
  the end. A subclass implements :meth:`~TrackerRun.log_rows`, :meth:`~TrackerRun.log_values`,
  :meth:`~TrackerRun.log_picture` and :meth:`~TrackerRun.finish`.
- :class:`Trackers`: the open runs of one plugin, by run folder, and the hooks' bodies.
  A tracker that fails while a run trains stops logging with one warning and the run goes on
  (``metrics.jsonl`` holds every row); one that cannot start stops the run before training,
  with a :class:`~capsgan_toolkit.errors.CapsganError` that says what to do. A training that
  stops without its end event (an error, Ctrl-C) leaves its tracker run to be closed as
  abandoned when the process ends (MLflow: status KILLED; W&B: exit code 1).
- ``RUN_DIR/trackers.json`` (:func:`read_state`, :func:`update_state`): where each tracker
  keeps its run's id, so a resumed run continues the same tracker run and ``capsgan eval``
  adds its results to it.
"""

from __future__ import annotations

import atexit
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.rundir import writes
from capsgan_toolkit.rundir.tail import MetricsTail, NewRows, numbers

STATE_FILE = "trackers.json"
"""The file in the run folder where each tracker keeps its run's id (a JSON object by tracker name)."""


def read_state(run_dir: str | Path) -> dict[str, Any]:
    """Return ``RUN_DIR/trackers.json`` (empty when missing or unreadable)."""
    import json

    try:
        data = json.loads((Path(run_dir) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_state(run_dir: str | Path, name: str, entry: dict[str, Any]) -> None:
    """Record ``entry`` as tracker ``name``'s state in ``RUN_DIR/trackers.json`` (an atomic rewrite)."""
    state = read_state(run_dir)
    state[name] = entry
    writes.write_json(Path(run_dir) / STATE_FILE, state)


def run_label(recipe: dict[str, Any], run_dir: str | Path) -> tuple[str, str]:
    """``(experiment, name)``: the recipe's ``output.experiment`` and ``run.name`` (else the folder's name)."""
    experiment = str((recipe.get("output") or {}).get("experiment") or "capsgan")
    return experiment, str((recipe.get("run") or {}).get("name") or Path(run_dir).name)


def flat_recipe(recipe: dict[str, Any]) -> dict[str, str]:
    """The recipe as dotted keys and text values (``optim.encoder_generator.lr`` -> ``"0.003"``): a tracker's parameters."""
    import json

    from capsgan_toolkit.recipe.diff import flatten

    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in flatten(recipe).items()}


class TrackerRun:
    """One training run's connection to a tracker; the engine's events call the methods below.

    ``resumed_at``: the step a resumed run continues from, when the tracker continues the
    run it logged before (``None``: every row of ``metrics.jsonl`` is new to it).
    """

    def __init__(self, run_dir: Path, *, resumed_at: int | None):
        self.run_dir = Path(run_dir)
        self.tail = MetricsTail(self.run_dir / "metrics.jsonl", resumed_at=resumed_at)

    # ---- what a tracker implements
    def log_rows(self, found: NewRows) -> None:
        """Log new "train" rows of metrics.jsonl (``found.rewound``: the run went back, see :class:`NewRows`)."""
        raise NotImplementedError

    def log_values(self, prefix: str, values: dict[str, float], step: int) -> None:
        """Log numbers under ``prefix/<key>`` at ``step``."""
        raise NotImplementedError

    def log_picture(self, path: Path, step: int) -> None:
        """Log the epoch's sample picture."""
        raise NotImplementedError

    def finish(self, summary: dict[str, Any]) -> None:
        """The run ended: log its summary and close."""
        raise NotImplementedError

    def abandon(self) -> None:
        """The run stopped without its end event (an error, an interruption): close without a summary."""

    # ---- driven by the events
    def sync_rows(self) -> None:
        found = self.tail.read()
        if found.rows:
            self.log_rows(found)

    def epoch_end(self, event) -> None:
        self.sync_rows()
        self.log_values("epoch", numbers(event.metrics), event.step)
        if event.sample_file is not None and Path(event.sample_file).is_file():
            self.log_picture(Path(event.sample_file), event.step)

    def evaluation_done(self, event) -> None:
        self.sync_rows()  # the rows up to the evaluation's step first: a tracker's steps may only go forward
        self.log_values("eval", numbers(event.metrics), event.step)

    def checkpoint_saved(self, event) -> None:
        self.sync_rows()

    def run_end(self, event) -> None:
        self.sync_rows()
        self.finish(event.summary)


class Trackers:
    """One tracker plugin's open runs (by run folder) and its hooks' bodies.

    Args:
        label: the tracker's name in messages and ``trackers.json`` (``"mlflow"``).
        setting: the recipe's value that turns it on (``output.mlflow``), read from a recipe dict.
        start: opens a :class:`TrackerRun`: ``start(run_dir, recipe, setting, resumed_at)``, where
            ``resumed_at`` is the step of a resumed run (``None``: a new run).
        after_training: logs an evaluation of a trained run (``capsgan eval``) to the tracker
            run that ``trackers.json`` names: ``after_training(run_dir, state, event)``.
    """

    def __init__(self, label: str, setting: Callable[[dict[str, Any]], Any],
                 start: Callable[..., TrackerRun],
                 after_training: Callable[[Path, dict[str, Any], Any], None] | None = None):
        self.label, self.setting, self.start, self.after_training = label, setting, start, after_training
        self.open: dict[str, TrackerRun] = {}
        atexit.register(self.close_all)  # a run stopped by an error or an interrupt: its tracker run is closed too

    def close_all(self) -> None:
        """Close the tracker runs still open (their training stopped without its end event) as abandoned."""
        while self.open:
            _, tracker = self.open.popitem()
            try:
                tracker.abandon()
            except Exception:  # noqa: BLE001, S110 - the process is ending; metrics.jsonl holds the run
                pass

    @staticmethod
    def _key(run_dir) -> str:
        return str(Path(run_dir).absolute())

    def _guarded(self, run_dir, call: Callable[[TrackerRun], None]) -> None:
        tracker = self.open.get(self._key(run_dir))
        if tracker is None:
            return
        try:
            call(tracker)
        except Exception as exc:  # noqa: BLE001 - a tracker's failure must not stop training
            self.open.pop(self._key(run_dir), None)
            print(f"warning: {self.label} logging stopped for {run_dir} ({type(exc).__name__}: {exc}). The run goes "
                  "on; metrics.jsonl and the run folder hold everything it logs.", file=sys.stderr)
            try:
                tracker.abandon()
            except Exception:  # noqa: BLE001, S110 - already reported
                pass

    def run_start(self, event) -> None:
        stale = self.open.pop(self._key(event.run_dir), None)  # a run of this folder that stopped with an error
        if stale is not None:
            try:
                stale.abandon()
            except Exception:  # noqa: BLE001, S110 - it already failed once
                pass
        setting = self.setting(event.recipe)
        if not setting:
            return
        try:
            tracker = self.start(Path(event.run_dir), event.recipe, setting,
                                 event.step if event.resumed else None)
        except CapsganError:
            raise
        except Exception as exc:
            raise CapsganError(
                f"output.{self.label} could not start logging for {event.run_dir}: {type(exc).__name__}: {exc}. "
                f"Check the tracker's settings (output.{self.label}), or set output.{self.label} = false to train "
                "without it.") from None
        self.open[self._key(event.run_dir)] = tracker

    def epoch_end(self, event) -> None:
        self._guarded(event.run_dir, lambda t: t.epoch_end(event))

    def checkpoint_saved(self, event) -> None:
        self._guarded(event.run_dir, lambda t: t.checkpoint_saved(event))

    def evaluation_done(self, event) -> None:
        if self._key(event.run_dir) in self.open:
            self._guarded(event.run_dir, lambda t: t.evaluation_done(event))
            return
        state = read_state(event.run_dir).get(self.label)
        if state and self.after_training is not None:  # `capsgan eval` of a run this tracker logged
            try:
                self.after_training(Path(event.run_dir), state, event)
            except Exception as exc:  # noqa: BLE001 - eval.json is written already
                print(f"warning: the evaluation was not logged to {self.label} ({type(exc).__name__}: {exc}); "
                      "eval.json holds it.", file=sys.stderr)

    def run_end(self, event) -> None:
        self._guarded(event.run_dir, lambda t: t.run_end(event))
        self.open.pop(self._key(event.run_dir), None)

    def hookimpls(self) -> tuple[Callable, ...]:
        """The five run-event hooks of a tracker plugin, in the order of the names a plugin module binds them to::

            (capsgan_run_start, capsgan_epoch_end, capsgan_checkpoint_saved, capsgan_evaluation_done,
             capsgan_run_end) = TRACKERS.hookimpls()
        """
        from capsgan_toolkit import hookimpl

        def capsgan_run_start(event):
            self.run_start(event)

        def capsgan_epoch_end(event):
            self.epoch_end(event)

        def capsgan_checkpoint_saved(event):
            self.checkpoint_saved(event)

        def capsgan_evaluation_done(event):
            self.evaluation_done(event)

        def capsgan_run_end(event):
            self.run_end(event)

        return tuple(hookimpl(f) for f in (capsgan_run_start, capsgan_epoch_end, capsgan_checkpoint_saved,
                                           capsgan_evaluation_done, capsgan_run_end))
