"""A plugin module whose registration hook takes an argument the hook does not pass."""

from capsgan_toolkit import hookimpl


@hookimpl
def capsgan_register(self, wrong_arg):  # the hook passes only ``registry``
    raise AssertionError("never called: pluggy refuses the signature when the module is registered")
