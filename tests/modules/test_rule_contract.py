"""The rule contract: every rule method a rules object implements equals its definition.

One table (:mod:`rule_cases`: activations, reshapes, dropout, Linear, Embedding,
normalization, convolutions, pooling, padding) runs through every check below that its
rules implement (``ModuleRules.implements``). The rules act on the record of a forward pass
of the extended module; the references are brute force in float64 on a second forward pass
of the same module (same seed, so the same dropout mask) through ``torch.autograd`` only:
per-sample Jacobians ``J_n = dz_n/dx_n`` (checked to be block diagonal over samples),
parameter Jacobians ``J_{p,n} = dz_n/dp`` and second derivatives of ``dz_n . f(x_n)``.
Tolerance ``rtol=1e-10, atol=1e-12`` throughout.

Definitions (hbp paper eq. 7 and approximation (9); supplement S.9, S.12):

* ``jac_t_mat_prod``: ``J_n^T m_n``; ``jac_mat_prod``: ``J_n m_n``;
  ``ea_jac_t_mat_jac_prod``: ``1/N sum_n J_n^T H J_n`` for a general ``H``;
* ``jac_t_factor``: ``sum_v sign (J_n^T s)(J_n^T s)^T = J_n^T (sum_v sign s s^T) J_n``
  (diagonal factors stay diagonal exactly when ``keeps_diagonal``);
* residuals: ``R_n`` the Hessian of ``dz_n . f(x_n)`` w.r.t. ``x_n``, its eigenvalues
  modified by the curvature option, as a factor, a sum over samples and a product;
* parameters: per-sample gradients ``J_{p,n}^T dz_n`` and their statistics, parameter
  Jacobian products, ``diag(sum_n J_{p,n}^T M_n J_{p,n})`` and the Kronecker factors of
  KFLR / KFRA with ``kfac_approx`` ``expand`` (positions kept apart) or ``reduce``.
"""

from __future__ import annotations

import pytest
import torch
from rule_cases import CASES, N, Recorded, implementing, positions_and_channels, recorded
from rule_references import (
    DT,
    close,
    curvature_of,
    input_hessians,
    input_jacobians,
    modified,
    param_jacobian,
    random_factors,
)
from torch import nn

from hbpkit.curvature.factors import DiagonalFactor, SqrtFactor

V, K = 2, 2
CURVATURES = ("hessian", "pch-abs", "pch-clip")


def _names(*methods: str, floats: bool | None = True) -> list[str]:
    return implementing(CASES, *methods, floats=floats)


def _param_names(*methods: str) -> list[str]:
    return implementing(CASES, *methods, floats=None, params=True)


# --------------------------------------------------------------------------- input side
@pytest.mark.parametrize("name", _names("jac_t_mat_prod"))
def test_jac_t_mat_prod(name):
    """``[V, N, *out] -> [V, N, *in]`` equals autograd's vector-Jacobian products."""
    r = recorded(CASES[name])
    mat = torch.randn(V, *r.out_shape, dtype=DT)
    actual = r.rules.jac_t_mat_prod(r.call, mat)
    expected = torch.stack(
        [torch.autograd.grad(r.out_ref, r.x_ref, m, retain_graph=True)[0] for m in mat]
    )
    close(actual, expected, name)


@pytest.mark.parametrize("name", _names("jac_mat_prod"))
def test_jac_mat_prod(name):
    """``[V, N, *in] -> [V, N, *out]`` equals ``J_n m_n``."""
    r = recorded(CASES[name])
    mat = torch.randn(V, *r.x.shape, dtype=DT)
    actual = r.rules.jac_mat_prod(r.call, mat)
    J = input_jacobians(r)
    expected = torch.einsum("noi,vni->vno", J, mat.flatten(2)).reshape(V, *r.out_shape)
    close(actual, expected, name)


@pytest.mark.parametrize("name", _names("ea_jac_t_mat_jac_prod"))
def test_ea_jac_t_mat_jac_prod(name):
    """``mean_n J_n^T H J_n`` (approximation (9)) for a general (non-symmetric) ``H``."""
    r = recorded(CASES[name])
    d_out = r.out_ref[0].numel()
    H = torch.randn(d_out, d_out, dtype=DT)
    actual = r.rules.ea_jac_t_mat_jac_prod(r.call, H)
    J = input_jacobians(r)
    close(actual, torch.einsum("noi,op,npj->ij", J, H, J) / N, name)


@pytest.mark.parametrize("name", _names("jac_t_mat_prod"))
def test_jac_t_factor_of_diagonal(name):
    """``J_n^T diag(sign d_n^2) J_n``; diagonal again exactly when the rules keep diagonals;
    the same through the dense form of the diagonal factor."""
    r = recorded(CASES[name])
    f = DiagonalFactor.from_values(torch.randn(r.out_shape, dtype=DT))
    result = r.rules.jac_t_factor(r.call, f)
    through_dense = r.rules.jac_t_factor(r.call, f.dense())
    assert isinstance(result, DiagonalFactor) == r.rules.keeps_diagonal
    if isinstance(result, DiagonalFactor):
        assert result.s.shape == r.x.shape
        assert result.sign is None or result.sign.shape == r.x.shape
    else:
        assert isinstance(result, SqrtFactor) and result.S.shape[1:] == r.x.shape
    J = input_jacobians(r)
    expected = torch.einsum("noi,no,noj->nij", J, f.signed_square().flatten(1), J)
    close(curvature_of(result), expected, f"{name}: structured")
    close(curvature_of(through_dense), expected, f"{name}: dense")


@pytest.mark.parametrize("name", _names("jac_t_mat_prod"))
def test_jac_t_factor_of_sqrt(name):
    """A signed sqrt factor: ``sum_v sign (J^T S)(J^T S)^T = J^T (sum_v sign S S^T) J``."""
    r = recorded(CASES[name])
    S = torch.randn(V, *r.out_shape, dtype=DT)
    sign = torch.tensor([[1.0] * N, [-1.0] * N], dtype=DT)
    factor = SqrtFactor(S, sign)
    result = r.rules.jac_t_factor(r.call, factor)
    assert isinstance(result, SqrtFactor) and result.S.shape == (V, *r.x.shape)
    J = input_jacobians(r)
    expected = torch.einsum("noi,nop,npj->nij", J, curvature_of(factor), J)
    close(curvature_of(result), expected, name)


@pytest.mark.parametrize("name", _names("jac_t_mat_prod"))
def test_residual(name):
    """The residual ``R_n`` of eq. (7): none where ``linear_in_input``; else its diagonal
    (``residual_diag``, elementwise modules) and, for every curvature option, ``m(R_n)`` as a
    signed factor, ``sum_n m(R_n)`` and ``M -> m(R_n) M``; nothing for the GGN."""
    r = recorded(CASES[name])
    rules, call = r.rules, r.call
    dz = torch.randn(r.out_shape, dtype=DT)
    results = {
        c: (rules.residual_factor(call, dz, c), rules.residual_sum(call, dz, c)) for c in CURVATURES
    }
    products = {c: rules.residual_mat_prod(call, dz, c) for c in CURVATURES}
    assert rules.residual_factor(call, dz, "ggn") is None
    try:
        diag = rules.residual_diag(call, dz)
    except NotImplementedError:
        assert not rules.diagonal_jacobian and not rules.linear_in_input
        diag = "dense"
    R = input_hessians(r, dz)
    if rules.linear_in_input:
        assert R.abs().max() < 1e-12, f"{name} is not linear in its input"
        assert diag is None
        for c in CURVATURES:
            assert results[c] == (None, None) and products[c] is None, c
        return
    if diag != "dense":
        close(torch.diag_embed(diag.flatten(1)), R, f"{name}: residual_diag")
    M = torch.randn(K, *r.x.shape, dtype=DT)
    for c in CURVATURES:
        factor, total = results[c]
        expected = modified(R, c)
        close(curvature_of(factor), expected, f"{name}: residual_factor {c}")
        close(total, expected.sum(0), f"{name}: residual_sum {c}")
        if products[c] is None:
            assert expected.abs().max() < 1e-12, f"{name}: residual_mat_prod {c} is None"
        else:
            product = products[c](M).reshape(K, N, -1)
            close(product, torch.einsum("nij,knj->kni", expected, M.flatten(2)), f"{name}: {c}")


@pytest.mark.parametrize("name", _names(floats=False))
def test_first_module_has_no_input_products(name):
    """Integer inputs (Embedding): no input derivatives, said when asked."""
    r = recorded(CASES[name])
    with pytest.raises(NotImplementedError, match="first module"):
        r.rules.jac_t_mat_prod(r.call, torch.zeros(1, *r.out_shape, dtype=DT))


# --------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("name", _param_names("batch_grad"))
def test_first_order(name):
    """``batch_grad`` ``J_{p,n}^T dz_n``, ``summed_grad``, ``batch_l2``, ``sum_grad_squared``."""
    r = recorded(CASES[name])
    dz = torch.randn(r.out_shape, dtype=DT)
    actual = {
        p: [
            getattr(r.rules, m)(r.call, p, dz)
            for m in ("batch_l2", "summed_grad", "sum_grad_squared", "batch_grad")
        ]
        for p, _ in r.params
    }
    assert actual, f"{name} has rules for no parameter"
    for p, param in r.params:
        Jp = param_jacobian(r, param)
        gb = torch.einsum("ndp,nd->np", Jp, dz.reshape(N, -1)).reshape(N, *param.shape)
        l2, summed, sgs, batch = actual[p]
        close(batch, gb, f"{name}.{p} batch_grad")
        close(l2, gb.flatten(1).square().sum(1), f"{name}.{p} batch_l2")
        close(summed, gb.sum(0), f"{name}.{p} summed_grad")
        close(sgs, gb.square().sum(0), f"{name}.{p} sum_grad_squared")


@pytest.mark.parametrize("name", _param_names("param_jac_mat_prod", "param_jac_t_mat_prod_sum"))
def test_param_jacobian_products(name):
    """``[K, *p] -> [K, N, *out]``: ``J_{p,n} v_k``; ``[K, N, *out] -> [K, *p]``: sum_n J^T m."""
    r = recorded(CASES[name])
    vs = {p: torch.randn(K, *param.shape, dtype=DT) for p, param in r.params}
    ms = {p: torch.randn(K, *r.out_shape, dtype=DT) for p, _ in r.params}
    jvp = {p: r.rules.param_jac_mat_prod(r.call, p, vs[p]) for p, _ in r.params}
    vjp = {p: r.rules.param_jac_t_mat_prod_sum(r.call, p, ms[p]) for p, _ in r.params}
    for p, param in r.params:
        Jp = param_jacobian(r, param)
        expected = torch.einsum("ndp,kp->knd", Jp, vs[p].reshape(K, -1))
        close(jvp[p], expected.reshape(K, *r.out_shape), f"{name}.{p} param_jac_mat_prod")
        expected = torch.einsum("ndp,knd->kp", Jp, ms[p].reshape(K, N, -1))
        close(vjp[p], expected.reshape(K, *param.shape), f"{name}.{p} param_jac_t_mat_prod_sum")


@pytest.mark.parametrize("name", _param_names("param_diag"))
def test_param_diag(name):
    """``diag(sum_n J_{p,n}^T M_n J_{p,n})`` for signed, unsigned and diagonal factors."""
    r = recorded(CASES[name])
    factors = random_factors(r.out_shape)
    actual = {p: r.rules.param_diag(r.call, p, factors) for p, _ in r.params}
    M = sum(curvature_of(f) for f in factors)
    for p, param in r.params:
        Jp = param_jacobian(r, param)
        expected = torch.einsum("ndp,nde,neq->pq", Jp, M, Jp).diagonal()
        close(actual[p], expected.reshape(param.shape), f"{name}.{p} param_diag")


def _input_features(r: Recorded, Jw: torch.Tensor, channels: torch.Tensor, out_axis: int):
    """``[N, T, S]``: the input ``a_{n,t}`` of ``z_{n,t,o} = sum_s W[o, s] a_{n,t,s}``.

    Read off the weight Jacobian: ``a_{n,t,s} = d z_{n,t,o} / d W[o, s]`` at ``o = 0``.
    """
    _, weight = next((p, w) for p, w in r.params if w.dim() >= 2)
    C = weight.shape[out_axis]
    Jw = Jw.reshape(N, Jw.shape[1], *weight.shape).movedim(2 + out_axis % weight.dim(), 2)
    Jw = Jw.reshape(N, Jw.shape[1], C, -1)
    first = (channels == 0).nonzero().flatten()  # the features of channel 0, by position
    return Jw[:, first, 0, :]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", _param_names("kron_from_sqrt", "kron_from_average"))
def test_kronecker_factors(name, approx):
    """KFLR's factors from sqrt factors and KFRA's from a batch-averaged ``H``.

    One factor ``[P, P]`` (biases, normalization parameters): ``sum_n J_{p,n}^T (M_n * B)
    J_{p,n}`` and ``1/N sum_n J_{p,n}^T (H * B) J_{p,n}``, ``B`` keeping pairs of features at
    the same position (expand) or all pairs (reduce). Two factors (a weight): the output
    factor ``G`` the same with ``J_{p,n}`` the channel indicator, the input factor ``A =
    1/(N T) sum_{n,t} a a^T`` (expand) or ``1/N sum_n abar abar^T`` (reduce).
    Refused with a reason where the table says so (grouped and transposed convolutions).
    """
    case = CASES[name]
    r = recorded(case)
    factors = random_factors(r.out_shape)
    d_out = r.out_ref[0].numel()
    H = torch.randn(d_out, d_out, dtype=DT)
    refused = [p for p, _ in r.params if case.kron_refused and p in case.kron_refused_for]
    for p in refused:
        with pytest.raises(NotImplementedError, match=case.kron_refused):
            r.rules.kron_from_sqrt(r.call, p, factors, approx)
        with pytest.raises(NotImplementedError, match=case.kron_refused):
            r.rules.kron_from_average(r.call, p, H, approx)
    params = [(p, param) for p, param in r.params if p not in refused]
    from_sqrt = {p: r.rules.kron_from_sqrt(r.call, p, factors, approx) for p, _ in params}
    from_avg = {p: r.rules.kron_from_average(r.call, p, H, approx) for p, _ in params}
    M = sum(curvature_of(f) for f in factors)
    pos, channels = positions_and_channels(case, r.out_shape)
    B = (
        (pos[:, None] == pos[None, :]).to(DT)
        if approx == "expand"
        else torch.ones(d_out, d_out, dtype=DT)
    )
    for p, param in params:
        Jp = param_jacobian(r, param)
        got_sqrt, got_avg = from_sqrt[p], from_avg[p]
        assert len(got_sqrt) == len(got_avg), f"{name}.{p}"
        if len(got_sqrt) == 1:
            close(got_sqrt[0], torch.einsum("ndp,nde,neq->pq", Jp, M * B, Jp), f"{name}.{p} G")
            expected = torch.einsum("ndp,de,neq->pq", Jp, H * B, Jp) / N
            close(got_avg[0], expected, f"{name}.{p} G average")
            continue
        assert len(got_sqrt) == 2 and param.dim() >= 2, f"{name}.{p}"
        if isinstance(r.module, nn.modules.conv._ConvNd):  # groups, transposed convolutions
            _check_conv_weight_factors(r, f"{name}.{p}", Jp, got_sqrt, got_avg, M, H, B, approx)
            continue
        C = param.shape[case.out_axis]
        ind = torch.nn.functional.one_hot(channels, C).to(DT)  # [D_out, C]
        G = torch.einsum("do,nde,eq->oq", ind, M * B, ind)
        G_avg = ind.T @ (H * B) @ ind
        a = _input_features(r, Jp, channels, case.out_axis)  # [N, T, S]
        if approx == "expand":
            A = torch.einsum("nts,ntu->su", a, a) / (a.shape[0] * a.shape[1])
        else:
            abar = a.mean(1)
            A = abar.T @ abar / N
        g = 0 if case.out_axis == 0 else 1
        close(got_sqrt[g], G, f"{name}.{p} G")
        close(got_sqrt[1 - g], A, f"{name}.{p} A")
        close(got_avg[g], G_avg, f"{name}.{p} G average")
        close(got_avg[1 - g], A, f"{name}.{p} A average")


def _check_conv_weight_factors(r: Recorded, what, Jp, got_sqrt, got_avg, M, H, B, approx):
    """A (transposed) convolution's weight with ``g`` groups: group ``i``'s factors are those
    of the matrix ``[C_out/g, S]`` that maps its patches to its output channels.

    ``G_i``: the ``i``-th diagonal block of the output factor over all ``C_out`` channels;
    ``A_i``: from the patches read off the weight Jacobian at the group's first output
    channel ``o_i``, ``d z_{n,t,o_i} / dW`` over the group's entries in the matricised order:
    ``W[o_i, :]`` for a convolution, ``W[c, o_i - i C_out/g, k]`` over the group's input
    channels ``c`` (then ``k``) for a transposed one (its first two axes swapped).
    """
    module = r.module
    g, transposed = module.groups, isinstance(module, nn.modules.conv._ConvTransposeNd)
    for got in (got_sqrt, got_avg):
        assert getattr(got, "transposed", False) == transposed, what
        assert (got[0].dim() == 3 and got[0].shape[0] == g) if g > 1 else got[0].dim() == 2, what
    C = r.out_shape[1]
    _, channels = positions_and_channels(r.case, r.out_shape)
    ind = torch.nn.functional.one_hot(channels, C).to(DT)  # [D_out, C]
    G = torch.einsum("do,nde,eq->oq", ind, M * B, ind)
    G_avg = ind.T @ (H * B) @ ind
    W = module.weight
    Jw = Jp.reshape(N, Jp.shape[1], *W.shape)  # [N, D_out, *W.shape]
    m, c_g = C // g, module.in_channels // g
    for i in range(g):
        o = i * m
        first = (channels == o).nonzero().flatten()  # the features of channel o, by position
        if transposed:  # W [C_in, C_out/g, *k]: the group's input channels at column 0
            a = Jw[:, first, i * c_g : (i + 1) * c_g, 0].flatten(2)
        else:
            a = Jw[:, first, o].flatten(2)
        if approx == "expand":
            A = torch.einsum("nts,ntu->su", a, a) / (a.shape[0] * a.shape[1])
        else:
            abar = a.mean(1)
            A = abar.T @ abar / N
        blocks = slice(o, o + m)
        for got, G_ref, how in ((got_sqrt, G, "sqrt"), (got_avg, G_avg, "average")):
            G_i, A_i = (got[0][i], got[1][i]) if g > 1 else (got[0], got[1])
            close(G_i, G_ref[blocks, blocks], f"{what} G group {i} ({how})")
            close(A_i, A, f"{what} A group {i} ({how})")


def test_the_table_reaches_every_check():
    """Every check above runs on at least one case of each family it applies to (no silent
    gap when a family's rules stop implementing a method)."""
    assert len(_names("jac_t_mat_prod")) == len(
        [c for c in CASES.values() if c.inputs != "indices"]
    )
    for method in ("param_diag", "kron_from_sqrt", "param_jac_mat_prod", "batch_grad"):
        names = _names(method, floats=None)
        for family in ("Linear", "Conv2d", "Embedding", "LayerNorm", "BatchNorm1d"):
            assert family in names, (method, family)
