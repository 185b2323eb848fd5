"""Tests of the capsnet encoder's CPU paths: the GEMM convolution, its workspace, the routing's last sum.

Every fast path is checked in float64 against the library's own operations (``F.conv2d``,
plain autograd through ``bmm``), values and gradients.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from capsgan_plugins import capsule, capsule_cpu
from capsgan_plugins.capsule import CapsNetEncoder, CapsNetParams, dynamic_routing
from capsgan_plugins.capsule_cpu import conv_nhwc

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _conv(cin, cout, k, stride, padding=0, bias=True, channels_last=True):
    conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias).double()
    if channels_last:
        conv.weight = torch.nn.Parameter(conv.weight.detach().contiguous(memory_format=torch.channels_last))
    return conv


# Few output columns (the primary capsules' case: one add per window) and many (one add per kernel column).
GEOMETRIES = [dict(size=13, cin=3, cout=4, k=9, stride=2), dict(size=7, cin=2, cout=3, k=3, stride=1),
              dict(size=9, cin=2, cout=5, k=3, stride=2, padding=1)]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gemm_conv_matches_library_values_and_gradients(geometry, relu, channels_last):
    torch.manual_seed(0)
    g = dict(geometry)
    size, padding = g.pop("size"), g.pop("padding", 0)
    conv = _conv(g["cin"], g["cout"], g["k"], g["stride"], padding, channels_last=channels_last)
    x = torch.randn(2, size, size, g["cin"], dtype=torch.float64, requires_grad=True)
    y = conv_nhwc(x, conv, gemm=True, relu=relu)
    ref = F.conv2d(x.permute(0, 3, 1, 2), conv.weight, conv.bias, conv.stride, conv.padding)
    ref = (ref.relu() if relu else ref).permute(0, 2, 3, 1)
    assert torch.allclose(y, ref, atol=1e-12)
    weights = torch.randn_like(ref)
    grads = torch.autograd.grad((y * weights).sum(), (x, conv.weight, conv.bias))
    grads_ref = torch.autograd.grad((ref * weights).sum(), (x, conv.weight, conv.bias))
    for got, want in zip(grads, grads_ref):
        assert torch.allclose(got, want, atol=1e-10)
    assert grads[1].stride() == conv.weight.stride()  # the gradient comes in the weight's own layout

    class Plain:  # the convolution's attributes, with plain tensors as gradcheck hands them in
        stride, padding, dilation, groups = conv.stride, conv.padding, conv.dilation, conv.groups
        kernel_size, out_channels = conv.kernel_size, conv.out_channels

    def fn(inp, w, b):
        plain = Plain()
        plain.weight, plain.bias = w, b
        return conv_nhwc(inp, plain, gemm=True, relu=relu)

    w, b = (t.detach().clone().requires_grad_(True) for t in (conv.weight, conv.bias))
    inputs = (x.detach().clone().requires_grad_(True), w, b)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_no_input_gradient_for_images():
    conv = _conv(1, 3, 3, 1, bias=False)
    y = conv_nhwc(torch.randn(2, 6, 6, 1, dtype=torch.float64), conv, gemm=True)
    (gw,) = torch.autograd.grad(y.sum(), (conv.weight,))
    assert gw.shape == conv.weight.shape


def test_workspace_is_reused_only_when_free():
    torch.manual_seed(1)
    conv = _conv(2, 3, 3, 2)
    x1, x2 = (torch.randn(2, 9, 9, 2, dtype=torch.float64) for _ in range(2))

    def weight_grad(x):
        return torch.autograd.grad(conv_nhwc(x, conv, gemm=True).sum(), conv.weight)[0]

    g1, g2 = weight_grad(x1), weight_grad(x2)
    # Two forwards before either backward: the second must not overwrite the first's patches.
    y1, y2 = conv_nhwc(x1, conv, gemm=True), conv_nhwc(x2, conv, gemm=True)
    assert torch.allclose(torch.autograd.grad(y1.sum(), conv.weight)[0], g1)
    assert torch.allclose(torch.autograd.grad(y2.sum(), conv.weight)[0], g2)
    # A graph kept for a second backward keeps its patches too.
    y1 = conv_nhwc(x1, conv, gemm=True)
    torch.autograd.grad(y1.sum(), conv.weight, retain_graph=True)
    conv_nhwc(x2, conv, gemm=True).sum().backward()
    assert torch.allclose(torch.autograd.grad(y1.sum(), conv.weight)[0], g1)
    # Without autograd the same memory serves every call.
    with torch.no_grad():
        conv_nhwc(x1, conv, gemm=True)
        first = capsule_cpu._WORKSPACES[conv][0].data_ptr()
        conv_nhwc(x2, conv, gemm=True)
        assert capsule_cpu._WORKSPACES[conv][0].data_ptr() == first


def test_keep_freed_memory_states(monkeypatch):
    monkeypatch.setattr(capsule_cpu, "_malloc_state", [])
    monkeypatch.setenv("CAPSGAN_MALLOC_TUNING", "0")
    assert capsule_cpu.keep_freed_memory() == "off"
    assert capsule_cpu.keep_freed_memory() == "off"  # decided once per process
    monkeypatch.setattr(capsule_cpu, "_malloc_state", [])
    monkeypatch.delenv("CAPSGAN_MALLOC_TUNING")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1073741824")
    assert capsule_cpu.keep_freed_memory() == "environment"
    monkeypatch.setattr(capsule_cpu, "_malloc_state", [])
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert capsule_cpu.keep_freed_memory() in ("set", "unavailable")


@pytest.mark.parametrize("leaky", [False, True])
def test_routing_on_the_encoders_layout_matches_a_contiguous_input(leaky):
    torch.manual_seed(2)
    memory = torch.randn(7, 3, 4, 5, dtype=torch.float64)  # (N, B, K, D), as the encoder makes it
    u_enc = memory.clone().requires_grad_(True)
    u_std = memory.transpose(0, 1).contiguous().requires_grad_(True)
    weights = torch.randn(3, 4, 5, dtype=torch.float64)
    v_enc = dynamic_routing(u_enc.transpose(0, 1), 3, leaky=leaky)
    v_std = dynamic_routing(u_std, 3, leaky=leaky)
    assert torch.allclose(v_enc, v_std, atol=1e-12)
    (g_enc,) = torch.autograd.grad((v_enc * weights).sum(), u_enc)
    (g_std,) = torch.autograd.grad((v_std * weights).sum(), u_std)
    assert torch.allclose(g_enc.transpose(0, 1), g_std, atol=1e-12)
    # The frozen-coupling gradient, checked numerically, and once more through a double backward.
    u = memory.transpose(0, 1).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: dynamic_routing(t, 1, leaky=leaky), (u,))
    (g,) = torch.autograd.grad((dynamic_routing(u, 3, leaky=leaky) * weights).sum(), u, create_graph=True)
    assert g.requires_grad and torch.allclose(g, g_std, atol=1e-12)


def test_mnist_shaped_encoder_gradients_match_library_path(monkeypatch):
    # Few primary columns (4 <= kernel 9), as at MNIST size: the window-by-window backward.
    torch.manual_seed(3)
    params = CapsNetParams(conv1_channels=6, conv1_kernel=5, primary_types=2, primary_dim=4, class_dim=4)
    enc = CapsNetEncoder(params, image_shape=(1, 20, 20), num_classes=3).double()
    images = torch.rand(2, 1, 20, 20, dtype=torch.float64) * 2 - 1
    weights = torch.randn(2, 3, 4, dtype=torch.float64)
    grads = torch.autograd.grad((enc(images) * weights).sum(), list(enc.parameters()))
    monkeypatch.setattr(capsule, "_conv_nhwc", functools.partial(conv_nhwc, gemm=False))
    grads_ref = torch.autograd.grad((enc(images) * weights).sum(), list(enc.parameters()))
    for got, want in zip(grads, grads_ref):
        assert torch.allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("cin,k,expected", [
    (256, 9, "_GemmConv"),   # the paper's and the report's primary capsules
    (3, 9, "_GemmConv"),     # the CIFAR-10 conv1
    (1, 9, "_GemmConv"),     # MNIST's conv1 (in the whole training step the GEMM measured faster)
    (64, 5, "Convolution"),  # the quickstart's primary capsules: a 5x5 kernel
    (3, 5, "Convolution"),   # the quickstart's conv1
])
def test_default_path_follows_kernel_size(cin, k, expected):
    conv = _conv(cin, 4, k, stride=2)
    x = torch.randn(1, k + 2, k + 2, cin, dtype=torch.float64, requires_grad=True)
    y = conv_nhwc(x, conv)
    names, fn = [], y.grad_fn
    while fn is not None and len(names) < 4:  # the view / permute on top, then the convolution
        names.append(type(fn).__name__)
        fn = fn.next_functions[0][0] if fn.next_functions else None
    assert any(n.startswith(expected) for n in names), names
    assert torch.allclose(y, conv_nhwc(x, conv, gemm=expected == "_GemmConv"), atol=0)
    assert torch.allclose(y, F.conv2d(x.permute(0, 3, 1, 2), conv.weight, conv.bias, 2).permute(0, 2, 3, 1), atol=1e-10)
