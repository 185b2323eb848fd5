"""The training loop: iterate, ask the gate, let the objective step, log, checkpoint, handle signals.

What one step computes belongs to the recipe's objective; the loop hands it ``update``
(:mod:`capsgan_toolkit.training.stepping`: NaN checks, backward, clipping, one optimizer step). All that
decides what happens next (weights, optimizers, schedules, gate, running accuracies, counters,
RNG states, the position in the epoch, the guard, the EMA) is in each checkpoint: resume is exact.

The trainer holds the parts it wires together: :class:`~capsgan_toolkit.training.checkpointing.Checkpointing`
(what a checkpoint holds, saving and restoring it) and :class:`~capsgan_toolkit.training.monitor.Monitor`
(measurements, pictures, progress, the summary), each given explicitly what it uses.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from capsgan_toolkit.data import batch_loader
from capsgan_toolkit.errors import Interrupted, WriteError
from capsgan_toolkit.evaluation.flops import parts_flops_per_image
from capsgan_toolkit.interfaces import TrainState
from capsgan_toolkit.plugin.events import EpochEnd, RunEnd, RunStart, emit
from capsgan_toolkit.plugin.manager import PluginSet
from capsgan_toolkit.recipe.build import BufferSnapshot, Built, build, pick_device
from capsgan_toolkit.recipe.schema import ResolvedRecipe
from capsgan_toolkit.rundir.folder import RunDir
from capsgan_toolkit.rundir.reporting import MetricsLog
from capsgan_toolkit.step import distributed
from capsgan_toolkit.step.divergence import DivergenceGuard
from capsgan_toolkit.step.ema import EMA
from capsgan_toolkit.step.speed import Speed
from capsgan_toolkit.training.checkpointing import Checkpointing
from capsgan_toolkit.training.monitor import Monitor
from capsgan_toolkit.training.state import (
    DataPlan,
    Position,
    StopSignals,
    encoder_diagnostics,
    epoch_permutation,
    epoch_seed,
    kept_rng,
)
from capsgan_toolkit.training.stepping import TERMS, Optimizers

if TYPE_CHECKING:
    from rich.console import Console


class _RolledBack(Exception):
    """The divergence guard restored an earlier checkpoint: the epoch restarts from its position."""


class Trainer:
    """Train one resolved recipe into a run folder (created by the caller).

    ``plugins`` is the loaded PluginSet, ``console`` a rich console (``None``: quiet), ``resume_from``
    a checkpoint path or its loaded state, ``built`` the components if the caller built them already.
    """

    def __init__(self, resolved: ResolvedRecipe, plugins: PluginSet, run_dir: str | Path, *,
                 console: Console | None = None, resume_from: str | Path | dict[str, Any] | None = None,
                 built: Built | None = None) -> None:
        self.resolved, self.recipe, self.plugins, self.console = resolved, resolved.recipe, plugins, console
        self.rd = RunDir(run_dir)
        self.built = built if built is not None else build(resolved, plugins)  # seeds the RNGs first
        self.objective, run = self.built.objective, self.recipe.run
        self.dist = distributed.current()  # rank 0 of 1 unless torchrun started several processes
        self.device = self.dist.device(pick_device(run.device))
        for module in [*self.built.modules().values(), *(self.built.parts.get(k) for k in TERMS)]:
            if module is not None:
                module.to(self.device)
        self.dist.broadcast_modules(self.built.modules().values())
        self.speed = Speed(self.recipe.speed, self.device, self.built)  # channels-last, compile, bf16, cudnn
        self.flops_per_image = parts_flops_per_image(self.built)
        data = DataPlan.make(self.built, resolved)
        self.train_set, self.val_set, self.test_set = data.train_set, data.val_set, data.test_set
        self.batch_size, self.batches_per_epoch = data.batch_size, data.batches_per_epoch
        self.total_steps = data.total_steps
        self.pos = Position(run.running_momentum)
        self.opt = Optimizers(resolved, self.objective.optimizer_parameters(), total_steps=self.total_steps,
                              modules=self.built.modules(), pos=self.pos, checkpoints_dir=self.rd.checkpoints_dir,
                              dist=self.dist)
        self.ema = EMA.from_recipe(self.recipe.ema, self.built.parts, self.opt.params)  # None without [ema]
        self.update = self.ema.wrap(self.opt.update) if self.ema is not None else self.opt.update
        self.guard = DivergenceGuard(run.divergence)
        self.metrics = MetricsLog(self.rd.metrics_file) if self.dist.is_main else distributed.DiscardLog()
        self.monitor = Monitor(resolved, plugins, self.built, data=data, device=self.device, rd=self.rd,
                               metrics=self.metrics, pos=self.pos, ema=self.ema, console=console,
                               flops_per_image=self.flops_per_image)
        self.checkpoints = Checkpointing(resolved, self.built, self.opt, self.pos, self.guard, self.ema, rd=self.rd,
                                         metrics=self.metrics, dist=self.dist, events=plugins.manager)
        self.stopped_by: str | None = None  # the budget that ended training early (run.max_steps, ...)
        self.signals = StopSignals()
        self.resumed = resume_from is not None
        if isinstance(resume_from, dict):
            self.checkpoints.restore(resume_from, "the checkpoint")
        elif resume_from is not None:
            self.checkpoints.restore(self.checkpoints.load(resume_from, self.device), resume_from)
        from capsgan_toolkit.evaluation.evaluator import preflight

        preflight(resolved, plugins.registry, self.built.info)  # e.g. Inception weights missing offline: fail now

    # ------------------------------------------------------------------ one step

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Run one step: the gate decides the phases, the objective computes and steps."""
        pos = self.pos
        phases = self.built.gate.decide(TrainState(
            epoch=pos.epoch, step=pos.step, encoder_acc=pos.encoder_acc.value or 0.0,
            disc_acc=pos.disc_acc.value, has_discriminator=self.built.parts.discriminator is not None))
        if self.dist.active:  # each rank draws its own noise; a pure function of the step: nothing to save
            torch.manual_seed(distributed.step_seed(self.recipe.run.seed, pos.step, self.dist.rank))
        # run.on_nan = "skip": a skipped step must leave no trace, but its forward passes already moved the
        # models' buffers (BatchNorm running statistics, possibly to NaN): keep a copy to put back.
        buffers = BufferSnapshot(self.built.modules().values()) if self.recipe.run.on_nan == "skip" else None
        with self.speed.step():
            result = self.objective.step(self.built.augment(images, pos.step), labels, phases, self.update)
        if buffers is not None and self.opt.step_skipped:
            buffers.restore()
        if self.dist.active:  # the same running accuracies, gate and guard decisions on every rank
            result = self.dist.reduce_result(result)
            self.dist.broadcast_modules(self.built.modules().values(), buffers_only=True)
        if self.ema is not None:
            self.ema.end_step()  # one EMA update per step that changed an averaged model
        self.opt.end_step()
        pos.record(result, phases, encoder_diagnostics(self.built.parts.encoder))
        monitor = self.recipe.run.divergence.monitor or "classification"  # "": the objective's main loss
        watched = result.values.get(monitor)
        event = self.guard.update(pos.step + 1, watched, pos.encoder_acc.value)
        if event is not None:
            self._divergence(event)
        self.last_phases = phases

    def _divergence(self, event: dict[str, Any]) -> None:
        """Record a divergence; with ``action = "rollback"``, go back to the last checkpoint at a lower rate."""
        self.metrics.append({"kind": "event", "epoch": self.pos.epoch, **event})
        self.monitor.say(f"[yellow]warning:[/] {event.get('message', event)}")
        if event.get("action") != "rollback":
            return
        last, state = self.checkpoints.latest(), None
        if last is not None:
            state = self.checkpoints.load(last, self.device)
            guard = dict(self.guard.state_dict())
            self.checkpoints.restore(state, last)  # models, optimizers, schedulers, position, gate, RNG, metrics rows
            self.guard.load_state_dict(guard)
        factor = self.guard.rollback(state["guard"] if state is not None else None)
        self.opt.scale(factor)
        self.metrics.append({"kind": "event", "event": "rollback", "epoch": self.pos.epoch, "step": self.pos.step,
                             "diverged_at_step": event.get("step"), "checkpoint": last.name if last else None,
                             "lr_scale": self.guard.lr_scale})
        where = f"checkpoint {last.name} (step {self.pos.step})" if last else "the current weights (no checkpoint yet)"
        self.monitor.say(f"  rolled back to {where}; learning rates x{self.guard.lr_scale:g}")
        raise _RolledBack

    # ------------------------------------------------------------------ loop

    def fit(self) -> dict[str, Any]:
        """Train to the end of the recipe (or its step/minute budget); return the run summary.

        Raises:
            WriteError: a file of the run could not be written (a full disk); the run resumes from its
                last checkpoint once there is room.
        """
        try:
            return self._fit()
        except WriteError as exc:
            raise WriteError(exc.message, hint=f"Free some disk space, then resume: capsgan run --resume "
                                               f"{self.rd.path} (it continues from its last checkpoint).") from None

    def _fit(self) -> dict[str, Any]:
        run, pos = self.recipe.run, self.pos
        self.signals.install()
        emit(self.plugins.manager, RunStart(self.rd.path, self.resolved.to_dict(), self.resumed, pos.epoch, pos.step))
        try:
            with self.monitor.progress() as progress:
                task = progress.add_task("train", total=self.total_steps, status="",
                                         completed=pos.epoch * self.batches_per_epoch + pos.batch_in_epoch)
                while pos.epoch < run.epochs and self.stopped_by is None:
                    try:
                        self._run_epoch(progress, task)
                    except _RolledBack:  # the position went back: continue from there
                        progress.update(task, completed=pos.epoch * self.batches_per_epoch + pos.batch_in_epoch)
                        continue
                    self._end_epoch()
        finally:
            self.signals.restore()
        if not self.dist.is_main:
            return {}
        self.save("final.pt")
        self.monitor.save_traversal()
        summary = self.monitor.summary(stopped_by=self.stopped_by, divergence_events=self.guard.episodes)
        self.rd.write_summary(summary)
        emit(self.plugins.manager, RunEnd(self.rd.path, summary))
        return summary

    def _run_epoch(self, progress, task) -> None:
        run, pos = self.recipe.run, self.pos
        order = epoch_permutation(run.seed, pos.epoch, len(self.train_set))
        size = self.batch_size * self.dist.world_size  # a global batch
        batches = [self.dist.shard(order[i * size:(i + 1) * size].tolist(), self.batch_size)
                   for i in range(pos.batch_in_epoch, self.batches_per_epoch)]
        # An own generator: a DataLoader draws its base seed from the global RNG otherwise (resume-unsafe).
        loader = batch_loader(self.train_set, batches, num_workers=self.resolved.params["data"].num_workers,
                              generator=torch.Generator().manual_seed(epoch_seed(run.seed, pos.epoch)),
                              pin_memory=self.speed.pin_memory, device=self.speed.data_device)
        tick = time.perf_counter()
        for images, labels in loader:
            self.train_step(self.speed.batch(images.to(self.device, non_blocking=True)),
                            labels.to(self.device, non_blocking=True))
            now = time.perf_counter()
            pos.advance(images.shape[0], now - tick)
            tick = now
            if pos.step % run.log_every == 0:
                row = self.monitor.log_interval(self.last_phases, self.opt.learning_rates())
                progress.update(task, status=self.monitor.status(row))
            progress.advance(task)
            if self.dist.any(self.signals.received is not None):  # all ranks stop at the same step
                self._interrupt()
            if self.checkpoints.minutes_due():
                self._save_periodic()
            if run.max_steps and pos.step >= run.max_steps:
                self.stopped_by = "run.max_steps"
            elif run.max_minutes and self.dist.any(pos.elapsed >= 60 * run.max_minutes):
                self.stopped_by = "run.max_minutes"
            if self.stopped_by is not None:
                break

    def _end_epoch(self) -> None:
        done = self.pos.epoch + 1
        last = done == self.recipe.run.epochs or self.stopped_by is not None
        # A budget (run.max_steps, run.max_minutes) may stop an epoch part-way: the position then
        # stays inside it, so a resume with a larger budget trains the rest of that epoch.
        complete = self.pos.batch_in_epoch >= self.batches_per_epoch
        if self.dist.is_main:  # evaluation, pictures, checkpoints and events: rank 0 alone
            self._epoch_outputs(done, last, complete)
        elif complete:
            self.pos.epoch, self.pos.batch_in_epoch = done, 0
        if self.dist.any(self.signals.received is not None) and not last:
            self._interrupt()  # the signal came during the end-of-epoch work

    def _epoch_outputs(self, done: int, last: bool, complete: bool) -> None:
        pos = self.pos
        row = {"kind": "epoch", "epoch": pos.epoch, "step": pos.step, **self.monitor.epoch_metrics(),
               "encoder_acc": pos.encoder_acc.value, "disc_acc": pos.disc_acc.value, "time_s": pos.elapsed}
        self.metrics.append(row)
        self.monitor.periodic_evaluation(pos.epoch, pos.step)
        due = done % self.recipe.output.samples_every_epochs == 0 or last
        sample = self.monitor.save_samples(done) if due else None
        self.monitor.plot()
        improved = row.get("val_acc") is not None and row["val_acc"] > pos.best_val_acc
        if improved:
            pos.best_val_acc = row["val_acc"]
        if complete:
            pos.epoch, pos.batch_in_epoch = done, 0
        if improved:
            self.save("best.pt")
        if self.checkpoints.epoch_due(done) and not last:
            self._save_periodic()
        self.monitor.say_epoch(row)
        with kept_rng():  # an observer (a plugin's hook) must not move the run's random stream either
            emit(self.plugins.manager, EpochEnd(self.rd.path, row["epoch"], row["step"], row, sample,
                                                self.monitor.histograms()))

    def _interrupt(self) -> None:
        path = self.save("interrupt.pt")  # rank 0 writes it; the other ranks of a torchrun run stop with it
        received = self.signals.received
        name = signal.Signals(received).name if received is not None else "a signal to another process"
        where = path if path is not None else f"{self.rd.checkpoint_file('interrupt.pt')} by rank 0"
        raise Interrupted(f"Stopped by {name} at epoch {self.pos.epoch}, step {self.pos.step}; checkpoint saved to "
                          f"{where}. Resume with: capsgan run --resume {self.rd.path}")

    # ------------------------------------------------------------------ checkpoints

    def save(self, name: str) -> Path | None:
        """Write checkpoint ``name`` into checkpoints/ (rank 0 only; others return ``None``)."""
        return self.checkpoints.save(name)

    def _save_periodic(self) -> None:  # a step_*.pt, keeping the last checkpoint.keep_last
        if self.dist.is_main:
            self.save(self.checkpoints.periodic_name())
            self.checkpoints.prune()
