"""capsgan_toolkit.testing: every registered component passes its family's contract checks, so do the
example plugin's encoder, and a component that breaks the contract fails with a message naming the
check and the component.

The built-ins are checked here through the registry, one test per component: a newly registered
(or installed) component is checked without a new test.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import Field
from torch import nn

from capsgan_toolkit import testing as kit
from capsgan_toolkit.interfaces import (
    AdversarialLoss,
    ClassificationLoss,
    DatasetParams,
    Discriminator,
    Encoder,
    EncoderParams,
    Gate,
    Generator,
    Params,
    Phases,
    ReconstructionLoss,
)
from capsgan_toolkit.plugin.manager import load_plugins

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "capsgan-example-encoder"
_REGISTRY = load_plugins().registry
SHAPES = ((1, 28, 28), (3, 32, 32))
K = 10


def _components(*families):
    return [pytest.param(c, id=f"{c.family}-{c.name}") for f in families for c in _REGISTRY.components(f)]


def _small(comp) -> dict:
    """Shrink width params (when a component has them) so the checks stay fast."""
    small = {}
    fields = comp.params_model.model_fields
    for key, value in (("channels", 4), ("base_channels", 4), ("width", 4), ("stages", 2), ("blocks", 1),
                       ("conv1_channels", 16), ("primary_types", 4), ("conv1_kernel", 5), ("primary_kernel", 5)):
        if key in fields:
            small[key] = value
    return small


# ------------------------------------------------------------------- every registered component


_IMAGE_SHAPES = {"generator": SHAPES + ((3, 64, 64),), "discriminator": SHAPES + ((3, 64, 64),)}
_KNOWN_GAPS: dict = {}
"""Checks a built-in does not pass yet: (family, name) -> options narrowing the check (none today)."""


@pytest.mark.parametrize("comp", _components("encoder", "generator", "discriminator"))
def test_every_model_meets_its_contract(comp):
    options = {"image_shapes": _IMAGE_SHAPES.get(comp.family, SHAPES), **_KNOWN_GAPS.get((comp.family, comp.name), {})}
    kit.check_component(comp.family, comp.cls, _small(comp), **options)


@pytest.mark.parametrize("comp", _components("classification_loss", "reconstruction_loss", "adversarial_loss", "gate"))
def test_every_loss_and_gate_meets_its_contract(comp):
    kit.check_component(comp.family, comp.cls)


@pytest.mark.parametrize("comp", _components("objective"))
def test_every_objective_trains_two_steps_under_the_contract_checks(comp):
    kit.check_objective(comp.cls)


def _idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()) if path.suffix == ".gz"
                     else header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Tiny files in the layouts the file-backed data sets read: MNIST, Fashion-MNIST, CIFAR-10, an image folder."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for folder in (root / "MNIST" / "raw", root / "fashion"):
        folder.mkdir(parents=True)
        for prefix, n in (("train", 20), ("t10k", 10)):
            _idx(folder / f"{prefix}-images-idx3-ubyte", 0x803, rng.integers(0, 256, (n, 28, 28)))
            _idx(folder / f"{prefix}-labels-idx1-ubyte", 0x801, np.arange(n) % 10)
    cifar = root / "cifar-10-batches-py"
    cifar.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 3, 7, 9]}
        (cifar / name).write_bytes(pickle.dumps(batch))
    (cifar / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    for label in ("circle", "square"):
        (root / "images" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "images" / label / f"{i}.png")
    return root


def _dataset_params(name: str, root: Path) -> dict:
    return {
        "glyphs": {"num_train": 20, "num_test": 10, "image_size": 28, "channels": 1},
        "mnist": {"root": str(root), "download": False},
        "fashion_mnist": {"root": str(root / "fashion"), "download": False},
        "cifar10": {"root": str(root), "download": False},
        "image_folder": {"root": str(root / "images")},
    }.get(name, {})


@pytest.mark.parametrize("comp", _components("dataset"))
def test_every_dataset_meets_its_contract(comp, data_root):
    kit.check_dataset(comp.cls, _dataset_params(comp.name, data_root))


_BASES = {"encoder": EncoderParams, "dataset": DatasetParams}


@pytest.mark.parametrize("comp", _components(*_REGISTRY.families))
def test_every_params_model_round_trips_rejects_unknown_keys_and_is_documented(comp):
    params = _dataset_params(comp.name, Path("data")) if comp.family == "dataset" else None  # required keys
    kit.check_params(comp.params_model, params, base=_BASES.get(comp.family, Params))


# ------------------------------------------------------------------------ the example plugin


def test_example_plugins_encoder_meets_the_contract(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from capsgan_example_encoder import PatchMLPEncoder

    kit.check_encoder(PatchMLPEncoder, {"embed_dim": 4, "hidden": 16, "capsule_dim": 4})
    sys.modules.pop("capsgan_example_encoder.npz_dataset", None)
    sys.modules.pop("capsgan_example_encoder", None)


# ------------------------------------------------------------- what the kit catches, and says


class _Enc(Encoder):
    """A small, correct encoder; the broken ones below change one thing."""

    class Params(EncoderParams):
        capsule_dim: int = Field(4, ge=1, description="D.")

    def __init__(self, params, *, image_shape, num_classes):
        super().__init__(params, image_shape=image_shape, num_classes=num_classes)
        from capsgan_toolkit.layers import check_image_shape

        c, h, w = check_image_shape("Encoder _Enc", image_shape)
        self.capsule_dim = params.capsule_dim
        self.head = nn.Linear(c * h * w, num_classes * params.capsule_dim)

    def forward(self, images):
        from capsgan_toolkit.layers import squash

        return squash(self.head(images.flatten(1)).view(-1, self.num_classes, self.capsule_dim))


def test_a_correct_encoder_passes():
    kit.check_encoder(_Enc)


def _violation(check_fn, cls, *args, **kwargs) -> kit.ContractViolation:
    with pytest.raises(AssertionError) as info:
        check_fn(cls, *args, **kwargs)
    assert isinstance(info.value, kit.ContractViolation)
    message = str(info.value)
    # A fault of the params model is reported by check_params, which every check calls first.
    assert message.split(": ")[0] in (check_fn.__name__, "check_params") and cls.__qualname__ in message, message
    return info.value


class _Transposed(_Enc):
    def forward(self, images):
        return super().forward(images).transpose(1, 2)


class _Unused(_Enc):
    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.spare = nn.Linear(2, 2)


class _Unseeded(_Enc):
    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        with torch.no_grad():
            self.head.weight.mul_(float(np.random.default_rng().uniform(0.5, 2.0)))  # fresh entropy: not seeded


class _NoShapeCheck(_Enc):
    def __init__(self, params, *, image_shape, num_classes):
        Encoder.__init__(self, params, image_shape=image_shape, num_classes=num_classes)
        c, h, w = image_shape  # a 2-tuple: ValueError; a zero size: builds
        self.capsule_dim = params.capsule_dim
        self.head = nn.Linear(c * h * w, num_classes * params.capsule_dim)


class _IgnoresLatentMode(_Enc):
    def to_latent(self, capsules, labels=None):
        return capsules


class _LaxParams(_Enc):
    class Params(EncoderParams):
        model_config = {"extra": "ignore", "frozen": True}
        capsule_dim: int = Field(4, ge=1, description="D.")


class _LossyParams(_Enc):
    class Params(EncoderParams):
        capsule_dim: int = Field(4, ge=1, description="D.")
        depth: int | None = Field(3, description="None is a value of its own here, lost when None is left out.")


class _Undocumented(_Enc):
    class Params(EncoderParams):
        capsule_dim: int = 4


class _TensorDiagnostics(_Enc):
    def forward(self, images):
        caps = super().forward(images)
        self.diagnostics["capsule_len"] = self.class_scores(caps).mean()  # a tensor, not a float
        return caps


@pytest.mark.parametrize(("cls", "params", "check", "says"), [
    (_Transposed, None, "shape", "has shape (3, 4, 10); the contract is (3, 10, 4)"),
    (_Unused, None, "gradients", 'no gradient reaches parameter "spare.weight"'),
    (_Unseeded, None, "determinism", "two builds under the same seed have different weights"),
    (_NoShapeCheck, None, "error messages", "(28, 28) raised ValueError"),
    (_IgnoresLatentMode, None, "masking", 'latent = "true_class" (with labels) does not keep only the true class'),
    (_LaxParams, None, "params", "an unknown key"),
    (_LossyParams, {"depth": None}, "params round trip", "round trip gives"),
    (_Undocumented, None, "params", 'param "capsule_dim" has no description'),
    (_TensorDiagnostics, None, "diagnostics", "the contract is a finite Python number"),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_a_broken_encoder_fails_the_check_that_names_its_fault(cls, params, check, says):
    violation = _violation(kit.check_encoder, cls, params)
    assert violation.check == check, str(violation)
    assert says in str(violation), str(violation)


class _Gen(Generator):
    class Params(Params):
        pass

    def __init__(self, params, *, num_classes, capsule_dim, image_shape):
        super().__init__(params, num_classes=num_classes, capsule_dim=capsule_dim, image_shape=image_shape)
        from capsgan_toolkit.layers import check_image_shape

        check_image_shape("Generator _Gen", image_shape)
        self.net = nn.Linear(num_classes * capsule_dim, int(np.prod(image_shape)))

    def forward(self, latent):
        return torch.tanh(self.net(latent.flatten(1))).view(-1, *self.image_shape)


class _NoTanh(_Gen):
    def forward(self, latent):
        return 5 * self.net(latent.flatten(1)).view(-1, *self.image_shape)


class _DetachedLatent(_Gen):
    def forward(self, latent):
        return super().forward(latent.detach())


def test_generator_checks_catch_range_and_a_detached_latent():
    kit.check_generator(_Gen)
    assert _violation(kit.check_generator, _NoTanh).check == "range"
    violation = _violation(kit.check_generator, _DetachedLatent)
    assert violation.check == "gradients" and "the latent" in str(violation)


class _Disc(Discriminator):
    class Params(Params):
        pass

    def __init__(self, params, *, image_shape):
        super().__init__(params, image_shape=image_shape)
        from capsgan_toolkit.layers import check_image_shape

        check_image_shape("Discriminator _Disc", image_shape)
        self.net = nn.Linear(int(np.prod(image_shape)), 1)

    def forward(self, images):
        return self.net(images.flatten(1))  # (B, 1): the contract is (B,)


def test_discriminator_check_catches_a_logit_column():
    violation = _violation(kit.check_discriminator, _Disc)
    assert violation.check == "shape" and "has shape (3, 1); the contract is (3,)" in str(violation)


class _WrongWayMargin(ClassificationLoss):
    def forward(self, capsules, labels):
        return Encoder.class_scores(capsules).gather(1, labels[:, None]).mean()  # rewards the true class's length


class _Broadcasting(ReconstructionLoss):
    def forward(self, reconstruction, target):
        return (reconstruction - target).pow(2).mean()


class _SwappedAdversarial(AdversarialLoss):
    def generator_loss(self, fake_logits):
        return nn.functional.softplus(fake_logits).mean()

    def discriminator_loss(self, real_logits, fake_logits):
        return nn.functional.softplus(real_logits).mean() + nn.functional.softplus(-fake_logits).mean()


def test_loss_checks_catch_the_wrong_direction_and_silent_broadcasting():
    assert _violation(kit.check_classification_loss, _WrongWayMargin).check == "direction"
    violation = _violation(kit.check_reconstruction_loss, _Broadcasting)
    assert violation.check == "error messages" and "broadcast" in str(violation)
    violation = _violation(kit.check_adversarial_loss, _SwappedAdversarial)
    assert violation.check == "direction" and "discriminator_loss" in str(violation)


class _ForgetfulGate(Gate):
    """Trains D every third step by its own counter, but forgets the counter in a checkpoint."""

    def __init__(self, params):
        super().__init__(params)
        self.calls = 0

    def decide(self, state):
        self.calls += 1
        return Phases(generator=True, discriminator=state.has_discriminator and self.calls % 3 == 0)


def test_gate_check_catches_state_missing_from_state_dict():
    violation = _violation(kit.check_gate, _ForgetfulGate)
    assert violation.check == "state round trip" and "decides differently" in str(violation)


def test_dataset_check_catches_pixels_outside_minus_one_to_one():
    from capsgan_plugins.glyphs import GlyphsDataset

    class Unscaled(GlyphsDataset):
        def split(self, name):
            inner = super().split(name)
            return [((image + 1) * 127.5, label) for image, label in (inner[i] for i in range(len(inner)))]

    violation = _violation(kit.check_dataset, Unscaled, {"num_train": 10, "num_test": 10, "image_size": 28})
    assert violation.check == "range" and "the contract is [-1, 1]" in str(violation)


def test_objective_check_catches_a_step_that_trains_nothing():
    from capsgan_plugins.objectives import ClassifierObjective

    class Idle(ClassifierObjective):
        def step(self, images, labels, phases, update):
            result = super().step(images, labels, phases, lambda *args: True)  # never steps the optimizer
            return result

    violation = _violation(kit.check_objective, Idle)
    assert violation.check == "training" and 'changed no parameter of optimizer "encoder"' in str(violation)


def test_check_component_refuses_a_family_without_a_check():
    with pytest.raises(ValueError, match='no check for family "metric_features"'):
        kit.check_component("metric_features", object)
