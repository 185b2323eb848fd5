"""Workers of ``capsgan compare`` die with their parent, however it dies.

The runner starts each worker in its own session (so a Ctrl-C in the terminal reaches the parent
only, which passes one SIGINT on). Killing the parent's process group then misses the workers, and
a ``kill -9`` of the parent gives it no chance to stop them: an orphan would go on training, and a
re-run would have two writers on one run (the run folder's lock refuses the second anyway). So:

- the parent passes its pid in :data:`PARENT_ENV` (:func:`child_options`);
- the worker calls :func:`hold_on_to_parent` first thing. On Linux it sets the parent-death signal
  (``prctl(PR_SET_PDEATHSIG, SIGTERM)``) and then checks that its parent is still the one named, which
  closes the race of a parent that died before the call. Elsewhere a watchdog thread polls the
  parent (its pid on POSIX, a process handle on Windows) every second.

Either way the worker receives SIGTERM, which training handles like Ctrl-C: it finishes the current
step, writes ``interrupt.pt`` and stops, so the run resumes exactly. (Setting the signal in the
worker rather than in a ``preexec_fn`` keeps Python code out of the fork: the runner starts workers
from threads, where ``preexec_fn`` is documented as unsafe.) In the parent,
:func:`stop_on_termination` turns SIGTERM and SIGHUP into the same clean stop as Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

PARENT_ENV = "CAPSGAN_COMPARE_PARENT"
"""The environment variable that names a worker's parent pid."""

_PR_SET_PDEATHSIG = 1


def child_options() -> dict[str, Any]:
    """The ``subprocess.Popen`` keyword arguments of a worker (merge ``env`` into yours): own session, parent named."""
    return {"start_new_session": True, "env": {**os.environ, PARENT_ENV: str(os.getpid())}}


def _parent_gone() -> None:
    signal.raise_signal(signal.SIGTERM)  # training checkpoints and stops; before it starts, the process ends


def hold_on_to_parent() -> str | None:
    """In a worker: receive SIGTERM when the parent named in :data:`PARENT_ENV` dies; return how (``None``: no parent named)."""
    text = os.environ.pop(PARENT_ENV, None)  # not inherited further (a worker's own subprocesses)
    if not text:
        return None
    parent = int(text)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0:
                if os.getppid() != parent:  # the parent died before prctl: no signal would come
                    _parent_gone()
                return "parent-death signal"
        except (OSError, AttributeError):
            pass  # no prctl here: fall back on the watchdog
    threading.Thread(target=_watch, args=(parent,), name="capsgan-parent-watchdog", daemon=True).start()
    return "watchdog"


def _watch(parent: int) -> None:
    if os.name == "nt":  # pragma: no cover - Windows: wait on a handle of the parent process
        try:
            import ctypes

            kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
            handle = kernel32.OpenProcess(0x00100000, False, parent)  # SYNCHRONIZE
            if handle:
                kernel32.WaitForSingleObject(handle, 0xFFFFFFFF)
        except (OSError, AttributeError):
            return
        _parent_gone()
        return
    while os.getppid() == parent:  # a dead parent's children are handed to another process
        time.sleep(1.0)
    _parent_gone()


class Terminated(BaseException):
    """The parent received SIGTERM or SIGHUP: stop the workers like a Ctrl-C does."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_termination() -> Iterator[None]:
    """In the parent: turn SIGTERM and SIGHUP into :class:`Terminated` in the main thread (elsewhere: nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    signals = [sig for sig in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if sig is not None]

    def handler(signum, frame):
        for sig in signals:  # a second one ends the parent at once; its workers then get the parent-death signal
            signal.signal(sig, signal.SIG_DFL)
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
