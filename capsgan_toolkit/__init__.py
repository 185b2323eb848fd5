"""capsgan-toolkit: a plugin-based GAN toolkit for capsule and CNN encoders."""

import os

# OpenMP threads that spin while waiting steal the other core of a small machine: measured, the
# CPU capsule step ran 0.76x as fast without this (docs/performance.md). OpenMP reads it once,
# when torch loads, so it is set here, before any torch import; a value set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from capsgan_toolkit.plugin.spec import NAME, hookimpl  # noqa: E402

__version__ = "0.1.0"

__all__ = ["NAME", "hookimpl", "__version__"]
