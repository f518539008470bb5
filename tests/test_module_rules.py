"""Each module's derivative rules against autograd, in float64.

The rules are called directly on the record a forward pass leaves, and compared
with ``torch.autograd`` on the same forward graph: transposed and plain
Jacobian products, second-order residuals, batch-averaged products and the
loss Hessian factors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hbpkit import extend
from hbpkit.curvature.factors import DiagonalFactor
from hbpkit.modules import ACTIVATIONS
from hbpkit.modules.tables import SECOND_ORDER

N, V = 3, 2


def _record(module: nn.Module, x: torch.Tensor, *rest):
    """Forward ``module`` (extended) on ``x`` that requires grad; the call record and output."""
    extend(module)
    x = x.clone().requires_grad_(True)
    out = module(x, *rest)
    call = out._hbpkit_call[0]
    return call, x, out


def _activation(cls: type) -> nn.Module:
    kwargs = {nn.Threshold: dict(threshold=0.1, value=-0.5)}.get(cls, {})
    return cls(**kwargs)


MODULES = {
    **{cls.__name__: (lambda c=cls: _activation(c), (N, 4)) for cls in ACTIVATIONS},
    "GELU_tanh": (lambda: nn.GELU(approximate="tanh"), (N, 4)),
    "LeakyReLU_inplace": (lambda: nn.LeakyReLU(0.2, inplace=True), (N, 4)),
    "Linear": (lambda: nn.Linear(4, 3), (N, 4)),
    "Linear_nobias": (lambda: nn.Linear(4, 3, bias=False), (N, 4)),
    "Linear_3d": (lambda: nn.Linear(4, 3), (N, 2, 4)),
    "Linear_4d": (lambda: nn.Linear(4, 3), (N, 2, 2, 4)),
    "Identity": (nn.Identity, (N, 4)),
    "Flatten": (nn.Flatten, (N, 2, 3)),
    "Flatten_partial": (lambda: nn.Flatten(2), (N, 2, 2, 3)),
    "Unflatten": (lambda: nn.Unflatten(1, (2, 3)), (N, 6)),
    "Dropout_eval": (lambda: nn.Dropout(0.5).eval(), (N, 4)),
    "Dropout_train": (lambda: nn.Dropout(0.5), (N, 6)),
    "Dropout2d_train": (lambda: nn.Dropout2d(0.5), (N, 4, 2, 2)),
}


@pytest.fixture(params=sorted(MODULES), name="case")
def fixture_case(request):
    torch.manual_seed(0)
    factory, shape = MODULES[request.param]
    module = factory().double()
    x = torch.randn(*shape, dtype=torch.float64)
    call, x, out = _record(module, x)
    return SECOND_ORDER.lookup(module), call, x, out


def test_jac_t_mat_prod(case):
    """``[V, N, *out] -> [V, N, *in]`` equals autograd's vector-Jacobian products."""
    rules, call, x, out = case
    mat = torch.randn(V, *out.shape, dtype=out.dtype)
    actual = rules.jac_t_mat_prod(call, mat)  # before autograd's backward releases the record
    expected = torch.stack([torch.autograd.grad(out, x, m, retain_graph=True)[0] for m in mat])
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_jac_mat_prod(case):
    """``[V, N, *in] -> [V, N, *out]`` equals the Jacobian-vector products (double vjp)."""
    rules, call, x, out = case
    mat = torch.randn(V, *x.shape, dtype=x.dtype)
    actual = rules.jac_mat_prod(call, mat)
    if isinstance(call.module, nn.Hardsigmoid):  # no double backward in PyTorch: forward mode
        expected = torch.stack(
            [torch.func.jvp(call.module.forward, (x.detach(),), (m,))[1] for m in mat]
        )
    else:
        u = torch.zeros_like(out, requires_grad=True)
        (vjp,) = torch.autograd.grad(out, x, u, create_graph=True)
        expected = torch.stack([torch.autograd.grad(vjp, u, m, retain_graph=True)[0] for m in mat])
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def _dense_jacobians(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians ``[N, D_out, D_in]`` (the modules act per sample)."""
    jacs = []
    for n in range(x.shape[0]):
        with torch.no_grad():
            jac = torch.autograd.functional.jacobian(
                lambda xn: type(module).forward(module, xn.unsqueeze(0)), x[n].detach()
            )
        d_in = x[n].numel()
        jacs.append(jac.reshape(-1, d_in))
    return torch.stack(jacs)


def test_ea_jac_t_mat_jac_prod(case):
    """``mean_n J_n^T H J_n`` (approximation (9)) against dense per-sample Jacobians."""
    rules, call, x, out = case
    if call.module.training and isinstance(call.module, nn.modules.dropout._DropoutNd):
        # the mask is not reproducible by a new forward: use J_n = diag(mask_n)
        mask = call.captured.expand(x.shape).reshape(N, -1)
        jacs = torch.diag_embed(mask)
    else:
        jacs = _dense_jacobians(call.module, x)
    d_out = jacs.shape[1]
    H = torch.randn(d_out, d_out, dtype=x.dtype)
    H = H + H.T
    expected = torch.einsum("noi,op,npj->ij", jacs, H, jacs) / N
    torch.testing.assert_close(
        rules.ea_jac_t_mat_jac_prod(call, H), expected, rtol=1e-10, atol=1e-12
    )


def _output_hessian(module: nn.Module, xn: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """Hessian of ``dz . f(x_n)`` w.r.t. ``x_n``, ``[D, D]``.

    Where PyTorch lacks a double backward (``Hardsigmoid``), central differences
    of autograd gradients (exact for piecewise-linear functions away from kinks).
    """

    def scalar(z):
        return (type(module).forward(module, z.unsqueeze(0)) * dz).sum()

    try:
        return torch.autograd.functional.hessian(scalar, xn).reshape(xn.numel(), -1)
    except RuntimeError as error:
        assert "not implemented" in str(error)
    h, cols = 1e-6, []
    for i in range(xn.numel()):
        e = torch.zeros_like(xn).flatten()
        e[i] = h
        e = e.reshape(xn.shape)
        g_plus = torch.autograd.functional.jacobian(scalar, xn + e)
        g_minus = torch.autograd.functional.jacobian(scalar, xn - e)
        cols.append(((g_plus - g_minus) / (2 * h)).flatten())
    return torch.stack(cols, 1)


def test_residual_diag(case):
    """``sum_k Hz_k(x) dz_k`` (eq. 7) is the diagonal returned, or zero if none is returned."""
    rules, call, x, out = case
    grad_output = torch.randn_like(out)
    residual = rules.residual_diag(call, grad_output)
    for n in range(N):
        module = call.module
        if isinstance(module, nn.modules.dropout._DropoutNd):
            expected = torch.zeros(x[n].numel(), x[n].numel(), dtype=x.dtype)  # linear
        else:
            expected = _output_hessian(module, x[n].detach(), grad_output[n])
        actual = (
            torch.zeros_like(expected) if residual is None else torch.diag(residual[n].flatten())
        )
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_linear_batch_grad():
    """Per-sample gradients of ``Linear`` on ``[N, T, D]`` against a loop over samples."""
    torch.manual_seed(0)
    module = nn.Linear(4, 3).double()
    call, x, out = _record(module, torch.randn(N, 2, 4, dtype=torch.float64))
    grad_output = torch.randn_like(out)
    rules = SECOND_ORDER.lookup(module)
    actual = {name: rules.batch_grad(call, name, grad_output) for name in ("weight", "bias")}
    for name in ("weight", "bias"):
        param = getattr(module, name)
        expected = torch.stack(
            [
                torch.autograd.grad(out[n], param, grad_output[n], retain_graph=True)[0]
                for n in range(N)
            ]
        )
        torch.testing.assert_close(actual[name], expected)


def test_diagonal_factor():
    """``DiagonalFactor`` represents ``diag[d_n]`` with signs, densely and through modules."""
    d = torch.randn(N, 2, 2, dtype=torch.float64)
    f = DiagonalFactor.from_values(d)
    torch.testing.assert_close(f.signed_square(), d)
    dense = f.dense()
    S = dense.signed().flatten(2)
    torch.testing.assert_close(
        torch.einsum("vni,vnj->nij", S, dense.S.flatten(2)), torch.diag_embed(d.flatten(1))
    )


@pytest.mark.parametrize("name", ["Linear", "Linear_3d", "Tanh", "Flatten", "Dropout_train"])
def test_jac_t_factor_of_diagonal(name):
    """Structured backpropagation of a diagonal factor equals the dense one."""
    torch.manual_seed(0)
    factory, shape = MODULES[name]
    module = factory().double()
    call, x, out = _record(module, torch.randn(*shape, dtype=torch.float64))
    rules = SECOND_ORDER.lookup(module)
    f = DiagonalFactor.from_values(torch.randn_like(out))
    structured, dense = rules.jac_t_factor(call, f), rules.jac_t_factor(call, f.dense())
    if isinstance(structured, DiagonalFactor):
        structured = structured.dense()
    for a, b in ((structured.S, dense.S), (structured.signed(), dense.signed())):
        torch.testing.assert_close(
            torch.einsum("vni,vnj->nij", a.flatten(2), structured.S.flatten(2)),
            torch.einsum("vni,vnj->nij", b.flatten(2), dense.S.flatten(2)),
        )


# losses ------------------------------------------------------------------------------------
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
