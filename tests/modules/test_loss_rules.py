"""The loss rules against autograd, in float64 (hbp supplement, section C).

``sqrt_hessian`` (``sum_v S S^T`` per sample, S.12), ``sum_hessian`` (C.2) and the
Monte-Carlo ``sqrt_hessian_sampled`` against the per-sample diagonal blocks of the loss
Hessian w.r.t. its input, by ``torch.autograd.functional.hessian``.
"""

from __future__ import annotations

import pytest
import torch
from records import record
from torch import nn

from hbpkit import extend
from hbpkit.modules.tables import SECOND_ORDER


def _record(module: nn.Module, x: torch.Tensor, *rest):
    """Forward ``module`` (extended) on ``x`` that requires grad; the call record and output."""
    extend(module)
    x = x.clone().requires_grad_(True)
    out = module(x, *rest)
    return record(out), x, out


def _loss_case(name: str, reduction: str):
    torch.manual_seed(1)
    x = torch.randn(4, 3, dtype=torch.float64)
    if name == "mse":
        return nn.MSELoss(reduction=reduction), x, torch.randn(4, 3, dtype=torch.float64)
    if name == "mse_3d":
        x = torch.randn(4, 2, 3, dtype=torch.float64)
        return nn.MSELoss(reduction=reduction), x, torch.randn_like(x)
    if name == "ce":
        return nn.CrossEntropyLoss(reduction=reduction), x, torch.tensor([0, 2, 1, 2])
    if name == "ce_probs":
        target = torch.softmax(torch.randn(4, 3, dtype=torch.float64), 1) * 1.5
        return nn.CrossEntropyLoss(reduction=reduction), x, target
    if name == "bce":
        return nn.BCEWithLogitsLoss(reduction=reduction), x, torch.rand(4, 3, dtype=torch.float64)
    raise ValueError(name)


LOSSES = ["mse", "mse_3d", "ce", "ce_probs", "bce"]


def _loss_hessian_blocks(module, x, target) -> torch.Tensor:
    """``[N, D, D]`` diagonal blocks of the loss Hessian w.r.t. the input, by autograd."""
    hess = torch.autograd.functional.hessian(lambda z: module(z, target), x.detach())
    n, d = x.shape[0], x[0].numel()
    hess = hess.reshape(n, d, n, d)
    off = hess.clone()
    for i in range(n):
        off[i, :, i, :] = 0
    assert off.abs().max() < 1e-12  # the losses are sums over samples
    return torch.stack([hess[i, :, i, :] for i in range(n)])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", LOSSES)
def test_loss_sqrt_hessian(name, reduction):
    """``sum_v S S^T`` per sample and ``sum_hessian`` against autograd (S.12, C.2)."""
    module, x, target = _loss_case(name, reduction)
    call, x, _ = _record(module, x, target)
    rules = SECOND_ORDER.lookup(module)
    blocks = _loss_hessian_blocks(module, x, target)
    S = rules.sqrt_hessian(call).flatten(2)
    torch.testing.assert_close(torch.einsum("vni,vnj->nij", S, S), blocks)
    torch.testing.assert_close(rules.sum_hessian(call), blocks.sum(0))


@pytest.mark.parametrize("scale", [1.0, 40.0])
@pytest.mark.parametrize("classes", [1, 2, 5])
def test_cross_entropy_sqrt_hessian_has_rank_c_minus_1(classes, scale):
    """The exact CE factor has ``C - 1`` columns (one for ``C = 1``) and stays exact when
    the softmax is nearly one-hot (``scale = 40``: ``1 - p_max`` about ``1e-17``)."""
    torch.manual_seed(2)
    module = nn.CrossEntropyLoss()
    x = torch.randn(6, classes, dtype=torch.float64) * scale
    target = torch.randint(classes, (6,))
    call, x, _ = _record(module, x, target)
    S = SECOND_ORDER.lookup(module).sqrt_hessian(call)
    assert S.shape == (max(classes - 1, 1), 6, classes)
    blocks = _loss_hessian_blocks(module, x, target)
    torch.testing.assert_close(torch.einsum("vni,vnj->nij", S, S), blocks, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", LOSSES)
def test_loss_sqrt_hessian_sampled(name):
    """The Monte-Carlo factor is unbiased: its average over many draws approaches the Hessian."""
    module, x, target = _loss_case(name, "mean")
    call, x, _ = _record(module, x, target)
    rules = SECOND_ORDER.lookup(module)
    torch.manual_seed(2)
    S = rules.sqrt_hessian_sampled(call, 40_000).flatten(2)
    estimate = torch.einsum("vni,vnj->nij", S, S)
    blocks = _loss_hessian_blocks(module, x, target)
    error = (estimate - blocks).abs().max() / blocks.abs().max()
    assert error < 0.03
