"""User-facing errors: one clear paragraph, no traceback."""

from __future__ import annotations


class CapsganError(Exception):
    """An error caused by user input (a recipe, a plugin, a file) with a clear message.

    The CLI prints ``str(error)`` and exits with ``exit_code``; nothing else.
    """

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message}\n{hint}")


class RecipeError(CapsganError):
    """A recipe that cannot be read or does not validate."""


class RegistryError(CapsganError):
    """An unknown component name, or a component registered wrongly."""


class PluginLoadError(CapsganError):
    """A plugin module that could not be imported or failed to register."""


class DataError(CapsganError):
    """A data set that is missing, offline, or corrupt."""


class CheckpointError(CapsganError):
    """A checkpoint that is missing, corrupt, foreign, or incompatible."""


class RunFolderError(CapsganError):
    """A run folder that exists already, or does not hold a run."""


class NumericalError(CapsganError):
    """A NaN or Inf in a loss or gradient."""

    exit_code = 3


class Interrupted(CapsganError):
    """Training stopped by a signal after saving a checkpoint."""

    exit_code = 130


class NameClashError(RegistryError):
    """A component name registered by two third-party plugins: a recipe must say which one."""


class PluginError(PluginLoadError):
    """Broken plugins or plugin warnings, refused in strict mode (``--strict-plugins``)."""


class ContractError(CapsganError):
    """A plugin's component returned something its family's contract forbids (a wrong shape)."""


class WriteError(CapsganError):
    """A file that could not be written (a full disk, a read-only folder); nothing saved before was changed."""
