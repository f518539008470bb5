"""Per-sample curvature factors: the representations the backward pass carries.

Shapes: ``N`` is the batch size, ``V`` the number of columns of a symmetric
factorisation, ``*features`` the feature shape of the tensor the curvature is
about. A *sqrt factor* ``S`` ``[V, N, *features]`` with signs ``sign`` (``[V, N]``
or ``None`` for all ``+1``) represents the per-sample curvature
``sum_v sign[v, n] S[v, n] S[v, n]^T`` (eq. 7 of the paper in factored form).
Local factors through convolutions live in :mod:`hbpkit.curvature.local`,
batch-averaged position blocks in :mod:`hbpkit.curvature.blocks`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from hbpkit.core.calls import ModuleCall


class SqrtFactor(NamedTuple):
    """Per-sample curvature ``sum_v sign[v,n] S[v,n] S[v,n]^T``.

    ``S``: ``[V, N, *features]``; ``sign``: ``[V, N]`` of ``+-1`` or ``None`` (all +1).
    """

    S: Tensor
    sign: Tensor | None = None

    def signed_square(self) -> Tensor:
        """``sign * S**2``, shape ``[V, N, *features]``."""
        sq = self.S.square()
        return sq if self.sign is None else sq * _expand_like(self.sign, sq)

    def signed(self) -> Tensor:
        """``sign * S``, shape ``[V, N, *features]``."""
        return self.S if self.sign is None else self.S * _expand_like(self.sign, self.S)


class DiagonalFactor(NamedTuple):
    """Per-sample curvature ``diag[sign[n] * s[n]**2]``, a sqrt factor kept diagonal.

    The residual of an elementwise module (S.9) enters the backward pass in this
    form; it stays diagonal through elementwise modules and reshapes and is
    expanded to a dense :class:`SqrtFactor` only where a module mixes features.
    ``s``: ``[N, *features]``; ``sign``: ``[N, *features]`` of ``+-1`` or ``None`` (all +1).
    """

    s: Tensor
    sign: Tensor | None = None

    @staticmethod
    def from_values(diag: Tensor) -> DiagonalFactor:
        """The factor of ``diag[diag[n]]``; ``diag``: ``[N, *features]``."""
        sign = None if bool((diag >= 0).all()) else torch.sign(diag)
        return DiagonalFactor(diag.abs().sqrt(), sign)

    def signed_square(self) -> Tensor:
        """``sign * s**2``, the diagonal per sample, ``[N, *features]``."""
        sq = self.s.square()
        return sq if self.sign is None else sq * self.sign

    def dense(self) -> SqrtFactor:
        """The same curvature as a dense factor, ``S``: ``[D, N, *features]``."""
        N, features = self.s.shape[0], self.s.shape[1:]
        flat = self.s.reshape(N, -1)
        D = flat.shape[1]
        S = torch.diag_embed(flat).permute(2, 0, 1).reshape(D, N, *features)
        sign = None if self.sign is None else self.sign.reshape(N, D).T
        return SqrtFactor(S, sign)


Factor = SqrtFactor | DiagonalFactor  # and LocalFactor (hbpkit/curvature/local.py)


CURVATURE_OPTIONS = ("ggn", "hessian", "pch-abs", "pch-clip")


def modify_eigenvalues(values: Tensor, curvature: str) -> Tensor | None:
    """Eigenvalues of a residual as the curvature option keeps them (PCH: Chen et al. 2018).

    ``None`` (dropped, the GGN), unchanged (Hessian), ``|l|`` (``"pch-abs"``) or
    ``max(l, 0)`` (``"pch-clip"``). For a diagonal residual the eigenvalues are its
    entries, so this is also the elementwise modification of S.9's ``phi''(x) * dz``.
    """
    if curvature == "ggn":
        return None
    if curvature == "hessian":
        return values
    if curvature == "pch-abs":
        return values.abs()
    if curvature == "pch-clip":
        return values.clamp(min=0)
    raise ValueError(f"unknown curvature {curvature!r}; choose from {CURVATURE_OPTIONS}")


class DiagonalResidual:
    """``[K, N, *in] -> [K, N, *in]``: a per-sample diagonal residual ``r * m`` (S.9)."""

    __slots__ = ("r",)

    def __init__(self, r: Tensor) -> None:
        self.r = r

    def __call__(self, mat: Tensor) -> Tensor:
        return self.r * mat

    __mul__ = __call__  # ``residual * m``, as code written for residual tensors applies it


def _expand_like(sign: Tensor, t: Tensor) -> Tensor:
    return sign.reshape(*sign.shape, *([1] * (t.dim() - 2)))


def add_factors(a: Factor, b: Factor, where: ModuleCall) -> Factor:
    """The factor of the summed Jacobians: ``(J_a + J_b)^T S`` from ``J_a^T S`` and ``J_b^T S``.

    Both come from one origin along two paths, so their columns (and signs) match.
    Local factors (:mod:`hbpkit.curvature.local`) are made dense first.
    """
    a, b = (f if isinstance(f, (SqrtFactor, DiagonalFactor)) else f.to_dense(where) for f in (a, b))
    if isinstance(a, DiagonalFactor) and isinstance(b, DiagonalFactor):
        if a.s.shape == b.s.shape and _same_sign(a.sign, b.sign):
            return DiagonalFactor(a.s + b.s, a.sign)
    a = a.dense() if isinstance(a, DiagonalFactor) else a
    b = b.dense() if isinstance(b, DiagonalFactor) else b
    if a.S.shape != b.S.shape or not _same_sign(a.sign, b.sign):
        raise NotImplementedError(
            f"the curvature factors that reach the output of {type(where.module).__name__} along "
            f"two paths do not line up (shapes {tuple(a.S.shape)} and {tuple(b.S.shape)}): "
            "a padding or pooling layer inside one branch of a residual block changes the "
            "diagonal factors' layout; use DiagGGNExact/KFLR (no residual factors) there"
        )
    return SqrtFactor(a.S + b.S, a.sign)


def _same_sign(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a is b or torch.equal(a, b)
