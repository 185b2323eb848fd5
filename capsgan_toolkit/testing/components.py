"""Contract checks of the losses, gates and data sets.

Import them from :mod:`capsgan_toolkit.testing`; this module is their implementation.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel

from capsgan_toolkit.interfaces import (
    AdversarialLoss,
    ClassificationLoss,
    DatasetInfo,
    DatasetParams,
    DatasetPlugin,
    Gate,
    Phases,
    ReconstructionLoss,
    TrainState,
)
from capsgan_toolkit.testing.base import BATCH, _check_tensor, _Checker, _shape, check_params

# ------------------------------------------------------------------------------- losses


def _scalar(chk: _Checker, value: Any, what: str) -> torch.Tensor:
    chk.expect(isinstance(value, torch.Tensor) and value.dim() == 0, "shape",
               f"{what} is {_shape(value)}; the contract is a scalar tensor (shape ())")
    chk.expect(bool(torch.isfinite(value)), "finite", f"{what} is {float(value.detach())}")
    return value


def _build_loss(chk: _Checker, cls: type, base: type, params) -> torch.nn.Module:
    chk.expect(isinstance(cls, type) and issubclass(cls, base), "base class",
               f"it does not subclass capsgan_toolkit.interfaces.{base.__name__}")
    p = check_params(cls, params)
    with chk.running("build", "building it"):
        return cls(p)


def check_classification_loss(loss_cls: type[ClassificationLoss], params: Mapping[str, Any] | BaseModel | None = None,
                              *, num_classes: int = 10, capsule_dim: int = 6) -> None:
    """Check a classification loss: ``loss(capsules (B, K, D), labels (B,))`` is a finite scalar.

    Also: gradients reach the capsules, finite even at zero-length capsules; it is
    deterministic; it is lower when the true class's capsule is the longest than when
    another class's is; the params round-trip.

    Raises:
        ContractViolation: naming the check and the component.
    """
    chk = _Checker("check_classification_loss", "classification_loss", loss_cls)
    loss = _build_loss(chk, loss_cls, ClassificationLoss, params)
    k, d = num_classes, capsule_dim
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(BATCH) % k
    for name, caps in (("random capsules", torch.randn(BATCH, k, d, generator=gen) * 0.3),
                       ("zero-length capsules", torch.zeros(BATCH, k, d))):
        caps = caps.requires_grad_(True)
        with chk.running("forward", f"the loss of {name}"):
            value = _scalar(chk, loss(caps, labels), f"the loss of {name}")
        with chk.running("gradients", "backward from the loss"):
            value.backward()
        chk.expect(caps.grad is not None and bool(torch.isfinite(caps.grad).all()), "gradients",
                   f"the gradient reaching {name} is missing or not finite")
        again = loss(caps.detach(), labels)
        chk.expect(torch.equal(value.detach(), again.detach()), "determinism", "the same input gives another value")
    direction = torch.full((BATCH, k, d), 0.05 / math.sqrt(d))
    right, wrong = direction.clone(), direction.clone()
    rows = torch.arange(BATCH)
    right[rows, labels] = 0.95 / math.sqrt(d)
    wrong[rows, (labels + 1) % k] = 0.95 / math.sqrt(d)
    good, bad = float(loss(right, labels)), float(loss(wrong, labels))
    chk.expect(good < bad, "direction",
               f"the loss is {good:.4g} when the true class's capsule is the longest and {bad:.4g} when another "
               "class's is; training would not learn to classify")


def check_reconstruction_loss(loss_cls: type[ReconstructionLoss],
                              params: Mapping[str, Any] | BaseModel | None = None, *,
                              image_shape: Sequence[int] = (3, 8, 8), perfect_is_zero: bool = True) -> None:
    """Check a reconstruction loss: ``loss(reconstruction, target)`` over images is a finite scalar.

    Also: a perfect reconstruction costs less than an imperfect one, and (with
    ``perfect_is_zero``; pass ``False`` for a loss with an epsilon such as Charbonnier's) zero;
    gradients reach the reconstruction; deterministic; tensors of different shapes raise an
    error instead of broadcasting into a silently wrong loss; the params round-trip.

    Raises:
        ContractViolation: naming the check and the component.
    """
    chk = _Checker("check_reconstruction_loss", "reconstruction_loss", loss_cls)
    loss = _build_loss(chk, loss_cls, ReconstructionLoss, params)
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(BATCH, *image_shape, generator=gen) * 2 - 1
    recon = (torch.rand(BATCH, *image_shape, generator=gen) * 2 - 1).requires_grad_(True)
    with chk.running("forward", "the loss of a reconstruction"):
        value = _scalar(chk, loss(recon, target), "the loss of a reconstruction")
    chk.expect(float(value.detach()) > 0, "direction",
               f"an imperfect reconstruction costs {float(value.detach())}, not more than zero")
    with chk.running("gradients", "backward from the loss"):
        value.backward()
    chk.expect(recon.grad is not None and bool(torch.isfinite(recon.grad).all()) and bool(recon.grad.abs().sum() > 0),
               "gradients", "no finite, non-zero gradient reaches the reconstruction")
    chk.expect(torch.equal(value.detach(), loss(recon.detach(), target).detach()), "determinism",
               "the same input gives another value")
    perfect = float(loss(target, target.clone()))
    chk.expect(perfect < float(value.detach()), "direction",
               f"a perfect reconstruction costs {perfect}, not less than an imperfect one ({float(value.detach())})")
    if perfect_is_zero:
        chk.expect(abs(perfect) <= 1e-12, "direction", f"a perfect reconstruction costs {perfect}, not zero")
    c = image_shape[0]
    other = torch.rand(BATCH, c + 1, *image_shape[1:], generator=gen) * 2 - 1
    try:
        loss(recon.detach()[:, :1], other)
    except Exception:
        pass
    else:
        raise chk.fail("error messages", f"a reconstruction of shape {(BATCH, 1, *image_shape[1:])} and a target of "
                       f"shape {tuple(other.shape)} give a loss (broadcast); the contract is an error naming both "
                       "shapes (a generator that makes images of the wrong size must not train silently)")


def check_adversarial_loss(loss_cls: type[AdversarialLoss], params: Mapping[str, Any] | BaseModel | None = None) -> None:
    """Check an adversarial loss: ``generator_loss(fake_logits)`` and ``discriminator_loss(real, fake)``.

    Both are finite scalars with finite gradients to their logits, also for extreme logits
    (``±1e4``); the discriminator's loss is lower when it scores real images high and fakes
    low than the other way round; the generator's loss is lower when the fakes fool the
    discriminator; both are deterministic; the params round-trip.

    Raises:
        ContractViolation: naming the check and the component.
    """
    chk = _Checker("check_adversarial_loss", "adversarial_loss", loss_cls)
    loss = _build_loss(chk, loss_cls, AdversarialLoss, params)
    gen = torch.Generator().manual_seed(0)
    for name, scale in (("logits", 1.0), ("extreme logits", 1e4)):
        real = (torch.randn(BATCH, generator=gen) * scale).requires_grad_(True)
        fake = (torch.randn(BATCH, generator=gen) * scale).requires_grad_(True)
        with chk.running("forward", f"the losses of {name}"):
            d_loss = _scalar(chk, loss.discriminator_loss(real, fake), f"discriminator_loss of {name}")
            g_loss = _scalar(chk, loss.generator_loss(fake), f"generator_loss of {name}")
        with chk.running("gradients", "backward from the losses"):
            (d_loss + g_loss).backward()
        chk.expect(all(t.grad is not None and bool(torch.isfinite(t.grad).all()) for t in (real, fake)), "gradients",
                   f"the gradients reaching the {name} are missing or not finite")
        chk.expect(torch.equal(d_loss.detach(), loss.discriminator_loss(real.detach(), fake.detach()).detach()),
                   "determinism", "the same logits give another discriminator loss")
    high, low = torch.full((BATCH,), 3.0), torch.full((BATCH,), -3.0)
    right, wrong = float(loss.discriminator_loss(high, low)), float(loss.discriminator_loss(low, high))
    chk.expect(right < wrong, "direction", f"discriminator_loss is {right:.4g} when real images score high and fakes "
               f"low, and {wrong:.4g} the other way round; the discriminator would learn the wrong thing")
    fooled, caught = float(loss.generator_loss(high)), float(loss.generator_loss(low))
    chk.expect(fooled < caught, "direction", f"generator_loss is {fooled:.4g} when the fakes score as real and "
               f"{caught:.4g} when they score as fake; the generator would learn the wrong thing")


# -------------------------------------------------------------------------------- gates


def _gate_states(count: int = 24) -> list[TrainState]:
    gen = torch.Generator().manual_seed(0)
    fixed = [TrainState(epoch=0, step=0, encoder_acc=0.0, disc_acc=None),
             TrainState(epoch=30, step=10, encoder_acc=0.95, disc_acc=0.3),
             TrainState(epoch=30, step=11, encoder_acc=0.95, disc_acc=0.7),
             TrainState(epoch=31, step=12, encoder_acc=0.9, disc_acc=0.99)]
    walk = [TrainState(epoch=i // 6, step=i, encoder_acc=float(torch.rand(1, generator=gen)),
                       disc_acc=None if i < 2 else float(torch.rand(1, generator=gen))) for i in range(count)]
    return walk + fixed


def check_gate(gate_cls: type[Gate], params: Mapping[str, Any] | BaseModel | None = None) -> None:
    """Check a gate against the contract of :class:`~capsgan_toolkit.interfaces.Gate`.

    ``decide`` returns :class:`~capsgan_toolkit.interfaces.Phases` for a walk of training
    states; it never trains a discriminator the recipe does not have; its ``state_dict``
    survives a checkpoint (``torch.save`` / ``torch.load(weights_only=True)``) and a fresh gate
    given it with ``load_state_dict`` decides exactly as the original from then on (exact
    resume); two gates with the same params decide alike; the params round-trip.

    Raises:
        ContractViolation: naming the check and the component.
    """
    chk = _Checker("check_gate", "gate", gate_cls)
    chk.expect(isinstance(gate_cls, type) and issubclass(gate_cls, Gate), "base class",
               "it does not subclass capsgan_toolkit.interfaces.Gate")
    p = check_params(gate_cls, params)

    def build():
        with chk.running("build", "building it"):
            return gate_cls(p)

    states = _gate_states()
    gate = build()
    decisions = []
    for state in states:
        with chk.running("decide", f"decide({state})"):
            phases = gate.decide(state)
        chk.expect(isinstance(phases, Phases), "decide", f"decide({state}) returned {phases!r}, not a Phases")
        decisions.append(phases)
    other = build()
    chk.expect([other.decide(s) for s in states] == decisions, "determinism",
               "two gates with the same params decide differently on the same training states")
    for cut in (1, 3, len(states) // 2, len(states) - 2):
        original = build()
        for s in states[:cut]:
            original.decide(s)
        with chk.running("state round trip", "state_dict()"):
            state = original.state_dict()
        buffer = io.BytesIO()
        try:
            torch.save(state, buffer)
            buffer.seek(0)
            state = torch.load(buffer, weights_only=True)
        except Exception as exc:
            raise chk.fail("state round trip", f"its state_dict() {state!r} cannot be stored in a checkpoint "
                           f"({type(exc).__name__}: {exc}); use tensors and plain Python values") from exc
        fresh = build()
        with chk.running("state round trip", "load_state_dict(state_dict())"):
            fresh.load_state_dict(state)
        after = [fresh.decide(s) for s in states[cut:]]
        chk.expect(after == [original.decide(s) for s in states[cut:]], "state round trip",
                   f"after {cut} decisions, a fresh gate given the state_dict() decides differently from the "
                   "original: return every piece of state (latches, counters) from state_dict")
    no_d = build()
    for s in states:
        plain = TrainState(epoch=s.epoch, step=s.step, encoder_acc=s.encoder_acc, disc_acc=None,
                           has_discriminator=False)
        phases = no_d.decide(plain)
        chk.expect(isinstance(phases, Phases) and not phases.discriminator, "decide",
                   f"decide({plain}) trains a discriminator the recipe does not have (has_discriminator=False)")


# ----------------------------------------------------------------------------- datasets


def check_dataset(dataset_cls: type[DatasetPlugin], params: Mapping[str, Any] | BaseModel | None = None, *,
                  splits: Sequence[str] = ("train", "test"), items: int = 8) -> None:
    """Check a data set against the contract of :class:`~capsgan_toolkit.interfaces.DatasetPlugin`.

    ``info`` is a :class:`~capsgan_toolkit.interfaces.DatasetInfo` (``num_classes >= 1``, an
    image shape of three positive sizes, no class names or one per class); each split is a
    non-empty ``Dataset`` whose first ``items`` items are ``(float image of info.image_shape in
    [-1, 1], int label in [0, K))`` and batch with a ``DataLoader``; a second instance with the
    same params serves the same items; the params round-trip (base ``DatasetParams``).

    Pass params that keep the data small (few images), and that find its files.

    Raises:
        ContractViolation: naming the check and the component.
    """
    chk = _Checker("check_dataset", "dataset", dataset_cls)
    chk.expect(isinstance(dataset_cls, type) and issubclass(dataset_cls, DatasetPlugin), "base class",
               "it does not subclass capsgan_toolkit.interfaces.DatasetPlugin")
    p = check_params(dataset_cls, params, base=DatasetParams)
    with chk.running("build", "building it"):
        data = dataset_cls(p)
    with chk.running("info", "reading info"):
        info = data.info
    chk.expect(isinstance(info, DatasetInfo), "info", f"info is {info!r}, not a DatasetInfo")
    k, shape = info.num_classes, tuple(info.image_shape)
    chk.expect(isinstance(k, int) and k >= 1, "info", f"info.num_classes is {k!r}")
    chk.expect(len(shape) == 3 and all(isinstance(s, int) and s >= 1 for s in shape), "info",
               f"info.image_shape is {shape!r}; the contract is (C, H, W) of positive ints")
    chk.expect(len(info.class_names) in (0, k), "info",
               f"info.class_names has {len(info.class_names)} names for {k} classes")
    with chk.running("determinism", "building a second instance"):
        twin = dataset_cls(p)
    for name in splits:
        chk.where = f'split "{name}"'
        with chk.running("split", f'split("{name}")'):
            split = data.split(name)
        with chk.running("split", "len(split)"):
            n = len(split)
        chk.expect(n >= 1, "split", "the split is empty")
        for i in range(min(items, n)):
            with chk.running("items", f"reading item {i}"):
                item = split[i]
            chk.expect(isinstance(item, (tuple, list)) and len(item) == 2, "items",
                       f"item {i} is {type(item).__name__}; the contract is a pair (image, label)")
            image, label = item
            _check_tensor(chk, "items", f"the image of item {i}", image, shape, (-1.0, 1.0))
            label = int(label.item()) if isinstance(label, torch.Tensor) and label.numel() == 1 else label
            chk.expect(isinstance(label, int) and not isinstance(label, bool) and 0 <= label < k, "items",
                       f"the label of item {i} is {label!r}; the contract is an int in [0, {k})")
        with chk.running("items", "batching the split with a DataLoader"):
            images, labels = next(iter(torch.utils.data.DataLoader(split, batch_size=min(4, n))))
        chk.expect(tuple(images.shape) == (min(4, n), *shape) and labels.shape == (min(4, n),), "items",
                   f"a DataLoader batch has images of {_shape(images)} and labels of {_shape(labels)}")
        first = twin.split(name)[0]
        chk.expect(torch.equal(first[0], split[0][0]) and int(first[1]) == int(split[0][1]), "determinism",
                   "two instances with the same params serve different items: derive all randomness from params")
