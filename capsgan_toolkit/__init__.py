"""capsgan-toolkit: a plugin-based GAN toolkit for capsule and CNN encoders."""

from capsgan_toolkit.hookspecs import NAME, hookimpl

__version__ = "0.1.0"

__all__ = ["NAME", "hookimpl", "__version__"]
