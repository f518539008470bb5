"""Batched conjugate gradients for the damped curvature systems of the optimizers.

:func:`cg` solves ``K`` independent symmetric positive-definite systems
``A_k x_k = b_k`` at once, ``b`` of shape ``[K, *S]`` (typically ``S = p.shape``),
given only the product ``matvec: [K, *S] -> [K, *S]`` that multiplies slice ``k``
by ``A_k``. Each system keeps its own step sizes and stops on its own.

Convergence criterion (the relative tolerance ``eps_CG`` of the HBP paper,
supplement section E, in the form of ``scipy.sparse.linalg.cg``): system ``k``
has converged once ``||r_k|| <= max(tol * ||b_k||, atol)``, with
``r_k = b_k - A_k x_k`` and ``x_0 = 0`` unless ``x0`` is given. At most
``maxiter`` products are taken (``n_CG``); a system that has not converged by
then returns its last iterate.

Curvature that is not positive definite (the Hessian, or a damping too small for
it): if a search direction ``p`` gives ``p^T A p <= 0``, that system stops with
its current iterate, as truncated Newton methods do (Nocedal and Wright,
Algorithm 7.1); if this happens at the first iteration, it returns ``b`` (for
the Newton system ``(C + damping I) d = -g`` the gradient-descent direction).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


class CGInfo(NamedTuple):
    """Diagnostics of :func:`cg`, one entry per system.

    Attributes:
        iterations: ``[K]`` number of products each system used.
        converged: ``[K]`` whether the tolerance was reached.
        residual_norm: ``[K]`` ``||b_k - A_k x_k||`` as tracked by the recursion.
        negative_curvature: ``[K]`` whether the system stopped on ``p^T A p <= 0``.
    """

    iterations: Tensor
    converged: Tensor
    residual_norm: Tensor
    negative_curvature: Tensor


def _dot(u: Tensor, v: Tensor) -> Tensor:
    """Slice-wise inner products ``[K, *S] x [K, *S] -> [K]``."""
    return (u * v).flatten(start_dim=1).sum(1)


def _bcast(s: Tensor, like: Tensor) -> Tensor:
    """``[K]`` -> ``[K, 1, ..., 1]`` to broadcast against ``like``."""
    return s.reshape(-1, *([1] * (like.dim() - 1)))


def cg(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    maxiter: int | None = None,
    tol: float = 1e-5,
    atol: float = 0.0,
    x0: Tensor | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, CGInfo]:
    """Solve ``K`` SPD systems ``A_k x_k = b_k`` by conjugate gradients.

    Args:
        matvec: ``V [K, *S] -> [K, *S]``, slice ``k`` multiplied by ``A_k``. It is
            called once before the loop if ``x0`` is given, then once per iteration
            on all ``K`` slices (those of finished systems are zero).
        b: right-hand sides ``[K, *S]`` (``K >= 1``; use ``b[None]`` for one system).
        maxiter: maximum number of iterations (products) per system; default
            ``b[0].numel()``, where exact arithmetic has converged.
        tol: relative tolerance, ``||r_k|| <= tol * ||b_k||`` (the paper's ``eps_CG``).
        atol: absolute tolerance; a system stops at ``max(tol ||b_k||, atol)``.
        x0: initial guess ``[K, *S]``; default zeros.
        return_info: also return a :class:`CGInfo`.

    Returns:
        ``x`` of the shape of ``b``, or ``(x, info)`` with ``return_info=True``.
    """
    if b.dim() < 2:
        raise ValueError(f"b must be batched as [K, *S] with K >= 1, got shape {tuple(b.shape)}")
    if maxiter is None:
        maxiter = b[0].numel()
    if maxiter < 0 or tol < 0 or atol < 0:
        raise ValueError("maxiter, tol and atol must be non-negative")
    K = b.shape[0]
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        if x0.shape != b.shape:
            raise ValueError(f"x0 has shape {tuple(x0.shape)}, b has {tuple(b.shape)}")
        x = x0.clone()
        r = b - matvec(x)
    threshold = torch.clamp(tol * _dot(b, b).sqrt(), min=atol)
    rr = _dot(r, r)
    active = rr.sqrt() > threshold
    converged = ~active
    negative = torch.zeros(K, dtype=torch.bool, device=b.device)
    iterations = torch.zeros(K, dtype=torch.long, device=b.device)
    p = r.clone()
    for _ in range(maxiter):
        if not bool(active.any()):
            break
        p = p * _bcast(active, p)  # finished systems contribute zero slices
        Ap = matvec(p)
        iterations += active
        pAp = _dot(p, Ap)
        bad = active & (pAp <= 0)
        if bool(bad.any()):
            first = bad & (iterations == 1)
            x = torch.where(_bcast(first, x), b, x)
            negative |= bad
            active = active & ~bad
        alpha = torch.where(active, rr / torch.where(active, pAp, torch.ones_like(pAp)), 0.0)
        x = x + _bcast(alpha, x) * p
        r = r - _bcast(alpha, r) * Ap
        rr_new = _dot(r, r)
        done = active & (rr_new.sqrt() <= threshold)
        converged |= done
        beta = torch.where(active, rr_new / torch.where(active, rr, torch.ones_like(rr)), 0.0)
        p = r + _bcast(beta, p) * p
        rr = torch.where(active, rr_new, rr)
        active = active & ~done
    if not return_info:
        return x
    return x, CGInfo(iterations, converged, rr.sqrt(), negative)
