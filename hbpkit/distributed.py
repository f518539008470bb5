"""Combine what the extensions attached on every process into the full-batch quantities.

Under ``torch.distributed`` (e.g. ``DistributedDataParallel``) each of the ``R``
ranks runs the forward and backward pass on its shard of ``n_r`` samples, with its
own loss ``L_r`` reduced over the shard. The full batch has ``N = sum_r n_r``
samples and loss

    ``L = sum_r w_r L_r``,  ``w_r = n_r / N`` (``reduction="mean"``) or ``1`` (``"sum"``),

so with equal shards and a mean loss ``w_r = 1 / R``: DDP's averaged gradient.
:func:`all_reduce_quantities` replaces each rank's quantities by the full-batch
ones, identical on every rank (``a_r = n_r / N`` is the sample share):

=========================================  ==============================================
savefield                                   full-batch value
=========================================  ==============================================
``diag_ggn_exact``, ``diag_ggn_mc``,        ``sum_r w_r q_r``: linear in the loss, exact
``diag_h``, ``p.grad`` (``grad="local"``)
``sum_grad_squared``                        ``sum_r w_r**2 q_r``: exact
``grad_batch`` ``[N, *S]``, ``batch_l2``    ``w_r q_r`` / ``w_r**2 q_r``, gathered in rank
``[N]``                                     order (rank 0's samples first): exact
``variance``                                from the reduced ``sum_grad_squared`` and
                                            gradient, ``sgs / N - (grad / N)**2``: exact
``kfac``, ``kflr``, ``kfra``, ``hbp``        ``G = sum_r w_r G_r``, ``A = sum_r a_r A_r``
``ggnmp``, ``hmp``, ``pchmp``               ``V -> sum_r w_r C_r V`` (an all-reduce per
                                            call, a collective): exact
=========================================  ==============================================

Kronecker factors are reduced factor by factor, as distributed K-FAC
implementations do (Osawa et al. 2019, Pauloski et al. 2020): the average of
``kron(G_r, A_r)`` is not a Kronecker product, and reducing ``G`` and ``A``
separately keeps the factored form, costs ``out**2 + in**2`` numbers per layer,
and gives what one process computes on the full batch wherever the factor is a
sum over samples. ``A = 1/N sum_n x_n x_n^T`` is always such a sum: exact.
``G`` of the per-sample (``backprop="sqrt"``) strategies, ``KFLR``, ``KFAC`` and
``HBP(..., "sqrt")``, is ``sum_n s_n s_n^T`` with the loss scaling in ``s_n``:
exact (``KFAC`` in distribution: its Monte-Carlo draws differ from one
process's). ``G`` of the batch-averaged strategy (``KFRA``, ``HBP(...,
"batch-average")``) is exact for the last layer only (there it is the
batch-summed loss Hessian); deeper layers backpropagate
``mean_n J_n^T H_z J_n`` with the *shard's* ``H_z``, so the rank average drops
the cross terms between one shard's Jacobians and another shard's loss
Hessians: an approximation, the same one distributed KFRA would make.

The curvature-matrix products are exact: the full block is the weighted sum of
the ranks' blocks, so a product is the all-reduced sum of the local products.
Every rank must call them with the same ``V`` at the same time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from hbpkit.curvature.kronecker import KroneckerFactors

REDUCTIONS = ("mean", "sum")
GRADS = ("ddp", "local")

LINEAR = ("diag_ggn_exact", "diag_ggn_mc", "diag_h")
KRONECKER = ("kfac", "kflr", "kfra", "hbp")
PRODUCTS = ("ggnmp", "hmp", "pchmp")
SAVEFIELDS = (
    LINEAR + KRONECKER + PRODUCTS + ("sum_grad_squared", "grad_batch", "batch_l2", "variance")
)


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


def _count_device(group: dist.ProcessGroup | None) -> torch.device:
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
    local = torch.tensor([batch_size], dtype=torch.long, device=_count_device(group))
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
    """Concatenate ``t`` ``[n_r, *]`` of every rank along dim 0 (rank order; sizes may differ)."""
    R = dist.get_world_size(group)
    size = torch.tensor([t.shape[0]], dtype=torch.long, device=_count_device(group))
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
    return [KroneckerFactors([next(reduced) for _ in f], f.param_shape) for f in factors]


def _present(params: list[Tensor], savefields: Iterable[str] | None) -> list[str]:
    if savefields is None:
        return [s for s in SAVEFIELDS if any(hasattr(p, s) for p in params)]
    savefields = list(savefields)
    for s in savefields:
        if s not in SAVEFIELDS:
            raise ValueError(f"savefield {s!r} cannot be reduced; known: {SAVEFIELDS}")
    return savefields


def _full_gradients(
    params: list[Tensor], weights: ShardWeights, grad: str, group: dist.ProcessGroup | None
) -> list[Tensor]:
    """The full-batch gradient ``sum_r w_r grad_r`` of each parameter."""
    if grad == "local":
        return all_reduce_sum([p.grad * weights.loss for p in params], group)
    # DDP averaged: p.grad = 1/R sum_r grad_r, the full gradient if all w_r are equal
    # (checked by _check_variance), then sum_r w_r grad_r = w R p.grad
    return [p.grad.detach() * (weights.loss * weights.world_size) for p in params]


def _check_variance(params: list[Tensor], weights: ShardWeights, grad: str) -> None:
    """``ValueError`` if ``variance`` cannot be recombined (before any collective writes)."""
    if weights.sizes is None:
        raise ValueError("reducing 'variance' needs batch_size= (this rank's number of samples)")
    for p in params:
        if getattr(p, "variance", None) is None or hasattr(p, "sum_grad_squared"):
            continue
        if grad != "local":
            raise ValueError(
                f"variance of parameter of shape {tuple(p.shape)}: DDP has averaged p.grad, so "
                "the shard's gradient is gone; run SumGradSquared() in the same backward pass, "
                "or run the backward under model.no_sync() and pass grad='local'"
            )
    if grad == "ddp" and weights.loss != 1.0 and len(set(weights.sizes)) > 1:
        raise ValueError(
            f"variance: DDP averaged gradients over shards of different sizes {weights.sizes}, "
            "which is not the full-batch gradient of a mean loss; run the backward under "
            "model.no_sync() and pass grad='local'"
        )


def _variances(
    params: list[Tensor], weights: ShardWeights, grad: str, group: dist.ProcessGroup | None
) -> list[Tensor]:
    """``sgs / N - (grad / N)**2`` of the full batch, from each rank's local quantities."""
    n, N = weights.sizes[dist.get_rank(group)], weights.total
    local_sgs = []
    for p in params:
        if hasattr(p, "sum_grad_squared"):
            local_sgs.append(p.sum_grad_squared)
        else:  # grad="local": variance_r = sgs_r / n - (grad_r / n)**2
            local_sgs.append(n * p.variance + p.grad.square() / max(n, 1))
    sgs = all_reduce_sum([s * weights.loss**2 for s in local_sgs], group)
    grads = _full_gradients(params, weights, grad, group)
    return [s / N - (g / N).square() for s, g in zip(sgs, grads)]


def all_reduce_quantities(
    params: Iterable[Tensor],
    reduction: str = "mean",
    batch_size: int | None = None,
    savefields: Iterable[str] | None = None,
    grad: str = "ddp",
    group: dist.ProcessGroup | None = None,
) -> None:
    """Replace every rank's quantities by the full-batch ones (see the module doc). A collective.

    Call it on every rank after the backward pass inside ``backprop(...)`` and before
    reading the quantities::

        loss = loss_fn(ddp_model(X_shard), y_shard)
        with backprop(KFLR(), DiagGGNExact(), BatchGrad()):
            loss.backward()
        all_reduce_quantities(model.parameters(), reduction=loss_fn.reduction,
                              batch_size=len(X_shard))

    Args:
        params: the parameters (same order on every rank).
        reduction: the loss module's reduction, ``"mean"`` or ``"sum"``.
        batch_size: this rank's number of samples ``n_r``; ``None`` if all shards
            are equal (needed for ``variance``).
        savefields: which quantities to reduce (default: every known one present).
        grad: ``"ddp"``: ``p.grad`` was averaged by DDP and is left alone;
            ``"local"``: ``p.grad`` is the shard's gradient (no DDP, or
            ``model.no_sync()``) and is replaced by the full-batch gradient.
        group: the process group (default: the world).
    """
    check_initialized()
    if grad not in GRADS:
        raise ValueError(f"grad={grad!r} is not one of {GRADS}")
    params = [p for p in params]
    fields = _present(params, savefields)
    weights = shard_weights(reduction, batch_size, group)
    if grad == "local":
        missing = [tuple(p.shape) for p in params if p.grad is None and p.requires_grad]
        if missing:
            raise ValueError(f"grad='local' but parameters of shapes {missing} have no .grad")
    if "variance" in fields:
        _check_variance(params, weights, grad)
    # compute everything first, write at the end: no half-reduced attributes on error
    updates: list[tuple[Tensor, str, object]] = []
    for field in fields:
        owners = [p for p in params if getattr(p, field, None) is not None]
        if not owners:
            continue
        values = [getattr(p, field) for p in owners]
        if field == "variance":
            new = _variances(owners, weights, grad, group)
        elif field in LINEAR:
            new = all_reduce_sum([v * weights.loss for v in values], group)
        elif field == "sum_grad_squared":
            new = all_reduce_sum([v * weights.loss**2 for v in values], group)
        elif field == "grad_batch":
            new = [all_gather_batch(v * weights.loss, group) for v in values]
        elif field == "batch_l2":
            new = [all_gather_batch(v * weights.loss**2, group) for v in values]
        elif field in KRONECKER:
            for p, v in zip(owners, values):
                if not isinstance(v, KroneckerFactors):
                    raise TypeError(f"p.{field} of shape {tuple(p.shape)} is not KroneckerFactors")
            new = all_reduce_kronecker(values, weights, group)
        else:  # PRODUCTS
            new = [AllReducedProduct(v, weights.loss, group) for v in values]
        updates.extend(zip(owners, [field] * len(owners), new))
    if grad == "local":
        with_grad = [p for p in params if p.grad is not None]
        full = _full_gradients(with_grad, weights, grad, group)
        updates.extend((p, "grad", g) for p, g in zip(with_grad, full))
    for p, field, value in updates:
        if field == "grad":
            p.grad.copy_(value)
        else:
            setattr(p, field, value)


@torch.no_grad()
def parameters_in_sync(params: Iterable[Tensor], group: dist.ProcessGroup | None = None) -> bool:
    """Whether all ranks hold bit for bit the parameters of the group's first rank (collective)."""
    check_initialized()
    params = [p.detach() for p in params]
    if not params:
        return True
    device = _count_device(group)
    flat = torch.cat([p.reshape(-1).double().to(device) for p in params])
    first = flat.clone()
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast(first, src=src, group=group)
    mismatch = torch.tensor([0.0 if torch.equal(first, flat) else 1.0], device=device)
    dist.all_reduce(mismatch, group=group)
    return mismatch.item() == 0.0
