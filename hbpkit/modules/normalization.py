"""Rules of normalization layers: ``LayerNorm``, ``GroupNorm`` (and the affine parameters of
``BatchNorm``).

**LayerNorm, GroupNorm** act on each sample on its own but are nonlinear in it.
Per sample, the features ``[*in]`` split into ``G`` groups of ``M`` entries
(``LayerNorm``: the trailing ``normalized_shape``, ``G`` = the other positions;
``GroupNorm``: ``C/groups`` channels with their spatial positions). In one group
``x`` ``[M]``, with ``s = sqrt(var(x) + eps)`` (biased variance) and
``xh = (x - mean(x)) / s``, the output is ``z = gamma * xh + beta``. Derived from
first principles for eq. (7) of the paper:

* Jacobian: ``dxh/dx = (I - 1 1^T / M - xh xh^T / M) / s`` (symmetric), ``dz/dx =
  diag(gamma) dxh/dx``;
* residual ``R = sum_i d2xh_i/dx2 g_i`` with ``g = gamma * dz`` (``dz`` the gradient at
  the output), ``u = g - mean(g)``, ``a = mean(g * xh)``:
  ``R = (-u xh^T - xh u^T + 3 a xh xh^T - a M I + a 1 1^T) / (M s^2)``.

``R`` is a dense ``[M, M]`` matrix per sample and group, not a diagonal: the
messages take it through :meth:`ModuleRules.residual_factor` (an eigendecomposition,
``sum_k sign(l_k) (sqrt|l_k| q_k)(sqrt|l_k| q_k)^T``, one signed column per eigenvector),
:meth:`~ModuleRules.residual_sum` and :meth:`~ModuleRules.residual_mat_prod`; PCH
modifies its eigenvalues (for a diagonal residual those are its entries, S.9).

**BatchNorm** (eval and train mode) has its own file, ``hbpkit/modules/batchnorm.py``;
it shares the parameter rules below.

**Parameters** ``gamma``, ``beta`` (``LayerNorm``: shape ``normalized_shape``; ``GroupNorm``,
``BatchNorm``: ``[C]``) enter linearly: ``J_gamma v = v * xh``, ``J_beta v = v``, broadcast
over the ``T`` positions that share them (the leading positions of ``LayerNorm``, the
spatial positions of the others). Their Kronecker "factors" are one factor, the
dense ``[P, P]`` block like a bias (``KroneckerFactors((G,), p.shape)``), with
``kfac_approx`` as for weight sharing: with ``q_{v,n,t} = J_{p,n,t}^T s_{v,n,t}`` ``[P]``
the parameter derivative at position ``t``, ``"expand"`` gives ``G = sum_{v,n,t} q q^T``
(cross-position terms dropped), ``"reduce"`` ``G = sum_{v,n} (sum_t q)(sum_t q)^T``,
the exact block for per-sample factors. Batch-averaged (``H`` ``[D, D]``):
``G = mean_n J_{p,n}^T H J_{p,n}`` (reduce) or its diagonal position blocks (expand).
At ``T = 1`` (``BatchNorm1d`` on ``[N, C]``, ``LayerNorm`` on ``[N, D]``) the two coincide.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from einops import einsum
from torch import Tensor, nn

from hbpkit.core.calls import ModuleCall
from hbpkit.curvature.factors import DiagonalFactor, Factor, SqrtFactor, modify_eigenvalues
from hbpkit.curvature.memory import DIAGONAL_ADVICE, EA_ADVICE, check_dense_budget
from hbpkit.modules.base import ModuleRules, output_factor_from_sqrt


class AffineParamRules(ModuleRules):
    """Per-sample rules of ``z = gamma * xh + beta`` for ``gamma``, ``beta``.

    Subclasses provide :meth:`xh` (``[N, *in]``) and whether the parameters sit on the
    trailing dimensions (``LayerNorm``) or on the channel dimension 1 (the others).
    """

    trailing_params: bool = False

    def param_names(self, module: nn.Module) -> list[str]:
        return [n for n in ("weight", "bias") if getattr(module, n, None) is not None]

    def xh(self, call: ModuleCall) -> Tensor:
        """The normalized input ``[N, *in]``."""
        raise self._missing("xh")

    def _param_dims(self, call: ModuleCall) -> int:
        """Number of trailing input dimensions the parameters cover (``trailing_params``)."""
        return 1

    def positions(self, call: ModuleCall, t: Tensor) -> Tensor:
        """``[*, N, *in] -> [*, N, T, P]``: the positions that share the parameter entries."""
        n_in = len(call.output_shape) - 1
        batch = t.shape[: t.dim() - n_in - 1]
        N = t.shape[len(batch)]
        if self.trailing_params:
            P = math.prod(t.shape[t.dim() - self._param_dims(call) :])
            return t.reshape(*batch, N, -1, P)
        C = t.shape[len(batch) + 1]
        return t.reshape(*batch, N, C, -1).transpose(-1, -2)

    def _broadcast(self, call: ModuleCall, v: Tensor) -> Tensor:
        """``[K, *param] -> [K, 1, *in]`` broadcastable against ``[K, N, *in]``."""
        n_in = len(call.output_shape) - 1
        K = v.shape[0]
        if self.trailing_params:
            d = self._param_dims(call)
            return v.reshape(K, 1, *([1] * (n_in - d)), *v.shape[1:])
        return v.reshape(K, 1, v.shape[1], *([1] * (n_in - 1)))

    def _role_scale(self, call: ModuleCall, name: str) -> Tensor | None:
        """What multiplies ``v`` in ``J_p v`` (S.8b): ``xh`` for the weight (the scale
        ``gamma``), nothing (``None``) for the bias (the shift ``beta``)."""
        return _ROLE_SCALES[name](self, call)

    def _param_derivative(self, call: ModuleCall, name: str, t: Tensor) -> Tensor:
        """``J_p^T t`` per position: ``[*, N, *out] -> [*, N, T, P]``."""
        scale = self._role_scale(call, name)
        return self.positions(call, t if scale is None else t * scale)

    def _to_param(self, call: ModuleCall, name: str, q: Tensor) -> Tensor:
        """``[*, P] -> [*, *param.shape]``."""
        shape = getattr(call.module, name).shape
        return q.reshape(*q.shape[:-1], *shape)

    # parameters enter linearly (like a bias, S.8b): J_gamma v = v * xh, J_beta v = v
    def batch_grad(self, call: ModuleCall, name: str, grad_output: Tensor) -> Tensor:
        return self._to_param(call, name, self._param_derivative(call, name, grad_output).sum(-2))

    def param_diag(self, call: ModuleCall, name: str, factors: list[Factor]) -> Tensor:

        def of_diagonal(f: DiagonalFactor) -> Tensor:  # entry i adds sign_i (J_p[i] s_i)^2
            sq = f.signed_square()
            scale = self._role_scale(call, name)
            if scale is not None:
                sq = sq * scale.square()
            return self.positions(call, sq).sum((0, 1))

        def of_dense(f: SqrtFactor) -> Tensor:
            q = self._param_derivative(call, name, f.S).sum(-2)  # [V, N, P]
            return SqrtFactor(q, f.sign).signed_square().sum((0, 1))

        result = sum(f.match(dense=of_dense, diagonal=of_diagonal) for f in factors)
        return self._to_param(call, name, result)

    def param_jac_t_columns(self, call: ModuleCall, name: str, factor: Factor) -> SqrtFactor:
        """``[V, N, *param.shape]``: ``J_{p,n}^T S[v, n]``, summed over positions (S.8b)."""
        f = factor.dense()
        columns = self._param_derivative(call, name, f.S).sum(-2)  # [V, N, P]
        return SqrtFactor(self._to_param(call, name, columns), f.sign)

    def kron_from_sqrt(
        self, call: ModuleCall, name: str, factors: list[Factor], approx: str
    ) -> list[Tensor]:
        def derivative(S: Tensor) -> Tensor:  # a factor's columns -> [V, N, T, P]
            return self._param_derivative(call, name, S)

        return [output_factor_from_sqrt(factors, derivative, approx)]

    def kron_from_average(
        self, call: ModuleCall, name: str, mat: Tensor, approx: str
    ) -> list[Tensor]:
        scale = self._role_scale(call, name)
        J = self.positions(call, torch.ones_like(self.xh(call)) if scale is None else scale)
        N, T, P = J.shape
        features = torch.arange(mat.shape[0], device=mat.device).reshape(call.output_shape[1:])
        index = self.positions(call, features.unsqueeze(0))[0].reshape(-1)  # (t, p) -> feature
        H = mat[index][:, index].reshape(T, P, T, P)
        if approx == "reduce":
            G = einsum(J, H, J, "n t p, t p s o, n s o -> p o")
        else:
            G = einsum(J, torch.diagonal(H, dim1=0, dim2=2), J, "n t p, p o t, n t o -> p o")
        return [G / N]

    def param_jac_mat_prod(self, call: ModuleCall, name: str, mat: Tensor) -> Tensor:
        """``[K, *param] -> [K, N, *out]``: ``v * xh`` (weight) or ``v`` (bias), broadcast."""
        v = self._broadcast(call, mat)
        scale = self._role_scale(call, name)
        out = v if scale is None else v * scale
        return out.expand(mat.shape[0], *call.output_shape)

    def param_jac_t_mat_prod_sum(self, call: ModuleCall, name: str, mat: Tensor) -> Tensor:
        """``[K, N, *out] -> [K, *param]``: ``sum_{n,t} m * xh`` (weight) or ``sum_{n,t} m``."""
        return self._to_param(call, name, self._param_derivative(call, name, mat).sum((1, 2)))


#: per parameter role, what multiplies ``v`` in ``J_p v`` (``None``: nothing)
_ROLE_SCALES: dict[str, Callable[[AffineParamRules, ModuleCall], Tensor | None]] = {
    "weight": lambda rules, call: rules.xh(call),
    "bias": lambda rules, call: None,
}


# ------------------------------------------------------------------------ LayerNorm, GroupNorm
class GroupStats(NamedTuple):
    """Per sample and group: ``xh`` ``[N, G, M]``, ``s`` ``[N, G, 1]``, ``gamma`` ``[G, M]``."""

    xh: Tensor
    s: Tensor
    gamma: Tensor


class GroupNormalizationRules(AffineParamRules):
    """``LayerNorm`` and ``GroupNorm``: normalization over groups of one sample's features."""

    linear_in_input = False
    support_note = (
        "dense second derivative per sample (eq. 7, eigendecomposed for sqrt factors); "
        "Kronecker: one dense factor for gamma / beta"
    )

    def _groups(self, call: ModuleCall) -> int:
        return call.module.num_groups

    def validate(self, call: ModuleCall) -> None:
        module = call.module
        x = call.inputs[0]
        if isinstance(module, nn.LayerNorm):
            norm = tuple(module.normalized_shape)
            if x.dim() < len(norm) + 1:
                raise NotImplementedError(
                    f"{module} needs a batched input [N, *, {', '.join(map(str, norm))}], got "
                    f"shape {tuple(x.shape)}: it would normalize over the batch dimension"
                )
        elif x.dim() < 2:
            raise NotImplementedError(f"{module} needs an input [N, C, *], got {tuple(x.shape)}")

    def stats(self, call: ModuleCall) -> GroupStats:
        if "norm_stats" not in call.cache:
            module = call.module
            x = call.input
            N, G = x.shape[0], self._groups(call)
            xg = x.reshape(N, G, -1)
            xc = xg - xg.mean(-1, keepdim=True)
            s = (xc.square().mean(-1, keepdim=True) + module.eps).sqrt()
            M = xg.shape[-1]
            if module.weight is None:
                gamma = x.new_ones(G, M)
            elif isinstance(module, nn.GroupNorm):
                spatial = M * G // x.shape[1]
                gamma = module.weight.detach().repeat_interleave(spatial).reshape(G, M)
            else:
                gamma = module.weight.detach().reshape(1, M).expand(G, M)
            call.cache["norm_stats"] = GroupStats(xc / s, s, gamma)
        return call.cache["norm_stats"]

    def _per_group(self, call: ModuleCall, t: Tensor) -> Tensor:
        """``[*, N, *features] -> [*, N, G, M]``."""
        n_in = len(call.output_shape) - 1
        batch = t.shape[: t.dim() - n_in]
        return t.reshape(*batch, self._groups(call), -1)

    def xh(self, call: ModuleCall) -> Tensor:
        return self.stats(call).xh.reshape(call.output_shape)

    # dxh/dx = (I - 1 1^T / M - xh xh^T / M) / s, symmetric
    def _normalization_jac(self, st: GroupStats, m: Tensor) -> Tensor:
        proj = (m * st.xh).mean(-1, keepdim=True)
        return (m - m.mean(-1, keepdim=True) - st.xh * proj) / st.s

    # eq. (7) without residual: Hx = J^T Hz J, J = diag(gamma) dxh/dx per group
    def jac_t_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        st = self.stats(call)
        out = self._normalization_jac(st, self._per_group(call, mat) * st.gamma)
        return out.reshape(mat.shape)

    def jac_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        st = self.stats(call)
        out = self._normalization_jac(st, self._per_group(call, mat)) * st.gamma
        return out.reshape(mat.shape)

    def group_jacobians(self, call: ModuleCall) -> Tensor:
        """Dense Jacobians of each sample and group, ``[N, G, M_out, M_in]``.

        ``diag(gamma) (I - 1 1^T / M - xh xh^T / M) / s``; the Jacobian of a sample is block
        diagonal over its groups.
        """
        st = self.stats(call)
        M = st.xh.shape[-1]
        eye = torch.eye(M, dtype=st.xh.dtype, device=st.xh.device)
        J = eye - 1 / M - einsum(st.xh, st.xh, "n g i, n g j -> n g i j") / M
        return J * (st.gamma[..., None] / st.s[..., None])

    def check_budget(self, call: ModuleCall, batch_averaged: bool, diagonal_factors: bool) -> None:
        """The batch-averaged ``[D, D]`` or a densified diagonal factor ``[D, N, D]``."""
        x = call.inputs[0]
        N, D = x.shape[0], x[0].numel()
        if batch_averaged:
            check_dense_budget(call, (D, D), x.dtype, "batch averaging", EA_ADVICE)
        if diagonal_factors:
            check_dense_budget(call, (D, N, D), x.dtype, "a diagonal factor", DIAGONAL_ADVICE)

    # mean_n J_n^T H J_n with J_n block diagonal over groups: block (g, h) is J_g^T H_gh J_h
    def ea_jac_t_mat_jac_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        J = self.group_jacobians(call)
        N, G, M = J.shape[:3]
        H = mat.reshape(G, M, G, M)
        out = einsum(J, H, J, "n g o i, g o h p, n h p j -> g i h j") / N
        return out.reshape(G * M, G * M)

    def residual_diag(self, call: ModuleCall, grad_output: Tensor) -> Tensor | None:
        raise NotImplementedError(
            f"the second derivative of {type(call.module).__name__} is a dense [M, M] matrix "
            "per sample and group, not a diagonal: the messages must call residual_factor / "
            "residual_sum / residual_mat_prod of hbpkit.modules.ModuleRules"
        )

    def _residual_parts(self, call: ModuleCall, grad_output: Tensor) -> tuple[Tensor, Tensor]:
        """``u = g - mean(g)`` ``[N, G, M]`` and ``a = mean(g * xh)`` ``[N, G, 1]``."""
        st = self.stats(call)
        g = self._per_group(call, grad_output) * st.gamma
        return g - g.mean(-1, keepdim=True), (g * st.xh).mean(-1, keepdim=True)

    # the residual sum_k Hz_k(x) dz_k of eq. (7), derived in the module docstring
    def residual_matrices(self, call: ModuleCall, grad_output: Tensor) -> Tensor:
        """``R`` per sample and group, ``[N, G, M, M]`` (module docstring)."""
        key = ("norm_residual",)
        if key not in call.cache:
            st = self.stats(call)
            u, a = self._residual_parts(call, grad_output)
            xh, M = st.xh, st.xh.shape[-1]
            outer = einsum(u, xh, "n g i, n g j -> n g i j")
            R = -outer - outer.mT + 3 * a[..., None] * einsum(xh, xh, "n g i, n g j -> n g i j")
            eye = torch.eye(M, dtype=xh.dtype, device=xh.device)
            R = R + a[..., None] * (1 - M * eye)
            call.cache[key] = R / (M * st.s[..., None].square())
        return call.cache[key]

    def _eigen(self, call: ModuleCall, grad_output: Tensor, curvature: str):
        key = ("norm_residual_eigh",)
        if key not in call.cache:
            call.cache[key] = torch.linalg.eigh(self.residual_matrices(call, grad_output))
        values, vectors = call.cache[key]
        return modify_eigenvalues(values, curvature), vectors

    def residual_factor(
        self, call: ModuleCall, grad_output: Tensor, curvature: str
    ) -> Factor | None:
        """``sum_k sign(l_k) (sqrt|l_k| q_k)(...)^T``: one column per group and eigenvector.

        ``S`` ``[G M, N, *in]`` (column ``(g, k)`` nonzero in group ``g`` only),
        ``sign`` ``[G M, N]``.
        """
        if curvature == "ggn":
            return None
        values, vectors = self._eigen(call, grad_output, curvature)
        N, G, M = values.shape
        cols = vectors * values.abs().sqrt()[:, :, None, :]  # [N, G, M (entry), M (eigenvector)]
        eye = torch.eye(G, dtype=cols.dtype, device=cols.device)
        S = einsum(cols, eye, "n g i k, g h -> g k n h i").reshape(G * M, N, *call.output_shape[1:])
        sign = torch.sign(values).permute(1, 2, 0).reshape(G * M, N)
        return SqrtFactor(S, None if bool((sign >= 0).all()) else sign)

    def residual_sum(self, call: ModuleCall, grad_output: Tensor, curvature: str) -> Tensor | None:
        """``sum_n m(R_n)``: block diagonal ``[G M, G M]``."""
        if curvature == "ggn":
            return None
        if curvature == "hessian":
            R = self.residual_matrices(call, grad_output).sum(0)
        else:
            values, vectors = self._eigen(call, grad_output, curvature)
            R = einsum(vectors * values[:, :, None, :], vectors, "n g i k, n g j k -> g i j")
        G, M = R.shape[:2]
        eye = torch.eye(G, dtype=R.dtype, device=R.device)
        return einsum(R, eye, "g i j, g h -> g i h j").reshape(G * M, G * M)

    def residual_mat_prod(
        self, call: ModuleCall, grad_output: Tensor, curvature: str
    ) -> Callable[[Tensor], Tensor] | None:
        if curvature == "ggn":
            return None
        if curvature == "hessian":
            return _ResidualProduct(self, call, *self._residual_parts(call, grad_output))
        values, vectors = self._eigen(call, grad_output, curvature)
        if not bool(values.any()):
            return None
        R = einsum(vectors * values[:, :, None, :], vectors, "n g i k, n g j k -> n g i j")
        return _DenseResidualProduct(self, call, R)


class _ResidualProduct:
    """``m -> R_n m`` per sample and group without forming ``R`` (the Hessian's residual)."""

    __slots__ = ("rules", "call", "u", "a")

    def __init__(self, rules: GroupNormalizationRules, call: ModuleCall, u: Tensor, a: Tensor):
        self.rules, self.call, self.u, self.a = rules, call, u, a

    def __call__(self, mat: Tensor) -> Tensor:
        st = self.rules.stats(self.call)
        m = self.rules._per_group(self.call, mat)  # [K, N, G, M]
        xh, u, a, M = st.xh, self.u, self.a, st.xh.shape[-1]
        xm, um = (xh * m).sum(-1, keepdim=True), (u * m).sum(-1, keepdim=True)
        out = -u * xm - xh * um + 3 * a * xh * xm - a * M * m + a * m.sum(-1, keepdim=True)
        return (out / (M * st.s.square())).reshape(mat.shape)

    __mul__ = __call__  # ``residual * m``, as code written for residual tensors applies it


class _DenseResidualProduct:
    """``m -> R_n m`` with dense modified residuals ``R`` ``[N, G, M, M]`` (PCH)."""

    __slots__ = ("rules", "call", "R")

    def __init__(self, rules: GroupNormalizationRules, call: ModuleCall, R: Tensor):
        self.rules, self.call, self.R = rules, call, R

    def __call__(self, mat: Tensor) -> Tensor:
        m = self.rules._per_group(self.call, mat)
        return einsum(self.R, m, "n g i j, k n g j -> k n g i").reshape(mat.shape)

    __mul__ = __call__  # ``residual * m``, as code written for residual tensors applies it


class LayerNormRules(GroupNormalizationRules):
    """``nn.LayerNorm``: groups are the trailing ``normalized_shape``; parameters live there."""

    trailing_params = True

    def _param_dims(self, call: ModuleCall) -> int:
        return len(call.module.normalized_shape)

    def _groups(self, call: ModuleCall) -> int:
        d = len(call.module.normalized_shape)
        return math.prod(call.output_shape[1 : len(call.output_shape) - d])


class GroupNormRules(GroupNormalizationRules):
    """``nn.GroupNorm``: ``num_groups`` groups of channels; parameters per channel."""


#: the normalization layers and their rules (BatchNorm: ``hbpkit/modules/batchnorm.py``)
NORMALIZATION: dict[type, ModuleRules] = {
    nn.LayerNorm: LayerNormRules(),
    nn.GroupNorm: GroupNormRules(),
}
