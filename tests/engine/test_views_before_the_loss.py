"""A view between the model and the loss, with ``extend()`` alone (float64).

``loss_fn(logits.view(-1, V), y.view(-1))`` of ``[N, T, V]`` logits (the samples stay the
sequences), ``out.view(N, -1)`` of a ``[N, C, 1, 1]`` output, ``out.reshape(out.shape)``:
the pass inserts the module doing the same (``engine/views.py``); the quantities equal
their definitions by ``torch.func``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, vmap

import hbpkit.extensions as exts
from hbpkit import backprop, extend

DT = torch.float64
N, T, D, V = 3, 4, 5, 6


def _check(model, X, y, view, loss_of_view):
    """Per-sample gradients and the Hessian diagonal against ``torch.func``."""
    ours = extend(copy.deepcopy(model))
    with backprop(exts.BatchGrad(), exts.DiagHessian(), exts.DiagGGNExact()):
        extend(nn.CrossEntropyLoss())(view(ours(X)), loss_of_view(y)).backward()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, t):
        return F.cross_entropy(view(functional_call(model, p, (x,))), loss_of_view(t))

    def term(p, x, t):  # sample n's term of the mean over all rows of the view
        rows = view(functional_call(model, p, (x[None],))).shape[0]
        return loss(p, x[None], t[None]) * rows / view(model(X)).shape[0]

    per_sample = vmap(grad(term), in_dims=(None, 0, 0))(params, X, y)
    H = hessian(lambda p: loss(p, X, y))(params)
    for (name, q), p in zip(model.named_parameters(), ours.parameters()):
        h = H[name][name].reshape(q.numel(), -1).diagonal().reshape(q.shape)
        torch.testing.assert_close(p.diag_h, h, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p.grad_batch, per_sample[name], rtol=1e-10, atol=1e-12)
    last = list(ours.parameters())[-1]  # behind the last nonlinearity: GGN == Hessian
    torch.testing.assert_close(last.diag_ggn_exact, last.diag_h, rtol=1e-10, atol=1e-12)


def test_tokens_merged_into_the_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 7), nn.Tanh(), nn.Linear(7, V)).double()
    X, y = torch.randn(N, T, D, dtype=DT), torch.randint(0, V, (N, T))
    _check(model, X, y, lambda z: z.view(-1, V), lambda t: t.reshape(-1))


def test_flattened_within_the_sample():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, V, 3), nn.Tanh(), nn.Conv2d(V, V, 1)).double()
    X, y = torch.randn(N, 2, 3, 3, dtype=DT), torch.randint(0, V, (N,))
    _check(model, X, y, lambda z: z.view(z.shape[0], -1), lambda t: t)


def test_a_view_that_is_no_merge_is_still_refused():
    """``[N, T, V] -> transpose -> reshape``: not one view of the output; refused, naming it."""
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(D, V)).double())
    X, y = torch.randn(N, T, D, dtype=DT), torch.randint(0, V, (N * T,))
    loss = extend(nn.CrossEntropyLoss())(model(X).transpose(0, 1).reshape(-1, V), y)
    with pytest.raises(NotImplementedError, match="CrossEntropyLoss"):
        with backprop(exts.DiagGGNExact()):
            loss.backward()
    assert not hasattr(model[0].weight, "diag_ggn_exact")
