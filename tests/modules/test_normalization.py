"""Every extension on small chains with LayerNorm, GroupNorm and BatchNorm, against autograd.

float64, references from :mod:`reference` (autograd only) on a plain copy of the
model. LayerNorm and GroupNorm have a dense second derivative per sample; the
messages take it through the residual hooks of ``ModuleRules``
(``residual_factor`` / ``residual_sum`` / ``residual_mat_prod``).
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from quantities import (
    ALL_EXTENSIONS as QUANTITIES,
)
from quantities import (
    Case,
    assert_nothing_attached,
    close,
    first_and_diag_against_plain,
)
from torch import nn

from hbpkit import backprop
from hbpkit.extensions import (
    GGNMP,
    HBP,
    HMP,
    KFAC,
    KFLR,
    PCHMP,
    BatchGrad,
    BatchL2,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
)

DT = torch.float64


# --------------------------------------------------------------------------------- models
def _eval_batchnorm(C: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(C).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    return bn


def _with_random_affine(build):
    def factory():
        model = build()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)):
                    for p in m.parameters():
                        p.normal_()
        return model

    return factory


MODELS = {
    "layernorm": lambda: nn.Sequential(
        nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)
    ),
    "layernorm-2d": lambda: nn.Sequential(
        nn.Linear(5, 6),
        nn.Unflatten(1, (2, 3)),
        nn.LayerNorm((2, 3)),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(6, 3),
    ),
    "layernorm-last": lambda: nn.Sequential(
        nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.LayerNorm(3)
    ),
    "groupnorm": lambda: nn.Sequential(
        nn.Linear(5, 8),
        nn.Unflatten(1, (4, 2)),
        nn.GroupNorm(2, 4),
        nn.ELU(),
        nn.Flatten(),
        nn.Linear(8, 3),
    ),
    "batchnorm-eval": lambda: nn.Sequential(
        nn.Linear(5, 4), _eval_batchnorm(4), nn.Sigmoid(), nn.Linear(4, 3)
    ),
}
SEQ_MODELS = {
    "layernorm-seq": lambda: nn.Sequential(
        nn.Linear(4, 4), nn.LayerNorm(4), nn.GELU(), nn.Flatten(), nn.Linear(8, 3)
    ),
}
ALL_MODELS = {**MODELS, **SEQ_MODELS}


def make_case(name: str, loss: str, N: int, reduction: str = "mean") -> Case:
    x_shape = (N, 2, 4) if name in SEQ_MODELS else (N, 5)
    return Case(_with_random_affine(ALL_MODELS[name]), loss, reduction, x_shape)


def is_nonlinear(layer: nn.Module) -> bool:
    """Layers with a second-order residual (eq. 7) in these chains."""
    return isinstance(layer, (nn.LayerNorm, nn.GroupNorm)) or ref.is_elementwise(layer)


def modified_hessian_blocks(case: Case, curvature: str) -> list[torch.Tensor]:
    """Parameter blocks of ``J^T H_loss J + sum_k J_k^T m(R_k) J_k`` (per-sample residuals).

    ``R_{k,n}`` is the Hessian of ``dL/dz_{k,n} . f_k(x_{k,n})`` w.r.t. ``x_{k,n}`` (autograd,
    per sample), ``m`` modifies its eigenvalues (identity for the Hessian, ``abs`` /
    ``clamp(min=0)`` for PCH), ``J_k = d x_k / d params``.
    """
    params = case.plain_params()
    xs = ref.forward_trace(case.plain, case.X)
    loss = case.lf_plain(xs[-1], case.y)
    result = ref.ggn(xs[-1], case.lf_plain, case.y, params)
    modify = {"hessian": lambda v: v, "pch-abs": torch.abs, "pch-clip": lambda v: v.clamp(min=0)}
    for k, layer in enumerate(case.plain):
        if not is_nonlinear(layer):
            continue
        (dz,) = torch.autograd.grad(loss, xs[k + 1], retain_graph=True)
        x = xs[k].detach()
        R = []
        for n in range(x.shape[0]):
            H = torch.autograd.functional.hessian(
                lambda xn, f=layer, g=dz[n]: (f(xn.unsqueeze(0))[0] * g).sum(), x[n]
            ).reshape(x[n].numel(), -1)
            values, vectors = torch.linalg.eigh(H)
            R.append(vectors @ torch.diag(modify[curvature](values)) @ vectors.T)
        J = ref.jacobian(xs[k], params)
        result = result + J.T @ torch.block_diag(*R) @ J
    return ref.blocks(result, params)


def kron(factors) -> torch.Tensor:
    out = factors[0]
    for f in factors[1:]:
        out = torch.kron(out, f)
    return out


# -------------------------------------------------------------------------- the reference
def test_reference_modified_hessian_is_the_hessian():
    """The generic reference with ``m = id`` equals autograd's Hessian blocks (guards it)."""
    case = make_case("layernorm", "ce", 3)
    params = case.plain_params()
    H = ref.blocks(ref.hessian(case.lf_plain(case.plain(case.X), case.y), params), params)
    for a, b in zip(modified_hessian_blocks(case, "hessian"), H):
        close(a, b, "reference")


# ---------------------------------------------------------------- first order and diagonals
@pytest.mark.parametrize(("N", "reduction", "loss"), [(1, "sum", "mse"), (3, "mean", "ce")])
@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_first_order_and_diagonals(name, loss, reduction, N):
    """grad_batch, batch_l2, sum_grad_squared, variance, diag_ggn_exact, diag_h."""
    first_and_diag_against_plain(make_case(name, loss, N, reduction))


# ------------------------------------------------------------------------------- products
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_curvature_products(name, loss):
    """ggnmp, hmp, pchmp (abs and clip) equal their blocks times V, any batch size."""
    case = make_case(name, loss, 3)
    case.run(GGNMP(), HMP(), PCHMP("abs"))
    exts = {"ggnmp": None, "hmp": "hessian", "pchmp": "pch-abs"}
    params = case.plain_params()
    out = case.plain(case.X)
    blocks = {"ggnmp": ref.blocks(ref.ggn(out, case.lf_plain, case.y, params), params)}
    for field, curvature in exts.items():
        if curvature is not None:
            blocks[field] = modified_hessian_blocks(case, curvature)
    torch.manual_seed(5)
    for i, (p, _) in enumerate(case.params()):
        V = torch.randn(2, *p.shape, dtype=DT)
        for field in exts:
            expected = (V.reshape(2, -1) @ blocks[field][i]).reshape(V.shape)
            close(getattr(p, field)(V), expected, f"{field} of parameter {i}")


# ---------------------------------------------------------------------------- Kronecker
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_kronecker_batch_one_is_exact(name, loss, kflr_kfra_batch_one):
    """N = 1: KFLR, KFRA == GGN block; HBP hessian (sqrt, batch-average) == Hessian block;
    HBP pch-abs / pch-clip == the PCH block. ``kfac_approx="reduce"``: GroupNorm's parameters
    are shared over positions (the Linear layers here have none, both approximations agree)."""
    case = make_case(name, loss, 1)
    hbp = {
        "hessian-sqrt": HBP("hessian", "exact", "sqrt", kfac_approx="reduce"),
        "hessian-average": HBP("hessian", "average", "batch-average", kfac_approx="reduce"),
        "pch-abs": HBP("pch-abs", "exact", "sqrt", kfac_approx="reduce"),
        "pch-clip": HBP("pch-clip", "average", "batch-average", kfac_approx="reduce"),
    }
    results = {}
    for key, ext in hbp.items():
        fresh = make_case(name, loss, 1)
        fresh.run(ext)
        results[key] = [p.hbp for p, _ in fresh.params()]
    case.run(*kflr_kfra_batch_one.extensions(kfac_approx="reduce"))
    params = case.plain_params()
    out = case.plain(case.X)
    G = ref.blocks(ref.ggn(out, case.lf_plain, case.y, params), params)
    H = modified_hessian_blocks(case, "hessian")
    expected = {
        "hessian-sqrt": H,
        "hessian-average": H,
        "pch-abs": modified_hessian_blocks(case, "pch-abs"),
        "pch-clip": modified_hessian_blocks(case, "pch-clip"),
    }
    kflr_kfra_batch_one.check([p for p, _ in case.params()], G, close)
    for i in range(len(case.params())):
        for key in hbp:
            close(kron(results[key][i]), expected[key][i], f"{key} {i}")


def _normalization_params(case: Case):
    norm = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)
    return [(i, p) for i, (m, p) in enumerate(_owners(case)) if isinstance(m, norm)]


def _owners(case: Case):
    return [(m, p) for m in case.model for p in m.parameters(recurse=False)]


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_kflr_reduce_of_normalization_params_is_the_ggn_block(name, loss):
    """For gamma, beta the one-factor block with ``kfac_approx="reduce"`` is exact for any N."""
    case = make_case(name, loss, 3)
    case.run(KFLR(kfac_approx="reduce"), HBP("hessian", "exact", "sqrt", kfac_approx="reduce"))
    params = case.plain_params()
    G = ref.blocks(ref.ggn(case.plain(case.X), case.lf_plain, case.y, params), params)
    H = modified_hessian_blocks(case, "hessian")
    checked = _normalization_params(case)
    assert checked
    for i, p in checked:
        assert len(p.kflr) == 1 and p.kflr.param_shape == p.shape
        close(p.kflr[0], G[i], f"kflr {i}")
        close(p.hbp[0], H[i], f"hbp hessian {i}")


def test_monte_carlo_estimates_converge():
    """KFAC and DiagGGNMC of the normalization parameters approach KFLR / DiagGGNExact."""
    case = make_case("groupnorm", "ce", 3)
    torch.manual_seed(0)
    case.run(
        KFAC(mc_samples=4000, kfac_approx="reduce"),
        KFLR(kfac_approx="reduce"),
        DiagGGNMC(mc_samples=4000),
        DiagGGNExact(),
    )
    for _, p in _normalization_params(case):
        error = (p.kfac[0] - p.kflr[0]).norm() / p.kflr[0].norm()
        assert error < 0.08, error
        error = (p.diag_ggn_mc - p.diag_ggn_exact).norm() / p.diag_ggn_exact.norm()
        assert error < 0.08, error


# ------------------------------------------------------------------ BatchNorm in train mode
def _train_bn_first():
    return nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _train_bn_after_linear():
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))


#: every extension but HBP, and the curvature-matrix products
ALL_EXTENSIONS = [*QUANTITIES[:-1], GGNMP, HMP, PCHMP]


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_batchnorm_train_mode_as_first_module(loss):
    """With nothing trainable before it, train-mode BatchNorm keeps every quantity defined.

    References through the same (batch-coupled) graph: per-sample gradients of the
    loss terms, the GGN of the whole batch output and the Hessian.
    """
    case = Case(_with_random_affine(_train_bn_first), loss, "mean", (4, 5))
    out = case.model(case.X)
    with backprop(
        BatchGrad(),
        BatchL2(),
        DiagGGNExact(),
        DiagHessian(),
        GGNMP(),
        HMP(),
        KFLR(kfac_approx="reduce"),
    ):
        case.lf(out, case.y).backward()
    params = case.plain_params()
    out = case.plain(case.X)  # train mode too: the same batch statistics
    gb = ref.per_sample_grads_from_graph(out, case.lf_plain, case.y, params)
    G = ref.blocks(ref.ggn(out, case.lf_plain, case.y, params), params)
    H = ref.blocks(ref.hessian(case.lf_plain(out, case.y), params), params)
    torch.manual_seed(1)
    for i, (p, _) in enumerate(case.params()):
        close(p.grad_batch, gb[i], f"grad_batch {i}")
        close(p.batch_l2, gb[i].flatten(1).square().sum(1), f"batch_l2 {i}")
        close(p.diag_ggn_exact.flatten(), G[i].diagonal(), f"diag_ggn {i}")
        close(p.diag_h.flatten(), H[i].diagonal(), f"diag_h {i}")
        V = torch.randn(2, *p.shape, dtype=DT)
        close(p.ggnmp(V).reshape(2, -1), V.reshape(2, -1) @ G[i], f"ggnmp {i}")
        close(p.hmp(V).reshape(2, -1), V.reshape(2, -1) @ H[i], f"hmp {i}")
    for i, p in enumerate(case.model[0].parameters()):  # the first two blocks: BatchNorm's
        close(p.kflr[0], G[i], f"BatchNorm kflr {i}")


@pytest.mark.parametrize("ext", ALL_EXTENSIONS, ids=lambda e: e.__name__)
def test_batchnorm_train_mode_after_parameters(ext):
    """Through the batch statistics every per-sample extension runs (exact: see
    ``test_batchnorm_train.py``); batch-averaged ones (KFRA) refuse, name the module and
    the reason, and attach nothing."""
    case = Case(_train_bn_after_linear, "ce", "mean", (4, 5))
    if ext().message is not None and ext().message.batch_averaged:
        with pytest.raises(NotImplementedError, match=r"BatchNorm1d.*train mode.*model.eval\(\)"):
            case.run(ext())
        assert_nothing_attached(case.model)
    else:
        case.run(ext())
    case = Case(_train_bn_after_linear, "ce", "mean", (4, 5))
    case.model.eval()
    case.run(ext())  # eval mode: running statistics, supported


def test_batchnorm_without_running_statistics_uses_batch_statistics_in_eval_mode():
    """``track_running_stats=False`` normalizes with batch statistics even in eval mode:
    the GGN diagonal is the one through the batch statistics."""
    from batch_coupled import BatchReference, mean_ce_terms

    build = lambda: nn.Sequential(  # noqa: E731
        nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 3)
    )
    case = Case(build, "ce", "mean", (4, 5))
    case.model.eval()
    case.run(DiagGGNExact())
    plain = build().double().eval()
    plain.load_state_dict(case.model.state_dict())
    reference = BatchReference(plain, case.X, case.y, nn.CrossEntropyLoss(), mean_ce_terms)
    for name, p in case.model.named_parameters():
        close(p.diag_ggn_exact.flatten(), reference.ggn_block(name).diagonal(), name)


def test_layernorm_without_batch_dimension_refuses():
    """A LayerNorm over every dimension of an unbatched input would mix the samples."""
    from hbpkit import extend

    model, loss_fn = extend(nn.LayerNorm(5).double()), extend(nn.MSELoss(reduction="sum"))
    x = torch.randn(5, dtype=DT)
    loss = loss_fn(model(x), torch.zeros(5, dtype=DT))
    with pytest.raises(NotImplementedError, match="batched input"), backprop(BatchGrad()):
        loss.backward()
    assert_nothing_attached(model)
