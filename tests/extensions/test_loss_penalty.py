"""A penalty added to the loss, ``loss_fn(f(X), y) + wd * ||theta||^2`` (float64).

What lands on the parameters then (docs/user-guide.md, "Losses as users write them"):
``.grad`` is autograd's, penalty included; every hbpkit quantity, ``grad_batch``
included, is that of the extended loss term alone (the pass starts at the loss module
and never sees the penalty). Checked against autograd on the plain copy.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from quantities import Case, close, mlp

from hbpkit import backprop
from hbpkit.extensions import BatchGrad, DiagGGNExact, DiagHessian


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_penalty_is_in_grad_only(loss):
    wd = 0.3
    case = Case(lambda: mlp("Tanh"), loss, "mean", (4, 5))
    params = [p for p, _ in case.params()]
    data_loss = case.lf(case.model(case.X), case.y)
    total = data_loss + wd * sum(p.square().sum() for p in params)
    with backprop(BatchGrad(), DiagGGNExact(), DiagHessian()):
        total.backward()

    qs = case.plain_params()
    out = case.plain(case.X)
    plain_loss = case.lf_plain(out, case.y)
    grad = torch.autograd.grad(plain_loss, qs, retain_graph=True)
    H = ref.blocks(ref.hessian(plain_loss, qs), qs)
    G = ref.blocks(ref.ggn(out, case.lf_plain, case.y, qs), qs)
    gb = ref.per_sample_grads_loop(case.plain, case.lf_plain, case.X, case.y, qs)
    for p, q, g, g_n, Hb, Gb in zip(params, qs, grad, gb, H, G):
        close(p.grad, g + 2 * wd * q, ".grad: the data term's gradient plus the penalty's")
        close(p.grad_batch, g_n, "grad_batch: the data term only")
        close(
            p.grad_batch.sum(0), p.grad - 2 * wd * p.detach(), "grad_batch sums to .grad - penalty"
        )
        close(p.diag_ggn_exact, Gb.diagonal().reshape(p.shape), "GGN of the data term")
        close(p.diag_h, Hb.diagonal().reshape(p.shape), "Hessian of the data term, no 2 wd")
