"""The lock of a run folder: one writer at a time.

Every process that writes a run folder (``capsgan run``, ``run --resume``, ``eval``, ``probe``,
the workers of ``capsgan compare``) holds an exclusive lock on its ``.lock`` file for as long as
it works there. The lock is ``fcntl.flock``: the kernel releases it when the process ends, however
it ends (``kill -9`` included), so there is never a stale lock to clean up by hand; the file itself
stays, holding the last holder's pid and command (read only to name a live holder in a refusal).

A second writer is refused at once with :class:`~capsgan_toolkit.errors.RunFolderError`, naming
the folder and the process that holds it. Within one process the lock is re-entrant (``capsgan
compare --in-process`` evaluates the run it has just trained): each :meth:`RunLock.acquire` is
matched by one :meth:`RunLock.release`, and the last release unlocks.

Where ``fcntl`` is missing (Windows), the lock is a file created with ``O_EXCL`` and deleted on
release. A process killed hard leaves it behind: on POSIX a lock file whose pid no longer runs
is taken over; elsewhere the refusal says to delete the file once no capsgan process works there.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from capsgan_toolkit.errors import RunFolderError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
"""The lock file inside a run folder (never deleted by ``--overwrite`` while it is held)."""

_held: dict[Path, tuple[int, int]] = {}
"""Resolved folder -> (file descriptor, acquisitions) of the locks this process holds."""


_described: str | None = None


def describe_process(text: str) -> None:
    """Name this process in the lock files it writes (instead of its command line)."""
    global _described
    _described = text


def command_line() -> str:
    """This process's command line (``python -m capsgan_toolkit`` shown as ``capsgan``), shortened for a message."""
    if _described is not None:
        return _described
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    text = " ".join(["capsgan" if program == "__main__.py" else program, *sys.argv[1:]])
    return text if len(text) <= 200 else text[:197] + "..."


def _read_holder(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The exclusive lock of one run folder (see the module's notes).

    Args:
        folder: the run folder; it must exist.
        action: what the holder does there ("training", "evaluating", ...), written for a refused writer to read.
        kind: what the folder is, in messages ("run folder", "comparison folder").
    """

    def __init__(self, folder: str | Path, action: str, *, kind: str = "run folder"):
        self.folder = Path(folder)
        self.file = self.folder / LOCK_NAME
        self.action = action
        self.kind = kind
        self._acquired = 0

    def __repr__(self) -> str:
        return f"RunLock({str(self.folder)!r}, held={self.held})"

    @property
    def _key(self) -> Path:
        return self.folder.resolve()

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._acquired > 0

    def acquire(self) -> RunLock:
        """Take the lock, or refuse at once when another process holds it.

        Raises:
            RunFolderError: the folder is missing, or another process writes it (its pid and command named).
        """
        key = self._key
        if key in _held:
            fd, count = _held[key]
            _held[key] = (fd, count + 1)
            self._acquired += 1
            return self
        if not self.folder.is_dir():
            raise RunFolderError(f"{self.folder} is not a {self.kind} (no such folder).")
        fd = self._lock_fcntl() if fcntl is not None else self._lock_exclusive_file()
        record = {"pid": os.getpid(), "command": command_line(), "action": self.action,
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
        _held[key] = (fd, 1)
        self._acquired += 1
        return self

    def release(self) -> None:
        """Give back one acquisition; the last one of the process unlocks."""
        if not self._acquired:
            return
        self._acquired -= 1
        key = self._key
        fd, count = _held.get(key, (-1, 0))
        if count > 1:
            _held[key] = (fd, count - 1)
            return
        _held.pop(key, None)
        if fd < 0:
            return
        if fcntl is None:  # the lock is the file itself
            try:
                self.file.unlink()
            except OSError:
                pass
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> RunLock:
        return self if self.held else self.acquire()  # RunDir.lock() returns it acquired already

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ the two mechanisms

    def _lock_fcntl(self) -> int:
        assert fcntl is not None
        for _ in range(20):
            try:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder was deleted meanwhile
                raise RunFolderError(f"{self.folder} is not a {self.kind} (no such folder).") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise self._refusal() from None
            try:  # the file we locked must still be the one at the path (a holder may have deleted it)
                same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)
        raise self._refusal()

    def _lock_exclusive_file(self) -> int:  # pragma: no cover - platforms without fcntl
        for _ in range(2):
            try:
                return os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid = _read_holder(self.file).get("pid")
                if isinstance(pid, int) and not _pid_alive(pid):
                    self.file.unlink(missing_ok=True)  # left by a process that no longer runs
                    continue
                raise self._refusal(stale_hint=True) from None
        raise self._refusal(stale_hint=True)

    def _refusal(self, stale_hint: bool = False) -> RunFolderError:
        holder = _read_holder(self.file)
        pid, command, action = holder.get("pid"), holder.get("command"), holder.get("action")
        who = f"process {pid}" if pid is not None else "another process"
        if command:
            who += f" (`{command}`" + (f", {action}" if action else "") + (
                f" since {holder['since']}" if holder.get("since") else "") + ")"
        stopped = "a comparison and its workers after their current steps, keeping their checkpoints" \
            if self.kind == "comparison folder" else "a training run after its current step, keeping its checkpoint"
        stop = f"stop it (kill {pid} stops {stopped})" if pid is not None else "stop it"
        extra = (f" If no capsgan process works there any more, delete {self.file}."
                 if stale_hint and fcntl is None else "")
        return RunFolderError(
            f"The {self.kind} {self.folder} is in use: {who} is writing it. Only one process may write a "
            f"{self.kind} at a time, so nothing in it was changed. Wait for that process to finish or {stop}, then "
            f"run this command again; or choose another folder with --out.{extra}")
