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
from hbpkit.curvature.memory import DenseBudgetError, MemoryPolicy
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
    return _dense_output_case(name, reduction)


def _dense_output_case(name: str, reduction: str):
    """Losses on sequences / dense outputs ``[N, C, d_1, ...]`` and their options."""
    dt = torch.float64
    x = torch.randn(4, 3, 2, 2, dtype=dt)
    weight = torch.rand(3, dtype=dt) + 0.5
    if name == "mse_4d":
        return nn.MSELoss(reduction=reduction), x, torch.randn_like(x)
    if name == "bce_4d_weights":
        pos = torch.rand(2, dtype=dt) + 0.5  # broadcast over the last dimension, as PyTorch does
        module = nn.BCEWithLogitsLoss(weight=torch.rand(2, 2, dtype=dt), pos_weight=pos)
        module.reduction = reduction
        return module, x, torch.rand_like(x)
    target = torch.randint(0, 3, (4, 2, 2))
    target[0, 0, 1] = target[2, 1, 1] = target[3, 0, 0] = 7  # ignored
    if name == "ce_kdim":
        return nn.CrossEntropyLoss(reduction=reduction), x, target.clamp(max=2)
    if name == "ce_kdim_ignore_weight":
        module = nn.CrossEntropyLoss(weight=weight, ignore_index=7, reduction=reduction)
        return module, x, target
    if name == "ce_kdim_ignore_weight_smoothing":
        module = nn.CrossEntropyLoss(
            weight=weight, ignore_index=7, label_smoothing=0.2, reduction=reduction
        )
        return module, x, target
    if name == "ce_kdim_probs_weight":
        module = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1, reduction=reduction)
        return module, x, torch.rand_like(x)
    if name == "ce_ignore_weight":  # [N, C], one target ignored
        module = nn.CrossEntropyLoss(weight=weight, ignore_index=7, reduction=reduction)
        return module, x[:, :, 0, 0], target[:, 0, 1]
    if name == "ce_1d":  # [N, C, T]: a sequence
        module = nn.CrossEntropyLoss(ignore_index=7, reduction=reduction)
        return module, x[:, :, 0], target[:, 0]
    raise ValueError(name)


LOSSES = ["mse", "mse_3d", "ce", "ce_probs", "bce"]
LOSSES += ["mse_4d", "bce_4d_weights", "ce_kdim", "ce_kdim_ignore_weight", "ce_1d"]
LOSSES += ["ce_kdim_ignore_weight_smoothing", "ce_kdim_probs_weight", "ce_ignore_weight"]


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


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", LOSSES)
def test_loss_hessian_mat_prod(name, reduction):
    """``hessian_mat_prod`` ``[K, N, *in]``: each sample's Hessian block times its slice."""
    module, x, target = _loss_case(name, reduction)
    call, x, _ = _record(module, x, target)
    blocks = _loss_hessian_blocks(module, x, target)
    V = torch.randn(2, *x.shape, dtype=x.dtype)
    expected = torch.einsum("nij,knj->kni", blocks, V.flatten(2)).reshape(V.shape)
    rules = SECOND_ORDER.lookup(module)
    torch.testing.assert_close(rules.hessian_mat_prod(call, V), expected)


@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 5), (4, 3, 2, 2)])
def test_cross_entropy_dense_factor_has_one_block_column_per_position(shape):
    """On ``[N, C, *d]`` the exact factor has ``(C - 1) prod(d)`` columns (the rank), column
    ``(v, q)`` non-zero at position ``q`` only."""
    torch.manual_seed(4)
    module = nn.CrossEntropyLoss()
    x = torch.randn(shape, dtype=torch.float64)
    target = torch.randint(3, (shape[0], *shape[2:]))
    call, x, _ = _record(module, x, target)
    S = SECOND_ORDER.lookup(module).sqrt_hessian(call)
    P = x[0, 0].numel()
    assert S.shape == (2 * P, *shape)
    support = S.reshape(2, P, shape[0], 3, P).abs().sum((0, 2, 3))  # [column q, position r]
    assert torch.equal(support != 0, torch.eye(P, dtype=torch.bool))


def test_cross_entropy_ignored_targets_have_no_curvature():
    """Positions whose target is ``ignore_index`` contribute nothing (PyTorch's semantics)."""
    module, x, target = _loss_case("ce_kdim_ignore_weight", "mean")
    call, x, _ = _record(module, x, target)
    rules = SECOND_ORDER.lookup(module)
    ignored = target == 7
    S = rules.sqrt_hessian(call)  # [V, N, C, 2, 2]
    assert S.abs().sum((0, 2))[ignored].max() == 0
    assert S.abs().sum((0, 2))[~ignored].min() > 0
    G = rules.sqrt_hessian_sampled(call, 3)
    assert G.abs().sum((0, 2))[ignored].max() == 0


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


def test_cross_entropy_dense_factor_is_budget_checked():
    """The exact factor over many positions is refused above the dense budget, before
    allocating, with the cheaper extensions named."""
    module, x, target = _loss_case("ce_kdim", "mean")
    call, x, _ = _record(module, x, target)
    call.memory = MemoryPolicy(max_dense_bytes=1000)  # the factor: 8 * 4 * 3 * 4 * 8 bytes
    with pytest.raises(DenseBudgetError, match="Monte-Carlo"):
        SECOND_ORDER.lookup(module).sqrt_hessian(call)
    call.memory = MemoryPolicy(max_dense_bytes=8 * 4 * 3 * 4 * 8)
    SECOND_ORDER.lookup(module).sqrt_hessian(call)


@pytest.mark.parametrize("C", [1, 2, 5, 10])
def test_softmax_root_is_the_reflected_factor(C):
    """The cross-entropy factor's closed form equals ``R Q`` with its zero column ``k``
    dropped: ``R = diag(sqrt p) - p sqrt(p)^T`` and the Householder reflection ``Q`` of
    ``u = sqrt(p) + e_k`` built as matrices, times the per-row scale; a factor of
    ``diag p - p p^T`` either way."""
    from hbpkit.modules.losses import _softmax_root

    torch.manual_seed(C)
    p = torch.softmax(3 * torch.randn(16, C, dtype=torch.float64), 1)
    scale = torch.rand(16, 1, dtype=torch.float64)
    R = torch.diag_embed(p.sqrt()) - p.unsqueeze(2) * p.sqrt().unsqueeze(1)
    expected = []
    for b in range(16):
        k = int(p[b].argmax())
        u = p[b].sqrt().clone()
        u[k] += 1
        Q = torch.eye(C, dtype=p.dtype) - 2 * torch.outer(u, u) / (u @ u)
        RQ = R[b] @ Q
        assert RQ[:, k].abs().max() < 1e-12
        kept = [v for v in range(C) if v != k] or [0]
        expected.append(scale[b] * (RQ[:, kept] if C > 1 else R[b]))
    S = _softmax_root(p, True, scale)
    torch.testing.assert_close(S, torch.stack(expected))
    block = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    torch.testing.assert_close(S @ S.transpose(1, 2), scale.unsqueeze(2) ** 2 * block)
    torch.testing.assert_close(_softmax_root(p, False, scale), scale.unsqueeze(2) * R)


def test_sign_of_the_cross_entropy_mass_is_read_only_where_it_can_be_negative():
    """Class targets without ``weight``: the mass and the mean's ``1 / count`` are ``>= 0``
    by construction, nothing is read back; a ``weight``, soft targets or a weighted
    ``ReducedLoss`` (converted ``(per * w).sum()``) may be negative."""
    from hbpkit.modules.losses import CrossEntropyLossRules, Terms

    rules, x = CrossEntropyLossRules(), torch.randn(4, 3)
    classes, soft = torch.tensor([0, 2, 1, 2]), torch.softmax(torch.randn(4, 3), 1)
    plain = nn.CrossEntropyLoss()
    call, _, _ = _record(plain, x, classes)
    assert not rules.maybe_negative(rules.terms(call))
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, -1.0, 2.0]))
    assert rules.maybe_negative(Terms(weighted, x, classes, 1.0))
    assert rules.maybe_negative(Terms(plain, x, soft, 1.0))
    assert rules.maybe_negative(Terms(plain, x, classes, torch.tensor([1.0, -2.0, 1.0, 1.0])))
