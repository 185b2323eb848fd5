"""Training on several processes started by ``torchrun``: one process per GPU, or CPU processes on gloo.

``torchrun --nproc_per_node N -m capsgan_toolkit run RECIPE`` starts N copies of the command;
torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``, and
:func:`setup` joins them into one process group (NCCL on CUDA, gloo on the CPU). What each rank
does differently, and what keeps them identical:

- **data**: every rank computes the same epoch order; global batch ``b`` is the
  ``data.batch_size x WORLD_SIZE`` images ``order[b*G:(b+1)*G]`` and rank ``r`` trains on its
  ``r``-th share of them (:meth:`Distributed.shard`). ``data.batch_size`` is per rank.
- **gradients**: after each backward pass, the gradients of the optimizer's parameters are
  averaged over the ranks in one all-reduce (:meth:`Distributed.average_gradients`), so every
  rank takes the same optimizer step and the weights stay identical. This is the algorithm of
  ``DistributedDataParallel``, done by hand: a GAN step calls the encoder and discriminator
  several times before one backward pass and the gate switches parts off step by step, which the
  ``DistributedDataParallel`` wrapper does not support without ``find_unused_parameters`` and
  re-entrant forward restrictions. Buffers (BatchNorm's running statistics) are copied from
  rank 0 after every step, as ``DistributedDataParallel`` does before every forward pass.
- **decisions**: the batch accuracies and losses a step reports are averaged over the ranks
  before the running accuracies, the gate and the divergence guard see them; a stop (a signal
  on any rank, ``run.max_minutes``) is agreed by all ranks at the same step. So every rank takes
  the same phases, the same NaN decisions and the same rollbacks.
- **random numbers**: each step's draws (noise, fakes) come from a generator seeded with
  ``(run.seed, step, rank)``, so ranks draw different noise, and a resumed run draws the same
  as the uninterrupted one with no per-rank state to save.
- **files**: rank 0 alone writes the run folder (recipe, metrics.jsonl, samples, checkpoints,
  summary) and runs the per-epoch evaluation; the other ranks read checkpoints from it (resume,
  rollback), so on several nodes the run folder must be on a shared file system.

A checkpoint records the world size; resuming under another world size is refused (the
global batch, and with it the learning dynamics, would change).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from capsgan_toolkit.errors import CapsganError


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: ``rank`` of ``world_size`` (1: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """Return this rank's device: ``cuda:LOCAL_RANK`` for CUDA, ``device`` otherwise."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def shard(self, indices: list[int], batch_size: int) -> list[int]:
        """Return this rank's share of a global batch of ``batch_size x world_size`` indices."""
        return indices[self.rank * batch_size:(self.rank + 1) * batch_size]

    # ------------------------------------------------------------------ collectives (no-ops on one process)

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` over the ranks, in one flat all-reduce."""
        if not self.active:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def mean(self, values: list[float]) -> list[float]:
        """Return the element-wise mean of ``values`` over the ranks (the same list on every rank)."""
        if not self.active or not values:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        torch.distributed.all_reduce(t)
        return (t / self.world_size).tolist()

    def reduce_result(self, result):
        """Return a step's :class:`~capsgan_toolkit.objective.StepResult` with every value averaged over the ranks."""
        keys = sorted(result.values)
        accs = [result.encoder_acc, result.disc_acc]
        means = self.mean([float(result.values[k]) for k in keys] + [a if a is not None else 0.0 for a in accs])
        encoder_acc, disc_acc = (m if a is not None else None for m, a in zip(means[len(keys):], accs))
        return replace(result, values=dict(zip(keys, means)), encoder_acc=encoder_acc, disc_acc=disc_acc)

    def all_finite(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return ``values`` where a value NaN/Inf on any rank is NaN on all (so all ranks decide alike)."""
        if not self.active:
            return values
        keys = sorted(values)
        bad = self.mean([0.0 if torch.isfinite(values[k]).all() else 1.0 for k in keys])
        return {k: torch.tensor(float("nan")) if b > 0 else torch.tensor(0.0) for k, b in zip(keys, bad)}

    def any(self, flag: bool) -> bool:
        """Return whether ``flag`` is true on any rank."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._collective_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def broadcast_modules(self, modules: Iterable[torch.nn.Module], *, buffers_only: bool = False) -> None:
        """Copy rank 0's parameters (unless ``buffers_only``) and buffers to every rank."""
        if not self.active:
            return
        for module in modules:
            tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
            for t in tensors:
                torch.distributed.broadcast(t.data, src=0)

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def _collective_device(self) -> torch.device:
        backend = torch.distributed.get_backend()
        return torch.device("cuda", self.local_rank) if backend == "nccl" else torch.device("cpu")


_SINGLE = Distributed()
_current: Distributed = _SINGLE


def current() -> Distributed:
    """Return this process's :class:`Distributed` (rank 0 of 1 unless :func:`setup` joined a group)."""
    return _current


def setup(device: str = "auto") -> Distributed:
    """Join the process group torchrun describes in the environment (once); return this rank's place.

    Without ``WORLD_SIZE`` > 1 in the environment nothing happens (one process). ``device`` is the
    recipe's ``run.device``: CUDA uses NCCL and one GPU per local rank, the CPU uses gloo.
    """
    global _current
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _current
    if _current.active:
        return _current
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise CapsganError("WORLD_SIZE is set but RANK is not: start several processes with torchrun "
                           "(torchrun --nproc_per_node N -m capsgan_toolkit run RECIPE).") from None
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise CapsganError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA GPUs here: start "
                               "at most one process per GPU (torchrun --nproc_per_node).")
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    _current = Distributed(rank, world, local_rank)
    return _current


def teardown() -> None:
    """Leave the process group :func:`setup` joined (at the end of a distributed run)."""
    global _current
    if _current.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _current = _SINGLE


class DiscardLog:
    """A metrics log that keeps nothing: what ranks other than 0 write to."""

    def append(self, row) -> None:
        pass

    def truncate_after(self, step: int, epoch: int | None = None) -> None:
        pass


def step_seed(seed: int, step: int, rank: int) -> int:
    """Return the seed of one rank's random draws in one step (distributed runs)."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)
