"""What a training run shows and measures besides the step: per-epoch metrics, pictures, progress, summary.

A :class:`~capsgan_toolkit.training.trainer.Trainer` holds one :class:`Monitor`, made with what it
reads: the recipe, the built parts, the data splits, the run folder and metrics log, the position
and the EMA (the position changes during training: the monitor reads it when it measures). It never
moves the global random state: every method that runs the models or a data loader runs under
:func:`~capsgan_toolkit.training.state.kept_rng` (a ``DataLoader`` without a generator draws its seed from
torch's global RNG), so a run that is watched closely trains exactly as one that is not, and a run stopped
part-way through an epoch (``run.max_steps``, ``run.max_minutes``) resumes exactly as if it had not stopped.
"""

from __future__ import annotations

import functools
import resource
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import torch

from capsgan_toolkit.data import batch_loader, class_balanced_indices, split_labels
from capsgan_toolkit.interfaces import Phases
from capsgan_toolkit.plugin.events import EvaluationDone, emit
from capsgan_toolkit.plugin.manager import PluginSet
from capsgan_toolkit.progress import rich_bars
from capsgan_toolkit.recipe.build import Built, count_parameters
from capsgan_toolkit.recipe.schema import ResolvedRecipe
from capsgan_toolkit.rundir.folder import RunDir
from capsgan_toolkit.rundir.reporting import MetricsLog, plot_curves, read_metrics, save_grid, save_pairs, save_traversal
from capsgan_toolkit.step.distributed import DiscardLog
from capsgan_toolkit.step.ema import EMA, averaged
from capsgan_toolkit.training.state import DataPlan, Position, kept_rng

if TYPE_CHECKING:
    from rich.console import Console

    from capsgan_toolkit.evaluation.evaluator import Evaluator

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _keeps_rng(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``method`` under :func:`kept_rng`: whatever it draws, the training's random stream is unmoved."""

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with kept_rng():
            return method(*args, **kwargs)

    return wrapper


class Monitor:
    """Per-epoch measurements, sample pictures, periodic evaluation, progress and the summary.

    Args:
        resolved: the run's recipe.
        plugins: the loaded plugins (registry for the evaluator, manager for events).
        built: the components (on ``device``).
        data: the run's splits (test and validation sets are measured) and batch size.
        device: where the models are.
        rd: the run folder (pictures, curves, the evaluation protocol).
        metrics: the run's metrics log (rows of kind "train" and "eval" are appended).
        pos: the run's position and running values (read when a row or the summary is made).
        ema: the averaged weights (pictures and evaluations use them), ``None`` without ``[ema]``.
        console: a rich console for progress and epoch lines (``None``: quiet).
        flops_per_image: each part's forward FLOPs per image (for the summary).
    """

    def __init__(self, resolved: ResolvedRecipe, plugins: PluginSet, built: Built, *, data: DataPlan,
                 device: torch.device, rd: RunDir, metrics: MetricsLog | DiscardLog, pos: Position,
                 ema: EMA | None = None, console: Console | None = None,
                 flops_per_image: dict[str, int] | None = None) -> None:
        self.resolved, self.recipe, self.plugins, self.built = resolved, resolved.recipe, plugins, built
        self.objective, self.data, self.test_set, self.device = built.objective, data, data.test_set, device
        self.rd, self.metrics, self.pos, self.ema, self.console = rd, metrics, pos, ema, console
        self.flops_per_image = flops_per_image if flops_per_image is not None else {}
        self._evaluator: Evaluator | None = None  # made at the first periodic evaluation
        labels = split_labels(self.test_set, 4096)  # read from the labels tensor where there is one: no image decoding
        self.sample_indices = class_balanced_indices(labels, self.recipe.output.sample_images)

    # ------------------------------------------------------------------ per epoch

    @torch.no_grad()
    def _accuracy_and_mse(self, dataset, limit_batches: int = 0) -> dict[str, float]:
        from capsgan_toolkit.evaluation.scores import recon_mse01

        obj, device = self.objective, self.device
        correct = total = 0
        sq = 0.0
        loader = batch_loader(dataset, batch_size=max(self.data.batch_size, 64))
        for i, (images, labels) in enumerate(loader):
            if limit_batches and i >= limit_batches:
                break
            images, labels = images.to(device), labels.to(device)
            scores, recon = obj.classify_and_reconstruct(images)
            if scores is not None:
                correct += (scores.argmax(1) == labels).sum().item()
            if recon is not None:
                sq += recon_mse01(recon, images).sum().item()
            total += labels.numel()
        out = {}
        if obj.has_classifier:
            out["acc"] = correct / max(total, 1)
        if obj.has_reconstruction:
            out["rec_mse01"] = sq / max(total, 1)
        return out

    @_keeps_rng
    def epoch_metrics(self) -> dict[str, float]:
        """Return test accuracy / reconstruction MSE (and validation accuracy) of the current models."""
        obj = self.objective
        obj.eval()
        try:
            limit = self.recipe.run.eval_batches
            row = {f"test_{k}": v for k, v in self._accuracy_and_mse(self.test_set, limit).items()}
            if self.data.val_set is not None and obj.has_classifier:
                row["val_acc"] = self._accuracy_and_mse(self.data.val_set, limit).get("acc")
        finally:
            obj.train()
        return row

    @_keeps_rng
    @torch.no_grad()
    def save_samples(self, epoch: int):
        """Save real test images of every class above their reconstructions, or a grid of new images.

        With ``[ema]`` the averaged weights make the picture (swapped in and back out).
        """
        obj, device, path = self.objective, self.device, self.rd.sample_file(epoch)
        images = torch.stack([self.test_set[i][0] for i in self.sample_indices]).to(device)
        labels = torch.tensor([int(self.test_set[i][1]) for i in self.sample_indices], device=device)
        obj.eval()
        try:
            with averaged(self.ema):
                if obj.has_reconstruction:
                    return save_pairs(images, obj.reconstruct(images), path, min_cell=64)  # big enough to see
                if obj.has_generation:
                    fixed = torch.Generator().manual_seed(self.recipe.run.seed + 12345)  # the same noise every epoch
                    fake = obj.generate(labels.cpu(), fixed)
                    scale = max(1, -(-64 // fake.shape[-1]))  # cells of at least 64 px, to be seen
                    fake = torch.nn.functional.interpolate(fake, scale_factor=scale, mode="nearest")
                    return save_grid(fake, path, nrow=min(8, fake.shape[0]))
        finally:
            obj.train()
        return None

    @_keeps_rng
    @torch.no_grad()
    def histograms(self) -> dict[str, list[float]]:
        """Return the class capsules' lengths on the sample test images (all, and the true class's)."""
        encoder = self.built.parts.encoder
        if encoder is None or not self.sample_indices:
            return {}
        images = torch.stack([self.test_set[i][0] for i in self.sample_indices]).to(self.device)
        labels = torch.tensor([int(self.test_set[i][1]) for i in self.sample_indices])
        mode = encoder.training
        encoder.eval()
        try:
            with averaged(self.ema):
                lengths = encoder.class_scores(encoder(images)).float().cpu()
        finally:
            encoder.train(mode)
        return {"capsule_length": lengths.flatten().tolist(),
                "capsule_length_true_class": lengths.gather(1, labels[:, None]).flatten().tolist()}

    @_keeps_rng
    def save_traversal(self):
        p = self.built.parts
        if p.encoder is None or p.generator is None or not self.objective.has_reconstruction:
            return None
        batch = torch.stack([self.test_set[i][0] for i in self.sample_indices[:2]]).to(self.device)
        with averaged(self.ema):
            return save_traversal(p.encoder, p.generator, batch, self.rd.traversal_file)

    def plot(self) -> None:
        plot_curves(read_metrics(self.rd.metrics_file), self.rd.curves_file, title=self.recipe.run.name)

    @_keeps_rng
    def periodic_evaluation(self, epoch: int, step: int) -> dict[str, Any] | None:
        """Evaluate when ``eval.every_epochs`` says so; append a row of kind "eval" and emit the event."""
        ev, done = self.recipe.eval, epoch + 1
        if not ev.every_epochs or not ev.metrics or (done % ev.every_epochs and done != self.recipe.run.epochs):
            return None
        # Building extractors may draw weights, sampling draws noise: all under _keeps_rng, not from the run's RNG.
        if self._evaluator is None:  # one per run: extractors are prepared once
            from capsgan_toolkit.evaluation.evaluator import Evaluator

            self._evaluator = Evaluator(self.resolved, self.plugins.registry, objective=self.objective,
                                        dataset=self.built.dataset, device=self.device,
                                        progress=self.console)
        with averaged(self.ema):  # the averaged weights, when the run keeps them
            report = self._evaluator.run()
        row = {"kind": "eval", "epoch": epoch, "step": step, **report.metrics}
        self.metrics.append(row)
        self.rd.write_eval_protocol({"epoch": epoch, "step": step, **report.to_dict()})
        emit(self.plugins.manager, EvaluationDone(self.rd.path, epoch, step, dict(report.metrics),
                                                  dict(report.protocol)))
        if self.console is not None:
            shown = "  ".join(f"{k} {v:.4g}" for k, v in report.metrics.items())
            self.console.print(f"  eval: {shown}", highlight=False)
        return row

    def log_interval(self, phases: Phases, learning_rates: dict[str, float]) -> dict[str, Any]:
        """Append the "train" row of the log interval that just ended (means of its steps) and start a new one.

        ``phases`` are the gate's of the interval's last step, ``learning_rates`` the optimizers' now.
        """
        pos, acc = self.pos, self.pos.interval
        row: dict[str, Any] = {"kind": "train", "epoch": pos.epoch, "step": pos.step,
                               "encoder_acc": pos.encoder_acc.value, "disc_acc": pos.disc_acc.value,
                               "gate": phases.label(), "skipped_steps": pos.skipped_steps,
                               **pos.means(), **learning_rates}
        row["images_per_s"] = acc["images"] / acc["time"] if acc["time"] > 0 else None
        self.metrics.append(row)
        pos.reset_interval()
        return row

    # ------------------------------------------------------------------ people

    def progress(self):
        if self.console is None:
            return _NullProgress()
        return rich_bars(self.console, "{task.fields[status]}", head="[bold]{task.description}", transient=False,
                         disable=not self.console.is_terminal)

    @staticmethod
    def status(row: dict[str, Any]) -> str:
        parts = []
        if row.get("loss_classification") is not None:
            parts.append(f"cls {row['loss_classification']:.3f}")
        if row.get("encoder_acc") is not None:
            parts.append(f"acc {row['encoder_acc']:.2f}")
        if row.get("loss_reconstruction") is not None:
            parts.append(f"rec {row['loss_reconstruction']:.3f}")
        if row.get("loss_adversarial") is not None:
            parts.append(f"adv {row['loss_adversarial']:.3f}")
        if row.get("disc_acc") is not None:
            parts.append(f"D acc {row['disc_acc']:.2f}")
        parts.append(row["gate"])
        return " | ".join(parts)

    def say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False)

    def say_epoch(self, row: dict[str, Any]) -> None:
        if self.console is None:
            return
        shown = [f"epoch {row['epoch'] + 1}/{self.recipe.run.epochs}", f"step {row['step']}"]
        for key, label in (("test_acc", "test acc"), ("val_acc", "val acc"), ("test_rec_mse01", "recon mse"),
                           ("encoder_acc", "train acc"), ("disc_acc", "D acc")):
            if row.get(key) is not None:
                shown.append(f"{label} {row[key]:.3f}")
        self.console.print("  ".join(shown) + f"  ({row['time_s']:.0f}s)", highlight=False)

    def summary(self, *, stopped_by: str | None, divergence_events: int) -> dict[str, Any]:
        """Return the run's summary (summary.json): ``stopped_by`` names the budget that ended it, if one did."""
        pos = self.pos
        rows = read_metrics(self.rd.metrics_file)
        epochs = [r for r in rows if r.get("kind") == "epoch"]
        speeds = [r["images_per_s"] for r in rows if r.get("kind") == "train" and r.get("images_per_s")]
        last = epochs[-1] if epochs else {}
        peak = (torch.cuda.max_memory_allocated() if self.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return {
            "name": self.recipe.run.name, "objective": self.recipe.objective.plugin,
            "epochs": pos.epoch, "steps": pos.step,
            "test_acc": last.get("test_acc"), "test_rec_mse01": last.get("test_rec_mse01"),
            "best_val_acc": pos.best_val_acc if pos.best_val_acc >= 0 else None,
            "train_time_s": pos.elapsed,
            "seconds_per_epoch": pos.elapsed / pos.epoch if pos.epoch else None,
            "images_per_s": (sum(speeds) / len(speeds)) if speeds else None,
            "peak_memory_bytes": peak, "device": str(self.device),
            "parameters": {name: count_parameters(m) for name, m in self.built.modules().items()},
            "flops_per_image": self.flops_per_image,
            "skipped_steps": pos.skipped_steps,
            "divergence_events": divergence_events,
            "stopped_by": stopped_by,
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
