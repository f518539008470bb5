"""Several losses in one backward pass: ``(l1 + w * l2).backward()`` (float64).

The curvature of a weighted sum of losses is the weighted sum of their curvatures: the
diagonals equal ``torch.func.hessian`` of the summed loss, and Kronecker factors built
from sqrt factors are the weighted sums of the single-loss factors; the products are the
Hessian blocks of the summed loss.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

import hbpkit.extensions as exts
from hbpkit import backprop, extend

DT = torch.float64


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
        self.h1, self.h2 = nn.Linear(5, 3), nn.Linear(5, 2)

    def forward(self, x):
        z = self.trunk(x)
        return self.h1(z), self.h2(z)


def _data():
    torch.manual_seed(0)
    model = TwoHeads().double()
    X = torch.randn(6, 4, dtype=DT)
    return model, X, torch.randint(0, 3, (6,)), torch.randn(6, 2, dtype=DT)


def _hessian_blocks(model, loss_of_outputs, X):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        out = functional_call(model, p, (X,))
        return loss_of_outputs(*out) if isinstance(out, tuple) else loss_of_outputs(out)

    H = hessian(loss)(params)
    return {k: H[k][k].reshape(p.numel(), -1) for k, p in params.items()}


def test_kronecker_factors_add_up_over_losses():
    """KFLR of ``l1 + w l2``: the output factors are ``G_1 + w G_2`` of single-loss passes
    (the sqrt factors of the two losses are columns of one factor), the input factors
    unchanged."""
    model, X, y1, y2 = _data()
    w = 0.25
    ce, mse = extend(nn.CrossEntropyLoss()), extend(nn.MSELoss())

    def kflr(loss_of_outputs):
        m = extend(copy.deepcopy(model))
        with backprop(exts.KFLR()):
            loss_of_outputs(*m(X)).backward()
        return [getattr(p, "kflr", None) for p in m.parameters()]

    both = kflr(lambda a, b: ce(a, y1) + w * mse(b, y2))
    first = kflr(lambda a, b: ce(a, y1))  # (the other head is not reached)
    second = kflr(lambda a, b: mse(b, y2))
    for f12, f1, f2 in zip(both, first, second):
        G = (f1[0] if f1 is not None else 0) + (w * f2[0] if f2 is not None else 0)
        torch.testing.assert_close(f12[0], G, rtol=1e-10, atol=1e-12)
        for a, b in zip(f12[1:], (f1 if f1 is not None else f2)[1:]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_two_losses_on_one_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    target = torch.randn(5, 3, dtype=DT)
    ours = extend(copy.deepcopy(model))
    out = ours(X)
    with backprop(exts.DiagGGNExact(), exts.DiagHessian(), exts.HMP()):
        (extend(nn.CrossEntropyLoss())(out, y) + extend(nn.MSELoss())(out, target)).backward()
    blocks = _hessian_blocks(model, lambda z: F.cross_entropy(z, y) + F.mse_loss(z, target), X)
    for name, p in ours.named_parameters():
        diag = blocks[name].diagonal().reshape(p.shape)
        torch.testing.assert_close(p.diag_h, diag, rtol=1e-10, atol=1e-12)
        V = torch.randn(2, *p.shape, dtype=DT)
        expected = (blocks[name] @ V.flatten(1).T).T.reshape(V.shape)
        torch.testing.assert_close(p.hmp(V), expected, rtol=1e-10, atol=1e-12)
    last = ours[2].weight  # at the last layer the GGN is the Hessian
    torch.testing.assert_close(last.diag_ggn_exact, last.diag_h, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weight", [0.5, -0.5], ids=["positive", "negative"])
def test_weighted_sum_of_two_heads_losses_is_exact(weight):
    """``l1 + w l2`` on two heads: ``p.diag_h`` and ``p.hmp`` from the Hessian blocks of the
    summed loss (``torch.func``), ``p.ggnmp`` too at the heads, whose outputs are linear in
    them; the per-sample gradients sum to ``.grad``."""
    model, X, y1, y2 = _data()
    ours = extend(copy.deepcopy(model))
    ce, mse = extend(nn.CrossEntropyLoss()), extend(nn.MSELoss())
    a, b = ours(X)
    with backprop(exts.BatchGrad(), exts.DiagHessian(), exts.HMP(), exts.GGNMP()):
        (ce(a, y1) + weight * mse(b, y2)).backward()
    blocks = _hessian_blocks(
        model, lambda a, b: F.cross_entropy(a, y1) + weight * F.mse_loss(b, y2), X
    )
    torch.manual_seed(1)
    for name, p in ours.named_parameters():
        diag = blocks[name].diagonal().reshape(p.shape)
        torch.testing.assert_close(p.diag_h, diag, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p.grad_batch.sum(0), p.grad, rtol=1e-10, atol=1e-12)
        V = torch.randn(3, *p.shape, dtype=DT)
        expected = (blocks[name] @ V.flatten(1).T).T.reshape(V.shape)
        torch.testing.assert_close(p.hmp(V), expected, rtol=1e-10, atol=1e-12)
        if name.startswith("h"):
            torch.testing.assert_close(p.ggnmp(V), expected, rtol=1e-10, atol=1e-12)


def test_batch_averages_refuse_several_losses():
    model, X, y1, y2 = _data()
    ours = extend(model)
    a, b = ours(X)
    loss = extend(nn.CrossEntropyLoss())(a, y1) + extend(nn.MSELoss())(b, y2)
    with pytest.raises(NotImplementedError, match="several losses in one backward pass"):
        with backprop(exts.KFRA()):
            loss.backward()
    assert not any(hasattr(p, "kfra") for p in ours.parameters())


def test_losses_of_separate_models_in_one_backward():
    """Disjoint graphs: one pass per loss, each exact."""
    torch.manual_seed(0)
    m1 = extend(nn.Sequential(nn.Linear(3, 2)).double())
    m2 = extend(nn.Sequential(nn.Linear(4, 2)).double())
    x1, x2 = torch.randn(3, 3, dtype=DT), torch.randn(3, 4, dtype=DT)
    y = torch.tensor([0, 1, 1])
    ce = extend(nn.CrossEntropyLoss())
    with backprop(exts.BatchGrad()):
        (ce(m1(x1), y) + ce(m2(x2), y)).backward()
    for p in [*m1.parameters(), *m2.parameters()]:
        torch.testing.assert_close(p.grad_batch.sum(0), p.grad, rtol=1e-12, atol=1e-14)
