"""Built-in models and losses: math against plain float64 re-implementations, shapes, gradients, params."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from capsgan_plugins import cnn, dcgan, gates, losses
from capsgan_plugins.cnn import CNNEncoder, ResNetEncoder
from capsgan_plugins.dcgan import DCGANDiscriminator, DCGANGenerator
from capsgan_plugins.losses import (
    CrossEntropyLoss,
    HingeLoss,
    L1Loss,
    MarginLoss,
    MinimaxLoss,
    MSELoss,
    NonSaturatingLoss,
    r1_penalty,
)
from capsgan_toolkit import layers
from capsgan_toolkit import testing as kit
from capsgan_toolkit.errors import RecipeError, RegistryError
from capsgan_toolkit.layers import squash
from capsgan_toolkit.plugin.registry import Registry

SHAPES = [(1, 28, 28), (3, 32, 32), (3, 64, 64)]
K, D = 10, 16


@pytest.fixture(scope="module")
def registry() -> Registry:
    reg = Registry()
    for module in (cnn, dcgan, losses, gates):
        reg.current_source = module.__name__
        module.capsgan_register(reg)
    return reg


# ------------------------------------------------------------------ plain references


def _length(vec) -> float:
    # The toolkit's capsule length keeps a 1e-12 epsilon inside the square root.
    return math.sqrt(sum(float(x) ** 2 for x in vec) + 1e-12)


def _margin_reference(caps: np.ndarray, labels: np.ndarray, m_plus=0.9, m_minus=0.1, lam=0.5) -> float:
    total = 0.0
    for b in range(caps.shape[0]):
        for k in range(caps.shape[1]):
            length = _length(caps[b, k])
            if k == int(labels[b]):
                total += max(0.0, m_plus - length) ** 2
            else:
                total += lam * max(0.0, length - m_minus) ** 2
    return total / caps.shape[0]


def _softplus(x: float) -> float:
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def _random_capsules(seed: int, batch: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(batch, K, D, generator=gen, dtype=torch.float64) * 0.3
    caps = squash(raw)
    caps[0, 3] = 0.0  # an exactly zero-length capsule inside the batch
    labels = torch.randint(0, K, (batch,), generator=gen)
    return caps, labels


# ---------------------------------------------------------------------------- squash


def test_squash_matches_float64_formula_and_lengths_below_one():
    torch.manual_seed(0)
    s = torch.randn(4, K, D, dtype=torch.float64) * torch.logspace(-3, 2, K, dtype=torch.float64).view(1, K, 1)
    v = squash(s).numpy()
    ref = np.empty_like(v)
    for idx in np.ndindex(s.shape[:2]):
        vec = s[idx].numpy()
        sq = float(np.dot(vec, vec))
        ref[idx] = (sq / (1.0 + sq)) * vec / math.sqrt(sq + 1e-8)
    np.testing.assert_allclose(v, ref, rtol=1e-10, atol=1e-14)
    assert (np.linalg.norm(v, axis=-1) < 1.0).all()


def test_squash_gradient_finite_at_zero_length():
    s = torch.zeros(2, K, D, requires_grad=True)
    v = squash(s)
    v.sum().backward()
    assert torch.equal(v, torch.zeros_like(v))
    assert torch.isfinite(s.grad).all()


ROOT = Path(__file__).resolve().parents[1]


def test_squash_is_defined_once_in_capsgan_toolkit_layers(monkeypatch):
    """No plugin module (built-in or example) keeps a copy of squash: all import capsgan_toolkit.layers'."""
    sources = sorted((ROOT / "plugins").rglob("*.py")) + sorted((ROOT / "examples").rglob("*.py"))
    assert len(sources) > 5

    def defines_squash(node) -> bool:  # def squash(...) or squash = lambda ..., at any depth
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return node.name == "squash"
        return isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "squash" for t in node.targets)

    copies = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in sources
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if defines_squash(node)
    ]
    assert copies == [], f"squash defined outside capsgan_toolkit/layers.py: {copies}"
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "capsgan-example-encoder"))
    import capsgan_example_encoder

    from capsgan_plugins import capsule

    for module in (capsule, cnn, capsgan_example_encoder):
        assert module.squash is layers.squash, module.__name__


def test_shape_checks_name_the_component():
    assert layers.check_image_shape('Encoder "x"', [3, 8, 6]) == (3, 8, 6)
    for bad in [(8, 8), (0, 8, 8), (1, 2, 3, 4)]:
        with pytest.raises(RecipeError, match=r'^Encoder "x" needs an image shape \(C, H, W\) of positive sizes'):
            layers.check_image_shape('Encoder "x"', bad)
    assert layers.check_square_image_shape('Generator "g"', (1, 28, 28)) == (1, 28)
    with pytest.raises(RecipeError, match=r'Generator "g" makes square images only, .* are 28x32'):
        layers.check_square_image_shape('Generator "g"', (1, 28, 32))
    with pytest.raises(RecipeError, match="at least 4x4 pixels, got 3x3"):
        layers.check_square_image_shape('Generator "g"', (1, 3, 3))
    assert layers.check_square_image_shape('Generator "g"', (1, 3, 3), min_side=2) == (1, 3)
    layers.check_image_batch("net", torch.zeros(2, 1, 4, 4), (1, 4, 4))
    for batch in (torch.zeros(1, 4, 4), torch.zeros(2, 3, 4, 4)):
        with pytest.raises(RecipeError, match=r"net was built for images of shape \(1, 4, 4\); got a batch"):
            layers.check_image_batch("net", batch, (1, 4, 4))


@pytest.mark.parametrize("size, depth", [(28, 2), (32, 3), (64, 4), (7, 0), (8, 1)])
def test_strided_depth_and_conv_stack_halve_to_the_planned_size(size, depth):
    assert layers.strided_depth(size) == depth
    stack, channels = layers.conv_stack(3, 8, depth, batch_norm=True, dropout=0.1, max_channels=16)
    assert channels == (min(8 * 2 ** (depth - 1), 16) if depth else 3)
    out = stack.eval()(torch.zeros(2, 3, size, size))
    assert out.shape == (2, channels, size >> depth, size >> depth)
    norms = [m for m in stack if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == max(depth - 1, 0)  # none after the first conv, as in DCGAN


# ---------------------------------------------------------------------------- margin


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_margin_loss_matches_hand_computation(seed):
    caps, labels = _random_capsules(seed)
    loss = MarginLoss(MarginLoss.Params())(caps, labels)
    assert loss.item() == pytest.approx(_margin_reference(caps.numpy(), labels.numpy()), rel=1e-9, abs=1e-12)


def test_margin_loss_params_change_value_through_lambda_alias():
    caps, labels = _random_capsules(3)
    params = MarginLoss.Params.model_validate({"m_plus": 0.8, "m_minus": 0.2, "lambda": 0.25})
    assert params.lambda_ == 0.25
    got = MarginLoss(params)(caps, labels).item()
    want = _margin_reference(caps.numpy(), labels.numpy(), m_plus=0.8, m_minus=0.2, lam=0.25)
    assert got == pytest.approx(want, rel=1e-9)
    assert got != pytest.approx(_margin_reference(caps.numpy(), labels.numpy()), rel=1e-3)


def test_margin_params_accept_alias_and_name_but_still_forbid_unknown_keys():
    model = MarginLoss.Params
    assert model.model_validate({"lambda": 0.3}).lambda_ == 0.3
    assert model(lambda_=0.4).lambda_ == 0.4
    assert model.model_config["extra"] == "forbid"
    with pytest.raises(ValidationError):
        model.model_validate({"lamda": 0.3})
    with pytest.raises(ValidationError, match="m_minus"):
        model.model_validate({"m_plus": 0.1, "m_minus": 0.9})


def test_margin_loss_gradient_finite_at_zero_length_capsules():
    caps = torch.zeros(3, K, D, requires_grad=True)
    labels = torch.tensor([0, 4, 9])
    loss = MarginLoss(MarginLoss.Params())(caps, labels)
    loss.backward()
    # Zero length: only the present class contributes, m+^2 per example.
    assert loss.item() == pytest.approx((0.9 - 1e-6) ** 2, rel=1e-6)
    assert torch.isfinite(caps.grad).all()


def test_margin_loss_gradient_pushes_lengths_the_right_way():
    caps, labels = _random_capsules(4)
    caps[0, 3] = 0.05  # no zero-length capsule here: its gradient direction is undefined
    caps = caps.clone().requires_grad_(True)
    MarginLoss(MarginLoss.Params())(caps, labels).backward()
    lengths = caps.detach().norm(dim=-1)
    radial = (caps.grad * caps.detach()).sum(-1) / lengths  # d loss / d length
    for b, label in enumerate(labels.tolist()):
        for k in range(K):
            if k == label and lengths[b, k] < 0.9:
                assert radial[b, k] < 0
            elif k != label and lengths[b, k] > 0.1:
                assert radial[b, k] > 0


def test_cross_entropy_matches_hand_computation():
    caps, labels = _random_capsules(5)
    temperature = 0.2
    got = CrossEntropyLoss(CrossEntropyLoss.Params(temperature=temperature))(caps, labels).item()
    total = 0.0
    for b in range(caps.shape[0]):
        logits = [_length(caps[b, k]) / temperature for k in range(K)]
        top = max(logits)
        total += top + math.log(sum(math.exp(z - top) for z in logits)) - logits[int(labels[b])]
    assert got == pytest.approx(total / caps.shape[0], rel=1e-9)


# ----------------------------------------------------------------------- reconstruction


def test_mse_and_l1_match_numpy():
    gen = np.random.default_rng(0)
    a = gen.uniform(-1, 1, size=(3, 2, 5, 5))
    b = gen.uniform(-1, 1, size=(3, 2, 5, 5))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    assert MSELoss(MSELoss.Params())(ta, tb).item() == pytest.approx(float(np.mean((a - b) ** 2)), rel=1e-12)
    assert L1Loss(L1Loss.Params())(ta, tb).item() == pytest.approx(float(np.mean(np.abs(a - b))), rel=1e-12)


def test_reconstruction_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        MSELoss(MSELoss.Params())(torch.zeros(2, 1, 28, 28), torch.zeros(2, 1, 32, 32))


# -------------------------------------------------------------------------- adversarial

REAL = [2.5, -0.3, 0.0, 40.0]
FAKE = [-1.2, 0.7, -35.0, 3.0]


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def _bce_d() -> float:
    # -log sigmoid(r) - log(1 - sigmoid(f)), computed from the sigmoid itself where it is safe.
    real = _mean([-math.log(1.0 / (1.0 + math.exp(-r))) if r > -30 else -r for r in REAL])
    fake = _mean([-math.log(1.0 - 1.0 / (1.0 + math.exp(-f))) if f < 30 else f for f in FAKE])
    return real + fake


@pytest.mark.parametrize(
    ("cls", "want_g", "want_d"),
    [
        (MinimaxLoss, _mean([math.log(1.0 - 1.0 / (1.0 + math.exp(-f))) for f in FAKE]), _bce_d()),
        (NonSaturatingLoss, _mean([-math.log(1.0 / (1.0 + math.exp(-f))) for f in FAKE]), _bce_d()),
        (HingeLoss, -_mean(FAKE), _mean([max(0.0, 1 - r) for r in REAL]) + _mean([max(0.0, 1 + f) for f in FAKE])),
    ],
)
def test_adversarial_losses_match_hand_values(cls, want_g, want_d):
    loss = cls(cls.Params())
    real = torch.tensor(REAL, dtype=torch.float64)
    fake = torch.tensor(FAKE, dtype=torch.float64)
    assert loss.generator_loss(fake).item() == pytest.approx(want_g, rel=1e-9)
    assert loss.discriminator_loss(real, fake).item() == pytest.approx(want_d, rel=1e-9)


def test_bce_losses_stay_finite_for_extreme_logits():
    real = torch.tensor([1e4, -1e4], requires_grad=True)
    fake = torch.tensor([-1e4, 1e4], requires_grad=True)
    for cls in (MinimaxLoss, NonSaturatingLoss):
        loss = cls(cls.Params())
        total = loss.discriminator_loss(real, fake) + loss.generator_loss(fake)
        total.backward()
        assert torch.isfinite(total)
        assert torch.isfinite(real.grad).all() and torch.isfinite(fake.grad).all()
        assert loss.discriminator_loss(real, fake).item() == pytest.approx(_mean([0.0, 1e4]) * 2, rel=1e-6)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize(
    ("cls", "want_g_grad", "want_d_real_grad", "want_d_fake_grad"),
    [
        # d/df softplus(-f) = -sigmoid(-f); d/dr softplus(-r) = -sigmoid(-r); d/df softplus(f) = sigmoid(f)
        (NonSaturatingLoss, [-_sigmoid(-f) / len(FAKE) for f in FAKE],
         [-_sigmoid(-r) / len(REAL) for r in REAL], [_sigmoid(f) / len(FAKE) for f in FAKE]),
        # hinge: d/dr relu(1 - r) = -1 where r < 1; d/df relu(1 + f) = 1 where f > -1; the generator's -f: -1
        (HingeLoss, [-1.0 / len(FAKE)] * len(FAKE),
         [(-1.0 if r < 1 else 0.0) / len(REAL) for r in REAL], [(1.0 if f > -1 else 0.0) / len(FAKE) for f in FAKE]),
    ],
)
def test_nonsaturating_and_hinge_gradients_match_hand_formulas(cls, want_g_grad, want_d_real_grad, want_d_fake_grad):
    loss = cls(cls.Params())
    real = torch.tensor(REAL, dtype=torch.float64, requires_grad=True)
    fake = torch.tensor(FAKE, dtype=torch.float64, requires_grad=True)
    (g_fake,) = torch.autograd.grad(loss.generator_loss(fake), fake)
    d_real, d_fake = torch.autograd.grad(loss.discriminator_loss(real, fake), (real, fake))
    np.testing.assert_allclose(g_fake.numpy(), want_g_grad, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(d_real.numpy(), want_d_real_grad, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(d_fake.numpy(), want_d_fake_grad, rtol=1e-12, atol=1e-300)


class _TanhCritic(torch.nn.Module):
    """D(x) = sum_i a_i tanh(b_i x_i) + c: its input gradient, a_i b_i (1 - tanh^2(b_i x_i)), is known by hand."""

    def __init__(self, size: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(torch.randn(size, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.rand(size, generator=g, dtype=torch.float64) + 0.5)
        self.c = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        return (self.a * torch.tanh(self.b * x.flatten(1))).sum(1) + self.c


@pytest.mark.parametrize("seed", [0, 1])
def test_r1_penalty_matches_the_hand_gradient_norm_and_trains_the_discriminator(seed):
    critic = _TanhCritic(2 * 3 * 3, seed)
    x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    a, b = critic.a.detach().numpy(), critic.b.detach().numpy()
    want = 0.0
    for image in x.numpy():
        flat = image.reshape(-1)
        want += sum((a[i] * b[i] * (1.0 - math.tanh(b[i] * flat[i]) ** 2)) ** 2 for i in range(flat.size))
    want /= x.shape[0]
    real = x.clone().requires_grad_(True)
    assert r1_penalty(critic(real), real).item() == pytest.approx(want, rel=1e-12)
    # A linear critic's gradient is its weight vector for every image: R1 = |w|^2.
    linear = torch.nn.Linear(18, 1).double()
    real = x.clone().requires_grad_(True)
    assert r1_penalty(linear(real.flatten(1)).squeeze(1), real).item() == pytest.approx(
        float((linear.weight.detach() ** 2).sum()), rel=1e-12)
    # The penalty keeps its graph: its gradient reaches the critic's weights (checked numerically).
    assert torch.autograd.gradcheck(
        lambda a_, b_: r1_penalty(torch.func.functional_call(critic, {"a": a_, "b": b_, "c": critic.c},
                                                             (real,)), real),
        (critic.a.detach().clone().requires_grad_(True), critic.b.detach().clone().requires_grad_(True)))
    assert r1_penalty(critic.c + 0.0 * real.sum((1, 2, 3)), real).item() == 0.0  # a constant critic: no penalty


# ------------------------------------------------------------------------ model shapes
# The family contracts (shapes, finite values, gradients reaching every parameter, ranges) are
# capsgan_toolkit.testing's; here they run on parameter variants the registry test does not try.


@pytest.mark.parametrize(
    ("cls", "params"),
    [
        (CNNEncoder, {"channels": 4, "capsule_dim": 6, "dropout": 0.1}),
        (CNNEncoder, {"channels": 4, "capsule_dim": 6, "batch_norm": False, "squash": False}),
        (ResNetEncoder, {"width": 4, "blocks": 1, "capsule_dim": 6}),
    ],
)
def test_encoder_shapes_lengths_and_gradients(cls, params):
    kit.check_encoder(cls, params, image_shapes=SHAPES, num_classes=K)
    for shape in SHAPES:
        torch.manual_seed(0)
        encoder = cls(cls.Params(**params), image_shape=shape, num_classes=K)
        assert encoder.capsule_dim == 6
        if params.get("squash", True):
            assert (encoder.class_scores(encoder(torch.rand(3, *shape) * 2 - 1)) < 1).all()


@pytest.mark.parametrize("upsampling", ["transposed", "nearest"])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_dcgan_generator_shapes_range_and_gradients(batch_norm, upsampling):
    kit.check_generator(DCGANGenerator, {"base_channels": 4, "batch_norm": batch_norm, "upsampling": upsampling},
                        image_shapes=SHAPES, num_classes=K, capsule_dim=D)


def test_dcgan_generator_nearest_upsampling_is_upsample_then_conv():
    # Each doubling: nearest-neighbour upsampling, then a 3x3 convolution (checked against F.interpolate + conv2d).
    gen = DCGANGenerator(DCGANGenerator.Params(base_channels=4, upsampling="nearest"), num_classes=K,
                         capsule_dim=D, image_shape=(3, 32, 32)).double().eval()
    layers = list(gen.decode)
    assert [type(m).__name__ for m in layers[:2]] == ["Upsample", "Conv2d"] and layers[1].kernel_size == (3, 3)
    x = torch.randn(2, gen.start_channels, 4, 4, dtype=torch.float64)
    want = torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"),
                                      layers[1].weight, layers[1].bias, padding=1)
    assert torch.allclose(layers[1](layers[0](x)), want, atol=1e-12) and want.shape[-1] == 8
    transposed = DCGANGenerator(DCGANGenerator.Params(base_channels=4), num_classes=K, capsule_dim=D,
                                image_shape=(3, 32, 32))
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in transposed.decode) == 3
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in gen.decode)


@pytest.mark.parametrize(
    "params",
    [
        {"base_channels": 4},
        {"base_channels": 4, "batch_norm": False, "spectral_norm": True, "dropout": 0.2},
    ],
)
def test_dcgan_discriminator_shapes_and_gradients(params):
    kit.check_discriminator(DCGANDiscriminator, params, image_shapes=SHAPES)


def _disc(shape=(3, 32, 32), **params):
    torch.manual_seed(0)
    return DCGANDiscriminator(DCGANDiscriminator.Params(base_channels=4, **params), image_shape=shape).double()


@pytest.mark.parametrize("spectral", [False, True])
def test_projection_discriminator_adds_the_class_embedding_inner_product(spectral):
    params = {"batch_norm": not spectral, "spectral_norm": spectral}
    plain, disc = _disc(**params), _disc(projection_classes=K, **params)
    disc.eval()
    x = torch.rand(5, 3, 32, 32, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 3, 9, 3, 1])
    h = disc.features(x).flatten(1)
    head = disc.head(h).squeeze(1)
    embed = disc.embed.weight.detach()  # (K, F); with spectral norm, the normalised weight
    want = head + torch.stack([embed[int(y)] @ h[i] for i, y in enumerate(labels)])
    assert torch.allclose(disc(x, labels), want, rtol=1e-12, atol=1e-12)
    assert torch.allclose(disc(x), head, atol=0)  # no labels: the unconditional part alone
    assert not torch.allclose(disc(x, labels), disc(x, (labels + 1) % K))
    assert embed.shape == (K, h.shape[1])
    # The unconditional discriminator is as it was: no embedding among its weights.
    assert not any("embed" in k for k in plain.state_dict()) and plain.projection_classes is None
    disc.train()
    disc(x, labels).sum().backward()
    grads = dict(disc.named_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in grads.values()), \
        [n for n, p in grads.items() if p.grad is None or p.grad.abs().sum() == 0]
    with pytest.raises(ValidationError, match="projection_classes"):
        DCGANDiscriminator.Params(projection_classes=1)


@pytest.mark.parametrize("params", [{}, {"batch_norm": False, "spectral_norm": True, "dropout": 0.0},
                                    {"projection_classes": K}])
def test_forward_with_features_returns_forward_and_every_blocks_activation(params):
    disc = _disc(**params).eval()
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([1, 2, 3])
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.clone()))
             for m in disc.features if isinstance(m, torch.nn.LeakyReLU)]
    try:
        logits, maps = disc.forward_with_features(x, labels)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(maps) == len(seen) == layers.strided_depth(32) == 3
    assert all(torch.equal(a, b) for a, b in zip(maps, seen))
    assert [m.shape[-1] for m in maps] == [16, 8, 4]
    assert torch.allclose(logits, disc(x, labels), rtol=0, atol=1e-12)


def test_dcgan_layout_follows_the_report_sizes():
    gen28 = DCGANGenerator(DCGANGenerator.Params(), num_classes=K, capsule_dim=D, image_shape=(1, 28, 28))
    gen64 = DCGANGenerator(DCGANGenerator.Params(), num_classes=K, capsule_dim=D, image_shape=(3, 64, 64))
    assert (gen28.seed, gen28.start_channels) == (7, 128)
    assert (gen64.seed, gen64.start_channels) == (4, 512)


def test_shape_errors_are_clear():
    with pytest.raises(RecipeError, match="square"):
        DCGANGenerator(DCGANGenerator.Params(), num_classes=K, capsule_dim=D, image_shape=(3, 32, 48))
    with pytest.raises(RecipeError, match="depth"):
        CNNEncoder(CNNEncoder.Params(depth=6), image_shape=(1, 28, 28), num_classes=K)


# ----------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    ("family", "name"),
    [
        ("encoder", "cnn"),
        ("encoder", "resnet"),
        ("generator", "dcgan"),
        ("discriminator", "dcgan"),
        ("classification_loss", "margin"),
        ("classification_loss", "cross_entropy"),
        ("reconstruction_loss", "mse"),
        ("reconstruction_loss", "l1"),
        ("adversarial_loss", "minimax"),
        ("adversarial_loss", "nonsaturating"),
        ("adversarial_loss", "hinge"),
        ("gate", "always"),
        ("gate", "epochs"),
        ("gate", "accuracy_band"),
    ],
)
def test_params_reject_unknown_keys(registry, family, name):
    # The params model itself (unknown keys refused, round trips, descriptions) is checked for every
    # registered component by tests/test_testing_kit.py; here: the registry names the key.
    with pytest.raises(RegistryError, match="no_such_param"):
        registry.create(family, name, {"no_such_param": 1})


def test_margin_loss_built_from_recipe_style_dict(registry):
    loss = registry.create("classification_loss", "margin", {"lambda": 0.5, "m_plus": 0.9, "m_minus": 0.1})
    assert isinstance(loss, MarginLoss)
    # One family per recipe slot: a loss of one slot is not found in another.
    assert registry.list("reconstruction_loss") == ["l1", "mse"]
    assert "margin" not in registry.list("adversarial_loss")
