"""Built-in gates: which of generator and discriminator train at each step.

The classification loss always trains the encoder; a gate only switches the
generator's loss (reconstruction + adversarial) and the discriminator's update.

Registered names (family ``gate``):

- ``always``: generator and discriminator every step, no warm-up;
- ``epochs``: encoder-only warm-up for a number of epochs, then ``always``;
- ``accuracy_band``: the source report's section 6.2 schedule.

``TrainState.epoch`` is the 0-based index of the current epoch, i.e. the number
of epochs already completed, so ``warmup_epochs = 20`` means 20 full epochs of
encoder-only training.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from capsgan_toolkit import hookimpl
from capsgan_toolkit.errors import CheckpointError
from capsgan_toolkit.interfaces import Gate, Phases, TrainState
from capsgan_toolkit.interfaces import Params as ComponentParams

_WARMUP = Phases(generator=False, discriminator=False, warmup=True)


class AlwaysGate(Gate):
    """Train generator and discriminator at every step (no warm-up)."""

    def decide(self, state: TrainState) -> Phases:
        """Return G+ D+ (D- when the recipe has no discriminator)."""
        return Phases(generator=True, discriminator=state.has_discriminator)


class EpochsGate(Gate):
    """Encoder-only warm-up for a fixed number of epochs, then train everything every step."""

    class Params(ComponentParams):
        warmup_epochs: int = Field(20, ge=0, description="Epochs of encoder-only training before G and D start.")

    def decide(self, state: TrainState) -> Phases:
        """Return warm-up until ``warmup_epochs`` epochs have passed, then G+ D+."""
        if state.epoch < self.params.warmup_epochs:
            return _WARMUP
        return Phases(generator=True, discriminator=state.has_discriminator)


class AccuracyBandGate(Gate):
    """The report's schedule: warm up the encoder, then keep the discriminator's accuracy in a band."""

    class Params(ComponentParams):
        warmup_epochs: int = Field(
            20, ge=0, description="Encoder-only epochs before G and D start (or earlier, see warmup_accuracy)."
        )
        warmup_accuracy: float = Field(
            0.2, ge=0.0, le=1.0, description="Encoder training accuracy that ends the warm-up early."
        )
        warmup_min_steps: int = Field(
            20, ge=0,
            description="Steps before warmup_accuracy can end the warm-up, so one lucky batch at chance "
                        "level cannot (the running accuracy is a bias-corrected mean of recent batches).",
        )
        generator_min_disc_acc: float = Field(
            0.5,
            ge=0.0,
            le=1.0,
            description="The generator's loss is dropped while the discriminator's accuracy is below this.",
        )
        discriminator_max_disc_acc: float = Field(
            0.9,
            ge=0.0,
            le=1.0,
            description="The discriminator stops training while its accuracy is above this.",
        )

        @model_validator(mode="after")
        def _band_not_empty(self):
            if not self.generator_min_disc_acc < self.discriminator_max_disc_acc:
                raise ValueError(
                    f"generator_min_disc_acc ({self.generator_min_disc_acc}) must be smaller than "
                    f"discriminator_max_disc_acc ({self.discriminator_max_disc_acc}): the generator "
                    "trains while the discriminator's accuracy is at least the first, the discriminator "
                    "while it is at most the second, and there must be a band where both train."
                )
            return self

    def __init__(self, params: Params):
        super().__init__(params)
        # Once the warm-up ends it stays ended, even if the encoder's running accuracy dips back.
        self.warmed_up = False

    def decide(self, state: TrainState) -> Phases:
        """Return the phases for this step.

        Warm-up (encoder only) until ``epoch >= warmup_epochs`` or, after at least
        ``warmup_min_steps`` steps, ``encoder_acc >= warmup_accuracy``; the end of warm-up latches. Afterwards
        the generator trains while ``disc_acc >= generator_min_disc_acc`` and the
        discriminator while ``disc_acc <= discriminator_max_disc_acc``; both train
        while ``disc_acc`` is unknown.
        """
        p = self.params
        if not self.warmed_up:
            by_accuracy = state.step >= p.warmup_min_steps and state.encoder_acc >= p.warmup_accuracy
            if state.epoch >= p.warmup_epochs or by_accuracy:
                self.warmed_up = True
            else:
                return _WARMUP
        if not state.has_discriminator:
            return Phases(generator=True, discriminator=False)
        acc = state.disc_acc
        return Phases(
            generator=acc is None or acc >= p.generator_min_disc_acc,
            discriminator=acc is None or acc <= p.discriminator_max_disc_acc,
        )

    def state_dict(self) -> dict[str, Any]:
        """Return the warm-up latch."""
        return {"warmed_up": self.warmed_up}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the warm-up latch saved by :meth:`state_dict`."""
        if not isinstance(state, dict) or not isinstance(state.get("warmed_up"), bool):
            raise CheckpointError(
                f'The checkpoint\'s state for gate "accuracy_band" is {state!r}; expected '
                '{"warmed_up": true|false}. Was it saved by another gate?'
            )
        self.warmed_up = state["warmed_up"]


@hookimpl
def capsgan_register(registry):
    """Register the built-in gates."""
    registry.register("gate", "always", AlwaysGate)
    registry.register("gate", "epochs", EpochsGate)
    registry.register("gate", "accuracy_band", AccuracyBandGate)
