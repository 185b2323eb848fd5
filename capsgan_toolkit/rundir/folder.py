"""The run folder: the one owner of its file names, its creation, and choosing a checkpoint.

A run folder holds::

    recipe.toml          the resolved recipe (every default filled in)
    metrics.jsonl        one JSON row per log interval ("train"), epoch ("epoch"), evaluation ("eval")
    summary.json         written when training ends: accuracy, time, speed, memory, parameters
    eval.json            written by `capsgan eval`: metrics with their protocols
    eval_protocol.json   the protocol of the last evaluation during training
    probe.json, .png     written by `capsgan probe`: the spatial-structure probe
    curves.png           training curves
    traversal.png        capsule traversal picture (objectives with an encoder and a generator)
    samples/             sample grids per epoch (epoch_001.png, ...)
    checkpoints/         step_*.pt (periodic), best.pt, final.pt, interrupt.pt
    .lock                held by the one process writing the folder (:mod:`capsgan_toolkit.rundir.lock`)

It knows files, recipes and checkpoints, not models or metrics: evaluation and the commands
import it, never the reverse. No other module builds a path inside a run folder by hand.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import tomllib

from capsgan_toolkit.errors import RunFolderError
from capsgan_toolkit.recipe.diff import RESUMABLE, recipe_diff
from capsgan_toolkit.recipe.schema import ResolvedRecipe
from capsgan_toolkit.recipe.toml_io import dumps_toml
from capsgan_toolkit.rundir import checkpoint as ckpt
from capsgan_toolkit.rundir import writes
from capsgan_toolkit.rundir.lock import LOCK_NAME, RunLock

_RECIPE_HEADER = "# Resolved from "
"""How a run folder's recipe.toml begins (:meth:`RunDir.write_recipe`)."""


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    return writes.write_json(path, data)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{path} cannot be read ({exc}). Delete it and run the command that writes it again.") from None


class RunDir:
    """A run folder and every file in it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.recipe_file = self.path / "recipe.toml"
        self.metrics_file = self.path / "metrics.jsonl"
        self.summary_file = self.path / "summary.json"
        self.eval_file = self.path / "eval.json"
        self.eval_protocol_file = self.path / "eval_protocol.json"
        self.probe_file = self.path / "probe.json"
        self.probe_picture_file = self.path / "probe.png"
        self.curves_file = self.path / "curves.png"
        self.traversal_file = self.path / "traversal.png"
        self.samples_dir = self.path / "samples"
        self.checkpoints_dir = self.path / "checkpoints"
        self.lock_file = self.path / LOCK_NAME
        self.held_lock: RunLock | None = None
        """The lock :meth:`create` took (the caller releases it with :meth:`unlock`)."""

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ creation

    @staticmethod
    def default_path(resolved: ResolvedRecipe) -> Path:
        """Return ``runs/<run.name>``, where a run goes without ``--out``."""
        return Path("runs") / resolved.recipe.run.name

    def lock(self, action: str) -> RunLock:
        """Take this folder's writer lock and return it (release it, or use it as a context manager).

        Raises:
            RunFolderError: no such folder, or another process writes it (named in the message).
        """
        return RunLock(self.path, action).acquire()

    def unlock(self) -> None:
        """Release the lock :meth:`create` took (nothing when it holds none)."""
        if self.held_lock is not None:
            self.held_lock.release()
            self.held_lock = None

    def _entries(self) -> list[Path]:
        """What the folder holds besides its lock file."""
        return [p for p in self.path.iterdir() if p.name != LOCK_NAME] if self.path.is_dir() else []

    def holds_run(self) -> bool:
        """Whether the folder is one that ``create`` made: a checkpoints/ folder and a resolved recipe or a checkpoint.

        Stricter than :meth:`is_run`: ``--overwrite`` deletes only such a folder.
        """
        if not self.checkpoints_dir.is_dir():
            return False
        if any(self.checkpoints_dir.glob("*.pt")):
            return True
        try:
            with open(self.recipe_file, encoding="utf-8") as fh:
                return fh.read(len(_RECIPE_HEADER)) == _RECIPE_HEADER
        except OSError:
            return False

    @classmethod
    def create(cls, path: str | Path, *, overwrite: bool = False, action: str = "training") -> RunDir:
        """Create an empty run folder and take its lock (held until :meth:`unlock` or the process ends).

        A non-empty folder is refused, unless ``overwrite`` and it holds a run (:meth:`holds_run`) that
        no other process writes: then everything in it is deleted, under the lock. Nothing is touched
        when refused.

        Raises:
            RunFolderError: a file at ``path``, a non-empty folder (see above), or a folder another process writes.
        """
        rd = cls(path)
        if rd.path.exists() and not rd.path.is_dir():
            raise RunFolderError(f"{rd.path} exists and is not a folder. Choose another --out.")
        rd._check_reusable(overwrite)  # before the lock file is made in a folder that is not ours
        rd.path.mkdir(parents=True, exist_ok=True)
        held = rd.lock(action)
        try:
            rd._check_reusable(overwrite)  # again, under the lock: another process may have written it meanwhile
            if overwrite:
                for entry in rd._entries():
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
            rd.checkpoints_dir.mkdir(exist_ok=True)
            rd.samples_dir.mkdir(exist_ok=True)
        except BaseException:
            held.release()
            raise
        rd.held_lock = held
        return rd

    def _check_reusable(self, overwrite: bool) -> None:
        if not self._entries():
            return
        if self.holds_run() or self.is_run():
            if not overwrite:
                raise RunFolderError(
                    f"The run folder {self.path} exists already and holds a run. Continue it with "
                    f"`capsgan run --resume {self.path}`, start over with --overwrite (deletes it), "
                    "or choose another folder with --out."
                )
            if self.holds_run():
                return  # create() takes the lock before deleting: a run another process writes is refused there
        raise RunFolderError(
            f"{self.path} is not empty and does not hold a run (no checkpoints/ folder with a resolved recipe.toml "
            "or a checkpoint), so nothing in it was deleted"
            + (": --overwrite deletes only a run folder." if overwrite else ".")
            + " Choose another folder with --out, or empty this one yourself.")

    def write_recipe(self, resolved: ResolvedRecipe) -> Path:
        """Write the resolved recipe (every default filled in)."""
        header = f"{_RECIPE_HEADER}{resolved.source}; every default filled in.\n"
        writes.write_text(self.recipe_file, header + dumps_toml(resolved.to_dict()) + "\n")
        return self.recipe_file

    def discard_unstarted(self) -> None:
        """Remove what :meth:`create` and :meth:`write_recipe` made, if training never began.

        Used when a new run fails before its first step (a missing data set, say), so that
        running the same command again after the fix is not refused as an existing run.
        """
        if self.metrics_file.exists() or ckpt.latest(self.checkpoints_dir) is not None:
            return  # training began: keep everything
        self.recipe_file.unlink(missing_ok=True)
        if self.held_lock is not None:
            self.lock_file.unlink(missing_ok=True)  # unlinked while held: a waiting process sees another file
        for folder in (self.checkpoints_dir, self.samples_dir, self.path):
            try:
                folder.rmdir()  # only if empty: never delete results
            except OSError:
                pass

    # ------------------------------------------------------------------ reading

    def is_run(self) -> bool:
        """Whether the folder holds a run (a recipe or a checkpoint)."""
        return self.recipe_file.is_file() or ckpt.latest(self.checkpoints_dir) is not None

    def is_finished(self) -> bool:
        """Whether training ran to its end (summary.json and final.pt are written last)."""
        return self.summary_file.is_file() and (self.checkpoints_dir / "final.pt").is_file()

    def read_recipe(self) -> dict[str, Any]:
        """Return the run's resolved recipe as a dict."""
        try:
            return tomllib.loads(self.recipe_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunFolderError(f"{self.path} holds no recipe.toml, so it is not a run folder.") from None
        except tomllib.TOMLDecodeError as exc:
            raise RunFolderError(f"{self.recipe_file} is damaged ({exc}).") from None

    def read_summary(self) -> dict[str, Any] | None:
        return _read_json(self.summary_file)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        return _write_json(self.summary_file, summary)

    def read_eval(self, path: str | Path | None = None) -> dict[str, Any] | None:
        return _read_json(Path(path) if path else self.eval_file)

    def write_eval(self, result: dict[str, Any], path: str | Path | None = None) -> Path:
        target = Path(path) if path else self.eval_file
        target.parent.mkdir(parents=True, exist_ok=True)
        return _write_json(target, result)

    def write_eval_protocol(self, protocol: dict[str, Any]) -> Path:
        return _write_json(self.eval_protocol_file, protocol)

    def read_metrics(self) -> list[dict[str, Any]]:
        from capsgan_toolkit.rundir.reporting import read_metrics

        return read_metrics(self.metrics_file)

    def sample_file(self, epoch: int) -> Path:
        return self.samples_dir / f"epoch_{epoch:03d}.png"

    def sample_files(self) -> list[Path]:
        return sorted(self.samples_dir.glob("epoch_*.png"))

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_file(self, name: str) -> Path:
        return self.checkpoints_dir / name

    def other_checkpoints(self, unreadable: Path) -> str:
        """One sentence for an error about ``unreadable``: the run's other checkpoints and how to use one."""
        others = sorted(p.name for p in self.checkpoints_dir.glob("*.pt") if p.name != Path(unreadable).name)
        if not others:
            return "The run holds no other checkpoint."
        first = next((name for name in ("best.pt", "interrupt.pt") if name in others), others[-1])
        return (f"Its other checkpoints: {', '.join(others)}; use one with --checkpoint "
                f"(e.g. --checkpoint {first}).")

    def checkpoint(self, which: str | None = None) -> Path:
        """Return a checkpoint: ``None`` (final, else the newest), ``final``, ``best``, ``latest``, or a file.

        Raises:
            RunFolderError: no such folder, or no such checkpoint (the message says which exist).
        """
        if not self.path.is_dir():
            raise RunFolderError(f"{self.path} is not a run folder (no such folder).")
        folder = self.checkpoints_dir
        if which in (None, "latest"):
            if which is None and (folder / "final.pt").is_file():
                return folder / "final.pt"
            found = ckpt.latest(folder)
            if found is None:
                raise RunFolderError(f"{self.path} holds no checkpoint (checkpoints/ is empty or missing); train it first.")
            return found
        for candidate in (folder / f"{which}.pt", folder / which, Path(which)):
            if candidate.is_file():
                return candidate
        present = ", ".join(sorted(p.name for p in folder.glob("*.pt"))) or "none"
        raise RunFolderError(f'No checkpoint "{which}" in {folder} (it holds: {present}). '
                             "Use final, best, latest, or a .pt file of that folder.")

    def resume_checkpoint(self) -> Path | None:
        """Return the checkpoint to resume from, or ``None`` for a run stopped before its first one.

        Temporary files of checkpoint writes that a crash interrupted are deleted: call it with the
        folder's lock held (:meth:`lock`), or a live writer's temporary goes; :meth:`check_resumable`
        only looks.

        Raises:
            RunFolderError: no such folder, or a folder that holds no run.
        """
        self.check_resumable()
        ckpt.remove_stale_temporaries(self.checkpoints_dir)
        return ckpt.latest(self.checkpoints_dir)

    def check_resumable(self) -> Path | None:
        """Refuse a folder that holds no run to resume (changing nothing); return its newest checkpoint.

        Raises:
            RunFolderError: no such folder, or a folder that holds no run.
        """
        if not self.path.is_dir():
            raise RunFolderError(f"Cannot resume {self.path}: no such run folder.")
        found = ckpt.latest(self.checkpoints_dir)
        if found is None and not self.recipe_file.is_file():
            raise RunFolderError(
                f"Cannot resume {self.path}: it holds no checkpoint and no recipe.toml, so it is not a "
                "run folder. Start a run there with `capsgan run RECIPE --out` (add --overwrite if it is not empty)."
            )
        return found


def breaking_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Return ``key: old -> new`` for each change that makes a resume unsafe (any key but :data:`RESUMABLE`)."""
    return [str(change) for change in recipe_diff(saved, current, ignore=RESUMABLE)]
