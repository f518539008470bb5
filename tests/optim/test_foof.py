"""FOOF (eq. 6, algorithm 1) and the K-FAC dampings of the FOOF paper (eqs. 3 and 4)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from training import train

from hbpkit import backprop, extend
from hbpkit.optim import FOOF, KroneckerPreconditioner
from hbpkit.optim.kronecker import (
    correct_inverses,
    heuristic_inverses,
    precondition,
    precondition_correct,
)

DT = torch.float64


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n + 2, dtype=DT, generator=g)
    return M @ M.T / n


def _attach(p, cov, grad):
    p.input_covariance = cov
    p.grad = grad.clone()


def test_foof_schedule_average_window_and_amortised_inverse():
    """Algorithm 1 with T = 3, S = 2: averages at t mod 3 in {0, 2}, inverses at t mod 3 == 0."""
    w = nn.Parameter(torch.zeros(2, 4, dtype=DT))
    opt = FOOF([w], lr=0.1, damping=0.5, ema=0.9, update_every=3, update_window=2)
    sigma, inverse = None, None
    for t in range(7):
        cov, grad = _spd(4, t), torch.randn(2, 4, dtype=DT)
        if sigma is None:
            sigma = cov
        elif t % 3 in (0, 2):
            sigma = 0.9 * sigma + 0.1 * cov
        if t % 3 == 0:
            inverse = torch.linalg.inv(sigma + 0.5 * torch.eye(4, dtype=DT))
        before = w.detach().clone()
        _attach(w, cov, grad)
        opt.step()
        torch.testing.assert_close(opt.state[w]["sigma"], sigma)
        torch.testing.assert_close(before - w.detach(), 0.1 * 0.5 * grad @ inverse)


def test_foof_large_damping_is_sgd_and_bias_rule():
    torch.manual_seed(0)  # below: the step deviates from SGD by O(|Sigma| / damping) ~ 1e-8
    w, b = nn.Parameter(torch.randn(3, 4, dtype=DT)), nn.Parameter(torch.randn(3, dtype=DT))
    opt = FOOF([w, b], lr=0.2, damping=1e9)
    gw, gb = torch.randn(3, 4, dtype=DT), torch.randn(3, dtype=DT)
    w0, b0 = w.detach().clone(), b.detach().clone()
    _attach(w, _spd(4, 0), gw)
    _attach(b, torch.ones(1, 1, dtype=DT), gb)
    opt.step()
    torch.testing.assert_close(w0 - w.detach(), 0.2 * gw, rtol=1e-6, atol=0)
    torch.testing.assert_close(b0 - b.detach(), 0.2 * gb * 1e9 / (1 + 1e9), rtol=1e-12, atol=0)


def test_foof_momentum_and_decoupled_weight_decay():
    w = nn.Parameter(torch.randn(2, 3, dtype=DT))
    opt = FOOF([w], lr=0.1, damping=2.0, ema=0.0, momentum=0.9, weight_decay=0.01)
    buf = None
    for t in range(3):
        cov, grad = _spd(3, t), torch.randn(2, 3, dtype=DT)
        d = grad @ torch.linalg.inv(cov + 2.0 * torch.eye(3, dtype=DT))
        buf = d if buf is None else 0.9 * buf + d
        expected = w.detach() * (1 - 0.1 * 0.01) - 0.1 * 2.0 * buf
        _attach(w, cov, grad)
        opt.step()
        torch.testing.assert_close(w.detach(), expected)


def test_foof_trains_with_its_extension_and_errors():
    torch.manual_seed(0)
    model = extend(
        nn.Sequential(nn.Linear(5, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False))
    )
    X, y = torch.randn(32, 5), torch.randint(3, (32,))
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = FOOF(model.parameters(), lr=1.0, damping=1.0, update_every=5, momentum=0.5)
    losses = train(model, loss_fn, opt, X, y, 30)
    assert losses[-1] < 0.8 * losses[0]
    for p in model.parameters():
        del p.input_covariance
    loss_fn(model(X), y).backward()
    with pytest.raises(RuntimeError, match="input_covariance"):
        opt.step()
    for bad in (dict(damping=0.0), dict(update_every=2, update_window=3), dict(ema=1.0)):
        with pytest.raises(ValueError):
            FOOF(model.parameters(), **bad)


# ---------------------------------------------------------------- K-FAC dampings (eqs. 3, 4)
def test_correct_damping_is_the_exact_damped_kronecker_inverse():
    G, A, lam = _spd(3, 1), _spd(4, 2), 0.03
    grad = torch.randn(3, 4, dtype=DT)
    explicit = torch.linalg.solve(
        torch.kron(G, A) + lam * torch.eye(12, dtype=DT), grad.reshape(-1)
    )
    d = precondition_correct(correct_inverses([G, A], lam), grad)
    torch.testing.assert_close(d.reshape(-1), explicit, rtol=1e-10, atol=1e-12)
    gb = torch.randn(3, dtype=DT)
    d_bias = precondition_correct(correct_inverses([G], lam), gb)
    torch.testing.assert_close(d_bias, torch.linalg.solve(G + lam * torch.eye(3, dtype=DT), gb))


def test_heuristic_damping_is_pi_damping():
    G, A, lam = _spd(3, 3) * 5.0, _spd(4, 4) * 0.2, 0.03
    m, n = 3, 4
    # FOOF eq. 2: lambda_A / lambda_E = n Tr(A) / (m Tr(E)) with W in R^{m_out x n_in}
    # written in FOOF's notation (W: n x m, A: m x D): (Tr(A)/dim A) / (Tr(G)/dim G)
    ratio = (torch.trace(A) / n) / (torch.trace(G) / m)
    lambda_a, lambda_g = math.sqrt(lam * ratio), math.sqrt(lam / ratio)
    assert math.isclose(lambda_a * lambda_g, lam)
    grad = torch.randn(3, 4, dtype=DT)
    damped = torch.kron(
        G + lambda_g * torch.eye(m, dtype=DT), A + lambda_a * torch.eye(n, dtype=DT)
    )
    explicit = torch.linalg.solve(damped, grad.reshape(-1))
    d = precondition(heuristic_inverses([G, A], lam), grad)
    torch.testing.assert_close(d.reshape(-1), explicit, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["factored", "heuristic", "correct"])
@pytest.mark.parametrize("curvature", ["kfac", "kflr", "empirical"])
def test_kronecker_preconditioner_damping_modes_and_second_factors(mode, curvature):
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT))
    X, y = torch.randn(9, 5, dtype=DT), torch.randint(3, (9,))
    opt = KroneckerPreconditioner(
        model.parameters(), curvature=curvature, lr=1.0, damping=0.1, ema=0.0, damping_mode=mode
    )
    before = [p.detach().clone() for p in model.parameters()]
    with backprop(*opt.extensions):
        extend(nn.CrossEntropyLoss())(model(X), y).backward()
    field = {"kfac": "kfac", "kflr": "kflr", "empirical": "kfac_empirical"}[curvature]
    expected = []
    for p in model.parameters():
        factors = getattr(p, field)
        if mode == "correct":
            C = factors.to_dense() + 0.1 * torch.eye(p.numel(), dtype=DT)
            expected.append(torch.linalg.solve(C, p.grad.reshape(-1)).reshape(p.shape))
        elif mode == "heuristic":
            expected.append(precondition(heuristic_inverses(list(factors), 0.1), p.grad))
        else:
            expected.append(None)
    opt.step()
    for p, p0, d in zip(model.parameters(), before, expected):
        if d is not None:
            torch.testing.assert_close(p0 - p.detach(), d, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="damping_mode"):
        KroneckerPreconditioner(model.parameters(), damping_mode="tikhonov")
