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

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from hbpkit.core.calls import ModuleCall

#: a rule's computation for one form of factor, in ``factor.match(dense=..., diagonal=...)``
Handler = Callable[[Any], Any]


class Jacobian(NamedTuple):
    """A module's transposed Jacobian, as a factor asks for it: ``S_x = J^T S_z`` (eq. 7).

    Every factor backpropagates itself through :meth:`SqrtFactor.jac_t` /
    :meth:`DiagonalFactor.jac_t`, so rules never test a factor's type. ``structure``
    says what a diagonal factor ``diag(s_n)`` may exploit:

    * ``"elementwise"``: ``J_n = diag(d_n)``; ``J^T diag(s) J`` stays ``diag(d s)``;
    * ``"selection"``: every row of ``J`` is one-hot or zero (pooling by index, padding,
      D.2), so ``J^T diag(s^2) J = diag(J^T s^2)`` stays diagonal;
    * ``"shared"``: ``J`` is the same for every sample (a linear layer), so the dense
      factor is the ``D_out`` rows of ``J``, computed once, scaled per sample;
    * ``"general"``: the diagonal factor is made dense first.

    Attributes:
        apply: ``[V, N, *out] -> [V, N, *in]``, ``J_n^T M[v, n]``.
        structure: one of the four above.
        check_densify: called with ``(N, dtype)`` before a diagonal factor is made dense
            (a memory-budget check that raises), or ``None``.
        rows: see below.

    Parameter rules that have a cheaper path for some representation ask the factor to
    choose it: ``factor.match(dense=..., diagonal=..., local=...)`` calls the handler of
    the factor's own form (a missing ``diagonal`` handler gets the factor made dense).
    """

    apply: Callable[[Tensor], Tensor]
    structure: str = "general"
    check_densify: Callable[[int, torch.dtype], None] | None = None
    rows: Callable[[], Tensor] | None = None
    """For ``"shared"``: the rows of ``J`` ``[D_out, *in]``, where cheaper than applying
    ``J^T`` to the identity (a ``Linear`` layer's weight)."""


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

    def signed_square_sum(self) -> Tensor:
        """``sum_v sign S**2``, the diagonal of the curvature per sample, ``[N, *features]``."""
        return self.signed_square().sum(0)

    def dense(self) -> SqrtFactor:
        """This factor (already dense)."""
        return self

    def match(
        self, dense: Handler, diagonal: Handler | None = None, local: Handler | None = None
    ) -> Any:
        """``dense(self)``: the handler of this factor's form (see :class:`Jacobian`)."""
        return dense(self)

    def jac_t(self, jac: Jacobian) -> SqrtFactor:
        """``J^T S`` (eq. 7 without the residual), ``[V, N, *in]``."""
        return SqrtFactor(jac.apply(self.S), self.sign)


class CoupledFactor(SqrtFactor):
    """Curvature whose columns span the whole batch: behind a BatchNorm in train mode.

    With batch statistics every output of a ``BatchNorm`` depends on every sample's
    input, so ``J^T`` of the batch map sends a column that lives on one sample to a
    vector over all samples. ``S`` ``[C, N, *features]``: column ``c`` is one vector over
    the batch, ``S[c, m]`` its part on sample ``m``; ``sign`` ``[C, N]`` (the same for
    every ``m``) or ``None``. It represents the batch curvature ``sum_c sign_c s_c s_c^T``
    (``[N D, N D]``, not block diagonal over samples). A per-sample factor ``[V, N]`` is
    the coupled factor whose column ``(v, n)`` (index ``v N + n``) is zero except on
    sample ``n`` (:func:`couple`).

    Rules see it as a :class:`SqrtFactor` whose ``J^T`` (any per-sample map, applied to
    every column and sample) keeps it coupled; a parameter derivative sums its columns
    over the samples before squaring (``hbpkit.extensions.diagonal``), Kronecker factors
    read its columns as extra samples (docs/user-guide.md, "BatchNorm in train mode").
    """

    __slots__ = ()

    def jac_t(self, jac: Jacobian) -> CoupledFactor:
        """``J^T S`` per column and sample, still coupled."""
        return CoupledFactor(jac.apply(self.S), self.sign)

    def column_signs(self) -> Tensor | None:
        """``[C]``: the sign of each column (``None``: all ``+1``)."""
        return None if self.sign is None else self.sign[:, 0]


def couple(factor: Factor) -> CoupledFactor:
    """``factor`` as a :class:`CoupledFactor`: column ``(v, n)`` (index ``v N + n``) is
    ``S[v, n]`` on sample ``n`` and zero on the others, ``[V N, N, *features]``."""
    if isinstance(factor, CoupledFactor):
        return factor
    if not isinstance(factor, (SqrtFactor, DiagonalFactor)):
        raise TypeError(f"cannot couple a {type(factor).__name__}: make it dense first")
    f = factor.dense()
    V, N, features = f.S.shape[0], f.S.shape[1], f.S.shape[2:]
    flat = f.S.reshape(V, N, -1)
    S = flat.new_zeros(V, N, N, flat.shape[-1])
    index = torch.arange(N, device=flat.device)
    S[:, index, index] = flat
    sign = None if f.sign is None else f.sign.reshape(V * N, 1).expand(V * N, N)
    return CoupledFactor(S.reshape(V * N, N, *features), sign)


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
        """The factor of ``diag[diag[n]]``; ``diag``: ``[N, *features]``.

        On the CPU the signs are dropped where all are ``+1``; on other devices they are
        always kept, since testing them would wait for the device in every module's hook.
        """
        if diag.device.type == "cpu" and bool((diag >= 0).all()):
            return DiagonalFactor(diag.abs().sqrt())
        return DiagonalFactor(diag.abs().sqrt(), torch.sign(diag))

    def signed_square(self) -> Tensor:
        """``sign * s**2``, the diagonal per sample, ``[N, *features]``."""
        sq = self.s.square()
        return sq if self.sign is None else sq * self.sign

    def signed_square_sum(self) -> Tensor:
        """The diagonal per sample, ``[N, *features]`` (one column per entry: no sum)."""
        return self.signed_square()

    def match(
        self, dense: Handler, diagonal: Handler | None = None, local: Handler | None = None
    ) -> Any:
        """``diagonal(self)``, or ``dense`` of the dense form where no diagonal handler is given."""
        return dense(self.dense()) if diagonal is None else diagonal(self)

    def jac_t(self, jac: Jacobian) -> DiagonalFactor | SqrtFactor:
        """``J^T diag(s)``, diagonal where ``jac.structure`` keeps it so, else dense."""
        s = self.s
        if jac.structure == "elementwise":
            out = jac.apply(s.unsqueeze(0)).squeeze(0)
            return DiagonalFactor(out, None if self.sign is None else self.sign.reshape(out.shape))
        if jac.structure == "selection":  # D.2: Pi^T diag(d) Pi = diag(Pi^T d)
            return DiagonalFactor.from_values(jac.apply(self.signed_square().unsqueeze(0))[0])
        if jac.check_densify is not None:
            jac.check_densify(s.shape[0], s.dtype)
        if jac.structure == "shared":  # column j of J^T diag(s_n) is s_n[j] times row j of J
            N, features = s.shape[0], s.shape[1:]
            D = features.numel()
            if jac.rows is not None:
                rows = jac.rows().unsqueeze(1)  # [D, 1, *in]
            else:
                basis = torch.eye(D, dtype=s.dtype, device=s.device).reshape(D, 1, *features)
                rows = jac.apply(basis)  # [D, 1, *in]
            scale = s.reshape(N, D).T.reshape(D, N, *([1] * (rows.dim() - 2)))
            sign = None if self.sign is None else self.sign.reshape(N, D).T
            return SqrtFactor(rows * scale, sign)
        return self.dense().jac_t(jac)

    def dense(self) -> SqrtFactor:
        """The same curvature as a dense factor, ``S``: ``[D, N, *features]``."""
        N, features = self.s.shape[0], self.s.shape[1:]
        flat = self.s.reshape(N, -1)
        D = flat.shape[1]
        S = torch.diag_embed(flat).permute(2, 0, 1).reshape(D, N, *features)
        sign = None if self.sign is None else self.sign.reshape(N, D).T
        return SqrtFactor(S, sign)


#: and LocalFactor (hbpkit/curvature/local.py); a CoupledFactor is a SqrtFactor
Factor = SqrtFactor | DiagonalFactor


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
    if isinstance(a, CoupledFactor) or isinstance(b, CoupledFactor):  # one path through a
        a, b = couple(a), couple(b)  # train-mode BatchNorm, the other not (a skip connection)
        if a.S.shape == b.S.shape and _same_sign(a.sign, b.sign):
            return CoupledFactor(a.S + b.S, a.sign)
    if isinstance(a, DiagonalFactor) and isinstance(b, DiagonalFactor):
        if a.s.shape == b.s.shape and _same_sign(a.sign, b.sign):
            return DiagonalFactor(a.s + b.s, a.sign)
    a, b = a.dense(), b.dense()
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
