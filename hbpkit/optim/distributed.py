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
  rank), each rank inverts its share with the group's ``damping_mode`` and the
  inverses are all-gathered, as distributed K-FAC implementations do (Osawa et al.
  2019, Pauloski et al. 2020).
* :class:`DistributedNewtonCG`: all blocks (and sub-blocks) of a parameter group
  are solved in one batched CG (:func:`hbpkit.optim.newton_cg.joint_directions`,
  the same per-block solves), so the exact products of all blocks are all-reduced
  in one coalesced collective per CG iteration; Kronecker factors are all-reduced
  once before the solve. CG then runs the same arithmetic on identical inputs on
  every rank (its dot products act on full, replicated vectors, so they need no
  reduction of their own), and the ranks take bit-for-bit identical steps.

Both are wrappers: they take ``reduction`` and ``group`` (keyword-only) and forward
every other argument to their single-process parent, so each option of the parent
works here and gives the same step.

With ``reduction=None`` the step takes the attached quantities as they are (the
caller has run :func:`hbpkit.distributed.all_reduce_quantities`, e.g. for
shards of different sizes); the inversions are still spread over the ranks.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from hbpkit.collectives import (
    AllReducedProduct,
    all_gather_batch,
    all_reduce_kronecker,
    all_reduce_sum,
    check_initialized,
    count_device,
    shard_weights,
)
from hbpkit.curvature.kronecker import KroneckerFactors
from hbpkit.optim.curvatures import iter_quantities, loss_of
from hbpkit.optim.kronecker import DAMPING_MODES, KroneckerPreconditioner
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


def _wrapper_signature(parent: type) -> inspect.Signature:
    """``parent.__init__``'s signature plus the keyword-only ``reduction`` and ``group``."""
    params = list(inspect.signature(parent.__init__).parameters.values())[1:]  # no self
    extra = [
        inspect.Parameter("reduction", inspect.Parameter.KEYWORD_ONLY, default="mean"),
        inspect.Parameter("group", inspect.Parameter.KEYWORD_ONLY, default=None),
    ]
    return inspect.Signature(params + extra)


class _Distributed:
    """Mixin of the wrappers: ``reduction`` and ``group`` taken, everything else forwarded.

    The parent's arguments (positional or keyword, every option it has now or gains
    later) go to the parent's ``__init__`` unchanged.
    """

    def __init__(
        self,
        params: Iterable,
        *args: Any,
        reduction: str | None = "mean",
        group: dist.ProcessGroup | None = None,
        **kwargs: Any,
    ) -> None:
        check_initialized()
        _check_reduction(reduction)
        self.reduction = reduction
        self.group = group
        super().__init__(params, *args, **kwargs)


def _inverse_layout(inverses: list[Tensor]) -> list[int]:
    """``[count, ndim_0, *shape_0, ndim_1, *shape_1, ...]``: how to cut a flat copy back."""
    layout = [len(inverses)]
    for inv in inverses:
        layout += [inv.dim(), *inv.shape]
    return layout


def _read_layout(layout: list[int], start: int) -> tuple[list[torch.Size], int]:
    """The shapes one :func:`_inverse_layout` at ``layout[start:]`` lists, and where it ends."""
    count, i, shapes = layout[start], start + 1, []
    for _ in range(count):
        ndim = layout[i]
        shapes.append(torch.Size(layout[i + 1 : i + 1 + ndim]))
        i += 1 + ndim
    return shapes, i


class DistributedKroneckerPreconditioner(_Distributed, KroneckerPreconditioner):
    """:class:`~hbpkit.optim.KroneckerPreconditioner` with factors reduced and inversions spread.

    Takes every argument of :class:`~hbpkit.optim.KroneckerPreconditioner` (forwarded
    to it: ``curvature``, ``lr``, ``damping``, ``update_every``, ``momentum``, ``ema``,
    ``extension``, ``damping_mode``, per-group overrides), plus, keyword-only:

    Args:
        reduction: the loss module's reduction (``"mean"`` or ``"sum"``): the factors
            are all-reduced over ranks at each step (shards of equal size); ``None``:
            they already are.
        group: the process group (default: the world).

    Every rank of ``group`` must call :meth:`step` (a collective). After it,
    ``p.<savefield>`` holds the full-batch factors. The inversions of any
    ``damping_mode`` are spread over the ranks: each rank runs the mode's inversion
    (``DAMPING_MODES``) on its share of the layers and the results are gathered,
    whatever tensors that mode keeps.
    """

    __signature__ = _wrapper_signature(KroneckerPreconditioner)

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
        """Each rank inverts its share of ``due`` (balanced by ``dim**3``), then all gather.

        Two gathers in all: the layouts (how many tensors of which shapes each
        inversion produced, so any damping mode works) and the flat inverses. Every
        rank, the owner included, takes the gathered copies: the memory layout of an
        inverse changes the rounding of the matmuls, and the ranks must agree bitwise.
        """
        R = dist.get_world_size(self.group)
        me = dist.get_rank(self.group)
        costs = [  # a grouped factor [g, n, n] costs g n^3
            float(sum(f[..., 0, 0].numel() * f.shape[-1] ** 3 for f in self.state[p]["factors"]))
            for _, p in due
        ]
        owners = assign_to_ranks(costs, R)
        mine = [i for i, owner in enumerate(owners) if owner == me]
        dtype = due[0][1].dtype
        for _, p in due:
            for f in self.state[p]["factors"]:
                dtype = torch.promote_types(dtype, f.dtype)
        device = self.state[due[0][1]]["factors"][0].device
        layout: list[int] = []
        flat = []
        for i in mine:
            group, p = due[i]
            invert = DAMPING_MODES[group.get("damping_mode", "factored")]
            inverses = invert(self.state[p]["factors"], group["damping"])
            layout += _inverse_layout(inverses)
            flat += [inv.reshape(-1).to(dtype) for inv in inverses]
        layouts = all_gather_batch(
            torch.tensor(layout, dtype=torch.long, device=count_device(self.group)), self.group
        ).tolist()
        values = all_gather_batch(
            torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device), self.group
        )
        # both gathers are in rank order, and each rank's jobs in the order of ``due``
        at_layout, at_value = 0, 0
        for rank in range(R):
            for i in (i for i, owner in enumerate(owners) if owner == rank):
                state = self.state[due[i][1]]
                shapes, at_layout = _read_layout(layouts, at_layout)
                inverses = []
                for shape in shapes:
                    chunk = values[at_value : at_value + shape.numel()].view(shape)
                    inverses.append(chunk.to(state["factors"][0].dtype).clone())
                    at_value += shape.numel()
                state["inverses"] = inverses


class DistributedNewtonCG(_Distributed, NewtonCG):
    """:class:`~hbpkit.optim.NewtonCG` whose curvature is the full batch's on every rank.

    Takes every argument of :class:`~hbpkit.optim.NewtonCG` (forwarded to it:
    ``curvature``, ``lr``, ``damping``, ``cg_maxiter``, ``cg_tol``, ``cg_atol``,
    ``block_split``, ``extension``, per-group overrides), plus, keyword-only:

    Args:
        reduction: the loss module's reduction (``"mean"`` or ``"sum"``): exact
            products are all-reduced (weight ``w_r``), Kronecker factors reduced,
            for shards of equal size; ``None``: the quantities already are
            (:func:`hbpkit.distributed.all_reduce_quantities`).
        group: the process group (default: the world).

    Every rank of ``group`` must call :meth:`step` (a collective).
    """

    __signature__ = _wrapper_signature(NewtonCG)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One damped Newton step per block, all blocks of a group in one batched CG."""
        loss = loss_of(closure)
        savefield = self.curvature_spec.savefield
        kronecker = self.curvature_spec.kronecker
        # read and check every quantity first: a bad one raises before a collective
        solves = []
        for group, p, quantity in iter_quantities(self.param_groups, savefield):
            if self.reduction is not None and isinstance(quantity, AllReducedProduct):
                raise ValueError(
                    f"p.{savefield} is already all-reduced: pass reduction=None to "
                    "DistributedNewtonCG, or do not call all_reduce_quantities before step()"
                )
            if not solves or solves[-1][0] is not group:  # the blocks of one group together
                solves.append((group, []))
            solves[-1][1].append((p, self._product(quantity, savefield)))
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
