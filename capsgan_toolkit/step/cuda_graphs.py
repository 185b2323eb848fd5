"""``[speed] cuda_graphs``: replay each model's training forward and backward as CUDA graphs.

A GPU training step of the built-in models issues several hundred small kernels from Python;
on a fast card the step is then bound by that host work, not by the card (docs/performance.md).
A CUDA graph records a forward (and its backward) once and replays it with one launch.

:class:`GraphedCalls` wraps one model. Its ``forward`` (set on the module instance, so the
module's class, parameters and ``state_dict`` stay as they are) counts the calls of a training
step: the k-th call of a step with a given signature (input shapes, dtypes and strides,
``requires_grad`` of the inputs and of the model's parameters, grad mode, autocast) replays the
graph captured for that call the first time it was seen, with
:func:`torch.cuda.make_graphed_callables`. A model called several times in a step (the
discriminator judges real, fake and, for the generator, fake again) gets one graph per call, so
no replay overwrites outputs that a later backward still needs. The parameters are inputs of the
graph: their gradients arrive as in eager mode, and a model whose parameters are frozen for a
call (the discriminator during the generator's step) computes none.

Outside a training step (between :meth:`GraphedCalls.new_step` and :meth:`GraphedCalls.end_step`,
which :meth:`capsgan_toolkit.step.speed.Speed.step` calls), outside training mode (evaluation,
samples), on tensors off the GPU, or with keyword arguments, the module's own forward runs.
Capturing runs the forward a few times; the model's buffers (BatchNorm's running statistics)
are restored afterwards, so they count the step once.
Attributes that the forward assigns to the module (the capsnet's pending diagnostics) are
assigned again after each replay: they hold the graph's memory, which each replay rewrites.

A model that cannot be captured (its forward reads a value to the host, say) stops the run with a
:class:`~capsgan_toolkit.errors.CapsganError` naming it, or, with ``fallback`` (``cuda_graphs =
"auto"``), runs eagerly from then on after one printed note, while the other models keep their
graphs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from capsgan_toolkit.errors import CapsganError

_MODULE_STATE = {"_parameters", "_buffers", "_modules", "training", "forward"}


class GraphedCalls:
    """Replays ``module``'s training calls as CUDA graphs (see the module docstring).

    Args:
        module: the model; its ``forward`` is replaced on the instance.
        name: the model's name in the recipe (for error messages).
        make: the graph builder (``torch.cuda.make_graphed_callables``; tests pass a stand-in).
        on_device: whether a call's tensors may be graphed (on CUDA by default).
        fallback: a model that cannot be captured runs eagerly (one note) instead of stopping the run.
    """

    def __init__(self, module: nn.Module, name: str, *, make: Callable | None = None,
                 on_device: Callable[[torch.Tensor], bool] | None = None, fallback: bool = False):
        self.module, self.name, self.fallback, self.eager_only = module, name, fallback, False
        self.make = make or torch.cuda.make_graphed_callables
        self.on_device = on_device or (lambda t: t.is_cuda)
        self.eager = module.forward  # the bound method of the module's class
        self.graphs: dict[tuple, tuple[Callable, dict[str, Any]]] = {}
        self.calls, self.active, self.capturing = 0, False, False
        module.forward = self.forward

    def new_step(self) -> None:
        """Start counting the calls of a new training step."""
        self.calls, self.active = 0, True

    def end_step(self) -> None:
        """The step is over: calls until the next :meth:`new_step` run eagerly (they have no call count)."""
        self.active = False

    def forward(self, *args, **kwargs):
        if self.eager_only or not self.active or self.capturing or kwargs or not self.module.training or not args \
                or not all(isinstance(a, torch.Tensor) and self.on_device(a) for a in args):
            return self.eager(*args, **kwargs)
        params = tuple(self.module.parameters())
        key = (self.calls, torch.is_grad_enabled(), torch.is_autocast_enabled("cuda"),
               tuple((tuple(a.shape), a.dtype, a.stride(), a.requires_grad) for a in args),
               tuple(p.requires_grad for p in params))
        self.calls += 1
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self.graphs[key] = self._capture(args, params)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
                if not self.fallback:
                    raise CapsganError(
                        f"speed.cuda_graphs = true: the {self.name} could not be captured as a CUDA graph ({reason}). "
                        "A model whose forward reads values back to the host, changes its control flow with the data, "
                        "or draws memory outside PyTorch cannot be graphed. Set speed.cuda_graphs = false, or "
                        '"auto" to run that model eagerly; checkpoints already written are intact.') from exc
                self.eager_only = True
                print(f'note: speed.cuda_graphs = "auto": the {self.name} runs eagerly; it cannot be captured as a '
                      f"CUDA graph ({reason}).", file=sys.stderr)
                return self.eager(*args)
        graphed, assigned = entry
        out = graphed(*args, *params)
        self.module.__dict__.update(assigned)
        return out

    def _capture(self, args: tuple[torch.Tensor, ...], params: tuple[torch.Tensor, ...]):
        module, n = self.module, len(args)
        buffers = [(b, b.detach().clone()) for b in module.buffers()]
        before = {k: id(v) for k, v in module.__dict__.items()}

        def run(*inputs):  # the parameters are inputs of the graph: gradients reach them
            return self.eager(*inputs[:n])

        self.capturing = True
        try:
            graphed = self.make(run, tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args) + params)
        finally:
            self.capturing = False
            with torch.no_grad():
                for buf, saved in buffers:  # the warm-up and capture runs do not count as steps; .data: a
                    buf.data.copy_(saved)  # forward already run this step saved the running statistics
        assigned = {k: v for k, v in module.__dict__.items() if k not in _MODULE_STATE and before.get(k) != id(v)}
        return graphed, assigned


def graph_models(modules: dict[str, nn.Module], **kwargs) -> list[GraphedCalls]:
    """Wrap each model in :class:`GraphedCalls` (``kwargs``: its options); return the wrappers (the trainer calls
    ``new_step``)."""
    return [GraphedCalls(module, name, **kwargs) for name, module in modules.items()]
