"""The optimizers under ``torch.distributed``: every rank takes the same full-batch step.

Setting: ``DistributedDataParallel`` (or any equivalent) has averaged ``p.grad``
over the ranks, and each rank's extensions computed its shard's quantities. The
optimizers here reduce the curvature across ranks themselves (the rules of
:mod:`hbpkit.distributed`, shards of equal size, ``reduction`` the loss
module's), so the step equals the single-process step on the full batch:

* :class:`DistributedKroneckerPreconditioner`: all-reduces the Kronecker factors
  (``G`` and ``A`` separately, one collective for all layers) and spreads the
  damped inversions over the ranks: layers are assigned to ranks greedily by cost
  (``sum of dim**3`` of their factors, largest first, each to the least loaded
  rank), each rank inverts its share and broadcasts the inverses, as
  distributed K-FAC implementations do (Osawa et al. 2019, Pauloski et al. 2020).
* :class:`DistributedNewtonCG`: all blocks (and sub-blocks) of a parameter group
  are solved in one batched CG (:func:`hbpkit.optim.newton_cg.joint_directions`,
  the same per-block solves), so the exact products of all blocks are all-reduced
  in one coalesced collective per CG iteration; Kronecker factors are all-reduced
  once before the solve. CG then runs the same arithmetic on identical inputs on
  every rank (its dot products act on full, replicated vectors, so they need no
  reduction of their own), and the ranks take bit-for-bit identical steps.

With ``reduction=None`` the step takes the attached quantities as they are (the
caller has run :func:`hbpkit.distributed.all_reduce_quantities`, e.g. for
shards of different sizes); the inversions are still spread over the ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from hbpkit.curvature.kronecker import KroneckerFactors
from hbpkit.distributed import (
    AllReducedProduct,
    all_reduce_kronecker,
    all_reduce_sum,
    check_initialized,
    shard_weights,
)
from hbpkit.optim.curvatures import loss_of, missing_quantity
from hbpkit.optim.kronecker import KroneckerPreconditioner, damped_inverses
from hbpkit.optim.newton_cg import NewtonCG, joint_directions

REDUCTIONS = ("mean", "sum", None)


def assign_to_ranks(costs: list[float], world_size: int) -> list[int]:
    """Greedy balancing (longest processing time first): the rank of each job."""
    owners = [0] * len(costs)
    load = [0.0] * world_size
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


def _check_reduction(reduction: str | None) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")


def _reduce_kronecker_fields(
    params: list[Tensor], savefield: str, reduction: str, group: dist.ProcessGroup | None
) -> None:
    """Replace ``p.<savefield>`` by the full-batch factors on every parameter that has them."""
    owners = [p for p in params if isinstance(getattr(p, savefield, None), KroneckerFactors)]
    if owners:
        weights = shard_weights(reduction, None, group)
        reduced = all_reduce_kronecker([getattr(p, savefield) for p in owners], weights, group)
        for p, f in zip(owners, reduced):
            setattr(p, savefield, f)


def _params_with_grad(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


class DistributedKroneckerPreconditioner(KroneckerPreconditioner):
    """:class:`~hbpkit.optim.KroneckerPreconditioner` with factors reduced and inversions spread.

    Same arguments, plus:

    Args:
        reduction: the loss module's reduction (``"mean"`` or ``"sum"``): the factors
            are all-reduced over ranks at each step (shards of equal size); ``None``:
            they already are.
        group: the process group (default: the world).

    Every rank of ``group`` must call :meth:`step` (a collective). After it,
    ``p.<savefield>`` holds the full-batch factors.
    """

    def __init__(
        self,
        params: Iterable,
        curvature: str = "kfac",
        lr: float = 0.1,
        damping: float = 1e-3,
        update_every: int = 1,
        momentum: float = 0.0,
        ema: float = 0.95,
        extension: Any = None,
        reduction: str | None = "mean",
        group: dist.ProcessGroup | None = None,
    ) -> None:
        check_initialized()
        _check_reduction(reduction)
        self.reduction = reduction
        self.group = group
        super().__init__(params, curvature, lr, damping, update_every, momentum, ema, extension)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Reduce the factors over ranks, then the single-process step."""
        loss = loss_of(closure)
        if self.reduction is not None:
            savefield = self.curvature_spec.savefield
            _reduce_kronecker_fields(_params_with_grad(self), savefield, self.reduction, self.group)
        super().step()
        return loss

    def _refresh_inverses(self, due: list[tuple[dict, Tensor]]) -> None:
        """Each rank inverts its share of ``due`` (balanced by ``dim**3``), then broadcasts."""
        R = dist.get_world_size(self.group)
        me = dist.get_rank(self.group)
        costs = [float(sum(f.shape[0] ** 3 for f in self.state[p]["factors"])) for _, p in due]
        owners = assign_to_ranks(costs, R)
        mine = [i for i, owner in enumerate(owners) if owner == me]
        for i in mine:
            group, p = due[i]
            self.state[p]["inverses"] = damped_inverses(self.state[p]["factors"], group["damping"])
        for rank in range(R):
            jobs = [i for i, owner in enumerate(owners) if owner == rank]
            if not jobs:
                continue
            shapes = [[f.shape for f in self.state[due[i][1]]["factors"]] for i in jobs]
            ref = self.state[due[jobs[0]][1]]["factors"][0]
            numel = sum(s.numel() for job in shapes for s in job)
            if rank == me:
                flat = torch.cat(
                    [inv.reshape(-1) for i in jobs for inv in self.state[due[i][1]]["inverses"]]
                )
            else:
                flat = torch.empty(numel, dtype=ref.dtype, device=ref.device)
            src = dist.get_global_rank(self.group, rank) if self.group is not None else rank
            dist.broadcast(flat, src=src, group=self.group)
            # the owner too takes the (contiguous) broadcast copies: the memory layout of
            # an inverse changes the rounding of the matmuls, and the ranks must agree bitwise
            chunks = iter(flat.split([s.numel() for job in shapes for s in job]))
            for i, job in zip(jobs, shapes):
                self.state[due[i][1]]["inverses"] = [next(chunks).view(s).clone() for s in job]


class DistributedNewtonCG(NewtonCG):
    """:class:`~hbpkit.optim.NewtonCG` whose curvature is the full batch's on every rank.

    Same arguments, plus:

    Args:
        reduction: the loss module's reduction (``"mean"`` or ``"sum"``): exact
            products are all-reduced (weight ``w_r``), Kronecker factors reduced,
            for shards of equal size; ``None``: the quantities already are
            (:func:`hbpkit.distributed.all_reduce_quantities`).
        group: the process group (default: the world).

    Every rank of ``group`` must call :meth:`step` (a collective).
    """

    def __init__(
        self,
        params: Iterable,
        curvature: str = "ggn",
        lr: float = 0.1,
        damping: float = 1e-2,
        cg_maxiter: int = 50,
        cg_tol: float = 0.1,
        cg_atol: float = 0.0,
        block_split: int = 1,
        extension: Any = None,
        reduction: str | None = "mean",
        group: dist.ProcessGroup | None = None,
    ) -> None:
        check_initialized()
        _check_reduction(reduction)
        self.reduction = reduction
        self.group = group
        super().__init__(
            params, curvature, lr, damping, cg_maxiter, cg_tol, cg_atol, block_split, extension
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One damped Newton step per block, all blocks of a group in one batched CG."""
        loss = loss_of(closure)
        savefield = self.curvature_spec.savefield
        kronecker = self.curvature_spec.kronecker
        # read and check every quantity first: a bad one raises before a collective
        solves = []
        for g_idx, group in enumerate(self.param_groups):
            blocks = []
            for p_idx, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                quantity = getattr(p, savefield, None)
                if quantity is None:
                    raise missing_quantity(
                        f"{p_idx} of group {g_idx} (shape {tuple(p.shape)})", savefield
                    )
                if self.reduction is not None and isinstance(quantity, AllReducedProduct):
                    raise ValueError(
                        f"p.{savefield} is already all-reduced: pass reduction=None to "
                        "DistributedNewtonCG, or do not call all_reduce_quantities before step()"
                    )
                blocks.append((p, self._product(quantity, savefield)))
            if blocks:
                solves.append((group, blocks))
        if self.reduction is not None and kronecker:
            params = [p for _, blocks in solves for p, _ in blocks]
            _reduce_kronecker_fields(params, savefield, self.reduction, self.group)
            solves = [
                (group, [(p, getattr(p, savefield).mv) for p, _ in blocks])
                for group, blocks in solves
            ]
        combine = None
        if self.reduction is not None and not kronecker:  # one all-reduce per CG iteration
            weight = shard_weights(self.reduction, None, self.group).loss

            def combine(products: list[Tensor]) -> list[Tensor]:
                return all_reduce_sum([CV * weight for CV in products], self.group)

        for group, blocks in solves:
            directions, info = joint_directions(blocks, group, combine)
            start = 0
            for (p, _), d in zip(blocks, directions):
                k = min(group["block_split"], p.numel())
                state = self.state[p]
                state["cg_iterations"] = info.iterations[start : start + k]
                state["cg_converged"] = info.converged[start : start + k]
                start += k
                p.add_(d, alpha=group["lr"])
        return loss
