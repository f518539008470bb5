"""Combine what the extensions attached on every process into the full-batch quantities.

Under ``torch.distributed`` (e.g. ``DistributedDataParallel``) each of the ``R``
ranks runs the forward and backward pass on its shard of ``n_r`` samples, with its
own loss ``L_r`` reduced over the shard. The full batch has ``N = sum_r n_r``
samples and loss

    ``L = sum_r w_r L_r``,  ``w_r = n_r / N`` (``reduction="mean"``) or ``1`` (``"sum"``),

so with equal shards and a mean loss ``w_r = 1 / R``: DDP's averaged gradient.
:func:`all_reduce_quantities` replaces each rank's quantities by the full-batch
ones, identical on every rank (``a_r = n_r / N`` is the sample share). Each
extension class says how its savefield combines (its ``reduction``, built from the
primitives of :mod:`hbpkit.collectives`); the savefields are looked up in the
registry ``hbpkit.extensions.EXTENSIONS``:

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
``kfac``, ``kflr``, ``kfra``, ``hbp``,      ``G = sum_r w_r G_r``, ``A = sum_r a_r A_r``
``kfac_empirical``
``input_covariance``                        ``A = sum_r a_r A_r``: exact
``kronecker_roots``                         ``a = cat_r a_r``, ``g = cat_r w_r g_r``,
                                            ``g_bar = cat_r sqrt(w_r) g_bar_r`` per column
                                            ``v`` (rows stay ``(v, n[, t])``): exact
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
process's). ``EmpiricalKFAC``'s ``G = (1/c) sum_n g_n g_n^T`` is such a sum too
(``g_n`` scales with ``w_r``, ``1/c`` with ``1/w_r``): exact. ``G`` of the
batch-averaged strategy (``KFRA``, ``HBP(..., "batch-average")``) is exact for the
last layer only (there it is the batch-summed loss Hessian); deeper layers
backpropagate ``mean_n J_n^T H_z J_n`` with the *shard's* ``H_z``, so the rank
average drops the cross terms between one shard's Jacobians and another shard's
loss Hessians: an approximation, the same one distributed KFRA would make.

The Kronecker roots (``KroneckerRoots``) have rows per sample (and position), so
the full batch's roots are the ranks' rows stacked in rank order, with ``g`` and
``g_bar`` rescaled to the full loss; every rank must have the same number of rows
per sample (``positions``), else the reduction raises. ``A = a^T a / b`` of
``InputCovariance`` and the factors' ``A`` are averages over rows: with different
rows per sample on different ranks (sequence lengths, image sizes) ``sum_r a_r
A_r`` weights the ranks by samples, not rows, and is not the full-batch value.

The curvature-matrix products are exact: the full block is the weighted sum of
the ranks' blocks, so a product is the all-reduced sum of the local products.
Every rank must call them with the same ``V`` at the same time.

A savefield that no registered extension writes, or one whose extension has no
``reduction``, is an error naming the savefield, never silently skipped.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from hbpkit.collectives import (
    GRADS,
    REDUCTIONS,
    AllReducedProduct,
    ReduceContext,
    Reduction,
    ShardWeights,
    all_gather_batch,
    all_reduce_kronecker,
    all_reduce_sum,
    check_initialized,
    count_device,
    reduce_all,
    shard_weights,
)
from hbpkit.extensions import EXTENSIONS


def _registry() -> dict[str, type]:
    """``savefield -> extension class`` of :data:`hbpkit.extensions.EXTENSIONS`."""
    owners: dict[str, type] = {}
    for cls in EXTENSIONS:
        if cls.savefield in owners:
            raise RuntimeError(
                f"{cls.__name__} and {owners[cls.savefield].__name__} both write "
                f"p.{cls.savefield}: one savefield per extension in hbpkit.extensions.EXTENSIONS"
            )
        owners[cls.savefield] = cls
    return owners


OWNERS = _registry()
#: every savefield :func:`all_reduce_quantities` knows, in the order it reduces them
SAVEFIELDS = tuple(OWNERS)


def reduction_of(savefield: str) -> Reduction:
    """The ``reduction`` of the extension that writes ``savefield``; ``ValueError`` if none."""
    cls = OWNERS.get(savefield)
    if cls is None:
        raise ValueError(
            f"savefield {savefield!r} cannot be reduced: no extension in "
            f"hbpkit.extensions.EXTENSIONS writes it (known: {SAVEFIELDS}); list its extension "
            "class there with a `reduction` (see hbpkit.collectives), or leave it out of "
            "savefields="
        )
    if not isinstance(cls.reduction, Reduction):
        raise ValueError(
            f"savefield {savefield!r} ({cls.__name__}) has no rule to combine it across "
            "processes: give the class a `reduction` (see hbpkit.collectives), or leave it "
            "out of savefields="
        )
    return cls.reduction


def _fields(params: list[Tensor], savefields: Iterable[str] | None) -> list[str]:
    if savefields is None:
        return [s for s in SAVEFIELDS if any(hasattr(p, s) for p in params)]
    savefields = list(savefields)
    for s in savefields:
        reduction_of(s)
    return savefields


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
        savefields: which quantities to reduce (default: every known one present);
            an unknown one raises ``ValueError``.
        grad: ``"ddp"``: ``p.grad`` was averaged by DDP and is left alone;
            ``"local"``: ``p.grad`` is the shard's gradient (no DDP, or
            ``model.no_sync()``) and is replaced by the full-batch gradient.
        group: the process group (default: the world).
    """
    check_initialized()
    if grad not in GRADS:
        raise ValueError(f"grad={grad!r} is not one of {GRADS}")
    params = [p for p in params]
    fields = _fields(params, savefields)
    weights = shard_weights(reduction, batch_size, group)
    if grad == "local":
        missing = [tuple(p.shape) for p in params if p.grad is None and p.requires_grad]
        if missing:
            raise ValueError(f"grad='local' but parameters of shapes {missing} have no .grad")
    ctx = ReduceContext(weights, grad, group)
    jobs = []
    for field in fields:
        owners = [p for p in params if getattr(p, field, None) is not None]
        if owners:
            jobs.append((field, reduction_of(field), owners))
    # compute everything first, write at the end: no half-reduced attributes on error
    updates = reduce_all(jobs, ctx)
    if grad == "local":
        with_grad = [p for p in params if p.grad is not None]
        full = all_reduce_sum([p.grad * weights.loss for p in with_grad], group)
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
    device = count_device(group)
    flat = torch.cat([p.reshape(-1).double().to(device) for p in params])
    first = flat.clone()
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast(first, src=src, group=group)
    mismatch = torch.tensor([0.0 if torch.equal(first, flat) else 1.0], device=device)
    dist.all_reduce(mismatch, group=group)
    return mismatch.item() == 0.0


__all__ = [
    "GRADS",
    "REDUCTIONS",
    "SAVEFIELDS",
    "AllReducedProduct",
    "ShardWeights",
    "all_gather_batch",
    "all_reduce_kronecker",
    "all_reduce_quantities",
    "all_reduce_sum",
    "check_initialized",
    "parameters_in_sync",
    "reduction_of",
    "shard_weights",
]
