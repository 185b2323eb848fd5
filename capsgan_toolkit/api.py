"""The library API behind the commands: load a recipe, train, load a trained run, evaluate.

The CLI and ``capsgan compare`` call these functions; a script can too::

    from capsgan_toolkit import api
    summary = api.train("recipes/quickstart.toml", out="runs/qs", sets=["run.epochs=1"])
    result = api.evaluate("runs/qs", metrics=["acc", "rec"], num_images=500)
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from capsgan_toolkit import __version__
from capsgan_toolkit.errors import CapsganError, CheckpointError, RecipeError
from capsgan_toolkit.plugin.manager import PluginSet, load_plugins
from capsgan_toolkit.recipe.build import Built, build, pick_device
from capsgan_toolkit.recipe.schema import ResolvedRecipe, apply_overrides, resolve, with_defaults
from capsgan_toolkit.recipe.toml_io import read_toml
from capsgan_toolkit.rundir import checkpoint as ckpt
from capsgan_toolkit.rundir.folder import RunDir, breaking_changes
from capsgan_toolkit.step.ema import load_averaged

if TYPE_CHECKING:
    from capsgan_toolkit.training.trainer import Trainer


def load_recipe(path: str | Path, sets=(), *, strict_plugins: bool = False,
                warn: Callable[[str], None] | None = None) -> tuple[PluginSet, ResolvedRecipe]:
    """Read a recipe, apply ``--set`` overrides, load the plugins it needs and validate it.

    Args:
        path: the TOML recipe.
        sets: ``key.path=value`` overrides.
        strict_plugins: turn a broken plugin or a plugin warning into an error.
        warn: receives one line per broken plugin or plugin warning (``None``: ignored).
    """
    return _RecipeFile.read(path, sets).load(strict_plugins=strict_plugins, warn=warn)


@dataclass
class _RecipeFile:
    """A recipe file read once, with its ``--set`` overrides applied: not yet validated.

    :func:`train` reads the file before the process group is joined (``run.device`` picks its
    backend) and validates the same text after (plugin warnings are shown on rank 0 only).
    """

    path: str | Path
    data: dict[str, Any]
    applied: dict[str, str]

    received: bool = False  # the recipe saved in a run folder, not the user's own: see load_plugins(received_from=)

    @classmethod
    def read(cls, path: str | Path, sets=(), *, received: bool = False) -> _RecipeFile:
        data = read_toml(path)
        return cls(path, data, apply_overrides(data, list(sets)), received)

    @property
    def device(self) -> str:
        """``run.device`` as given (for the process-group backend), before the recipe is validated."""
        run = self.data.get("run", {})
        return str(run.get("device", "auto")) if isinstance(run, dict) else "auto"

    def load(self, *, strict_plugins: bool = False,
             warn: Callable[[str], None] | None = None) -> tuple[PluginSet, ResolvedRecipe]:
        """Load the plugins the recipe names (``run.plugins``) and validate it with them."""
        run = self.data.get("run", {})
        extra = run.get("plugins", []) if isinstance(run, dict) else []
        if not isinstance(extra, list) or not all(isinstance(x, str) for x in extra):
            raise RecipeError(f"{self.path}: run.plugins must be a list of module names, got {extra!r}.")
        plugins = load_plugins(extra, strict=strict_plugins, received_from=self.path if self.received else None)
        _report_plugins(plugins, warn)
        return plugins, resolve(self.data, plugins.registry, source=str(self.path), overrides=self.applied)


def _report_plugins(plugins: PluginSet, warn) -> None:
    if warn is None:
        return
    for broken in plugins.broken:
        warn(f"{broken.describe()}. Its components are unavailable.")
    for line in getattr(plugins, "warnings", []):
        warn(line)


def train(recipe: str | Path | None = None, *, out: str | Path | None = None, sets=(), resume: bool = False,
          overwrite: bool = False, console=None, strict_plugins: bool = False,
          loaded: tuple[PluginSet, ResolvedRecipe] | None = None) -> dict[str, Any]:
    """Train a recipe into a run folder and return the run's summary.

    Args:
        recipe: the TOML recipe (may be omitted when resuming: the run's own recipe is used).
        out: the run folder (default: ``runs/<run.name>``).
        sets: ``key.path=value`` overrides.
        resume: continue the run in ``out`` if it holds one (exactly, from its newest
            checkpoint); a finished run is returned as it is; a folder without a run starts one.
        overwrite: delete an existing run folder first (only a run folder no other process writes).
        console: a rich console for progress (``None``: quiet).
        strict_plugins: see :func:`load_recipe`.
        loaded: what :func:`load_recipe` returned for ``recipe`` and ``sets`` (without ``warn``), when the
            caller has it already (``capsgan run --resume latest`` needs the run's name first): the recipe
            is then not read again, and its plugin warnings are shown here.
    """
    from capsgan_toolkit.step import distributed

    resumed = RunDir(out) if resume and out is not None and RunDir(out).is_run() else None  # the run to continue
    if resumed is not None and resumed.is_finished() and not sets:
        final = resumed.checkpoint_file("final.pt")
        try:
            ckpt.load_checkpoint(final)  # "done" only when what it finished with can be read
        except CheckpointError as exc:
            raise CheckpointError(
                f"{resumed.path} finished training, but {exc} {resumed.other_checkpoints(final)} "
                "Or train it again from the start with --overwrite.") from None
        return resumed.read_summary()
    recipe_in: _RecipeFile | tuple[PluginSet, ResolvedRecipe]
    if loaded is not None:
        recipe_in = loaded
    else:  # the one read of the recipe file
        path = (recipe or resumed.recipe_file) if resumed is not None else recipe
        if path is None:
            raise CapsganError("Give a RECIPE to train, or --resume RUN_DIR to continue a run.")
        recipe_in = _RecipeFile.read(path, sets, received=recipe is None)
    device = recipe_in.device if isinstance(recipe_in, _RecipeFile) else recipe_in[1].recipe.run.device
    dist = distributed.setup(device)  # torchrun: join the process group (else nothing)
    held = contextlib.ExitStack()  # the run folder's lock (rank 0), released when training ends
    try:
        console = console if dist.is_main else None
        warn = None if console is None else (lambda line: console.print(f"[yellow]warning:[/] {line}", highlight=False))
        if isinstance(recipe_in, _RecipeFile):
            plugins, resolved = recipe_in.load(strict_plugins=strict_plugins, warn=warn)
        else:
            plugins, resolved = recipe_in
            _report_plugins(plugins, warn)
        if resumed is not None:
            trainer = _resume(resumed, plugins, resolved, console=console, dist=dist, held=held)
        else:
            trainer = _start(out, plugins, resolved, overwrite=overwrite, console=console, dist=dist, held=held)
        if console is not None:
            r = resolved.recipe
            parts = ", ".join(f"{k} {getattr(r, k).plugin}" for k in ("encoder", "generator", "discriminator")
                              if getattr(r, k) is not None)
            console.print(f"Training [bold]{r.run.name}[/] ({r.objective.plugin}: {parts}) on {trainer.device}, data "
                          f"{r.data.plugin} ({len(trainer.train_set)} train images) -> {trainer.rd.path}",
                          highlight=False)
        summary = trainer.fit()
        # The ranks leave the group together, once rank 0 has written the run's last files, rather than
        # the others tearing their group down while rank 0 still works (a 2-process gloo run once
        # aborted in rank 1 at an unknown point; this race is the one the code had).
        dist.barrier()
        return summary
    finally:
        held.close()
        distributed.teardown()


def _resume(rd: RunDir, plugins: PluginSet, resolved: ResolvedRecipe, *, console, dist,
            held: contextlib.ExitStack) -> Trainer:
    """Return the trainer that continues the run in ``rd`` with ``resolved`` (refused if it breaks the run).

    Rank 0 takes the folder's lock first (into ``held``): a second writer is refused before anything changes.
    """
    from capsgan_toolkit.training.trainer import Trainer

    if dist.is_main:
        held.enter_context(rd.lock("training (resumed)"))
    checkpoint_path = rd.resume_checkpoint()
    state = ckpt.load_checkpoint(checkpoint_path) if checkpoint_path is not None else None  # read once
    changes = (breaking_changes(with_defaults(state["recipe"], plugins.registry), resolved.to_dict())
               if state is not None else [])
    if changes:
        raise CapsganError(
            f"Cannot resume {rd.path} with this recipe: these keys changed in ways that break the run:\n  "
            + "\n  ".join(changes) + "\nResume with the run's own recipe (omit RECIPE), or start a new run with --out.")
    if dist.is_main:
        rd.write_recipe(resolved)
        if state is None:
            rd.metrics_file.unlink(missing_ok=True)  # rows of the attempt that left no checkpoint
    if console is not None:
        console.print(f"Resuming {rd.path} from {checkpoint_path.name}" if checkpoint_path is not None
                      else f"{rd.path} holds no checkpoint yet: starting it from the beginning", highlight=False)
    return Trainer(resolved, plugins, rd.path, console=console, resume_from=state)


def _start(out: str | Path | None, plugins: PluginSet, resolved: ResolvedRecipe, *, overwrite: bool, console,
           dist, held: contextlib.ExitStack) -> Trainer:
    """Return the trainer of a new run of ``resolved`` in ``out`` (default: ``runs/<run.name>``).

    Rank 0 makes the folder and keeps its lock (in ``held``) until training ends.
    """
    from capsgan_toolkit.training.trainer import Trainer

    if not dist.is_main:
        dist.barrier()  # rank 0 downloads the data and makes the folder first
    built = build(resolved, plugins)  # contracts are checked before any folder is made
    path = Path(out) if out else RunDir.default_path(resolved)
    if dist.is_main:
        rd = RunDir.create(path, overwrite=overwrite)
        held.callback(rd.unlock)
        rd.write_recipe(resolved)
        dist.barrier()
    else:
        rd = RunDir(path)
    try:
        return Trainer(resolved, plugins, rd.path, console=console, built=built)
    except CapsganError:
        if dist.is_main:
            rd.discard_unstarted()  # e.g. a missing data set: the same command works once fixed
        raise


@dataclass
class LoadedRun:
    """A run folder's checkpoint, rebuilt: recipe, plugins, components with their weights."""

    rd: RunDir
    checkpoint: Path
    epoch: int
    step: int
    resolved: ResolvedRecipe
    plugins: PluginSet
    built: Built
    device: torch.device
    weights: str = "raw"
    """``"ema"`` when the models hold the checkpoint's averaged weights (``[ema]``), else ``"raw"``."""
    ema: dict[str, Any] | None = None
    """The averaging (decay, warmup, updates, models), when :attr:`weights` is ``"ema"``."""

    @property
    def run_dir(self) -> Path:
        return self.rd.path

    @property
    def objective(self):
        return self.built.objective

    def evaluator(self, progress=None):
        """Return an Evaluator of this run (``progress``: a rich Console for progress bars, or ``None``)."""
        from capsgan_toolkit.evaluation.evaluator import Evaluator

        return Evaluator(self.resolved, self.plugins.registry, objective=self.built.objective,
                         dataset=self.built.dataset, device=self.device, progress=progress)


def load_trained(run_dir, *, checkpoint: str | None = None, eval_overrides: dict[str, Any] | None = None,
                 sets=(), device: str | None = None, inception_weights: str | None = None,
                 use_ema: bool = True, trusted_plugins: Iterable[str] = ()) -> LoadedRun:
    """Rebuild a trained run from its folder for evaluation or sampling.

    Args:
        run_dir: the run folder.
        checkpoint: ``final``, ``best``, ``latest``, a file name in checkpoints/ or a path (default: final, else newest).
        eval_overrides: ``[eval]`` keys to replace (from command-line options).
        sets: ``eval.key=value`` overrides; other keys would change the model and are refused.
        device: ``auto``/``cpu``/``cuda``/``mps`` (default: the recipe's run.device).
        inception_weights: a local Inception weights file; adds an ``inception`` extractor.
        use_ema: load the checkpoint's averaged weights (``[ema]``) instead of the trained ones, when it has them.
        trusted_plugins: modules of the checkpoint's ``run.plugins`` that the caller's own recipe names too.
            The others are imported from installed packages or ``PYTHONPATH`` only, never from the current
            folder: a run folder someone sent does not run code by being opened.
    """
    rd = RunDir(run_dir)
    path = rd.checkpoint(checkpoint)
    try:
        state = ckpt.load_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} {rd.other_checkpoints(path)}") from None
    data = copy.deepcopy(state["recipe"])
    for text in sets:
        if not text.split("=", 1)[0].strip().startswith("eval."):
            raise RecipeError(f"--set {text}: only eval.* keys can change when evaluating a trained run "
                              "(the others describe the model that was trained).")
    applied = apply_overrides(data, list(sets))
    section = data.setdefault("eval", {})
    section.update(eval_overrides or {})
    if inception_weights:
        from capsgan_toolkit.catalogue import add_inception

        data["eval"] = add_inception(section, str(inception_weights))
    plugins = load_plugins(data.get("run", {}).get("plugins", []), received_from=path, trusted=trusted_plugins)
    resolved = resolve(data, plugins.registry, source=f"{path} (the run's recipe)", overrides=applied, training=False)
    target = pick_device(device or resolved.recipe.run.device)
    built = build(resolved, plugins, check=False)
    try:
        for name, module in built.modules().items():
            module.load_state_dict(state["models"][name])
        averaged = load_averaged(built.modules(), state.get("ema") if use_ema else None)
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path} does not fit the models of its own recipe ({str(exc).splitlines()[0]}); "
                              "the plugins changed since it was trained.") from None
    for module in built.modules().values():
        module.to(target).eval()
    position = state.get("position", {})
    ema = ({k: v for k, v in state["ema"].items() if k != "models"} | {"models": averaged}) if averaged else None
    return LoadedRun(rd=RunDir(path.parent.parent), checkpoint=path, epoch=position.get("epoch", 0),
                     step=position.get("step", 0), resolved=resolved, plugins=plugins, built=built, device=target,
                     weights="ema" if averaged else "raw", ema=ema)


def evaluate(run_dir, *, checkpoint: str | None = None, metrics: list[str] | None = None,
             num_images: int | None = None, sets=(), device: str | None = None, inception_weights: str | None = None,
             out: str | Path | None = None, console=None, trusted_plugins: Iterable[str] = ()) -> dict[str, Any]:
    """Evaluate a trained run with its recipe's ``[eval]`` protocol (or the overrides); write and return eval.json.

    Writing into the run folder (no ``out``), it holds the folder's lock throughout: refused at once
    while another process writes the folder. ``trusted_plugins``: see :func:`load_trained`.
    """
    with contextlib.ExitStack() as held:
        if out is None and Path(run_dir).is_dir():  # a missing folder: load_trained says so
            held.enter_context(RunDir(run_dir).lock("evaluating"))
        return _evaluate(run_dir, checkpoint=checkpoint, metrics=metrics, num_images=num_images, sets=sets,
                         device=device, inception_weights=inception_weights, out=out, console=console,
                         trusted_plugins=trusted_plugins)


def _evaluate(run_dir, *, checkpoint, metrics, num_images, sets, device, inception_weights, out,
              console, trusted_plugins) -> dict[str, Any]:
    from capsgan_toolkit.evaluation.evaluator import preflight

    overrides: dict[str, Any] = {}
    if metrics is not None:
        overrides["metrics"] = list(metrics)
    if num_images is not None:
        overrides["num_images"] = num_images
    run = load_trained(run_dir, checkpoint=checkpoint, eval_overrides=overrides, sets=tuple(sets), device=device,
                       inception_weights=inception_weights, trusted_plugins=trusted_plugins)
    preflight(run.resolved, run.plugins.registry, run.built.info)  # missing weights fail before slow work
    if console is not None:
        console.print(f"Evaluating {run.checkpoint} (epoch {run.epoch}, step {run.step}) on {run.device}",
                      highlight=False)
    start = time.perf_counter()
    report = run.evaluator(progress=console).run()
    import torch_fidelity

    result = {
        "run_dir": str(run.run_dir), "checkpoint": str(run.checkpoint), "epoch": run.epoch, "step": run.step,
        "objective": run.resolved.recipe.objective.plugin,
        "recipe_digest": run.resolved.digest(), "toolkit_version": __version__,
        "torch_fidelity_version": torch_fidelity.__version__, "device": str(run.device),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.perf_counter() - start, 2),
        "eval": run.resolved.to_dict()["eval"], "weights": run.weights, **({"ema": run.ema} if run.ema else {}),
        **report.to_dict(),
    }
    run.rd.write_eval(result, out)
    if out is None:  # the run's own results: observers (an experiment tracker that logged the run) see them
        from capsgan_toolkit.plugin.events import EvaluationDone, emit

        emit(run.plugins.manager, EvaluationDone(run.run_dir, run.epoch, run.step, dict(report.metrics),
                                                 dict(report.protocol)))
    return result
