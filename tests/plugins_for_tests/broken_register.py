"""A plugin module whose registration hook fails."""

from capsgan_toolkit import hookimpl


@hookimpl
def capsgan_register(registry):
    raise RuntimeError("registration failed on purpose")
