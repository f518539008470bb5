"""What convolutions and transposed convolutions share: input Jacobians (D.4), the
memory checks of dense products, parameter Jacobian products and first-order quantities.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from einops import einsum
from torch import Tensor, nn

from hbpkit.core.calls import ModuleCall
from hbpkit.curvature import recycling, workspace
from hbpkit.curvature.factors import Factor, Jacobian, SqrtFactor
from hbpkit.curvature.memory import DIAGONAL_ADVICE, EA_ADVICE, check_dense_budget
from hbpkit.modules.base import ModuleRules
from hbpkit.modules.conv.diagonal import ConvDiagonal
from hbpkit.modules.conv.geometry import _PADDING_MODES
from hbpkit.modules.roles import per_role

#: the most memory one chunk of columns of a large transposed Jacobian product may take
#: (at least one column): well below glibc's largest mmap threshold (32 MB), so chunks
#: come from its heap and reuse the same pages (a threshold rises only to the size of a
#: freed block, and a request of that same size is again fresh pages)
COLUMN_CHUNK_BYTES = 2**22


class _ConvBase(ConvDiagonal, ModuleRules):
    """What convolutions and transposed convolutions share.

    Subclasses provide the input Jacobian (:meth:`_jac`, :meth:`_jac_t` on
    ``[B, C, *spatial]``) and :meth:`_weight_factors`, the two ``[*, N, groups, ., P]``
    tensors whose contraction over positions ``p`` is the per-sample weight
    derivative, matricised as ``[weight.shape[0] / groups, rest]`` per group.
    """

    #: whether the output-side tensor enters the first (left) weight factor
    _output_left: bool = True

    def param_names(self, module: nn.modules.conv._ConvNd) -> list[str]:
        return ["weight"] if module.bias is None else ["weight", "bias"]

    def validate(self, call: ModuleCall) -> None:
        module = call.module
        name = type(module).__name__
        d = len(module.kernel_size)
        x = call.inputs[0]
        if x.dim() != d + 2:
            raise NotImplementedError(
                f"{name} needs a batched input [N, C_in, {d} spatial dims], got shape "
                f"{tuple(x.shape)}"
            )
        if module.padding_mode not in _PADDING_MODES:
            raise NotImplementedError(
                f"{name}(padding_mode={module.padding_mode!r}) is not supported; "
                f"use one of {_PADDING_MODES}"
            )

    def _dims(self, call: ModuleCall) -> int:
        return len(call.module.kernel_size)

    def _jac(self, call: ModuleCall, mat: Tensor) -> Tensor:
        raise NotImplementedError

    def _jac_t(self, call: ModuleCall, mat: Tensor) -> Tensor:
        raise NotImplementedError

    def _weight_factors(
        self, call: ModuleCall, out: Tensor, square_input: bool = False, grad: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``(left, right)``; ``out`` is ``grad_output`` if ``grad`` (then cacheable)."""
        raise NotImplementedError

    def _grouped(self, call: ModuleCall, t: Tensor) -> Tensor:
        """``[*, C, *spatial] -> [*, groups, C/groups, prod(spatial)]``."""
        return t.flatten(-self._dims(call)).unflatten(-2, (call.module.groups, -1))

    # input derivatives ----------------------------------------------------------------------
    def jac_t_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[V, N, C_out, *out] -> [V, N, C_in, *in]``.

        A large result is filled in chunks of columns (each at most ``COLUMN_CHUNK_BYTES``):
        oneDNN's transposed convolution holds its result twice (a second buffer it reorders
        from), so one call for all ``V`` columns would hold the result three times with the
        input; chunks below glibc's mmap threshold also reuse the same heap memory instead of
        faulting in fresh pages (``docs/benchmarks.md``, "Fresh pages and the workspace").
        """
        V, N = mat.shape[:2]
        in_shape = call.inputs[0].shape[1:]
        column_bytes = N * in_shape.numel() * mat.element_size()
        if V == 1 or V * column_bytes < workspace.MIN_BYTES:
            return self._jac_t(call, mat.flatten(0, 1)).unflatten(0, (V, N))
        step = max(1, COLUMN_CHUNK_BYTES // column_bytes)
        out = workspace.empty((V, N, *in_shape), mat)
        for v in range(0, V, step):
            out[v : v + step] = self._jac_t(call, mat[v : v + step].flatten(0, 1)).unflatten(
                0, (-1, N)
            )
        return out

    def jac_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[V, N, C_in, *in] -> [V, N, C_out, *out]``."""
        V, N = mat.shape[:2]
        return self._jac(call, mat.flatten(0, 1)).unflatten(0, (V, N))

    def ea_jac_t_mat_jac_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[D_out, D_out] -> [D_in, D_in]``: ``J^T mat J`` (``J`` is the same for all samples).

        Approximation (9) / S.11. Two transposed Jacobian products of ``D_out``
        and ``D_in`` columns; refuses (:class:`DenseBudgetError`) if the
        intermediate ``[D_out, D_in]`` and the result ``[D_in, D_in]`` exceed the budget.
        """
        out_shape = tuple(call.output_shape[1:])
        in_shape = tuple(call.inputs[0].shape[1:])
        D_out, D_in = math.prod(out_shape), math.prod(in_shape)
        self._check_ea_budget(call, mat.dtype)
        right = self._jac_t(call, mat.reshape(D_out, *out_shape)).reshape(D_out, D_in)  # mat J
        both = self._jac_t(call, right.T.reshape(D_in, *out_shape)).reshape(D_in, D_in)
        return both.T  # the rows of `both` are the columns of J^T mat J

    def _check_ea_budget(self, call: ModuleCall, dtype: torch.dtype) -> None:
        D_out, D_in = math.prod(call.output_shape[1:]), math.prod(call.inputs[0].shape[1:])
        D_work = self._work_features(call)
        check_dense_budget(
            call,
            D_out * D_work + D_in * D_work + D_in * D_in,
            dtype,
            f"The batch-averaged curvature J^T H J ([{D_out}, {D_out}] -> [{D_in}, {D_in}])",
            EA_ADVICE,
        )

    def _check_diagonal_budget(self, call: ModuleCall, N: int, dtype: torch.dtype) -> None:
        D_out, D_in = math.prod(call.output_shape[1:]), math.prod(call.inputs[0].shape[1:])
        check_dense_budget(
            call,
            D_out * (D_out + self._work_features(call) + D_in + N * D_in),
            dtype,
            f"Backpropagating a diagonal curvature factor (a dense [{D_out}, {N}, {D_in}] "
            "sqrt factor)",
            DIAGONAL_ADVICE,
        )

    def check_budget(self, call: ModuleCall, batch_averaged: bool, diagonal_factors: bool) -> None:
        dtype = call.inputs[0].dtype
        if batch_averaged:
            self._check_ea_budget(call, dtype)
        if diagonal_factors:
            self._check_diagonal_budget(call, call.inputs[0].shape[0], dtype)

    def _work_features(self, call: ModuleCall) -> int:
        """Features of the largest intermediate of :meth:`_jac_t` per column."""
        return math.prod(call.inputs[0].shape[1:])

    def _column_numel(self, call: ModuleCall) -> int:
        """Entries per sample and sqrt-factor column of :meth:`param_diag`'s intermediates."""
        return call.module.weight.numel()

    def transposed_jacobian(self, call: ModuleCall) -> Jacobian:
        """``J^T``, the same for every sample: a :class:`DiagonalFactor` ``diag(s_n)`` becomes
        ``[D_out, N, *in]`` from the ``D_out`` rows of ``J``, computed once and scaled per
        sample; refused (:class:`DenseBudgetError`) if that exceeds the budget."""
        check = partial(self._check_diagonal_budget, call)
        return Jacobian(partial(self.jac_t_mat_prod, call), "shared", check)

    # parameter Jacobian products (D.4), for the exact curvature-matrix products ------------
    def _apply_weight(self, call: ModuleCall, x: Tensor, weight: Tensor) -> Tensor:
        """``[N, C_in, *in] -> [N, C_out', *out]``: the module's map with another ``weight``."""
        raise NotImplementedError

    def _stack(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``K`` weights ``[K, *W.shape]`` as one weight whose group ``g`` holds all ``K``
        kernels of group ``g`` (one convolution applies all ``K`` at once)."""
        G = call.module.groups
        if self._output_left:  # [K, C_out, C_in/G, *k] -> [G, K, C_out/G, ...]
            return mat.unflatten(1, (G, -1)).transpose(0, 1).flatten(0, 2)
        # [K, C_in, C_out/G, *k] -> [C_in, K * C_out/G, *k]
        return mat.transpose(0, 1).flatten(1, 2)

    param_jac_mat_prod = per_role("param_jac_mat_prod")
    param_jac_t_mat_prod_sum = per_role("param_jac_t_mat_prod_sum")

    def param_jac_mat_prod_weight(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[K, *W.shape] -> [K, N, C_out, *out]``: ``V_k [[x_n]]`` (S.14).

        The ``K`` kernels are stacked into one weight with ``K`` times the output
        channels: one convolution of the input for all ``K``.
        """
        K, out_shape = mat.shape[0], call.output_shape
        G = call.module.groups
        z = self._apply_weight(call, call.input, self._stack(call, mat))  # [N, G K C_out/G, *out]
        z = z.unflatten(1, (G, K, -1)).movedim(2, 0)  # [K, N, G, C_out/G, *out]
        return z.reshape(K, *out_shape)

    def param_jac_mat_prod_bias(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[K, C_out] -> [K, N, C_out, *out]``: ``v_k 1_P^T``."""
        K, out_shape = mat.shape[0], call.output_shape
        return mat.reshape(K, 1, -1, *([1] * self._dims(call))).expand(K, *out_shape)

    def param_jac_t_mat_prod_sum_weight(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[K, N, C_out, *out] -> [K, *W.shape]``: ``sum_n M_{k,n} [[x_n]]^T``."""
        K = mat.shape[0]
        left, right = self._weight_factors(call, mat)
        if self._output_left:
            JtM = einsum(left, right, "k n g a p, n g b p -> k g a b")
        else:
            JtM = einsum(left, right, "n g a p, k n g b p -> k g a b")
        return JtM.reshape(K, *call.module.weight.shape)

    def param_jac_t_mat_prod_sum_bias(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[K, N, C_out, *out] -> [K, C_out]``: ``sum_{n,p} m``."""
        return mat.flatten(3).sum((1, 3))

    # first-order quantities (S.14: g [[x]]^T per sample for Conv, g 1_P for the bias) -------
    batch_grad = per_role("batch_grad")
    batch_l2 = per_role("batch_l2")
    sum_grad_squared = per_role("sum_grad_squared")
    summed_grad = per_role("summed_grad")

    def batch_grad_weight(self, call: ModuleCall, grad_output: Tensor) -> Tensor:
        """``[N, *weight.shape]``; for Conv ``g [[x]]^T`` (S.14)."""
        left, right = self._weight_factors(call, grad_output, grad=True)  # [N, G, a|b, P]
        shape = (grad_output.shape[0], *call.module.weight.shape)  # the last pass's, if free
        return recycling.matmul(left, right.transpose(-1, -2), shape)

    def batch_grad_bias(self, call: ModuleCall, grad_output: Tensor) -> Tensor:
        """``[N, C_out]``."""
        return grad_output.flatten(2).sum(2)

    def batch_l2_weight(self, call: ModuleCall, grad_output: Tensor) -> Tensor:
        """``[N]``: ``sum_{p,q} (a_p . a_q)(b_p . b_q)`` where that is cheaper."""
        if ("batch_grad", "weight") not in call.cache:
            left, right = self._weight_factors(call, grad_output, grad=True)
            P, A, B = left.shape[-1], left.shape[-2], right.shape[-2]
            if P * P * (A + B) < A * B:
                gram = einsum(left, left, "n g a p, n g a q -> n g p q")
                return (gram * einsum(right, right, "n g b p, n g b q -> n g p q")).sum((1, 2, 3))
        return super().batch_l2(call, "weight", grad_output)

    def batch_l2_bias(self, call: ModuleCall, grad_output: Tensor) -> Tensor:
        return grad_output.flatten(2).sum(2).square().sum(1)

    def sum_grad_squared_weight(self, call: ModuleCall, grad_output: Tensor) -> Tensor:
        return super().sum_grad_squared(call, "weight", grad_output)

    def sum_grad_squared_bias(self, call: ModuleCall, grad_output: Tensor) -> Tensor:
        return grad_output.flatten(2).sum(2).square().sum(0)

    def summed_grad_weight(self, call: ModuleCall, grad_output: Tensor) -> Tensor:
        left, right = self._weight_factors(call, grad_output, grad=True)
        return einsum(left, right, "n g a p, n g b p -> g a b").reshape(call.module.weight.shape)

    def summed_grad_bias(self, call: ModuleCall, grad_output: Tensor) -> Tensor:
        return grad_output.flatten(2).sum((0, 2))

    # per-sample columns J_{p,n}^T S[v, n] (S.14 per column), for SqrtGGNExact / SqrtGGNMC,
    # BatchJacobian and the diagonals of tied uses
    param_jac_t_columns = per_role("param_jac_t_columns")

    def param_jac_t_columns_weight(self, call: ModuleCall, factor: Factor) -> SqrtFactor:
        """``[V, N, *weight.shape]``: ``S[v, n] [[x_n]]^T`` per column and sample (S.14)."""
        f = factor.dense()
        V, N = f.S.shape[:2]
        left, right = self._weight_factors(call, f.S)
        if self._output_left:
            columns = einsum(left, right, "v n g a p, n g b p -> v n g a b")
        else:
            columns = einsum(left, right, "n g a p, v n g b p -> v n g a b")
        return SqrtFactor(columns.reshape(V, N, *call.module.weight.shape), f.sign)

    def param_jac_t_columns_bias(self, call: ModuleCall, factor: Factor) -> SqrtFactor:
        """``[V, N, C_out]``: ``S[v, n]`` summed over positions."""
        f = factor.dense()
        return SqrtFactor(f.S.flatten(3).sum(3), f.sign)
