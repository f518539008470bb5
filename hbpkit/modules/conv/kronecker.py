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
approximation).

**Groups.** With ``groups = g > 1`` the weight ``[C_out, C_in/g, *k]`` is, per group,
the matrix ``[C_out/g, C_in/g * prod(k)]`` of a convolution of the group's ``C_in/g``
input channels into its ``C_out/g`` output channels (eq. S.14 per group). The
approximation keeps the ``g`` diagonal blocks of the weight's curvature, each the
factors of that convolution alone: ``G_g`` the ``g``-th diagonal ``[C_out/g, C_out/g]``
block of the ``G`` above, ``A_g`` the ``A`` above on the group's patches ``u_g``
``[C_in/g * prod(k)]``. The factors are ``[G [g, C_out/g, C_out/g], A [g, S, S]]``
(``KroneckerFactors`` with groups: ``block_diag_g(G_g kron A_g)`` in ``p.flatten()``
order); the blocks between groups are dropped (they are not zero unless the output
curvature is block-diagonal over the groups, e.g. MSE on the layer's output). The bias
keeps the full ``[G]``. Depthwise convolutions (``g = C_in``) have ``S = prod(k)``.
"""

from __future__ import annotations

import math

import torch
from einops import einsum, rearrange
from torch import Tensor

from hbpkit.core.calls import ModuleCall
from hbpkit.curvature.blocks import PositionBlocks
from hbpkit.curvature.factors import DiagonalFactor, Factor, SqrtFactor
from hbpkit.curvature.kronecker import KroneckerFactors
from hbpkit.curvature.local import LocalFactor
from hbpkit.curvature.memory import RAISE_BUDGET
from hbpkit.modules.base import output_factor_from_average
from hbpkit.modules.conv.autocorrelation import autocorrelation_applies, patch_gram
from hbpkit.modules.conv.geometry import _CONV_WEIGHT, _windows
from hbpkit.modules.roles import KroneckerRoles


class ConvOutputKronecker(KroneckerRoles):
    """The output side of the Kronecker factors of convolutions and transposed convolutions
    (``G`` over the output channels, shared over the output positions), and the weight's
    factors per group of channels.

    Subclasses give the input factor ``A`` (``input_factor``: ``[S, S]``, ``[g, S, S]``
    with ``g = groups > 1``); ``_kron_transposed`` says whether the weight's first two
    dimensions are swapped before it is matricised (transposed convolutions).
    """

    _kron_transposed: bool = False

    def kron_from_sqrt_weight(self, call: ModuleCall, factors: list[Factor], approx: str):
        # a grouped weight without a trainable bias needs only the G_g: g (C_out/g)^2 entries
        # instead of C_out^2 (a depthwise layer: C_out times fewer); with one, the full G is
        # formed for the bias anyway and its blocks are taken
        bias = call.module.bias
        groups = 1 if bias is not None and bias.requires_grad else call.module.groups
        G = self._sqrt_output_factor(call, factors, approx, groups)
        return self._weight_kron(call, G, approx)

    def kron_from_average_weight(self, call: ModuleCall, mat, approx: str):
        return self._weight_kron(call, self._average_output_factor(call, mat, approx), approx)

    def _weight_kron(self, call: ModuleCall, G: Tensor, approx: str) -> list[Tensor]:
        """``[G, A]``, or per group ``[G_g, A_g]`` with ``G_g`` the diagonal blocks of ``G``.

        Group ``g`` of a grouped weight sees only its own input channels and writes only its
        own output channels: its block is ``G[g, g] kron A_g``, as for a convolution of
        those channels alone; the blocks between groups are dropped. ``G``: ``[C_out, C_out]``
        or its blocks ``[g, C_out/g, C_out/g]`` already.
        """
        groups = call.module.groups
        if groups != 1 and G.dim() == 2:
            G = group_blocks(G, groups)
        factors = [G, self.input_factor(call, approx)]
        if not self._kron_transposed and groups == 1:
            return factors
        return KroneckerFactors(factors, call.module.weight.shape, self._kron_transposed)

    # [G, A] for the weight, [G] for the bias: KroneckerRoles

    def _sqrt_output_factor(
        self, call: ModuleCall, factors: list[Factor], approx: str, groups: int = 1
    ) -> Tensor:
        """``G = sum_{v,n,p} sign s s^T`` (expand) or ``sum_{v,n} sign (sum_p s)(sum_p s)^T``;
        with ``groups > 1`` only its diagonal blocks ``[groups, C_out/groups, C_out/groups]``."""

        def of_local(f: LocalFactor) -> Tensor:  # the columns on their patches: zero elsewhere
            key = ("conv_local_G", id(f), approx, groups)  # one pass for weight and bias
            if key not in call.cache:
                chunks = f.chunks()
                call.cache[key] = sum(
                    self._output_factor(c.columns(), approx, groups) for c in chunks
                )
            return call.cache[key]

        def of_dense(f: SqrtFactor) -> Tensor:
            key = ("conv_G", id(f.S), approx, groups)  # one product for weight and bias
            cached = call.cache.get(key)
            if cached is None or cached[0] is not f.S:
                cached = call.cache[key] = (f.S, self._output_factor(f, approx, groups))
            return cached[1]

        # diag(d_n) = sum_j d_n[j] e_j e_j^T: both approximations give the diagonal
        def of_diagonal(f: DiagonalFactor) -> Tensor:
            d = f.signed_square().flatten(2).sum((0, 2))
            return torch.diag(d) if groups == 1 else torch.diag_embed(d.reshape(groups, -1))

        return sum(f.match(dense=of_dense, diagonal=of_diagonal, local=of_local) for f in factors)

    def _output_factor(self, f: SqrtFactor, approx: str, groups: int = 1) -> Tensor:
        """``G`` of one sqrt factor ``[V, N, C_out, *positions]`` (expand / reduce), or its
        ``groups`` diagonal blocks ``[groups, C_out/groups, C_out/groups]``."""
        S, Ssigned = f.S.flatten(3), f.signed().flatten(3)  # [V, N, C_out, P]
        if approx == "reduce":
            a, b = Ssigned.sum(3), S.sum(3)
            if groups == 1:
                return einsum(a, b, "v n o, v n q -> o q")
            a, b = a.unflatten(2, (groups, -1)), b.unflatten(2, (groups, -1))
            return einsum(a, b, "v n g o, v n g q -> g o q")
        V, N, C_out, P = S.shape
        m = C_out // groups
        if m > P:  # sum_{r,p} a b^T as the weight gradient of a (grouped) 1x1 convolution
            a, b = Ssigned.reshape(V * N, C_out, P), S.reshape(V * N, C_out, P)
            G = _CONV_WEIGHT[1](b, [C_out, m, 1], a, groups=groups).reshape(groups, m, m)
            return G[0] if groups == 1 else G
        if groups == 1:
            return _gram(Ssigned.flatten(0, 1), S.flatten(0, 1))
        a = Ssigned.flatten(0, 1).unflatten(1, (groups, -1))  # [R, g, m, P], m <= P
        b = S.flatten(0, 1).unflatten(1, (groups, -1))
        return (a @ b.mT).sum(0)

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


class ConvKronecker(ConvOutputKronecker):
    """Kronecker factors of ``nn.Conv1d/2d/3d`` (a mixin of :class:`ConvRules`)."""

    def input_factor(self, call: ModuleCall, approx: str) -> Tensor:
        """``A`` ``[S, S]`` (``[g, S, S]`` for ``g = groups > 1``): ``1/(NP) sum_{n,p} u u^T``
        (expand) or ``1/N sum_n ubar ubar^T`` (reduce), per group of input channels.

        ``reduce`` averages the patches over positions on the strided view of the
        input, without materialising ``[[x]]``; ``expand`` comes from the autocorrelation
        of the input over kernel offsets (``autocorrelation.py``) where the last spatial
        dimension has stride 1 and no dilation, else from ``[[x]]``.
        """
        key = ("conv_A", approx)
        if key not in call.cache:
            m, groups = call.module, call.module.groups
            if approx == "reduce":
                d = self._dims(call)
                w = _windows(self._x_full(call), m)  # [N, C, *out, *k], a view
                ubar = w.mean(tuple(range(2, 2 + d))).flatten(1)  # [N, C * prod(k)]
                call.cache[key] = grouped_input_factor(ubar.unsqueeze(2), groups, approx)
            elif autocorrelation_applies(
                m.kernel_size, m.stride, m.dilation, call.output_shape[-1]
            ):
                # from the autocorrelation of the input over kernel offsets: same sums, about
                # 1/k of the products of the patch Gram (autocorrelation.py, issue 17)
                x = self._x_full(call)
                A = _patch_gram_by_samples(x, m, groups)
                A = A / (x.shape[0] * math.prod(call.output_shape[2:]))
                call.cache[key] = A[0] if groups == 1 else A
            else:
                u = self.unfold(call)
                N, K, P = u.shape
                S = K // groups
                if 2 * S >= P:
                    # sum_{n,p} u u^T is the weight gradient of the (grouped) convolution of x
                    # with the patches as output: one oneDNN call, no permuted copy of [[x]]
                    d = self._dims(call)
                    patches = u.reshape(N, K, *call.output_shape[2:])
                    size = [K, *m.weight.shape[1:]]
                    A = _CONV_WEIGHT[d](
                        self._x_full(call),
                        size,
                        patches,
                        stride=m.stride,
                        dilation=m.dilation,
                        groups=groups,
                    )  # [g S, C_in/g, *k]: row block g pairs with the input channels of group g
                    A = A.reshape(groups, S, S) / (N * P)
                    call.cache[key] = A[0] if groups == 1 else A
                else:
                    call.cache[key] = grouped_input_factor(u, groups, approx)
        return call.cache[key]


_REDUCE_NEEDS_DENSE = (
    "KFRA / HBP(backprop='batch-average') with kfac_approx='reduce' needs all position blocks "
    "of the batch-averaged curvature at the output of {module}, whose dense form exceeds the "
    "memory budget (MemoryPolicy.max_dense_bytes); use kfac_approx='expand' (exact "
    "from the diagonal position blocks) or raise the budget with " + RAISE_BUDGET
)


#: the most memory the input unfolded along the leading spatial dimensions may take in one
#: call of ``patch_gram`` (it and its copies inside oneDNN's weight gradient are its
#: temporaries): below glibc's mmap threshold, so they reuse heap memory
PATCH_CHUNK_BYTES = 2**22


def _patch_gram_by_samples(x: Tensor, m: torch.nn.Module, groups: int) -> Tensor:
    """``patch_gram`` of ``x`` ``[N, C_in, *L]`` summed over chunks of samples (a sum over
    ``n``), each unfolding at most about ``PATCH_CHUNK_BYTES``."""
    per_sample = x[0].numel() * math.prod(m.kernel_size[:-1]) * x.element_size()
    step = max(1, PATCH_CHUNK_BYTES // per_sample)
    A = None
    for n in range(0, x.shape[0], step):
        part = patch_gram(x[n : n + step], m.kernel_size, m.stride, m.dilation, groups)
        A = part if A is None else A.add_(part)
    return A


def group_blocks(G: Tensor, groups: int) -> Tensor:
    """``[C, C] -> [groups, C/groups, C/groups]``: the diagonal blocks of ``G``."""
    m = G.shape[0] // groups
    blocks = torch.diagonal(G.reshape(groups, m, groups, m), dim1=0, dim2=2).permute(2, 0, 1)
    return blocks.contiguous()


def grouped_input_factor(u: Tensor, groups: int, approx: str) -> Tensor:
    """``A`` from patches ``u`` ``[N, groups * S, P]`` (rows group-major), per group.

    ``"expand"``: ``1/(NP) sum_{n,p} u u^T``; ``"reduce"``: ``1/N sum_n ubar ubar^T`` with
    ``ubar = 1/P sum_p u``. ``[S, S]`` for one group, else ``[groups, S, S]``.
    """
    N, _, P = u.shape
    u = u.unflatten(1, (groups, -1))  # [N, g, S, P]
    if approx == "reduce":
        ubar = u.mean(3)
        A = einsum(ubar, ubar, "n g s, n g t -> g s t") / N
    elif u.shape[2] <= P:
        A = (u @ u.mT).sum(0) / (N * P)
    else:
        A = einsum(u, u, "n g s p, n g t p -> g s t") / (N * P)
    return A[0] if groups == 1 else A


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
