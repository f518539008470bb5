"""Collective primitives that combine per-rank quantities into the full batch's.

The low level of :mod:`hbpkit.distributed`: the weights of a shard, coalesced
all-reduces, gathers in rank order, and the reductions an extension class names
as its ``reduction`` (how its savefield is combined across processes). Nothing
here knows an extension; each extension in :mod:`hbpkit.extensions` says which
reduction its quantity takes.

Notation: ``R`` ranks, rank ``r`` holds ``n_r`` of the ``N = sum_r n_r`` samples
and its loss ``L_r``; the full-batch loss is ``L = sum_r w_r L_r`` (``w_r = n_r / N``
for ``reduction="mean"``, ``1`` for ``"sum"``); ``a_r = n_r / N`` is the sample share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from hbpkit.curvature.kronecker import KroneckerFactors

if dist.is_available():
    # torch.distributed.nn.functional evaluates ``group=group.WORLD``, the default argument of
    # ten functions, when it is first imported. Imported after init_process_group (the first
    # DistributedDataParallel imports it, through torch._dynamo), it keeps the default process
    # group alive past destroy_process_group, so gloo's worker threads outlive it; at
    # interpreter shutdown a worker still dropping the last reference to a collective's tensor
    # must take the GIL, the finalizing interpreter ends that thread (pthread_exit), and its
    # forced unwinding through a noexcept destructor aborts the process ("terminate called
    # without an active exception", SIGABRT). Imported here, before any group exists, the
    # defaults are None and destroy_process_group joins gloo's threads.
    import torch.distributed.nn.functional  # noqa: F401

REDUCTIONS = ("mean", "sum")
GRADS = ("ddp", "local")


@dataclass(frozen=True)
class ShardWeights:
    """How this rank's shard enters the full batch.

    Attributes:
        loss: ``w_r`` with ``L = sum_r w_r L_r``.
        samples: ``a_r = n_r / N``, the weight of a per-sample average.
        world_size: ``R``.
        sizes: ``[n_0, ..., n_{R-1}]``, or ``None`` if shards were taken as equal.
    """

    loss: float
    samples: float
    world_size: int
    sizes: tuple[int, ...] | None

    @property
    def total(self) -> int | None:
        """``N``, the full batch size, if the shard sizes are known."""
        return None if self.sizes is None else sum(self.sizes)


def check_initialized() -> None:
    """``RuntimeError`` unless ``torch.distributed`` has a default process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "hbpkit.distributed needs torch.distributed initialised: call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment)"
        )


def count_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where small bookkeeping tensors (sizes, flags) live: NCCL talks to CUDA tensors only."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_weights(
    reduction: str, batch_size: int | None = None, group: dist.ProcessGroup | None = None
) -> ShardWeights:
    """The weights ``w_r`` and ``a_r`` of this rank (a collective if ``batch_size`` is given).

    Args:
        reduction: how the loss module reduces, ``"mean"`` or ``"sum"``.
        batch_size: ``n_r``, this rank's number of samples; ``None``: all shards are
            equal (as ``DistributedSampler`` makes them), ``w_r = 1/R`` or ``1``.
        group: the process group (default: the world).
    """
    check_initialized()
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
    R = dist.get_world_size(group)
    if batch_size is None:
        return ShardWeights(1.0 / R if reduction == "mean" else 1.0, 1.0 / R, R, None)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size must be a non-negative integer, got {batch_size!r}")
    local = torch.tensor([batch_size], dtype=torch.long, device=count_device(group))
    gathered = [torch.zeros_like(local) for _ in range(R)]
    dist.all_gather(gathered, local, group=group)
    sizes = tuple(int(s) for s in gathered)
    N = sum(sizes)
    if N == 0:
        raise ValueError("the full batch is empty: every rank reported batch_size=0")
    share = batch_size / N
    return ShardWeights(share if reduction == "mean" else 1.0, share, R, sizes)


def all_reduce_sum(tensors: list[Tensor], group: dist.ProcessGroup | None = None) -> list[Tensor]:
    """``sum_r t_r`` for every tensor, with one ``all_reduce`` per dtype (coalesced)."""
    out: list[Tensor | None] = [None] * len(tensors)
    dtypes = sorted({t.dtype for t in tensors}, key=str)
    for dtype in dtypes:
        idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        dist.all_reduce(flat, group=group)
        for i, chunk in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = chunk.view(tensors[i].shape)
    return out  # type: ignore[return-value]


def all_gather_batch(t: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate ``t`` ``[n_r, *]`` of every rank along dim 0 (rank order; sizes may differ).

    The trailing dimensions must agree on every rank.
    """
    R = dist.get_world_size(group)
    size = torch.tensor([t.shape[0]], dtype=torch.long, device=count_device(group))
    sizes = [torch.zeros_like(size) for _ in range(R)]
    dist.all_gather(sizes, size, group=group)
    sizes_int = [int(s) for s in sizes]
    longest = max(sizes_int)
    padded = t.new_zeros(longest, *t.shape[1:])
    padded[: t.shape[0]] = t.detach()
    chunks = [torch.empty_like(padded) for _ in range(R)]
    dist.all_gather(chunks, padded, group=group)
    return torch.cat([c[:n] for c, n in zip(chunks, sizes_int)])


class AllReducedProduct:
    """``V [K, *S] -> [K, *S]``: ``sum_r w_r C_r V``, the full-batch block times ``V``.

    A collective: every rank of ``group`` must call it with the same ``V``.
    """

    __slots__ = ("local", "weight", "group")

    def __init__(
        self,
        local: Callable[[Tensor], Tensor],
        weight: float,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.local = local
        self.weight = weight
        self.group = group

    def __call__(self, V: Tensor) -> Tensor:
        out = self.local(V) * self.weight
        dist.all_reduce(out, group=self.group)
        return out

    def __repr__(self) -> str:
        return f"AllReducedProduct({self.local!r}, weight={self.weight:g})"


def all_reduce_kronecker(
    factors: list[KroneckerFactors], weights: ShardWeights, group: dist.ProcessGroup | None = None
) -> list[KroneckerFactors]:
    """``G = sum_r w_r G_r``, ``A = sum_r a_r A_r`` of each ``(G, A)`` or ``(G,)`` (collective)."""
    scaled = []
    for f in factors:
        scaled.append(f[0] * weights.loss)
        if len(f) == 2:
            scaled.append(f[1] * weights.samples)
    reduced = iter(all_reduce_sum(scaled, group))
    return [f.like([next(reduced) for _ in f]) for f in factors]


# ------------------------------------------------------------------------------ reductions
@dataclass(frozen=True)
class ReduceContext:
    """What a reduction may use besides the values: the shard's weights and the gradients.

    Attributes:
        weights: this rank's :class:`ShardWeights`.
        grad: ``"ddp"`` (``p.grad`` already averaged by DDP) or ``"local"`` (the shard's).
        group: the process group (``None``: the world).
    """

    weights: ShardWeights
    grad: str
    group: dist.ProcessGroup | None


class Reduction:
    """How one savefield's per-rank values combine into the full batch's (an extension's
    ``reduction``).

    :meth:`check` runs on every rank before any collective (raise ``ValueError`` there,
    naming the savefield and what to do, so nothing is half-reduced);
    :meth:`reduce` is a collective and returns the full-batch value of each parameter.
    """

    #: the full-batch value in terms of the ranks' values (for docs and errors)
    formula: str = ""

    def check(self, savefield: str, params: list[Tensor], values: list[Any], ctx: ReduceContext):
        """Raise ``ValueError`` / ``TypeError`` if these values cannot be reduced."""

    def reduce(self, params: list[Tensor], values: list[Any], ctx: ReduceContext) -> list[Any]:
        """The full-batch values, in the order of ``params`` (a collective)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.formula})"


_WEIGHTS: dict[str, Callable[[ShardWeights], float]] = {
    "w_r": lambda w: w.loss,
    "w_r**2": lambda w: w.loss**2,
    "a_r": lambda w: w.samples,
}


class _Weighted(Reduction):
    """A reduction of ``c_r q_r``, the weight ``c_r`` named by ``weight`` (see ``_WEIGHTS``);
    ``formula`` reads ``"<combine> <weight> q_r"``."""

    combine = ""

    def __init__(self, weight: str) -> None:
        if weight not in _WEIGHTS:
            raise ValueError(f"weight={weight!r} is not one of {tuple(_WEIGHTS)}")
        self.weight = weight
        self.formula = f"{self.combine} {weight} q_r"

    def _weighted(self, values, ctx) -> list[Tensor]:
        """``c_r q_r`` for this rank's ``values``."""
        c = _WEIGHTS[self.weight](ctx.weights)
        return [v * c for v in values]


class WeightedSum(_Weighted):
    """``sum_r c_r q_r`` with ``c_r`` one of ``w_r`` (a quantity linear in the loss),
    ``w_r**2`` (quadratic in the loss's gradients) or ``a_r`` (an average over samples)."""

    combine = "sum_r"

    def reduce(self, params, values, ctx):
        return all_reduce_sum(self._weighted(values, ctx), ctx.group)


class GatherInRankOrder(_Weighted):
    """``cat_r c_r q_r`` along dim 0 (rank 0's samples first): per-sample quantities."""

    combine = "cat_r"

    def reduce(self, params, values, ctx):
        return [all_gather_batch(v, ctx.group) for v in self._weighted(values, ctx)]


class KroneckerFactorwise(Reduction):
    """``G = sum_r w_r G_r``, ``A = sum_r a_r A_r``: Kronecker factors reduced one by one."""

    formula = "G = sum_r w_r G_r, A = sum_r a_r A_r"

    def check(self, savefield, params, values, ctx):
        for p, v in zip(params, values):
            if not isinstance(v, KroneckerFactors):
                raise TypeError(
                    f"p.{savefield} of shape {tuple(p.shape)} is {type(v).__name__}, not "
                    "KroneckerFactors: reduce it with savefields= that leave it out"
                )

    def reduce(self, params, values, ctx):
        return all_reduce_kronecker(values, ctx.weights, ctx.group)


class ProductAllReduce(Reduction):
    """``V -> sum_r w_r C_r V``: each call of the product all-reduces (a collective)."""

    formula = "V -> sum_r w_r C_r V"

    def check(self, savefield, params, values, ctx):
        for p, v in zip(params, values):
            if isinstance(v, AllReducedProduct):
                raise ValueError(
                    f"p.{savefield} of shape {tuple(p.shape)} is already all-reduced: "
                    "call all_reduce_quantities once per backward pass"
                )
            if not callable(v):
                raise TypeError(f"p.{savefield} of shape {tuple(p.shape)} is not a product")

    def reduce(self, params, values, ctx):
        return [AllReducedProduct(v, ctx.weights.loss, ctx.group) for v in values]


class NotReducible(Reduction):
    """A quantity without a full-batch combination: :meth:`check` raises with the reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.formula = "none"

    def check(self, savefield, params, values, ctx):
        raise ValueError(
            f"p.{savefield} cannot be combined across processes: {self.reason}; leave it out "
            "with savefields=[...]"
        )


def reduce_all(
    jobs: Sequence[tuple[str, Reduction, list[Tensor]]], ctx: ReduceContext
) -> list[tuple[Tensor, str, Any]]:
    """``(p, savefield, full-batch value)`` for every ``(savefield, reduction, owners)`` job.

    Checks every job before the first collective; writes nothing.
    """
    values = [[getattr(p, field) for p in owners] for field, _, owners in jobs]
    for (field, reduction, owners), vals in zip(jobs, values):
        reduction.check(field, owners, vals, ctx)
    updates = []
    for (field, reduction, owners), vals in zip(jobs, values):
        new = reduction.reduce(owners, vals, ctx)
        updates.extend(zip(owners, [field] * len(owners), new))
    return updates
