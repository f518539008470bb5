"""The Woodbury natural gradient against an explicit ``P x P`` solve (global and per block)."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from torch import nn

from hbpkit import backprop, extend
from hbpkit.optim import SubsampledNaturalGradient

DT = torch.float64


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(5, 6), nn.Sigmoid(), nn.Linear(6, 3))
        X = torch.randn(4, 5)
    elif kind == "positions":  # Linear on [N, T, D]: per-sample gradients of rank T
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3))
        X = torch.randn(4, 2, 3)
    else:
        model = nn.Sequential(nn.Conv1d(2, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(9, 3))
        X = torch.randn(4, 2, 4)
    return extend(model.to(DT)), X.to(DT), torch.randint(3, (4,))


@pytest.mark.parametrize("kind", ["mlp", "positions", "conv"])
@pytest.mark.parametrize("blocks", ["global", "parameter"])
def test_woodbury_step_equals_the_explicit_damped_ggn_solve(kind, blocks):
    model, X, y = _model(kind)
    params = list(model.parameters())
    loss_fn = extend(nn.CrossEntropyLoss())
    out = model(X)
    C = ref.ggn(out, loss_fn, y, params)  # exact GGN [P, P]: fisher="exact"
    grad = ref.flatten(torch.autograd.grad(loss_fn(out, y), params))
    lam = 0.05
    if blocks == "global":
        d = torch.linalg.solve(C + lam * torch.eye(len(C), dtype=DT), grad)
    else:
        parts, start = [], 0
        for block, p in zip(ref.blocks(C, params), params):
            g = grad[start : start + p.numel()]
            parts.append(torch.linalg.solve(block + lam * torch.eye(p.numel(), dtype=DT), g))
            start += p.numel()
        d = torch.cat(parts)
    opt = SubsampledNaturalGradient(params, lr=1.0, damping=lam, fisher="exact", blocks=blocks)
    before = ref.flatten([p.detach().clone() for p in params])
    with backprop(*opt.extensions):
        loss_fn(model(X), y).backward()
    opt.step()
    after = ref.flatten([p.detach() for p in params])
    torch.testing.assert_close(before - after, d, rtol=1e-9, atol=1e-11)


def test_sampled_fisher_uses_mc_samples_rows_and_errors():
    model, X, y = _model("mlp")
    opt = SubsampledNaturalGradient(model.parameters(), fisher="sampled", mc_samples=3)
    with backprop(*opt.extensions):
        extend(nn.CrossEntropyLoss())(model(X), y).backward()
    assert model[0].weight.kronecker_roots.g_bar.shape == (12, 6)
    opt.step()
    with pytest.raises(ValueError, match="blocks"):
        SubsampledNaturalGradient(model.parameters(), blocks="layer")
    with pytest.raises(ValueError, match="fisher"):
        SubsampledNaturalGradient(model.parameters(), fisher="kfac")
    with pytest.raises(ValueError, match="damping"):
        SubsampledNaturalGradient(model.parameters(), damping=0.0)
