"""Embedding and a small sequence model: every extension against autograd and BackPACK.

The sequence model is the transformer-style MLP block without its residual
connection (branching graphs are another issue): ``Embedding -> LayerNorm ->
Linear -> GELU -> Linear`` on ``[N, T, D]``, then ``Flatten -> Linear`` to the
logits. References in float64 from :mod:`reference` (autograd only).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import reference as ref
import torch
from quantities import (
    Case,
    assert_nothing_attached,
    close,
    first_and_diag_against_plain,
    make_loss,
)
from test_normalization import modified_hessian_blocks
from torch import nn

from hbpkit import backprop, extend
from hbpkit.extensions import (
    GGNMP,
    HMP,
    KFAC,
    KFLR,
    KFRA,
    PCHMP,
    BatchGrad,
    BatchL2,
    DiagGGNExact,
    SumGradSquared,
    Variance,
)

DT = torch.float64
E, D, T = 7, 4, 3


def indices(N: int, T: int = T, seed: int = 0) -> torch.Tensor:
    """``[N, T]`` indices with a repeated index in sample 1 and ``padding_idx = 0`` in sample 0."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, E, (N, T), generator=g)
    if N > 1 and T > 1:
        idx[1, 1] = idx[1, 0]
        idx[0, 0] = 0
    return idx


# ------------------------------------------------------------------------------ the rules
# batch_grad, summed_grad, the parameter Jacobian products, param_diag and both Kronecker
# approximations (with and without padding_idx) are checked by the rule contract
# (test_rule_contract.py, the Embedding cases of rule_cases.py).


@pytest.mark.parametrize(
    "kwargs", [dict(max_norm=1.0), dict(scale_grad_by_freq=True), dict(sparse=True)]
)
def test_embedding_options_refused(kwargs):
    """Options that change the weight or the gradient are refused before anything is written."""
    model = extend(nn.Sequential(nn.Embedding(E, D, **kwargs), nn.Flatten(), nn.Linear(T * D, 2)))
    loss = extend(nn.CrossEntropyLoss())(model(indices(2)), torch.tensor([0, 1]))
    with pytest.raises(NotImplementedError, match=next(iter(kwargs))), backprop(BatchGrad()):
        loss.backward()
    assert_nothing_attached(model)


# ------------------------------------------------------------------------- sequence model
class IndexCase(Case):
    """:class:`Case` with integer inputs ``[N, T]``."""

    def __init__(self, build, loss: str, reduction: str, N: int, T: int = T, seed: int = 0):
        torch.manual_seed(seed)
        self.plain = build().double()
        with torch.no_grad():
            for m in self.plain.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.normal_()
                    m.bias.normal_()
        self.X = indices(N, T, seed)
        with torch.no_grad():
            out_shape = tuple(self.plain(self.X).shape)
        self.lf_plain, self.y = make_loss(loss, reduction, out_shape)
        self.model = extend(copy.deepcopy(self.plain))
        self.lf = extend(copy.deepcopy(self.lf_plain))


def sequence_model(T: int = T) -> nn.Sequential:
    return nn.Sequential(
        nn.Embedding(E, D, padding_idx=0),
        nn.LayerNorm(D),
        nn.Linear(D, 5),
        nn.GELU(),
        nn.Linear(5, 3),
        nn.Flatten(),
        nn.Linear(3 * T, 3),
    )


@pytest.mark.parametrize(("N", "reduction"), [(1, "sum"), (3, "mean")])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_sequence_first_order_and_diagonals(loss, reduction, N):
    """grad_batch, batch_l2, sum_grad_squared, variance, diag_ggn_exact, diag_h."""
    first_and_diag_against_plain(IndexCase(sequence_model, loss, reduction, N))


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_sequence_products(loss):
    """ggnmp, hmp, pchmp (clip) equal their blocks times V (LayerNorm and GELU residuals)."""
    case = IndexCase(sequence_model, loss, "mean", 3)
    case.run(GGNMP(), HMP(), PCHMP("clip"))
    params = case.plain_params()
    blocks = {
        "ggnmp": ref.blocks(ref.ggn(case.plain(case.X), case.lf_plain, case.y, params), params),
        "hmp": modified_hessian_blocks(case, "hessian"),
        "pchmp": modified_hessian_blocks(case, "pch-clip"),
    }
    torch.manual_seed(5)
    for i, (p, _) in enumerate(case.params()):
        V = torch.randn(2, *p.shape, dtype=DT)
        for field, block in blocks.items():
            expected = (V.reshape(2, -1) @ block[i]).reshape(V.shape)
            close(getattr(p, field)(V), expected, f"{field} of parameter {i}")


def _onehot(X: torch.Tensor, padding_idx) -> torch.Tensor:
    """``[N, T, E]`` one-hot inputs, zero at ``padding_idx`` (no gradient reaches that row)."""
    oh = torch.nn.functional.one_hot(X, E).to(DT)
    if padding_idx is not None:
        oh[..., padding_idx] = 0
    return oh


def embedding_kflr(case: IndexCase, approx: str) -> torch.Tensor:
    """``kron(A, G)`` of KFLR for the embedding weight by definition (as Linear on one-hot).

    ``J_{n,t} = d f(x_n) / d z_{n,t}``; expand: ``G = sum_{n,t} J^T H_n J``,
    ``A = 1/(NT) sum o o^T``; reduce: ``G = sum_n (sum_t J)^T H_n (sum_t J)``,
    ``A = 1/N sum_n obar obar^T``.
    """
    xs = ref.forward_trace(case.plain, case.X)
    out, z = xs[-1], xs[1]
    N, T_ = case.X.shape
    H = ref.output_hessian_blocks(case.lf_plain, out, case.y)
    J = ref.jacobian(out, [z]).reshape(N, -1, N, T_, D)
    oh = _onehot(case.X, 0)
    if approx == "expand":
        G = sum(J[n, :, n, t].T @ H[n] @ J[n, :, n, t] for n in range(N) for t in range(T_))
        A = torch.einsum("nte,ntf->ef", oh, oh) / (N * T_)
    else:
        G = sum(J[n, :, n].sum(1).T @ H[n] @ J[n, :, n].sum(1) for n in range(N))
        A = oh.mean(1).T @ oh.mean(1) / N
    return torch.kron(A, G)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_sequence_kflr_equals_definition(loss, approx):
    """KFLR of every Linear on ``[N, T, D]`` and of the embedding, both approximations."""
    case = IndexCase(sequence_model, loss, "mean", 3)
    case.run(KFLR(kfac_approx=approx), KFAC(kfac_approx=approx), KFRA(kfac_approx=approx))
    linear = ref.kron_factors_weight_sharing(case.plain, case.lf_plain, case.X, case.y, approx)
    for (p, q), (name, _) in zip(case.params(), case.plain.named_parameters()):
        if q in linear:
            close(torch.kron(*p.kflr) if len(p.kflr) == 2 else p.kflr[0], linear[q], name)
        assert p.kfac.param_shape == p.shape and p.kfra.param_shape == p.shape
    emb = case.model[0].weight
    close(torch.kron(*emb.kflr), embedding_kflr(case, approx), "embedding")
    close(emb.kflr[0], emb.kfac[0], "embedding A: the same input factor for KFAC")


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_embedding_single_token_is_exact(loss, kflr_kfra_batch_one, hbp_hessian_batch_one):
    """N = T = 1: KFLR, KFRA and HBP hessian (batch-average) of the embedding are exact blocks."""
    build = lambda: nn.Sequential(  # noqa: E731
        nn.Embedding(E, D), nn.Tanh(), nn.Flatten(), nn.Linear(D, 3)
    )
    for limit in (kflr_kfra_batch_one, hbp_hessian_batch_one):
        case = IndexCase(build, loss, "sum", 1, T=1)
        case.run(*limit.extensions())
        params = case.plain_params()
        blocks = limit.exact_blocks(case.plain, case.lf_plain, case.X, case.y, params)
        limit.check([case.model[0].weight], blocks[:1], close, "embedding")


def test_multihead_attention_has_no_kronecker_factors():
    """Attention as a whole module goes the generic path (exact: test_generic_path.py), which
    has no Kronecker factors: KFAC says so before writing anything."""
    model = extend(
        nn.ModuleDict(
            {"emb": nn.Embedding(E, D), "mha": nn.MultiheadAttention(D, 2, batch_first=True)}
        )
    ).double()
    x = model["emb"](indices(2))
    out, _ = model["mha"](x, x, x)
    loss = extend(nn.MSELoss())(out, torch.zeros_like(out))
    with pytest.raises(NotImplementedError, match="MultiheadAttention 'mha' has no rules of its"):
        with backprop(KFAC()):
            loss.backward()
    assert_nothing_attached(model)


# -------------------------------------------------------------------------------- BackPACK
def _backpack_run(plain, X, y, loss_fn, extensions, dtype):
    """BackPACK 1.7.1 on a copy of ``plain`` in ``dtype``; returns the copy."""
    from backpack import backpack as bp_backpack
    from backpack import extend as bp_extend

    model = bp_extend(copy.deepcopy(plain).to(dtype))
    lf = bp_extend(copy.deepcopy(loss_fn))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = lf(model(X if X.dtype == torch.long else X.to(dtype)), y)
        with bp_backpack(*extensions):
            loss.backward()
    return model


FIELDS = ["grad_batch", "batch_l2", "sum_grad_squared", "variance", "diag_ggn_exact"]


def _bp_extensions():
    import backpack.extensions as bp

    return [bp.BatchGrad(), bp.BatchL2Grad(), bp.SumGradSquared(), bp.Variance(), bp.DiagGGNExact()]


def test_against_backpack_embedding_sequence():
    """Embedding -> Linear on [N, T, D] -> Sigmoid -> Flatten -> Linear: first order, DiagGGN.

    BackPACK 1.7.1's Embedding works in float32 only (its one-hot inputs are float32):
    compared in float32 with float32 tolerances.
    """
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Embedding(E, D), nn.Linear(D, 5), nn.Sigmoid(), nn.Flatten(), nn.Linear(5 * T, 3)
    )
    X, y = indices(4), torch.tensor([0, 2, 1, 2])
    bp_model = _backpack_run(plain, X, y, nn.CrossEntropyLoss(), _bp_extensions(), torch.float32)
    model, lf = extend(copy.deepcopy(plain)), extend(nn.CrossEntropyLoss())
    with backprop(BatchGrad(), BatchL2(), SumGradSquared(), Variance(), DiagGGNExact()):
        lf(model(X), y).backward()
    for (name, p), q in zip(model.named_parameters(), bp_model.parameters()):
        for field in FIELDS:
            torch.testing.assert_close(
                getattr(p, field),
                getattr(q, field),
                rtol=1e-4,
                atol=1e-6,
                msg=lambda m, f=field, n=name: f"{n}.{f}: {m}",
            )


def test_against_backpack_batchnorm_eval():
    """Linear -> BatchNorm1d (eval) -> Sigmoid -> Linear in float64: first order, DiagGGN."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    plain = nn.Sequential(nn.Linear(5, 4), bn, nn.Sigmoid(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    X, y = torch.randn(4, 5, dtype=DT), torch.tensor([0, 2, 1, 2])
    bp_model = _backpack_run(plain, X, y, nn.CrossEntropyLoss(), _bp_extensions(), DT)
    model, lf = extend(copy.deepcopy(plain)), extend(nn.CrossEntropyLoss())
    with backprop(BatchGrad(), BatchL2(), SumGradSquared(), Variance(), DiagGGNExact()):
        lf(model(X), y).backward()
    for (name, p), q in zip(model.named_parameters(), bp_model.parameters()):
        for field in FIELDS:
            close(getattr(p, field), getattr(q, field), f"{name}.{field}")
