"""Run folders: create them without clobbering, find them, and check a resume is safe."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from capsgan_toolkit import checkpoint as ckpt
from capsgan_toolkit.errors import RunFolderError
from capsgan_toolkit.recipe import ResolvedRecipe, dumps_toml

RESUMABLE_CHANGES = (
    "run.epochs", "run.device", "run.threads", "run.eval_batches", "run.log_every", "run.name",
    "checkpoint.", "output.", "eval.",
)
"""Recipe keys that may differ between a run and its resume; any other change is refused."""


def default_run_dir(resolved: ResolvedRecipe) -> Path:
    return Path("runs") / resolved.recipe.run.name


def prepare_new(run_dir: Path, *, overwrite: bool) -> Path:
    """Create an empty run folder; refuse to reuse a non-empty one unless ``overwrite``."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{run_dir} exists and is not a folder. Choose another --out.")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunFolderError(
                f"The run folder {run_dir} exists already and holds a run. Continue it with "
                f"`capsgan run --resume {run_dir}`, start over with --overwrite (deletes it), "
                "or choose another folder with --out."
            )
        shutil.rmtree(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "samples").mkdir(exist_ok=True)
    return run_dir


def write_recipe(resolved: ResolvedRecipe, run_dir: Path) -> Path:
    """Write the resolved recipe (every default filled in) into the run folder."""
    path = run_dir / "recipe.toml"
    header = f"# Resolved from {resolved.source}; every default filled in.\n"
    path.write_text(header + dumps_toml(resolved.to_dict()) + "\n", encoding="utf-8")
    return path


def resume_checkpoint(run_dir: Path) -> Path | None:
    """Return the checkpoint to resume ``run_dir`` from.

    Returns ``None`` for a run stopped before its first checkpoint (the folder holds its
    recipe.toml but no checkpoint): it restarts from the beginning, nothing being lost.
    Temporary files of checkpoint writes that a crash interrupted are deleted.

    Raises:
        RunFolderError: no such folder, or a folder that holds no run.
    """
    if not run_dir.is_dir():
        raise RunFolderError(f"Cannot resume {run_dir}: no such run folder.")
    ckpt.remove_stale_temporaries(run_dir / "checkpoints")
    found = ckpt.latest(run_dir / "checkpoints")
    if found is None and not (run_dir / "recipe.toml").is_file():
        raise RunFolderError(
            f"Cannot resume {run_dir}: it holds no checkpoint and no recipe.toml, so it is not a "
            "run folder. Start a run there with `capsgan run RECIPE --out` (add --overwrite if it is not empty)."
        )
    return found


def discard_unstarted(run_dir: Path) -> None:
    """Remove what :func:`prepare_new` and :func:`write_recipe` created, if training never began.

    Used when a new run fails before its first step (a missing data set, say), so that
    running the same command again after the fix is not refused as an existing run.
    """
    if (run_dir / "metrics.jsonl").exists() or ckpt.latest(run_dir / "checkpoints") is not None:
        return  # training began: keep everything
    (run_dir / "recipe.toml").unlink(missing_ok=True)
    for sub in ("checkpoints", "samples"):
        try:
            (run_dir / sub).rmdir()  # only if empty: never delete results
        except OSError:
            pass
    try:
        run_dir.rmdir()
    except OSError:
        pass


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def breaking_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Return the dotted keys whose change makes a resume unsafe, with old and new values."""
    old, new = flatten(saved), flatten(current)
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<absent>") == new.get(key, "<absent>"):
            continue
        if any(key == allowed or (allowed.endswith(".") and key.startswith(allowed)) for allowed in RESUMABLE_CHANGES):
            continue
        changes.append(f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    return changes
