"""``hbpkit.optim.GroupedNewton`` in float64 against brute-force definitions.

References: the full Hessian ``[P, P]`` and third-derivative tensor ``[P, P, P]`` of a tiny
tanh MLP from ``torch.autograd.functional`` on the flattened parameters, contracted with
a dense partition matrix ``I_{S:P}`` built in the test; the paper's special cases (Cauchy's
step for ``S = 1``, Newton's for ``S = P``); the optimality conditions of the cubic model;
and the invariance of the trajectory under a subset-wise affine reparameterisation.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from hbpkit import backprop, extend
from hbpkit.extensions import KFAC, DiagGGNExact
from hbpkit.optim import GroupedNewton
from hbpkit.optim.grouped_newton_cubic import DegenerateSummaryWarning, cubic_regularised_lrs
from hbpkit.optim.grouped_newton_derivatives import summarise
from hbpkit.optim.grouped_newton_partition import build_partition

DT = torch.float64
METHOD_1 = dict(momentum=0.0, lr_momentum=0.0, update_every=1, clip_negative=False, lr=1.0)


def _mlp(seed: int = 0, sizes=(3, 2, 2), act=nn.Tanh) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Linear(sizes[0], sizes[1]), act(), nn.Linear(sizes[1], sizes[2])]
    return nn.Sequential(*layers).to(DT)


def _data(seed: int = 0, n: int = 6, d: int = 3, c: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, dtype=DT, generator=g), torch.randint(c, (n,), generator=g)


def _flat_loss(model: nn.Module, loss_fn, X, y):
    """``theta [P] -> loss``, ``theta`` the parameters flattened in ``model.parameters()`` order."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss(theta):
        chunks = theta.split([math.prod(s) for s in shapes])
        params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return loss_fn(functional_call(model, params, (X,)), y)

    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    return loss, theta


def _derivatives(model, loss_fn, X, y):
    """Gradient ``[P]``, Hessian ``[P, P]``, third derivatives ``[P, P, P]`` by autograd."""
    f, theta = _flat_loss(model, loss_fn, X, y)
    g = torch.func.grad(f)(theta)
    H = torch.func.hessian(f)(theta)
    T = torch.func.jacfwd(torch.func.hessian(f))(theta)
    return theta, g, H, T


def _partition_matrix(model, subsets_of_tensors) -> torch.Tensor:
    """Dense ``I_{S:P}`` from lists of tensor indices (built independently of hbpkit)."""
    sizes = [p.numel() for p in model.parameters()]
    offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    Ind = torch.zeros(len(subsets_of_tensors), offsets[-1], dtype=DT)
    for s, tensors in enumerate(subsets_of_tensors):
        for i in tensors:
            Ind[s, offsets[i] : offsets[i + 1]] = 1.0
    return Ind


# tensor order of _mlp: W1, b1, W2, b2
PARTITIONS = {
    "canonical": [[0], [1], [2], [3]],
    "trivial": [[0, 1, 2, 3]],
    "weights-biases": [[0, 2], [1, 3]],
    "blocks-2": [[0], [2], [1], [3]],
}


# ------------------------------------------------------------- summarised derivatives
@pytest.mark.parametrize("name", list(PARTITIONS) + ["discrete"])
@pytest.mark.parametrize("loss_cls", [nn.CrossEntropyLoss, nn.MSELoss])
def test_summary_matches_contractions_of_full_derivative_tensors(name, loss_cls):
    model = _mlp()
    X, y = _data()
    if loss_cls is nn.MSELoss:
        y = torch.randn(len(X), 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    loss_fn = loss_cls()
    theta, g, H, T = _derivatives(model, loss_fn, X, y)
    P = theta.numel()
    Ind = (
        torch.eye(P, dtype=DT) if name == "discrete" else _partition_matrix(model, PARTITIONS[name])
    )
    u_flat = torch.randn(P, dtype=DT, generator=torch.Generator().manual_seed(2))
    u = [
        c.reshape(p.shape)
        for c, p in zip(u_flat.split([p.numel() for p in model.parameters()]), model.parameters())
    ]

    U = torch.diag(u_flat)
    g_bar_ref = Ind @ U @ g  # eq. 9
    H_bar_ref = Ind @ U @ H @ U @ Ind.T  # eq. 9
    us = Ind * u_flat  # [S, P]: u restricted to each subset
    d3_ref = torch.einsum("ijk,si,sj,sk->s", T, us, us, us)  # eq. 15, diagonal

    params = list(model.parameters())
    partition = build_partition(params, name)
    summary = summarise(loss_fn(model(X), y), params, u, partition)
    torch.testing.assert_close(summary.g_bar, g_bar_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(summary.H_bar, H_bar_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(summary.d3, d3_ref, rtol=1e-9, atol=1e-12)
    assert d3_ref.abs().max() > 1e-4  # the check is not vacuous


@pytest.mark.parametrize("extension", [None, KFAC, DiagGGNExact], ids=["no ctx", "kfac", "diag"])
def test_summary_on_extended_model_with_and_without_active_extensions(extension):
    plain = _mlp()
    model, loss_fn = extend(copy.deepcopy(plain)), extend(nn.CrossEntropyLoss())
    X, y = _data()
    u = [torch.randn_like(p) for p in plain.parameters()]
    ref_params = list(plain.parameters())
    ref = summarise(
        nn.CrossEntropyLoss()(plain(X), y), ref_params, u, build_partition(ref_params, "canonical")
    )
    params = list(model.parameters())
    partition = build_partition(params, "canonical")
    if extension is None:
        got = summarise(loss_fn(model(X), y), params, u, partition)
    else:
        with backprop(extension()):
            got = summarise(loss_fn(model(X), y), params, u, partition)
        assert all(hasattr(p, extension().savefield) for p in params)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ special cases
def _one_step(model, loss_fn, X, y, **kwargs):
    opt = GroupedNewton(model.parameters(), **kwargs)
    opt.zero_grad()
    loss_fn(model(X), y).backward()
    opt.step(lambda: loss_fn(model(X), y))
    return torch.cat([p.detach().flatten() for p in model.parameters()]), opt


def test_trivial_partition_without_cubic_term_is_cauchy_steepest_descent():
    model, loss_fn, (X, y) = _mlp(), nn.CrossEntropyLoss(), _data()
    theta, g, H, _ = _derivatives(model, loss_fn, X, y)
    expected = theta - g * (g @ g) / (g @ H @ g)  # eq. 2 / 32
    got, opt = _one_step(model, loss_fn, X, y, partition="trivial", damping_int=0.0, **METHOD_1)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert opt.learning_rates.shape == (1,)


def test_discrete_partition_without_cubic_term_is_newton():
    # MSE: cross-entropy's Hessian is singular (logits shifted together change nothing)
    model, loss_fn, (X, _) = _mlp(), nn.MSELoss(), _data()
    y = torch.randn(len(X), 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    theta, g, H, _ = _derivatives(model, loss_fn, X, y)
    assert torch.linalg.eigvalsh(H).abs().min() > 1e-8  # Newton's step is defined
    expected = theta - torch.linalg.solve(H, g)  # eq. 1 / 35
    got, opt = _one_step(model, loss_fn, X, y, partition="discrete", damping_int=0.0, **METHOD_1)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    assert opt.learning_rates.shape == (theta.numel(),)


def test_method_1_step_uses_the_cubic_regularised_rates():
    """One step of Method 1 moves subset s by ``-eta*_s u_s``, eta* from the dense reference."""
    model, loss_fn, (X, y) = _mlp(), nn.CrossEntropyLoss(), _data()
    theta, g, H, T = _derivatives(model, loss_fn, X, y)
    Ind = _partition_matrix(model, PARTITIONS["canonical"])
    us = Ind * g
    eta = cubic_regularised_lrs(
        Ind @ (g * g), us @ H @ us.T, torch.einsum("ijk,si,sj,sk->s", T, us, us, us), 3.0
    )
    got, opt = _one_step(model, loss_fn, X, y, damping_int=3.0, **METHOD_1)
    torch.testing.assert_close(got, theta - g * (Ind.T @ eta), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(opt.raw_learning_rates, eta, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- the cubic solve
def _cubic_model(g_bar, H_bar, d3, lam):
    d = d3.abs() ** (1 / 3)

    def T(eta):  # eq. 36, eta [..., S]  # noqa: N802
        quadratic = 0.5 * torch.einsum("...i,ij,...j->...", eta, H_bar, eta)
        return -eta @ g_bar + quadratic + lam / 6 * (d * eta).norm(dim=-1) ** 3

    return T, d


def _random_problem(seed, S=4, definite=True, zero_d3=()):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(S, S, dtype=DT, generator=gen)
    H = A @ A.T / S + 0.1 * torch.eye(S, dtype=DT) if definite else (A + A.T) / 2
    d3 = torch.randn(S, dtype=DT, generator=gen) * torch.logspace(-2, 2, S, dtype=DT)
    d3[list(zero_d3)] = 0.0
    return torch.randn(S, dtype=DT, generator=gen), H, d3


@pytest.mark.parametrize(
    "definite, zero_d3", [(True, ()), (False, ()), (True, (1,)), (False, (0, 2))]
)
@pytest.mark.parametrize("seed", range(4))
def test_cubic_solution_is_the_global_minimiser(definite, zero_d3, seed):
    g_bar, H_bar, d3 = _random_problem(seed, definite=definite, zero_d3=zero_d3)
    if zero_d3:  # keep the cubic model bounded below along the flat subsets
        z = list(zero_d3)
        H_bar[z, z] = H_bar[z][:, z].abs().sum(1) + 1.0  # diagonally dominant block
        assert (torch.linalg.eigvalsh(H_bar[z][:, z]) > 0).all()
    lam = 2.0
    eta = cubic_regularised_lrs(g_bar, H_bar, d3, lam)
    T, d = _cubic_model(g_bar, H_bar, d3, lam)
    r = (d * eta).norm()
    M = H_bar + lam / 2 * r * torch.diag(d * d)
    # Nesterov-Polyak: global minimiser iff stationary and M positive semi-definite
    torch.testing.assert_close(M @ eta, g_bar, rtol=1e-9, atol=1e-10)  # eq. 37
    assert torch.linalg.eigvalsh(M).min() > -1e-9
    # and no random point does better
    gen = torch.Generator().manual_seed(100 + seed)
    for scale in (1e-3, 1e-1, 1.0, 10.0):
        others = eta + scale * (eta.norm() + 1) * torch.randn(
            2000, len(eta), dtype=DT, generator=gen
        )
        assert T(others).min() >= T(eta) - 1e-12


def test_cubic_solve_is_invariant_under_subset_scaling():
    """Appendix E: ``H_bar -> J^2 H_bar J^2``, ``g_bar -> J^2 g_bar``, ``d3 -> J^6 d3``.

    Then ``eta -> J^-2 eta``.
    """
    for definite in (True, False):
        g_bar, H_bar, d3 = _random_problem(3, definite=definite)
        a2 = torch.tensor([0.1, 3.0, 20.0, 0.5], dtype=DT) ** 2
        eta = cubic_regularised_lrs(g_bar, H_bar, d3, 1.5)
        eta_scaled = cubic_regularised_lrs(a2 * g_bar, a2[:, None] * H_bar * a2, a2**3 * d3, 1.5)
        torch.testing.assert_close(eta_scaled, eta / a2, rtol=1e-9, atol=1e-12)


def test_cubic_solve_drops_flat_subsets_with_negative_curvature():
    """``d3_s = 0`` and ``H_bar_ss < 0``: the cubic model is unbounded along s, so ``eta_s = 0``."""
    g_bar, H_bar, d3 = _random_problem(0, definite=True)
    H_bar[1, 1] = -1.0
    d3[1] = 0.0
    eta = cubic_regularised_lrs(g_bar, H_bar, d3, 1.0)
    assert eta[1] == 0.0
    keep = [0, 2, 3]
    expected = cubic_regularised_lrs(g_bar[keep], H_bar[keep][:, keep], d3[keep], 1.0)
    torch.testing.assert_close(eta[keep], expected)


def test_cubic_solve_without_damping_is_the_linear_solve_and_zero_direction_is_zero():
    g_bar, H_bar, d3 = _random_problem(1, definite=False)
    torch.testing.assert_close(
        cubic_regularised_lrs(g_bar, H_bar, d3, 0.0), torch.linalg.solve(H_bar, g_bar)
    )
    g_bar[2], H_bar[2, :], H_bar[:, 2] = 0.0, 0.0, 0.0
    eta = cubic_regularised_lrs(g_bar, H_bar, d3, 1.0)
    assert eta[2] == 0.0 and torch.isfinite(eta).all()


# ------------------------------------------------------- degenerate summaries
def _reference_minimiser(g_bar, H_bar, d3, lam):
    """Global minimiser of eq. 36 by the Nesterov-Polyak characterisation, written here.

    ``eta = M(r)^{-1} g_bar`` with ``M(r) = H_bar + lam / 2 r D^2`` positive definite and
    ``r = ||D eta||``: ``r_min`` by bisection on the smallest eigenvalue of ``M(r)``, then the root
    of ``||D M(r)^{-1} g_bar|| - r`` (decreasing above ``r_min``) by arithmetic bisection.
    """
    d = d3.abs() ** (1 / 3)

    def M(r):  # noqa: N802
        return H_bar + lam / 2 * r * torch.diag(d * d)

    def bisect(holds, lo, hi):  # smallest r in [lo, hi] where holds(r), holds(hi) True
        while True:
            mid = 0.5 * (lo + hi)
            if not lo < mid < hi:
                return hi
            lo, hi = (lo, mid) if holds(mid) else (mid, hi)

    def definite(r):
        return bool(torch.linalg.eigvalsh(M(r)).min() > 0)

    def doubled(holds, hi):
        while not holds(hi):
            hi *= 2.0
        return hi

    r_min = 0.0 if definite(0.0) else bisect(definite, 0.0, doubled(definite, 1.0))

    def past_root(r):
        return r > r_min and definite(r) and (d * torch.linalg.solve(M(r), g_bar)).norm() <= r

    r = bisect(past_root, r_min, doubled(past_root, 2.0 * r_min + 1.0))
    return torch.linalg.solve(M(r), g_bar)


def _secular_minimiser(g_bar, H_bar, d3, lam):
    """The global minimiser of eq. 36 for ``d3 != 0`` from appendix D's secular equation.

    ``eta' = D eta`` solves ``(K + r I) eta' = b`` with ``K = D^-1 H_bar D^-1 / c``,
    ``b = D^-1 g_bar / c``, ``r = ||eta'|| > max(0, -lambda_1(K))`` (eqs. 38 to 40). In the
    eigenbasis of ``K``, with the shift ``s = r + lambda_1`` as the unknown (so that a root
    within rounding of ``-lambda_1`` stays resolved):
    ``sum_i beta_i^2 / (lambda_i - lambda_1 + s)^2 = (s - lambda_1)^2``, the left side
    decreasing in ``s``, the right increasing; bisection on ``s``.
    """
    c = lam / 2
    d = d3.abs() ** (1 / 3)
    K = H_bar / d[:, None] / d[None, :] / c
    lams, Q = torch.linalg.eigh(K)
    beta, gaps = Q.T @ (g_bar / d / c), lams - lams[0]

    def above(s):  # past the root
        return bool((beta / (gaps + s)).square().sum() <= (s - lams[0]) ** 2)

    lo = max(float(lams[0]), 1e-300)
    hi = 2 * lo + 1.0
    while not above(hi):
        hi *= 2.0
    for _ in range(5000):
        mid = math.sqrt(lo) * math.sqrt(hi) if hi > 2 * lo else 0.5 * (lo + hi)
        if not lo < mid < hi:
            break
        lo, hi = (lo, mid) if above(mid) else (mid, hi)
    return Q @ (beta / (gaps + hi)) / d


def _no_warning(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateSummaryWarning)
        return fn(*args)


def _pd(seed, S=4):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(S, S, dtype=DT, generator=gen)
    return torch.randn(S, dtype=DT, generator=gen), A @ A.T / S + 0.1 * torch.eye(S, dtype=DT)


@pytest.mark.parametrize("lam", [0.1, 10.0])
def test_reference_minimiser_is_the_global_minimiser(lam):
    """The test's own reference passes the optimality test of the random-point search."""
    g_bar, H_bar, d3 = _random_problem(5, definite=False)
    eta = _reference_minimiser(g_bar, H_bar, d3, lam)
    torch.testing.assert_close(_secular_minimiser(g_bar, H_bar, d3, lam), eta)
    T, _ = _cubic_model(g_bar, H_bar, d3, lam)
    gen = torch.Generator().manual_seed(7)
    others = eta + (eta.norm() + 1) * torch.randn(4000, len(eta), dtype=DT, generator=gen)
    assert T(others).min() >= T(eta) - 1e-12
    torch.testing.assert_close(cubic_regularised_lrs(g_bar, H_bar, d3, lam), eta)


@pytest.mark.parametrize("tiny", [0.0, 5e-320, 1e-300], ids=["zero", "subnormal", "tiny"])
def test_vanishing_cubic_term_gives_newtons_step(tiny):
    """``d3 -> 0`` with ``H_bar`` positive definite: the cubic solution is ``H_bar^{-1} g_bar``.

    With ``|d3| <= 1e-300`` the term ``lam / 2 ||D eta|| D^2`` is below ``1e-190`` next to
    ``H_bar >= 0.1 I``: Newton's step (eq. 8) to rounding.
    """
    g_bar, H_bar = _pd(0)
    d3 = tiny * torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=DT)
    expected = torch.linalg.solve(H_bar, g_bar)
    for lam in (0.1, 10.0):
        eta = _no_warning(cubic_regularised_lrs, g_bar, H_bar, d3, lam)
        torch.testing.assert_close(eta, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("exponent", [-1040, -700, 0, 600])
def test_summary_scaled_into_the_subnormal_or_huge_range_gives_the_same_rates(exponent):
    """``T -> a T`` has the same minimiser: all of ``g_bar``, ``H_bar``, ``d3`` times ``a = 2^k``.

    At ``2^-1040`` every entry is subnormal (rounded to its few remaining bits: the reference
    is the minimiser of the rounded summary, scaled back exactly).
    """
    for definite in (True, False):
        g_bar, H_bar, d3 = _random_problem(2, definite=definite)
        a = 2.0**exponent
        scaled = [g_bar * a, H_bar * a, d3 * a]
        if exponent < -1022:
            assert all(((t != 0) & (t.abs() < 2.0**-1022)).all() for t in scaled)
        rounded = [t / a for t in scaled]  # exact: a power of two
        expected = _reference_minimiser(*rounded, 0.5)
        eta = _no_warning(cubic_regularised_lrs, *scaled, 0.5)
        torch.testing.assert_close(eta, expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("tiny", [1.0, 1e-300, 5e-320], ids=["normal", "tiny", "subnormal"])
def test_zero_curvature_has_the_closed_form_cubic_minimiser(tiny):
    """``H_bar = 0``, ``d3 != 0``: ``eta = D^-2 g_bar / (c r)``, ``r = sqrt(||D^-1 g_bar|| / c)``.

    (``-g_bar + c ||D eta|| D^2 eta = 0`` gives ``D eta = D^-1 g_bar / (c r)``, so
    ``r^2 = ||D^-1 g_bar|| / c``.) Subnormal ``d3`` gives rates near ``1e160``, still finite.
    """
    g_bar = torch.tensor([1.0, -0.5, 2.0], dtype=DT)
    d3 = tiny * torch.tensor([2.0, -1.0, 0.25], dtype=DT)
    lam = 0.1
    c = lam / 2
    d = d3.abs() ** (1 / 3)
    r = ((g_bar / d).norm() / c).sqrt()
    expected = g_bar / (d * d) / (c * r)
    eta = _no_warning(cubic_regularised_lrs, g_bar, torch.zeros(3, 3, dtype=DT), d3, lam)
    torch.testing.assert_close(eta, expected, rtol=1e-12, atol=0)
    assert torch.isfinite(eta).all()


def test_no_curvature_at_all_is_a_zero_step_with_a_warning():
    """``H_bar = 0`` and ``d3 = 0`` (or ``lam = 0``): ``T`` is linear, unbounded: ``eta = 0``."""
    g_bar, zero_H = torch.tensor([1.0, -2.0, 3.0], dtype=DT), torch.zeros(3, 3, dtype=DT)
    for d3, lam in [(torch.zeros(3, dtype=DT), 1.0), (torch.ones(3, dtype=DT), 0.0)]:
        with pytest.warns(DegenerateSummaryWarning, match="no step"):
            eta = cubic_regularised_lrs(g_bar, zero_H, d3, lam)
        assert torch.equal(eta, torch.zeros(3, dtype=DT))
    # a zero direction is no degenerate model: 0 is the exact minimiser, no warning
    zero = torch.zeros(3, dtype=DT)
    assert torch.equal(_no_warning(cubic_regularised_lrs, zero, zero_H, zero, 1.0), zero)


def test_flat_subsets_with_negative_curvature_only_is_a_zero_step_with_a_warning():
    g_bar, H_bar = _pd(1, S=3)
    H_bar = -H_bar
    with pytest.warns(DegenerateSummaryWarning, match="unbounded below"):
        eta = cubic_regularised_lrs(g_bar, H_bar, torch.zeros(3, dtype=DT), 1.0)
    assert torch.equal(eta, torch.zeros(3, dtype=DT))


@pytest.mark.parametrize("d3_scale", [1.0, 1e-6, 1e-30, 1e-200])
def test_indefinite_curvature_with_tiny_cubic_term_is_the_large_minimiser(d3_scale):
    """The model is bounded below for any ``d3 != 0``: its minimiser grows like ``1 / d3``.

    For ``d3 <= 1e-6`` the root ``r*`` lies within ``1e-15`` (relative) of ``r_min``, the
    near-hard case, with ``cond M(r*) ~ 1e8`` at ``1e-6``: agreement to ``1e-6``. The
    minimiser scales exactly like ``1 / d3`` in this limit (``eta -> tau v`` with
    ``||D tau v|| = r_min ~ 1 / d^2``), which ties the cases together.
    """
    g_bar, H_bar, _ = _random_problem(4, definite=False)
    assert torch.linalg.eigvalsh(H_bar).min() < -0.1
    d3 = d3_scale * torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=DT)
    expected = _secular_minimiser(g_bar, H_bar, d3, 0.1)
    eta = _no_warning(cubic_regularised_lrs, g_bar, H_bar, d3, 0.1)
    torch.testing.assert_close(eta, expected, rtol=1e-6 if d3_scale < 1 else 1e-9, atol=0)
    T, _ = _cubic_model(g_bar, H_bar, d3, 0.1)
    gen = torch.Generator().manual_seed(9)
    for scale in (1e-6, 1e-3, 1e-1) if d3_scale >= 1e-30 else ():  # T(eta) ~ eta^2 overflows
        others = eta * (1 + scale * torch.randn(2000, 4, dtype=DT, generator=gen))
        assert T(others).min() >= T(eta) - 1e-12 * T(eta).abs()
    if d3_scale < 1:
        limit = _secular_minimiser(g_bar, H_bar, d3 / d3_scale * 1e-6, 0.1) * 1e-6 / d3_scale
        torch.testing.assert_close(eta, limit, rtol=1e-5, atol=0)


def test_hard_case_is_the_global_minimiser_on_the_sphere():
    """``H_bar = diag(-1, 2)``, ``g_bar = (0, 1)``, ``d3 = 1``, ``lam = 2``: ``c = 1``, ``K = H``.

    ``r_min = 1`` and ``g_bar`` misses ``v = e_1``: at ``r = 1``, ``eta_perp = (0, 1/3)`` has
    ``||eta_perp|| < 1``, so ``eta = (+-sqrt(8) / 3, 1/3)`` (``||eta|| = 1``), where
    ``T = -1/3`` below the ``T(0, 1/3) = -17/81`` of the minimum-norm stationary point.
    """
    g_bar, H_bar = torch.tensor([0.0, 1.0], dtype=DT), torch.diag(torch.tensor([-1.0, 2.0]))
    d3 = torch.ones(2, dtype=DT)
    eta = _no_warning(cubic_regularised_lrs, g_bar, H_bar.to(DT), d3, 2.0)
    torch.testing.assert_close(eta.abs(), torch.tensor([8**0.5 / 3, 1 / 3], dtype=DT))
    T, _ = _cubic_model(g_bar, H_bar.to(DT), d3, 2.0)
    torch.testing.assert_close(T(eta), torch.tensor(-1 / 3, dtype=DT))
    assert T(torch.tensor([0.0, 1 / 3], dtype=DT)) == pytest.approx(-17 / 81)


def test_indefinite_curvature_with_subnormal_cubic_term_overflows_to_a_zero_step():
    """``H_bar = diag(1, -1)``, ``d3 = 5e-320``: ``eta*`` is beyond float64, so no step.

    ``r* > r_min = 1 / (c d^2)`` and ``|eta*_2| >= r_min / d`` (from ``D eta`` having norm
    ``r* > r_min`` and ``eta_2`` dominating it): ``log10 |eta*_2| > 308.3``.
    """
    g_bar, H_bar = torch.tensor([1.0, 1.0], dtype=DT), torch.diag(torch.tensor([1.0, -1.0]))
    d3, lam = torch.full((2,), 5e-320, dtype=DT), 1.0
    d = 5e-320 ** (1 / 3)
    assert math.log10(1 / (lam / 2)) - 3 * math.log10(d) > math.log10(torch.finfo(DT).max)
    with pytest.warns(DegenerateSummaryWarning, match="floating-point range"):
        eta = cubic_regularised_lrs(g_bar, H_bar.to(DT), d3, lam)
    assert torch.equal(eta, torch.zeros(2, dtype=DT))


@pytest.mark.parametrize(
    "where", ["g_bar nan", "H_bar inf", "d3 -inf", "all"], ids=lambda w: w.replace(" ", "-")
)
def test_non_finite_entries_zero_their_subsets_and_the_rest_is_the_restricted_minimiser(where):
    g_bar, H_bar, d3 = _random_problem(6, S=5, definite=False)
    bad = {"g_bar nan": [1], "H_bar inf": [0, 3], "d3 -inf": [4], "all": [0, 1, 2, 3, 4]}[where]
    if where == "g_bar nan":
        g_bar[1] = math.nan
    elif where == "H_bar inf":
        H_bar[0, 3] = H_bar[3, 0] = math.inf
    elif where == "d3 -inf":
        d3[4] = -math.inf
    else:
        g_bar[:] = math.nan
    keep = [s for s in range(5) if s not in bad]
    with pytest.warns(DegenerateSummaryWarning, match="non-finite"):
        eta = cubic_regularised_lrs(g_bar, H_bar, d3, 1.0)
    assert torch.equal(eta[bad], torch.zeros(len(bad), dtype=DT))
    if keep:
        expected = _reference_minimiser(g_bar[keep], H_bar[keep][:, keep], d3[keep], 1.0)
        torch.testing.assert_close(eta[keep], expected, rtol=1e-9, atol=0)


def test_mixed_degenerate_summary():
    """One summary with every case: subset 0 zero direction, 1 non-finite, 2 flat (``d3 = 0``),
    3 subnormal ``d3``, 4 and 5 ordinary; the model on subsets 2 to 5 bounded below.

    Subsets 0 and 1 get 0; the others are the minimiser of the model restricted to them.
    """
    g_bar, H_bar, d3 = _random_problem(8, S=6, definite=True)
    g_bar[0], H_bar[0, :], H_bar[:, 0] = 0.0, 0.0, 0.0
    H_bar[1, 1] = math.nan
    d3[0], d3[2], d3[3] = 1.0, 0.0, 3e-315
    with pytest.warns(
        DegenerateSummaryWarning, match=r"non-finite summary entries for subsets \[1\]"
    ):
        eta = cubic_regularised_lrs(g_bar, H_bar, d3, 2.0)
    assert torch.equal(eta[:2], torch.zeros(2, dtype=DT))
    keep = [2, 3, 4, 5]
    expected = _reference_minimiser(g_bar[keep], H_bar[keep][:, keep], d3[keep], 2.0)
    torch.testing.assert_close(eta[keep], expected, rtol=1e-9, atol=0)
    assert (eta[keep] != 0).all()


def test_diverging_training_runs_all_steps_on_degenerate_summaries():
    """Issue 14's scenario, small: digits, float32 tanh MLP 64-32-10, ``lr=0.3``,
    ``damping_int=0.1``, ``update_every=1``. A giant step (an indefinite ``H_bar`` coupled to a
    subset whose ``H_bar`` and ``d3`` are ~1e-32: the cubic model's minimiser is ~1e20) makes the
    loss ~1e19; at step 4 ``H_bar`` and ``d3`` hold NaN/inf and later ones are 0 where the
    network saturates. The solve used to raise ``no bracket`` there; now every step runs, the
    degenerate updates warn and give finite rates.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    X, _, y, _ = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = GroupedNewton(model.parameters(), lr=0.3, damping_int=0.1, update_every=1)
    loss_fn, gen, steps = nn.CrossEntropyLoss(), torch.Generator().manual_seed(3), 60
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DegenerateSummaryWarning)
        for _ in range(steps):
            idx = torch.randint(len(X), (100,), generator=gen)
            newton = torch.randint(len(X), (300,), generator=gen)
            opt.zero_grad()
            loss_fn(model(X[idx]), y[idx]).backward()
            opt.step(lambda newton=newton: loss_fn(model(X[newton]), y[newton]))
            assert torch.isfinite(opt.learning_rates).all()
    assert opt.state["grouped_newton"]["step"] == steps
    assert any(issubclass(w.category, DegenerateSummaryWarning) for w in caught)


def test_relu_with_mse_has_vanishing_third_order_terms_and_still_steps():
    model, loss_fn = _mlp(act=nn.ReLU), nn.MSELoss()
    X, _ = _data()
    y = torch.randn(len(X), 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    opt = GroupedNewton(model.parameters(), damping_int=10.0, **METHOD_1)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step(lambda: loss_fn(model(X), y))
        assert opt.summary.d3.abs().max() == 0.0  # piecewise linear per tensor, quadratic loss
        assert torch.isfinite(opt.learning_rates).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------ the optimizer
class AffineMLP(nn.Module):
    """The tanh MLP with every tensor reparameterised as ``T = a * T~ + b`` (scalars a, b)."""

    def __init__(self, base: nn.Sequential, scales, offsets) -> None:
        super().__init__()
        self.scales, self.offsets = list(scales), list(offsets)
        self.raw = nn.ParameterList(
            [
                nn.Parameter((p.detach() - b) / a)
                for p, a, b in zip(base.parameters(), scales, offsets)
            ]
        )

    def forward(self, x):
        W1, b1, W2, b2 = (a * t + b for t, a, b in zip(self.raw, self.scales, self.offsets))
        return nn.functional.linear(torch.tanh(nn.functional.linear(x, W1, b1)), W2, b2)


def _train(model, opt_fn, steps=8, seed=0):
    loss_fn = nn.CrossEntropyLoss()
    X, y = _data(seed, n=40)
    opt = opt_fn(model.parameters())
    losses = []
    for t in range(steps):
        idx = torch.arange(10 * (t % 4), 10 * (t % 4) + 10)
        opt.zero_grad()
        loss = loss_fn(model(X[idx]), y[idx])
        loss.backward()
        losses.append(loss.item())
        opt.step(lambda: loss_fn(model(X), y))  # the Newton batch: all 40
    return torch.tensor(losses, dtype=DT)


def test_trajectory_is_invariant_under_layerwise_affine_reparameterisation():
    scales, offsets = [10.0, 0.1, 3.0, 0.02], [0.5, -1.0, 0.0, 2.0]

    def gn(ps):
        return GroupedNewton(ps, lr=0.5, damping_int=1.0, update_every=2)

    base = _mlp(sizes=(3, 4, 2))
    reference = _train(copy.deepcopy(base), gn)
    rescaled = _train(AffineMLP(copy.deepcopy(base), scales, offsets), gn)
    torch.testing.assert_close(rescaled, reference, rtol=1e-9, atol=1e-12)
    assert (reference[-1] - reference[0]).abs() > 1e-3  # it trained
    # SGD is not invariant: the same reparameterisation changes its losses
    sgd = lambda ps: _PlainSGD(ps)  # noqa: E731
    assert (
        _train(AffineMLP(copy.deepcopy(base), scales, offsets), sgd)
        - _train(copy.deepcopy(base), sgd)
    ).abs().max() > 1e-3


class _PlainSGD(torch.optim.SGD):
    def __init__(self, params):
        super().__init__(params, lr=0.5)

    def step(self, closure=None):
        return super().step()


@pytest.mark.parametrize("mode", ["plain", "extended", "extended, step in context"])
def test_training_is_the_same_on_plain_and_extended_models(mode):
    base = _mlp(sizes=(3, 4, 2))

    def gn(ps):
        return GroupedNewton(ps, lr=0.5, damping_int=1.0, update_every=2)

    reference = _train(copy.deepcopy(base), gn)
    plain = mode == "plain"
    model = copy.deepcopy(base) if plain else extend(copy.deepcopy(base))
    loss_fn = nn.CrossEntropyLoss() if plain else extend(nn.CrossEntropyLoss())
    X, y = _data(0, n=40)
    opt = gn(model.parameters())
    losses = []
    for t in range(8):
        idx = torch.arange(10 * (t % 4), 10 * (t % 4) + 10)
        opt.zero_grad()
        with backprop(*(() if plain else (DiagGGNExact(),))):
            loss = loss_fn(model(X[idx]), y[idx])
            loss.backward()
            if mode == "extended, step in context":
                opt.step(lambda: loss_fn(model(X), y))
        if mode != "extended, step in context":
            opt.step(lambda: loss_fn(model(X), y))
        losses.append(loss.item())
    torch.testing.assert_close(torch.tensor(losses, dtype=DT), reference, rtol=1e-10, atol=1e-12)
    if mode != "plain":
        assert all(hasattr(p, "diag_ggn_exact") for p in model.parameters())


def test_momentum_and_rate_smoothing_follow_algorithm_4():
    model, loss_fn, (X, y) = _mlp(), nn.CrossEntropyLoss(), _data(n=12)
    mu_g, mu_eta = 0.7, 0.4
    opt = GroupedNewton(
        model.parameters(),
        lr=0.3,
        damping_int=2.0,
        momentum=mu_g,
        lr_momentum=mu_eta,
        update_every=1,
    )
    direction, smoothed = None, None
    for t in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        loss_fn(model(X[4 * t : 4 * t + 4]), y[4 * t : 4 * t + 4]).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        direction = (
            grads
            if direction is None
            else [mu_g * d + (1 - mu_g) * g for d, g in zip(direction, grads)]
        )
        opt.step(lambda: loss_fn(model(X), y))
        raw = opt.raw_learning_rates.clamp(min=0)
        smoothed = raw if smoothed is None else mu_eta * smoothed + (1 - mu_eta) * raw
        torch.testing.assert_close(opt.learning_rates, smoothed)
        for s, (p, p0, d) in enumerate(zip(model.parameters(), before, direction)):
            torch.testing.assert_close(p.detach(), p0 - 0.3 * smoothed[s] * d)


def test_closure_is_called_every_update_every_steps_and_rates_are_kept_in_between():
    model, loss_fn, (X, y) = _mlp(), nn.CrossEntropyLoss(), _data()
    opt = GroupedNewton(model.parameters(), update_every=3)
    calls = []

    def closure():
        calls.append(opt.state["grouped_newton"].get("step", 0))
        return loss_fn(model(X), y)

    returned = []
    for _ in range(7):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        returned.append(opt.step(closure) is not None)
    assert calls == [0, 3, 6]
    assert returned == [True, False, False, True, False, False, True]
    opt.zero_grad()
    loss_fn(model(X), y).backward()
    opt.step()  # step 7 is not due: no closure needed


def test_scheduler_reduces_the_step_size():
    model = _mlp()
    opt = GroupedNewton(model.parameters(), lr=0.2)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    for _ in range(3):
        scheduler.step(1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_partitions_by_name_and_explicit():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    params = list(model.parameters())  # W1 b1 W2 b2 W3 b3
    assert build_partition(params, "canonical").subset_of == [0, 1, 2, 3, 4, 5]
    assert build_partition(params, "trivial").subset_of == [0] * 6
    assert build_partition(params, "weights-biases").subset_of == [0, 1, 0, 1, 0, 1]
    blocks = build_partition(params, "blocks-2")
    assert blocks.subset_of == [0, 2, 0, 2, 1, 3] and blocks.size == 4
    assert blocks.labels == [
        "weights block 0",
        "weights block 1",
        "biases block 0",
        "biases block 1",
    ]
    explicit = build_partition(params, [params[:2], params[2:]])
    assert explicit.subset_of == [0, 0, 1, 1, 1, 1]
    discrete = build_partition(params, "discrete")
    assert discrete.size == sum(p.numel() for p in params)


def test_bad_input_raises_clear_errors():
    model, loss_fn, (X, y) = _mlp(), nn.CrossEntropyLoss(), _data()
    params = list(model.parameters())
    for kwargs, match in [
        (dict(lr=-1.0), "lr"),
        (dict(damping_int=-1.0), "damping_int"),
        (dict(momentum=1.0), "momentum"),
        (dict(lr_momentum=-0.1), "lr_momentum"),
        (dict(update_every=0), "update_every"),
        (dict(partition="blocks"), "partition='blocks'"),
        (dict(partition=[params[:2]]), r"parameters \[2, 3\]"),
        (dict(partition=[params, params[:1]]), "two partition subsets"),
        (dict(partition=[params, [torch.zeros(2, requires_grad=True)]]), r"shape \(2,\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            GroupedNewton(params, **kwargs)
    with pytest.raises(ValueError, match="one parameter group"):
        GroupedNewton([{"params": params[:2]}, {"params": params[2:]}])
    opt = GroupedNewton(params)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        opt.step(lambda: loss_fn(model(X), y))
    loss_fn(model(X), y).backward()
    with pytest.raises(ValueError, match="recomputes the learning rates"):
        opt.step()
    with pytest.raises(ValueError, match="scalar"):
        opt.step(lambda: nn.CrossEntropyLoss(reduction="none")(model(X), y))
    with pytest.raises(ValueError, match="does not require grad"):
        opt.step(lambda: loss_fn(model(X), y).detach())

    def backward_closure():
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="must not call backward"):
        opt.step(backward_closure)
    assert all(torch.equal(a, b) for a, b in zip(before, params))  # nothing moved
    assert opt.learning_rates is None and not any(opt.state[p] for p in params)


def test_state_dict_round_trip_continues_the_same_trajectory():
    base, loss_fn, (X, y) = _mlp(), nn.CrossEntropyLoss(), _data(n=12)

    def steps(model, opt, ts):
        for t in ts:
            opt.zero_grad()
            loss_fn(
                model(X[4 * (t % 3) : 4 * (t % 3) + 4]), y[4 * (t % 3) : 4 * (t % 3) + 4]
            ).backward()
            opt.step(lambda: loss_fn(model(X), y))

    kwargs = dict(lr=0.3, damping_int=2.0, update_every=2)
    a = copy.deepcopy(base)
    opt_a = GroupedNewton(a.parameters(), **kwargs)
    steps(a, opt_a, range(5))
    b = copy.deepcopy(base)
    opt_b = GroupedNewton(b.parameters(), **kwargs)
    steps(b, opt_b, range(3))
    c = copy.deepcopy(b)
    opt_c = GroupedNewton(c.parameters(), **kwargs)
    opt_c.load_state_dict(copy.deepcopy(opt_b.state_dict()))
    steps(c, opt_c, range(3, 5))
    for p, q in zip(a.parameters(), c.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
