"""Contract checks for components: call them from a plugin's own pytest suite.

Each family has one check that builds the component with tiny inputs and asserts what
the engine relies on: shapes, value ranges, finite values, gradients that reach every
trainable parameter, the latent masking modes, determinism under a seed, a params model
that round-trips and rejects unknown keys, and clear errors for image shapes the
component cannot work with. The toolkit's own tests run the same checks on every
built-in component, so the contract lives in one place::

    from capsgan_toolkit.testing import check_encoder

    from my_package import MyEncoder

    def test_my_encoder_meets_the_contract():
        check_encoder(MyEncoder, {"hidden": 8})

A failed check raises :class:`ContractViolation` (an ``AssertionError``, so pytest shows
it as a test failure) whose message names the check, the component and what was wrong::

    check_encoder: encoder my_package.MyEncoder, image shape (1, 28, 28), check "gradients":
    no gradient reaches parameter "head.weight" ...

Public API:

- :func:`check_params`: the params model alone (used by every check below).
- :func:`check_encoder`, :func:`check_generator`, :func:`check_discriminator`.
- :func:`check_classification_loss`, :func:`check_reconstruction_loss`,
  :func:`check_adversarial_loss`.
- :func:`check_gate`, :func:`check_dataset`.
- :func:`check_objective`: builds a tiny recipe around the objective (built-in parts, the
  glyphs data set), checks the parts' contracts the way the engine does
  (:func:`capsgan_toolkit.recipe.build.check_contracts`) and trains two steps.
- :func:`check_component`: any of the above by family name (:data:`CHECKS`).

Every check runs on the CPU and takes at most a few seconds with small params; pass
params that keep the component small (few channels). The checks live in
:mod:`capsgan_toolkit.testing.base` (params, helpers), :mod:`~capsgan_toolkit.testing.models`,
:mod:`~capsgan_toolkit.testing.components` and :mod:`~capsgan_toolkit.testing.objective`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel

from capsgan_toolkit.testing.base import BAD_IMAGE_SHAPES, IMAGE_SHAPES, ContractViolation, check_params
from capsgan_toolkit.testing.components import (
    check_adversarial_loss,
    check_classification_loss,
    check_dataset,
    check_gate,
    check_reconstruction_loss,
)
from capsgan_toolkit.testing.models import check_discriminator, check_encoder, check_generator
from capsgan_toolkit.testing.objective import check_objective

__all__ = [
    "BAD_IMAGE_SHAPES",
    "CHECKS",
    "ContractViolation",
    "IMAGE_SHAPES",
    "check_adversarial_loss",
    "check_classification_loss",
    "check_component",
    "check_dataset",
    "check_discriminator",
    "check_encoder",
    "check_gate",
    "check_generator",
    "check_objective",
    "check_params",
    "check_reconstruction_loss",
]


# ---------------------------------------------------------------------------- by family

CHECKS: dict[str, Callable[..., Any]] = {
    "objective": check_objective,
    "encoder": check_encoder,
    "generator": check_generator,
    "discriminator": check_discriminator,
    "classification_loss": check_classification_loss,
    "reconstruction_loss": check_reconstruction_loss,
    "adversarial_loss": check_adversarial_loss,
    "gate": check_gate,
    "dataset": check_dataset,
}
"""The check of each family (``metric_features`` has none yet)."""


def check_component(family: str, cls: type, params: Mapping[str, Any] | BaseModel | None = None, **options: Any):
    """Run the check of ``family`` (a key of :data:`CHECKS`) on ``cls`` with ``params`` and ``options``."""
    if family not in CHECKS:
        raise ValueError(f'capsgan_toolkit.testing has no check for family "{family}"; '
                         f"it checks: {', '.join(CHECKS)}.")
    return CHECKS[family](cls, params, **options)
