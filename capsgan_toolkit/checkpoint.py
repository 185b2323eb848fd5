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
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from capsgan_toolkit.errors import CheckpointError

MAGIC = b"CAPSGAN-CKPT 1\n"
FORMAT_VERSION = 1
_PERIODIC_RE = re.compile(r"^step_(\d{9})\.pt$")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(MAGIC)
            fh.write(digest + b"\n")
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise CheckpointError(
            f"Could not write checkpoint {path}: {exc.strerror or exc}. The previous checkpoint "
            "is intact. Free disk space (or choose another --out) and resume."
        ) from None
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
        raise CheckpointError(
            f"{path} was refused: it holds pickled Python objects beyond tensors and plain values, "
            f"which could run code when loaded ({str(exc).splitlines()[0]}). Do not load files "
            "from untrusted sources."
        ) from None
    except Exception as exc:  # a checksum-valid but unreadable payload
        raise CheckpointError(f"{path} could not be read as a checkpoint: {type(exc).__name__}: {exc}.") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {state.get('format') if isinstance(state, dict) else '?'}, "
            f"but this toolkit reads format {FORMAT_VERSION}. Use the toolkit version that wrote it."
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


def latest(folder: str | Path) -> Path | None:
    """Return the checkpoint to resume from: the newest of periodic, interrupt and final."""
    folder = Path(folder)
    candidates = list_periodic(folder)
    for name in ("interrupt.pt", "final.pt"):
        if (folder / name).exists():
            candidates.append(folder / name)
    if not candidates:
        return None
    return max(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name))
