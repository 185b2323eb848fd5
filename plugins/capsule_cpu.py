"""CPU speed for the ``capsnet`` encoder: its convolutions as GEMMs, and the allocator setting it needs.

:func:`conv_nhwc` runs a convolution on channels-last maps; on CPU, for large kernels, it is
:class:`_GemmConv`, an im2col convolution with a hand-written backward, the path that makes the paper's
MNIST CapsNet training step run near this machine's matmul rate (docs/performance.md has
the measurements). :func:`keep_freed_memory` stops glibc from handing the step's large
temporaries back to the system after each step (the encoder calls it once, on CPU).
"""

from __future__ import annotations

import ctypes
import os
import platform
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["conv_nhwc", "keep_freed_memory", "GEMM_MIN_KERNEL"]

GEMM_MIN_KERNEL = 7
"""Smallest kernel side :func:`conv_nhwc` runs as a patch-matrix GEMM on a CPU (below: oneDNN)."""

_MALLOC_SETTINGS = ((-3, 1 << 30), (-1, (1 << 31) - 1), (-2, 64 << 20))
"""glibc ``mallopt`` settings: M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2 GiB, M_TOP_PAD 64 MiB."""
_malloc_state: list[str] = []


def keep_freed_memory() -> str:
    """Let glibc keep freed memory for reuse instead of returning it to the system (once per process).

    By default glibc serves every block above 32 MB with its own ``mmap`` and unmaps it when
    freed, so each training step pays page faults again for its large temporaries (the
    capsnet's children predictions are 47 MB at batch 64, several of them per step):
    measured on a 2-core machine, a fresh 191 MB buffer cost 3-4x as long to fill as a
    reused one. With these settings (the ``MALLOC_*`` variables the benchmark in
    benchmarks/bench_capsule.py sets) blocks below 1 GiB come from the heap and freed
    memory stays there for the next step, as jemalloc or tcmalloc would keep it; the
    process's resident memory then stays at its peak. Does nothing on other C libraries, when
    ``MALLOC_MMAP_THRESHOLD_`` is already set, or with ``CAPSGAN_MALLOC_TUNING=0``.

    Returns:
        What was done: ``"set"``, ``"environment"``, ``"off"`` or ``"unavailable"``.
    """
    if _malloc_state:
        return _malloc_state[0]
    if os.environ.get("CAPSGAN_MALLOC_TUNING", "1") == "0":
        state = "off"
    elif "MALLOC_MMAP_THRESHOLD_" in os.environ:
        state = "environment"
    else:
        state = "unavailable"
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                mallopt = ctypes.CDLL(None).mallopt
                if all(mallopt(ctypes.c_int(k), ctypes.c_int(v)) == 1 for k, v in _MALLOC_SETTINGS):
                    state = "set"
            except (OSError, AttributeError):
                pass
    _malloc_state.append(state)
    return state


_WORKSPACES: weakref.WeakKeyDictionary[nn.Module, tuple[torch.Tensor, int]] = weakref.WeakKeyDictionary()


def _use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _workspace(owner: nn.Module, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Return a buffer for ``owner``'s patch matrix, the same memory step after step when it is free.

    A fresh 191 MB patch matrix (the MNIST primary capsules at batch 64) costs its page
    faults on every step, because the C allocator returns blocks that large to the system
    when they are freed: measured, allocating it took about as long as filling it, 3-4
    times longer than filling a kept buffer. The buffer is reused only when nothing else
    holds its memory (the autograd graph of an earlier step saves a view of it until that
    graph is freed), else a new one is made.
    """
    entry = _WORKSPACES.get(owner)
    if entry is not None:
        buf, idle = entry
        if buf.shape == shape and buf.dtype == like.dtype and buf.device == like.device and _use_count(buf) == idle:
            return buf
    buf = torch.empty(shape, dtype=like.dtype, device=like.device)
    if hasattr(torch._C, "_storage_Use_Count"):
        _WORKSPACES[owner] = (buf, _use_count(buf))
    return buf


def _im2col(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], out: torch.Tensor) -> torch.Tensor:
    """Write the patches of contiguous ``x (B, H, W, C)`` into ``out (B * Ho * Wo, kh * kw * C)``.

    Columns are ordered ``(ky, kx, c)``: for each kernel row the ``kw * C`` values of
    a patch lie side by side in ``x``, so the copy moves contiguous runs (9 x 256 floats
    for the primary capsules) instead of gathering one float every ``C``; that made the
    copy about 3x faster than ordering the columns like the weight's ``(c, ky, kx)``.
    """
    bsz, h, w, c = x.shape
    (kh, kw), (sh, sw) = kernel, stride
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    patches = x.as_strided((bsz, ho, wo, kh, kw * c), (h * w * c, sh * w * c, sw * c, w * c, 1))
    out.view(bsz, ho, wo, kh, kw * c).copy_(patches)
    return out


class _GemmConv(torch.autograd.Function):
    """Convolution of channels-last maps as one GEMM forward and GEMMs backward (CPU).

    Forward: ``y = im2col(x) @ W^T + b`` with ``W`` reordered to ``(out, ky, kx, c)``.
    Backward, from the saved patch matrix and reordered weight:

    * ``dW = dy^T @ im2col(x)``: one GEMM on the matrix the forward made (no second im2col);
    * ``dx``: one GEMM per kernel row, ``dy @ W[:, ky]`` ``(B*Ho*Wo, kw*C)``, added into
      ``dx`` window by window. The column gradient of the whole kernel (the size of the
      patch matrix, 191 MB for the MNIST primary capsules at batch 64) is never made,
      and no generic ``unfold`` backward runs: that backward alone took about a fifth of
      the training step.

    The GEMMs do exactly the convolution's multiply-adds, so FLOP counts are unchanged.
    ``dx`` is only computed when ``x`` needs a gradient (never for the images). With
    ``relu`` the ReLU is applied in place and its backward is folded in (no autograd
    view-and-in-place bookkeeping, which copied the whole output gradient twice).
    A weight stored channels-last (as the encoder stores its convolutions' weights) is
    already in ``(out, ky, kx, c)`` order, so neither it nor its gradient is reordered.
    Not twice differentiable (the backward uses the forward's patch matrix as a constant).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, owner, relu):
        out_ch, in_ch, kh, kw = weight.shape
        bsz, h, w, c = x.shape
        sh, sw = stride
        ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
        # A view of the workspace: while autograd holds it, the workspace counts as busy.
        cols = _workspace(owner, (bsz * ho * wo, kh * kw * in_ch), x).view(bsz * ho * wo, -1)
        _im2col(x.contiguous(), (kh, kw), (sh, sw), cols)
        w_rows = weight.permute(0, 2, 3, 1).reshape(out_ch, kh * kw * in_ch)
        y = torch.addmm(bias, cols, w_rows.t()) if bias is not None else cols @ w_rows.t()
        if relu:
            y.relu_()
        ctx.save_for_backward(cols if ctx.needs_input_grad[1] else None,
                              w_rows if ctx.needs_input_grad[0] else None,
                              y if relu else None)
        ctx.geometry = (bsz, h, w, c, kh, kw, sh, sw, ho, wo)
        ctx.channels_last = weight.permute(0, 2, 3, 1).is_contiguous()
        ctx.dtypes = (x.dtype, weight.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        cols, w_rows, y = ctx.saved_tensors
        bsz, h, w, c, kh, kw, sh, sw, ho, wo = ctx.geometry
        out_ch = grad_y.shape[-1]
        x_dtype, w_dtype = ctx.dtypes  # they differ from y's under autocast
        gy = grad_y.reshape(bsz * ho * wo, out_ch)
        if y is not None:
            gy = torch.ops.aten.threshold_backward(gy, y.to(gy.dtype), 0)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            gy_w = gy.to(w_rows.dtype)
            grad_x = gy_w.new_zeros(bsz, h, w, c)
            row = torch.empty(bsz * ho * wo, kw * c, dtype=gy_w.dtype, device=gy.device)
            rows = row.view(bsz, ho, wo, kw, c)
            span_y, span_x = sh * (ho - 1) + 1, sw * (wo - 1) + 1
            for ky in range(kh):
                torch.mm(gy_w, w_rows[:, ky * kw * c:(ky + 1) * kw * c], out=row)
                target = grad_x[:, ky:ky + span_y:sh]
                if wo <= kw:  # few output columns (the primary capsules): add one window each
                    for ox in range(wo):
                        target[:, :, ox * sw:ox * sw + kw].add_(rows[:, :, ox])
                else:  # many output columns (a stride-1 conv): add one kernel column each
                    for kx in range(kw):
                        target[:, :, kx:kx + span_x:sw].add_(rows[:, :, :, kx])
        if ctx.needs_input_grad[1]:
            # In the weight's own layout: a channels-last weight takes it as it is.
            g = gy.to(cols.dtype)
            # A narrow patch matrix (conv1: 81 columns) ran about 1.25x faster as cols^T @ dy.
            g = (cols.t() @ g).t().contiguous() if cols.shape[1] < out_ch else g.t() @ cols
            grad_w = g.to(w_dtype).view(out_ch, kh, kw, c).permute(0, 3, 1, 2)
            if not ctx.channels_last:
                grad_w = grad_w.contiguous()
        if ctx.needs_input_grad[2]:
            grad_b = gy.sum(0)
        if grad_x is not None:
            grad_x = grad_x.to(x_dtype)
        return grad_x, grad_w, grad_b, None, None, None


def conv_nhwc(x: torch.Tensor, conv: nn.Conv2d, gemm: bool | None = None, relu: bool = False) -> torch.Tensor:
    """Apply ``conv`` (then a ReLU with ``relu``) to channels-last maps ``x (B, H, W, C)``; return ``(B, Ho, Wo, C_out)``.

    With ``gemm`` the convolution runs as :class:`_GemmConv`. The default (``None``) picks it
    on a CPU for kernels of 7x7 and larger (the paper's and the report's 9x9 convolutions):
    there the training step measured faster with it than with the library's CPU convolution
    (oneDNN), mostly in the backward pass; for the quickstart's 5x5 kernels the library took
    0.6-0.7x the time (``python benchmarks/bench_conv_paths.py``, docs/performance.md).
    Elsewhere (CUDA) the library convolution is used, on the same parameters.
    """
    if gemm is None:
        gemm = x.device.type == "cpu" and min(conv.kernel_size) >= GEMM_MIN_KERNEL
    if not gemm or conv.dilation != (1, 1) or conv.groups != 1:
        y = F.conv2d(x.permute(0, 3, 1, 2), conv.weight, conv.bias, conv.stride, conv.padding,
                     conv.dilation, conv.groups)
        return (y.relu_() if relu else y).permute(0, 2, 3, 1)
    ph, pw = conv.padding
    if ph or pw:
        x = F.pad(x, (0, 0, pw, pw, ph, ph))
    bsz, h, w, _ = x.shape
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    y = _GemmConv.apply(x, conv.weight, conv.bias, conv.stride, conv, relu)  # (B * Ho * Wo, C_out)
    return y.view(bsz, (h - kh) // sh + 1, (w - kw) // sw + 1, conv.out_channels)
