"""Kronecker factors (KFLR, KFRA, HBP) against their definitions at any batch size (float64).

The definitions are those of the hbp supplement (eq. S.12 per sample, approximation (9)
batch-averaged), computed by :mod:`reference`; plus the aliases of HBP, weight sharing
(``kfac_approx``) and the helpers of the factor objects. ``rtol=1e-8, atol=1e-10``.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from quantities import (
    DT,
    LOSSES,
    SAVEFIELDS,
    SEQ_STRUCTURES,
    Case,
    activation_params,
    check_factor_shapes,
    close,
    kron,
    kron_param_names,
    mlp,
)
from torch import nn

from hbpkit import backprop
from hbpkit.extensions import (
    HBP,
    KFAC,
    KFLR,
    KFRA,
)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_dropout_train_mode_kronecker(loss):
    """KFLR and KFRA through Dropout in train mode, references from the same forward trace."""
    case = Case(
        lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 3)),
        loss,
        "mean",
        (4, 5),
    )
    case.model.train()
    torch.manual_seed(123)
    xs = ref.forward_trace(case.model, case.X)  # calls each (extended) layer once
    assert (xs[3] == 0).any(), "dropout did nothing"
    with backprop(KFLR(), KFRA()):
        case.lf(xs[-1], case.y).backward(retain_graph=True)
    args = (case.model, case.lf_plain, case.X, case.y)
    kflr = ref.kron_factors_sqrt(*args, xs=xs)
    kfra = ref.kron_factors_batch_average(*args, "ggn", xs=xs)
    for name, p in case.model.named_parameters():
        for field, expected in (("kflr", kflr), ("kfra", kfra)):
            for i, (a, b) in enumerate(zip(getattr(p, field), expected[p])):
                close(a, b, f"{name}.{field}[{i}]")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(
    "act", activation_params(["Sigmoid", "Tanh", "ReLU", "ELU", "GELU", "Mish"])
)
def test_kflr_any_batch_equals_definition(act, loss, reduction):
    """KFLR for N=4: G = sum_n J_n^T H_n J_n (per-sample backprop), A = 1/N sum_n x x^T."""
    case = Case(lambda: mlp(act), loss, reduction, (4, 5))
    case.run(KFLR())
    expected = ref.kron_factors_sqrt(case.plain, case.lf_plain, case.X, case.y)
    for p, q, name in kron_param_names(case):
        assert len(p.kflr) == len(expected[q])
        for i, (a, b) in enumerate(zip(p.kflr, expected[q])):
            close(a, b, f"{name}.kflr[{i}]")


@pytest.mark.parametrize("curvature", ["ggn", "hessian", "pch-abs", "pch-clip"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", activation_params(["Sigmoid", "Tanh", "ReLU", "Softplus"]))
def test_batch_average_any_batch_equals_definition(act, loss, curvature):
    """KFRA, HBP(curvature, "average", "batch-average") at N=4 == the recursion of approx. (9)."""
    case = Case(lambda: mlp(act), loss, "mean", (4, 5))
    field = "kfra" if curvature == "ggn" else "hbp"
    ext = KFRA() if curvature == "ggn" else HBP(curvature, "average", "batch-average")
    case.run(ext)
    expected = ref.kron_factors_batch_average(case.plain, case.lf_plain, case.X, case.y, curvature)
    for p, q, name in kron_param_names(case):
        got = getattr(p, field)
        check_factor_shapes(p, got)
        for i, (a, b) in enumerate(zip(got, expected[q])):
            close(a, b, f"{name}.{field}[{i}]")


@pytest.mark.parametrize("curvature", ["hessian", "pch-abs", "pch-clip"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", activation_params(["Sigmoid", "Tanh", "ELU", "Softsign"]))
def test_hbp_sqrt_any_batch_equals_definition(act, loss, curvature):
    """HBP(curvature, "exact", "sqrt") at N=4: G = sum_n of sample n's (modified) Hessian
    w.r.t. the layer output, A = 1/N sum_n x_n x_n^T."""
    case = Case(lambda: mlp(act), loss, "mean", (4, 5))
    case.run(HBP(curvature, "exact", "sqrt"))
    expected = ref.kron_factors_sqrt_curvature(case.plain, case.lf_plain, case.X, case.y, curvature)
    for p, q, name in kron_param_names(case):
        check_factor_shapes(p, p.hbp)
        for i, (a, b) in enumerate(zip(p.hbp, expected[q])):
            close(a, b, f"{name}.hbp[{i}]")


@pytest.mark.parametrize("ext_cls", [KFLR, KFRA, KFAC])
def test_hbp_aliases(ext_cls):
    """KFLR == HBP(ggn, exact, sqrt), KFRA == HBP(ggn, average, batch-average),
    KFAC == HBP(ggn, sampled, sqrt) under the same seed."""
    options = {
        KFLR: ("ggn", "exact", "sqrt"),
        KFRA: ("ggn", "average", "batch-average"),
        KFAC: ("ggn", "sampled", "sqrt"),
    }[ext_cls]
    kwargs = {"mc_samples": 3} if ext_cls is KFAC else {}
    a = Case(lambda: mlp("Sigmoid"), "ce", "mean", (3, 5))
    b = Case(lambda: mlp("Sigmoid"), "ce", "mean", (3, 5))
    torch.manual_seed(7)
    a.run(ext_cls(**kwargs))
    torch.manual_seed(7)
    b.run(HBP(*options, **kwargs))
    for (p, _), (q, _) in zip(a.params(), b.params()):
        for i, (x, y) in enumerate(zip(getattr(p, SAVEFIELDS[ext_cls]), q.hbp)):
            close(x, y, f"factor {i}")


# --------------------------------------------------------------------------- weight sharing
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("loss", LOSSES)
def test_linear_on_3d_inputs_kflr_equals_definition(loss, approx):
    """Linear on [N, T, D] (then Flatten): kron(G, A) of KFLR with kfac_approx=expand|reduce."""
    case = Case(SEQ_STRUCTURES["linear-3d-flatten"], loss, "mean", (3, 2, 4))
    case.run(KFLR(kfac_approx=approx))
    expected = ref.kron_factors_weight_sharing(case.plain, case.lf_plain, case.X, case.y, approx)
    for p, q, name in kron_param_names(case):
        close(p.kflr.to_dense(), expected[q], f"{name}.kflr ({approx})")


# --------------------------------------------------------------------------- Kronecker helpers
@pytest.mark.parametrize(
    "field_ext",
    [("kflr", KFLR), ("kfra", KFRA), ("hbp", lambda: HBP("hessian", "average", "batch-average"))],
    ids=["kflr", "kfra", "hbp-hessian"],
)
def test_kronecker_helpers(field_ext):
    """to_dense == kron(G, A) (G for a bias), mv == to_dense @ v, solve == linalg.solve
    with damping; the hessian factors can be indefinite."""
    field, ext_cls = field_ext
    case = Case(lambda: mlp("Sigmoid"), "ce", "sum", (3, 5))
    case.run(ext_cls())
    for p, _, name in kron_param_names(case):
        factors = getattr(p, field)
        dense = factors.to_dense()
        assert dense.shape == (p.numel(), p.numel())
        close(dense, kron(tuple(factors)), f"{name}.to_dense")
        v = torch.randn_like(p)
        mv = factors.mv(v)
        assert mv.shape == p.shape
        close(mv, (dense @ v.flatten()).reshape(p.shape), f"{name}.mv")
        for damping in (1e-3, 1.0):
            x = factors.solve(v, damping)
            assert x.shape == p.shape
            I = torch.eye(p.numel(), dtype=DT)
            expected = torch.linalg.solve(dense + damping * I, v.flatten()).reshape(p.shape)
            close(x, expected, f"{name}.solve({damping})")
        # documented: a leading batch dimension is allowed
        V = torch.randn(2, *p.shape, dtype=DT)
        close(factors.mv(V), torch.stack([factors.mv(v) for v in V]), f"{name}.mv batched")
        close(
            factors.solve(V, 0.1),
            torch.stack([factors.solve(v, 0.1) for v in V]),
            f"{name}.solve batched",
        )
