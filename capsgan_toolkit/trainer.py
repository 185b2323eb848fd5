"""The training loop: the source report's algorithm, with every box a plugin.

Each step: the encoder's classification loss always trains it. After the gate's
warm-up, the generator reconstructs the images from the encoder's latent; the
discriminator is scored on real versus reconstructed images (its running accuracy
feeds the gate) and trained when the gate says so; the generator's loss
(reconstruction + adversarial, weighted) joins the classification loss when the
gate says so. Everything that decides what happens next (weights, optimizers,
gate, running accuracies, counters, RNG states, the position inside the epoch) is
in each checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
import random
import resource
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from capsgan_toolkit import __version__
from capsgan_toolkit import checkpoint as ckpt
from capsgan_toolkit.build import Components, build_components, count_parameters, pick_device, seed_everything
from capsgan_toolkit.errors import CapsganError, CheckpointError, Interrupted, NumericalError
from capsgan_toolkit.interfaces import TrainState
from capsgan_toolkit.plugin_manager import PluginSet
from capsgan_toolkit.recipe import ResolvedRecipe
from capsgan_toolkit.reporting import MetricsLog, plot_curves, read_metrics, save_pairs, save_traversal

_TIMING_KEYS = ("images_per_s", "time_s")


class _Stop(Exception):
    pass


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """Return the training order of ``epoch``: a pure function of seed and epoch, so resume needs no sampler state."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Train one resolved recipe into a run folder.

    Args:
        resolved: the validated recipe.
        plugins: the loaded plugins (registry and event hooks).
        run_dir: the run folder (created by the caller).
        console: a rich console for progress and messages (``None``: quiet).
        resume_from: a checkpoint path to continue from.
    """

    def __init__(self, resolved: ResolvedRecipe, plugins: PluginSet, run_dir: str | Path, *,
                 console=None, resume_from: str | Path | None = None):
        self.resolved = resolved
        self.recipe = resolved.recipe
        self.plugins = plugins
        self.run_dir = Path(run_dir)
        self.console = console
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.samples_dir = self.run_dir / "samples"
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")

        run = self.recipe.run
        if run.threads:
            torch.set_num_threads(run.threads)
        seed_everything(run.seed)
        self.device = pick_device(run.device)
        self.c: Components = build_components(resolved, plugins.registry)
        for module in self.c.modules().values():
            module.to(self.device)
        for loss in (self.c.classification, self.c.reconstruction, self.c.adversarial):
            if loss is not None:
                loss.to(self.device)

        eg = self.recipe.optim.encoder_generator
        self.opt_eg = torch.optim.Adam(
            list(self.c.encoder.parameters()) + list(self.c.generator.parameters()),
            lr=eg.lr, betas=eg.betas, weight_decay=eg.weight_decay,
        )
        self.opt_d = None
        if self.c.discriminator is not None:
            d = self.recipe.optim.discriminator
            self.opt_d = torch.optim.Adam(self.c.discriminator.parameters(), lr=d.lr, betas=d.betas,
                                          weight_decay=d.weight_decay)

        self.train_set = self.c.dataset.split("train")
        self.test_set = self.c.dataset.split("test")
        self.batch_size = self.resolved.params["data"].batch_size
        if len(self.train_set) < self.batch_size:
            raise CapsganError(
                f"{resolved.source}: data.batch_size = {self.batch_size} is larger than the training split "
                f"({len(self.train_set)} images). Lower data.batch_size."
            )
        full = len(self.train_set) // self.batch_size
        self.batches_per_epoch = min(full, run.steps_per_epoch) if run.steps_per_epoch else full

        # Training position and running values: all saved in checkpoints.
        self.epoch = 0
        self.batch_in_epoch = 0
        self.step = 0
        self.encoder_acc: float | None = None
        self.disc_acc: float | None = None
        self.skipped_steps = 0
        self.best_test_acc = -1.0
        self.elapsed = 0.0
        self._acc = self._new_accumulator()
        self._stop_signal: int | None = None
        self._last_minutes_ckpt = time.monotonic()
        if resume_from is not None:
            self._restore(ckpt.load_checkpoint(resume_from, map_location=self.device), resume_from)
        from capsgan_toolkit.evaluation import preflight

        preflight(resolved, plugins.registry, self.c.info)  # e.g. Inception weights missing offline: fail now

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Return everything needed to continue exactly (see the module docstring)."""
        return {
            "format": ckpt.FORMAT_VERSION,
            "toolkit_version": __version__,
            "recipe": self.resolved.to_dict(),
            "recipe_digest": self.resolved.digest(),
            "models": {name: m.state_dict() for name, m in self.c.modules().items()},
            "optimizers": {"encoder_generator": self.opt_eg.state_dict(),
                           **({"discriminator": self.opt_d.state_dict()} if self.opt_d else {})},
            "gate": self.c.gate.state_dict(),
            "position": {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step},
            "running": {"encoder_acc": self.encoder_acc, "disc_acc": self.disc_acc,
                        "skipped_steps": self.skipped_steps, "best_test_acc": self.best_test_acc,
                        "elapsed": self.elapsed, "accumulator": self._acc},
            "rng": _rng_state(),
        }

    def _restore(self, state: dict[str, Any], path) -> None:
        expected = set(self.c.modules())
        if set(state.get("models", {})) != expected:
            raise CheckpointError(
                f"{path} holds models {sorted(state.get('models', {}))}, but this recipe builds "
                f"{sorted(expected)}. It comes from another recipe."
            )
        try:
            for name, module in self.c.modules().items():
                module.load_state_dict(state["models"][name])
            self.opt_eg.load_state_dict(state["optimizers"]["encoder_generator"])
            if self.opt_d is not None:
                self.opt_d.load_state_dict(state["optimizers"]["discriminator"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(
                f"{path} does not fit the models of this recipe ({str(exc).splitlines()[0]}). "
                "It comes from another recipe or an incompatible plugin version."
            ) from None
        self.c.gate.load_state_dict(state["gate"])
        pos, run = state["position"], state["running"]
        self.epoch, self.batch_in_epoch, self.step = pos["epoch"], pos["batch_in_epoch"], pos["step"]
        self.encoder_acc, self.disc_acc = run["encoder_acc"], run["disc_acc"]
        self.skipped_steps, self.best_test_acc = run["skipped_steps"], run["best_test_acc"]
        self.elapsed, self._acc = run["elapsed"], run["accumulator"]
        _set_rng_state(state["rng"])
        self.metrics.truncate_after(self.step, self.epoch)

    def save(self, name: str) -> Path:
        """Write checkpoint ``name`` atomically into checkpoints/."""
        path = ckpt.save_checkpoint(self.state_dict(), self.ckpt_dir / name)
        self._last_minutes_ckpt = time.monotonic()
        return path

    def _save_periodic(self) -> None:
        self.save(ckpt.periodic_name(self.step))
        ckpt.prune(self.ckpt_dir, self.recipe.checkpoint.keep_last)

    # ------------------------------------------------------------------ one step

    @staticmethod
    def _new_accumulator() -> dict[str, Any]:
        return {"sums": {}, "counts": {}, "images": 0, "time": 0.0}

    def _add(self, key: str, value: float) -> None:
        self._acc["sums"][key] = self._acc["sums"].get(key, 0.0) + float(value)
        self._acc["counts"][key] = self._acc["counts"].get(key, 0) + 1

    def _check_finite(self, values: dict[str, torch.Tensor], what: str) -> bool:
        bad = [name for name, v in values.items() if not torch.isfinite(v).all()]
        if not bad:
            return True
        if self.recipe.run.on_nan == "skip":
            if not self._step_skipped:  # count steps, not the checks that failed within one
                self.skipped_steps += 1
                self._step_skipped = True
            return False
        last = ckpt.latest(self.ckpt_dir)
        kept = (f"the last good checkpoint, {last}, is intact" if last is not None
                else "no checkpoint had been written yet")
        raise NumericalError(
            f"Step {self.step + 1} (epoch {self.epoch}, as numbered in metrics.jsonl): {what} "
            f"{', '.join(self._describe(name, what) for name in bad)} is NaN or Inf. Training stopped; {kept}. "
            'Lower the learning rate, or set run.on_nan = "skip" to skip such steps and count them.'
        )

    def _describe(self, name: str, what: str) -> str:
        """Name the recipe slot and plugin behind a loss (``what`` is about a loss), else the model."""
        if "loss" not in what:
            return f"the {name}"
        slot = {"discriminator": "adversarial"}.get(name, name)
        spec = getattr(self.recipe.losses, slot, None)
        trains = {"classification": "encoder", "reconstruction": "encoder and generator",
                  "adversarial": "generator", "discriminator": "discriminator"}.get(name, "models")
        plugin = f' (losses.{slot}, plugin "{spec.plugin}")' if spec is not None else ""
        return f"{name}{plugin}, which trains the {trains},"

    def _grad_norms(self, module) -> torch.Tensor:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.stack(torch._foreach_norm(grads)).sum()

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Run one step of the algorithm on a batch."""
        c, losses_cfg = self.c, self.recipe.losses
        self._step_skipped = False
        capsules = c.encoder(images)
        cls_loss = c.classification(capsules, labels)
        batch_acc = (c.encoder.class_scores(capsules).argmax(1) == labels).float().mean().item()
        phases = c.gate.decide(TrainState(
            epoch=self.epoch, step=self.step,
            encoder_acc=self.encoder_acc if self.encoder_acc is not None else 0.0,
            disc_acc=self.disc_acc, has_discriminator=c.discriminator is not None,
        ))
        values = {"classification": cls_loss}
        total = cls_loss
        d_loss = None
        if not phases.warmup:
            fake = c.generator(c.encoder.to_latent(capsules, labels))
            if c.discriminator is not None:
                if phases.discriminator:
                    real_logits = c.discriminator(images)
                    fake_logits = c.discriminator(fake.detach())
                    d_loss = c.adversarial.discriminator_loss(real_logits, fake_logits)
                    if self._check_finite({"discriminator": d_loss}, "the loss"):
                        self.opt_d.zero_grad(set_to_none=True)
                        d_loss.backward()
                        if self._check_finite({"discriminator": self._grad_norms(c.discriminator)}, "the gradient of"):
                            self.opt_d.step()
                else:
                    with torch.no_grad():
                        real_logits = c.discriminator(images)
                        fake_logits = c.discriminator(fake.detach())
                d_acc = 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()).item()
                self.disc_acc = d_acc if self.disc_acc is None else self._ema(self.disc_acc, d_acc)
            if phases.generator:
                gen = torch.zeros((), device=images.device)
                if c.reconstruction is not None:
                    values["reconstruction"] = c.reconstruction(fake, images)
                    gen = gen + losses_cfg.reconstruction_weight * values["reconstruction"]
                if c.discriminator is not None:
                    values["adversarial"] = c.adversarial.generator_loss(c.discriminator(fake))
                    gen = gen + losses_cfg.adversarial_weight * values["adversarial"]
                total = total + losses_cfg.generator_weight * gen
        if self._check_finite(values, "the loss"):
            self.opt_eg.zero_grad(set_to_none=True)
            total.backward()
            norms = {"encoder": self._grad_norms(c.encoder), "generator": self._grad_norms(c.generator)}
            if self._check_finite(norms, "the gradient of"):
                self.opt_eg.step()

        self.encoder_acc = batch_acc if self.encoder_acc is None else self._ema(self.encoder_acc, batch_acc)
        for name, v in values.items():
            self._add(f"loss_{name}", v.item())
        if d_loss is not None:
            self._add("loss_discriminator", d_loss.item())
        self._add("batch_acc", batch_acc)
        self._add("gate_generator", float(phases.generator))
        self._add("gate_discriminator", float(phases.discriminator))
        self._add("gate_warmup", float(phases.warmup))
        for key, value in c.encoder.diagnostics.items():
            self._add(key, value)
        self.last_phases = phases

    def _ema(self, running: float, value: float) -> float:
        m = self.recipe.run.running_momentum
        return m * running + (1 - m) * value

    def _log_interval(self) -> dict[str, Any]:
        acc = self._acc
        row: dict[str, Any] = {"kind": "train", "epoch": self.epoch, "step": self.step,
                               "encoder_acc": self.encoder_acc, "disc_acc": self.disc_acc,
                               "gate": self.last_phases.label(), "skipped_steps": self.skipped_steps}
        for key, total in acc["sums"].items():
            row[key] = total / acc["counts"][key]
        row["images_per_s"] = acc["images"] / acc["time"] if acc["time"] > 0 else None
        self.metrics.append(row)
        self._acc = self._new_accumulator()
        return row

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Return test accuracy and reconstruction MSE of the current models."""
        enc, gen = self.c.encoder, self.c.generator
        enc.eval(), gen.eval()
        loader = DataLoader(self.test_set, batch_size=max(self.batch_size, 64), shuffle=False)
        correct = total = 0
        sq_err = 0.0
        for i, (images, labels) in enumerate(loader):
            if self.recipe.run.eval_batches and i >= self.recipe.run.eval_batches:
                break
            images, labels = images.to(self.device), labels.to(self.device)
            capsules = enc(images)
            correct += (enc.class_scores(capsules).argmax(1) == labels).sum().item()
            total += labels.numel()
            sq_err += (gen(enc.to_latent(capsules)) - images).pow(2).mean(dim=(1, 2, 3)).sum().item()
        enc.train(), gen.train()
        return {"test_acc": correct / max(total, 1), "test_recon_mse": sq_err / max(total, 1)}

    @torch.no_grad()
    def save_samples(self, name: str) -> Path:
        """Save real test images above their reconstructions."""
        n = self.recipe.output.sample_images
        images = torch.stack([self.test_set[i][0] for i in range(min(n, len(self.test_set)))]).to(self.device)
        self.c.encoder.eval(), self.c.generator.eval()
        recon = self.c.generator(self.c.encoder.to_latent(self.c.encoder(images)))
        self.c.encoder.train(), self.c.generator.train()
        return save_pairs(images, recon, self.samples_dir / name)

    def save_traversal(self, images: int = 2) -> Path:
        """Save the capsule traversal picture of a few test images (``traversal.png``)."""
        batch = torch.stack([self.test_set[i][0] for i in range(min(images, len(self.test_set)))]).to(self.device)
        return save_traversal(self.c.encoder, self.c.generator, batch, self.run_dir / "traversal.png")

    def _end_epoch(self) -> dict[str, Any]:
        metrics = self.evaluate()
        row = {"kind": "epoch", "epoch": self.epoch, "step": self.step, **metrics,
               "encoder_acc": self.encoder_acc, "disc_acc": self.disc_acc, "time_s": self.elapsed}
        self.metrics.append(row)
        from capsgan_toolkit.evaluation import periodic_evaluation

        periodic_evaluation(self)  # a row of kind "eval" when eval.every_epochs says so
        if (self.epoch + 1) % self.recipe.output.samples_every_epochs == 0 or self.epoch + 1 == self.recipe.run.epochs:
            self.save_samples(f"epoch_{self.epoch + 1:03d}.png")
        plot_curves(read_metrics(self.metrics.path), self.run_dir / "curves.png", title=self.recipe.run.name)
        if metrics["test_acc"] > self.best_test_acc:
            self.best_test_acc = metrics["test_acc"]
            self._best_pending = True
        else:
            self._best_pending = False
        return row

    # ------------------------------------------------------------------ loop

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

    def fit(self) -> dict[str, Any]:
        """Train to the end of the recipe; return the run summary."""
        run = self.recipe.run
        previous = self._install_signals()
        self.plugins.emit("run_start", {"run_dir": str(self.run_dir), "recipe": self.resolved.to_dict()})
        self._best_pending = False
        try:
            with self._progress() as progress:
                task = progress.add_task("train", total=run.epochs * self.batches_per_epoch,
                                         completed=self.epoch * self.batches_per_epoch + self.batch_in_epoch,
                                         status="")
                while self.epoch < run.epochs:
                    self._run_epoch(progress, task)
                    row = self._end_epoch()
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    every = self.recipe.checkpoint.every_epochs
                    if self._best_pending:
                        self.save("best.pt")
                    if every and self.epoch % every == 0 and self.epoch < run.epochs:
                        self._save_periodic()
                    self._say_epoch(row)
                    self.plugins.emit("epoch_end", {"run_dir": str(self.run_dir), "metrics": row})
                    if self._stop_signal is not None and self.epoch < run.epochs:
                        self._interrupt()  # the signal came during the end-of-epoch work
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
        self.save("final.pt")
        self.save_traversal()
        summary = self.summary()
        self.plugins.emit("run_end", {"run_dir": str(self.run_dir), "summary": summary})
        return summary

    def _run_epoch(self, progress, task) -> None:
        run = self.recipe.run
        order = epoch_permutation(run.seed, self.epoch, len(self.train_set))
        batches = [order[i * self.batch_size:(i + 1) * self.batch_size].tolist()
                   for i in range(self.batch_in_epoch, self.batches_per_epoch)]
        # An own generator: iterating a DataLoader draws its base seed from the generator it is
        # given, which by default is the global one, and a resumed epoch builds an extra loader.
        loader = DataLoader(self.train_set, batch_sampler=batches,
                            num_workers=self.resolved.params["data"].num_workers,
                            generator=torch.Generator().manual_seed(run.seed * 1_000_003 + self.epoch))
        tick = time.perf_counter()
        for images, labels in loader:
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            self.train_step(images, labels)
            self.batch_in_epoch += 1
            self.step += 1
            now = time.perf_counter()
            self._acc["images"] += images.shape[0]
            self._acc["time"] += now - tick
            self.elapsed += now - tick
            tick = now
            if self.step % run.log_every == 0:
                row = self._log_interval()
                progress.update(task, status=self._status(row))
            progress.advance(task)
            if self._stop_signal is not None:
                self._interrupt()
            minutes = self.recipe.checkpoint.every_minutes
            if minutes and time.monotonic() - self._last_minutes_ckpt >= 60 * minutes:
                self._save_periodic()

    def _interrupt(self) -> None:
        path = self.save("interrupt.pt")
        name = signal.Signals(self._stop_signal).name
        raise Interrupted(
            f"Stopped by {name} at epoch {self.epoch}, step {self.step}; checkpoint saved to {path}. "
            f"Resume with: capsgan run --resume {self.run_dir}"
        )

    def _status(self, row: dict[str, Any]) -> str:
        parts = [f"cls {row.get('loss_classification', float('nan')):.3f}",
                 f"acc {row['encoder_acc']:.2f}"]
        if row.get("loss_reconstruction") is not None:
            parts.append(f"rec {row['loss_reconstruction']:.3f}")
        if row.get("disc_acc") is not None:
            parts.append(f"D acc {row['disc_acc']:.2f}")
        parts.append(row["gate"])
        return " | ".join(parts)

    def _progress(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        if self.console is None:
            return _NullProgress()
        return Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
            console=self.console, transient=False, disable=not self.console.is_terminal,
        )

    def _say_epoch(self, row: dict[str, Any]) -> None:
        if self.console is None:
            return
        d = "-" if row["disc_acc"] is None else f"{row['disc_acc']:.2f}"
        self.console.print(
            f"epoch {row['epoch'] + 1}/{self.recipe.run.epochs}  step {row['step']}  "
            f"test acc {row['test_acc']:.3f}  recon mse {row['test_recon_mse']:.4f}  "
            f"train acc {row['encoder_acc']:.3f}  D acc {d}  ({row['time_s']:.0f}s)"
        )

    def summary(self) -> dict[str, Any]:
        rows = read_metrics(self.metrics.path)
        epochs = [r for r in rows if r.get("kind") == "epoch"]
        speeds = [r["images_per_s"] for r in rows if r.get("kind") == "train" and r.get("images_per_s")]
        last = epochs[-1] if epochs else {}
        peak = (torch.cuda.max_memory_allocated() if self.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return {
            "name": self.recipe.run.name,
            "epochs": self.epoch, "steps": self.step,
            "test_acc": last.get("test_acc"), "test_recon_mse": last.get("test_recon_mse"),
            "best_test_acc": self.best_test_acc,
            "train_time_s": self.elapsed,
            "images_per_s": (sum(speeds) / len(speeds)) if speeds else None,
            "peak_memory_bytes": peak, "device": str(self.device),
            "parameters": {name: count_parameters(m) for name, m in self.c.modules().items()},
            "skipped_steps": self.skipped_steps,
        }


class _NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass

    def advance(self, *args, **kwargs):
        pass
