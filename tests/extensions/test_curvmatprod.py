"""Exact block curvature-matrix products (GGNMP, HMP, PCHMP) against autograd and BackPACK.

References (float64, on a plain copy of the model, :mod:`reference` and ``torch.autograd``):

* HMP: ``torch.autograd.functional.hessian`` of the loss w.r.t. one parameter;
* GGNMP: ``sum_n J_n^T H_n J_n`` from dense per-sample Jacobians ``J_n = d f(x_n) / dp``
  and per-sample loss Hessians ``H_n``;
* PCHMP: :func:`reference.modified_hessian` (every activation residual modified per sample).

Tolerances ``rtol=1e-8, atol=1e-10`` (the errors are at the float64 round-off).
"""

from __future__ import annotations

import copy
import gc
import weakref

import backpack.extensions as bpext
import pytest
import reference as ref
import torch
from records import record
from torch import nn
from torch.func import functional_call
from twins import run_backpack, run_extended

import hbpkit
from hbpkit import backprop, extend
from hbpkit.extensions import GGNMP, HMP, PCHMP, DiagHessian
from hbpkit.modules import ModuleRules

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:backpack.*"),
]

DT = torch.float64
TOL = {"rtol": 1e-8, "atol": 1e-10}
K = 3  # columns of V
FIELDS = {"ggn": "ggnmp", "hessian": "hmp", "pch-abs": "pchmp", "pch-clip": "pchmp"}
MAX_ERR: dict[str, float] = {}


def teardown_module(module):
    if MAX_ERR:
        print("\nmax abs errors:", {k: f"{v:.1e}" for k, v in sorted(MAX_ERR.items())})


def close(actual, expected, what):
    err = (actual - expected).abs().max().item()
    MAX_ERR[what.split(":")[0]] = max(MAX_ERR.get(what.split(":")[0], 0.0), err)
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------- problems
ACTIVATIONS = {"Sigmoid": nn.Sigmoid, "Tanh": nn.Tanh, "ELU": nn.ELU, "ReLU": nn.ReLU}


def _mlp(act: str, out: int) -> nn.Sequential:
    a = ACTIVATIONS[act]
    return nn.Sequential(nn.Linear(4, 5), a(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, out))


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(12, 3),
    )


def _grouped_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2, padding=2, groups=2, padding_mode="circular"),
        nn.Tanh(),
        nn.ConvTranspose1d(4, 2, 2, stride=2, groups=2),
        nn.ELU(),
        nn.Flatten(),
        nn.Linear(20, 3),
    )


def _sequence() -> nn.Sequential:  # Linear on [N, T, D]
    return nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Flatten(), nn.Linear(8, 3))


def _targets(loss_fn: nn.Module, out_shape: tuple, n: int) -> torch.Tensor:
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return torch.randint(0, out_shape[-1], (n,))
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return torch.rand(n, *out_shape[1:], dtype=DT)
    return torch.randn(n, *out_shape[1:], dtype=DT)


def _problem(model: nn.Sequential, in_shape: tuple, loss_fn: nn.Module, n: int, seed: int = 0):
    torch.manual_seed(seed)
    model = model.to(DT)
    X = torch.randn(n, *in_shape, dtype=DT)
    with torch.no_grad():
        out_shape = model(X).shape
    return model, loss_fn, X, _targets(loss_fn, out_shape, n)


# --------------------------------------------------------------------------- references
def hessian_block(model, loss_fn, X, y, name: str) -> torch.Tensor:
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of(p):
        return loss_fn(functional_call(model, {**params, name: p}, (X,)), y)

    p = params[name]
    return torch.autograd.functional.hessian(loss_of, p).reshape(p.numel(), p.numel())


def ggn_block(model, loss_fn, X, y, name: str) -> torch.Tensor:
    p = dict(model.named_parameters())[name]
    out = model(X)
    N, O = out.shape[0], out[0].numel()
    J = ref.jacobian(out, [p]).reshape(N, O, -1)  # per-sample Jacobians
    H = ref.loss_hessian_wrt_output(loss_fn, out, y)
    H_n = [H[n * O : (n + 1) * O, n * O : (n + 1) * O] for n in range(N)]
    return sum(J[n].T @ H_n[n] @ J[n] for n in range(N))


def modified_blocks(model, loss_fn, X, y, curvature: str) -> dict[str, torch.Tensor]:
    """The blocks of :func:`reference.modified_hessian`, with residuals of the activations only.

    (``reference.is_elementwise`` also counts pooling layers, whose "residual"
    is not elementwise; here only ``ACTIVATIONS`` contribute, pooling is linear.)
    """
    names, params = zip(*model.named_parameters())
    xs = ref.forward_trace(model, X)
    M = ref.ggn(xs[-1], loss_fn, y, params)
    loss = loss_fn(xs[-1], y)
    for k, layer in enumerate(model):
        if not isinstance(layer, tuple(ACTIVATIONS.values())):
            continue
        (dL_dz,) = torch.autograd.grad(loss, xs[k + 1], retain_graph=True)
        r = ref.elementwise_second_derivative(layer, xs[k]) * dL_dz
        r = ref.MODIFY[curvature](r).reshape(-1)
        J = ref.jacobian(xs[k], params)
        M = M + J.T @ (r[:, None] * J)
    return dict(zip(names, ref.blocks(M, params)))


def reference_blocks(model, loss_fn, X, y, curvature: str) -> dict[str, torch.Tensor]:
    names = [k for k, _ in model.named_parameters()]
    if curvature == "hessian":
        return {k: hessian_block(model, loss_fn, X, y, k) for k in names}
    if curvature == "ggn":
        return {k: ggn_block(model, loss_fn, X, y, k) for k in names}
    return modified_blocks(model, loss_fn, X, y, curvature)


def check_products(model, loss_fn, X, y, label: str, curvatures=tuple(FIELDS)) -> None:
    """Every product of every parameter against the dense reference block times ``V``."""
    extensions = {"ggn": GGNMP(), "hessian": HMP(), "pch-abs": PCHMP("abs")}
    m = run_extended(model, loss_fn, X, y, *(extensions[c] for c in curvatures if c != "pch-clip"))
    m_clip = run_extended(model, loss_fn, X, y, PCHMP("clip")) if "pch-clip" in curvatures else None
    torch.manual_seed(2)
    for curvature in curvatures:
        blocks = reference_blocks(model, loss_fn, X, y, curvature)
        mod = m_clip if curvature == "pch-clip" else m
        for name, p in mod.named_parameters():
            V = torch.randn(K, *p.shape, dtype=DT)
            expected = (V.reshape(K, -1) @ blocks[name]).reshape(V.shape)  # blocks are symmetric
            actual = getattr(p, FIELDS[curvature])(V)
            close(actual, expected, f"{curvature}: {label} {name}")


# --------------------------------------------------------------------------- against autograd
LOSSES = {
    "CE": (nn.CrossEntropyLoss, 3),
    "MSE": (nn.MSELoss, 2),
    "BCE": (nn.BCEWithLogitsLoss, 2),
}


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_id", LOSSES)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_mlp_products_against_autograd(act, loss_id, reduction, n):
    make_loss, out = LOSSES[loss_id]
    problem = _problem(_mlp(act, out), (4,), make_loss(reduction=reduction), n)
    check_products(*problem, f"{act}-{loss_id}-{reduction}-N{n}")


@pytest.mark.parametrize("n", [1, 5])
def test_cnn_products_against_autograd(n):
    problem = _problem(_cnn(), (2, 4, 4), nn.CrossEntropyLoss(), n)
    check_products(*problem, f"cnn-N{n}")


@pytest.mark.parametrize("n", [1, 3])
def test_grouped_strided_conv_and_transpose_products_against_autograd(n):
    problem = _problem(_grouped_cnn(), (2, 7), nn.MSELoss(reduction="sum"), n)
    check_products(*problem, f"grouped-N{n}", curvatures=("ggn", "hessian", "pch-abs"))


@pytest.mark.parametrize("n", [1, 5])
def test_linear_on_sequences_against_autograd(n):
    problem = _problem(_sequence(), (2, 3), nn.CrossEntropyLoss(), n)
    check_products(*problem, f"seq-N{n}")
    # the loss on [N, T, O] directly (MSE per position)
    seq_out = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    problem = _problem(seq_out, (2, 3), nn.MSELoss(), n)
    check_products(*problem, f"seq-out-N{n}", curvatures=("ggn", "hessian", "pch-clip"))


def test_hmp_diagonal_matches_diag_hessian_in_the_same_pass():
    model, loss_fn, X, y = _problem(_mlp("Tanh", 3), (4,), nn.CrossEntropyLoss(), 4)
    m = run_extended(model, loss_fn, X, y, HMP(), DiagHessian(), GGNMP())
    for name, p in m.named_parameters():
        eye = torch.eye(p.numel(), dtype=DT).reshape(p.numel(), *p.shape)
        diag = torch.diagonal(p.hmp(eye).reshape(p.numel(), -1))
        close(diag.reshape(p.shape), p.diag_h, f"diag: {name}")


def test_products_agree_where_curvatures_coincide():
    """No residual between the loss and the last layer: GGN, Hessian and PCH products agree
    there; at a layer below a Sigmoid they differ by the residual."""
    model, loss_fn, X, y = _problem(_mlp("ReLU", 3), (4,), nn.CrossEntropyLoss(), 4)
    m = run_extended(model, loss_fn, X, y, GGNMP(), HMP(), PCHMP())
    last, middle = m[4].weight, m[2].weight  # middle: its output is the Sigmoid's input
    V = torch.randn(2, *last.shape, dtype=DT)
    close(last.hmp(V), last.ggnmp(V), "last: hmp == ggnmp")
    close(last.pchmp(V), last.ggnmp(V), "last: pchmp == ggnmp")
    W = torch.randn(2, *middle.shape, dtype=DT)
    assert (middle.hmp(W) - middle.ggnmp(W)).abs().max() > 1e-6


# --------------------------------------------------------------------------- against BackPACK
BP_CASES = {
    "mlp-CE": lambda n: _problem(_mlp("Sigmoid", 3), (4,), nn.CrossEntropyLoss(), n),
    "mlp-MSE-sum": lambda n: _problem(_mlp("Tanh", 2), (4,), nn.MSELoss(reduction="sum"), n),
    "cnn-CE": lambda n: _problem(_cnn(), (2, 4, 4), nn.CrossEntropyLoss(), n),
}


@pytest.mark.parametrize("case", BP_CASES)
def test_ggnmp_hmp_against_backpack(case):
    model, loss_fn, X, y = BP_CASES[case](4)
    m = run_extended(model, loss_fn, X, y, GGNMP(), HMP())
    b = run_backpack(model, loss_fn, X, y, bpext.GGNMP(), bpext.HMP())
    torch.manual_seed(3)
    for (name, p), q in zip(m.named_parameters(), b.parameters()):
        V = torch.randn(K, *p.shape, dtype=DT)
        close(p.ggnmp(V), q.ggnmp(V), f"backpack-ggn: {case} {name}")
        close(p.hmp(V), q.hmp(V), f"backpack-hessian: {case} {name}")


@pytest.fixture
def backpack_pchmp_fixed(monkeypatch):
    """BackPACK 1.7.1's PCHMP with its residual ``phi''(x_n) * dz_n`` (S.9), per sample.

    Stock ``PCHMPBase.modified_residual_mat_prod`` multiplies
    ``derivatives.hessian_diagonal(...)``, which already is ``phi''(x) * dz``, by
    ``dz`` once more: it modifies ``phi''(x_n) * dz_n**2``
    (:func:`test_stock_backpack_pchmp_squares_the_gradient` shows it). Unlike
    BackPACK's HBP, its PCHMP modifies each sample's residual, as hbpkit does.
    """
    from backpack.extensions.curvmatprod.pchmp.pchmpbase import PCHMPBase

    def residual_mat_prod(self, ext, module, g_inp, g_out, mat, modify):
        residual = self.derivatives.hessian_diagonal(module, g_inp, g_out)
        return self.modifications[modify](residual) * mat

    monkeypatch.setattr(PCHMPBase, "modified_residual_mat_prod", residual_mat_prod)


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("modify", ["abs", "clip"])
@pytest.mark.parametrize("case", BP_CASES)
def test_pchmp_against_fixed_backpack(case, modify, n, backpack_pchmp_fixed):
    model, loss_fn, X, y = BP_CASES[case](n)
    m = run_extended(model, loss_fn, X, y, PCHMP(modify))
    b = run_backpack(model, loss_fn, X, y, bpext.PCHMP(modify=modify))
    torch.manual_seed(4)
    for (name, p), q in zip(m.named_parameters(), b.parameters()):
        V = torch.randn(K, *p.shape, dtype=DT)
        close(p.pchmp(V), q.pchmp(V), f"backpack-pch-{modify}: {case} N{n} {name}")


def test_stock_backpack_pchmp_squares_the_gradient():
    """Why the fixture: stock BackPACK's PCHMP is the reference with ``|phi'' dz**2|``."""
    model, loss_fn, X, y = BP_CASES["mlp-CE"](1)
    b = run_backpack(model, loss_fn, X, y, bpext.PCHMP(modify="abs"))
    names, params = zip(*model.named_parameters())
    xs = ref.forward_trace(model, X)
    M = ref.ggn(xs[-1], loss_fn, y, params)
    loss = loss_fn(xs[-1], y)
    for k, layer in enumerate(model):
        if isinstance(layer, nn.Sigmoid):
            (g,) = torch.autograd.grad(loss, xs[k + 1], retain_graph=True)
            r = (ref.elementwise_second_derivative(layer, xs[k]) * g * g).abs().reshape(-1)
            J = ref.jacobian(xs[k], params)
            M = M + J.T @ (r[:, None] * J)
    blocks = dict(zip(names, ref.blocks(M, params)))
    m = run_extended(model, loss_fn, X, y, PCHMP("abs"))
    torch.manual_seed(6)
    for (name, p), q in zip(m.named_parameters(), b.parameters()):
        V = torch.randn(K, *p.shape, dtype=DT)
        close(q.pchmp(V), (V.reshape(K, -1) @ blocks[name]).reshape(V.shape), f"bp-stock: {name}")
        if name == "0.weight":  # and hbpkit's differs from it
            assert (p.pchmp(V) - q.pchmp(V)).abs().max() > 1e-6


# --------------------------------------------------------------------------- lifetime, errors
def _kept_calls(out: torch.Tensor, loss: torch.Tensor) -> list:
    calls = [record(loss)]
    call = record(out)
    while call is not None:
        calls.append(call)
        call = call.parent
    return calls


def _lifetime_problem():
    model, loss_fn, X, y = _problem(_cnn(), (2, 4, 4), nn.CrossEntropyLoss(), 2)
    return extend(model), extend(loss_fn), X, y


def test_products_survive_many_calls_and_the_graph():
    model, loss_fn, X, y = _lifetime_problem()
    out = model(X)
    loss = loss_fn(out, y)
    with backprop(HMP(), GGNMP()):
        loss.backward()
    del out, loss
    gc.collect()
    torch.manual_seed(5)
    for p in model.parameters():
        V = torch.randn(K, *p.shape, dtype=DT)
        first = p.hmp(V)
        for _ in range(20):  # a CG loop
            torch.testing.assert_close(p.hmp(V), first, rtol=0, atol=0)
        ggn = p.ggnmp(V)
        torch.testing.assert_close(p.ggnmp(V), ggn, rtol=0, atol=0)
    # still exact after all those calls
    check = model[0].weight
    V = torch.randn(K, *check.shape, dtype=DT)
    plain = copy.deepcopy(model)
    H = hessian_block(plain, loss_fn, X, y, "0.weight")
    close(check.hmp(V), (V.reshape(K, -1) @ H).reshape(V.shape), "lifetime: hmp")


@pytest.mark.parametrize("how", ["delete", "overwrite"])
def test_products_free_what_they_hold(how):
    model, loss_fn, X, y = _lifetime_problem()
    out = model(X)
    loss = loss_fn(out, y)
    calls = _kept_calls(out, loss)
    with backprop(HMP(), PCHMP()):
        loss.backward()
    refs = [weakref.ref(c) for c in calls] + [weakref.ref(c.inputs[0]) for c in calls]
    del out, loss, calls
    assert all(r() is not None for r in refs)  # the products keep the forward data
    params = list(model.parameters())
    params[0].hmp(torch.randn(1, *params[0].shape, dtype=DT))  # refills the caches
    if how == "delete":
        for p in params:
            del p.hmp, p.pchmp
    else:  # a second backward pass overwrites the attributes
        loss = loss_fn(model(X), y)
        with backprop(HMP(), PCHMP()):
            loss.backward()
        del loss
    assert all(r() is None for r in refs)  # freed without the garbage collector
    gc.collect()
    assert all(r() is None for r in refs)


def test_wrong_shape_and_bad_options():
    model, loss_fn, X, y = _problem(_mlp("Sigmoid", 3), (4,), nn.CrossEntropyLoss(), 2)
    m = run_extended(model, loss_fn, X, y, HMP())
    with pytest.raises(ValueError, match=r"\[K, 5, 4\]"):
        m[0].weight.hmp(torch.zeros(5, 4, dtype=DT))
    with pytest.raises(ValueError, match="modify"):
        PCHMP("square")
    assert repr(PCHMP("abs")) == "PCHMP(modify='abs')"


class _Scale(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(d, dtype=DT))

    def forward(self, x):
        return x * self.s


class _ScaleRules(ModuleRules):  # input Jacobians only: no parameter products
    diagonal_jacobian = True

    def param_names(self, module):
        return ["s"]

    def jac_t_mat_prod(self, call, mat):
        return mat * call.module.s.detach()

    jac_mat_prod = jac_t_mat_prod


def test_missing_parameter_rules_raise_and_write_nothing():
    hbpkit.register(_Scale, _ScaleRules(), families=("second_order",))
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 3), _Scale(3)).to(DT))
    loss_fn = extend(nn.MSELoss())
    loss = loss_fn(model(torch.randn(2, 4, dtype=DT)), torch.randn(2, 3, dtype=DT))
    with pytest.raises(NotImplementedError, match="param_jac_mat_prod"):
        with backprop(GGNMP()):
            loss.backward()
    assert not any(hasattr(p, "ggnmp") for p in model.parameters())
