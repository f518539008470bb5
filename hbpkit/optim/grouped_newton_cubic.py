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
definiteness of ``shifted(r)`` is monotone in ``r`` too), so ``D`` is never inverted. The
bisection is geometric (midpoint ``sqrt(lo hi)``), so a root near ``1e-300`` or ``1e300`` is
found to the same relative accuracy as one near 1.

Scaling: ``T -> 2^k T`` (``g_bar``, ``H_bar`` and ``d3`` all times ``2^k``) has the same
minimiser, so a summary whose largest entry is below ``2^-60`` or above ``2^60`` is first
scaled by the power of two (``k`` a multiple of 6) that brings that entry to ``[2^-6, 1)``.
Summaries whose entries are all tiny or subnormal (a saturated network after a diverging
stretch) are then solved like any other, with no rounding from the scaling (multiplying by
a power of two changes no mantissa, and scaling up loses no subnormal bits).

Guards and degenerate summaries (documented choices, not in the paper; each is a test):

* **non-finite entries**: a subset ``s`` with a non-finite ``g_bar_s``, ``d3_s`` or entry in
  row/column ``s`` of ``H_bar`` has no model: ``eta_s = 0`` and the others are solved on the
  model restricted to ``eta_s = 0`` (which involves only finite entries); a
  :class:`DegenerateSummaryWarning` names them;
* **zero direction**: a subset with ``g_bar_s = 0`` and row ``s`` of ``H_bar`` zero gets
  ``eta_s = 0`` and leaves the system (``eta_s = 0`` minimises ``T`` along it; with ``d3_s = 0``
  too, ``T`` does not depend on ``eta_s`` and 0 is the minimum-norm minimiser);
* **vanishing third-order term** (``d3_s = 0`` exactly, e.g. a ReLU network with MSE): the
  subset simply has no cubic term, ``shifted(r)`` needs no ``D^{-1}``. If all subsets have
  ``d3 = 0`` (or ``lambda_int = 0``) the model is the quadratic one and ``eta`` is Newton's
  ``H_bar^{-1} g_bar`` (eq. 8), the limit of the cubic solution as ``d3 -> 0`` when ``H_bar``
  is positive definite. A tiny but non-zero ``d3`` (subnormal included) is a cubic term like
  any other: when it is tiny next to ``H_bar`` and ``g_bar`` and ``H_bar`` is positive
  definite, its effect is below rounding and the solution is Newton's to working precision;
* **flat subsets with non-positive curvature**: if the subsets with ``d3 = 0`` together see
  non-positive curvature (their block ``H_bar_ZZ`` is not positive definite), the cubic model
  is unbounded below along them: they get ``eta = 0`` for this update and the others are
  solved without them;
* **no curvature information**: if no subset is left (``H_bar = 0`` and ``d3 = 0``, where
  ``T`` is linear and unbounded below; or only flat subsets with non-positive curvature; or
  ``H_bar = 0`` with ``lambda_int = 0``), ``eta = 0`` with a
  :class:`DegenerateSummaryWarning`. ``g_bar = 0`` and ``H_bar = 0`` (a zero direction ``u``)
  gives ``eta = 0`` silently: it is the exact minimiser;
* **minimiser beyond the floating-point range**: ``H_bar`` indefinite with a cubic term so
  small that ``||D eta*||`` or ``eta*`` overflows float64 (the limit ``d3 -> 0`` of the
  unbounded case above): no subset gets a step, ``eta = 0``, with a warning;
* the **hard case** (no root above ``r_min`` because ``g_bar`` misses the eigenvector ``v``
  that limits ``r_min``) and the **near-hard case** (the root is ``r_min`` to rounding: an
  indefinite ``H_bar`` with a tiny cubic term, the minimiser of size ``~ 1 / d3``): after the
  bisection ``||D eta|| < r`` at ``r = r_min``. The global minimiser is then (Nesterov and
  Polyak, section 5) ``eta = eta_perp + tau v`` with ``eta_perp`` the solve of
  ``shifted(r_min)`` on the other eigenvectors and ``tau`` setting ``||D eta|| = r_min``
  (of the two roots, the one with the lower ``T``).

With ``lambda_int = 0`` the step is the unregularised ``eta = H_bar^{-1} g_bar`` of eq. 8,
whatever the sign of ``H_bar`` (Cauchy's and Newton's methods, appendix C), least squares if
``H_bar`` is singular. The result is always finite.
"""

from __future__ import annotations

import math
import sys
import warnings

import torch
from torch import Tensor

_BISECTION_STEPS = 200  # geometric: ~11 halvings of the exponent range, then 53 of the mantissa
_TINY = 2.0**-1074  # smallest positive double
_HUGE = sys.float_info.max
_STATIONARY_RTOL = 1e-6  # ||D eta|| this far below r: the root is r_min to rounding (hard case)


class DegenerateSummaryWarning(RuntimeWarning):
    """The summary gives no usable model for some subsets: their learning rates are 0."""


def _is_pd(M: Tensor) -> bool:
    if M.numel() == 0:
        return True
    return bool(torch.isfinite(M).all()) and int(torch.linalg.cholesky_ex(M).info) == 0


def _solve(M: Tensor, b: Tensor) -> Tensor:
    """``M^{-1} b`` for symmetric ``M`` (Cholesky if positive definite, else least squares)."""
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        return torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
    return torch.linalg.lstsq(M, b.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)


def _bisect(predicate, lo: float, hi: float) -> float:
    """Smallest ``r`` in ``(lo, hi]`` with ``predicate(r)``, ``0 < lo``, ``predicate(lo)`` False.

    ``predicate`` is False below its threshold and True above; geometric midpoints while
    ``hi > 2 lo`` (the exponent range), arithmetic ones within a binade (the mantissa).
    """
    for _ in range(_BISECTION_STEPS):
        mid = math.sqrt(lo) * math.sqrt(hi) if hi > 2.0 * lo else 0.5 * (lo + hi)
        if not lo < mid < hi:
            break
        if predicate(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _smallest(predicate, start: float) -> float | None:
    """Smallest ``r > 0`` with ``predicate(r)`` to relative rounding (the smallest double if it
    holds down to there); ``None`` if it does not hold below the largest double (no bracket)."""
    if predicate(start):  # search down: exponents halved, then doubled, for a False point
        hi, step = start, 1.0
        while True:
            lo = max(hi * 2.0 ** max(-step, -1074.0), _TINY)
            if not predicate(lo):
                return _bisect(predicate, lo, hi)
            if lo == _TINY:
                return lo
            hi, step = lo, 2.0 * step
    lo, step = start, 1.0
    while lo < _HUGE:
        hi = _HUGE if step >= 1024 else min(lo * 2.0**step, _HUGE)
        if predicate(hi):
            return _bisect(predicate, lo, hi)
        lo, step = hi, 2.0 * step
    return None


def _scaled_by_power_of_two(tensors: list[Tensor], largest: float) -> list[Tensor]:
    """Each tensor times ``2^k``, ``k`` a multiple of 6 with ``2^k largest`` in ``[2^-6, 1)``.

    A multiple of 6 keeps square and cube roots of scaled entries exact scalings too. Applied
    in two factors: ``2^k`` may be beyond the double range when ``largest`` is subnormal.
    """
    k = -6 * math.ceil(math.frexp(largest)[1] / 6)
    a, b = 2.0 ** (k // 2), 2.0 ** (k - k // 2)
    return [t * a * b for t in tensors]


def _warn(message: str) -> None:
    warnings.warn(f"GroupedNewton: {message}", DegenerateSummaryWarning, stacklevel=3)


def cubic_regularised_lrs(g_bar: Tensor, H_bar: Tensor, d3: Tensor, damping_int: float) -> Tensor:
    """``eta* [S]`` of Method 1 from ``g_bar [S]``, ``H_bar [S, S]``, ``d3 [S]`` (module doc).

    Degenerate summaries (non-finite, subnormal or zero entries, no curvature) have the
    behaviour listed in the module doc; the result is always finite, and the subsets without a
    usable model get 0 (with a :class:`DegenerateSummaryWarning`). Computed in float64 and
    returned in ``g_bar``'s dtype.
    """
    if not damping_int >= 0:
        raise ValueError(f"damping_int must be non-negative, got {damping_int}")
    dtype = g_bar.dtype
    g, H, d3 = g_bar.double(), H_bar.double(), d3.double()
    eta = torch.zeros_like(g)
    finite_H = torch.isfinite(H)
    finite = torch.isfinite(g) & torch.isfinite(d3) & finite_H.all(0) & finite_H.all(1)
    if not finite.all():
        bad = (~finite).nonzero().squeeze(1).tolist()
        _warn(f"non-finite summary entries for subsets {bad}: their learning rates are 0")
        g, d3 = g.where(finite, 0.0), d3.where(finite, 0.0)
        H = H.where(finite[:, None] & finite[None, :], 0.0)
    # subsets with a zero direction leave the system
    active = (g != 0) | (H != 0).any(1)
    if not active.any():
        if (~finite).any():
            _warn("no subset has a finite, non-zero summary: all learning rates are 0")
        return eta.to(dtype)
    largest = max(float(g.abs().max()), float(H.abs().max()), float(d3.abs().max()))
    if not 2.0**-60 <= largest <= 2.0**60:
        g, H, d3 = _scaled_by_power_of_two([g, H, d3], largest)  # T -> 2^k T: same minimiser
    if damping_int == 0:
        idx = active.nonzero().squeeze(1)
        if (H[idx][:, idx] == 0).all():
            _warn("H_bar = 0 without a cubic term: the model is linear, no step")
            return eta.to(dtype)
        eta[idx] = _solve(H[idx][:, idx], g[idx])  # eq. 8, whatever the sign of H_bar
        return _finite_or_zero(eta).to(dtype)
    d = d3.abs().pow(1.0 / 3.0)
    flat = active & (d == 0)
    if flat.any() and not _is_pd(H[flat][:, flat]):
        active &= ~flat  # cubic model unbounded below along them: eta = 0 (module doc)
    idx = active.nonzero().squeeze(1)
    if idx.numel() == 0:
        _warn("the model has no positive curvature along any subset (unbounded below): no step")
        return eta.to(dtype)
    g, H, d = g[idx], H[idx][:, idx], d[idx]
    if (d == 0).all():
        eta[idx] = _solve(H, g)  # no cubic term: Newton's step (eq. 8), H_bar_ZZ is definite
        return _finite_or_zero(eta).to(dtype)
    c = 0.5 * damping_int
    d2 = d * d

    def shifted(r: float) -> Tensor:
        return H + torch.diag((c * r) * d2)

    def phi(r: float) -> float:
        value = float((d * _solve(shifted(r), g)).norm())
        return value if math.isfinite(value) else math.inf

    def definite(r: float) -> bool:
        return _is_pd(shifted(r))

    # r_min: where shifted(r) becomes positive definite (monotone in r)
    r_min = 0.0 if definite(0.0) else _smallest(definite, 1.0)
    if r_min is None:
        _warn("the cubic model's minimiser is beyond the floating-point range: no step")
        return eta.to(dtype)

    def at_or_above_root(r: float) -> bool:  # r - phi(r) is increasing above r_min
        return r > r_min and definite(r) and r >= phi(r)

    if r_min == 0.0 and phi(0.0) == 0.0:
        r = 0.0
    else:
        r = _smallest(at_or_above_root, max(2.0 * r_min, 1.0))
        if r is None:
            _warn("the cubic model's minimiser is beyond the floating-point range: no step")
            return eta.to(dtype)
    solution = _solve(shifted(r), g)
    if r_min > 0 and float((d * solution).norm()) < (1.0 - _STATIONARY_RTOL) * r:
        solution = _hard_case(shifted(r), g, d, r, c)
    eta[idx] = solution
    return _finite_or_zero(eta).to(dtype)


def _hard_case(M: Tensor, g: Tensor, d: Tensor, r: float, c: float) -> Tensor:
    """The global minimiser when the root ``r*`` is ``r_min`` to rounding (module doc).

    ``M = shifted(r)`` is singular to rounding along its lowest eigenvector ``v``: the
    solution is ``eta_perp + tau v`` with ``eta_perp`` the solve on the other eigenvectors and
    ``tau`` setting ``||D eta|| = r`` (two roots of a quadratic; the one with the lower ``T``).
    """
    mu, Q = torch.linalg.eigh(M)
    eta_perp = Q[:, 1:] @ ((Q[:, 1:].T @ g) / mu[1:])
    v = Q[:, 0]
    a, b, c0 = float((d * v).square().sum()), float((d * v) @ (d * eta_perp)), 0.0
    c0 = float((d * eta_perp).square().sum()) - r * r
    if a == 0.0 or not math.isfinite(b * b - a * c0):
        return torch.full_like(g, math.inf)  # beyond the floating-point range
    root = math.sqrt(max(b * b - a * c0, 0.0))
    candidates = [eta_perp + ((-b + sign * root) / a) * v for sign in (1.0, -1.0)]

    def model(eta: Tensor) -> float:  # eq. 36 up to the common cubic term (same ||D eta||)
        return float(-eta @ g + 0.5 * eta @ (M - torch.diag(c * r * d * d)) @ eta)

    return min(candidates, key=model)


def _finite_or_zero(eta: Tensor) -> Tensor:
    if torch.isfinite(eta).all():
        return eta
    _warn("the cubic model's minimiser is beyond the floating-point range: no step")
    return torch.zeros_like(eta)
