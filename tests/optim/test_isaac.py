"""ISAAC's ``zeta`` (eq. 17) through the Woodbury form (eq. 20) and its limits (theorems 1, 3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hbpkit import backprop, extend
from hbpkit.extensions import KFLR, InputCovariance
from hbpkit.extensions.roots import FactorRoots
from hbpkit.optim import FOOF, ISAAC
from hbpkit.optim.isaac import isaac_direction

DT = torch.float64


def _explicit_zeta(grad, G, A, lambda_g, lambda_a):
    """``lambda_g lambda_a (G + lambda_g I)^{-1} kron (A + lambda_a I)^{-1} vec(grad)``."""
    m, n = G.shape[0], A.shape[0]
    Gd = G + lambda_g * torch.eye(m, dtype=DT)
    Ad = A + lambda_a * torch.eye(n, dtype=DT)
    vec = torch.linalg.solve(torch.kron(Gd, Ad), grad.reshape(-1))
    return lambda_g * lambda_a * vec.reshape(m, n)


@pytest.mark.parametrize("b, rb", [(4, 6), (12, 30), (4, 30), (12, 6)])  # n = 9, m = 7
@pytest.mark.parametrize("lambda_g, lambda_a", [(0.1, 10.0), (3.0, 0.01)])
def test_woodbury_form_equals_the_explicit_kronecker_inverse(b, rb, lambda_g, lambda_a):
    g = torch.Generator().manual_seed(b + rb)
    a = torch.randn(b, 9, dtype=DT, generator=g)
    grads = torch.randn(b, 7, dtype=DT, generator=g)
    g_bar = torch.randn(rb, 7, dtype=DT, generator=g) / 3
    roots = FactorRoots(a, grads, g_bar, 1)
    grad = grads.T @ a
    zeta = isaac_direction(roots, grad, lambda_a, lambda_g)
    expected = _explicit_zeta(grad, roots.output_factor(), roots.input_factor(), lambda_g, lambda_a)
    torch.testing.assert_close(zeta, expected, rtol=1e-10, atol=1e-12)
    # zeta* (lambda_g -> infinity) and the gradient (lambda_a -> infinity as well)
    star = isaac_direction(roots, grad, lambda_a, None)
    torch.testing.assert_close(
        star, _explicit_zeta(grad, 0 * roots.output_factor(), roots.input_factor(), 1.0, lambda_a)
    )
    torch.testing.assert_close(isaac_direction(roots, grad, lambda_a, 1e9), star, rtol=1e-6, atol=0)
    torch.testing.assert_close(isaac_direction(roots, grad, 1e12, None), grad, rtol=1e-8, atol=0)


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 4))
    X, y = torch.randn(6, 10, dtype=DT), torch.randint(4, (6,))
    return extend(model.to(DT)), X, y


def test_isaac_step_equals_explicit_zeta_with_kflr_factors():
    model, X, y = _mlp()
    opt = ISAAC(model.parameters(), lr=0.5, lambda_a=0.3, lambda_g=0.2, loss_hessian="exact")
    before = [p.detach().clone() for p in model.parameters()]
    with backprop(*opt.extensions, KFLR()):
        extend(nn.CrossEntropyLoss())(model(X), y).backward()
    expected = []
    for p in model.parameters():
        G = p.kflr[0]
        if p.dim() == 2:
            z = _explicit_zeta(p.grad, G, p.kflr[1], 0.2, 0.3)
        else:  # a bias: input factor [1], undamped
            z = 0.2 * torch.linalg.solve(G + 0.2 * torch.eye(G.shape[0], dtype=DT), p.grad)
        expected.append(z.reshape(p.shape))
    opt.step()
    for p, p0, z in zip(model.parameters(), before, expected):
        torch.testing.assert_close(p.grad, z, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p0 - p.detach(), 0.5 * z, rtol=1e-10, atol=1e-12)


def test_zeta_star_equals_foof_without_average_and_amortisation():
    """ISAAC eq. 21: FOOF(ema=0, T=1) moves by lr * zeta* with lambda_a = damping."""
    model, X, y = _mlp()
    twin = extend(nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 4)).to(DT))
    twin.load_state_dict(model.state_dict())
    isaac = ISAAC(model.parameters(), lr=0.7, lambda_a=0.05)
    foof = FOOF(twin.parameters(), lr=0.7, damping=0.05, ema=0.0, update_every=1)
    assert isaac.extensions[0].loss_hessian is None  # zeta* backpropagates no curvature
    for net, opt in ((model, isaac), (twin, foof)):
        with backprop(*opt.extensions):
            extend(nn.CrossEntropyLoss())(net(X), y).backward()
        opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        # FOOF's bias takes grad * damping / (1 + damping); zeta*'s bias is the gradient
        if p.dim() == 2:
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_isaac_subset_of_layers_and_adam_base():
    model, X, y = _mlp()
    first, last = model[0], model[2]
    opt = ISAAC(
        [{"params": first.parameters()}, {"params": last.parameters(), "precondition": False}],
        lr=1e-2,
        lambda_a=0.1,
        base=torch.optim.Adam,
        betas=(0.9, 0.99),
    )
    with backprop(*opt.extensions, InputCovariance()):
        extend(nn.CrossEntropyLoss())(model(X), y).backward()
    grad_last = last.weight.grad.clone()
    expected = isaac_direction(first.weight.kronecker_roots, first.weight.grad, 0.1, None)
    opt.step()
    torch.testing.assert_close(first.weight.grad, expected)
    assert torch.equal(last.weight.grad, grad_last)
    assert opt.base.state[first.weight]["exp_avg"].shape == first.weight.shape


def test_isaac_errors():
    model, X, y = _mlp()
    with pytest.raises(ValueError, match="lambda_a"):
        ISAAC(model.parameters(), lambda_a=0.0)
    with pytest.raises(ValueError, match="lambda_g"):
        ISAAC(model.parameters(), lambda_g=-1.0)
    opt = ISAAC(model.parameters())
    extend(nn.CrossEntropyLoss())(model(X), y).backward()
    with pytest.raises(RuntimeError, match="kronecker_roots"):
        opt.step()
