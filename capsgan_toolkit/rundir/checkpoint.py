"""Checkpoints that survive crashes and refuse what they cannot trust.

On-disk format: a header line ``CAPSGAN-CKPT 1``, a line with the SHA-256 of the
payload, then the payload written by ``torch.save``. Writes are atomic (temporary
file in the same folder, fsync, rename, fsync of the folder), so a crash or a full
disk mid-write leaves the previous checkpoint as it was. Reads check the header and
the checksum, then unpickle with ``weights_only=True`` only, so a file carrying
pickled code is refused rather than run.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from capsgan_toolkit import __version__
from capsgan_toolkit.errors import CheckpointError
from capsgan_toolkit.rundir import writes

MAGIC = b"CAPSGAN-CKPT 1\n"
FORMAT_VERSION = 1
_PERIODIC_RE = re.compile(r"^step_(\d{9})\.pt$")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically.

    Args:
        state: tensors and plain Python values only (what ``weights_only`` loads).
        path: destination file; its folder is created if needed.

    Returns:
        The path written.

    Raises:
        CheckpointError: the write failed (a full disk, say); the previous file at
            ``path`` is left untouched and no temporary file remains.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    with writes.replacing(path, durable=True, error=CheckpointError, kept="The previous checkpoint is intact.",
                          advice="Free disk space (or choose another --out) and resume.") as fh:
        fh.write(MAGIC)
        fh.write(digest + b"\n")
        fh.write(payload)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, verifying it first.

    Raises:
        CheckpointError: missing, foreign, truncated or corrupt file, or one whose
            payload holds objects that ``weights_only`` refuses.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"Checkpoint {path} does not exist.") from None
    except OSError as exc:
        raise CheckpointError(f"Cannot read checkpoint {path}: {exc}.") from None
    if not raw.startswith(MAGIC):
        if len(raw) < len(MAGIC) and MAGIC.startswith(raw):
            raise CheckpointError(
                f"{path} is empty or truncated ({len(raw)} bytes). Use an earlier checkpoint from "
                "the same checkpoints/ folder."
            )
        other = re.match(rb"CAPSGAN-CKPT (\S+)\n", raw[:64])
        if other:
            raise CheckpointError(
                f"{path} is a capsgan checkpoint of file format {other.group(1).decode(errors='replace')}, "
                f"but this toolkit (capsgan-toolkit {__version__}) reads format {FORMAT_VERSION}. "
                "Use the toolkit version that wrote it."
            )
        raise CheckpointError(
            f"{path} is not a capsgan checkpoint (no capsgan header). Only checkpoints written "
            "by `capsgan run` can be resumed or evaluated."
        )
    rest = raw[len(MAGIC):]
    digest, _, payload = rest.partition(b"\n")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(
            f"{path} is corrupt or truncated (its checksum does not match). Use an earlier "
            "checkpoint from the same checkpoints/ folder."
        )
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"GLOBAL (\S+?)[ .]*(?:\s|$)", text)
        if found:
            raise CheckpointError(
                f"{path} was refused: it holds a pickled reference to {found.group(1)}, which could run "
                "code when loaded; capsgan checkpoints hold only tensors and plain values. Do not load "
                "files from untrusted sources."
            ) from None
        # torch's message starts with advice to retry without weights_only: never the advice here.
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        detail = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(boilerplate)]
        raise CheckpointError(
            f"{path} could not be read as a checkpoint: its payload is damaged or holds more than "
            f"tensors and plain values ({detail[-1] if detail else 'unpickling refused'}). Use a "
            "checkpoint written by `capsgan run`."
        ) from None
    except Exception as exc:  # a checksum-valid but unreadable payload
        raise CheckpointError(f"{path} could not be read as a checkpoint: {type(exc).__name__}: {exc}.") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        fmt = state.get("format") if isinstance(state, dict) else "?"
        writer = state.get("toolkit_version", "an unknown version") if isinstance(state, dict) else "an unknown version"
        raise CheckpointError(
            f"{path} has checkpoint format {fmt} (written by capsgan-toolkit {writer}), but this "
            f"toolkit (capsgan-toolkit {__version__}) reads format {FORMAT_VERSION}. Use the toolkit "
            "version that wrote it."
        )
    return state


def periodic_name(step: int) -> str:
    return f"step_{step:09d}.pt"


def list_periodic(folder: str | Path) -> list[Path]:
    """Return the periodic checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _PERIODIC_RE.match(p.name))


def prune(folder: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` periodic checkpoints."""
    for old in list_periodic(folder)[:-keep_last]:
        try:
            old.unlink()
        except OSError:
            pass


def checkpoint_step(path: str | Path) -> int | None:
    """Return the training step a checkpoint was taken at, or ``None`` if it cannot be read.

    Periodic checkpoints carry it in their name; ``interrupt.pt`` and ``final.pt`` are read.
    """
    path = Path(path)
    match = _PERIODIC_RE.match(path.name)
    if match:
        return int(match.group(1))
    try:
        return int(load_checkpoint(path)["position"]["step"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None


def latest(folder: str | Path) -> Path | None:
    """Return the checkpoint to resume from: the one furthest into training.

    Ranked by the step each file holds, never by modification time (copies, clock changes
    and coarse file-system timestamps would make that pick an older one); on equal steps
    final beats interrupt beats periodic. An unreadable ``interrupt.pt`` or ``final.pt``
    is passed over when another checkpoint exists.
    """
    folder = Path(folder)
    ranked = [(int(_PERIODIC_RE.match(p.name).group(1)), 0, p) for p in list_periodic(folder)]
    unreadable = []
    for rank, name in ((1, "interrupt.pt"), (2, "final.pt")):
        path = folder / name
        if path.exists():
            step = checkpoint_step(path)
            if step is None:
                unreadable.append(path)
            else:
                ranked.append((step, rank, path))
    if not ranked:
        return unreadable[0] if unreadable else None  # loading it will explain what is wrong
    return max(ranked, key=lambda item: item[:2])[2]


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete temporary files left by writes that a crash interrupted; return them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for tmp in folder.glob(".*.tmp-*"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed
