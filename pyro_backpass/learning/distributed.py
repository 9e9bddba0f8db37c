"""The process group a computation runs in: :class:`World`, with collectives that are no-ops in
a single process, so that one code path serves one process and ``torchrun``'s many.

Training shards its data *contiguously* by rank (:meth:`World.shard`): rank ``r`` of ``P`` holds
items ``[N r / P, N (r + 1) / P)``, so concatenating per-rank pieces in rank order gives the
single-process order back, and a per-item quantity gathered to rank 0 is in the order a single
process would have computed it. Sums are all-reduced (sufficient statistics); what does not
reduce (quantiles, k-means) is gathered to rank 0, computed there and broadcast.

The library never starts a process group: an entry point does (the command line, under
``torchrun``, via ``torch.distributed.init_process_group``), and :meth:`World.current` reads it.
Collectives run on :attr:`World.device` (CPU for gloo, the rank's GPU for NCCL); tensors are
moved there and back, so callers pass tensors on whatever device they live on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["SINGLE_PROCESS", "World"]


@dataclass(frozen=True)
class World:
    """``size`` processes, this one of rank ``rank``; ``World()`` is the single process."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is not in a world of size {self.size}")

    @classmethod
    def current(cls) -> World:
        """The initialised default process group, or the single process when there is none."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        backend = dist.get_backend()
        device = torch.device("cpu")
        if backend == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        return cls(rank=dist.get_rank(), size=dist.get_world_size(), device=device)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints and logs."""
        return self.rank == 0

    # ---------------------------------------------------------------------------- sharding
    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """``[lo, hi)`` of ``rank``'s contiguous share of ``n`` items (this rank by default)."""
        r = self.rank if rank is None else rank
        return n * r // self.size, n * (r + 1) // self.size

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items, as a slice."""
        return slice(*self.bounds(n))

    # ---------------------------------------------------------------------------- collectives
    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``Σ_ranks x`` on every rank (a new tensor; ``x`` untouched)."""
        if not self.distributed:
            return x.clone()
        y = x.detach().to(self.device, copy=True)
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y.to(x.device)

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """``max_ranks x`` on every rank (a new tensor)."""
        if not self.distributed:
            return x.clone()
        y = x.detach().to(self.device, copy=True)
        dist.all_reduce(y, op=dist.ReduceOp.MAX)
        return y.to(x.device)

    def broadcast(self, x: torch.Tensor, *, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``x`` on every rank (``x`` must have one shape and dtype everywhere)."""
        if not self.distributed:
            return x
        y = x.detach().to(self.device, copy=True).contiguous()
        dist.broadcast(y, src=src)
        return y.to(x.device)

    def broadcast_(self, x: torch.Tensor, *, src: int = 0) -> None:
        """Overwrite ``x`` in place with rank ``src``'s value."""
        if self.distributed:
            with torch.no_grad():
                x.copy_(self.broadcast(x, src=src))

    def sizes(self, n: int) -> list[int]:
        """Every rank's ``n``, in rank order."""
        if not self.distributed:
            return [n]
        counts = torch.zeros(self.size, dtype=torch.long)
        counts[self.rank] = n
        return self.all_reduce_sum(counts).tolist()

    def offset(self, n: int) -> int:
        """Σ of ``n`` over the ranks before this one: where this rank's items start globally."""
        return sum(self.sizes(n)[: self.rank])

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of ``x`` ``(n_r, ...)``, concatenated in rank order, on every rank.

        Ranks may hold different ``n_r``; the rest of the shape and the dtype must agree.
        """
        if not self.distributed:
            return x
        counts = self.sizes(x.shape[0])
        pad = x.new_zeros((max(counts), *x.shape[1:]))
        pad[: x.shape[0]] = x
        pad = pad.to(self.device)
        parts = [torch.empty_like(pad) for _ in counts]
        dist.all_gather(parts, pad)
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).to(x.device)

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's rows of ``x`` concatenated in rank order on rank 0; None elsewhere.

        (An all-gather underneath: NCCL has no variable-size gather, and the pieces gathered
        here are subsamples and projections, never the training data.)
        """
        full = self.all_gather_rows(x)
        return full if self.is_main else None

    def sync_generator(self, generator: torch.Generator) -> None:
        """Give every rank rank 0's generator state (after rank 0 alone drew from it)."""
        if self.distributed:
            state = self.broadcast(generator.get_state())
            generator.set_state(state)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


SINGLE_PROCESS = World()  # the default ``world=`` of the library: one process, no collectives
