"""Rules of :class:`hbpkit.reshaping.MergeBatch`, ``z = x.flatten(0, 1)``: ``[N, T, *f] ->
[N T, *f]`` (a GPT's ``logits.view(-1, C)`` before its next-token loss).

The loss after it sees ``N T`` "samples" (tokens ``(n, t)``); the model's samples are the
``N`` sequences. The loss Hessian is block-diagonal over tokens, ``H_{(n,t)}``, so the
Hessian w.r.t. sequence ``n``'s input ``x_n`` ``[T, *f]`` is ``blockdiag_t(H_{(n,t)})``
(supplement eq. 7 with a permutation as Jacobian). Each quantity stays that of the
sequences:

* **Product vectors** (``jac_t_mat_prod`` / ``jac_mat_prod``, used by GGNMP / HMP /
  PCHMP): a vector ``[K, N T, *f]`` is a plain reshape of ``[K, N, T, *f]``, and
  ``H_{x_n} m_n = (H_{(n,t)} m_{n,t})_t``: the loss's product on the reshaped vector.
* **Exact sqrt factors** (``jac_t_factor``; KFLR, DiagGGNExact, DiagHessian, HBP
  ``exact``): the columns ``v`` of a factor ``[V, N T, *f]`` with ``sum_v s_v s_v^T =
  H_{(n,t)}`` become ``V T`` columns ``(v, t)`` of ``[V T, N, T, *f]``, column ``(v, t)``
  equal to ``s_{v,(n,t)}`` at token ``t`` and zero at the others, so that
  ``sum_{v,t} ... = blockdiag_t(H_{(n,t)})``. A plain reshape would be wrong: it would
  add the cross terms ``s_{v,(n,t)} s_{v,(n,t')}^T``.
* **Monte-Carlo sqrt factors** (KFAC, DiagGGNMC, HBP ``sampled``; marked by the loss
  rules, ``losses.mark_independent_rows``) are merged instead: one column per draw
  holds the draws of all ``T`` tokens (a plain reshape, ``[M, N, T, *f]``). Unbiased:
  the tokens' draws ``g_{(n,t)}`` are independent with mean zero, so the cross terms
  ``E[g_{(n,t)} g_{(n,t')}^T] = E[g_{(n,t)}] E[g_{(n,t')}]^T = 0`` vanish in expectation
  and ``E[g g^T] = blockdiag_t(H_{(n,t)})``. It carries ``M`` columns instead of
  ``M T`` (mostly zero). The Kronecker factors of a layer on ``[N, T, D]`` keep their
  conventions (``hbpkit/modules/linear.py``): with ``kfac_approx="expand"``
  ``G = sum_{m,n,t} s s^T`` reads only the diagonal token blocks, so ``G`` is *the same
  number* as with the ``T`` separate columns (and as for a model that treats the
  ``N T`` tokens as samples); with ``"reduce"``, ``G = sum_{m,n} (sum_t s)(sum_t s)^T``
  then contains the cross terms, and is unbiased for the same expectation.
  ``DiagGGNMC`` likewise stays unbiased, with the cross terms adding variance.
  Signed Monte-Carlo factors are merged per sign (``2M`` columns). The mark is on the
  tensor the loss rules return: a module with its own ``J^T`` between ``MergeBatch`` and
  the loss drops it, and the factor is then expanded like an exact one (unbiased too,
  with ``T`` times the columns).
* **Diagonal factors** (residuals of elementwise modules between ``MergeBatch`` and
  the loss) stay diagonal: a reshape.
* **Batch-averaged messages** (KFRA, ``backprop="batch-average"``) are refused (the
  rules do not implement ``ea_jac_t_mat_jac_prod``): the loss gives ``sum_{n,t}
  H_{(n,t)}``, from which the per-token blocks ``sum_n H_{(n,t)}`` of the sequences
  cannot be recovered.

First-order quantities (per-sample gradients) need no rules here: they come from the
gradient at each layer's output, ``[N, T, *]`` before the merge.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hbpkit.core.calls import ModuleCall
from hbpkit.curvature.factors import DiagonalFactor, Factor, SqrtFactor
from hbpkit.curvature.memory import check_dense_budget
from hbpkit.modules.base import ModuleRules
from hbpkit.modules.losses import ReducedLossRules, has_independent_rows, mark_independent_rows
from hbpkit.reshaping import MergeBatch, ReducedLoss

EXPAND_ADVICE = (
    "Exact per-sequence factors through MergeBatch carry T columns per column of the loss's "
    "factor; a Monte-Carlo extension (KFAC, DiagGGNMC) carries one per draw"
)


class MergeBatchRules(ModuleRules):
    """``[N, T, *f] -> [N T, *f]``: per-token curvature to per-sequence curvature (see the
    module docstring for factors versus product vectors)."""

    diagonal_jacobian = True  # a permutation: diagonal factors stay diagonal
    support_note = "batch-merging reshape (logits.view(-1, C)); exact per sequence, KFRA refused"

    def validate(self, call: ModuleCall) -> None:
        if call.inputs[0].dim() < 2:
            raise NotImplementedError(
                f"MergeBatch needs an input [N, T, *f], got shape {tuple(call.inputs[0].shape)}"
            )

    def _split(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[K, N T, *f] -> [K, N, T, *f]``."""
        return mat.reshape(mat.shape[0], *call.inputs[0].shape)

    def jac_t_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """Product vectors: ``[K, N T, *f] -> [K, N, T, *f]``, a reshape."""
        return self._split(call, mat)

    def jac_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """Product vectors: ``[K, N, T, *f] -> [K, N T, *f]``, a reshape."""
        return mat.reshape(mat.shape[0], *call.output_shape)

    def jac_t_factor(self, call: ModuleCall, factor: Factor) -> Factor:
        """Per-token factors to per-sequence factors (module docstring)."""
        if isinstance(factor, DiagonalFactor):
            shape = call.inputs[0].shape
            sign = None if factor.sign is None else factor.sign.reshape(shape)
            return DiagonalFactor(factor.s.reshape(shape), sign)
        if not isinstance(factor, SqrtFactor):  # a local factor (hbpkit.curvature.local)
            factor = factor.to_dense(call)
        if has_independent_rows(factor.S):
            return self._merge_sampled(call, factor)
        return self._expand_exact(call, factor)

    def _merge_sampled(self, call: ModuleCall, factor: SqrtFactor) -> SqrtFactor:
        """``[M, N T, *f] -> [M, N, T, *f]`` (per sign: ``[2M, N, T, *f]``)."""
        S, sign = factor.S, factor.sign
        if sign is None:
            return SqrtFactor(mark_independent_rows(self._split(call, S)))
        M = S.shape[0]
        mask = (sign > 0).to(S.dtype).reshape(*sign.shape, *([1] * (S.dim() - 2)))
        parts = [self._split(call, S * mask), self._split(call, S * (1 - mask))]
        merged = mark_independent_rows(torch.cat(parts))
        N = call.inputs[0].shape[0]
        new_sign = S.new_ones(2 * M, N)
        new_sign[M:] = -1
        return SqrtFactor(merged, new_sign)

    def _expand_exact(self, call: ModuleCall, factor: SqrtFactor) -> SqrtFactor:
        """``[V, N T, *f] -> [V T, N, T, *f]``, column ``(v, t)`` non-zero at token ``t`` only."""
        S, sign = factor.S, factor.sign
        V = S.shape[0]
        N, T = call.inputs[0].shape[:2]
        check_dense_budget(
            call,
            (V * T, *call.inputs[0].shape),
            S.dtype,
            "Expanding per-token curvature factors to per-sequence ones",
            EXPAND_ADVICE,
        )
        tokens = self._split(call, S).reshape(V, N, T, -1)
        out = S.new_zeros(V, T, N, T, tokens.shape[-1])
        for t in range(T):  # column (v, t): token t of every sequence
            out[:, t, :, t] = tokens[:, :, t]
        out = out.reshape(V * T, *call.inputs[0].shape)
        if sign is not None:
            sign = sign.reshape(V, N, T).transpose(1, 2).reshape(V * T, N)
        return SqrtFactor(out, sign)


#: the rules of the modules of ``hbpkit.reshaping`` (one entry of the dispatch tables)
RESHAPING = {MergeBatch: MergeBatchRules(), ReducedLoss: ReducedLossRules()}
