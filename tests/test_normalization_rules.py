"""The rules of LayerNorm, GroupNorm and BatchNorm against autograd, in float64.

Each rule is called on the record a forward pass of the extended module leaves
and compared with dense per-sample Jacobians and Hessians of a plain copy of the
module, evaluated again at the same input (autograd only).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from hbpkit import extend
from hbpkit.curvature.factors import DiagonalFactor, SqrtFactor
from hbpkit.modules.tables import SECOND_ORDER

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}
N, V, K = 3, 2, 2


def _batchnorm(cls, C):
    module = cls(C).eval()
    module.running_mean.normal_()
    module.running_var.uniform_(0.5, 2.0)
    return module


MODULES = {
    "LayerNorm": (lambda: nn.LayerNorm(4), (N, 4), "trailing"),
    "LayerNorm_seq": (lambda: nn.LayerNorm(4), (N, 2, 4), "trailing"),
    "LayerNorm_2d": (lambda: nn.LayerNorm((2, 3)), (N, 2, 2, 3), "trailing"),
    "LayerNorm_nobias": (lambda: nn.LayerNorm(4, bias=False), (N, 3, 4), "trailing"),
    "LayerNorm_noaffine": (lambda: nn.LayerNorm(4, elementwise_affine=False), (N, 4), "trailing"),
    "GroupNorm": (lambda: nn.GroupNorm(2, 4), (N, 4, 3), "channel"),
    "GroupNorm_2d": (lambda: nn.GroupNorm(3, 3), (N, 3, 2, 2), "channel"),
    "GroupNorm_noaffine": (lambda: nn.GroupNorm(1, 2, affine=False), (N, 2, 3), "channel"),
    "BatchNorm1d": (lambda: _batchnorm(nn.BatchNorm1d, 4), (N, 4), "channel"),
    "BatchNorm1d_seq": (lambda: _batchnorm(nn.BatchNorm1d, 4), (N, 4, 3), "channel"),
    "BatchNorm2d": (lambda: _batchnorm(nn.BatchNorm2d, 3), (N, 3, 2, 2), "channel"),
    "BatchNorm3d": (lambda: _batchnorm(nn.BatchNorm3d, 2), (N, 2, 2, 1, 2), "channel"),
}


class Case:
    """An extended module's record (``call``) and a plain copy with the same parameters."""

    def __init__(self, name: str):
        torch.manual_seed(0)
        factory, shape, self.layout = MODULES[name]
        self.plain = factory().double()
        with torch.no_grad():
            for p in self.plain.parameters():
                p.normal_()
        self.module = extend(copy.deepcopy(self.plain))
        self.x = torch.randn(*shape, dtype=DT)
        out = self.module(self.x.clone().requires_grad_(True))
        self.call = out._hbpkit_call[0]
        self.out_shape = out.shape
        self.rules = SECOND_ORDER.lookup(self.module)

    def params(self):
        return [(n, p) for n, p in self.plain.named_parameters()]

    def input_jacobians(self) -> torch.Tensor:
        """``[N, D_out, D_in]``, per sample (the modules act per sample here)."""
        jacs = []
        for n in range(N):
            J = torch.autograd.functional.jacobian(
                lambda xn: self.plain(xn.unsqueeze(0))[0], self.x[n]
            )
            jacs.append(J.reshape(self.x[n].numel(), -1))
        return torch.stack(jacs)

    def input_hessians(self, dz: torch.Tensor) -> torch.Tensor:
        """``[N, D, D]``: Hessian of ``dz_n . f(x_n)`` w.r.t. ``x_n``."""
        hess = []
        for n in range(N):
            H = torch.autograd.functional.hessian(
                lambda xn, g=dz[n]: (self.plain(xn.unsqueeze(0))[0] * g).sum(), self.x[n]
            )
            hess.append(H.reshape(self.x[n].numel(), -1))
        return torch.stack(hess)

    def param_jacobian(self, name: str) -> torch.Tensor:
        """``[N, D_out, P]``: ``d z_n / d param``."""
        param = dict(self.plain.named_parameters())[name]
        out = self.plain(self.x).reshape(N, -1)
        rows = [
            torch.autograd.grad(out.flatten()[i], param, retain_graph=True)[0].flatten()
            for i in range(out.numel())
        ]
        return torch.stack(rows).reshape(N, out.shape[1], -1)

    def position_of_feature(self) -> torch.Tensor:
        """``[D_out]``: which shared position ``t`` each output feature belongs to."""
        feats = self.out_shape[1:]
        D = math.prod(feats)
        if self.layout == "trailing":
            P = math.prod(self.plain.normalized_shape)
            return torch.arange(D) // P
        return torch.arange(D) % math.prod(feats[1:])


def _modify(values, curvature):
    return {"hessian": values, "pch-abs": values.abs(), "pch-clip": values.clamp(min=0)}[curvature]


def _eigen_modified(H: torch.Tensor, curvature: str) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(H)
    return vectors @ torch.diag_embed(_modify(values, curvature)) @ vectors.mT


@pytest.fixture(params=sorted(MODULES), name="case")
def fixture_case(request):
    return Case(request.param)


def test_jacobian_products(case):
    """``jac_t_mat_prod``, ``jac_mat_prod``, ``ea_jac_t_mat_jac_prod`` against dense Jacobians."""
    J = case.input_jacobians()  # [N, D_out, D_in]
    M_out = torch.randn(V, *case.out_shape, dtype=DT)
    M_in = torch.randn(V, *case.x.shape, dtype=DT)
    expected = torch.einsum("noi,vno->vni", J, M_out.reshape(V, N, -1))
    torch.testing.assert_close(
        case.rules.jac_t_mat_prod(case.call, M_out).reshape(V, N, -1), expected, **TOL
    )
    expected = torch.einsum("noi,vni->vno", J, M_in.reshape(V, N, -1))
    torch.testing.assert_close(
        case.rules.jac_mat_prod(case.call, M_in).reshape(V, N, -1), expected, **TOL
    )
    H = torch.randn(J.shape[1], J.shape[1], dtype=DT)
    H = H + H.T
    expected = torch.einsum("noi,op,npj->ij", J, H, J) / N
    torch.testing.assert_close(case.rules.ea_jac_t_mat_jac_prod(case.call, H), expected, **TOL)


@pytest.mark.parametrize("curvature", ["hessian", "pch-abs", "pch-clip"])
def test_residual_hooks(case, curvature):
    """The residual hooks against ``m(Hessian of dz_n . f(x_n))`` (eq. 7), eigenvalues modified."""
    dz = torch.randn(case.out_shape, dtype=DT)
    rules, call = case.rules, case.call
    factor = rules.residual_factor(call, dz, curvature)
    total = rules.residual_sum(call, dz, curvature)
    product = rules.residual_mat_prod(call, dz, curvature)
    assert rules.residual_factor(call, dz, "ggn") is None
    R = case.input_hessians(dz)
    if rules.linear_in_input:
        assert R.abs().max() < 1e-12
        assert factor is None and total is None and product is None
        return
    R = _eigen_modified(R, curvature)
    S = factor.S.reshape(factor.S.shape[0], N, -1)
    signed = factor.signed().reshape(S.shape)
    torch.testing.assert_close(torch.einsum("vni,vnj->nij", signed, S), R, **TOL)
    torch.testing.assert_close(total, R.sum(0), **TOL)
    M = torch.randn(K, *case.x.shape, dtype=DT)
    expected = torch.einsum("nij,knj->kni", R, M.reshape(K, N, -1))
    torch.testing.assert_close(product(M).reshape(K, N, -1), expected, **TOL)


def test_batch_grad_and_param_products(case):
    """``batch_grad``, ``param_jac_mat_prod``, ``param_jac_t_mat_prod_sum`` against ``dz/dp``."""
    rules, call = case.rules, case.call
    dz = torch.randn(case.out_shape, dtype=DT)
    for name, param in case.params():
        Jp = case.param_jacobian(name)  # [N, D, P]
        expected = torch.einsum("ndp,nd->np", Jp, dz.reshape(N, -1)).reshape(N, *param.shape)
        torch.testing.assert_close(rules.batch_grad(call, name, dz), expected, **TOL)
        Vp = torch.randn(K, *param.shape, dtype=DT)
        expected = torch.einsum("ndp,kp->knd", Jp, Vp.reshape(K, -1))
        actual = rules.param_jac_mat_prod(call, name, Vp).reshape(K, N, -1)
        torch.testing.assert_close(actual, expected, **TOL)
        M = torch.randn(K, *case.out_shape, dtype=DT)
        expected = torch.einsum("ndp,knd->kp", Jp, M.reshape(K, N, -1)).reshape(K, *param.shape)
        torch.testing.assert_close(rules.param_jac_t_mat_prod_sum(call, name, M), expected, **TOL)


def _factors(out_shape):
    torch.manual_seed(3)
    S = torch.randn(V, *out_shape, dtype=DT)
    sign = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]], dtype=DT)
    diag = DiagonalFactor.from_values(torch.randn(out_shape, dtype=DT))
    return [SqrtFactor(S, sign), diag]


def _dense_per_sample(factors) -> torch.Tensor:
    """``[N, D, D]``: ``sum_v sign S S^T`` of all factors."""
    total = 0
    for f in factors:
        f = f.dense() if isinstance(f, DiagonalFactor) else f
        S = f.S.reshape(f.S.shape[0], N, -1)
        total = total + torch.einsum("vni,vnj->nij", f.signed().reshape(S.shape), S)
    return total


def test_param_diag_and_kronecker(case):
    """``param_diag``, ``kron_from_sqrt``, ``kron_from_average`` against their definitions.

    With ``M_n`` the per-sample output curvature and ``J_{n,t}`` the rows of ``d z_n / d p``
    at position ``t``: diagonal of ``sum_n J_n^T M_n J_n``; reduce ``G = sum_n J_n^T M_n J_n``,
    expand ``G = sum_{n,t} J_{n,t}^T M_{n,tt} J_{n,t}``; averaged ``1/N sum_n J_n^T H J_n``
    (reduce) or its diagonal position blocks (expand).
    """
    rules, call = case.rules, case.call
    factors = _factors(case.out_shape)
    M = _dense_per_sample(factors)
    pos = case.position_of_feature()
    same = (pos[:, None] == pos[None, :]).to(DT)  # keep the diagonal position blocks
    H = torch.randn(M.shape[1], M.shape[1], dtype=DT)
    H = H + H.T
    for name, param in case.params():
        Jp = case.param_jacobian(name)
        block = torch.einsum("ndp,nde,neq->pq", Jp, M, Jp)
        torch.testing.assert_close(
            rules.param_diag(call, name, factors), block.diagonal().reshape(param.shape), **TOL
        )
        (G,) = rules.kron_from_sqrt(call, name, factors, "reduce")
        torch.testing.assert_close(G, block, **TOL)
        (G,) = rules.kron_from_sqrt(call, name, factors, "expand")
        torch.testing.assert_close(G, torch.einsum("ndp,nde,neq->pq", Jp, M * same, Jp), **TOL)
        (G,) = rules.kron_from_average(call, name, H, "reduce")
        torch.testing.assert_close(G, torch.einsum("ndp,de,neq->pq", Jp, H, Jp) / N, **TOL)
        (G,) = rules.kron_from_average(call, name, H, "expand")
        torch.testing.assert_close(G, torch.einsum("ndp,de,neq->pq", Jp, H * same, Jp) / N, **TOL)
