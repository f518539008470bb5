"""Newton-CG on block-diagonal curvature: the optimizer of the HBP paper's experiments.

For every parameter block ``p`` (and, with ``block_split=k``, every one of ``k``
sub-blocks of it) solve ``(C + damping I) d = -g`` by conjugate gradients, then
``p <- p + lr * d`` (supplement section E: ``lr`` is ``gamma``, ``damping`` is
``alpha``, ``cg_maxiter`` is ``n_CG``, ``cg_tol`` is ``eps_CG``).

``C`` is the block the extensions attached to ``p``:

* ``curvature="ggn" | "hessian" | "pch-abs" | "pch-clip"``: the exact block, through
  the product function ``p.ggnmp`` / ``p.hmp`` / ``p.pchmp`` of ``GGNMP()``,
  ``HMP()``, ``PCHMP(modify="abs" | "clip")`` (``V [K, *p.shape] -> [K, *p.shape]``);
* ``curvature="kfac" | "kflr" | "kfra" | "hbp"``: a Kronecker-factored block,
  multiplied with ``p.<savefield>.mv``.

Block splitting (the paper's figure 4): the coordinates of ``p.flatten()`` are
cut into ``block_split`` contiguous chunks (sizes differ by at most one, as
``torch.tensor_split``); chunk ``i`` solves its own system with the diagonal
sub-block ``C_ii``, i.e. products restricted to the chunk (``V`` zero outside
it, only the chunk's rows of ``C V`` kept). The chunks run as one batched CG,
each with its own step sizes and stopping test.

:func:`joint_directions` solves the sub-blocks of several parameters in one
batched CG (the same solutions); :class:`hbpkit.optim.distributed.DistributedNewtonCG`
uses it to all-reduce the products of all blocks in one collective per iteration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from hbpkit.optim.cg import CGInfo, cg
from hbpkit.optim.curvatures import (
    CURVATURES,
    CurvatureOptimizer,
    iter_quantities,
    loss_of,
)


class NewtonCG(CurvatureOptimizer):
    """Per-block damped Newton steps solved by conjugate gradients.

    Training loop::

        opt = NewtonCG(model.parameters(), curvature="ggn", lr=0.1, damping=1e-3)
        loss = loss_fn(model(X), y)
        opt.zero_grad()
        with backprop(*opt.extensions):
            loss.backward()
        opt.step()

    Args:
        params: parameters or parameter groups (groups may override ``lr``,
            ``damping``, ``cg_maxiter``, ``cg_tol``, ``cg_atol``, ``block_split``).
        curvature: ``"ggn"``, ``"hessian"``, ``"pch-abs"``, ``"pch-clip"`` (exact
            products) or ``"kfac"``, ``"kflr"``, ``"kfra"``, ``"hbp"`` (Kronecker factors).
        lr: step size ``gamma`` of ``p <- p + lr * d``.
        damping: ``alpha`` in ``(C + alpha I) d = -g``; positive.
        cg_maxiter: maximum CG iterations per (sub-)block, ``n_CG``.
        cg_tol: relative tolerance ``eps_CG``: stop once ``||r|| <= cg_tol ||g||``
            (``g`` restricted to the sub-block); see :func:`hbpkit.optim.cg.cg`.
        cg_atol: absolute tolerance, stop once ``||r|| <= cg_atol`` (default 0).
        block_split: number of contiguous sub-blocks each parameter block is split
            into (at most ``p.numel()`` are used).
        extension: the hbpkit extension to run instead of the default one for
            ``curvature`` (it must write the same savefield), e.g.
            ``HBP("pch-abs", "average", "batch-average")`` with ``curvature="hbp"``.

    After a step, ``opt.state[p]["cg_iterations"]`` (``[k]``) and
    ``opt.state[p]["cg_converged"]`` (``[k]``) hold each sub-block's CG diagnostics.
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
    ) -> None:
        defaults = dict(
            lr=lr,
            damping=damping,
            cg_maxiter=cg_maxiter,
            cg_tol=cg_tol,
            cg_atol=cg_atol,
            block_split=block_split,
        )
        self._setup(params, curvature, tuple(CURVATURES), extension, defaults)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        if group["cg_maxiter"] < 0 or group["cg_tol"] < 0 or group["cg_atol"] < 0:
            raise ValueError("cg_maxiter, cg_tol and cg_atol must be non-negative")
        split = group["block_split"]
        if isinstance(split, bool) or not isinstance(split, int) or split < 1:
            raise ValueError(f"block_split must be a positive integer, got {split!r}")

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One damped Newton step per parameter block that has a gradient."""
        loss = loss_of(closure)
        savefield = self.curvature_spec.savefield
        # one parameter at a time: p moves before the next quantity is read
        for group, p, quantity in iter_quantities(self.param_groups, savefield):
            product = self._product(quantity, savefield)
            d, info = self._direction(product, p, group)
            state = self.state[p]
            state["cg_iterations"] = info.iterations
            state["cg_converged"] = info.converged
            p.add_(d, alpha=group["lr"])
        return loss

    def _product(self, quantity: Any, savefield: str) -> Callable[[Tensor], Tensor]:
        if self.curvature_spec.kronecker:
            if not hasattr(quantity, "mv"):
                raise TypeError(f"p.{savefield} is not Kronecker factors: got {type(quantity)}")
            return quantity.mv
        if not callable(quantity):
            raise TypeError(
                f"p.{savefield} must be a function V [K, *p.shape] -> [K, *p.shape], "
                f"got {type(quantity)}"
            )
        return quantity

    @staticmethod
    def _direction(product: Callable[[Tensor], Tensor], p: Tensor, group: dict):
        """Solve each sub-block's ``(C_ii + damping I) d_i = -g_i``; ``d`` shaped like ``p``."""
        n = p.numel()
        damping = group["damping"]
        g = p.grad.detach().reshape(1, n)
        mask = _subblock_mask(p, group["block_split"])  # the chunks of p.flatten()
        k = mask.shape[0]

        def matvec(V: Tensor) -> Tensor:
            V = V * mask
            CV = product(V.reshape(k, *p.shape)).reshape(k, n)
            return (CV + damping * V) * mask

        x, info = cg(
            matvec,
            -g * mask,
            maxiter=group["cg_maxiter"],
            tol=group["cg_tol"],
            atol=group["cg_atol"],
            return_info=True,
        )
        return (x * mask).sum(0).reshape(p.shape), info


def _subblock_mask(p: Tensor, block_split: int) -> Tensor:
    """``[k, n]``: row ``i`` is 1 on the coordinates of sub-block ``i`` of ``p.flatten()``."""
    n = p.numel()
    k = min(block_split, n)
    mask = torch.zeros(k, n, dtype=p.dtype, device=p.device)
    for i, idx in enumerate(torch.arange(n, device=p.device).tensor_split(k)):
        mask[i, idx] = 1.0
    return mask


def joint_directions(
    blocks: list[tuple[Tensor, Callable[[Tensor], Tensor]]],
    group: dict,
    combine: Callable[[list[Tensor]], list[Tensor]] | None = None,
) -> tuple[list[Tensor], CGInfo]:
    """:meth:`NewtonCG._direction` for several parameters at once, in one batched CG.

    Every sub-block of every parameter in ``blocks`` (``(p, product)`` pairs) is one
    row of a ``[sum_p k_p, max_p p.numel()]`` system, zero-padded; the rows are
    independent (own step sizes and stopping test), so the solutions are those of
    the per-parameter solves, but each CG iteration calls every ``product`` once,
    and ``combine`` (e.g. one coalesced all-reduce of all the products) once.

    Returns the directions (shaped like each ``p``) and the :class:`CGInfo` of all rows,
    in the order of ``blocks``.
    """
    masks = [_subblock_mask(p, group["block_split"]) for p, _ in blocks]
    width = max(p.numel() for p, _ in blocks)
    rows = [0]
    for mask in masks:
        rows.append(rows[-1] + mask.shape[0])
    p0 = blocks[0][0]
    b = torch.zeros(rows[-1], width, dtype=p0.dtype, device=p0.device)
    for (p, _), mask, r0, r1 in zip(blocks, masks, rows, rows[1:]):
        b[r0:r1, : p.numel()] = -p.grad.detach().reshape(1, -1) * mask

    def matvec(V: Tensor) -> Tensor:
        pieces, products = [], []
        for (p, product), mask, r0, r1 in zip(blocks, masks, rows, rows[1:]):
            Vp = V[r0:r1, : p.numel()] * mask
            pieces.append(Vp)
            products.append(product(Vp.reshape(-1, *p.shape)).reshape(Vp.shape))
        if combine is not None:
            products = combine(products)
        out = torch.zeros_like(V)
        for Vp, CV, mask, r0, r1 in zip(pieces, products, masks, rows, rows[1:]):
            out[r0:r1, : Vp.shape[1]] = (CV + group["damping"] * Vp) * mask
        return out

    x, info = cg(
        matvec,
        b,
        maxiter=group["cg_maxiter"],
        tol=group["cg_tol"],
        atol=group["cg_atol"],
        return_info=True,
    )
    directions = [
        (x[r0:r1, : p.numel()] * mask).sum(0).reshape(p.shape)
        for (p, _), mask, r0, r1 in zip(blocks, masks, rows, rows[1:])
    ]
    return directions, info
