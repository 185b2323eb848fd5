"""Tests of the capsnet encoder, dynamic routing and squash.

The routing and the children's predictions are checked against plain float64
re-implementations written from the paper's equations (loops over examples,
children and parents), not against the module itself.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from capsgan_plugins import capsule
from capsgan_plugins.capsule import CapsNetEncoder, CapsNetParams, _conv_nhwc, dynamic_routing, squash
from capsgan_toolkit.errors import RecipeError, RegistryError
from capsgan_toolkit.plugin.manager import load_plugins

EPS = 1e-8

# A tiny encoder: 12x12 images -> conv1 3x3 -> 10x10 -> primary 3x3 stride 2 -> 4x4 grid.
TINY = dict(conv1_channels=4, conv1_kernel=3, primary_types=2, primary_dim=4, primary_kernel=3, class_dim=4)
TINY_SHAPE = (1, 12, 12)


# ----------------------------------------------------------------------------- references


def _ref_squash(s: np.ndarray) -> np.ndarray:
    sq = float(np.dot(s, s))
    return sq / (1.0 + sq) * s / math.sqrt(sq + EPS)


def _ref_routing(u_hat: np.ndarray, iterations: int, leaky: bool, bias: np.ndarray | None = None):
    """Procedure 1 of Sabour et al. (2017), one example, child and parent at a time.

    With ``bias`` (K, D), parent j's weighted sum gains ``bias[j]`` before the squash in
    every iteration, as in the authors' code (``_update_routing``).
    """
    batch, n_child, n_parent, _ = u_hat.shape
    v_out = np.zeros((batch, n_parent, u_hat.shape[3]))
    c_out = np.zeros((batch, n_child, n_parent))
    for b in range(batch):
        logits = np.zeros((n_child, n_parent))
        for r in range(iterations):
            c = np.zeros((n_child, n_parent))
            for i in range(n_child):
                # The leak is one more parent whose logit stays 0, so exp(0) = 1.
                denom = sum(math.exp(logits[i, j]) for j in range(n_parent)) + (1.0 if leaky else 0.0)
                for j in range(n_parent):
                    c[i, j] = math.exp(logits[i, j]) / denom
            v = np.zeros((n_parent, u_hat.shape[3]))
            for j in range(n_parent):
                s_j = sum(c[i, j] * u_hat[b, i, j] for i in range(n_child))
                if bias is not None:
                    s_j = s_j + bias[j]
                v[j] = _ref_squash(s_j)
            if r < iterations - 1:
                for i in range(n_child):
                    for j in range(n_parent):
                        logits[i, j] += float(np.dot(u_hat[b, i, j], v[j]))
        v_out[b], c_out[b] = v, c
    return v_out, c_out


def _ref_predictions(enc: CapsNetEncoder, images: torch.Tensor) -> np.ndarray:
    """u_hat[b, i, j] = W_ij u_i with children numbered (type, row, column)."""
    p = enc.params
    with torch.no_grad():
        grid = enc.primary(torch.relu(enc.conv1(images))).numpy()
    weight = enc.weight.detach().numpy()
    h2, w2 = enc.grid
    k, d = enc.num_classes, p.class_dim
    out = np.zeros((images.shape[0], enc.num_children, k, d))
    for b in range(images.shape[0]):
        for t in range(p.primary_types):
            for y in range(h2):
                for x in range(w2):
                    i = (t * h2 + y) * w2 + x
                    u_i = _ref_squash(grid[b, t * p.primary_dim : (t + 1) * p.primary_dim, y, x])
                    w_i = weight[t if p.share_weights_across_positions else i]
                    for j in range(k):
                        out[b, i, j] = w_i[:, j * d : (j + 1) * d].T @ u_i
    return out


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _tiny(**overrides) -> CapsNetEncoder:
    return CapsNetEncoder(CapsNetParams(**{**TINY, **overrides}), image_shape=TINY_SHAPE, num_classes=3)


# -------------------------------------------------------------------------------- routing


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 7, 10, 16), (1, 1, 2, 8)])
@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("leaky", [False, True])
def test_routing_matches_plain_reference(shape, iterations, leaky):
    torch.manual_seed(hash((shape, iterations, leaky)) % 2**31)
    u_hat = torch.randn(*shape, dtype=torch.float64) * 0.5
    v, c = dynamic_routing(u_hat, iterations, leaky=leaky, return_coupling=True)
    v_ref, c_ref = _ref_routing(u_hat.numpy(), iterations, leaky)
    assert v.shape == shape[:1] + shape[2:] and c.shape == shape[:3]
    np.testing.assert_allclose(v.numpy(), v_ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(c.numpy(), c_ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 7, 10, 16)])
@pytest.mark.parametrize("iterations", [1, 3])
@pytest.mark.parametrize("leaky", [False, True])
@pytest.mark.parametrize("detach_inner", [False, True])
def test_routing_with_bias_matches_plain_reference(shape, iterations, leaky, detach_inner):
    torch.manual_seed(hash((shape, iterations, leaky, detach_inner, "bias")) % 2**31)
    u_hat = torch.randn(*shape, dtype=torch.float64) * 0.5
    bias = torch.randn(shape[2], shape[3], dtype=torch.float64) * 0.3
    v, c = dynamic_routing(u_hat, iterations, leaky=leaky, return_coupling=True, detach_inner=detach_inner, bias=bias)
    v_ref, c_ref = _ref_routing(u_hat.numpy(), iterations, leaky, bias.numpy())
    np.testing.assert_allclose(v.numpy(), v_ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(c.numpy(), c_ref, rtol=0, atol=1e-6)
    # The bias matters: without it the output differs.
    assert not np.allclose(dynamic_routing(u_hat, iterations, leaky=leaky).numpy(), v_ref, atol=1e-3)


def test_routing_bias_zero_is_no_bias_and_bad_shape_is_refused():
    torch.manual_seed(20)
    u_hat = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    zero = torch.zeros(3, 4, dtype=torch.float64)
    assert torch.equal(dynamic_routing(u_hat, 3, bias=zero), dynamic_routing(u_hat, 3))
    with pytest.raises(ValueError, match="bias must be"):
        dynamic_routing(u_hat, 3, bias=torch.zeros(4, 3))


def test_routing_agreement_moves_coupling():
    # Children that all predict parent 0 strongly must couple more to it after routing.
    u_hat = torch.zeros(1, 4, 3, 2, dtype=torch.float64)
    u_hat[:, :, 0, 0] = 2.0
    u_hat[:, :, 1:, :] = torch.randn(1, 4, 2, 2, dtype=torch.float64) * 0.1
    _, c1 = dynamic_routing(u_hat, 1, return_coupling=True)
    _, c3 = dynamic_routing(u_hat, 3, return_coupling=True)
    assert torch.allclose(c1, torch.full_like(c1, 1 / 3))
    assert bool((c3[..., 0] > 0.5).all())


def test_leaky_routing_changes_output_and_leaks_mass():
    torch.manual_seed(1)
    u_hat = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    v, c = dynamic_routing(u_hat, 3, return_coupling=True)
    v_leak, c_leak = dynamic_routing(u_hat, 3, leaky=True, return_coupling=True)
    assert torch.allclose(c.sum(-1), torch.ones(2, 6, dtype=torch.float64))
    assert bool((c_leak.sum(-1) < 1).all()) and bool((c_leak >= 0).all())
    assert not torch.allclose(v, v_leak)


def test_routing_rejects_bad_input():
    with pytest.raises(ValueError, match="iterations"):
        dynamic_routing(torch.zeros(1, 2, 3, 4), 0)
    with pytest.raises(ValueError, match="B, N, K, D"):
        dynamic_routing(torch.zeros(2, 3, 4), 1)


# --------------------------------------------------------------------------------- squash


def test_squash_values_zero_and_gradients():
    s = torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0], [1e-3, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    out = squash(s)
    root = math.sqrt(25 + EPS)
    tiny = 1e-6 / (1 + 1e-6) * 1e-3 / math.sqrt(1e-6 + EPS)
    expected = torch.tensor([[0, 0, 0], [25 / 26 * 3 / root, 25 / 26 * 4 / root, 0], [tiny, 0, 0]], dtype=torch.float64)
    assert torch.allclose(out, expected, rtol=1e-12, atol=0)
    out.sum().backward()
    assert torch.isfinite(s.grad).all()
    assert torch.equal(s.grad[0], torch.zeros(3, dtype=torch.float64))
    assert torch.autograd.gradcheck(squash, (torch.randn(4, 5, dtype=torch.float64, requires_grad=True),))


def test_squash_lengths_below_one_float32_zero():
    torch.manual_seed(2)
    s = torch.randn(64, 8) * torch.logspace(-4, 3, 64).unsqueeze(1)
    s[0] = 0
    s.requires_grad_(True)
    out = squash(s)
    lengths = out.norm(dim=-1)
    assert bool((lengths < 1).all()) and bool(torch.isfinite(out).all())
    lengths.sum().backward()
    assert bool(torch.isfinite(s.grad).all())


# ------------------------------------------------------------------------------ gradients


def test_gradcheck_routing_full_and_one_iteration():
    torch.manual_seed(3)
    u_hat = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    # With one iteration the coupling is uniform and the detach is a no-op.
    assert torch.autograd.gradcheck(lambda u: dynamic_routing(u, 1, leaky=True), (u_hat,))
    # Without the detach the whole three-iteration procedure is differentiated.
    assert torch.autograd.gradcheck(lambda u: dynamic_routing(u, 3, detach_inner=False), (u_hat,))


@pytest.mark.parametrize("leaky", [False, True])
def test_detached_routing_gradient_is_frozen_coupling_gradient(leaky):
    # With the inner detach, the gradient is that of v = squash(sum_i c_ij u_hat_ij)
    # with c a constant: check that, and that it differs from the full gradient.
    torch.manual_seed(4)
    u_hat = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, 4, dtype=torch.float64)
    v, c = dynamic_routing(u_hat, 3, leaky=leaky, return_coupling=True)
    assert not c.requires_grad
    (grad,) = torch.autograd.grad((v * weights).sum(), u_hat)

    c_fixed = c.detach().clone()

    def frozen(u):
        return squash(torch.einsum("bnk,bnkd->bkd", c_fixed, u))

    assert torch.autograd.gradcheck(frozen, (u_hat,))
    (grad_frozen,) = torch.autograd.grad((frozen(u_hat) * weights).sum(), u_hat)
    assert torch.allclose(grad, grad_frozen, rtol=1e-10, atol=1e-12)
    v_full = dynamic_routing(u_hat, 3, leaky=leaky, detach_inner=False)
    (grad_full,) = torch.autograd.grad((v_full * weights).sum(), u_hat)
    assert torch.allclose(v_full, v)
    assert not torch.allclose(grad_full, grad, atol=1e-6)


def test_gradients_reach_the_routing_bias():
    torch.manual_seed(21)
    u_hat = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    bias = (torch.randn(3, 4, dtype=torch.float64) * 0.2).requires_grad_(True)
    # Fully differentiable routing: the gradient through every iteration, bias included.
    assert torch.autograd.gradcheck(
        lambda u, b: dynamic_routing(u, 3, leaky=True, detach_inner=False, bias=b), (u_hat, bias)
    )
    # With the inner detach the bias, like u_hat, gets the gradient of the last iteration
    # with the coupling held constant: v = squash(sum_i c_ij u_hat_ij + bias_j).
    weights = torch.randn(2, 3, 4, dtype=torch.float64)
    v, c = dynamic_routing(u_hat, 3, return_coupling=True, bias=bias)
    grad_u, grad_b = torch.autograd.grad((v * weights).sum(), (u_hat, bias))
    c_fixed = c.detach().clone()

    def frozen(u, b):
        return squash(torch.einsum("bnk,bnkd->bkd", c_fixed, u) + b)

    assert torch.autograd.gradcheck(frozen, (u_hat, bias))
    want_u, want_b = torch.autograd.grad((frozen(u_hat, bias) * weights).sum(), (u_hat, bias))
    assert torch.allclose(grad_u, want_u, rtol=1e-10, atol=1e-12)
    assert torch.allclose(grad_b, want_b, rtol=1e-10, atol=1e-12)
    assert float(grad_b.abs().max()) > 0


def test_encoder_routing_bias_param_and_gradient():
    torch.manual_seed(22)
    images = torch.rand(3, *TINY_SHAPE) * 2 - 1
    plain = _tiny()
    assert plain.routing_bias is None and "routing_bias" not in plain.state_dict()  # old checkpoints load
    enc = _tiny(routing_bias=True, routing_bias_init=0.05)
    assert enc.routing_bias.shape == (3, 4) and torch.equal(enc.routing_bias, torch.full((3, 4), 0.05))
    assert any(p is enc.routing_bias for p in enc.parameters())  # the optimizer sees it
    enc.load_state_dict({**plain.state_dict(), "routing_bias": enc.routing_bias.detach()})
    v = enc(images)
    expected = dynamic_routing(enc.predictions(images), 3, bias=enc.routing_bias)
    assert torch.allclose(v, expected, atol=1e-6) and not torch.allclose(v, plain(images), atol=1e-4)
    CapsNetEncoder.class_scores(v).sum().backward()
    assert enc.routing_bias.grad is not None and float(enc.routing_bias.grad.abs().max()) > 0
    assert _tiny(routing_bias=False, routing_bias_init=0.3).routing_bias is None


def test_routing_bias_recipe_params_round_trip(registry, tiny_recipe):
    import tomllib

    from capsgan_toolkit.recipe.schema import resolve
    from capsgan_toolkit.recipe.toml_io import dumps_toml

    params = CapsNetParams(**TINY, routing_bias=True, routing_bias_init=0.25)
    assert CapsNetParams(**params.model_dump()) == params
    assert CapsNetParams().routing_bias is False and CapsNetParams().routing_bias_init == 0.1
    tiny_recipe["encoder"] = {"plugin": "capsnet", **TINY, "routing_bias": True, "routing_bias_init": 0.25}
    data = resolve(tiny_recipe, registry).to_dict()
    assert data["encoder"]["routing_bias"] is True and data["encoder"]["routing_bias_init"] == 0.25
    assert resolve(tomllib.loads(dumps_toml(data)), registry).to_dict() == data
    # Left out, the defaults are written back: no bias.
    del tiny_recipe["encoder"]["routing_bias"], tiny_recipe["encoder"]["routing_bias_init"]
    assert resolve(tiny_recipe, registry).to_dict()["encoder"]["routing_bias"] is False


@pytest.mark.parametrize(
    "overrides",
    [
        dict(routing_iterations=2, routing_detach=False),
        dict(routing_iterations=1, leaky_routing=True),
        dict(routing_iterations=2, routing_detach=False, routing_bias=True),
    ],
)
def test_gradcheck_tiny_encoder(overrides):
    torch.manual_seed(5)
    enc = _tiny(**overrides).double()
    images = torch.rand(2, *TINY_SHAPE, dtype=torch.float64) * 2 - 1
    names = [name for name, _ in enc.named_parameters()]

    def fn(x, *ps):
        return torch.func.functional_call(enc, dict(zip(names, ps)), (x,))

    inputs = (images.requires_grad_(True), *[p.detach().clone().requires_grad_(True) for p in enc.parameters()])
    # fast_mode checks random projections of the Jacobian (2000+ inputs here).
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=True)
    # The full Jacobian with respect to the images alone stays cheap.
    assert torch.autograd.gradcheck(lambda x: enc(x), (images,), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- encoder


@pytest.mark.parametrize("shared", [False, True])
def test_predictions_match_plain_reference(shared):
    torch.manual_seed(6)
    enc = _tiny(share_weights_across_positions=shared).double()
    images = torch.rand(2, *TINY_SHAPE, dtype=torch.float64) * 2 - 1
    u_hat = enc.predictions(images)
    assert u_hat.shape == (2, enc.num_children, 3, 4)
    np.testing.assert_allclose(u_hat.detach().numpy(), _ref_predictions(enc, images), rtol=0, atol=1e-10)
    rows = 2 if shared else enc.num_children
    assert enc.weight.shape == (rows, 4, 3 * 4)


@pytest.mark.parametrize("blocked", [True, False])
@pytest.mark.parametrize("per_row", [1, 3])
def test_both_prediction_layouts_match_einsum(blocked, per_row):
    # The CPU path (blocks of children) and the GPU path (one bmm), each against a plain einsum
    # in float64: rows of weights (children, or types shared by per_row positions), batch 2.
    torch.manual_seed(17)
    rows, bsz, p_dim, k, d = 70, 2, 3, 4, 5  # 70 rows: more than one 64-child block
    u = torch.randn(rows, per_row * bsz, p_dim, dtype=torch.float64, requires_grad=True)
    w = torch.randn(rows, p_dim, k * d, dtype=torch.float64, requires_grad=True)
    out = capsule._Predictions.apply(u, w, bsz, k, d, blocked)
    ref = torch.einsum("rmp,rpq->rmq", u, w).view(rows * per_row, bsz, k, d).permute(1, 2, 0, 3)
    assert out.shape == (bsz, k, rows * per_row, d) and out.is_contiguous()
    np.testing.assert_allclose(out.detach().numpy(), ref.detach().numpy(), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: capsule._Predictions.apply(a, b, bsz, k, d, blocked), (u, w))


@pytest.mark.parametrize(
    "overrides",
    [dict(conv1_padding=2), dict(primary_padding=1, primary_stride=3), dict(conv1_kernel=1, primary_stride=1)],
)
def test_predictions_with_padding_and_strides(overrides):
    torch.manual_seed(14)
    enc = _tiny(**overrides).double()
    images = torch.rand(2, *TINY_SHAPE, dtype=torch.float64) * 2 - 1
    np.testing.assert_allclose(enc.predictions(images).detach().numpy(), _ref_predictions(enc, images), atol=1e-10)


@pytest.mark.parametrize("gemm", [False, True])
def test_both_convolution_paths_match_library_conv(gemm):
    # The CPU im2col path and the library path (used on CUDA) compute the same thing.
    torch.manual_seed(15)
    conv = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    y = _conv_nhwc(x.permute(0, 2, 3, 1), conv, gemm=gemm).permute(0, 3, 1, 2)
    assert torch.allclose(y, conv(x), atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: _conv_nhwc(t.permute(0, 2, 3, 1), conv, gemm=gemm), (x,))


def test_encoder_same_with_library_convolution(monkeypatch):
    # The encoder's CUDA path (library convolutions on strided views) on CPU.
    torch.manual_seed(16)
    enc = _tiny(conv1_padding=1).double()
    images = torch.rand(2, *TINY_SHAPE, dtype=torch.float64) * 2 - 1
    expected = enc(images)
    monkeypatch.setattr(capsule, "_conv_nhwc", functools.partial(_conv_nhwc, gemm=False))
    assert torch.allclose(enc(images), expected, atol=1e-12)


def test_shared_weights_equal_per_child_weights_repeated():
    torch.manual_seed(7)
    shared = _tiny(share_weights_across_positions=True)
    per_child = _tiny()
    per_child.load_state_dict(
        {**shared.state_dict(), "weight": shared.weight.detach().repeat_interleave(16, dim=0)}
    )
    images = torch.rand(3, *TINY_SHAPE) * 2 - 1
    assert torch.allclose(shared(images), per_child(images), atol=1e-6)


@pytest.mark.parametrize(
    "image_shape,types,children",
    [((1, 28, 28), 32, 32 * 6 * 6), ((1, 28, 28), 64, 64 * 6 * 6), ((3, 32, 32), 32, 32 * 8 * 8), ((3, 32, 32), 64, 4096)],
)
def test_output_shapes_mnist_cifar(image_shape, types, children):
    torch.manual_seed(8)
    enc = CapsNetEncoder(CapsNetParams(conv1_channels=4, primary_types=types), image_shape=image_shape, num_classes=10)
    assert enc.num_children == children and enc.capsule_dim == 16
    assert enc.weight.shape == (children, 8, 160)
    v = enc(torch.rand(2, *image_shape) * 2 - 1)
    assert v.shape == (2, 10, 16) and v.dtype == torch.float32
    assert bool((CapsNetEncoder.class_scores(v) < 1).all())


def test_bf16_autocast_close_to_float32():
    torch.manual_seed(9)
    enc = CapsNetEncoder(
        CapsNetParams(conv1_channels=16, conv1_kernel=5, primary_types=4, primary_kernel=5, weight_init_std=0.5),
        image_shape=(3, 32, 32),
        num_classes=10,
    )
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    v32 = enc(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v16 = enc(images)
    assert v16.dtype == torch.float32 and bool(torch.isfinite(v16).all())
    scale = v32.detach().abs().max()
    assert float((v16 - v32).detach().abs().max()) < 0.05 * float(scale)


def test_routing_under_autocast_runs_in_float32():
    torch.manual_seed(10)
    u_hat = torch.randn(2, 50, 5, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = dynamic_routing(u_hat, 3)
    assert v.dtype == torch.float32
    assert torch.equal(v, dynamic_routing(u_hat.float(), 3))


def test_latent_masking_modes():
    torch.manual_seed(11)
    images = torch.rand(4, *TINY_SHAPE) * 2 - 1
    labels = torch.tensor([0, 1, 2, 1])
    enc = _tiny()
    assert enc.params.latent == "true_class"
    v = enc(images)
    pred = v.norm(dim=-1).argmax(1)
    for mode, index in (("true_class", labels), ("predicted_class", pred)):
        enc = _tiny(latent=mode)
        latent = enc.to_latent(v, labels if mode == "true_class" else None)
        for b in range(4):
            for k in range(3):
                want = v[b, k] if k == index[b] else torch.zeros(4)
                assert torch.equal(latent[b, k], want)
    assert torch.equal(_tiny(latent="all").to_latent(v, labels), v)
    # true_class without labels (test time) falls back to the prediction.
    assert torch.equal(_tiny().to_latent(v), _tiny(latent="predicted_class").to_latent(v))


def test_diagnostics():
    torch.manual_seed(12)
    images = torch.rand(3, *TINY_SHAPE) * 2 - 1
    for leaky in (False, True):
        enc = _tiny(leaky_routing=leaky, weight_init_std=1.0)
        v = enc(images)
        diag = enc.diagnostics
        assert set(diag) == {"capsule_len", "coupling_entropy"}
        assert all(isinstance(x, float) and math.isfinite(x) for x in diag.values())
        assert diag["capsule_len"] == pytest.approx(float(v.detach().norm(dim=-1).max(1).values.mean()), rel=1e-5)
        assert 0 < diag["coupling_entropy"] < 1
        enc(images)  # the device form of the same numbers: 0-d tensors, read by the trainer in bulk
        tensors = enc.device_diagnostics()
        assert all(isinstance(t, torch.Tensor) and t.dim() == 0 for t in tensors.values())
        assert {k: float(t) for k, t in tensors.items()} == enc.diagnostics == diag
    # One iteration without the leak couples uniformly: normalised entropy exactly 1.
    enc = _tiny(routing_iterations=1)
    enc(images)
    assert enc.diagnostics["coupling_entropy"] == pytest.approx(1.0, abs=1e-6)


def test_bad_sizes_are_clear_errors():
    with pytest.raises(RecipeError, match="too small"):
        CapsNetEncoder(CapsNetParams(), image_shape=(1, 12, 12), num_classes=10)
    enc = _tiny()
    with pytest.raises(RecipeError, match="built for images"):
        enc(torch.zeros(2, 3, 12, 12))


def test_registered_through_plugin_hook():
    registry = load_plugins(["capsgan_plugins.capsule"], entry_points=False).registry
    enc = registry.create("encoder", "capsnet", TINY, image_shape=TINY_SHAPE, num_classes=3)
    assert isinstance(enc, CapsNetEncoder) and enc.capsule_dim == 4
    with pytest.raises(RegistryError, match="primary_typs"):
        registry.create("encoder", "capsnet", {"primary_typs": 3}, image_shape=TINY_SHAPE, num_classes=3)


def _check_compiled_routing(backend: str) -> None:
    torch.manual_seed(13)
    u_hat = torch.randn(2, 12, 4, 8, requires_grad=True)
    compiled = torch.compile(dynamic_routing, fullgraph=True, backend=backend)
    v_c, c_c = compiled(u_hat, 3, leaky=True, return_coupling=True)
    v_e, c_e = dynamic_routing(u_hat, 3, leaky=True, return_coupling=True)
    assert torch.allclose(v_c, v_e, atol=1e-6) and torch.allclose(c_c, c_e, atol=1e-6)
    (g_c,) = torch.autograd.grad(v_c.sum(), u_hat)
    (g_e,) = torch.autograd.grad(v_e.sum(), u_hat)
    assert torch.allclose(g_c, g_e, atol=1e-6)
    # With the learned per-parent bias, still one graph, and the bias gets the same gradient.
    bias = torch.full((4, 8), 0.1, requires_grad=True)
    v_c = compiled(u_hat, 3, bias=bias)
    v_e = dynamic_routing(u_hat, 3, bias=bias)
    assert torch.allclose(v_c, v_e, atol=1e-6)
    g_c = torch.autograd.grad(v_c.sum(), (u_hat, bias))
    g_e = torch.autograd.grad(v_e.sum(), (u_hat, bias))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_c, g_e))


def test_routing_traces_as_one_graph():
    # fullgraph=True fails on any graph break (data-dependent Python control flow).
    torch._dynamo.reset()
    _check_compiled_routing("aot_eager")


@pytest.mark.slow  # a cold inductor compile takes 20-45 s on a 2-core machine
def test_compiled_routing_matches_eager():
    torch._dynamo.reset()
    _check_compiled_routing("inductor")


def test_single_image_batch_matches_the_same_image_in_a_batch():
    torch.manual_seed(3)
    enc = CapsNetEncoder(
        CapsNetEncoder.Params(conv1_channels=8, conv1_kernel=5, primary_types=2, primary_kernel=5),
        image_shape=(1, 16, 16), num_classes=3,
    ).eval()
    x = torch.randn(2, 1, 16, 16)
    assert torch.allclose(enc(x[:1]), enc(x)[:1], atol=1e-6)
