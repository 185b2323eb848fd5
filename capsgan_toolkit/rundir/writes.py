"""The one way the toolkit writes a file: a temporary file beside it, then an atomic rename.

Every file a run, an evaluation, a probe or a comparison writes (summary.json, eval.json,
probe.json, metrics.jsonl rows, sample grids, curves, checkpoints, compare.json/.md/.html and
its caches) goes through this module, so a failed write (a full disk, a read-only folder)
always ends the same way: the file that was there before is untouched, no temporary file is
left behind, and the user reads one paragraph naming the file, the reason and the space left
on that disk (:class:`~capsgan_toolkit.errors.WriteError`), never a traceback.

Pictures are rendered into memory first (:func:`write_rendered`), so PIL and matplotlib never open
a file of their own half-written.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from capsgan_toolkit.errors import CapsganError, WriteError

DEFAULT_ADVICE = "Free some disk space (or write elsewhere, e.g. with --out) and run the command again."


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def free_space(folder: Path) -> str:
    """The space left on the disk holding ``folder`` (its nearest existing parent), in words."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return f"{_human(shutil.disk_usage(probe).free)} free on that disk"
    except OSError:
        return "free space unknown"


def write_failed(path: Path, exc: OSError, *, advice: str = DEFAULT_ADVICE,
                 error: type[CapsganError] = WriteError, kept: str | None = None) -> CapsganError:
    """The one-paragraph error for a write of ``path`` that failed with ``exc``."""
    kept = kept or ("The previous version of the file is intact." if path.exists() else "Nothing was written.")
    return error(f"Could not write {path}: {exc.strerror or exc} ({free_space(path.parent)}). {kept}", hint=advice)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextmanager
def replacing(path: str | Path, *, durable: bool = False, advice: str = DEFAULT_ADVICE,
              error: type[CapsganError] = WriteError, kept: str | None = None) -> Iterator[IO[bytes]]:
    """Open a temporary file beside ``path`` for writing bytes; on success it replaces ``path``.

    Args:
        path: the destination; its folder is created if needed.
        durable: fsync the file and its folder (checkpoints: the rename survives a power cut).
        advice, error, kept: what the error of a failed write says and which class it is.

    Raises:
        WriteError (or ``error``): the write failed; ``path`` is as it was and no temporary remains.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # no checkpoint or picture glob matches it
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    except BaseException as exc:
        # Also on KeyboardInterrupt (a second Ctrl-C mid-write): leave no partial file behind.
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise write_failed(path, exc, advice=advice, error=error, kept=kept) from None
        raise


def write_bytes(path: str | Path, data: bytes, **options: Any) -> Path:
    """Write ``data`` to ``path`` through :func:`replacing`."""
    with replacing(path, **options) as fh:
        fh.write(data)
    return Path(path)


def write_text(path: str | Path, text: str, **options: Any) -> Path:
    """Write UTF-8 ``text`` to ``path`` through :func:`replacing`."""
    return write_bytes(path, text.encode("utf-8"), **options)


def write_json(path: str | Path, data: Any, *, indent: int = 2, default: Callable | None = None,
               **options: Any) -> Path:
    """Write ``data`` as indented JSON (and a final newline) through :func:`replacing`."""
    return write_text(path, json.dumps(data, indent=indent, default=default) + "\n", **options)


def write_rendered(path: str | Path, render: Callable[[IO[bytes]], None], **options: Any) -> Path:
    """Render into memory with ``render(buffer)`` (PIL's ``save``, ``savefig``, ``torch.save``), then write it."""
    buffer = io.BytesIO()
    render(buffer)
    return write_bytes(path, buffer.getvalue(), **options)


def append_text(path: str | Path, text: str, *, advice: str = DEFAULT_ADVICE) -> Path:
    """Append ``text`` to ``path`` and fsync it; a failed append is cut back off (no torn line is left)."""
    path = Path(path)
    data = text.encode("utf-8")
    existed = path.exists()
    size = path.stat().st_size if existed else 0
    try:
        with open(path, "ab", buffering=0) as fh:
            try:
                view = memoryview(data)
                while view:
                    written = fh.write(view)
                    if not written:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    view = view[written:]
                os.fsync(fh.fileno())
            except BaseException:
                os.ftruncate(fh.fileno(), size)
                raise
    except OSError as exc:
        if not existed:
            try:
                path.unlink()
            except OSError:
                pass
        raise write_failed(path, exc, advice=advice,
                           kept="The rows written before are intact." if existed else "Nothing was written.") from None
    return path
