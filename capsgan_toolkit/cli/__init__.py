"""The ``capsgan`` command, one module per command group."""
