"""The rules of ``MergeBatch`` (``[N, T, *f] -> [N T, *f]``) on their own (float64).

Factor columns and product vectors are different objects: an exact per-token factor is
expanded to ``T`` columns per column (block-diagonal per sequence, signs kept), a marked
Monte-Carlo factor is merged (one column per draw and sign), a diagonal factor and a
product vector are reshaped.
"""

from __future__ import annotations

import pytest
import torch
from records import record

from hbpkit import extend
from hbpkit.curvature.factors import DiagonalFactor, SqrtFactor
from hbpkit.curvature.memory import DenseBudgetError, MemoryPolicy
from hbpkit.modules.losses import has_independent_rows, mark_independent_rows
from hbpkit.modules.tables import SECOND_ORDER
from hbpkit.reshaping import MergeBatch

DT = torch.float64
N, T, F = 2, 3, 4


def _call():
    module = extend(MergeBatch())
    x = torch.randn(N, T, F, dtype=DT, requires_grad=True)
    return SECOND_ORDER.lookup(module), record(module(x))


def _per_sequence_gram(f: SqrtFactor) -> torch.Tensor:
    """``sum_v sign S S^T`` per sequence, ``[N, T F, T F]``."""
    S = f.S.flatten(2)
    signed = S if f.sign is None else S * f.sign[:, :, None]
    return torch.einsum("vni,vnj->nij", signed, S)


def _block_diagonal(token_grams: torch.Tensor) -> torch.Tensor:
    """``[N T, F, F] -> [N, T F, T F]``: the per-token blocks on the diagonal."""
    out = torch.zeros(N, T, F, T, F, dtype=DT)
    grams = token_grams.reshape(N, T, F, F)
    for t in range(T):
        out[:, t, :, t] = grams[:, t]
    return out.reshape(N, T * F, T * F)


@pytest.mark.parametrize("signed", [False, True])
def test_exact_factor_is_expanded_block_diagonally(signed):
    torch.manual_seed(0)
    rules, call = _call()
    S = torch.randn(2, N * T, F, dtype=DT)
    sign = torch.randn(2, N * T).sign().to(DT) if signed else None
    f = SqrtFactor(S, sign)
    out = rules.jac_t_factor(call, f)
    assert out.S.shape == (2 * T, N, T, F)
    token = _per_sequence_gram(SqrtFactor(S.reshape(2, N * T, 1, F), sign))  # [N T, F, F]
    torch.testing.assert_close(_per_sequence_gram(out), _block_diagonal(token))


@pytest.mark.parametrize("signed", [False, True])
def test_sampled_factor_is_merged(signed):
    """One column per draw (and sign); the diagonal token blocks are the tokens' Grams,
    the cross blocks are products of independent draws (mean zero)."""
    torch.manual_seed(1)
    rules, call = _call()
    M = 3
    S = mark_independent_rows(torch.randn(M, N * T, F, dtype=DT))
    sign = torch.randn(M, N * T).sign().to(DT) if signed else None
    out = rules.jac_t_factor(call, SqrtFactor(S, sign))
    assert out.S.shape == ((2 * M if signed else M), N, T, F)
    assert has_independent_rows(out.S)
    gram = _per_sequence_gram(out).reshape(N, T, F, T, F)
    token = _per_sequence_gram(SqrtFactor(S.reshape(M, N * T, 1, F), sign)).reshape(N, T, F, F)
    for t in range(T):
        torch.testing.assert_close(gram[:, t, :, t], token[:, t])
    # all blocks: draws of tokens t, s of one sequence pair up where their signs agree
    s = torch.ones(M, N, T, dtype=DT) if sign is None else sign.reshape(M, N, T)
    pair = (s[:, :, :, None] == s[:, :, None, :]) * s[:, :, :, None]  # [M, N, T, T]
    S4 = S.reshape(M, N, T, F)
    expected = torch.einsum("mnts,mntf,mnsg->ntfsg", pair, S4, S4)
    torch.testing.assert_close(gram, expected)


def test_diagonal_factor_and_vectors_are_reshaped():
    torch.manual_seed(2)
    rules, call = _call()
    d = DiagonalFactor.from_values(torch.randn(N * T, F, dtype=DT))
    out = rules.jac_t_factor(call, d)
    assert isinstance(out, DiagonalFactor)
    torch.testing.assert_close(out.signed_square(), d.signed_square().reshape(N, T, F))
    V = torch.randn(5, N * T, F, dtype=DT)
    torch.testing.assert_close(rules.jac_t_mat_prod(call, V), V.reshape(5, N, T, F))
    torch.testing.assert_close(rules.jac_mat_prod(call, V.reshape(5, N, T, F)), V)


def test_expansion_is_budget_checked():
    rules, call = _call()
    call.memory = MemoryPolicy(max_dense_bytes=100)
    with pytest.raises(DenseBudgetError, match="MergeBatch"):
        rules.jac_t_factor(call, SqrtFactor(torch.randn(2, N * T, F, dtype=DT)))
