"""What every ``capsgan`` command shares: consoles, the error wrapper, option defaults."""

from __future__ import annotations

import functools
import sys

import click
from rich.console import Console
from rich.text import Text

from capsgan_toolkit.errors import CapsganError, Interrupted

console = Console()
err_console = Console(stderr=True)

option = functools.partial(click.option, show_default=True)  # every option shows its default

DEVICES = click.Choice(["auto", "cpu", "cuda", "mps"])


def fail(exc: CapsganError) -> None:
    label = "[bold yellow]stopped:[/]" if isinstance(exc, Interrupted) else "[bold red]error:[/]"
    try:
        # The message is plain text: "[encoder]" in it is a recipe table, not rich markup.
        err_console.print(label, Text(str(exc)), highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        pass  # a second Ctrl-C while the first stop is reported: keep the exit code, not click's "Aborted!"
    sys.exit(exc.exit_code)


ABORTED = ("interrupted at once (a second Ctrl-C, or one before training began); checkpoints already on disk "
           "are intact. Resume with `capsgan run --resume RUN_DIR`.")


def abort(message: str = ABORTED) -> None:
    err_console.print("[red]aborted[/]:", Text(message), highlight=False, soft_wrap=True)
    sys.exit(130)


def friendly(func=None, *, aborted: str = ABORTED):
    """Turn user errors into one clear message and an exit code, never a traceback.

    Use as ``@friendly`` or ``@friendly(aborted="what Ctrl-C left behind")``.
    """

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except CapsganError as exc:
                fail(exc)
            except KeyboardInterrupt:
                # Caught here, inside the command: click would turn it into "Aborted!" and exit code 1.
                abort(aborted)

        return wrapper

    return decorate(func) if func is not None else decorate


def warn(line: str) -> None:
    err_console.print("[yellow]warning:[/]", Text(line), highlight=False, soft_wrap=True)
