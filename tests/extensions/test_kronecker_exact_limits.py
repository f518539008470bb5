"""The exact limits of the Kronecker factors (``exact_limits``) and their guards (float64).

Where an approximation must equal the exact block: KFLR / KFRA at batch size 1, a deep
linear network with MSE at any batch size, HBP at batch size 1 (every curvature option),
K-FAC-expand of per-position deep linear layers; and guards that the limits are not met
by accident elsewhere. ``rtol=1e-8, atol=1e-10``.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from quantities import (
    LOSSES,
    Case,
    activation_params,
    check_factor_shapes,
    close,
    kron_param_names,
    mlp,
)
from torch import nn

from hbpkit.extensions import (
    HBP,
    KFLR,
)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", activation_params())
def test_kflr_kfra_batch_one_equal_ggn_block(kflr_kfra_batch_one, act, loss, reduction):
    """KFLR and KFRA at batch size 1 (no weight sharing) == exact GGN block."""
    limit = kflr_kfra_batch_one
    case = Case(lambda: mlp(act), loss, reduction, (1, 5))
    case.run(*limit.extensions())
    qs = case.plain_params()
    blocks = limit.exact_blocks(case.plain, case.lf_plain, case.X, case.y, qs)
    params = [p for p, _ in case.params()]
    for p in params:
        for field in limit.fields:
            check_factor_shapes(p, getattr(p, field))
    limit.check(params, blocks, close)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("curvature", ["ggn", "hessian", "pch-abs", "pch-clip"])
@pytest.mark.parametrize(
    "strategy", [("exact", "sqrt"), ("average", "batch-average")], ids="-".join
)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", activation_params(["Sigmoid", "Tanh", "ELU", "Softsign"]))
def test_hbp_batch_one_equals_modified_hessian(act, loss, strategy, curvature, reduction):
    """HBP at batch size 1 == exact Hessian (``hessian``), GGN (``ggn``), or the Hessian
    with every activation residual replaced by |r| (``pch-abs``) / max(r, 0) (``pch-clip``)."""
    case = Case(lambda: mlp(act), loss, reduction, (1, 5))
    case.run(HBP(curvature, *strategy))
    qs = case.plain_params()
    M = ref.modified_hessian(case.plain, case.lf_plain, case.X, case.y, qs, curvature)
    M = ref.blocks(M, qs)
    if curvature == "hessian":  # the reference against plain autograd
        H = ref.hessian(case.lf_plain(case.plain(case.X), case.y), qs)
        for a, b in zip(M, ref.blocks(H, qs)):
            close(a, b, "reference")
    for (p, _, name), Mb in zip(kron_param_names(case), M):
        check_factor_shapes(p, p.hbp)
        close(p.hbp.to_dense(), Mb, f"{name}.hbp")
        if curvature == "pch-abs":
            assert torch.linalg.eigvalsh(p.hbp.to_dense()).min() > -1e-10, "pch-abs not PSD"


@pytest.mark.parametrize("loss", LOSSES)
def test_relu_net_all_curvatures_coincide_at_batch_one(loss):
    """ReLU has zero residual: GGN == Hessian == PCH blocks (and == autograd's Hessian)."""
    results = {}
    for curvature in ("ggn", "hessian", "pch-abs", "pch-clip"):
        case = Case(lambda: mlp("ReLU"), loss, "mean", (1, 5))
        case.run(HBP(curvature, "exact", "sqrt"))
        results[curvature] = [p.hbp.to_dense() for p, _ in case.params()]
    qs = case.plain_params()
    H = ref.blocks(ref.hessian(case.lf_plain(case.plain(case.X), case.y), qs), qs)
    G = ref.blocks(ref.ggn(case.plain(case.X), case.lf_plain, case.y, qs), qs)
    for i, (h, g) in enumerate(zip(H, G)):
        close(h, g, "reference: ReLU Hessian == GGN")
        for curvature, blocks in results.items():
            close(blocks[i], h, f"param {i} {curvature}")


def test_hessian_residual_matters():
    """Guard: for the smooth nets above, hessian and pch blocks genuinely differ from the GGN."""
    case = Case(lambda: mlp("Tanh"), "ce", "sum", (1, 5))
    qs = case.plain_params()
    H = ref.modified_hessian(case.plain, case.lf_plain, case.X, case.y, qs, "hessian")
    for curvature in ("ggn", "pch-abs", "pch-clip"):
        M = ref.modified_hessian(case.plain, case.lf_plain, case.X, case.y, qs, curvature)
        assert (M[:20, :20] - H[:20, :20]).abs().max() > 1e-4, curvature  # first weight block


@pytest.mark.parametrize("N", [1, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("identity", [False, True])
def test_deep_linear_mse_kflr_kfra_exact_any_batch(kflr_deep_linear_mse, identity, reduction, N):
    """Deep linear net + MSE: the loss Hessian (2/(N D) I or 2 I) and the Jacobians B of the
    later layers do not depend on the sample, so the GGN block of every layer (hidden ones
    included) is sum_n B^T H_n B kron x_n x_n^T = [sum_n B^T H_n B] kron [1/N sum_n x_n x_n^T]
    = kron(G, A) for KFLR; KFRA backpropagates the same matrix. Exact for any N."""
    limit = kflr_deep_linear_mse
    layers = [nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)]
    if identity:
        layers.insert(1, nn.Identity())
    case = Case(lambda: nn.Sequential(*layers), "mse", reduction, (N, 5))
    case.run(*limit.extensions())
    qs = case.plain_params()
    blocks = limit.exact_blocks(case.plain, case.lf_plain, case.X, case.y, qs)
    limit.check([p for p, _ in case.params()], blocks, close)


def test_deep_nonlinear_kflr_batch_four_is_not_exact():
    """Guard: the exactness above is not a property of every network (sanity of the test)."""
    case = Case(lambda: mlp("Tanh"), "ce", "mean", (4, 5))
    case.run(KFLR())
    qs = case.plain_params()
    Gb = ref.blocks(ref.ggn(case.plain(case.X), case.lf_plain, case.y, qs), qs)
    p = next(iter(case.model.parameters()))
    assert (p.kflr.to_dense() - Gb[0]).abs().max() > 1e-6


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_on_3d_deep_linear_mse_expand_is_exact(reduction):
    """Deep linear layers applied per position, MSE on [N, T, C]: every position is an
    independent sample with a constant loss Hessian, so K-FAC-expand is the exact GGN block."""
    case = Case(
        lambda: nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), "mse", reduction, (3, 2, 4)
    )
    case.run(KFLR(kfac_approx="expand"))
    qs = case.plain_params()
    G_blocks = ref.blocks(ref.ggn(case.plain(case.X), case.lf_plain, case.y, qs), qs)
    defs = ref.kron_factors_weight_sharing(case.plain, case.lf_plain, case.X, case.y, "expand")
    for (p, q, name), Gb in zip(kron_param_names(case), G_blocks):
        close(defs[q], Gb, f"reference {name}")
        close(p.kflr.to_dense(), Gb, f"{name}.kflr")
