"""Pooling and padding rules (supplement D.2) against autograd and BackPACK 1.7.1, in float64.

Rule level: the rule contract (``test_rule_contract.py``) runs every pooling and padding
case of the table (random pooling configurations -- kernel, stride, padding, dilation,
``ceil_mode``, ... -- in 1d/2d/3d, and every padding mode) against autograd; here what is
particular to the family (registration, diagonal factors, the forward's argmax indices,
both ways of max pooling's batch-averaged product, the dense budget). Model level: tiny
networks through the public API against the autograd Hessian / dense GGN, the exactness
of KFLR / KFRA at batch size 1, and BackPACK where it supports the modules.
"""

from __future__ import annotations

import copy

import backpack.extensions as bpext
import pytest
import reference as ref
import torch
from backpack import backpack as bp_backpack
from backpack import extend as bp_extend
from backpack.extensions.secondorder.diag_ggn.flatten import DiagGGNFlatten
from backpack.extensions.secondorder.diag_hessian.flatten import DiagHFlatten
from backpack.extensions.secondorder.hbp.flatten import HBPFlatten
from records import record
from rule_cases import PADDING, POOLING, recorded
from rule_references import input_jacobians
from torch import nn

from hbpkit import backprop, extend
from hbpkit.curvature.factors import DiagonalFactor
from hbpkit.curvature.memory import DenseBudgetError, MemoryPolicy
from hbpkit.extensions import KFLR, KFRA, BatchGrad, DiagGGNExact, DiagHessian
from hbpkit.modules.tables import SECOND_ORDER

DT = torch.float64
N, V = 3, 2
RTOL, ATOL = 1e-10, 1e-12


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- rule level
# Every rule method of every pooling / padding case of the table (rule_cases.POOLING and
# rule_cases.PADDING: random pooling configurations in 1d/2d/3d, fixed ones, every padding
# mode) is checked against autograd by test_rule_contract.py; here what is particular to
# the family.
TABLE = {**POOLING, **PADDING}
MAX_POOLS = [name for name in TABLE if name.startswith("MaxPool")]


def _record(module: nn.Module, x: torch.Tensor):
    """Forward the extended ``module`` on a copy of ``x`` that requires grad: record, x, output."""
    extend(module)
    x = x.clone().requires_grad_(True)
    out = module(x)
    return record(out), x, out


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


_AVERAGING = tuple(
    getattr(nn, f"{name}{d}d") for name in ("AvgPool", "AdaptiveAvgPool") for d in (1, 2, 3)
)


@pytest.mark.parametrize("name", list(TABLE))
def test_selections_keep_diagonal_factors(name):
    """Selections (max pooling, every padding) keep a diagonal factor diagonal, averages do not.

    For zero / constant padding, cropping the diagonal factor is exact; for reflection /
    replication / circular padding and max pooling with overlapping windows, the
    scatter-added signed squares are (copies never share a row of J). The contract checks
    ``jac_t_factor`` against autograd and its type against ``keeps_diagonal``.
    """
    module = TABLE[name].factory()
    assert SECOND_ORDER.lookup(module).keeps_diagonal == (not isinstance(module, _AVERAGING))


@pytest.mark.parametrize("name", MAX_POOLS + [n for n in TABLE if "AdaptiveMaxPool" in n])
def test_max_pool_reuses_the_forward_indices(name):
    """2d/3d max pooling keeps the argmax indices autograd saved (no second pooling);
    they equal a recomputation with ``return_indices=True``."""
    r = recorded(TABLE[name])
    module = r.module
    if isinstance(module, (nn.MaxPool1d, nn.AdaptiveMaxPool1d)):
        assert r.call.captured is None  # autograd pools 1d as a squeezed 2d pool
        return
    assert isinstance(r.call.captured, torch.Tensor)
    recomputed = copy.deepcopy(module)
    recomputed.return_indices = True
    torch.testing.assert_close(r.call.captured, recomputed(r.x)[1], rtol=0, atol=0)


@pytest.mark.parametrize("scatter_cost", [10**9, 0])
@pytest.mark.parametrize("name", MAX_POOLS)
def test_max_pool_ea_both_ways(name, scatter_cost):
    """``mean_n J_n^T H J_n`` for a general ``H`` both ways max pooling has (strided placement
    per pair of window entries, or a loop over samples): ``scatter_cost`` forces each (the
    contract runs the default choice)."""
    r = recorded(TABLE[name])
    r.call.memory = MemoryPolicy(scatter_cost=scatter_cost)
    d_out = r.out_ref[0].numel()
    H = torch.randn(d_out, d_out, dtype=DT)
    actual = r.rules.ea_jac_t_mat_jac_prod(r.call, H)
    J = input_jacobians(r)
    _assert_close(actual, torch.einsum("noi,op,npj->ij", J, H, J) / N)


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
def test_budget_ea(factory, shape):
    """Batch-averaged backprop is refused one byte above the budget, and works at it."""
    module = factory().double()
    call, x, out = _record(module, torch.randn(*shape, dtype=DT))
    rules = SECOND_ORDER.lookup(module)
    d_in, d_out = x[0].numel(), out[0].numel()
    needed = d_in * max(d_in, d_out) * 8
    H = torch.randn(d_out, d_out, dtype=DT)
    call.memory = MemoryPolicy(max_dense_bytes=needed - 1)
    with pytest.raises(DenseBudgetError, match=rf"{type(module).__name__}.*GB.*max_dense_bytes"):
        rules.ea_jac_t_mat_jac_prod(call, H)
    call.memory = MemoryPolicy(max_dense_bytes=needed)
    assert rules.ea_jac_t_mat_jac_prod(call, H).shape == (d_in, d_in)


def test_budget_refuses_before_allocating():
    """At the default budget (2 GiB), a ``[1e6, 1e6]`` result (8 TB) is refused up front."""
    module = nn.AvgPool2d(100).double()
    call, _, _ = _record(module, torch.zeros(1, 1, 1000, 1000, dtype=DT))
    H = torch.eye(100, dtype=DT)
    with pytest.raises(DenseBudgetError, match=r"8e\+03 GB"):
        SECOND_ORDER.lookup(module).ea_jac_t_mat_jac_prod(call, H)


def test_budget_densified_diagonal_factor():
    """Average pooling densifies a diagonal factor ``[D_out, N, *in]``: within the budget only."""
    module = nn.AvgPool2d(2).double()
    call, x, out = _record(module, torch.randn(N, 2, 4, 4, dtype=DT))
    factor = DiagonalFactor.from_values(torch.randn_like(out))
    needed = out[0].numel() * N * x[0].numel() * 8
    call.memory = MemoryPolicy(max_dense_bytes=needed - 1)
    with pytest.raises(DenseBudgetError, match="AvgPool2d.*GB"):
        SECOND_ORDER.lookup(module).jac_t_factor(call, factor)
    call.memory = MemoryPolicy(max_dense_bytes=needed)
    assert SECOND_ORDER.lookup(module).jac_t_factor(call, factor).S.shape == (8, *x.shape)


def test_budget_model_level():
    """KFRA through an over-budget ``AvgPool2d`` raises and writes nothing on any parameter."""
    # the paddings' [D_in, D_out] fit (39 200 B at most), the pooling's [98, 98] does not
    memory = MemoryPolicy(max_dense_bytes=50_000)
    model, X, y, loss_fn = _problem("avg2d", 2)
    loss = loss_fn(model(X), y)
    with (
        pytest.raises(DenseBudgetError, match="AvgPool2d"),
        backprop(KFRA(), DiagGGNExact(), memory=memory),
    ):
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


@pytest.mark.parametrize("name", ["max2d", "avg2d", "1d", "3d"])
def test_kronecker_exact_at_batch_size_one(name, kflr_kfra_batch_one, hbp_hessian_batch_one):
    """N = 1: KFLR and KFRA are the exact GGN blocks, batch-averaged HBP the Hessian blocks."""
    for limit in (kflr_kfra_batch_one, hbp_hessian_batch_one):
        model, X, y, loss_fn = _problem(name, 1, seed=1)
        params = list(model.parameters())
        blocks = limit.exact_blocks(model, loss_fn, X, y, params)
        limit.backward(loss_fn(model(X), y))
        limit.check(params, blocks, lambda a, b, what: _assert_close(a, b))


# --------------------------------------------------------------------------- BackPACK 1.7.1
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
def test_against_backpack(name, field, default_float64):
    """Same numbers as BackPACK 1.7.1 on the modules it supports (its MaxPool
    ``ea_jac_t_mat_jac_prod`` allocates with the default dtype: float64 here)."""
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
    with bp_backpack(bp_extension):
        bp_loss.backward()
    for p, q in zip(model.parameters(), bp_model.parameters()):
        actual, expected = getattr(p, field), getattr(q, field)
        if isinstance(expected, torch.Tensor):
            _assert_close(actual, expected)
        else:
            assert len(actual) == len(expected)
            for a, e in zip(actual, expected):
                _assert_close(a, e)
