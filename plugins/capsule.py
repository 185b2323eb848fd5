"""Capsule Network encoder ``capsnet`` (Sabour, Frosst and Hinton 2017).

Architecture: ``conv1`` (ReLU) -> primary capsules (a strided convolution whose
channels are grouped into ``primary_types`` capsules of ``primary_dim``
dimensions at every grid position, squashed) -> one transformation matrix
``W_ij`` per (child ``i``, parent ``j``) -> dynamic routing by agreement -> ``K``
class capsules of ``class_dim`` dimensions. The length of class capsule ``k`` is
the score of class ``k``.

Also public: :func:`dynamic_routing`, usable on its own (``squash`` is in :mod:`capsgan_toolkit.layers`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from capsgan_plugins.capsule_cpu import conv_nhwc as _conv_nhwc
from capsgan_plugins.capsule_cpu import keep_freed_memory
from capsgan_toolkit import hookimpl
from capsgan_toolkit.errors import RecipeError
from capsgan_toolkit.interfaces import Encoder, EncoderParams
from capsgan_toolkit.layers import check_image_batch, check_image_shape, squash

__all__ = ["CapsNetEncoder", "dynamic_routing", "squash"]


def _coupling(logits: torch.Tensor, leaky: bool) -> torch.Tensor:
    """Softmax of ``logits (B, K, N)`` over the parents (dim 1).

    With ``leaky`` an extra parent with a constant zero logit joins the softmax
    and is dropped afterwards, so each child's coefficients sum to at most 1.
    The leak is folded into the normaliser instead of concatenated, which saves
    a copy of the logits per iteration.
    """
    if not leaky:
        return torch.softmax(logits, dim=1)
    top = logits.amax(dim=1, keepdim=True).clamp_min(0.0)
    e = torch.exp(logits - top)
    return e / (e.sum(dim=1, keepdim=True) + torch.exp(-top))


class _FrozenCouplingSum(torch.autograd.Function):
    """The last routing iteration's ``s_j = sum_i c_ij u_hat_ij`` with ``c`` held constant.

    Forward: one bmm on the routing's own ``(B*K, N, D)`` copy of ``u_hat``. Backward:
    ``d u_hat_ij = c_ij ds_j``, written straight into ``u_hat``'s memory layout, instead of
    a bmm with an inner dimension of 1 into the copy's layout followed by a copy back
    (together about 3% of the MNIST training step at batch 64 on a 2-core CPU).
    """

    @staticmethod
    def forward(ctx, u_hat, c, u_flat):
        ctx.save_for_backward(c)
        ctx.u_hat = (u_hat.shape, u_hat.dtype)
        return torch.bmm(c.view(-1, 1, c.shape[-1]), u_flat)

    @staticmethod
    def backward(ctx, grad_s):
        (c,) = ctx.saved_tensors
        (bsz, n, k, d), dtype = ctx.u_hat
        coupling = c.view(bsz * k, n).t().contiguous().unsqueeze(-1)  # (N, B*K, 1)
        grad = coupling * grad_s.view(1, bsz * k, d)  # (N, B*K, D), the matmul's layout (_Predictions)
        return grad.view(n, bsz, k, d).transpose(0, 1).to(dtype), None, None


class _Predictions(torch.autograd.Function):
    """``u_hat = bmm(u, W)`` over ``rows`` (children, or types with shared weights), laid out for routing.

    The batched matmul makes ``(N, B, K, D)`` memory; routing reads ``(B, K, N, D)``.
    On a CPU, forward computes a block of about 64 children at a time and moves it into
    place while it is still in cache: one pass instead of a 47 MB relayout copy (MNIST,
    batch 64). On a GPU (``blocked=False``) it is one bmm and one relayout copy: the 18
    blocks' 36 kernel launches cost more host time than the copy costs the card. Backward
    takes the gradient in the matmul's own layout, the one :class:`_FrozenCouplingSum` writes.
    """

    @staticmethod
    def forward(ctx, u, weight, bsz, k, d, blocked=True):
        rows, m, _ = u.shape
        per_row = m // bsz
        ctx.save_for_backward(u, weight)
        if not blocked:
            return torch.bmm(u, weight).view(rows * per_row, bsz, k, d).permute(1, 2, 0, 3).contiguous()
        out = u.new_empty(bsz, k, rows * per_row, d)
        block = max(1, 64 // per_row)
        for r0 in range(0, rows, block):
            part = torch.bmm(u[r0:r0 + block], weight[r0:r0 + block]).view(-1, bsz, k, d)
            out[:, :, r0 * per_row:r0 * per_row + part.shape[0]].copy_(part.permute(1, 2, 0, 3))
        return out

    @staticmethod
    def backward(ctx, grad):
        u, weight = ctx.saved_tensors
        rows, m, _ = u.shape
        grad = grad.permute(2, 0, 1, 3).reshape(rows, m, weight.shape[-1])  # free for the N-major gradient
        grad_u = torch.bmm(grad, weight.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(u.transpose(1, 2), grad) if ctx.needs_input_grad[1] else None
        return grad_u, grad_w, None, None, None, None


def dynamic_routing(
    u_hat: torch.Tensor,
    iterations: int,
    *,
    leaky: bool = False,
    return_coupling: bool = False,
    detach_inner: bool = True,
    bias: torch.Tensor | None = None,
):
    """Route child predictions to parent capsules by agreement (Procedure 1 of the paper).

    Args:
        u_hat: predictions ``(B, N, K, D)`` of each of the ``N`` children for each
            of the ``K`` parents.
        iterations: number of routing iterations ``r >= 1`` (the paper uses 3).
        leaky: add a "none of the above" parent whose logit is always zero to
            the softmax; it absorbs coupling mass and is dropped from the output.
        return_coupling: also return the coupling coefficients of the last
            iteration.
        detach_inner: the usual gradient convention (see below); ``False`` makes
            the whole procedure differentiable.
        bias: optional learned per-parent bias ``(K, D)`` added to every parent's
            weighted sum before the squash in every iteration,
            ``v_j = squash(sum_i c_ij u_hat_ij + bias_j)``, as in the authors'
            published code (``_update_routing`` in Sarasra/models,
            research/capsules, initialised there to the constant 0.1). ``None``
            (the default) routes without it, as the paper's Procedure 1 reads.

    Returns:
        ``v (B, K, D)``, and ``c (B, N, K)`` when ``return_coupling``. ``c`` sums
        to 1 over parents, or to less than 1 with ``leaky``.

    Algorithm: logits ``b (B, N, K)`` start at zero for every example (they are
    not parameters); each iteration sets ``c = softmax(b)`` over the parents,
    ``s_j = sum_i c_ij u_hat_ij``, ``v_j = squash(s_j)`` and, except after the
    last, ``b_ij += u_hat_ij . v_j`` (with ``bias``, ``s_j`` gains ``bias_j``
    before the squash in every iteration, so it shifts the agreement too).

    Gradients: with ``detach_inner`` (the default, a convention of public
    re-implementations; the authors' published code has no stop-gradient, see
    docs/capsules.md; with its ``bias`` and ``detach_inner=False`` this function
    computes what that code computes) every iteration but the last computes ``s``, ``v`` and the
    logit update from ``u_hat.detach()``. Hence ``b`` and ``c`` carry no gradient
    at all, and gradients reach ``u_hat`` only through the last iteration's
    ``s = sum_i c_ij u_hat_ij``, with ``c`` held as a constant. With
    ``iterations=1`` the detach changes nothing (``c`` is uniform). The bias is
    detached with ``u_hat`` in the inner iterations, so under ``detach_inner``
    its gradient, like ``u_hat``'s, comes through the last iteration only.

    Precision: half and bfloat16 inputs are cast to float32 and the routing runs
    with autocast disabled; float64 stays float64.
    """
    if u_hat.dim() != 4:
        raise ValueError(f"u_hat must be (B, N, K, D); got shape {tuple(u_hat.shape)}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1; got {iterations}")
    if bias is not None and tuple(bias.shape) != (u_hat.shape[2], u_hat.shape[3]):
        raise ValueError(
            f"bias must be (K, D) = {(u_hat.shape[2], u_hat.shape[3])} for u_hat of shape "
            f"{tuple(u_hat.shape)}; got {tuple(bias.shape)}"
        )
    dtype = torch.float64 if u_hat.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=u_hat.device.type, enabled=False):
        # Routing runs on the (B, K, N, D) layout: both the weighted sum and the
        # agreement are then plain bmm's over B*K contiguous (N, D) blocks. One
        # copy (fused with the cast) makes it, none when u_hat is already laid out
        # so; with detach_inner the copy is a constant and the gradient reaches
        # u_hat through _FrozenCouplingSum, in u_hat's own layout.
        u = (u_hat.detach() if detach_inner else u_hat).transpose(1, 2)
        if u.dtype != dtype or not u.is_contiguous():
            u = torch.empty_like(u, dtype=dtype, memory_format=torch.contiguous_format).copy_(u)
        bsz, k, n, d = u.shape
        u_flat = u.view(bsz * k, n, d)
        frozen = detach_inner and u_hat.requires_grad and torch.is_grad_enabled()
        logits = u.new_zeros(bsz, k, n)
        if bias is not None:
            bias = bias.to(dtype)
            inner_bias = bias.detach() if detach_inner else bias
        for step in range(iterations):
            c = _coupling(logits, leaky)
            last = step == iterations - 1
            if frozen and last:
                s = _FrozenCouplingSum.apply(u_hat, c, u_flat).view(bsz, k, d)
            else:
                s = torch.bmm(c.reshape(bsz * k, 1, n), u_flat).view(bsz, k, d)
            if bias is not None:
                s = s + (bias if last else inner_bias)
            v = squash(s)
            if step < iterations - 1:
                # v as a row times u^T: about 2.5x faster on CPU than u times v
                # as a column, which BLAS runs as many tiny matrix products.
                agree = torch.bmm(v.view(bsz * k, 1, d), u_flat.transpose(1, 2)).view(bsz, k, n)
                logits = logits + agree
    if return_coupling:
        return v, c.transpose(1, 2)
    return v


class CapsNetParams(EncoderParams):
    """Params of the ``capsnet`` encoder.

    Defaults follow the paper on MNIST. The CIFAR-10 recipe (``recipes/capsgan_cifar.toml``)
    sets ``primary_types=64`` (the source report's final model) and ``leaky_routing=true``
    (the paper's CIFAR-10 setting). ``recipes/quickstart.toml`` has a small-machine preset
    (64 conv1 channels, 5x5 kernels, 8 primary types: 1152 children for a 32x32 image).
    """

    latent: Literal["all", "true_class", "predicted_class"] = Field(
        "true_class",
        description="What the generator receives: all capsules, or only the true "
        "(training; predicted at test time) or predicted class's capsule, others zeroed.",
    )
    conv1_channels: int = Field(256, ge=1, description="Channels of the first (ReLU) convolution.")
    conv1_kernel: int = Field(9, ge=1, description="Kernel size of the first convolution.")
    conv1_padding: int = Field(0, ge=0, description="Zero padding of the first convolution.")
    primary_types: int = Field(
        32, ge=1, description="Primary capsule types (channels of capsules); 64 in the CIFAR-10 recipe."
    )
    primary_dim: int = Field(8, ge=1, description="Dimensions of a primary capsule.")
    primary_kernel: int = Field(9, ge=1, description="Kernel size of the primary capsule convolution.")
    primary_stride: int = Field(2, ge=1, description="Stride of the primary capsule convolution.")
    primary_padding: int = Field(0, ge=0, description="Zero padding of the primary capsule convolution.")
    class_dim: int = Field(16, ge=1, description="Dimensions D of a class capsule.")
    routing_iterations: int = Field(3, ge=1, description="Dynamic routing iterations.")
    leaky_routing: bool = Field(
        False, description="Add a 'none of the above' parent to the routing softmax (the paper's CIFAR-10 setting)."
    )
    routing_detach: bool = Field(
        True,
        description="Route with detached predictions in all but the last iteration "
        "(the usual practice); false backpropagates through every iteration.",
    )
    routing_bias: bool = Field(
        False,
        description="Add a learned per-parent bias (K x D) to each class capsule's weighted sum "
        "before the squash in every routing iteration, as the authors' published code does; "
        "false (default) follows the paper's Procedure 1.",
    )
    routing_bias_init: float = Field(
        0.1,
        description="Initial value of every entry of the routing bias (a constant; 0.1 in the "
        "authors' code). Used only with routing_bias = true.",
    )
    share_weights_across_positions: bool = Field(
        False,
        description="One transformation matrix per primary type and class instead of one per "
        "child and class: far fewer parameters, same compute.",
    )
    weight_init_std: float | None = Field(
        None,
        gt=0,
        description="Std of the transformation matrices at init; default K / sqrt(N * D), "
        "which keeps the initial class capsule sizes independent of the number of children N.",
    )


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class CapsNetEncoder(Encoder):
    """Capsule Network encoder with dynamic routing (Sabour et al. 2017)."""

    Params = CapsNetParams

    def __init__(self, params: CapsNetParams, *, image_shape: Sequence[int], num_classes: int):
        super().__init__(params, image_shape=image_shape, num_classes=num_classes)
        p = params
        channels, height, width = check_image_shape('Encoder "capsnet"', image_shape)
        h1, w1 = (_out_size(s, p.conv1_kernel, 1, p.conv1_padding) for s in (height, width))
        h2, w2 = (_out_size(s, p.primary_kernel, p.primary_stride, p.primary_padding) for s in (h1, w1))
        if min(h1, w1, h2, w2) < 1:
            raise RecipeError(
                f"capsnet: images of {height}x{width} are too small for conv1_kernel={p.conv1_kernel} "
                f"(padding {p.conv1_padding}) followed by primary_kernel={p.primary_kernel} "
                f"(stride {p.primary_stride}, padding {p.primary_padding}): the primary capsule "
                f"grid would be {h2}x{w2}.",
                hint="Use smaller kernels or add padding in the [encoder] table.",
            )
        self.capsule_dim = p.class_dim
        self.grid = (h2, w2)
        self.num_children = p.primary_types * h2 * w2
        self.conv1 = nn.Conv2d(channels, p.conv1_channels, p.conv1_kernel, padding=p.conv1_padding)
        self.primary = nn.Conv2d(
            p.conv1_channels,
            p.primary_types * p.primary_dim,
            p.primary_kernel,
            stride=p.primary_stride,
            padding=p.primary_padding,
        )
        for conv in (self.conv1, self.primary):
            # Stored channels-last, i.e. (out, ky, kx, c) in memory: the order in which the
            # CPU convolution (_GemmConv) reads the weight and writes its gradient.
            conv.weight = nn.Parameter(conv.weight.detach().contiguous(memory_format=torch.channels_last))
        # Children are ordered (type, row, column); rows of W follow that order so
        # that one bmm over children (or over types when shared) makes u_hat.
        rows = p.primary_types if p.share_weights_across_positions else self.num_children
        std = p.weight_init_std or num_classes / math.sqrt(self.num_children * p.class_dim)
        self.weight = nn.Parameter(torch.randn(rows, p.primary_dim, num_classes * p.class_dim) * std)
        # Only registered when used, so checkpoints of encoders without it keep their keys.
        self.routing_bias = (
            nn.Parameter(torch.full((num_classes, p.class_dim), float(p.routing_bias_init)))
            if p.routing_bias
            else None
        )

    def predictions(self, images: torch.Tensor) -> torch.Tensor:
        """Return the children's predictions ``u_hat (B, N, K, D)`` for ``images``.

        The tensor is a view whose memory is laid out as ``(B, K, N, D)``, the layout
        :func:`dynamic_routing` computes in (see :class:`_Predictions`).
        """
        p = self.params
        bsz = images.shape[0]
        h2, w2 = self.grid
        if images.device.type == "cpu":
            keep_freed_memory()  # the step's large temporaries stay allocated between steps
        # Feature maps stay channels-last (B, H, W, C) from the images on.
        x = _conv_nhwc(images.permute(0, 2, 3, 1), self.conv1, relu=True)
        x = _conv_nhwc(x, self.primary)
        # (B, H, W, T, P) -> (T, H, W, B, P): children outermost, capsule dims last.
        u = x.view(bsz, h2, w2, p.primary_types, p.primary_dim).permute(3, 1, 2, 0, 4)
        u = squash(u.reshape(p.primary_types, h2 * w2 * bsz, p.primary_dim))
        if not p.share_weights_across_positions:
            u = u.reshape(self.num_children, bsz, p.primary_dim)
        # Batched matmuls (rows, M, P) x (rows, P, K*D), rows = children or types, written
        # as (B, K, N, D) memory and handed over as a (B, N, K, D) view.
        u_hat = _Predictions.apply(u, self.weight.to(u.dtype), bsz, self.num_classes, p.class_dim,
                                   images.device.type == "cpu")
        return u_hat.transpose(1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class capsules ``(B, K, D)`` (float32 under autocast) and fill diagnostics."""
        check_image_batch("capsnet", images, self.image_shape)
        p = self.params
        v, c = dynamic_routing(self.predictions(images), p.routing_iterations, leaky=p.leaky_routing,
                               return_coupling=True, detach_inner=p.routing_detach, bias=self.routing_bias)
        self._diag_pending = (v.detach(), c.detach())  # read when asked for: no device read per forward
        return v

    @property
    def diagnostics(self) -> dict[str, float]:
        """``capsule_len`` and ``coupling_entropy`` of the last forward pass (see :meth:`_diagnose`).

        Computed when read, not in every forward: a GPU forward then never waits for the device.
        """
        values = self.device_diagnostics()
        if values and not isinstance(next(iter(values.values())), float):
            values = dict(zip(values, torch.stack(list(values.values())).tolist()))  # one device read
            self._diag_values = values
        return values

    def device_diagnostics(self) -> dict[str, torch.Tensor | float]:
        """:attr:`diagnostics` as 0-d tensors on the model's device (the trainer sums them there)."""
        pending = self.__dict__.get("_diag_pending")
        if pending is not None:
            self._diag_values, self._diag_pending = self._diagnose(*pending), None
        return dict(self.__dict__.get("_diag_values", {}))

    @diagnostics.setter
    def diagnostics(self, value: dict[str, float]) -> None:
        self._diag_values, self._diag_pending = dict(value), None

    @torch.no_grad()
    def _diagnose(self, v: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``capsule_len`` and ``coupling_entropy``.

        ``capsule_len``: mean over the batch of the longest class capsule's length.
        ``coupling_entropy``: mean over examples and children of the entropy of
        the final coupling coefficients over parents, divided by ``log K`` (1 =
        uniform, 0 = each child routes to one parent). With leaky routing the
        leak's mass ``1 - sum_j c_ij`` counts as one more parent and the
        normaliser is ``log(K + 1)``.
        """
        lengths = self.class_scores(v.detach())
        c = c.detach()
        ent = -(c * torch.log(c.clamp_min(1e-30))).sum(-1)
        parents = c.shape[-1]
        if self.params.leaky_routing:
            leak = (1.0 - c.sum(-1)).clamp_min(0.0)
            ent = ent - leak * torch.log(leak.clamp_min(1e-30))
            parents += 1
        norm = math.log(parents) if parents > 1 else 1.0
        return {"capsule_len": lengths.amax(dim=1).mean(), "coupling_entropy": ent.mean() / norm}


@hookimpl
def capsgan_register(registry):
    """Register the ``capsnet`` encoder."""
    registry.register("encoder", "capsnet", CapsNetEncoder)
