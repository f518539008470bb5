"""KFLR against curvlinops' ``KFACLinearOperator`` with the type-2 Fisher (float64).

curvlinops 3.0.1 (installed by ``scripts/install.sh``) builds Kronecker factors from the
exact loss Hessian's square root, the same quantity as hbpkit's KFLR: where the
conventions match (separate weight and bias blocks, the loss as reduced, ``expand`` /
``reduce`` over weight sharing), every block of its operator equals ``kflr.to_dense()``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from curvlinops import KFACLinearOperator
from torch import nn

import hbpkit
from hbpkit import backprop, extend
from hbpkit.extensions import KFLR

DT = torch.float64


class Tokens(nn.Module):
    """``Linear`` layers on ``[N, T, D]`` (weight sharing over tokens), mean over tokens."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).mean(1)


CASES = {
    "mlp-ce": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), (4,), "ce"),
    "mlp-mse-sum": (
        lambda: nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 2)),
        (4,),
        "mse",
    ),
    "cnn-ce": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 3)
        ),
        (2, 4, 4),
        "ce",
    ),
}


def _dense_blocks(model, loss_fn, X, y, approx):
    params = list(model.parameters())
    operator = KFACLinearOperator(
        model,
        loss_fn,
        params,
        [(X, y)],
        fisher_type="type-2",
        kfac_approx=approx,
        check_deterministic=False,
    )
    dense = torch.as_tensor(operator @ torch.eye(sum(p.numel() for p in params), dtype=DT))
    blocks, start = [], 0
    for p in params:
        blocks.append(dense[start : start + p.numel(), start : start + p.numel()])
        start += p.numel()
    return blocks


@pytest.mark.parametrize("name", list(CASES))
def test_kflr_equals_curvlinops_type2(name):
    build, shape, loss = CASES[name]
    torch.manual_seed(0)
    model = build().double()
    X = torch.randn(6, *shape, dtype=DT)
    if loss == "ce":
        loss_fn, y = nn.CrossEntropyLoss(), torch.randint(0, 3, (6,))
    else:
        loss_fn, y = nn.MSELoss(reduction="sum"), torch.randn(6, 2, dtype=DT)
    expected = _dense_blocks(model, loss_fn, X, y, "expand")
    ours = extend(copy.deepcopy(model))
    with backprop(KFLR()):
        extend(copy.deepcopy(loss_fn))(ours(X), y).backward()
    for p, block in zip(ours.parameters(), expected):
        torch.testing.assert_close(p.kflr.to_dense(), block, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kflr_with_weight_sharing_equals_curvlinops_type2(approx):
    torch.manual_seed(0)
    model = Tokens().double()
    X, y = torch.randn(6, 4, 4, dtype=DT), torch.randint(0, 3, (6,))
    expected = _dense_blocks(model, nn.CrossEntropyLoss(), X, y, approx)
    ours = extend(hbpkit.convert(copy.deepcopy(model)))
    with backprop(KFLR(kfac_approx=approx)):
        extend(nn.CrossEntropyLoss())(ours(X), y).backward()
    for p, block in zip(ours.parameters(), expected):
        torch.testing.assert_close(p.kflr.to_dense(), block, rtol=1e-10, atol=1e-13)
