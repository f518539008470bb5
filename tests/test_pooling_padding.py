"""Pooling and padding rules (supplement D.2) against autograd and BackPACK 1.7.1, in float64.

Rule level: the rules are called on the record of a forward pass before any
autograd backward through it (a backward releases the record) and compared with
autograd's vector-Jacobian products through the same graph and with dense
per-sample Jacobians ``J_n`` (``[D_out, D_in]``), over random pooling
configurations (kernel, stride, padding, dilation, ``ceil_mode``, ...) in 1d/2d/3d
and every padding mode. Model level: tiny networks through the public API against
the autograd Hessian / dense GGN, the exactness of KFLR / KFRA at batch size 1,
and BackPACK where it supports the modules.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import random

import backpack.extensions as bpext
import pytest
import reference as ref
import torch
from backpack import backpack as bp_backpack
from backpack import extend as bp_extend
from backpack.extensions.secondorder.diag_ggn.flatten import DiagGGNFlatten
from backpack.extensions.secondorder.diag_hessian.flatten import DiagHFlatten
from backpack.extensions.secondorder.hbp.flatten import HBPFlatten
from torch import nn

from hbpkit import backprop, extend
from hbpkit.dispatch import SECOND_ORDER
from hbpkit.extensions import HBP, KFLR, KFRA, BatchGrad, DiagGGNExact, DiagHessian
from hbpkit.modules import budget, pooling
from hbpkit.modules.base import DiagonalFactor, SqrtFactor
from hbpkit.modules.budget import DenseBudgetError

DT = torch.float64
N, V = 3, 2
RTOL, ATOL = 1e-10, 1e-12


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- rule-level cases
def _random_pool(rng: random.Random, kind: str, d: int):
    """A valid random ``MaxPool{d}d`` / ``AvgPool{d}d`` and an input shape ``[N, 2, *spatial]``."""
    lo, hi = {1: (5, 9), 2: (4, 7), 3: (3, 5)}[d]
    while True:
        k = [rng.randint(1, 3) for _ in range(d)]
        kwargs = dict(
            kernel_size=k,
            stride=[rng.randint(1, 3) for _ in range(d)],
            padding=[rng.randint(0, ki // 2) for ki in k],
            ceil_mode=rng.random() < 0.5,
        )
        if kind == "Max":
            kwargs["dilation"] = [rng.randint(1, 2) for _ in range(d)]
        else:
            kwargs["count_include_pad"] = rng.random() < 0.5
            if d > 1 and rng.random() < 0.4:
                kwargs["divisor_override"] = rng.randint(1, 5)
        cls = getattr(nn, f"{kind}Pool{d}d")
        shape = (N, 2, *[rng.randint(lo, hi) for _ in range(d)])
        try:
            out = cls(**kwargs)(torch.zeros(shape))
        except RuntimeError:
            continue
        if out.numel():
            return functools.partial(cls, **kwargs), shape


def _random_cases() -> dict:
    rng = random.Random(0)
    cases = {}
    for d in (1, 2, 3):
        for kind, count in (("Max", 4), ("Avg", 3)):
            for i in range(count):
                cases[f"{kind}Pool{d}d-random{i}"] = _random_pool(rng, kind, d)
    return cases


CASES = {
    **_random_cases(),
    # pooling: fixed configurations
    "MaxPool2d-overlap-dilation": (lambda: nn.MaxPool2d(3, 1, 1, dilation=2), (N, 2, 5, 6)),
    "MaxPool1d-no-channels": (lambda: nn.MaxPool1d(2, 1), (N, 7)),  # [N, L]: N plays C
    "MaxPool2d-ties": (lambda: nn.MaxPool2d(2, 1), (N, 2, 4, 4)),  # integer input, many ties
    "AdaptiveMaxPool1d": (lambda: nn.AdaptiveMaxPool1d(3), (N, 2, 7)),
    "AdaptiveMaxPool2d": (lambda: nn.AdaptiveMaxPool2d((2, None)), (N, 2, 5, 3)),
    "AdaptiveMaxPool3d": (lambda: nn.AdaptiveMaxPool3d((2, 1, 3)), (N, 2, 3, 3, 4)),
    "AvgPool2d-no-channels": (lambda: nn.AvgPool2d(2, 1, ceil_mode=True), (N, 3, 5)),
    "AdaptiveAvgPool1d": (lambda: nn.AdaptiveAvgPool1d(3), (N, 2, 7)),
    "AdaptiveAvgPool2d": (lambda: nn.AdaptiveAvgPool2d((2, None)), (N, 2, 5, 3)),
    "AdaptiveAvgPool3d": (lambda: nn.AdaptiveAvgPool3d((2, 1, 3)), (N, 2, 3, 3, 4)),
    # padding
    "ZeroPad1d": (lambda: nn.ZeroPad1d(2), (N, 2, 5)),
    "ZeroPad2d": (lambda: nn.ZeroPad2d((0, 1, 2, 0)), (N, 2, 3, 4)),
    "ZeroPad3d": (lambda: nn.ZeroPad3d((1, 0, 0, 1, 1, 0)), (N, 2, 2, 3, 3)),
    "ConstantPad1d-crop": (lambda: nn.ConstantPad1d((-1, -2), 3.0), (N, 2, 6)),
    "ConstantPad1d-extra-axes": (lambda: nn.ConstantPad1d((1, 2), 0.5), (N, 2, 2, 4)),
    "ConstantPad2d-mixed": (lambda: nn.ConstantPad2d((1, -1, -2, 1), 0.7), (N, 2, 4, 4)),
    "ConstantPad3d": (lambda: nn.ConstantPad3d(1, -2.0), (N, 1, 2, 2, 3)),
    "ReflectionPad1d": (lambda: nn.ReflectionPad1d((2, 1)), (N, 2, 5)),
    "ReflectionPad2d": (lambda: nn.ReflectionPad2d((1, 0, 2, 1)), (N, 2, 4, 3)),
    "ReflectionPad3d": (lambda: nn.ReflectionPad3d(1), (N, 1, 2, 3, 3)),
    "ReplicationPad1d": (lambda: nn.ReplicationPad1d((3, 1)), (N, 2, 4)),
    "ReplicationPad2d": (lambda: nn.ReplicationPad2d((1, 2, 0, 1)), (N, 2, 3, 3)),
    "ReplicationPad3d": (lambda: nn.ReplicationPad3d((1, 0, 1, 0, 0, 1)), (N, 1, 2, 3, 3)),
    "CircularPad1d": (lambda: nn.CircularPad1d((2, 3)), (N, 2, 4)),
    "CircularPad2d": (lambda: nn.CircularPad2d((1, 1, 2, 0)), (N, 2, 3, 3)),
    "CircularPad3d": (lambda: nn.CircularPad3d(1), (N, 1, 2, 3, 3)),
}


def _record(module: nn.Module, x: torch.Tensor):
    """Forward the extended ``module`` on a copy of ``x`` that requires grad: record, x, output."""
    extend(module)
    x = x.clone().requires_grad_(True)
    out = module(x)
    return out._hbpkit_call[0], x, out


def _dense_jacobians(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians ``[N, D_out, D_in]`` by autograd on a fresh forward (no hooks)."""
    jacs = []
    for n in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(
            lambda xn: type(module).forward(module, xn.unsqueeze(0)), x[n].detach()
        )
        jacs.append(jac.reshape(-1, x[n].numel()))
    return torch.stack(jacs)


@pytest.fixture(params=list(CASES), name="case")
def fixture_case(request):
    torch.manual_seed(0)
    factory, shape = CASES[request.param]
    module = factory().double()
    if request.param.endswith("ties"):
        x = torch.randint(0, 2, shape).to(DT)
    else:
        x = torch.randn(*shape, dtype=DT)
    call, x, out = _record(module, x)
    return SECOND_ORDER.lookup(module), call, x, out


def test_registered():
    """Every pooling / padding type of the brief has rules, one object per family."""
    for name in ("MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool"):
        for d in (1, 2, 3):
            assert SECOND_ORDER.lookup(getattr(nn, f"{name}{d}d")(2)) is not None
    for name in ("ZeroPad", "ConstantPad", "ReflectionPad", "ReplicationPad", "CircularPad"):
        for d in (1, 2, 3):
            args = (1, 0.0) if name == "ConstantPad" else (1,)
            rules = SECOND_ORDER.lookup(getattr(nn, f"{name}{d}d")(*args))
            assert rules is not None and rules.linear_in_input


def test_jac_t_mat_prod(case):
    """``[V, N, *out] -> [V, N, *in]`` equals autograd's vector-Jacobian products."""
    rules, call, x, out = case
    mat = torch.randn(V, *out.shape, dtype=DT)
    actual = rules.jac_t_mat_prod(call, mat)  # before autograd's backward releases the record
    expected = torch.stack([torch.autograd.grad(out, x, m, retain_graph=True)[0] for m in mat])
    _assert_close(actual, expected)


@pytest.mark.parametrize("name", [n for n in CASES if "MaxPool" in n])
def test_max_pool_reuses_the_forward_indices(name):
    """2d/3d max pooling keeps the argmax indices autograd saved (no second pooling);
    they equal a recomputation with ``return_indices=True``."""
    factory, shape = CASES[name]
    module = factory().double()
    call, x, out = _record(module, torch.randn(*shape, dtype=DT))
    if isinstance(module, (nn.MaxPool1d, nn.AdaptiveMaxPool1d)):
        assert call.captured is None  # autograd pools 1d as a squeezed 2d pool
        return
    assert isinstance(call.captured, torch.Tensor)
    recomputed = copy.deepcopy(module)
    recomputed.return_indices = True
    torch.testing.assert_close(call.captured, recomputed(x.detach())[1], rtol=0, atol=0)


def test_jac_mat_prod(case):
    """``[V, N, *in] -> [V, N, *out]`` equals ``J_n m`` with dense per-sample Jacobians."""
    rules, call, x, out = case
    mat = torch.randn(V, *x.shape, dtype=DT)
    actual = rules.jac_mat_prod(call, mat)
    jacs = _dense_jacobians(call.module, x)
    expected = torch.einsum("noi,vni->vno", jacs, mat.flatten(2)).reshape(V, *out.shape)
    _assert_close(actual, expected)


@pytest.mark.parametrize("scatter_cost", [pooling.SCATTER_COST, 10**9, 0])
def test_ea_jac_t_mat_jac_prod(case, scatter_cost, monkeypatch):
    """``mean_n J_n^T H J_n`` (approximation (9)) for a general (non-symmetric) ``H``.

    Max-pooling has two ways (strided placement per pair of window entries, or a
    loop over samples): ``scatter_cost`` forces each.
    """
    monkeypatch.setattr(pooling, "SCATTER_COST", scatter_cost)
    rules, call, x, out = case
    d_out = out[0].numel()
    H = torch.randn(d_out, d_out, dtype=DT)
    actual = rules.ea_jac_t_mat_jac_prod(call, H)
    jacs = _dense_jacobians(call.module, x)
    _assert_close(actual, torch.einsum("noi,op,npj->ij", jacs, H, jacs) / N)


_AVERAGING = tuple(
    getattr(nn, f"{name}{d}d") for name in ("AvgPool", "AdaptiveAvgPool") for d in (1, 2, 3)
)


def _curvature(factor) -> torch.Tensor:
    """Per-sample ``sum_v sign S S^T`` of a factor, ``[N, D, D]``."""
    if isinstance(factor, DiagonalFactor):
        return torch.diag_embed(factor.signed_square().flatten(1))
    return torch.einsum("vni,vnj->nij", factor.signed().flatten(2), factor.S.flatten(2))


def test_jac_t_factor_of_diagonal(case):
    """``J_n^T diag(d_n) J_n``: diagonal again for selections (max pooling, every padding).

    For zero / constant padding this checks that cropping the diagonal factor is exact;
    for reflection / replication / circular padding and max pooling with overlapping
    windows, that the scatter-added signed squares are (copies never share a row of J).
    """
    rules, call, x, out = case
    d = torch.randn_like(out)
    result = rules.jac_t_factor(call, DiagonalFactor.from_values(d))
    selection = not isinstance(call.module, _AVERAGING)
    assert isinstance(result, DiagonalFactor) == selection
    if isinstance(result, DiagonalFactor):
        assert result.s.shape == x.shape
        assert result.sign is None or result.sign.shape == x.shape
    jacs = _dense_jacobians(call.module, x)
    expected = torch.einsum("noi,no,noj->nij", jacs, d.flatten(1), jacs)
    _assert_close(_curvature(result), expected)


def test_jac_t_factor_of_sqrt(case):
    """A dense signed sqrt factor: ``sum_v sign (J^T S)(J^T S)^T = J^T (sum_v sign S S^T) J``."""
    rules, call, x, out = case
    S = torch.randn(V, *out.shape, dtype=DT)
    sign = torch.tensor([[1.0] * N, [-1.0] * N], dtype=DT)
    factor = SqrtFactor(S, sign)
    result = rules.jac_t_factor(call, factor)
    assert isinstance(result, SqrtFactor) and result.S.shape == (V, *x.shape)
    jacs = _dense_jacobians(call.module, x)
    expected = torch.einsum("noi,nop,npj->nij", jacs, _curvature(factor), jacs)
    _assert_close(_curvature(result), expected)


def test_validate_rejects_padding_the_batch_axis():
    """``ConstantPad2d`` on ``[N, W]`` pads the batch axis: no per-sample structure."""
    call, _, _ = _record(nn.ConstantPad2d(1, 0.0), torch.randn(N, 4, dtype=DT))
    with pytest.raises(NotImplementedError, match="batch axis"):
        SECOND_ORDER.lookup(call.module).validate(call)


# --------------------------------------------------------------------------- dense budget
@pytest.mark.parametrize(
    "factory, shape",
    [
        (lambda: nn.AvgPool2d(2), (N, 2, 4, 4)),
        (lambda: nn.MaxPool2d(2), (N, 2, 4, 4)),
        (lambda: nn.ReflectionPad1d(1), (N, 2, 3)),
        (lambda: nn.ZeroPad2d(1), (N, 1, 2, 2)),
    ],
    ids=["AvgPool2d", "MaxPool2d", "ReflectionPad1d", "ZeroPad2d"],
)
def test_budget_ea(monkeypatch, factory, shape):
    """Batch-averaged backprop is refused one byte above the budget, and works at it."""
    module = factory().double()
    call, x, out = _record(module, torch.randn(*shape, dtype=DT))
    rules = SECOND_ORDER.lookup(module)
    d_in, d_out = x[0].numel(), out[0].numel()
    needed = d_in * max(d_in, d_out) * 8
    H = torch.randn(d_out, d_out, dtype=DT)
    monkeypatch.setattr(budget, "MAX_DENSE_BYTES", needed - 1)
    with pytest.raises(DenseBudgetError, match=rf"{type(module).__name__}.*GB.*MAX_DENSE_BYTES"):
        rules.ea_jac_t_mat_jac_prod(call, H)
    monkeypatch.setattr(budget, "MAX_DENSE_BYTES", needed)
    assert rules.ea_jac_t_mat_jac_prod(call, H).shape == (d_in, d_in)


def test_budget_refuses_before_allocating():
    """At the default budget (2 GiB), a ``[1e6, 1e6]`` result (8 TB) is refused up front."""
    module = nn.AvgPool2d(100).double()
    call, _, _ = _record(module, torch.zeros(1, 1, 1000, 1000, dtype=DT))
    H = torch.eye(100, dtype=DT)
    with pytest.raises(DenseBudgetError, match=r"8e\+03 GB"):
        SECOND_ORDER.lookup(module).ea_jac_t_mat_jac_prod(call, H)


def test_budget_densified_diagonal_factor(monkeypatch):
    """Average pooling densifies a diagonal factor ``[D_out, N, *in]``: within the budget only."""
    module = nn.AvgPool2d(2).double()
    call, x, out = _record(module, torch.randn(N, 2, 4, 4, dtype=DT))
    factor = DiagonalFactor.from_values(torch.randn_like(out))
    needed = out[0].numel() * N * x[0].numel() * 8
    monkeypatch.setattr(budget, "MAX_DENSE_BYTES", needed - 1)
    with pytest.raises(DenseBudgetError, match="AvgPool2d.*GB"):
        SECOND_ORDER.lookup(module).jac_t_factor(call, factor)
    monkeypatch.setattr(budget, "MAX_DENSE_BYTES", needed)
    assert SECOND_ORDER.lookup(module).jac_t_factor(call, factor).S.shape == (8, *x.shape)


def test_budget_model_level(monkeypatch):
    """KFRA through an over-budget ``AvgPool2d`` raises and writes nothing on any parameter."""
    # the paddings' [D_in, D_out] fit (39 200 B at most), the pooling's [98, 98] does not
    monkeypatch.setattr(budget, "MAX_DENSE_BYTES", 50_000)
    model, X, y, loss_fn = _problem("avg2d", 2)
    loss = loss_fn(model(X), y)
    with pytest.raises(DenseBudgetError, match="AvgPool2d"), backprop(KFRA(), DiagGGNExact()):
        loss.backward()
    for p in model.parameters():
        assert not hasattr(p, "kfra") and not hasattr(p, "diag_ggn_exact")


# --------------------------------------------------------------------------- models
def _m_max2d():  # the brief's model, with activations behind the pooling and the padding
    return [
        nn.Linear(6, 32),
        nn.Unflatten(1, (2, 4, 4)),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Tanh(),
        nn.ZeroPad2d((0, 1, 0, 1)),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(18, 3),
    ]


def _m_avg2d():
    return [
        nn.Linear(6, 50),
        nn.Unflatten(1, (2, 5, 5)),
        nn.Tanh(),
        nn.ReflectionPad2d(1),
        nn.Sigmoid(),
        nn.AvgPool2d(3, stride=2, ceil_mode=True, count_include_pad=False),
        nn.Sigmoid(),
        nn.ConstantPad2d((1, -1, 0, 1), 0.3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(24, 3),
    ]


def _m_1d():
    return [
        nn.Linear(5, 14),
        nn.Unflatten(1, (2, 7)),
        nn.Sigmoid(),
        nn.MaxPool1d(3, stride=2, padding=1, ceil_mode=True),
        nn.Tanh(),
        nn.AdaptiveAvgPool1d(3),
        nn.ReplicationPad1d((1, 2)),
        nn.Sigmoid(),
        nn.CircularPad1d(1),
        nn.AdaptiveMaxPool1d(5),
        nn.Flatten(),
        nn.Linear(10, 3),
    ]


def _m_3d():
    return [
        nn.Linear(4, 72),
        nn.Unflatten(1, (2, 3, 3, 4)),
        nn.Sigmoid(),
        nn.MaxPool3d(2, stride=1),
        nn.Sigmoid(),
        nn.ZeroPad3d((0, 1, 1, 0, 0, 0)),
        nn.AvgPool3d(2, stride=1, divisor_override=3),
        nn.Tanh(),
        nn.AdaptiveMaxPool3d((1, 2, 2)),
        nn.Flatten(),
        nn.Linear(8, 3),
    ]


# BackPACK 1.7.1 supports these pooling / padding modules (and nn.Unflatten via its
# Flatten rules, a reshape): DiagGGN / DiagHessian every Max/AvgPool (count_include_pad
# only) and AdaptiveAvgPool (divisible sizes), ZeroPad2d; KFLR / KFRA only MaxPool2d,
# AvgPool2d, ZeroPad2d.
def _m_bp2d():
    return [
        nn.Linear(6, 32),
        nn.Unflatten(1, (2, 4, 4)),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Tanh(),
        nn.ZeroPad2d((0, 1, 1, 0)),
        nn.Sigmoid(),
        nn.AvgPool2d(2, stride=1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ]


def _m_bp1d3d():
    return [
        nn.Linear(5, 32),
        nn.Unflatten(1, (2, 16)),
        nn.Sigmoid(),
        nn.MaxPool1d(2),
        nn.Tanh(),
        nn.AvgPool1d(2),
        nn.AdaptiveAvgPool1d(2),
        nn.Unflatten(2, (1, 2, 1)),
        nn.Sigmoid(),
        nn.MaxPool3d((1, 2, 1), stride=1),
        nn.Tanh(),
        nn.AvgPool3d(1),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(2, 3),
    ]


MODELS = {
    "max2d": (_m_max2d, 6, "ce"),
    "avg2d": (_m_avg2d, 6, "mse"),
    "1d": (_m_1d, 5, "ce"),
    "3d": (_m_3d, 4, "ce"),
    "bp2d": (_m_bp2d, 6, "ce"),
    "bp1d3d": (_m_bp1d3d, 5, "mse"),
}


def _problem(name: str, n: int, seed: int = 0):
    """Extended float64 model, data, targets, extended loss module."""
    factory, d_in, loss = MODELS[name]
    torch.manual_seed(seed)
    model = extend(nn.Sequential(*factory()).double())
    X = torch.randn(n, d_in, dtype=DT)
    if loss == "ce":
        loss_fn, y = nn.CrossEntropyLoss(), torch.randint(0, 3, (n,))
    else:
        loss_fn, y = nn.MSELoss(reduction="sum"), torch.randn(n, 3, dtype=DT)
    return model, X, y, extend(loss_fn)


def _exact(model, X, y, loss_fn, params):
    """Dense exact GGN and Hessian of the loss w.r.t. ``params`` (autograd, no extension)."""
    out = model(X)
    return ref.ggn(out, loss_fn, y, params), ref.hessian(loss_fn(out, y), params)


@pytest.mark.parametrize("name", ["max2d", "avg2d", "1d", "3d"])
def test_diagonals_against_autograd(name):
    """``diag_ggn_exact`` / ``diag_h`` equal the diagonals of the dense GGN / Hessian."""
    model, X, y, loss_fn = _problem(name, N)
    params = list(model.parameters())
    ggn, hess = _exact(model, X, y, loss_fn, params)
    loss = loss_fn(model(X), y)
    with backprop(DiagGGNExact(), DiagHessian(), BatchGrad()):
        loss.backward()
    _assert_close(ref.flatten([p.diag_ggn_exact for p in params]), ggn.diagonal())
    _assert_close(ref.flatten([p.diag_h for p in params]), hess.diagonal())
    grads = ref.per_sample_grads_loop(model, loss_fn, X, y, params)
    for p, g in zip(params, grads):
        _assert_close(p.grad_batch, g)


def _kron(factors) -> torch.Tensor:
    result = factors[0]
    for f in factors[1:]:
        result = torch.kron(result, f)
    return result


@pytest.mark.parametrize("name", ["max2d", "avg2d", "1d", "3d"])
def test_kronecker_exact_at_batch_size_one(name):
    """N = 1: KFLR and KFRA are the exact GGN blocks, batch-averaged HBP the Hessian blocks."""
    model, X, y, loss_fn = _problem(name, 1, seed=1)
    params = list(model.parameters())
    ggn, hess = _exact(model, X, y, loss_fn, params)
    loss = loss_fn(model(X), y)
    with backprop(KFLR(), KFRA(), HBP("hessian", "average", "batch-average")):
        loss.backward()
    for p, g_block, h_block in zip(params, ref.blocks(ggn, params), ref.blocks(hess, params)):
        _assert_close(_kron(p.kflr), g_block)
        _assert_close(_kron(p.kfra), g_block)
        _assert_close(_kron(p.hbp), h_block)


# --------------------------------------------------------------------------- BackPACK 1.7.1
@contextlib.contextmanager
def _default_dtype(dtype):
    # BackPACK's MaxPool ea_jac_t_mat_jac_prod allocates with the default dtype
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


BACKPACK = {  # savefield: (hbpkit extension, BackPACK extension, BackPACK rules of Unflatten)
    "diag_ggn_exact": (DiagGGNExact, bpext.DiagGGNExact, DiagGGNFlatten),
    "diag_h": (DiagHessian, bpext.DiagHessian, DiagHFlatten),
    "kflr": (KFLR, bpext.KFLR, HBPFlatten),
    "kfra": (KFRA, bpext.KFRA, HBPFlatten),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "name, field",
    [("bp2d", f) for f in BACKPACK] + [("bp1d3d", f) for f in ("diag_ggn_exact", "diag_h")],
)
def test_against_backpack(name, field):
    """Same numbers as BackPACK 1.7.1 on the modules it supports."""
    hb_ext, bp_ext, unflatten_rules = BACKPACK[field]
    model, X, y, loss_fn = _problem(name, N)
    bp_model = bp_extend(copy.deepcopy(model))
    bp_loss_fn = bp_extend(copy.deepcopy(loss_fn))
    bp_extension = bp_ext()
    bp_extension.set_module_extension(nn.Unflatten, unflatten_rules())
    loss = loss_fn(model(X), y)
    with backprop(hb_ext()):
        loss.backward()
    bp_loss = bp_loss_fn(bp_model(X), y)
    with _default_dtype(DT), bp_backpack(bp_extension):
        bp_loss.backward()
    for p, q in zip(model.parameters(), bp_model.parameters()):
        actual, expected = getattr(p, field), getattr(q, field)
        if isinstance(expected, torch.Tensor):
            _assert_close(actual, expected)
        else:
            assert len(actual) == len(expected)
            for a, e in zip(actual, expected):
                _assert_close(a, e)
