"""The per-subset learning rates of GroupedNewton: the anisotropic cubic-regularised solve.

GroupedNewton paper, section 4.2, Method 1 and appendix D: minimise over ``eta [S]``

    T(eta) = -eta^T g_bar + 1/2 eta^T H_bar eta + lambda_int / 6 ||D eta||^3       (eq. 36)

with ``D = Diag(|d3_s|^(1/3))``. Its stationary points solve

    eta = (H_bar + lambda_int / 2 ||D eta|| D^2)^{-1} g_bar                          (eq. 10, 37)

and Method 1 takes the one with the largest ``r = ||D eta||``. Write ``c = lambda_int / 2``
and ``shifted(r) = H_bar + c r D^2``. Where ``shifted(r)`` is positive definite,
``phi(r) = ||D shifted(r)^{-1} g_bar||`` is non-increasing in ``r``
(``d phi^2 / dr = -2 c (D^2 eta)^T shifted(r)^{-1} (D^2 eta) <= 0``), so ``r - phi(r)`` has exactly
one root above ``r_min = inf{r >= 0 : shifted(r) > 0}`` (eqs. 39 and 40: the paper's cases 1 and 2,
``r_min = max(0, -lambda_min(K))`` with ``K = D^{-1} H_bar D^{-1} / c``), and it is the
largest-norm solution. Both ``r_min`` and the root are found by bisection (positive
definiteness of ``shifted(r)`` is monotone in ``r`` too), so ``D`` is never inverted.

Guards (documented choices, not in the paper):

* a subset whose direction is zero (``g_bar_s = 0``, row ``s`` of ``H_bar`` zero) gets
  ``eta_s = 0`` and leaves the system;
* a subset whose third-order term vanishes (``d3_s = 0``, e.g. a ReLU network with MSE)
  simply has no cubic term: ``shifted(r)`` needs no ``D^{-1}``. If those subsets together see
  non-positive curvature (their block ``H_bar_ZZ`` is not positive definite), the cubic
  model is unbounded below along them: they get ``eta = 0`` for this update and the others
  are solved without them;
* the "hard case" (no root above ``r_min`` because ``g_bar`` misses the eigenvector that
  limits ``r_min``) takes ``r = r_min`` and the minimum-norm solution of ``M(r_min)``.

With ``lambda_int = 0`` the step is the unregularised ``eta = H_bar^{-1} g_bar`` (eq. 8;
least squares if ``H_bar`` is singular).
"""

from __future__ import annotations

import torch
from torch import Tensor

_BISECTION_STEPS = 200


def _is_pd(M: Tensor) -> bool:
    return M.numel() == 0 or int(torch.linalg.cholesky_ex(M).info) == 0


def _solve(M: Tensor, b: Tensor) -> Tensor:
    """``M^{-1} b`` for symmetric ``M`` (Cholesky if positive definite, else least squares)."""
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        return torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
    return torch.linalg.lstsq(M, b.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)


def _bisect(predicate, lo: float, hi: float) -> float:
    """Smallest ``r`` in ``[lo, hi]`` with ``predicate(r)`` (False below, True above)."""
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if predicate(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _upper(predicate, start: float) -> float:
    """A value ``>= start`` where ``predicate`` holds, by doubling."""
    hi = max(start, 1.0)
    for _ in range(2000):
        if predicate(hi):
            return hi
        hi *= 2.0
    raise RuntimeError("GroupedNewton: no bracket for the cubic-regularised solve")


def cubic_regularised_lrs(g_bar: Tensor, H_bar: Tensor, d3: Tensor, damping_int: float) -> Tensor:
    """``eta* [S]`` of Method 1 from ``g_bar [S]``, ``H_bar [S, S]``, ``d3 [S]`` (module doc).

    Computed in float64 and returned in ``g_bar``'s dtype.
    """
    if damping_int < 0:
        raise ValueError(f"damping_int must be non-negative, got {damping_int}")
    dtype = g_bar.dtype
    g, H, d3 = g_bar.double(), H_bar.double(), d3.double()
    eta = torch.zeros_like(g)
    # subsets with a zero direction leave the system
    active = (g != 0) | (H.abs().sum(1) != 0)
    d = d3.abs().pow(1.0 / 3.0)
    if damping_int > 0:
        flat = active & (d == 0)
        if flat.any() and not _is_pd(H[flat][:, flat]):
            active &= ~flat  # cubic model unbounded below along them: eta = 0 (module doc)
    idx = active.nonzero().squeeze(1)
    if idx.numel() == 0:
        return eta.to(dtype)
    g, H, d = g[idx], H[idx][:, idx], d[idx]
    if damping_int == 0:
        eta[idx] = _solve(H, g)  # eq. 8
        return eta.to(dtype)
    c = 0.5 * damping_int
    D2 = torch.diag(d * d)

    def shifted(r: float) -> Tensor:
        return H + (c * r) * D2

    def phi(r: float) -> float:
        return float((d * _solve(shifted(r), g)).norm())

    def definite(r: float) -> bool:
        return _is_pd(shifted(r))

    # r_min: where shifted(r) becomes positive definite (monotone in r)
    r_min = 0.0 if definite(0.0) else _bisect(definite, 0.0, _upper(definite, 1.0))

    def at_or_above_root(r: float) -> bool:  # r - phi(r) is increasing above r_min
        return r > r_min and definite(r) and r >= phi(r)

    if r_min == 0.0 and phi(0.0) == 0.0:
        r = 0.0
    else:
        r = _bisect(at_or_above_root, r_min, _upper(at_or_above_root, 2.0 * r_min + 1.0))
    eta[idx] = _solve(shifted(r), g)
    return eta.to(dtype)
