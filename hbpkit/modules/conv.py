"""Rules of convolutions ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` (supplement D).

A convolution of an input ``x`` ``[N, C_in, *in]`` with a kernel ``W``
``[C_out, C_in/groups, *k]`` is, per sample and per group of channels, the
matrix product of eq. S.14 (S.13 in index notation),

    ``Z = W [[x]] + b 1_P^T``,

where ``[[x]]`` (``unfold``, im2col) ``[S, P]`` holds the ``P = prod(out)``
flattened patches of ``S = C_in/groups * prod(k)`` entries each, and ``W`` is
matricised as ``[C_out, S]``. Everything is linear in ``x`` (no residual in
eq. 7) and the input Jacobian ``J`` does not depend on the sample (D.4:
``I_P kron W`` composed with the index map of ``unfold``, D.2). Paddings other
than symmetric zeros (``padding="same"`` with an even kernel, ``padding_mode``
``"reflect"``, ``"replicate"``, ``"circular"``) are an index map in front of the
zero-padded convolution, ``x -> pad(x)`` (D.2), which is linear too.

Notation in this file: ``u_{n,p}`` ``[S]`` is the ``p``-th patch of sample ``n``
(a column of ``[[x_n]]``), ``s_{v,n,p}`` ``[C_out]`` the sqrt factor ``v`` at output
position ``p``, ``D = C * prod(spatial)`` the number of features.

Kronecker factors of the weight (``[G C_out x C_out, A S x S]``, docs/user-guide.md, Conventions).
The weight is shared over the ``P`` output positions; the exact block of one
sample is ``sum_{v,p,q} (s_p s_q^T) kron (u_p u_q^T)`` (D.4), and ``kfac_approx``
picks its Kronecker approximation:

* ``"expand"`` (Grosse and Martens 2016: every position is an extra sample):
  ``G = sum_{v,n,p} s s^T``, ``A = 1/(N P) sum_{n,p} u_{n,p} u_{n,p}^T``;
  it drops the cross-position terms ``p != q`` and is exact under KFC's
  assumptions (no correlation between positions, patches independent of the
  output derivatives);
* ``"reduce"`` (Eschenhagen et al. 2023: positions summed before the loss):
  ``G = sum_{v,n} (sum_p s)(sum_p s)^T``, ``A = 1/N sum_n ubar_n ubar_n^T`` with
  ``ubar_n = 1/P sum_p u_{n,p}``; exact for one sample whose patches all
  coincide (``u_p = ubar``), since then the block is ``G kron ubar ubar^T``.

With ``P = 1`` (kernel covering the padded input) both are the factors of a
Linear layer (S.8c), and for one sample (``N = 1``) the exact block, for KFLR
and for KFRA. With the batch-averaged ``[D_out, D_out]`` matrix ``H`` of KFRA
(S.11) the same rules read ``G = sum_p H[:, p, :, p]`` (expand) and
``G = sum_{p, q} H[:, p, :, q]`` (reduce). The bias is folded into the weight as
an input entry ``1``, so it gets ``[G]`` of the chosen approximation; with
``"reduce"`` that is the exact bias block ``(1_P kron I)^T H_Z (1_P kron I)`` of
D.4 for any ``N`` and ``P``.

BackPACK 1.7.1 pairs the reduce ``G`` with ``P`` times the expand ``A`` (neither
approximation; docs/user-guide.md, Weight sharing). With ``groups > 1`` the weight block is a
different Kronecker product per group (each group has its own ``A``), which does
not fit one ``[G, A]``: Kronecker factors of grouped weights raise
``NotImplementedError`` (the bias is fine).

A transposed convolution ``z = conv_transpose(x, W) + b`` (``W`` ``[C_in,
C_out/groups, *k]``) is the adjoint of a convolution: its rules swap the roles
of input and output (the input Jacobian's transpose is a convolution; the weight
derivative pairs ``x`` with the patches of the output-side tensor). It gets all
rules except Kronecker factors.

Dense matrices over the features of a convolution grow like ``D^2`` (the
batch-averaged matrix of KFRA; a diagonal factor backpropagated through the
convolution, ``[D_out, N, *in]``). Such products check their size against
:data:`MAX_DENSE_BYTES` before allocating and raise :class:`DenseBudgetError`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn
from torch.nn import grad as nn_grad

from hbpkit.core.calls import ModuleCall
from hbpkit.curvature.blocks import PositionBlocks
from hbpkit.curvature.factors import DiagonalFactor, Factor, SqrtFactor
from hbpkit.curvature.local import (
    ConvTransposeStep,
    LocalFactor,
    LocalStep,
    LocalValues,
    jac_t_local,
    windows,
)
from hbpkit.curvature.memory import DIAGONAL_ADVICE, EA_ADVICE, check_dense_budget
from hbpkit.modules.base import ModuleRules, output_factor_from_average

#: memory (in bytes) of one chunk of per-sample, per-column parameter derivatives
CHUNK_BYTES = 2**27
#: a reused buffer of products that are reduced at once (kept small to stay in cache)
BUFFER_BYTES = 2**22
#: stacking the ``V`` columns of a sample into one product copies the factor; measured on
#: the table S.2 convolutions, that pays off only for patches of at least this many entries
STACK_MIN_PATCH = 128

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_WEIGHT = {1: nn_grad.conv1d_weight, 2: nn_grad.conv2d_weight, 3: nn_grad.conv3d_weight}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _padding_sides(module: nn.modules.conv._ConvNd) -> list[tuple[int, int]]:
    """``(left, right)`` padding of every spatial dimension, in order."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [(0, 0)] * len(module.kernel_size)
        sides = []  # "same": like PyTorch, the odd element goes to the right
        for k, d in zip(module.kernel_size, module.dilation):
            total = d * (k - 1)
            sides.append((total // 2, total - total // 2))
        return sides
    return [(p, p) for p in module.padding]


def _windows(t: Tensor, module: nn.modules.conv._ConvNd, positions=None) -> Tensor:
    """The patches of a (padded) ``[B, C, *spatial]`` as a view ``[B, C, *positions, *k]``.

    ``module`` gives kernel size, stride and dilation; ``positions`` (default
    all) keeps the first positions along every spatial dimension.
    """
    for i, (k, s, dil) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        t = t.unfold(2 + i, dil * (k - 1) + 1, s)
    d = len(module.kernel_size)
    crop = (slice(None),) * 2 + tuple(slice(n) for n in positions or ()) + (slice(None),) * d
    dilate = tuple(slice(None, None, dil) for dil in module.dilation)
    return t[crop][(..., *dilate)]


def _flat_windows(w: Tensor, d: int) -> Tensor:
    """``[B, C, *positions, *k] -> [B, C * prod(k), prod(positions)]`` (``F.unfold`` layout)."""
    B, C = w.shape[:2]
    order = [0, 1, *range(2 + d, 2 + 2 * d), *range(2, 2 + d)]
    return w.permute(order).reshape(B, C * math.prod(w.shape[2 + d :]), -1)


class _ConvBase(ModuleRules):
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
        """``[V, N, C_out, *out] -> [V, N, C_in, *in]``."""
        V, N = mat.shape[:2]
        return self._jac_t(call, mat.flatten(0, 1)).unflatten(0, (V, N))

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

    def jac_t_factor(self, call: ModuleCall, factor: Factor) -> Factor:
        """``S -> J^T S``; a :class:`DiagonalFactor` ``diag(s_n)`` becomes ``[D_out, N, *in]``.

        Column ``j`` of ``J^T diag(s_n)`` is ``s_n[j]`` times the ``j``-th row of ``J``,
        the same for every sample: the rows of ``J`` are computed once (``D_out``
        transposed products of basis vectors) and scaled per sample. Refuses
        (:class:`DenseBudgetError`) if that exceeds the budget.
        """
        local = jac_t_local(self, call, factor)
        if local is not None:
            return local
        if not isinstance(factor, DiagonalFactor):
            return super().jac_t_factor(call, factor)
        s = factor.s
        N, out_shape = s.shape[0], tuple(s.shape[1:])
        in_shape = tuple(call.inputs[0].shape[1:])
        D_out, D_in = math.prod(out_shape), math.prod(in_shape)
        self._check_diagonal_budget(call, N, s.dtype)
        basis = torch.eye(D_out, dtype=s.dtype, device=s.device).reshape(D_out, *out_shape)
        rows = self._jac_t(call, basis).reshape(D_out, 1, D_in)  # J[j, :]
        S = rows * rearrange(s, "n ... -> (...) n 1")
        sign = None if factor.sign is None else rearrange(factor.sign, "n ... -> (...) n")
        return SqrtFactor(S.reshape(D_out, N, *in_shape), sign)

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

    def param_jac_mat_prod(self, call: ModuleCall, name: str, mat: Tensor) -> Tensor:
        """``[K, *S] -> [K, N, C_out, *out]``: ``V_k [[x_n]]`` (weight, S.14) or ``v_k 1_P^T``.

        The ``K`` kernels are stacked into one weight with ``K`` times the output
        channels: one convolution of the input for all ``K``.
        """
        K, out_shape = mat.shape[0], call.output_shape
        if name == "bias":
            return mat.reshape(K, 1, -1, *([1] * self._dims(call))).expand(K, *out_shape)
        G = call.module.groups
        z = self._apply_weight(call, call.input, self._stack(call, mat))  # [N, G K C_out/G, *out]
        z = z.unflatten(1, (G, K, -1)).movedim(2, 0)  # [K, N, G, C_out/G, *out]
        return z.reshape(K, *out_shape)

    def param_jac_t_mat_prod_sum(self, call: ModuleCall, name: str, mat: Tensor) -> Tensor:
        """``[K, N, C_out, *out] -> [K, *S]``: ``sum_n M_{k,n} [[x_n]]^T`` or ``sum_{n,p} m``."""
        K = mat.shape[0]
        if name == "bias":
            return mat.flatten(3).sum((1, 3))
        left, right = self._weight_factors(call, mat)
        if self._output_left:
            JtM = einsum(left, right, "k n g a p, n g b p -> k g a b")
        else:
            JtM = einsum(left, right, "n g a p, k n g b p -> k g a b")
        return JtM.reshape(K, *call.module.weight.shape)

    # first-order quantities -----------------------------------------------------------------
    def batch_grad(self, call: ModuleCall, name: str, grad_output: Tensor) -> Tensor:
        """``[N, *weight.shape]`` or ``[N, C_out]`` (bias); for Conv ``g [[x]]^T`` (S.14)."""
        if name == "bias":
            return grad_output.flatten(2).sum(2)
        left, right = self._weight_factors(call, grad_output, grad=True)
        per_sample = einsum(left, right, "n g a p, n g b p -> n g a b")
        return per_sample.reshape(grad_output.shape[0], *call.module.weight.shape)

    def batch_l2(self, call: ModuleCall, name: str, grad_output: Tensor) -> Tensor:
        """``[N]``; for the weight ``sum_{p,q} (a_p . a_q)(b_p . b_q)`` where that is cheaper."""
        if name == "bias":
            return grad_output.flatten(2).sum(2).square().sum(1)
        if ("batch_grad", name) not in call.cache:
            left, right = self._weight_factors(call, grad_output, grad=True)
            P, A, B = left.shape[-1], left.shape[-2], right.shape[-2]
            if P * P * (A + B) < A * B:
                gram = einsum(left, left, "n g a p, n g a q -> n g p q")
                return (gram * einsum(right, right, "n g b p, n g b q -> n g p q")).sum((1, 2, 3))
        return super().batch_l2(call, name, grad_output)

    def sum_grad_squared(self, call: ModuleCall, name: str, grad_output: Tensor) -> Tensor:
        if name == "bias":
            return grad_output.flatten(2).sum(2).square().sum(0)
        return super().sum_grad_squared(call, name, grad_output)

    def summed_grad(self, call: ModuleCall, name: str, grad_output: Tensor) -> Tensor:
        if name == "bias":
            return grad_output.flatten(2).sum((0, 2))
        left, right = self._weight_factors(call, grad_output, grad=True)
        return einsum(left, right, "n g a p, n g b p -> g a b").reshape(call.module.weight.shape)

    # diagonal of the weight / bias block (D.4: H_W = ([[X]]^T kron I)^T H_Z ([[X]]^T kron I))
    def param_diag(self, call: ModuleCall, name: str, factors: list[Factor]) -> Tensor:
        """``diag(sum_{v,n} sign (J_p^T s)(J_p^T s)^T)``, shape ``param.shape``.

        Sqrt factors ``[V, N, C_out, *out]`` are processed in chunks over ``V``
        (``CHUNK_BYTES``); a :class:`DiagonalFactor` ``diag(d_n)`` needs no
        per-column work: for Conv ``sum_{n,p} d_{n,o,p} u_{n,s,p}^2``.
        """
        shape = call.module.weight.shape if name == "weight" else call.module.bias.shape
        result = 0
        for f in factors:
            if isinstance(f, LocalFactor):
                result = result + self._param_diags_local(call, f)[name]
                continue
            if isinstance(f, DiagonalFactor):
                d = f.signed_square()  # [N, C_out, *out]
                if name == "bias":
                    result = result + d.flatten(2).sum((0, 2))
                else:
                    left, right = self._weight_factors(call, d, square_input=True)
                    diag = einsum(left, right, "n g a p, n g b p -> g a b")
                    result = result + diag.reshape(shape)
                continue
            if name == "bias":
                per_sample = f.S.flatten(3).sum(3)  # [V, N, C_out]
                result = result + SqrtFactor(per_sample, f.sign).signed_square().sum((0, 1))
                continue
            result = result + self._weight_diag(call, f).reshape(shape)
        return result

    def _weight_diag(self, call: ModuleCall, f: SqrtFactor) -> Tensor:
        """``sum_{v,n} sign (J_W^T s_{v,n})^2`` of a dense sqrt factor, in chunks over ``V``."""
        V, N = f.S.shape[:2]
        per_column = N * self._column_numel(call) * f.S.element_size()
        chunk = max(1, CHUNK_BYTES // per_column)
        result = 0
        for start in range(0, V, chunk):
            left, right = self._weight_factors(call, f.S[start : start + chunk])
            if self._output_left:
                JtS = einsum(left, right, "v n g a p, n g b p -> v n g a b")
            else:
                JtS = einsum(left, right, "n g a p, v n g b p -> v n g a b")
            sign = None if f.sign is None else f.sign[start : start + chunk]
            result = result + SqrtFactor(JtS, sign).signed_square().sum((0, 1))
        return result

    def _param_diags_local(self, call: ModuleCall, f: LocalFactor) -> dict[str, Tensor]:
        """``param_diag`` of every parameter from one pass over the chunks of ``f`` (cached).

        A lazy factor recomputes its pending steps per chunk: one pass serves weight and bias.
        """
        key = ("conv_local_diag", id(f))  # f lives in the message during this call's hook
        if key not in call.cache:
            names = self.param_names(call.module)
            diags = dict.fromkeys(names, 0)
            for chunk in f.chunks(consumer_numel=self._column_numel(call)):
                # one patch: a dense factor (cropped to the map) for the dense kernels
                dense = chunk.tidy().to_sqrt() if math.prod(chunk.geom.anchors) == 1 else None
                for name in names:
                    if dense is not None:
                        diag = self.param_diag(call, name, [dense])
                    else:
                        diag = self._param_diag_local(call, name, chunk)
                    diags[name] = diags[name] + diag
            call.cache[key] = diags
        return call.cache[key]

    def _param_diag_local(self, call: ModuleCall, name: str, chunk: LocalValues) -> Tensor:
        """``param_diag`` of local columns ``[C_j, *A, N, C_out, *patch]`` (see ConvRules)."""
        raise NotImplementedError


class ConvRules(_ConvBase):
    """HBP rules of ``nn.Conv1d/2d/3d`` (supplement D.3/D.4, eq. S.13/S.14).

    Any kernel size, stride, dilation, groups, bias or not, integer or string
    padding and every ``padding_mode``. Inputs must be batched, ``[N, C_in, *in]``.
    """

    kron_from_blocks = True
    param_only_cache = ("conv_unfold",)

    def _prepad(self, call: ModuleCall) -> tuple[list[int], str] | None:
        """``(F.pad's pad list, mode)`` of the index map in front of the convolution, if any."""
        module = call.module
        sides = _padding_sides(module)
        if module.padding_mode == "zeros" and all(a == b for a, b in sides):
            return None
        pad = [p for side in reversed(sides) for p in side]  # F.pad: last dimension first
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return pad, mode

    # local columns (curvature/local.py) ---------------------------------------------------
    def supports_local(self, call: ModuleCall) -> bool:
        return call.module.padding_mode == "zeros"

    def local_step(self, call: ModuleCall) -> LocalStep:
        """``J^T`` (D.4) on patches: a transposed convolution of each patch, no padding."""
        m = call.module
        left = [a for a, _ in _padding_sides(m)]
        size = call.inputs[0].shape[2:]
        return ConvTransposeStep(m.weight.detach(), m.stride, m.dilation, m.groups, left, size)

    def _param_diag_local(self, call: ModuleCall, name: str, chunk: LocalValues) -> Tensor:
        """``sum_{j,n} sign (J_p^T v_{j,n})^2`` for local columns ``v`` (D.4, S.14).

        Column ``j`` of sample ``n`` lives on output positions ``start_j + o``; its weight
        derivative is ``sum_o v[:, o] u[:, start_j + o]^T`` per group, with ``u`` the
        unfolded input ``[[x_n]]`` ``[S, *out]`` read on the same patch (zero outside).
        """
        columns = chunk.columns()  # [J, N, C_out, *patch]
        if name == "bias":
            per_sample = columns.S.flatten(3).sum(3)  # [J, N, C_out]
            return SqrtFactor(per_sample, columns.sign).signed_square().sum((0, 1))
        G = call.module.groups
        u = self.unfold(call)
        u = windows(u.reshape(*u.shape[:2], *call.output_shape[2:]), chunk.geom)
        u = u.reshape(u.shape[0], G, -1, math.prod(chunk.geom.anchors), math.prod(chunk.geom.patch))
        v = chunk.values.reshape(
            chunk.values.shape[0], u.shape[3], u.shape[0], G, -1, u.shape[-1]
        )  # [C_j, A, N, G, C_out/G, P]
        JtV = einsum(v, u, "j a n g o p, n g s a p -> j a n g o s")
        sq = JtV.square_()  # entries outside the output map meet zeros of the windowed input
        if chunk.sign is not None:
            sq = sq.mul_(chunk.sign.reshape(*v.shape[:3], 1, 1, 1))
        return sq.sum((0, 1, 2)).reshape(call.module.weight.shape)

    # the weight diagonal from a dense sqrt factor (the hot loop of DiagGGNExact) ------------
    def _weight_diag(self, call: ModuleCall, f: SqrtFactor) -> Tensor:
        """``sum_{v,n} sign (s_{v,n} [[x_n]]^T)^2`` (S.14), ``[weight.numel()]``.

        Batched products of the cached ``[[x]]`` with the ``V`` columns of a few samples
        stacked (``[V C_out, P] @ [P, S]`` per sample; one column at a time, without the
        copy, for short patches ``S`` < :data:`STACK_MIN_PATCH`), landing in a reused buffer of
        :data:`BUFFER_BYTES` that is squared in place and reduced while still in cache: no
        ``[V, N, C_out, S]`` tensor. (Per-sample weight gradients as one convolution
        grouped over samples avoid ``[[x]]`` and are faster on one thread, but oneDNN runs
        grouped weight gradients single-threaded and about 50x slower with 2 threads.)
        """
        if call.module.groups == 1:
            return self._weight_diag_unfolded(call, f)
        return super()._weight_diag(call, f)

    def _weight_diag_unfolded(self, call: ModuleCall, f: SqrtFactor) -> Tensor:
        """:meth:`_weight_diag` from the cached ``[[x]]`` (``groups == 1``)."""
        S, sign = f.S.flatten(3), f.sign  # [V, N, C_out, P]
        V, N, C_out, P = S.shape
        ut = self.unfold(call).mT  # [N, P, S], a view
        K = ut.shape[-1]
        col_bytes = C_out * K * S.element_size()
        vb = max(1, min(V, BUFFER_BYTES // col_bytes)) if K >= STACK_MIN_PATCH else 1
        nb = max(1, min(N, BUFFER_BYTES // (vb * col_bytes)))
        buffer = S.new_empty(nb * vb * C_out * K)
        result = S.new_zeros(C_out * K)
        for v0 in range(0, V, vb):
            v1 = min(V, v0 + vb)
            for n0 in range(0, N, nb):
                n1 = min(N, n0 + nb)
                b, c = n1 - n0, v1 - v0
                left = S[v0:v1, n0:n1].transpose(0, 1).reshape(b, c * C_out, P)  # (n, (v, o))
                out = buffer[: b * c * C_out * K].view(b, c * C_out, K)
                torch.bmm(left, ut[n0:n1], out=out)
                w = None if sign is None else sign[v0:v1, n0:n1].T.reshape(-1)
                result += _square_sum(out.view(b * c, C_out * K), w)
        return result

    def _conv_padding(self, call: ModuleCall) -> tuple[int, ...]:
        """Zero padding of the convolution that follows the pre-padding."""
        if self._prepad(call) is not None:
            return (0,) * self._dims(call)
        return tuple(left for left, _ in _padding_sides(call.module))

    def _conv_kwargs(self, call: ModuleCall) -> dict:
        m = call.module
        return dict(
            stride=m.stride, padding=self._conv_padding(call), dilation=m.dilation, groups=m.groups
        )

    def _padded_shape(self, call: ModuleCall) -> torch.Size:
        """Shape ``[N, C_in, *in']`` of the input after the pre-padding."""
        shape = call.inputs[0].shape
        if self._prepad(call) is None:
            return shape
        sides = _padding_sides(call.module)
        spatial = [s + a + b for s, (a, b) in zip(shape[2:], sides)]
        return torch.Size([*shape[:2], *spatial])

    def _work_features(self, call: ModuleCall) -> int:
        return math.prod(self._padded_shape(call)[1:])

    # the pre-padding as an index map (D.2) ----------------------------------------------------
    def _pad(self, call: ModuleCall, t: Tensor) -> Tensor:
        """``[B, C, *in] -> [B, C, *in']``: the pre-padding, if any."""
        prepad = self._prepad(call)
        if prepad is None:
            return t
        pad, mode = prepad
        return F.pad(t, pad, mode=mode)

    def _pad_t(self, call: ModuleCall, t: Tensor) -> Tensor:
        """``[B, C, *in'] -> [B, C, *in]``: transpose of the pre-padding (D.2, ``Pi^T``)."""
        prepad = self._prepad(call)
        if prepad is None:
            return t
        in_shape = call.inputs[0].shape[2:]
        if prepad[1] == "constant":  # the transpose of zero padding crops
            sides = _padding_sides(call.module)
            crop = tuple(slice(a, a + n) for (a, _), n in zip(sides, in_shape))
            return t[(slice(None), slice(None), *crop)]
        out = t.new_zeros(*t.shape[:2], math.prod(in_shape))
        out.index_add_(2, self._pad_index(call), t.flatten(2))
        return out.reshape(*t.shape[:2], *in_shape)

    def _pad_index(self, call: ModuleCall) -> Tensor:
        """``pi``: padded position ``j`` holds input position ``pi(j)`` (flat, D.2)."""
        if "conv_pad_index" not in call.cache:
            pad, mode = self._prepad(call)
            in_shape = call.inputs[0].shape[2:]
            # float64 holds every index exactly; F.pad's modes need floating point
            positions = torch.arange(math.prod(in_shape), dtype=torch.float64)
            padded = F.pad(positions.reshape(1, 1, *in_shape), pad, mode=mode)
            call.cache["conv_pad_index"] = padded.flatten().long().to(call.inputs[0].device)
        return call.cache["conv_pad_index"]

    # input derivatives (eq. S.14 / D.4: [[X]] -> I_P kron W) ---------------------------------
    def _jac_t(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[B, C_out, *out] -> [B, C_in, *in]``: a transposed convolution (D.4, D.2)."""
        m = call.module
        padded = self._padded_shape(call)[2:]
        padding = self._conv_padding(call)
        # the trailing input positions a strided kernel never reaches (fewer than the stride)
        extra = [
            n + 2 * p - ((o - 1) * s + dil * (k - 1) + 1)
            for n, o, p, s, dil, k in zip(
                padded, mat.shape[2:], padding, m.stride, m.dilation, m.kernel_size
            )
        ]
        # conv_transpose runs oneDNN's backward-data kernel directly: cheaper than
        # torch.nn.grad.conv*_input (convolution_backward) for the V * N columns
        out = _CONV_TRANSPOSE[self._dims(call)](
            mat,
            m.weight.detach(),
            None,
            stride=m.stride,
            padding=padding,
            output_padding=extra,
            groups=m.groups,
            dilation=m.dilation,
        )
        return self._pad_t(call, out)

    def _jac(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[B, C_in, *in] -> [B, C_out, *out]``: the convolution without bias (eq. S.14)."""
        return self._apply_weight(call, mat, call.module.weight.detach())

    def _apply_weight(self, call: ModuleCall, x: Tensor, weight: Tensor) -> Tensor:
        conv = _CONV[self._dims(call)]
        return conv(self._pad(call, x), weight, None, **self._conv_kwargs(call))

    def param_jac_t_mat_prod_sum(self, call: ModuleCall, name: str, mat: Tensor) -> Tensor:
        """``[K, N, C_out, *out] -> [K, *S]``: ``sum_n M_{k,n} [[x_n]]^T`` (S.14) or ``sum m``.

        The weight part is the weight gradient of one convolution with the ``K``
        kernels stacked (as in :meth:`param_jac_mat_prod`), without unfolding ``x``.
        """
        if name == "bias":
            return super().param_jac_t_mat_prod_sum(call, name, mat)
        K, G = mat.shape[0], call.module.groups
        W = call.module.weight
        grad_out = mat.unflatten(2, (G, -1)).movedim(0, 2).flatten(1, 3)  # [N, G K C_out/G, *out]
        size = [K * W.shape[0], *W.shape[1:]]
        conv_weight = _CONV_WEIGHT[self._dims(call)]
        x = self._pad(call, call.input)
        stacked = conv_weight(x, size, grad_out, **self._conv_kwargs(call))
        return stacked.unflatten(0, (G, K, -1)).transpose(0, 1).reshape(K, *W.shape)

    # exact position blocks of J^T H J from a dense H (curvature/blocks.py) ----------
    def check_blocks(self, call: ModuleCall, from_blocks: bool) -> None:
        """Exact only from a dense ``H`` and with zero padding (an injective pre-padding)."""
        if from_blocks or call.module.padding_mode != "zeros":
            super().check_blocks(call, from_blocks)

    def ea_blocks(self, call: ModuleCall, mat: Tensor | PositionBlocks) -> PositionBlocks:
        """Position blocks ``[P_in, C_in, C_in]`` of ``J^T H J`` for a dense ``H`` (D.4).

        Input position ``p`` is seen by output ``o(p, k)`` through kernel offset ``k``, so
        ``B_p = sum_{k, k'} W_k^T H[(:, o(p, k)), (:, o(p, k'))] W_k'`` with ``W_k``
        ``[C_out, C_in]`` the kernel at offset ``k`` (zero across groups). Only the
        ``K^2`` output-position pairs of each input position are gathered, in chunks.
        """
        module = call.module
        C_out = module.out_channels
        P_out = math.prod(call.output_shape[2:])
        out_pos, valid = self._seen_by(call)  # [P_in, K]
        P_in, K = out_pos.shape
        H = mat.reshape(C_out, P_out, C_out, P_out)
        W = _dense_kernel(module.weight.detach(), module.groups)  # [C_out, C_in, K]
        Wk = rearrange(W, "c a k -> (k c) a")
        chans = torch.arange(C_out, device=H.device)
        c1, c2 = chans.reshape(1, 1, -1, 1, 1), chans.reshape(1, 1, 1, 1, -1)
        chunk = max(1, CHUNK_BYTES // (K * K * C_out * C_out * H.element_size()))
        blocks = []
        for start in range(0, P_in, chunk):
            o, v = out_pos[start : start + chunk], valid[start : start + chunk].to(H.dtype)
            E = H[c1, o[:, :, None, None, None], c2, o[:, None, None, :, None]]  # [p, K, C, K, C]
            E = E * (v[:, :, None, None, None] * v[:, None, None, :, None])
            E = E.reshape(-1, K * C_out, K * C_out)
            blocks.append(Wk.T @ E @ Wk)
        return PositionBlocks(torch.cat(blocks), tuple(call.inputs[0].shape[2:]))

    def _seen_by(self, call: ModuleCall) -> tuple[Tensor, Tensor]:
        """``(o, valid)`` ``[P_in, K]``: the output position that sees input ``p`` at offset ``k``.

        ``o = (p + left - k * dilation) / stride`` per spatial axis, valid where that is
        an integer inside the output (invalid entries hold ``0``).
        """
        module = call.module
        d = self._dims(call)
        ins, outs = call.inputs[0].shape[2:], call.output_shape[2:]
        sides = _padding_sides(module)
        o_flat, valid = torch.zeros((), dtype=torch.long), torch.ones((), dtype=torch.bool)
        for i in range(d):
            p = torch.arange(ins[i]).unsqueeze(1)
            k = torch.arange(module.kernel_size[i]).unsqueeze(0)
            num = p + sides[i][0] - k * module.dilation[i]
            o = torch.div(num, module.stride[i], rounding_mode="floor")
            ok = (num % module.stride[i] == 0) & (o >= 0) & (o < outs[i])
            view = [1] * (2 * d)
            view[i], view[d + i] = ins[i], module.kernel_size[i]
            o_flat = o_flat * outs[i] + o.reshape(view)
            valid = valid & ok.reshape(view)
        P_in, K = math.prod(ins), math.prod(module.kernel_size)
        o_flat, valid = o_flat.reshape(P_in, K), valid.reshape(P_in, K)
        device = call.inputs[0].device
        return torch.where(valid, o_flat, 0).to(device), valid.to(device)

    # the unfolded input (eq. S.14's [[X]]), computed once per call ----------------------------
    def _x_full(self, call: ModuleCall) -> Tensor:
        """The input with all its padding, ``[N, C_in, *in'']`` (cached)."""
        if "conv_x" not in call.cache:
            x = self._pad(call, call.input)
            zeros = [p for p in reversed(self._conv_padding(call)) for _ in range(2)]
            call.cache["conv_x"] = F.pad(x, zeros) if any(zeros) else x
        return call.cache["conv_x"]

    def unfold(self, call: ModuleCall) -> Tensor:
        """``[[x]]`` of eq. S.14 for all samples, ``[N, C_in * prod(k), P]`` (cached).

        Same layout as ``torch.nn.functional.unfold``: rows ``(c_in, k_1, ..., k_d)``,
        columns the output positions in row-major order.
        """
        if "conv_unfold" not in call.cache:
            w = _windows(self._x_full(call), call.module)
            call.cache["conv_unfold"] = _flat_windows(w, self._dims(call))
        return call.cache["conv_unfold"]

    def _weight_factors(
        self, call: ModuleCall, out: Tensor, square_input: bool = False, grad: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``out`` ``[*, N, G, C_out/G, P]`` and ``[[x]]`` ``[N, G, S, P]`` (squared if asked)."""
        u = self.unfold(call)
        u = u.square() if square_input else u
        return self._grouped(call, out), u.unflatten(1, (call.module.groups, -1))

    # Kronecker factors ----------------------------------------------------------------------
    def _check_kron(self, call: ModuleCall, name: str) -> None:
        if name == "weight" and call.module.groups != 1:
            raise NotImplementedError(
                f"Kronecker factors of the weight of {call.module} (groups="
                f"{call.module.groups}) are not supported: the block of a grouped convolution "
                "is a different Kronecker product per group and does not fit one [G, A]"
            )

    def input_factor(self, call: ModuleCall, approx: str) -> Tensor:
        """``A`` ``[S, S]``: ``1/(NP) sum_{n,p} u u^T`` (expand) or ``1/N sum_n ubar ubar^T``.

        ``reduce`` averages the patches over positions on the strided view of the
        input, without materialising ``[[x]]``.
        """
        key = ("conv_A", approx)
        if key not in call.cache:
            if approx == "reduce":
                d = self._dims(call)
                w = _windows(self._x_full(call), call.module)  # [N, C, *out, *k], a view
                ubar = w.mean(tuple(range(2, 2 + d))).flatten(1)  # [N, C * prod(k)]
                call.cache[key] = ubar.T @ ubar / ubar.shape[0]
            else:
                u = self.unfold(call)
                N, K, P = u.shape
                if 2 * K >= P and call.module.groups == 1:
                    # sum_{n,p} u u^T is the weight gradient of the convolution of x with
                    # the patches as output: one oneDNN call, no permuted copy of [[x]]
                    m, d = call.module, self._dims(call)
                    x = self._x_full(call)
                    patches = u.reshape(N, K, *call.output_shape[2:])
                    size = [K, *m.weight.shape[1:]]
                    A = _CONV_WEIGHT[d](x, size, patches, stride=m.stride, dilation=m.dilation)
                    call.cache[key] = A.reshape(K, K) / (N * P)
                else:
                    call.cache[key] = _gram(u) / (N * P)
        return call.cache[key]

    def _kron(self, call: ModuleCall, name: str, G: Tensor, approx: str) -> list[Tensor]:
        if name == "bias":
            return [G]
        return [G, self.input_factor(call, approx)]

    def kron_from_sqrt(
        self, call: ModuleCall, name: str, factors: list[Factor], approx: str
    ) -> list[Tensor]:
        """``G = sum_{v,n,p} sign s s^T`` (expand) or ``sum_{v,n} sign (sum_p s)(sum_p s)^T``."""
        self._check_kron(call, name)
        G = 0
        for f in factors:
            if isinstance(f, LocalFactor):  # the columns on their patches: zero elsewhere
                key = ("conv_local_G", id(f), approx)  # one pass for weight and bias
                if key not in call.cache:
                    chunks = f.chunks()
                    call.cache[key] = sum(self._output_factor(c.columns(), approx) for c in chunks)
                G = G + call.cache[key]
                continue
            if isinstance(f, DiagonalFactor):
                # diag(d_n) = sum_j d_n[j] e_j e_j^T: both approximations give the diagonal
                G = G + torch.diag(f.signed_square().flatten(2).sum((0, 2)))
                continue
            key = ("conv_G", id(f.S), approx)  # one product for weight and bias
            cached = call.cache.get(key)
            if cached is None or cached[0] is not f.S:
                cached = call.cache[key] = (f.S, self._output_factor(f, approx))
            G = G + cached[1]
        return self._kron(call, name, G, approx)

    def _output_factor(self, f: SqrtFactor, approx: str) -> Tensor:
        """``G`` of one sqrt factor ``[V, N, C_out, *positions]`` (expand / reduce)."""
        S, Ssigned = f.S.flatten(3), f.signed().flatten(3)  # [V, N, C_out, P]
        if approx == "reduce":
            return einsum(Ssigned.sum(3), S.sum(3), "v n o, v n q -> o q")
        V, N, C_out, P = S.shape
        if C_out > P:  # sum_{r,p} a b^T as the weight gradient of a 1x1 convolution
            a, b = Ssigned.reshape(V * N, C_out, P), S.reshape(V * N, C_out, P)
            return _CONV_WEIGHT[1](b, [C_out, C_out, 1], a).reshape(C_out, C_out)
        return _gram(Ssigned.flatten(0, 1), S.flatten(0, 1))

    def kron_from_average(
        self, call: ModuleCall, name: str, mat: Tensor | PositionBlocks, approx: str
    ) -> list[Tensor]:
        """From ``H`` ``[C_out P, C_out P]``: sum of its diagonal position blocks / all blocks.

        Position blocks (``curvature/blocks.py``) give the expand factor exactly.
        """
        self._check_kron(call, name)
        if isinstance(mat, PositionBlocks):
            if approx != "expand":
                raise NotImplementedError(_REDUCE_NEEDS_DENSE.format(module=call.module))
            return self._kron(call, name, mat.sum_blocks(), approx)
        C_out = call.output_shape[1]
        H = rearrange(mat, "(o p) (q r) -> o p q r", o=C_out, q=C_out)
        return self._kron(call, name, output_factor_from_average(H, approx), approx)


class ConvTransposeRules(_ConvBase):
    """HBP rules of ``nn.ConvTranspose1d/2d/3d``, the adjoints of convolutions (D.4).

    ``z = conv_transpose(x, W) + b`` with ``W`` ``[C_in, C_out/groups, *k]``: the
    transposed input Jacobian is the convolution ``conv(., W)``, and the weight
    derivative of one sample is ``sum_p x_p [[g]]_p^T`` per group, with
    ``[[g]]`` ``[C_out/groups * prod(k), P_in]`` the patches of the output-side
    tensor ``g`` (``unfold`` with the module's kernel, stride, padding, dilation).
    Any ``output_padding`` (also implied by ``output_size``), groups, dilation.
    Kronecker factors are not supported.
    """

    _output_left = False

    def _kwargs(self, call: ModuleCall) -> dict:
        m = call.module
        return dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)

    def _output_padding(self, call: ModuleCall) -> tuple[int, ...]:
        """The output padding the forward pass used (``output_size`` may have set it)."""
        m = call.module
        ins, outs = call.inputs[0].shape[2:], call.output_shape[2:]
        return tuple(
            o - ((i - 1) * s - 2 * p + dil * (k - 1) + 1)
            for i, o, s, p, dil, k in zip(ins, outs, m.stride, m.padding, m.dilation, m.kernel_size)
        )

    def _column_numel(self, call: ModuleCall) -> int:
        # the weight's derivative and the patches of the factor column, [C_out * prod(k), P_in]
        patches = call.output_shape[1] * math.prod(call.module.kernel_size)
        return max(call.module.weight.numel(), patches * math.prod(call.inputs[0].shape[2:]))

    def _crop_input(self, call: ModuleCall, t: Tensor) -> Tensor:
        """Keep the first ``in`` positions (an output padding can add unused ones)."""
        in_shape = call.inputs[0].shape[2:]
        if t.shape[2:] == in_shape:
            return t
        return t[(slice(None), slice(None), *(slice(n) for n in in_shape))]

    def _jac_t(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[B, C_out, *out] -> [B, C_in, *in]``: the convolution ``conv(mat, W)``."""
        conv = _CONV[self._dims(call)]
        out = conv(mat, call.module.weight.detach(), None, **self._kwargs(call))
        return self._crop_input(call, out)

    def _jac(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[B, C_in, *in] -> [B, C_out, *out]``: the transposed convolution without bias."""
        return self._apply_weight(call, mat, call.module.weight.detach())

    def _apply_weight(self, call: ModuleCall, x: Tensor, weight: Tensor) -> Tensor:
        conv_t = _CONV_TRANSPOSE[self._dims(call)]
        m = call.module
        return conv_t(
            x,
            weight,
            None,
            stride=m.stride,
            padding=m.padding,
            output_padding=self._output_padding(call),
            groups=m.groups,
            dilation=m.dilation,
        )

    def unfold_output(self, call: ModuleCall, t: Tensor) -> Tensor:
        """``[*, C_out, *out] -> [*, C_out * prod(k), P_in]``: patches of an output-side tensor."""
        d = self._dims(call)
        lead = t.shape[: -d - 1]
        flat = t.reshape(-1, *t.shape[-d - 1 :])
        zeros = [p for p in reversed(call.module.padding) for _ in range(2)]
        flat = F.pad(flat, zeros) if any(zeros) else flat
        w = _windows(flat, call.module, call.inputs[0].shape[2:])
        return _flat_windows(w, d).reshape(*lead, -1, math.prod(call.inputs[0].shape[2:]))

    def _weight_factors(
        self, call: ModuleCall, out: Tensor, square_input: bool = False, grad: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``x`` ``[N, G, C_in/G, P_in]`` (squared if asked), ``[[out]]`` ``[*, N, G, ., P_in]``."""
        x = call.input.square() if square_input else call.input
        if grad:  # the patches of grad_output, shared by the first-order quantities
            if "conv_transpose_unfold_grad" not in call.cache:
                call.cache["conv_transpose_unfold_grad"] = self.unfold_output(call, out)
            patches = call.cache["conv_transpose_unfold_grad"]
        else:
            patches = self.unfold_output(call, out)
        groups = call.module.groups
        return self._grouped(call, x), patches.unflatten(-2, (groups, -1))

    def kron_from_sqrt(self, call, name, factors, approx) -> list[Tensor]:
        raise self._no_kron(call)

    def kron_from_average(self, call, name, mat, approx) -> list[Tensor]:
        raise self._no_kron(call)

    def _no_kron(self, call: ModuleCall) -> NotImplementedError:
        return NotImplementedError(
            f"Kronecker factors (KFAC, KFLR, KFRA, HBP) of {call.module} are not supported: "
            "hbpkit has Kronecker factors for Linear and Conv1d/2d/3d only"
        )


_REDUCE_NEEDS_DENSE = (
    "KFRA / HBP(backprop='batch-average') with kfac_approx='reduce' needs all position blocks "
    "of the batch-averaged curvature at the output of {module}, whose dense form exceeds the "
    "memory budget (hbpkit.curvature.memory.MAX_DENSE_BYTES); use kfac_approx='expand' (exact "
    "from the diagonal position blocks) or raise the budget"
)


def _dense_kernel(weight: Tensor, groups: int) -> Tensor:
    """``[C_out, C_in/groups, *k] -> [C_out, C_in, K]``, zero between different groups."""
    C_out, C_in_g = weight.shape[:2]
    flat = weight.reshape(groups, C_out // groups, C_in_g, -1)
    dense = weight.new_zeros(groups, C_out // groups, groups, C_in_g, flat.shape[-1])
    for g in range(groups):
        dense[g, :, g] = flat[g]
    return dense.reshape(C_out, groups * C_in_g, -1)


def _square_sum(t: Tensor, weights: Tensor | None) -> Tensor:
    """``sum_r weights[r] t[r]**2`` of ``[R, M]`` (``weights`` all 1 if ``None``); squares ``t``."""
    t = t.square_()
    return t.sum(0) if weights is None else weights.to(t.dtype) @ t


def _gram(a: Tensor, b: Tensor | None = None) -> Tensor:
    """``sum_{r,p} a[r, :, p] b[r, :, p]^T`` for ``[R, S, P]`` tensors (``b`` defaults to ``a``).

    A batched product summed over ``R`` where its ``[R, S, S]`` fits in the memory
    of the inputs (no permuted copy), else one contraction.
    """
    b = a if b is None else b
    R, S, P = a.shape
    if S <= P:
        return (a @ b.mT).sum(0)
    return einsum(a, b, "r s p, r t p -> s t")


CONV = ConvRules()
CONV_TRANSPOSE = ConvTransposeRules()

#: convolution module types and their rules
CONVOLUTIONS: dict[type, ModuleRules] = {
    nn.Conv1d: CONV,
    nn.Conv2d: CONV,
    nn.Conv3d: CONV,
    nn.ConvTranspose1d: CONV_TRANSPOSE,
    nn.ConvTranspose2d: CONV_TRANSPOSE,
    nn.ConvTranspose3d: CONV_TRANSPOSE,
}

__all__ = [
    "CONVOLUTIONS",
    "ConvRules",
    "ConvTransposeRules",
]
