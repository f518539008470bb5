"""Convolution rules (supplement section D) against autograd and BackPACK, in float64.

Three levels:

* the rules of ``nn.Conv1d/2d/3d`` called directly on the record of a forward
  pass (before autograd's backward releases it): Jacobian products, the
  batch-averaged product, per-sample gradients and their statistics, diagonals
  and Kronecker factors from given sqrt factors;
* small CNNs through the public API against brute-force definitions (dense
  Jacobians, ``torch.autograd.functional.hessian``, loops over samples);
* BackPACK 1.7.1 where it computes the same quantity with the same convention.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from records import record
from torch import nn
from twins import run_backpack, run_extended

import hbpkit.curvature.memory as budget
import hbpkit.extensions as exts
from hbpkit import backprop, extend
from hbpkit.curvature.factors import DiagonalFactor, SqrtFactor
from hbpkit.curvature.memory import DenseBudgetError, MemoryPolicy
from hbpkit.modules.tables import SECOND_ORDER

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}
N, V = 3, 2
MAX_ERR: dict[str, float] = {}  # largest absolute error per check (printed with -s)


def close(actual, expected, what: str = "") -> None:
    """``assert_close`` at ``TOL`` (dtype and shape included); records the error."""
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")
    if actual.numel():
        err = (actual - expected).abs().max().item()
        key = what.split(":")[0]
        MAX_ERR[key] = max(MAX_ERR.get(key, 0.0), err)


def teardown_module(module):
    for key, err in sorted(MAX_ERR.items()):
        print(f"max error {key}: {err:.2e}")


# --------------------------------------------------------------------------- module level
CONVS = {
    "2d": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 5, 6)),
    "2d_groups_dilation_nobias": (
        lambda: nn.Conv2d(
            4, 6, (2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1), groups=2, bias=False
        ),
        (4, 5, 6),
    ),
    "2d_depthwise": (lambda: nn.Conv2d(3, 3, 3, groups=3, padding=1), (3, 4, 4)),
    "2d_same_even": (lambda: nn.Conv2d(2, 3, (2, 4), padding="same"), (2, 4, 5)),
    "2d_valid": (lambda: nn.Conv2d(2, 3, 2, padding="valid", stride=(2, 1)), (2, 4, 5)),
    "2d_reflect": (lambda: nn.Conv2d(2, 3, 3, padding=2, padding_mode="reflect"), (2, 4, 5)),
    "2d_replicate": (
        lambda: nn.Conv2d(2, 3, (3, 2), padding=(1, 2), padding_mode="replicate"),
        (2, 3, 4),
    ),
    "2d_circular_stride": (
        lambda: nn.Conv2d(2, 2, 3, stride=2, padding=1, padding_mode="circular"),
        (2, 4, 5),
    ),
    "2d_P1": (lambda: nn.Conv2d(3, 4, (3, 4)), (3, 3, 4)),
    "1d": (lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2), (2, 9)),
    "1d_same_reflect": (
        lambda: nn.Conv1d(2, 3, 4, padding="same", padding_mode="reflect", bias=False),
        (2, 7),
    ),
    "3d": (lambda: nn.Conv3d(2, 2, (2, 2, 3), stride=(1, 2, 1), padding=(1, 0, 1)), (2, 3, 4, 4)),
    "3d_circular_groups": (
        lambda: nn.Conv3d(2, 4, 2, groups=2, padding=1, padding_mode="circular"),
        (2, 2, 3, 3),
    ),
    # transposed convolutions
    "T2d": (lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), (2, 3, 4)),
    "T2d_groups_dilation_nobias": (
        lambda: nn.ConvTranspose2d(
            4, 6, (2, 3), dilation=2, output_padding=1, groups=2, bias=False
        ),
        (4, 3, 3),
    ),
    "T1d_output_size": (lambda: nn.ConvTranspose1d(2, 3, 3, stride=3, padding=1), (2, 4)),
    "T3d": (
        lambda: nn.ConvTranspose3d(2, 2, 2, stride=(2, 1, 1), padding=(0, 1, 0)),
        (2, 2, 3, 2),
    ),
}
#: keyword arguments of the forward call
FORWARD_KWARGS = {"T1d_output_size": {"output_size": (12,)}}
CONV_IDS = sorted(k for k in CONVS if not k.startswith("T"))


def _record(module: nn.Module, x: torch.Tensor, **kwargs):
    """Forward ``module`` (extended) on ``x`` that requires grad; the record and output."""
    extend(module)
    x = x.clone().requires_grad_(True)
    out = module(x, **kwargs)
    return record(out), x, out


def _case(name: str):
    torch.manual_seed(0)
    factory, shape = CONVS[name]
    module = factory().double()
    kwargs = FORWARD_KWARGS.get(name, {})
    call, x, out = _record(module, torch.randn(N, *shape, dtype=DT), **kwargs)
    return name, SECOND_ORDER.lookup(module), call, x, out


@pytest.fixture(params=sorted(CONVS), name="case")
def fixture_case(request):
    return _case(request.param)


@pytest.fixture(params=CONV_IDS, name="conv_case")
def fixture_conv_case(request):
    """Convolutions only (not transposed): unfolded inputs and Kronecker factors."""
    return _case(request.param)


def _params(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_parameters()]


def _input_jacobian(module: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``[D_out, D_in]`` Jacobian of the module on one sample (the same for every sample)."""
    jac = torch.autograd.functional.jacobian(
        lambda v: type(module).forward(module, v.unsqueeze(0), **kwargs),
        x[0].detach(),
        vectorize=True,
    )
    return jac.reshape(-1, x[0].numel())


def _param_jacobian(module: nn.Module, x: torch.Tensor, name: str, kwargs=None) -> torch.Tensor:
    """Per-sample Jacobians of the output w.r.t. a parameter, ``[N, D_out, numel]``."""
    params = dict(module.named_parameters())
    param = params[name].detach()
    kwargs = kwargs or {}

    def f(p):
        return torch.func.functional_call(module, {**params, name: p}, (x.detach(),), kwargs)

    jac = torch.autograd.functional.jacobian(f, param, vectorize=True)  # [N, *out, *param]
    return jac.reshape(x.shape[0], -1, param.numel())


def test_jac_t_mat_prod(case):
    """``[V, N, C_out, *out] -> [V, N, C_in, *in]`` equals autograd's vector-Jacobian products."""
    name, rules, call, x, out = case
    mat = torch.randn(V, *out.shape, dtype=DT)
    actual = rules.jac_t_mat_prod(call, mat)
    expected = torch.stack([torch.autograd.grad(out, x, m, retain_graph=True)[0] for m in mat])
    close(actual, expected, f"jac_t_mat_prod: {name}")


def test_jac_mat_prod(case):
    """``[V, N, C_in, *in] -> [V, N, C_out, *out]`` equals Jacobian-vector products (double vjp)."""
    name, rules, call, x, out = case
    mat = torch.randn(V, *x.shape, dtype=DT)
    actual = rules.jac_mat_prod(call, mat)
    u = torch.zeros_like(out, requires_grad=True)
    (vjp,) = torch.autograd.grad(out, x, u, create_graph=True)
    expected = torch.stack([torch.autograd.grad(vjp, u, m, retain_graph=True)[0] for m in mat])
    close(actual, expected, f"jac_mat_prod: {name}")


def test_ea_jac_t_mat_jac_prod(case):
    """``mean_n J_n^T H J_n`` (approximation (9)) against the dense Jacobian."""
    name, rules, call, x, out = case
    J = _input_jacobian(call.module, x, FORWARD_KWARGS.get(name, {}))
    H = torch.randn(J.shape[0], J.shape[0], dtype=DT)
    close(rules.ea_jac_t_mat_jac_prod(call, H), J.T @ H @ J, f"ea_jac_t_mat_jac_prod: {name}")


def test_jac_t_factor_of_diagonal(case):
    """A diagonal factor ``diag(sign s^2)`` backpropagated equals ``J^T diag(.) J`` per sample."""
    name, rules, call, x, out = case
    f = DiagonalFactor.from_values(torch.randn_like(out))
    result = rules.jac_t_factor(call, f)
    assert isinstance(result, SqrtFactor)
    S = result.S.flatten(2)
    actual = torch.einsum("vni,vnj->nij", result.signed().flatten(2), S)
    J = _input_jacobian(call.module, x, FORWARD_KWARGS.get(name, {}))
    d = f.signed_square().flatten(1)
    close(actual, torch.einsum("oi,no,oj->nij", J, d, J), f"jac_t_factor(diagonal): {name}")
    dense = rules.jac_t_factor(call, f.dense())
    close(result.S, dense.S, f"jac_t_factor(diagonal) vs dense: {name}")


def test_first_order(case):
    """Per-sample gradients and their statistics against a loop over samples."""
    name, rules, call, x, out = case
    grad_output = torch.randn_like(out)
    names = _params(call.module)
    actual = {}
    for p in names:
        actual[p] = (
            rules.batch_l2(call, p, grad_output),
            rules.summed_grad(call, p, grad_output),
            rules.sum_grad_squared(call, p, grad_output),
            rules.batch_grad(call, p, grad_output),
        )
    for p in names:
        param = getattr(call.module, p)
        gb = torch.stack(
            [
                torch.autograd.grad(out[n], param, grad_output[n], retain_graph=True)[0]
                for n in range(N)
            ]
        )
        l2, summed, sgs, batch = actual[p]
        close(batch, gb, f"batch_grad: {name}.{p}")
        close(l2, gb.flatten(1).square().sum(1), f"batch_l2: {name}.{p}")
        close(summed, gb.sum(0), f"summed_grad: {name}.{p}")
        close(sgs, gb.square().sum(0), f"sum_grad_squared: {name}.{p}")


@pytest.mark.parametrize("config", ["2d_P1", "1d"])
def test_batch_l2_without_per_sample_gradients(config):
    """Where ``P^2 (O + S) < O S`` the norms come from Gram matrices, not from ``batch_grad``."""
    torch.manual_seed(0)
    factory, shape = CONVS[config]
    module = factory().double()
    call, x, out = _record(module, torch.randn(N, *shape, dtype=DT))
    rules = SECOND_ORDER.lookup(module)
    grad_output = torch.randn_like(out)
    l2 = rules.batch_l2(call, "weight", grad_output)
    used_gram = ("batch_grad", "weight") not in call.cache
    assert used_gram == (config == "2d_P1")
    expected = rules.batch_grad(call, "weight", grad_output).flatten(1).square().sum(1)
    close(l2, expected, f"batch_l2 (gram): {config}")


def _random_factors(out: torch.Tensor):
    S = torch.randn(4, *out.shape, dtype=DT)
    sign = torch.sign(torch.randn(4, out.shape[0], dtype=DT))
    diagonal = DiagonalFactor.from_values(torch.randn_like(out))
    return [SqrtFactor(S, sign), SqrtFactor(S[:2]), diagonal]


def test_param_diag(case):
    """``diag(sum_{v,n} sign (J_n^T s)(J_n^T s)^T)`` for sqrt and diagonal factors, chunked."""
    name, rules, call, x, out = case
    factors = _random_factors(out)
    actual = {p: rules.param_diag(call, p, factors) for p in _params(call.module)}
    call.memory = MemoryPolicy(chunk_bytes=1)  # one column of V at a time
    chunked = {p: rules.param_diag(call, p, factors) for p in _params(call.module)}
    for p in _params(call.module):
        J = _param_jacobian(call.module, x, p, FORWARD_KWARGS.get(name))  # [N, D_out, numel]
        expected = 0
        for f in factors:
            if isinstance(f, DiagonalFactor):
                d = f.signed_square().flatten(1)
                expected = expected + torch.einsum("nop,no->p", J.square(), d)
            else:
                JtS = torch.einsum("nop,vno->vnp", J, f.S.flatten(2))
                expected = expected + SqrtFactor(JtS, f.sign).signed_square().sum((0, 1))
        shape = getattr(call.module, p).shape
        close(actual[p], expected.reshape(shape), f"param_diag: {name}.{p}")
        close(chunked[p], actual[p], f"param_diag chunked: {name}.{p}")


def _unfold_reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``u[n, s, p] = d z[n, 0, p] / d W[0, s]`` (groups = 1): ``[N, S, P]`` by autograd;
    for ``g`` groups ``[N, g, S, P]``, group ``i``'s patches from its first output channel."""
    J = _param_jacobian(module, x, "weight")  # [N, C_out * P, C_out * S]
    C_out, g = module.weight.shape[0], module.groups
    J = J.reshape(x.shape[0], C_out, -1, C_out, J.shape[-1] // C_out)
    if g == 1:
        return J[:, 0, :, 0, :].transpose(1, 2)
    m = C_out // g
    return torch.stack([J[:, i * m, :, i * m, :].transpose(1, 2) for i in range(g)], 1)


def _group_blocks(G: torch.Tensor, g: int) -> torch.Tensor:
    """``[g, C/g, C/g]``: the diagonal blocks of ``G`` ``[C, C]`` (``G`` itself for one group)."""
    if g == 1:
        return G
    m = G.shape[0] // g
    return torch.stack([G[i * m : (i + 1) * m, i * m : (i + 1) * m] for i in range(g)])


def test_unfold_and_input_factors(conv_case):
    """``[[x]]`` and both ``A`` factors against autograd (and ``F.unfold`` for 2d zero padding)."""
    name, rules, call, x, out = conv_case
    module = call.module
    unfold = rules.unfold(call)
    A = {approx: rules.input_factor(call, approx) for approx in ("expand", "reduce")}
    u = _unfold_reference(module, x)
    if module.groups == 1:
        close(unfold, u, f"unfold vs autograd: {name}")
        P = u.shape[2]
        close(A["expand"], torch.einsum("nsp,ntp->st", u, u) / (N * P), f"A expand: {name}")
        ubar = u.mean(2)
        close(A["reduce"], ubar.T @ ubar / N, f"A reduce: {name}")
    else:  # per group of input channels, [g, S, S]
        close(unfold, u.flatten(1, 2), f"unfold vs autograd: {name}")
        P = u.shape[3]
        expand = torch.einsum("ngsp,ngtp->gst", u, u) / (N * P)
        close(A["expand"], expand, f"A expand (groups): {name}")
        ubar = u.mean(3)
        close(A["reduce"], torch.einsum("ngs,ngt->gst", ubar, ubar) / N, f"A reduce: {name}")
    if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros":
        pad = module.padding
        if isinstance(pad, str):
            pad = 0 if pad == "valid" else None
        if pad is not None:
            direct = F.unfold(x.detach(), module.kernel_size, module.dilation, pad, module.stride)
            close(unfold, direct, f"unfold vs F.unfold: {name}")
            if module.groups == 1:
                P = direct.shape[2]
                expand = torch.einsum("nsp,ntp->st", direct, direct) / (N * P)
                close(A["expand"], expand, f"A expand vs F.unfold: {name}")
                ubar = direct.mean(2)
                close(A["reduce"], ubar.T @ ubar / N, f"A reduce vs F.unfold: {name}")


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kron_factors_from_given_curvature(case, approx):
    """``G`` from sqrt factors / a batch-averaged matrix, by its definition (convolutions and
    transposed convolutions); a grouped weight gets the diagonal blocks per group."""
    name, rules, call, x, out = case
    module = call.module
    factors = _random_factors(out)
    H = torch.randn(out[0].numel(), out[0].numel(), dtype=DT)
    C_out = out.shape[1]
    expected = 0
    for f in factors:
        f = f.dense() if isinstance(f, DiagonalFactor) else f
        S, Ss = f.S.flatten(3), f.signed().flatten(3)  # [V, N, C_out, P]
        if approx == "reduce":
            expected = expected + torch.einsum("vno,vnq->oq", Ss.sum(3), S.sum(3))
        else:
            expected = expected + torch.einsum("vnop,vnqp->oq", Ss, S)
    Hb = H.reshape(C_out, -1, C_out, H.shape[0] // C_out)
    if approx == "reduce":
        expected_avg = Hb.sum((1, 3))
    else:
        expected_avg = sum(Hb[:, p, :, p] for p in range(Hb.shape[1]))
    for p in _params(module):
        G_sqrt = rules.kron_from_sqrt(call, p, factors, approx)
        G_avg = rules.kron_from_average(call, p, H, approx)
        assert len(G_sqrt) == len(G_avg) == (2 if p == "weight" else 1)
        g = module.groups if p == "weight" else 1
        close(G_sqrt[0], _group_blocks(expected, g), f"G from sqrt: {name}.{p}")
        close(G_avg[0], _group_blocks(expected_avg, g), f"G from average: {name}.{p}")
        if p == "weight":
            close(G_sqrt[1], rules.input_factor(call, approx), f"A: {name}")
            close(G_avg[1], rules.input_factor(call, approx), f"A: {name}")


def test_unfold_cached_once():
    """``[[x]]`` is computed once per call and shared by all quantities."""
    torch.manual_seed(0)
    module = nn.Conv2d(2, 3, 3).double()
    call, x, out = _record(module, torch.randn(N, 2, 5, 5, dtype=DT))
    rules = SECOND_ORDER.lookup(module)
    g = torch.randn_like(out)
    rules.batch_grad(call, "weight", g)
    first = call.cache["conv_unfold"]
    rules.summed_grad(call, "weight", g)
    rules.param_diag(call, "weight", [SqrtFactor(torch.randn(2, *out.shape, dtype=DT))])
    rules.input_factor(call, "expand")
    assert call.cache["conv_unfold"] is first


def test_unbatched_input_refused():
    module = extend(nn.Conv2d(2, 3, 3).double())
    out = module(torch.randn(2, 5, 5, dtype=DT, requires_grad=True))
    with pytest.raises(NotImplementedError, match=r"Conv2d needs a batched input"):
        with backprop(exts.BatchGrad()):
            out.sum().backward()


# --------------------------------------------------------------------------- model level
# (conv factory, input shape per sample); every model is conv -> Sigmoid -> Flatten -> Linear
MODELS = {
    "2d_s2p1": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 5, 5)),
    "2d_groups_dilation": (
        lambda: nn.Conv2d(2, 4, (2, 3), stride=(2, 1), padding=(0, 2), dilation=(1, 2), groups=2),
        (2, 5, 4),
    ),
    "2d_same_reflect_nobias": (
        lambda: nn.Conv2d(2, 2, 4, padding="same", padding_mode="reflect", bias=False),
        (2, 4, 4),
    ),
    "1d_circular": (
        lambda: nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2, padding_mode="circular"),
        (2, 7),
    ),
    "1d_depthwise": (lambda: nn.Conv1d(2, 4, 2, groups=2, padding="valid"), (2, 6)),
    "3d_replicate": (
        lambda: nn.Conv3d(
            1, 2, (2, 3, 2), stride=(1, 2, 1), padding=(1, 1, 0), padding_mode="replicate"
        ),
        (1, 3, 4, 3),
    ),
    "3d": (lambda: nn.Conv3d(2, 2, 2, stride=(2, 1, 1), padding=1), (2, 3, 2, 3)),
    "T2d": (lambda: nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1, output_padding=1), (2, 2, 3)),
    "T1d_groups_dilation": (
        lambda: nn.ConvTranspose1d(2, 4, 3, groups=2, dilation=2, stride=2),
        (2, 4),
    ),
}


def _make_model(config: str, classes: int = 3) -> tuple[nn.Sequential, tuple[int, ...]]:
    torch.manual_seed(0)
    factory, shape = MODELS[config]
    conv = factory()
    with torch.no_grad():
        features = conv(torch.zeros(1, *shape)).numel()
    model = nn.Sequential(conv, nn.Sigmoid(), nn.Flatten(), nn.Linear(features, classes))
    return model.double(), shape


def _two_conv_model(padding_mode: str = "circular") -> tuple[nn.Sequential, tuple[int, ...]]:
    """Curvature and diagonal residual factors pass through a convolution."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Sigmoid(),
        nn.Conv2d(3, 2, 3, stride=2, padding=1, padding_mode=padding_mode),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    )
    return model.double(), (2, 5, 5)


def _conv_transpose_model(output_padding: int = 1) -> tuple[nn.Sequential, tuple[int, ...]]:
    """Curvature and diagonal residual factors pass through a transposed convolution."""
    torch.manual_seed(0)
    size = 5 + output_padding
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2),
        nn.Sigmoid(),
        nn.ConvTranspose2d(3, 2, 3, stride=2, output_padding=output_padding),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * size * size, 3),
    )
    return model.double(), (2, 5, 5)


def _model(config: str):
    if config == "two_conv":
        return _two_conv_model()
    if config == "conv_transpose":
        return _conv_transpose_model()
    return _make_model(config)


def _data(shape, n=N, classes=3, seed=1):
    torch.manual_seed(seed)
    return 1.5 * torch.randn(n, *shape, dtype=DT), torch.randint(0, classes, (n,))


def _functional(model: nn.Module):
    names = [n for n, _ in model.named_parameters()]

    def f(*params):
        return torch.func.functional_call(model, dict(zip(names, params)), (f.X,))

    return names, f


def _hessian_and_ggn(model, loss_fn, X, y):
    """Per-parameter blocks of the exact Hessian and GGN of the loss, ``{name: [P, P]}``."""
    names, f = _functional(model)
    f.X = X
    params = tuple(p.detach() for p in model.parameters())
    H = torch.autograd.functional.hessian(lambda *ps: loss_fn(f(*ps), y), params)
    out = f(*params).detach()
    J = torch.autograd.functional.jacobian(f, params)  # per param [N, O, *p]
    H_out = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), out)
    H_out = H_out.reshape(out.numel(), out.numel())
    hess, ggn = {}, {}
    for i, (name, p) in enumerate(zip(names, params)):
        hess[name] = H[i][i].reshape(p.numel(), p.numel())
        Ji = J[i].reshape(out.numel(), p.numel())
        ggn[name] = Ji.T @ H_out @ Ji
    return hess, ggn


def _per_sample_grads(model, loss_fn, X, y):
    names = [n for n, _ in model.named_parameters()]
    scale = 1 / X.shape[0] if loss_fn.reduction == "mean" else 1.0
    grads = [
        torch.autograd.grad(loss_fn(model(X[n : n + 1]), y[n : n + 1]) * scale, model.parameters())
        for n in range(X.shape[0])
    ]
    return {name: torch.stack([g[i] for g in grads]) for i, name in enumerate(names)}


MODEL_IDS = sorted(MODELS)


@pytest.mark.parametrize("config", MODEL_IDS)
def test_first_order_model(config):
    """grad_batch, batch_l2, sum_grad_squared, variance against a loop over samples."""
    plain, shape = _make_model(config)
    X, y = _data(shape)
    loss_fn = nn.CrossEntropyLoss()
    model = run_extended(
        plain,
        loss_fn,
        X,
        y,
        exts.BatchGrad(),
        exts.BatchL2(),
        exts.SumGradSquared(),
        exts.Variance(),
    )
    expected = _per_sample_grads(plain, loss_fn, X, y)
    for name, p in model.named_parameters():
        gb = expected[name]
        close(p.grad_batch, gb, f"grad_batch: {config}.{name}")
        close(p.batch_l2, gb.flatten(1).square().sum(1), f"batch_l2: {config}.{name}")
        sgs = gb.square().sum(0)
        close(p.sum_grad_squared, sgs, f"sum_grad_squared: {config}.{name}")
        close(p.variance, sgs / N - (gb.sum(0) / N).square(), f"variance: {config}.{name}")


@pytest.mark.parametrize("config", [*MODEL_IDS, "two_conv", "conv_transpose"])
def test_diagonals_model(config):
    """diag_ggn_exact and diag_h against the dense GGN and autograd's Hessian."""
    plain, shape = _model(config)
    X, y = _data(shape)
    loss_fn = nn.CrossEntropyLoss(reduction="sum" if config == "1d_circular" else "mean")
    model = run_extended(plain, loss_fn, X, y, exts.DiagGGNExact(), exts.DiagHessian())
    hess, ggn = _hessian_and_ggn(plain, loss_fn, X, y)
    for name, p in model.named_parameters():
        close(p.diag_ggn_exact, ggn[name].diagonal().reshape(p.shape), f"diag_ggn: {config}.{name}")
        close(p.diag_h, hess[name].diagonal().reshape(p.shape), f"diag_h: {config}.{name}")


def _trace(model: nn.Sequential, X):
    xs = [X]
    for layer in model:
        xs.append(layer(xs[-1]))
    return xs


def _kflr_reference(model, loss_fn, X, y, k: int, approx: str) -> torch.Tensor:
    """``G`` of KFLR for the convolution ``model[k]`` by definition (positions explicit).

    ``J_{n,p} = d f(x_n) / d z_{n,:,p}``; expand ``G = sum_{n,p} J^T H_n J``, reduce
    ``G = sum_n (sum_p J_{n,p})^T H_n (sum_p J_{n,p})``.
    """
    xs = _trace(model, X)
    z = xs[k + 1].detach()
    rest = model[k + 1 :]
    out = rest(z)
    Nb, O = out.shape
    C_out = z.shape[1]
    J = torch.autograd.functional.jacobian(rest, z).reshape(Nb, O, Nb, C_out, -1)
    H = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), out.detach())
    G = 0
    for n in range(Nb):
        Jn, Hn = J[n, :, n], H[n, :, n, :]  # [O, C_out, P], [O, O]
        if approx == "reduce":
            G = G + Jn.sum(2).T @ Hn @ Jn.sum(2)
        else:
            G = G + torch.einsum("aop,ab,bqp->oq", Jn, Hn, Jn)
    return G


def _kfra_reference(model, loss_fn, X, y, k: int, approx: str) -> torch.Tensor:
    """``G`` of KFRA for ``model[k]``: the batch-average recursion (approx. (9)), then blocks."""
    xs = _trace(model, X)
    out = xs[-1].detach()
    H = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), out)
    Hz = sum(H[n, :, n, :] for n in range(X.shape[0]))
    for j in reversed(range(k + 1, len(model))):
        x = xs[j].detach()
        Jn = torch.stack(
            [
                torch.autograd.functional.jacobian(model[j], x[n : n + 1]).reshape(-1, x[n].numel())
                for n in range(x.shape[0])
            ]
        )
        Hz = torch.einsum("noi,op,npj->ij", Jn, Hz, Jn) / x.shape[0]
    C_out = xs[k + 1].shape[1]
    Hb = Hz.reshape(C_out, -1, C_out, Hz.shape[0] // C_out)
    if approx == "reduce":
        return Hb.sum((1, 3))
    return torch.einsum("opqp->oq", Hb)


def _input_factor_reference(conv: nn.Module, x: torch.Tensor, approx: str) -> torch.Tensor:
    u = _unfold_reference(conv, x)
    if approx == "reduce":
        ubar = u.mean(2)
        return ubar.T @ ubar / x.shape[0]
    return torch.einsum("nsp,ntp->st", u, u) / (x.shape[0] * u.shape[2])


KRON_MODELS = [
    m for m in MODEL_IDS if "groups" not in m and "depthwise" not in m and not m.startswith("T")
]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("config", [*KRON_MODELS, "two_conv"])
def test_kflr_kfra_model(config, approx):
    """KFLR and KFRA factors of every convolution against their definitions (N > 1, P > 1)."""
    plain, shape = _model(config)
    X, y = _data(shape)
    loss_fn = nn.CrossEntropyLoss()
    model = run_extended(plain, loss_fn, X, y, exts.KFLR(kfac_approx=approx))
    model_ra = run_extended(plain, loss_fn, X, y, exts.KFRA(kfac_approx=approx))
    xs = _trace(plain, X)
    for k, layer in enumerate(plain):
        if not isinstance(layer, nn.modules.conv._ConvNd):
            continue
        A = _input_factor_reference(layer, xs[k].detach(), approx)
        G_lr = _kflr_reference(plain, loss_fn, X, y, k, approx)
        G_ra = _kfra_reference(plain, loss_fn, X, y, k, approx)
        for ext_model, G, what in ((model, G_lr, "kflr"), (model_ra, G_ra, "kfra")):
            conv = ext_model[k]
            factors = getattr(conv.weight, what)
            close(factors[0], G, f"{what} G ({approx}): {config}.{k}")
            close(factors[1], A, f"{what} A ({approx}): {config}.{k}")
            if conv.bias is not None:
                (G_bias,) = getattr(conv.bias, what)
                close(G_bias, G, f"{what} bias ({approx}): {config}.{k}")


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize(
    "factory, shape",
    [
        (lambda: nn.Conv2d(2, 3, (3, 4)), (2, 3, 4)),
        (lambda: nn.Conv1d(2, 3, 5, padding=1), (2, 3)),
        (
            lambda: nn.Conv3d(1, 2, (2, 1, 5), padding=(0, 0, 1), padding_mode="circular"),
            (1, 2, 1, 3),
        ),
    ],
    ids=["2d", "1d_padded", "3d_circular"],
)
def test_kflr_kfra_exact_for_one_sample_one_position(factory, shape, approx):
    """Batch size 1 and ``P = 1``: ``kron(G, A)`` is the exact GGN block (both approximations)."""
    torch.manual_seed(0)
    conv = factory()
    with torch.no_grad():
        features = conv(torch.zeros(1, *shape)).numel()
        assert conv(torch.zeros(1, *shape)).shape[2:].numel() == 1  # P = 1
    plain = nn.Sequential(conv, nn.Sigmoid(), nn.Flatten(), nn.Linear(features, 4)).double()
    X, y = _data(shape, n=1, classes=4)
    loss_fn = nn.CrossEntropyLoss()
    _, ggn = _hessian_and_ggn(plain, loss_fn, X, y)
    for ext, field in (
        (exts.KFLR(kfac_approx=approx), "kflr"),
        (exts.KFRA(kfac_approx=approx), "kfra"),
    ):
        model = run_extended(plain, loss_fn, X, y, ext)
        G, A = getattr(model[0].weight, field)
        close(torch.kron(G, A), ggn["0.weight"], f"{field} exact weight block ({approx})")
        (G_bias,) = getattr(model[0].bias, field)
        close(G_bias, ggn["0.bias"], f"{field} exact bias block ({approx})")


@pytest.mark.parametrize("config", ["2d_s2p1", "1d_circular"])
def test_reduce_bias_block_is_exact(config):
    """With ``"reduce"`` the bias factor is the exact GGN bias block for any N and P (D.4)."""
    plain, shape = _make_model(config)
    X, y = _data(shape)
    loss_fn = nn.CrossEntropyLoss()
    model = run_extended(plain, loss_fn, X, y, exts.KFLR(kfac_approx="reduce"))
    _, ggn = _hessian_and_ggn(plain, loss_fn, X, y)
    close(model[0].bias.kflr[0], ggn["0.bias"], f"reduce bias exact: {config}")


# --------------------------------------------------------------------------- memory budget
def test_dense_budget_refusal_kfra():
    """The batch-averaged product through a convolution refuses before allocating."""
    memory = MemoryPolicy(max_dense_bytes=10_000)
    plain, shape = _two_conv_model()
    X, y = _data(shape)
    model = extend(copy.deepcopy(plain))
    loss = extend(nn.CrossEntropyLoss())(model(X), y)
    with pytest.raises(DenseBudgetError, match=r"Conv2d '[0-9]+'.*needs a dense.*0.0.* GB") as info:
        with backprop(exts.KFRA(), exts.BatchGrad(), memory=memory):
            loss.backward()
    assert isinstance(info.value, MemoryError) and isinstance(info.value, NotImplementedError)
    assert "J^T H J ([18, 18] -> [75, 75])" in str(info.value)
    assert not any(hasattr(p, f) for p in model.parameters() for f in ("kfra", "grad_batch"))


def test_dense_budget_refusal_diagonal_factor():
    """A diagonal residual factor through a convolution checks the budget too."""
    memory = MemoryPolicy(max_dense_bytes=10_000)
    plain, shape = _two_conv_model()
    X, y = _data(shape)
    with pytest.raises(DenseBudgetError, match=r"diagonal curvature factor.*GB"):
        run_extended(plain, nn.CrossEntropyLoss(), X, y, exts.DiagHessian(), memory=memory)
    # the GGN needs no diagonal factor: within the budget
    model = run_extended(plain, nn.CrossEntropyLoss(), X, y, exts.DiagGGNExact(), memory=memory)
    assert model[0].weight.diag_ggn_exact.shape == model[0].weight.shape


def test_dense_budget_message_size():
    torch.manual_seed(0)
    module = nn.Conv2d(1, 1, 1).double()
    call, x, out = _record(module, torch.randn(1, 1, 4, 4, dtype=DT))
    with pytest.raises(DenseBudgetError, match=r"a test matrix through Conv2d.*\(8\.59 GB\)"):
        budget.check_dense_budget(call, 2**30 + 1, DT, "a test matrix", "advice")


# --------------------------------------------------------------------------- BackPACK
bp = pytest.importorskip("backpack")

BP_MODELS = [
    "2d_s2p1",
    "2d_groups_dilation",
    "3d",
    "two_conv",
    "T1d_groups_dilation",
    "conv_transpose",
]


def _bp_model(config: str):
    """BackPACK 1.7.1 ignores ``padding_mode`` and fails on ``output_padding``: avoid both."""
    if config == "two_conv":
        return _two_conv_model("zeros")
    if config == "conv_transpose":
        return _conv_transpose_model(output_padding=0)
    return _model(config)


@pytest.mark.parametrize("config", BP_MODELS)
def test_against_backpack_first_order_and_diagonals(config):
    """grad_batch, diag_ggn_exact, diag_h: same definitions in both libraries."""
    from backpack import extensions as bpx

    plain, shape = _bp_model(config)
    X, y = _data(shape)
    loss_fn = nn.CrossEntropyLoss()
    ours = run_extended(
        plain, loss_fn, X, y, exts.BatchGrad(), exts.DiagGGNExact(), exts.DiagHessian()
    )
    theirs = run_backpack(
        plain, loss_fn, X, y, bpx.BatchGrad(), bpx.DiagGGNExact(), bpx.DiagHessian()
    )
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        for field in ("grad_batch", "diag_ggn_exact", "diag_h"):
            close(getattr(p, field), getattr(q, field), f"backpack {field}: {config}.{name}")


@pytest.mark.parametrize("config", ["2d_s2p1", "3d", "two_conv"])
def test_against_backpack_kronecker(config):
    """BackPACK's conv factors are ``[G_reduce, P * A_expand]`` (sum over positions in both).

    Its KFLR ``G`` (weight and bias) and KFRA ``G`` equal our ``"reduce"`` ``G``;
    its ``A`` is ``P`` times our ``"expand"`` ``A``.
    """
    from backpack import extensions as bpx

    plain, shape = _bp_model(config)
    X, y = _data(shape)
    loss_fn = nn.CrossEntropyLoss()
    reduce = run_extended(plain, loss_fn, X, y, exts.KFLR(kfac_approx="reduce"))
    expand = run_extended(
        plain, loss_fn, X, y, exts.HBP("ggn", "average", "batch-average", 1, "expand")
    )
    reduce_ra = run_extended(plain, loss_fn, X, y, exts.KFRA(kfac_approx="reduce"))
    theirs = run_backpack(plain, loss_fn, X, y, bpx.KFLR(), bpx.KFRA())
    xs = _trace(plain, X)
    for k, layer in enumerate(plain):
        if not isinstance(layer, nn.modules.conv._ConvNd):
            continue
        P = math.prod(xs[k + 1].shape[2:])
        G_bp, A_bp = theirs[k].weight.kflr
        close(reduce[k].weight.kflr[0], G_bp, f"backpack kflr G: {config}.{k}")
        close(reduce[k].bias.kflr[0], theirs[k].bias.kflr[0], f"backpack kflr bias: {config}.{k}")
        close(P * expand[k].weight.hbp[1], A_bp, f"backpack A: {config}.{k}")
        G_ra, A_ra = theirs[k].weight.kfra
        close(reduce_ra[k].weight.kfra[0], G_ra, f"backpack kfra G: {config}.{k}")
        close(
            reduce_ra[k].bias.kfra[0], theirs[k].bias.kfra[0], f"backpack kfra bias: {config}.{k}"
        )
        close(P * expand[k].weight.hbp[1], A_ra, f"backpack kfra A: {config}.{k}")
