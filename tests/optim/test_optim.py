"""``hbpkit.optim``: conjugate gradients, Newton-CG and the Kronecker preconditioner.

The exact-product path of ``NewtonCG`` is tested with a product function attached
by hand (``p.ggnmp = ...`` from a dense matrix), so these tests do not depend on
the ``GGNMP`` / ``HMP`` / ``PCHMP`` extensions; one training test uses them when
``hbpkit.extensions`` provides ``GGNMP``.
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from torch import nn
from training import train

import hbpkit.extensions
from hbpkit import backprop, extend
from hbpkit.extensions import KFAC, KFLR
from hbpkit.optim import KroneckerPreconditioner, NewtonCG, cg
from hbpkit.optim.kronecker import damped_inverses

DT = torch.float64


def _spd(n: int, seed: int = 0, shift: float = 0.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, dtype=DT, generator=g)
    return M @ M.T / n + shift * torch.eye(n, dtype=DT)


def _dense_product(C: torch.Tensor, shape: torch.Size):
    """``V [K, *shape] -> [K, *shape]``: each slice times the dense block ``C``."""

    def product(V: torch.Tensor) -> torch.Tensor:
        return (V.reshape(V.shape[0], -1) @ C.T).reshape(V.shape)

    return product


def _mlp(seed: int = 0, sizes=(6, 4, 3)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Linear(sizes[0], sizes[1]), nn.Sigmoid(), nn.Linear(sizes[1], sizes[2])]
    return extend(nn.Sequential(*layers).to(DT))


def _data(seed: int = 0, n: int = 5, d: int = 6, c: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, dtype=DT, generator=g), torch.randint(c, (n,), generator=g)


# ------------------------------------------------------------------------------ cg
def test_cg_solves_batched_spd_systems_to_tolerance():
    K, shape = 3, (4, 5)
    n = math.prod(shape)
    mats = torch.stack([_spd(n, seed=k) for k in range(K)])
    b = torch.randn(K, *shape, dtype=DT)

    def matvec(V):
        return torch.einsum("kij,kj->ki", mats, V.reshape(K, n)).reshape(V.shape)

    expected = torch.linalg.solve(mats, b.reshape(K, n)).reshape(b.shape)
    x, info = cg(matvec, b, maxiter=200, tol=1e-12, return_info=True)
    torch.testing.assert_close(x, expected, atol=1e-9, rtol=1e-9)
    assert info.converged.all() and not info.negative_curvature.any()

    # the relative criterion: ||b - A x|| <= tol ||b|| per system, with few iterations
    tol = 0.1
    x, info = cg(matvec, b, maxiter=200, tol=tol, return_info=True)
    residual = (b - matvec(x)).reshape(K, n).norm(dim=1)
    assert info.converged.all()
    assert (residual <= tol * b.reshape(K, n).norm(dim=1) * (1 + 1e-9)).all()
    torch.testing.assert_close(info.residual_norm, residual)
    assert (info.iterations < n).all()


def test_cg_respects_maxiter_and_handles_zero_rhs_and_x0():
    n = 30
    A = _spd(n, shift=1e-3)
    b = torch.randn(2, n, dtype=DT)
    b[1] = 0.0
    calls = []

    def matvec(V):
        calls.append(1)
        return V @ A.T

    x, info = cg(matvec, b, maxiter=3, tol=1e-14, return_info=True)
    assert len(calls) == 3
    assert info.iterations.tolist() == [3, 0]
    assert info.converged.tolist() == [False, True]
    assert torch.equal(x[1], torch.zeros(n, dtype=DT))
    # warm start from the solution: converged before any iteration
    solution = torch.linalg.solve(A, b.T).T
    x, info = cg(matvec, b, x0=solution, tol=1e-6, return_info=True)
    assert info.iterations.tolist() == [0, 0]
    assert cg(matvec, b, maxiter=0).abs().sum() == 0


def test_cg_stops_on_negative_curvature():
    A = -torch.eye(4, dtype=DT)
    b = torch.randn(1, 4, dtype=DT)
    x, info = cg(lambda V: V @ A.T, b, maxiter=10, return_info=True)
    assert info.negative_curvature.all() and not info.converged.any()
    torch.testing.assert_close(x, b)  # first iteration: falls back to b


# ------------------------------------------------------------------------------ NewtonCG
@pytest.mark.parametrize("block_split", [1, 2, 3])
def test_newton_cg_exact_damped_step_with_dense_product(block_split):
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(3, 5, dtype=DT))
    b = nn.Parameter(torch.randn(4, dtype=DT))
    lr, damping = 0.7, 0.05
    expected, directions = {}, {}
    for i, p in enumerate((W, b)):
        n = p.numel()
        C = _spd(n, seed=10 + i)
        p.grad = torch.randn_like(p)
        p.ggnmp = _dense_product(C, p.shape)
        # the block-diagonal solve over contiguous chunks of p.flatten()
        d = torch.zeros(n, dtype=DT)
        for idx in torch.arange(n).tensor_split(min(block_split, n)):
            sub = C[idx][:, idx] + damping * torch.eye(len(idx), dtype=DT)
            d[idx] = torch.linalg.solve(sub, -p.grad.reshape(-1)[idx])
        directions[p] = d
        expected[p] = p.detach() + lr * d.reshape(p.shape)
    opt = NewtonCG(
        [W, b],
        curvature="ggn",
        lr=lr,
        damping=damping,
        cg_maxiter=100,
        cg_tol=1e-12,
        block_split=block_split,
    )
    opt.step()
    for p in (W, b):
        torch.testing.assert_close(p.detach(), expected[p], atol=1e-10, rtol=1e-10)
        assert opt.state[p]["cg_converged"].all()
        assert opt.state[p]["cg_iterations"].shape == (min(block_split, p.numel()),)
    C = _spd(W.numel(), seed=10)
    full = torch.linalg.solve(C + damping * torch.eye(15, dtype=DT), -W.grad.reshape(-1))
    # block_split=1 is the full damped Newton step; a split step differs from it
    assert torch.allclose(directions[W], full) == (block_split == 1)


@pytest.mark.parametrize("curvature,field", [("hessian", "hmp"), ("pch-abs", "pchmp")])
def test_newton_cg_reads_the_curvature_savefield(curvature, field):
    p = nn.Parameter(torch.randn(4, dtype=DT))
    C = _spd(4, seed=3)
    p.grad = torch.randn_like(p)
    setattr(p, field, _dense_product(C, p.shape))
    before = p.detach().clone()
    NewtonCG([p], curvature=curvature, lr=1.0, damping=0.0, cg_tol=1e-12).step()
    torch.testing.assert_close(p.detach(), before + torch.linalg.solve(C, -p.grad))


def test_newton_cg_cg_maxiter_truncates_the_solve():
    p = nn.Parameter(torch.zeros(20, dtype=DT))
    p.grad = torch.randn_like(p)
    p.ggnmp = _dense_product(_spd(20, seed=4, shift=1e-3), p.shape)
    opt = NewtonCG([p], curvature="ggn", lr=1.0, damping=1e-3, cg_maxiter=2, cg_tol=1e-12)
    opt.step()
    assert opt.state[p]["cg_iterations"].tolist() == [2]
    assert not opt.state[p]["cg_converged"].any()


def _exact_newton_cg(params, curvature: str, damping: float, block_split: int) -> NewtonCG:
    """A Newton-CG step (lr 1) whose CG runs to convergence: the damped solve itself."""
    return NewtonCG(
        params,
        curvature=curvature,
        lr=1.0,
        damping=damping,
        cg_maxiter=200,
        cg_tol=1e-13,
        block_split=block_split,
    )


def _split_newton_step(p, C: torch.Tensor, damping: float, block_split: int) -> torch.Tensor:
    """``p - (C_b + damping I)^{-1} g_b`` on each of ``block_split`` diagonal sub-blocks of
    the dense block ``C`` (``g`` the gradient of ``p``)."""
    n = p.numel()
    d = torch.zeros(n, dtype=DT)
    for idx in torch.arange(n).tensor_split(min(block_split, n)):
        sub = C[idx][:, idx] + damping * torch.eye(len(idx), dtype=DT)
        d[idx] = torch.linalg.solve(sub, -p.grad.reshape(-1)[idx])
    return p.detach() + d.reshape(p.shape)


@pytest.mark.parametrize("block_split", [1, 4])
def test_newton_cg_kflr_matches_the_kronecker_solve(block_split):
    model, loss_fn = _mlp(), extend(nn.CrossEntropyLoss())
    X, y = _data()
    damping = 0.1
    opt = _exact_newton_cg(model.parameters(), "kflr", damping, block_split)
    assert type(opt.extensions[0]) is KFLR
    with backprop(*opt.extensions):
        loss_fn(model(X), y).backward()
    expected = {}
    for p in model.parameters():
        if block_split == 1:
            expected[p] = p.detach() + p.kflr.solve(-p.grad, damping)
        else:  # solve the diagonal sub-blocks of the dense Kronecker block
            expected[p] = _split_newton_step(p, p.kflr.to_dense(), damping, block_split)
    opt.step()
    for p in model.parameters():
        assert opt.state[p]["cg_converged"].all()
        torch.testing.assert_close(p.detach(), expected[p], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("block_split", [1, 3])
def test_newton_cg_with_ggnmp_matches_the_dense_ggn_solve(block_split):
    model, loss_fn = _mlp(), extend(nn.CrossEntropyLoss())
    X, y = _data()
    params, damping = list(model.parameters()), 0.1
    dense = ref.blocks(ref.ggn(model(X), loss_fn, y, params), params)
    opt = _exact_newton_cg(params, "ggn", damping, block_split)
    with backprop(*opt.extensions):
        loss_fn(model(X), y).backward()
    expected = {p: _split_newton_step(p, C, damping, block_split) for p, C in zip(params, dense)}
    opt.step()
    for p in params:
        torch.testing.assert_close(p.detach(), expected[p], atol=1e-9, rtol=1e-9)


# ------------------------------------------------------------------------------ Kronecker
def _factored_tikhonov_step(grad, factors, damping):
    """``(G + pi sqrt(l) I)^{-1} grad (A + sqrt(l)/pi I)^{-1}``, written out by hand."""
    s = math.sqrt(damping)
    if len(factors) == 1:
        (G,) = factors
        return torch.linalg.solve(G + s * torch.eye(len(G), dtype=DT), grad)
    G, A = factors
    pi = math.sqrt((A.trace() / len(A)) / (G.trace() / len(G)))
    G_inv = torch.linalg.inv(G + pi * s * torch.eye(len(G), dtype=DT))
    A_inv = torch.linalg.inv(A + s / pi * torch.eye(len(A), dtype=DT))
    return G_inv @ grad @ A_inv


def _backward(model, opt, X, y):
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(X), y)
    with backprop(*opt.extensions):
        extend(nn.CrossEntropyLoss())(model(X), y).backward()
    return loss.item()


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_kronecker_first_step_is_factored_tikhonov(ema):
    model = _mlp()
    X, y = _data()
    lr, damping = 0.3, 0.01
    opt = KroneckerPreconditioner(
        model.parameters(), curvature="kflr", lr=lr, damping=damping, ema=ema
    )
    _backward(model, opt, X, y)
    expected = {
        p: p.detach() - lr * _factored_tikhonov_step(p.grad, p.kflr, damping)
        for p in model.parameters()
    }
    opt.step()
    for p in model.parameters():
        torch.testing.assert_close(p.detach(), expected[p])


def test_kronecker_moving_average_and_inverse_reuse():
    model = _mlp()
    lr, damping, ema = 0.2, 0.01, 0.7
    opt = KroneckerPreconditioner(
        model.parameters(), curvature="kflr", lr=lr, damping=damping, ema=ema, update_every=2
    )
    history = []
    for step in range(3):
        X, y = _data(seed=step)
        _backward(model, opt, X, y)
        history.append({p: [f.clone() for f in p.kflr] for p in model.parameters()})
        grads = {p: p.grad.clone() for p in model.parameters()}
        before = {p: p.detach().clone() for p in model.parameters()}
        opt.step()
        for p in model.parameters():
            avg = [f.clone() for f in history[0][p]]
            for h in history[1:]:
                avg = [ema * a + (1 - ema) * f for a, f in zip(avg, h[p])]
            torch.testing.assert_close(opt.state[p]["factors"], avg)
            # inverses from the averages at steps 0 and 2; step 1 reuses those of step 0
            used = avg if step != 1 else history[0][p]
            expected = _factored_tikhonov_step(grads[p], used, damping)
            torch.testing.assert_close(p.detach(), before[p] - lr * expected)
            if step == 1:  # a fresh inverse would have differed
                fresh = _factored_tikhonov_step(grads[p], avg, damping)
                assert not torch.allclose(expected, fresh)


def test_kronecker_momentum():
    p = nn.Parameter(torch.zeros(2, 3, dtype=DT))
    G, A = _spd(2, seed=1), _spd(3, seed=2)
    p.kfac = (G, A)
    lr, momentum, damping = 0.5, 0.9, 0.1
    opt = KroneckerPreconditioner(
        [p], curvature="kfac", lr=lr, damping=damping, momentum=momentum, ema=0.0
    )
    grads = [torch.randn(2, 3, dtype=DT) for _ in range(3)]
    buf, expected = torch.zeros(2, 3, dtype=DT), torch.zeros(2, 3, dtype=DT)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        buf = momentum * buf + _factored_tikhonov_step(g, (G, A), damping)
        expected = expected - lr * buf
        torch.testing.assert_close(p.detach(), expected)


def test_damped_inverses_fall_back_to_pi_one_for_zero_traces():
    G, A = torch.zeros(2, 2, dtype=DT), _spd(3)
    G_inv, A_inv = damped_inverses([G, A], 0.04)
    torch.testing.assert_close(G_inv, torch.eye(2, dtype=DT) / 0.2)
    torch.testing.assert_close(A_inv, torch.linalg.inv(A + 0.2 * torch.eye(3, dtype=DT)))


# ------------------------------------------------------------------------------ misuse
def test_extensions_and_missing_quantity_errors():
    opt = KroneckerPreconditioner([nn.Parameter(torch.zeros(2))], curvature="kfac")
    assert len(opt.extensions) == 1 and type(opt.extensions[0]) is KFAC
    assert opt.extensions[0] is opt.extensions[0]
    custom = KFAC(mc_samples=3)
    assert KroneckerPreconditioner([nn.Parameter(torch.zeros(2))], extension=custom).extensions == (
        custom,
    )
    with pytest.raises(ValueError, match="writes p.kflr"):
        NewtonCG([nn.Parameter(torch.zeros(2))], curvature="kfac", extension=KFLR())
    with pytest.raises(ValueError, match="curvature='ggn' is not one of"):
        KroneckerPreconditioner([nn.Parameter(torch.zeros(2))], curvature="ggn")
    with pytest.raises(ValueError, match="block_split"):
        NewtonCG([nn.Parameter(torch.zeros(2))], block_split=0)
    with pytest.raises(ValueError, match="update_every"):
        KroneckerPreconditioner([nn.Parameter(torch.zeros(2))], update_every=0)

    for cls, curvature, field in [
        (NewtonCG, "ggn", "ggnmp"),
        (NewtonCG, "pch-clip", "pchmp"),
        (NewtonCG, "kfra", "kfra"),
        (KroneckerPreconditioner, "hbp", "hbp"),
    ]:
        p = nn.Parameter(torch.zeros(3))
        p.grad = torch.ones(3)
        frozen = nn.Parameter(torch.zeros(2))  # no gradient: skipped, no error
        opt = cls([frozen, p], curvature=curvature)
        with pytest.raises(RuntimeError, match=rf"no p\.{field}.*backprop\(\*opt\.extensions\)"):
            opt.step()
        assert torch.equal(p.detach(), torch.zeros(3))


def test_extensions_for_exact_products_are_built_lazily(monkeypatch):
    monkeypatch.delattr(hbpkit.extensions, "PCHMP", raising=False)
    opt = NewtonCG([nn.Parameter(torch.zeros(2))], curvature="pch-abs")
    with pytest.raises(RuntimeError, match="needs hbpkit.extensions.PCHMP"):
        opt.extensions  # noqa: B018


@pytest.mark.parametrize("curvature,modify", [("pch-abs", "abs"), ("pch-clip", "clip")])
def test_extensions_for_pch(curvature, modify):
    (ext,) = NewtonCG([nn.Parameter(torch.zeros(2))], curvature=curvature).extensions
    assert ext.savefield == "pchmp" and ext.modify == modify


# ------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data[:300] / 16.0, dtype=DT)
    return X, torch.tensor(data.target[:300])


def _train(opt_factory, digits, steps=5):
    X, y = digits
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(64, 16), nn.Sigmoid(), nn.Linear(16, 10)).to(DT))
    loss_fn = extend(nn.CrossEntropyLoss())
    losses = train(model, loss_fn, opt_factory(model.parameters()), X, y, steps)
    with torch.no_grad():
        losses.append(loss_fn(model(X), y).item())
    return losses


TRAINERS = {
    "newton-cg-kflr": lambda ps: NewtonCG(ps, curvature="kflr", lr=0.5, damping=0.05),
    "newton-cg-kfra-split": lambda ps: NewtonCG(
        ps, curvature="kfra", lr=0.5, damping=0.05, block_split=4
    ),
    "kfac": lambda ps: KroneckerPreconditioner(
        ps, curvature="kfac", lr=1.0, damping=0.05, momentum=0.5, ema=0.9
    ),
    "kflr-update-every-2": lambda ps: KroneckerPreconditioner(
        ps, curvature="kflr", lr=1.0, damping=0.05, update_every=2
    ),
}


@pytest.mark.parametrize("name", list(TRAINERS))
def test_training_on_digits_decreases_the_loss(name, digits):
    losses = _train(TRAINERS[name], digits)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.95 * losses[0], losses


def test_training_on_digits_with_exact_ggn_products(digits):
    losses = _train(lambda ps: NewtonCG(ps, curvature="ggn", lr=0.5, damping=0.05), digits, 3)
    assert losses[-1] < losses[0], losses
