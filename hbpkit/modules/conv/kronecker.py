"""Kronecker factors of the weight (``[G C_out x C_out, A S x S]``).
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
approximation). With ``groups > 1`` the weight block is a
different Kronecker product per group (each group has its own ``A``), which does
not fit one ``[G, A]``: Kronecker factors of grouped weights raise
``NotImplementedError`` (the bias is fine).
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange
from torch import Tensor

from hbpkit.core.calls import ModuleCall
from hbpkit.curvature.blocks import PositionBlocks
from hbpkit.curvature.factors import DiagonalFactor, Factor, SqrtFactor
from hbpkit.curvature.local import LocalFactor
from hbpkit.curvature.memory import RAISE_BUDGET
from hbpkit.modules.base import output_factor_from_average
from hbpkit.modules.conv.geometry import _CONV_WEIGHT, _windows
from hbpkit.modules.roles import KroneckerRoles


class ConvKronecker(KroneckerRoles):
    """Kronecker factors of ``nn.Conv1d/2d/3d`` (a mixin of :class:`ConvRules`)."""

    def _check_kron_weight(self, call: ModuleCall) -> None:
        if call.module.groups != 1:
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

    # [G, A] for the weight, [G] for the bias: KroneckerRoles

    def _sqrt_output_factor(self, call: ModuleCall, factors: list[Factor], approx: str) -> Tensor:
        """``G = sum_{v,n,p} sign s s^T`` (expand) or ``sum_{v,n} sign (sum_p s)(sum_p s)^T``."""

        def of_local(f: LocalFactor) -> Tensor:  # the columns on their patches: zero elsewhere
            key = ("conv_local_G", id(f), approx)  # one pass for weight and bias
            if key not in call.cache:
                chunks = f.chunks()
                call.cache[key] = sum(self._output_factor(c.columns(), approx) for c in chunks)
            return call.cache[key]

        def of_dense(f: SqrtFactor) -> Tensor:
            key = ("conv_G", id(f.S), approx)  # one product for weight and bias
            cached = call.cache.get(key)
            if cached is None or cached[0] is not f.S:
                cached = call.cache[key] = (f.S, self._output_factor(f, approx))
            return cached[1]

        # diag(d_n) = sum_j d_n[j] e_j e_j^T: both approximations give the diagonal
        def of_diagonal(f: DiagonalFactor) -> Tensor:
            return torch.diag(f.signed_square().flatten(2).sum((0, 2)))

        return sum(f.match(dense=of_dense, diagonal=of_diagonal, local=of_local) for f in factors)

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

    def _average_output_factor(
        self, call: ModuleCall, mat: Tensor | PositionBlocks, approx: str
    ) -> Tensor:
        """From ``H`` ``[C_out P, C_out P]``: sum of its diagonal position blocks / all blocks.

        Position blocks (``curvature/blocks.py``) give the expand factor exactly.
        """
        if isinstance(mat, PositionBlocks):
            if approx != "expand":
                raise NotImplementedError(_REDUCE_NEEDS_DENSE.format(module=call.module))
            return mat.sum_blocks()
        C_out = call.output_shape[1]
        H = rearrange(mat, "(o p) (q r) -> o p q r", o=C_out, q=C_out)
        return output_factor_from_average(H, approx)


_REDUCE_NEEDS_DENSE = (
    "KFRA / HBP(backprop='batch-average') with kfac_approx='reduce' needs all position blocks "
    "of the batch-averaged curvature at the output of {module}, whose dense form exceeds the "
    "memory budget (MemoryPolicy.max_dense_bytes); use kfac_approx='expand' (exact "
    "from the diagonal position blocks) or raise the budget with " + RAISE_BUDGET
)


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
