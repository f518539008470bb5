"""Rules of ``nn.Linear``, ``z = x W^T + b`` on inputs ``[N, *, D_in]`` (eq. S.8).

Inputs with extra dimensions ``[N, T_1, ..., D_in]`` share the weight over the
``T = T_1 * ...`` positions. Their Kronecker factors follow ``kfac_approx``
(Eschenhagen et al., 2023), with ``s_{v,n,t}`` the sqrt factors at the output:

* ``"expand"`` (every position is an extra sample; exact when ``T = 1`` or when
  the loss treats positions independently in a deep linear network):
  ``G = sum_{v,n,t} s s^T``, ``A = 1/(N T) sum_{n,t} x_{n,t} x_{n,t}^T``;
* ``"reduce"`` (positions summed before the loss; exact when all positions of
  a sample share one input): ``G = sum_{v,n} (sum_t s)(sum_t s)^T``,
  ``A = 1/N sum_n xbar_n xbar_n^T`` with ``xbar_n = mean_t x_{n,t}``.

For ``T = 1`` both are ``G = sum_{v,n} s s^T``, ``A = 1/N sum_n x_n x_n^T`` (S.8c).
The bias block is ``G`` (the weight's output factor, bias folded as a 1).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from einops import einsum, rearrange
from torch import Tensor, nn

from hbpkit.core.calls import ModuleCall
from hbpkit.curvature import recycling
from hbpkit.curvature.factors import DiagonalFactor, Factor, Jacobian, SqrtFactor
from hbpkit.modules.base import (
    ModuleRules,
    output_factor_from_average,
    position_gram,
)
from hbpkit.modules.kronecker_roots import LinearRoots
from hbpkit.modules.roles import KroneckerRoles, per_role


def _positions(t: Tensor, batch_dims: int) -> Tensor:
    """``[*batch, N, *, D] -> [*batch, N, T, D]`` (``batch_dims`` leading dims before ``N``)."""
    return t.reshape(*t.shape[: batch_dims + 1], -1, t.shape[-1])


class LinearRules(LinearRoots, KroneckerRoles, ModuleRules):
    """HBP rules of ``nn.Linear`` (eq. S.8a-c)."""

    def param_names(self, module: nn.Linear) -> list[str]:
        return ["weight"] if module.bias is None else ["weight", "bias"]

    def validate(self, call: ModuleCall) -> None:
        if call.inputs[0].dim() < 2:
            raise NotImplementedError(
                "Linear needs a batched input [N, *, D_in], got shape "
                f"{tuple(call.inputs[0].shape)}"
            )

    def _x(self, call: ModuleCall) -> Tensor:
        """Input as ``[N, T, D_in]``."""
        return _positions(call.input, 0)

    # eq. S.8a: Hx = W^T Hz W
    def jac_t_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        return mat @ call.module.weight.detach()

    def jac_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        return mat @ call.module.weight.detach().T

    def jac_mat_prod_channel(
        self, call: ModuleCall, mat: Tensor, channel: int
    ) -> tuple[Tensor, int | None]:
        """Features ``[N, F]``: only column ``channel`` of ``W`` reads the tangent."""
        if mat.dim() != 3:
            return super().jac_mat_prod_channel(call, mat, channel)
        return mat @ call.module.weight.detach()[:, channel : channel + 1].T, None

    def param_channel_block(self, call: ModuleCall, name: str) -> int | None:
        """Features ``[N, F]``: row ``o`` of ``W`` (``in_features`` entries) and ``b[o]``
        reach output feature ``o`` only."""
        if len(call.output_shape) != 2:
            return None
        return call.module.in_features if name == "weight" else 1

    def ea_jac_t_mat_jac_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        W = call.module.weight.detach()
        T = self._x(call).shape[1]
        H = rearrange(mat, "(t o) (s p) -> t o s p", t=T, s=T)
        out = einsum(W, H, W, "o i, t o s p, p j -> t i s j")
        return rearrange(out, "t i s j -> (t i) (s j)")

    # first-order quantities (S.8: g x^T per sample, or g for the bias) ---------------------
    batch_grad = per_role("batch_grad")
    batch_l2 = per_role("batch_l2")
    sum_grad_squared = per_role("sum_grad_squared")
    summed_grad = per_role("summed_grad")

    def batch_grad_weight(self, call: ModuleCall, grad_output: Tensor) -> Tensor:
        """``[N, D_out, D_in]``: ``sum_t g_{n,t} x_{n,t}^T`` (S.8c per sample), into recycled
        memory where the previous pass's ``grad_batch`` is free (``curvature/recycling.py``)."""
        return recycling.matmul(_positions(grad_output, 0).transpose(1, 2), self._x(call))

    def batch_grad_bias(self, call: ModuleCall, grad_output: Tensor) -> Tensor:
        return _positions(grad_output, 0).sum(1)

    # without per-sample gradients where there is no weight sharing:
    # ||g x^T||^2 = ||g||^2 ||x||^2, sum_n (g_n x_n^T)^2 = (g^2)^T x^2
    def batch_l2_weight(self, call: ModuleCall, grad_output: Tensor) -> Tensor:
        g, x = _positions(grad_output, 0), self._x(call)
        if x.shape[1] == 1:
            return g[:, 0].square().sum(1) * x[:, 0].square().sum(1)
        # sum_{t,s} (g_t . g_s)(x_t . x_s): cheaper than [N, out, in] while T^2 < out*in/(out+in)
        T, O, I = x.shape[1], g.shape[2], x.shape[2]
        if T * T * (O + I) < O * I:
            gram_g = einsum(g, g, "n t o, n s o -> n t s")
            return (gram_g * einsum(x, x, "n t i, n s i -> n t s")).sum((1, 2))
        return super().batch_l2(call, "weight", grad_output)

    def batch_l2_bias(self, call: ModuleCall, grad_output: Tensor) -> Tensor:
        return _positions(grad_output, 0).sum(1).square().sum(1)

    def sum_grad_squared_weight(self, call: ModuleCall, grad_output: Tensor) -> Tensor:
        g, x = _positions(grad_output, 0), self._x(call)
        if x.shape[1] > 1:
            return super().sum_grad_squared(call, "weight", grad_output)
        return g[:, 0].square().T @ x[:, 0].square()

    def sum_grad_squared_bias(self, call: ModuleCall, grad_output: Tensor) -> Tensor:
        g = _positions(grad_output, 0)
        if self._x(call).shape[1] > 1:
            return super().sum_grad_squared(call, "bias", grad_output)
        return g[:, 0].square().sum(0)

    def summed_grad_weight(self, call: ModuleCall, grad_output: Tensor) -> Tensor:
        g, x = _positions(grad_output, 0), self._x(call)
        return einsum(g, x, "n t o, n t i -> o i")

    def summed_grad_bias(self, call: ModuleCall, grad_output: Tensor) -> Tensor:
        return _positions(grad_output, 0).sum((0, 1))

    def transposed_jacobian(self, call: ModuleCall) -> Jacobian:
        """``W^T``; on ``[N, D_in]`` inputs the same for every sample, so a diagonal factor
        ``diag(s_n)`` becomes ``W^T diag(s_n)``: rows of ``W`` scaled, no matmul."""
        apply = partial(self.jac_t_mat_prod, call)
        if call.input.dim() != 2:
            return Jacobian(apply)
        return Jacobian(apply, "shared", rows=call.module.weight.detach)

    # diagonal of eq. S.8c / S.8b summed over samples and factor columns
    param_diag = per_role("param_diag")

    def param_diag_weight(self, call: ModuleCall, factors: list[Factor]) -> Tensor:
        x = self._x(call)

        def of(f: Factor) -> Tensor:
            if x.shape[1] == 1:  # sum_v sign S^2 first: the diagonal is then one matmul
                return _sample_squares(f).T @ x[:, 0].square()
            S, sign = _position_columns(f)
            per_sample = einsum(S, x, "v n t o, n t i -> v n o i")
            return SqrtFactor(per_sample, sign).signed_square().sum((0, 1))

        return _summed([of(f) for f in factors])

    def param_diag_bias(self, call: ModuleCall, factors: list[Factor]) -> Tensor:
        x = self._x(call)

        def of(f: Factor) -> Tensor:
            if x.shape[1] == 1:
                return _sample_squares(f).sum(0)
            S, sign = _position_columns(f)
            return SqrtFactor(S.sum(2), sign).signed_square().sum((0, 1))

        return _summed([of(f) for f in factors])

    param_jac_t_columns = per_role("param_jac_t_columns")

    def param_jac_t_columns_weight(self, call: ModuleCall, factor: Factor) -> SqrtFactor:
        S, sign = _position_columns(factor)  # S.8c per column: sum_t s_t x_t^T
        return SqrtFactor(einsum(S, self._x(call), "v n t o, n t i -> v n o i"), sign)

    def param_jac_t_columns_bias(self, call: ModuleCall, factor: Factor) -> SqrtFactor:
        S, sign = _position_columns(factor)
        return SqrtFactor(S.sum(2), sign)

    def input_factor(self, call: ModuleCall, approx: str) -> Tensor:
        """A ``[D_in, D_in]``: ``1/(NT) sum x x^T`` (expand), ``1/N sum xbar xbar^T`` (reduce)."""
        key = ("linear_A", approx)
        if key not in call.cache:
            x = self._x(call)
            if approx == "reduce":
                x = x.mean(1, keepdim=True)
            flat = x.reshape(-1, x.shape[-1])
            flat = flat / math.sqrt(flat.shape[0])  # scale the [NT, D] rows, not the [D, D] result
            call.cache[key] = recycling.matmul(flat.T, flat)  # into the last pass's A, if free
        return call.cache[key]

    # Kronecker factors (S.8c): [G, A] for the weight, [G] for the bias (KroneckerRoles)

    def _sqrt_output_factor(self, call: ModuleCall, factors: list[Factor], approx: str) -> Tensor:
        """``G`` ``[D_out, D_out]`` from sqrt factors: ``sum_{v,n,t} s s^T`` (expand) or
        ``sum_{v,n} (sum_t s)(sum_t s)^T`` (reduce)."""
        T = self._x(call).shape[1]

        def of_dense(f: SqrtFactor) -> Tensor:
            key = ("linear_G", id(f.S), approx)  # one product for the weight and the bias
            cached = call.cache.get(key)
            if cached is None or cached[0] is not f.S:
                S, Ssigned = _positions(f.S, 1), _positions(f.signed(), 1)  # [V, N, T, out]
                cached = call.cache[key] = (f.S, position_gram(S, Ssigned, approx))
            return cached[1]

        def of_diagonal(f: DiagonalFactor) -> Tensor:  # one position: G stays diagonal
            return torch.diag(f.signed_square().sum(0))

        parts = [f.match(dense=of_dense, diagonal=of_diagonal if T == 1 else None) for f in factors]
        return _summed(parts)

    def _average_output_factor(self, call: ModuleCall, mat: Tensor, approx: str) -> Tensor:
        """``G`` from the batch-averaged ``[T D_out, T D_out]`` (S.11)."""
        T = self._x(call).shape[1]
        H = rearrange(mat, "(t o) (s p) -> o t p s", t=T, s=T)
        return output_factor_from_average(H, approx)

    # parameter Jacobian products (S.8: z_{n,t} = W x_{n,t} + b), for curvature-matrix products
    param_jac_mat_prod = per_role("param_jac_mat_prod")
    param_jac_t_mat_prod_sum = per_role("param_jac_t_mat_prod_sum")

    def param_jac_mat_prod_weight(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[K, *W.shape] -> [K, N, *, D_out]``: ``V_k x_{n,t}``."""
        x = call.input
        return (x.reshape(-1, x.shape[-1]) @ mat.mT).reshape(mat.shape[0], *call.output_shape)

    def param_jac_mat_prod_bias(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[K, D_out] -> [K, N, *, D_out]``: ``v_k`` at every sample and position."""
        out_shape, K = call.output_shape, mat.shape[0]
        return mat.reshape(K, *([1] * (len(out_shape) - 1)), -1).expand(K, *out_shape)

    def param_jac_t_mat_prod_sum_weight(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[K, N, *, D_out] -> [K, *W.shape]``: ``sum_{n,t} m_{k,n,t} x_{n,t}^T``."""
        K, D_out = mat.shape[0], mat.shape[-1]
        x = call.input
        return mat.reshape(K, -1, D_out).mT @ x.reshape(-1, x.shape[-1])

    def param_jac_t_mat_prod_sum_bias(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[K, N, *, D_out] -> [K, D_out]``: ``sum_{n,t} m_{k,n,t}``."""
        K, D_out = mat.shape[0], mat.shape[-1]
        return mat.reshape(K, -1, D_out).sum(1)


def _summed(parts: list[Tensor]) -> Tensor:
    """The sum of ``parts`` (no copy of a single part: ``0 + t`` would copy ``t``)."""
    if not parts:
        return 0
    return parts[0] if len(parts) == 1 else sum(parts[1:], parts[0])


def _sample_squares(f: Factor) -> Tensor:
    """``sum_v sign S^2`` of a factor at a ``[N, D_out]`` output, ``[N, D_out]``."""
    sq = f.signed_square_sum()
    return sq.reshape(sq.shape[0], -1)


def _position_columns(f: Factor) -> tuple[Tensor, Tensor | None]:
    """The columns ``[V, N, T, D_out]`` of a factor (a diagonal one made dense) and signs."""
    f = f.dense()
    return _positions(f.S, 1), f.sign
