"""Losses on dense outputs and through ``MergeBatch`` against BackPACK 1.7.1 (float64).

BackPACK takes ``CrossEntropyLoss`` on ``[N, C, T]`` (its "additional dimensions"; its
``MSELoss`` refuses inputs that are not 2-D), without ``ignore_index`` or class weights;
hbpkit must give the same numbers there. ``MergeBatch`` has no BackPACK counterpart, but
the GGN diagonal is a sum over tokens, so hbpkit through ``MergeBatch`` must equal
BackPACK on the twin that feeds the tokens ``[N T, D]`` as samples.
"""

from __future__ import annotations

import copy

import pytest
import torch
from quantities import close
from torch import nn
from twins import run_backpack, run_extended

from hbpkit import extensions as hx
from hbpkit.reshaping import MergeBatch

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

DT = torch.float64


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sequence_cross_entropy_against_backpack(reduction):
    """``[N, C, T]`` logits: per-sample gradients and the exact GGN diagonal."""
    import backpack.extensions as bpext

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 4, 1), nn.Tanh(), nn.Conv1d(4, 5, 1)).double()
    X = torch.randn(3, 3, 6, dtype=DT)
    loss_fn, y = nn.CrossEntropyLoss(reduction=reduction), torch.randint(5, (3, 6))
    ours = run_extended(model, loss_fn, X, y, hx.BatchGrad(), hx.DiagGGNExact())
    theirs = run_backpack(model, loss_fn, X, y, bpext.BatchGrad(), bpext.DiagGGNExact())
    for p, q in zip(ours.parameters(), theirs.parameters()):
        close(p.grad_batch, q.grad_batch, "grad_batch")
        close(p.diag_ggn_exact, q.diag_ggn_exact, "diag_ggn_exact")


def test_merge_batch_against_backpack_on_token_samples():
    """GGN diagonal and the gradient through MergeBatch equal BackPACK's on the token twin."""
    import backpack.extensions as bpext

    torch.manual_seed(1)
    body = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    X = torch.randn(2, 5, 3, dtype=DT)
    y = torch.randint(4, (10,))
    loss_fn = nn.CrossEntropyLoss()
    ours = run_extended(
        nn.Sequential(*copy.deepcopy(body), MergeBatch()), loss_fn, X, y, hx.DiagGGNExact()
    )
    theirs = run_backpack(body, loss_fn, X.reshape(10, 3), y, bpext.DiagGGNExact())
    for p, q in zip(ours.parameters(), theirs.parameters()):
        close(p.grad, q.grad, "grad")
        close(p.diag_ggn_exact, q.diag_ggn_exact, "diag_ggn_exact")
