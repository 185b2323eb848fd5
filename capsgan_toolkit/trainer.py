"""The training loop: iterate, ask the gate, let the objective step, log, checkpoint, handle signals.

What one step computes belongs to the recipe's objective (:mod:`capsgan_toolkit.objective`);
the loop hands it :meth:`Trainer.update`, which checks for NaN/Inf, back-propagates, clips,
and steps one optimizer. Everything that decides what happens next (weights, optimizers,
schedulers, gate, running accuracies, counters, RNG states, the position inside the epoch,
the divergence guard) is in each checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from capsgan_toolkit import __version__
from capsgan_toolkit import checkpoint as ckpt
from capsgan_toolkit.build import Built, build, pick_device
from capsgan_toolkit.ema import EMA
from capsgan_toolkit.errors import CheckpointError, Interrupted, NumericalError
from capsgan_toolkit.events import CheckpointSaved, EpochEnd, RunEnd, RunStart, emit
from capsgan_toolkit.interfaces import TrainState
from capsgan_toolkit.monitor import Monitor
from capsgan_toolkit.optim import DivergenceGuard, build_optimizer, clip_gradients, scale_learning_rates
from capsgan_toolkit.reporting import MetricsLog
from capsgan_toolkit.rundir import RunDir
from capsgan_toolkit.training_state import Position, epoch_permutation, rng_state, set_rng_state, split_train_val

class _RolledBack(Exception):
    """The divergence guard restored an earlier checkpoint: the epoch restarts from its position."""


# Which recipe table a logged loss term comes from, and what it trains (for NaN messages).
_TERMS = {"classification": ("classification", "encoder"), "reconstruction": ("reconstruction", "encoder and generator"),
          "adversarial": ("adversarial", "generator"), "discriminator": ("adversarial", "discriminator")}


class Trainer:
    """Train one resolved recipe into a run folder (see the module docstring).

    Args:
        resolved: the validated recipe.
        plugins: the loaded plugins (registry and event hooks).
        run_dir: the run folder (created by the caller).
        console: a rich console for progress and messages (``None``: quiet).
        resume_from: a checkpoint path, or its already loaded state, to continue from.
        built: the recipe's components, if the caller built them already (:func:`build`).
    """

    def __init__(self, resolved, plugins, run_dir, *, console=None, resume_from=None, built: Built | None = None):
        self.resolved, self.recipe, self.plugins, self.console = resolved, resolved.recipe, plugins, console
        self.rd = RunDir(run_dir)
        self.built = built if built is not None else build(resolved, plugins)  # seeds the RNGs first
        self.objective, run = self.built.objective, self.recipe.run
        self.device = pick_device(run.device)
        for module in [*self.built.modules().values(), *(self.built.parts.get(k) for k in _TERMS)]:
            if module is not None:
                module.to(self.device)
        self.flops_per_image = _count_flops(self.built)
        train = self.built.dataset.split("train")
        fraction = run.val_fraction if self.objective.has_classifier else 0.0  # held out only to choose best.pt
        kept, held = split_train_val(len(train), fraction, run.seed)
        self.train_set = Subset(train, kept) if held else train
        self.val_set = Subset(train, held) if held else None
        self.test_set = self.built.dataset.split("test")
        self.batch_size = resolved.params["data"].batch_size
        if len(self.train_set) < self.batch_size:
            from capsgan_toolkit.errors import CapsganError

            raise CapsganError(
                f"{resolved.source}: data.batch_size = {self.batch_size} is larger than the training split "
                f"({len(self.train_set)} images after holding out run.val_fraction). Lower data.batch_size.")
        full = len(self.train_set) // self.batch_size
        self.batches_per_epoch = min(full, run.steps_per_epoch) if run.steps_per_epoch else full
        self.total_steps = run.epochs * self.batches_per_epoch
        if run.max_steps:
            self.total_steps = min(self.total_steps, run.max_steps)
        self.params = {n: p for n, p in self.objective.optimizer_parameters().items() if p}
        self.optimizers, self.schedulers = {}, {}
        for name, params in self.params.items():
            self.optimizers[name], self.schedulers[name] = build_optimizer(
                resolved.optim[name], params, total_steps=self.total_steps)
        self.ema = EMA.from_recipe(self.recipe.ema, self.built.parts, self.params)  # None without [ema]
        self._update = self.ema.wrap(self.update) if self.ema is not None else self.update
        self.pos = Position(run.running_momentum)
        self.guard = DivergenceGuard(run.divergence)
        self.metrics = MetricsLog(self.rd.metrics_file)
        self.monitor = Monitor(self)
        self.stopped_by, self._stop_signal, self._last_minutes_ckpt = None, None, time.monotonic()
        self.resumed = resume_from is not None
        if resume_from is not None:
            state = resume_from if isinstance(resume_from, dict) else ckpt.load_checkpoint(resume_from, self.device)
            self._restore(state, resume_from if not isinstance(resume_from, dict) else "the checkpoint")
        from capsgan_toolkit.evaluation import preflight

        preflight(resolved, plugins.registry, self.built.info)  # e.g. Inception weights missing offline: fail now

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Return everything needed to continue exactly (see the module docstring)."""
        pos = self.pos.state_dict()
        return {
            "format": ckpt.FORMAT_VERSION, "toolkit_version": __version__,
            "recipe": self.resolved.to_dict(), "recipe_digest": self.resolved.digest(),
            "models": {name: m.state_dict() for name, m in self.built.modules().items()},
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
            "gate": self.built.gate.state_dict(), "guard": self.guard.state_dict(),
            "position": {k: pos.pop(k) for k in ("epoch", "batch_in_epoch", "step")},
            "running": pos, "rng": rng_state(), "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def _restore(self, state: dict[str, Any], path) -> None:
        expected = set(self.built.modules())
        if set(state.get("models", {})) != expected:
            raise CheckpointError(f"{path} holds models {sorted(state.get('models', {}))}, but this recipe builds "
                                  f"{sorted(expected)}. It comes from another recipe.")
        try:
            for name, module in self.built.modules().items():
                module.load_state_dict(state["models"][name])
            for name, opt in self.optimizers.items():
                opt.load_state_dict(state["optimizers"][name])
                self.schedulers[name].load_state_dict(state["schedulers"][name])
            self.pos.load_state_dict({**state["position"], **state["running"]})
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path} does not fit the models of this recipe ({str(exc).splitlines()[0]}). "
                                  "It comes from another recipe or an incompatible version.") from None
        self.built.gate.load_state_dict(state["gate"])
        self.guard.load_state_dict(state["guard"])
        set_rng_state(state["rng"])
        self.metrics.truncate_after(self.pos.step, self.pos.epoch)

    def save(self, name: str) -> Path:
        """Write checkpoint ``name`` atomically into checkpoints/."""
        path = ckpt.save_checkpoint(self.state_dict(), self.rd.checkpoint_file(name))
        self._last_minutes_ckpt = time.monotonic()
        emit(self.plugins.manager, CheckpointSaved(self.rd.path, path, self.pos.epoch, self.pos.step))
        return path

    def _save_periodic(self) -> None:
        self.save(ckpt.periodic_name(self.pos.step))
        ckpt.prune(self.rd.checkpoints_dir, self.recipe.checkpoint.keep_last)

    # ------------------------------------------------------------------ one step

    def update(self, optimizer: str, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> bool:
        """Check ``terms``, back-propagate ``loss``, clip, check the gradients and step ``optimizer``."""
        if optimizer not in self.optimizers:
            return False
        if not self._finite({k: v for k, v in terms.items()}, "the loss"):
            return False
        opt = self.optimizers[optimizer]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = clip_gradients(self.params[optimizer], self.resolved.optim[optimizer].clip_norm)
        if not math.isfinite(norm):
            bad = {name: torch.tensor(float("nan")) for name, m in self.built.modules().items()
                   if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in m.parameters())}
            if not self._finite(bad or {optimizer: torch.tensor(norm)}, "the gradient of"):
                return False
        self.pos.add(f"grad_norm_{optimizer}", norm)
        opt.step()
        return True

    def _finite(self, values: dict[str, torch.Tensor], what: str) -> bool:
        bad = [name for name, v in values.items() if not torch.isfinite(v).all()]
        if not bad:
            return True
        if self.recipe.run.on_nan == "skip":
            if not self._step_skipped:  # count steps, not the checks that failed within one
                self.pos.skipped_steps += 1
                self._step_skipped = True
            return False
        last = ckpt.latest(self.rd.checkpoints_dir)
        kept = f"the last good checkpoint, {last}, is intact" if last is not None else "no checkpoint had been written yet"
        raise NumericalError(
            f"Step {self.pos.step + 1} (epoch {self.pos.epoch}, as numbered in metrics.jsonl): {what} "
            f"{', '.join(self._describe(n, what) for n in bad)} is NaN or Inf. Training stopped; {kept}. "
            'Lower the learning rate, set clip_norm in [optim.<name>], or set run.on_nan = "skip" to skip such steps.')

    def _describe(self, name: str, what: str) -> str:
        if "loss" not in what or name not in _TERMS:
            return f"the {name}"
        slot, trains = _TERMS[name]
        spec = getattr(self.recipe.losses, slot, None)
        plugin = f' (losses.{slot}, plugin "{spec.plugin}")' if spec is not None else ""
        return f"{name}{plugin}, which trains the {trains},"

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Run one step: the gate decides the phases, the objective computes and steps."""
        self._step_skipped = False
        pos = self.pos
        phases = self.built.gate.decide(TrainState(
            epoch=pos.epoch, step=pos.step, encoder_acc=pos.encoder_acc.value or 0.0,
            disc_acc=pos.disc_acc.value, has_discriminator=self.built.parts.discriminator is not None))
        result = self.objective.step(images, labels, phases, self._update)
        if self.ema is not None:
            self.ema.end_step()  # one EMA update per step that changed an averaged model
        with warnings.catch_warnings():  # every schedule advances each step, also when its optimizer sat out
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
            for sched in self.schedulers.values():
                sched.step()
        if result.encoder_acc is not None:
            pos.encoder_acc.update(result.encoder_acc)
            pos.add("batch_acc", result.encoder_acc)
        if result.disc_acc is not None:
            pos.disc_acc.update(result.disc_acc)
        for name, value in result.values.items():
            pos.add(f"loss_{name}", value)
        for name, flag in (("generator", phases.generator), ("discriminator", phases.discriminator),
                           ("warmup", phases.warmup)):
            pos.add(f"gate_{name}", float(flag))
        encoder = self.built.parts.encoder
        for key, value in (getattr(encoder, "diagnostics", None) or {}).items():
            pos.add(key, value)
        monitor = self.recipe.run.divergence.monitor or "classification"  # "": the objective's main loss
        watched = result.values.get(monitor)
        event = self.guard.update(pos.step + 1, watched, pos.encoder_acc.value)
        if event is not None:
            self._divergence(event)
        self.last_phases = phases

    def _divergence(self, event: dict[str, Any]) -> None:
        """Record a divergence; with ``action = "rollback"``, go back to the last checkpoint at a lower rate."""
        self.metrics.append({"kind": "event", "epoch": self.pos.epoch, **event})
        if self.console is not None:
            self.console.print(f"[yellow]warning:[/] {event.get('message', event)}", highlight=False)
        if event.get("action") != "rollback":
            return
        last = ckpt.latest(self.rd.checkpoints_dir)
        state = ckpt.load_checkpoint(last, self.device) if last is not None else None
        if state is not None:
            guard = dict(self.guard.state_dict())
            self._restore(state, last)  # models, optimizers, schedulers, position, gate, RNG, metrics rows
            self.guard.load_state_dict(guard)
        factor = self.guard.rollback(state["guard"] if state is not None else None)
        scale_learning_rates(self.optimizers, self.schedulers, factor)
        self.metrics.append({"kind": "event", "event": "rollback", "epoch": self.pos.epoch, "step": self.pos.step,
                             "diverged_at_step": event.get("step"), "checkpoint": last.name if last else None,
                             "lr_scale": self.guard.lr_scale})
        if self.console is not None:
            where = f"checkpoint {last.name} (step {self.pos.step})" if last else "the current weights (no checkpoint yet)"
            self.console.print(f"  rolled back to {where}; learning rates x{self.guard.lr_scale:g}", highlight=False)
        raise _RolledBack

    def _log_interval(self) -> dict[str, Any]:
        pos, acc = self.pos, self.pos.interval
        row: dict[str, Any] = {"kind": "train", "epoch": pos.epoch, "step": pos.step,
                               "encoder_acc": pos.encoder_acc.value, "disc_acc": pos.disc_acc.value,
                               "gate": self.last_phases.label(), "skipped_steps": pos.skipped_steps,
                               **pos.means(),
                               **{f"lr_{n}": s.get_last_lr()[0] for n, s in self.schedulers.items()}}
        row["images_per_s"] = acc["images"] / acc["time"] if acc["time"] > 0 else None
        self.metrics.append(row)
        pos.reset_interval()
        return row

    # ------------------------------------------------------------------ loop

    def fit(self) -> dict[str, Any]:
        """Train to the end of the recipe (or its step/minute budget); return the run summary."""
        run, pos = self.recipe.run, self.pos
        previous = self._install_signals()
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
            for sig, old in previous.items():
                signal.signal(sig, old)
        self.save("final.pt")
        self.monitor.save_traversal()
        summary = self.monitor.summary()
        self.rd.write_summary(summary)
        emit(self.plugins.manager, RunEnd(self.rd.path, summary))
        return summary

    def _run_epoch(self, progress, task) -> None:
        run, pos = self.recipe.run, self.pos
        order = epoch_permutation(run.seed, pos.epoch, len(self.train_set))
        batches = [order[i * self.batch_size:(i + 1) * self.batch_size].tolist()
                   for i in range(pos.batch_in_epoch, self.batches_per_epoch)]
        # An own generator: iterating a DataLoader draws its base seed from the generator it is
        # given, which by default is the global one, and a resumed epoch builds an extra loader.
        loader = DataLoader(self.train_set, batch_sampler=batches, num_workers=self.resolved.params["data"].num_workers,
                            generator=torch.Generator().manual_seed(run.seed * 1_000_003 + pos.epoch))
        tick = time.perf_counter()
        for images, labels in loader:
            self.train_step(images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))
            pos.batch_in_epoch += 1
            pos.step += 1
            now = time.perf_counter()
            pos.interval["images"] += images.shape[0]
            pos.interval["time"] += now - tick
            pos.elapsed += now - tick
            tick = now
            if pos.step % run.log_every == 0:
                progress.update(task, status=self.monitor.status(self._log_interval()))
            progress.advance(task)
            if self._stop_signal is not None:
                self._interrupt()
            minutes = self.recipe.checkpoint.every_minutes
            if minutes and time.monotonic() - self._last_minutes_ckpt >= 60 * minutes:
                self._save_periodic()
            if run.max_steps and pos.step >= run.max_steps:
                self.stopped_by = "run.max_steps"
            elif run.max_minutes and pos.elapsed >= 60 * run.max_minutes:
                self.stopped_by = "run.max_minutes"
            if self.stopped_by is not None:
                break

    def _end_epoch(self) -> None:
        pos, run = self.pos, self.recipe.run
        row = {"kind": "epoch", "epoch": pos.epoch, "step": pos.step, **self.monitor.epoch_metrics(),
               "encoder_acc": pos.encoder_acc.value, "disc_acc": pos.disc_acc.value, "time_s": pos.elapsed}
        self.metrics.append(row)
        self.monitor.periodic_evaluation(pos.epoch, pos.step)
        done = pos.epoch + 1
        last = done == run.epochs or self.stopped_by is not None
        sample = self.monitor.save_samples(done) if done % self.recipe.output.samples_every_epochs == 0 or last else None
        self.monitor.plot()
        improved = row.get("val_acc") is not None and row["val_acc"] > pos.best_val_acc
        if improved:
            pos.best_val_acc = row["val_acc"]
        pos.epoch, pos.batch_in_epoch = done, 0
        if improved:
            self.save("best.pt")
        every = self.recipe.checkpoint.every_epochs
        if every and done % every == 0 and not last:
            self._save_periodic()
        self.monitor.say_epoch(row)
        emit(self.plugins.manager, EpochEnd(self.rd.path, row["epoch"], row["step"], row, sample,
                                            self.monitor.histograms()))
        if self._stop_signal is not None and not last:
            self._interrupt()  # the signal came during the end-of-epoch work

    def _install_signals(self):
        previous = {}

        def handler(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self._stop_signal = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return previous

    def _interrupt(self) -> None:
        path = self.save("interrupt.pt")
        name = signal.Signals(self._stop_signal).name
        raise Interrupted(f"Stopped by {name} at epoch {self.pos.epoch}, step {self.pos.step}; checkpoint saved to "
                          f"{path}. Resume with: capsgan run --resume {self.rd.path}")


def _count_flops(built: Built) -> dict[str, int]:
    """Forward FLOPs per image of each part (torch's flop counter; matmuls and convolutions only)."""
    from capsgan_toolkit.compare.cost import flops_per_image

    info, gen, out = built.info, torch.Generator().manual_seed(0), {}
    device = next(iter(built.modules().values())).parameters().__next__().device
    for name, module in built.modules().items():
        if name == "generator":
            shape = (module.num_classes, module.capsule_dim)
        else:
            shape = getattr(module, "image_shape", info.image_shape)
        try:
            out[name] = flops_per_image(module, torch.randn(2, *shape, generator=gen).to(device))
        except Exception:  # a plugin that cannot be counted costs nothing here
            continue
    return out
