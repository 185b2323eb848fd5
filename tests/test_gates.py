"""Built-in gates: table-driven decisions, the warm-up latch across calls and resume, validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from capsgan_plugins import gates
from capsgan_plugins.gates import AccuracyBandGate, AlwaysGate, EpochsGate
from capsgan_toolkit.errors import CheckpointError, RegistryError
from capsgan_toolkit.interfaces import Phases, TrainState
from capsgan_toolkit.plugin.registry import Registry

WARMUP = Phases(generator=False, discriminator=False, warmup=True)
BOTH = Phases(generator=True, discriminator=True)
G_ONLY = Phases(generator=True, discriminator=False)
D_ONLY = Phases(generator=False, discriminator=True)


def _state(epoch=0, encoder_acc=0.0, disc_acc=None, has_discriminator=True, step=100) -> TrainState:
    return TrainState(
        epoch=epoch, step=step, encoder_acc=encoder_acc, disc_acc=disc_acc, has_discriminator=has_discriminator
    )


def _band(**params) -> AccuracyBandGate:
    return AccuracyBandGate(AccuracyBandGate.Params(**params))


# (epoch, encoder_acc, disc_acc, has_discriminator) -> expected, each on a fresh gate with the
# report's defaults: warm-up 20 epochs or 20% accuracy; G needs D acc >= 0.5; D trains while <= 0.9.
BAND_ROWS = [
    ((0, 0.00, None, True), WARMUP),
    ((19, 0.19, 0.70, True), WARMUP),
    ((0, 0.10, 0.10, False), WARMUP),
    ((20, 0.00, None, True), BOTH),
    ((0, 0.20, None, True), BOTH),
    ((3, 0.50, 0.49, True), D_ONLY),
    ((3, 0.50, 0.00, True), D_ONLY),
    ((3, 0.50, 0.50, True), BOTH),
    ((3, 0.50, 0.72, True), BOTH),
    ((3, 0.50, 0.90, True), BOTH),
    ((3, 0.50, 0.91, True), G_ONLY),
    ((25, 0.05, 1.00, True), G_ONLY),
    ((3, 0.50, 0.30, False), G_ONLY),
    ((30, 0.90, None, False), G_ONLY),
]


@pytest.mark.parametrize(("fields", "expected"), BAND_ROWS)
def test_accuracy_band_decisions(fields, expected):
    epoch, encoder_acc, disc_acc, has_disc = fields
    assert _band().decide(_state(epoch, encoder_acc, disc_acc, has_disc)) == expected


@pytest.mark.parametrize(
    ("params", "fields", "expected"),
    [
        ({"warmup_epochs": 0}, (0, 0.0, None, True), BOTH),
        ({"warmup_epochs": 5, "warmup_accuracy": 1.0}, (4, 0.99, 0.7, True), WARMUP),
        ({"warmup_epochs": 5, "warmup_accuracy": 1.0}, (5, 0.00, 0.7, True), BOTH),
        ({"generator_min_disc_acc": 0.6, "discriminator_max_disc_acc": 0.7}, (30, 0.5, 0.55, True), D_ONLY),
        ({"generator_min_disc_acc": 0.6, "discriminator_max_disc_acc": 0.7}, (30, 0.5, 0.75, True), G_ONLY),
    ],
)
def test_accuracy_band_params_move_the_thresholds(params, fields, expected):
    epoch, encoder_acc, disc_acc, has_disc = fields
    assert _band(**params).decide(_state(epoch, encoder_acc, disc_acc, has_disc)) == expected


def test_accuracy_cannot_end_the_warm_up_before_the_minimum_steps():
    # One lucky batch at chance level (3.6 % likely at batch 32) must not end the encoder-only phase.
    gate = _band(warmup_min_steps=20)
    assert gate.decide(_state(0, 1.0, None, step=0)) == WARMUP
    assert gate.decide(_state(0, 1.0, None, step=19)) == WARMUP
    assert gate.decide(_state(0, 0.19, None, step=20)) == WARMUP
    assert gate.decide(_state(0, 0.20, None, step=20)) == BOTH
    # The epoch arm is not held back by the minimum.
    assert _band(warmup_epochs=1, warmup_min_steps=10_000).decide(_state(1, 0.0, None, step=3)) == BOTH


# One gate across consecutive calls: the warm-up ends at 20% encoder accuracy in epoch 1
# and stays ended though the running accuracy then dips below 20% again.
LATCH_SEQUENCE = [
    ((0, 0.05, None), WARMUP),
    ((0, 0.15, None), WARMUP),
    ((1, 0.21, None), BOTH),
    ((1, 0.12, 0.95), G_ONLY),
    ((1, 0.10, 0.40), D_ONLY),
    ((2, 0.08, 0.60), BOTH),
    ((2, 0.30, 0.99), G_ONLY),
]


def test_accuracy_band_latches_across_calls():
    gate = _band()
    for (epoch, encoder_acc, disc_acc), expected in LATCH_SEQUENCE:
        assert gate.decide(_state(epoch, encoder_acc, disc_acc)) == expected, (epoch, encoder_acc, disc_acc)
    assert gate.state_dict() == {"warmed_up": True}


@pytest.mark.parametrize("cut", range(len(LATCH_SEQUENCE) + 1))
def test_accuracy_band_resume_decides_like_an_uninterrupted_run(cut):
    first = _band()
    decisions = [first.decide(_state(*fields)) for fields, _ in LATCH_SEQUENCE[:cut]]
    resumed = _band()
    resumed.load_state_dict(first.state_dict())
    decisions += [resumed.decide(_state(*fields)) for fields, _ in LATCH_SEQUENCE[cut:]]
    assert decisions == [expected for _, expected in LATCH_SEQUENCE]


def test_accuracy_band_fresh_gate_without_state_would_warm_up_again():
    # The resume test above can only fail if the latch matters: show that it does.
    gate = _band()
    gate.decide(_state(0, 0.3))
    dipped = _state(0, 0.1, 0.6)
    assert gate.decide(dipped) == BOTH
    assert _band().decide(dipped) == WARMUP
    restored = _band()
    restored.load_state_dict(gate.state_dict())
    assert restored.decide(dipped) == BOTH


@pytest.mark.parametrize("bad", [{}, {"warmed_up": "yes"}, {"latched": True}, None])
def test_accuracy_band_rejects_foreign_state(bad):
    with pytest.raises(CheckpointError, match="accuracy_band"):
        _band().load_state_dict(bad)


@pytest.mark.parametrize(
    ("low", "high"),
    [(0.9, 0.5), (0.6, 0.6)],
)
def test_accuracy_band_validator_requires_a_band(low, high):
    with pytest.raises(ValidationError, match="must be smaller than"):
        AccuracyBandGate.Params(generator_min_disc_acc=low, discriminator_max_disc_acc=high)
    registry = Registry()
    gates.capsgan_register(registry)
    with pytest.raises(RegistryError, match="generator_min_disc_acc"):
        registry.create("gate", "accuracy_band", {"generator_min_disc_acc": low, "discriminator_max_disc_acc": high})


@pytest.mark.parametrize(
    "params",
    [{"warmup_epochs": -1}, {"warmup_accuracy": 1.5}, {"generator_min_disc_acc": -0.1}, {"warmup_epoch": 3}],
)
def test_accuracy_band_rejects_bad_params(params):
    with pytest.raises(ValidationError):
        AccuracyBandGate.Params(**params)


ALWAYS_ROWS = [
    ((0, 0.0, None, True), BOTH),
    ((50, 0.9, 0.99, True), BOTH),
    ((0, 0.0, 0.10, True), BOTH),
    ((0, 0.0, None, False), G_ONLY),
]


@pytest.mark.parametrize(("fields", "expected"), ALWAYS_ROWS)
def test_always_gate(fields, expected):
    gate = AlwaysGate(AlwaysGate.Params())
    assert gate.decide(_state(*fields)) == expected
    assert gate.state_dict() == {}


EPOCH_ROWS = [
    ((0, 0.99, 0.5, True), WARMUP),
    ((2, 0.99, 0.5, True), WARMUP),
    ((3, 0.00, 0.99, True), BOTH),
    ((3, 0.00, 0.10, False), G_ONLY),
]


@pytest.mark.parametrize(("fields", "expected"), EPOCH_ROWS)
def test_epochs_gate(fields, expected):
    gate = EpochsGate(EpochsGate.Params(warmup_epochs=3))
    assert gate.decide(_state(*fields)) == expected


def test_phase_labels():
    assert WARMUP.label() == "warmup"
    assert D_ONLY.label() == "G- D+"
