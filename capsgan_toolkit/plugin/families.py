"""The component families: each family's name and the base class its components subclass.

This table is written once; the registry checks registrations against it and the recipe's
slot table (:data:`capsgan_toolkit.interfaces.SLOTS`) says which recipe table fills which family.
"""

from __future__ import annotations

from capsgan_toolkit.interfaces import (
    SLOTS,
    AdversarialLoss,
    ClassificationLoss,
    DatasetPlugin,
    Discriminator,
    Encoder,
    FeatureExtractor,
    Gate,
    Generator,
    ReconstructionLoss,
)
from capsgan_toolkit.objective import Objective

FAMILIES: dict[str, type] = {
    "objective": Objective,
    "encoder": Encoder,
    "generator": Generator,
    "discriminator": Discriminator,
    "classification_loss": ClassificationLoss,
    "reconstruction_loss": ReconstructionLoss,
    "adversarial_loss": AdversarialLoss,
    "gate": Gate,
    "dataset": DatasetPlugin,
    "metric_features": FeatureExtractor,
}
"""The component families and the base class each component must subclass."""

assert {family for _key, family in SLOTS} <= set(FAMILIES), "every slot's family needs a base class here"
