"""A plugin module whose only hook name is misspelt, so pluggy would accept it and never call it."""

from capsgan_toolkit import hookimpl


@hookimpl
def capsgan_regster(registry):  # sic: capsgan_register
    raise AssertionError("never called")
