"""TensorBoard logging through the typed run events (``[output] tensorboard = true``).

An observer plugin: it adds no component, only implements the run-event hooks of
:mod:`capsgan_toolkit.plugin.spec`, and never sees a model. It writes into
``RUN_DIR/tensorboard/`` with :class:`torch.utils.tensorboard.SummaryWriter`:

- ``train/<key>``: every number of the ``metrics.jsonl`` rows of kind "train" (losses,
  running accuracies, gate flags ``gate_*``, gradient norms, learning rates, the encoder's
  diagnostics such as ``capsule_len`` and ``coupling_entropy``, speed), read from the file
  at each event since the rows already logged, at the row's step;
- ``epoch/<key>``: the epoch row (test and validation accuracy, reconstruction MSE, ...);
- ``eval/<metric>``: periodic evaluation results;
- ``samples``: the epoch's sample picture; ``capsules/<name>``: histograms of the class
  capsules' lengths on the sample test images (the :class:`EpochEnd` event's ``histograms``);
- ``recipe``: the resolved recipe, as text, once.

A resumed run appends to the same folder: the writer purges the events after the
resumed step (``purge_step``), so steps trained again are not shown twice; after the
divergence guard rolls back, the abandoned steps are purged the same way. With
``output.tensorboard = false`` (the default) the plugin does nothing. The ``tensorboard``
package is an optional extra: ``pip install "capsgan-toolkit[tensorboard]"``; recipe
validation refuses ``tensorboard = true`` without it, before anything is trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from capsgan_toolkit import hookimpl
from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.rundir.tail import MetricsTail, numbers

INSTALL_HINT = 'pip install "capsgan-toolkit[tensorboard]"'
FOLDER = "tensorboard"
"""The sub-folder of the run folder that holds the event files."""


class _Logger:
    """One run's writer, and which rows of its metrics.jsonl it has logged (a :class:`MetricsTail`).

    ``resumed_at``: the step a resumed run continues from (``None``: a new run).
    """

    def __init__(self, run_dir: Path, *, resumed_at: int | None):
        self.log_dir = run_dir / FOLDER
        if not self.log_dir.is_dir():  # a new run, or one resumed with tensorboard newly turned on: log every row
            resumed_at = None
        # A resume purges what the stopped attempt logged after its checkpoint.
        self.writer = self._open(None if resumed_at is None else resumed_at + 1)
        self.tail = MetricsTail(run_dir / "metrics.jsonl", resumed_at=resumed_at)

    def _open(self, purge_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise CapsganError(f"output.tensorboard = true needs the tensorboard package ({exc}). "
                               f"Install it with {INSTALL_HINT}, or set output.tensorboard = false.") from None
        return SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def read_rows(self) -> None:
        """Log the "train" rows of metrics.jsonl not logged yet."""
        found = self.tail.read()
        if found.rewound:  # the run went back: hide the abandoned steps
            self.writer.close()
            self.writer = self._open(found.kept + 1)
        for row in found.rows:
            self.scalars("train", row, int(row.get("step", 0)))

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        for key, value in numbers(values).items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


_LOGGERS: dict[str, _Logger] = {}
"""Open writers by run folder (absolute path): a process may train several runs in turn."""


def _key(run_dir) -> str:
    return str(Path(run_dir).absolute())


def _logger(run_dir) -> _Logger | None:
    return _LOGGERS.get(_key(run_dir))


@hookimpl
def capsgan_run_start(event):
    """Open the run's writer if its recipe asks for TensorBoard."""
    stale = _LOGGERS.pop(_key(event.run_dir), None)  # a run of this folder that stopped with an error
    if stale is not None:
        stale.close()
    if not (event.recipe.get("output") or {}).get("tensorboard", False):
        return
    logger = _LOGGERS[_key(event.run_dir)] = _Logger(Path(event.run_dir),
                                                     resumed_at=event.step if event.resumed else None)
    if not event.resumed:
        from capsgan_toolkit.recipe.toml_io import dumps_toml

        text = "\n".join("    " + line for line in dumps_toml(event.recipe).splitlines())  # markdown code block
        logger.writer.add_text("recipe", text, 0)


@hookimpl
def capsgan_epoch_end(event):
    """Log the epoch's training rows, its epoch row, its sample picture and capsule-length histograms."""
    logger = _logger(event.run_dir)
    if logger is None:
        return
    logger.read_rows()
    logger.scalars("epoch", event.metrics, event.step)
    if event.sample_file is not None and Path(event.sample_file).is_file():
        import numpy as np
        from PIL import Image

        with Image.open(event.sample_file) as picture:
            pixels = np.asarray(picture.convert("RGB"))
        logger.writer.add_image("samples", pixels, event.step, dataformats="HWC")
    for name, values in (getattr(event, "histograms", None) or {}).items():
        if len(values):
            import numpy as np

            logger.writer.add_histogram(f"capsules/{name}", np.asarray(values, dtype=np.float64), event.step)
    logger.writer.flush()


@hookimpl
def capsgan_evaluation_done(event):
    """Log the evaluation's metrics."""
    logger = _logger(event.run_dir)
    if logger is not None:
        logger.scalars("eval", event.metrics, event.step)


@hookimpl
def capsgan_checkpoint_saved(event):
    """Bring the event files up to the checkpoint, so a resume from it loses no logged row."""
    logger = _logger(event.run_dir)
    if logger is not None:
        logger.read_rows()
        logger.writer.flush()


@hookimpl
def capsgan_run_end(event):
    """Log what is left and close the writer."""
    logger = _LOGGERS.pop(_key(event.run_dir), None)
    if logger is not None:
        logger.read_rows()
        logger.close()
