"""Every registered component, exercised through the registry (a new one is tested automatically)."""

from __future__ import annotations

import pytest
import torch

from capsgan_toolkit.interfaces import (
    AdversarialLoss, ClassificationLoss, Phases, ReconstructionLoss, TrainState,
)
from capsgan_toolkit.plugin_manager import load_plugins

_REGISTRY = load_plugins().registry
SHAPES = [(1, 28, 28), (3, 32, 32)]
K = 10


def _ids(family):
    return [c.name for c in _REGISTRY.components(family)]


def _small(comp) -> dict:
    """Shrink width params (when a component has them) so the test stays fast."""
    small = {}
    fields = comp.params_model.model_fields
    for key, value in (("channels", 8), ("base_channels", 8), ("width", 8), ("conv1_channels", 16),
                       ("primary_types", 4), ("conv1_kernel", 5), ("primary_kernel", 5)):
        if key in fields:
            small[key] = value
    return small


def _assert_grads(module):
    params = [p for p in module.parameters() if p.requires_grad]
    assert params, "component has no trainable parameters"
    for name, p in module.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", _ids("encoder"))
def test_encoder_shapes_and_gradients(name, shape):
    torch.manual_seed(0)
    comp = _REGISTRY.get("encoder", name)
    enc = _REGISTRY.create("encoder", name, _small(comp), image_shape=shape, num_classes=K)
    x = torch.randn(3, *shape)
    caps = enc(x)
    assert caps.shape == (3, K, enc.capsule_dim)
    scores = enc.class_scores(caps)
    assert scores.shape == (3, K) and torch.isfinite(scores).all()
    latent = enc.to_latent(caps, torch.tensor([0, 1, 2]))
    assert latent.shape == caps.shape
    (caps.pow(2).sum() + latent.sum()).backward()
    _assert_grads(enc)


@pytest.mark.parametrize("shape", SHAPES + [(3, 64, 64)], ids=str)
@pytest.mark.parametrize("name", _ids("generator"))
def test_generator_shapes_and_gradients(name, shape):
    torch.manual_seed(0)
    gen = _REGISTRY.create("generator", name, _small(_REGISTRY.get("generator", name)),
                           num_classes=K, capsule_dim=16, image_shape=shape)
    out = gen(torch.randn(2, K, 16))
    assert out.shape == (2, *shape)
    assert out.min() >= -1 and out.max() <= 1
    out.sum().backward()
    _assert_grads(gen)


@pytest.mark.parametrize("shape", SHAPES + [(3, 64, 64)], ids=str)
@pytest.mark.parametrize("name", _ids("discriminator"))
def test_discriminator_shapes_and_gradients(name, shape):
    torch.manual_seed(0)
    disc = _REGISTRY.create("discriminator", name, _small(_REGISTRY.get("discriminator", name)), image_shape=shape)
    logits = disc(torch.randn(4, *shape))
    assert logits.shape == (4,)
    logits.sum().backward()
    _assert_grads(disc)


_LOSSES = [(family, name) for family in ("classification_loss", "reconstruction_loss", "adversarial_loss")
           for name in _ids(family)]


@pytest.mark.parametrize("family,name", _LOSSES, ids=[f"{f}-{n}" for f, n in _LOSSES])
def test_loss_is_a_finite_differentiable_scalar(family, name):
    torch.manual_seed(0)
    loss = _REGISTRY.create(family, name)
    expected = {"classification_loss": ClassificationLoss, "reconstruction_loss": ReconstructionLoss,
                "adversarial_loss": AdversarialLoss}[family]
    assert isinstance(loss, expected)
    if isinstance(loss, ClassificationLoss):
        caps = torch.randn(4, K, 16, requires_grad=True)
        value = loss(caps, torch.tensor([0, 3, 9, 3]))
        inputs = [caps]
    elif isinstance(loss, ReconstructionLoss):
        a, b = torch.randn(2, 3, 8, 8, requires_grad=True), torch.randn(2, 3, 8, 8)
        value = loss(a, b)
        inputs = [a]
        assert loss(b, b).item() == pytest.approx(0.0)
    else:
        assert isinstance(loss, AdversarialLoss)
        real, fake = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
        value = loss.discriminator_loss(real, fake) + loss.generator_loss(fake)
        inputs = [real, fake]
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in inputs)


@pytest.mark.parametrize("name", _ids("gate"))
def test_gate_decides_and_round_trips_its_state(name):
    gate = _REGISTRY.create("gate", name)
    states = [TrainState(epoch=e, step=s, encoder_acc=a, disc_acc=d)
              for e, s, a, d in [(0, 0, 0.0, None), (30, 10, 0.95, 0.3), (30, 11, 0.95, 0.7), (31, 12, 0.9, 0.99)]]
    decisions = [gate.decide(s) for s in states]
    assert all(isinstance(p, Phases) for p in decisions)
    fresh = _REGISTRY.create("gate", name)
    fresh.load_state_dict(gate.state_dict())
    assert [fresh.decide(s) for s in states[1:]] == decisions[1:]
    no_d = gate.decide(TrainState(epoch=50, step=99, encoder_acc=1.0, disc_acc=None, has_discriminator=False))
    assert not no_d.discriminator


@pytest.mark.parametrize("name", _ids("dataset"))
def test_dataset_params_have_documented_defaults(name):
    comp = _REGISTRY.get("dataset", name)
    for field_name, field in comp.params_model.model_fields.items():
        assert field.description, f"dataset {name}: param {field_name} has no description"
    assert "batch_size" in comp.params_model.model_fields
