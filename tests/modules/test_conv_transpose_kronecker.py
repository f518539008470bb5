"""Kronecker factors of transposed convolutions (float64).

``z = conv_transpose(x, W)`` is, per group, ``M [[x]]^T`` with ``M[o, (c, k)] = W[c, o, k]``
(``hbpkit/modules/conv/transpose_kronecker.py``): the factors are ``[G, A]`` of that
matrix, ``KroneckerFactors(..., transposed=True)``, grouped as for convolutions. Checked
against

* the patches ``[[x]]^T`` from a loop over input positions and kernel offsets (an
  independent implementation of the geometry) and from autograd (``dz/dW``), and ``A`` of
  both approximations from them (strides, padding, output padding, ``output_size``,
  dilation, groups, 1d/2d/3d);
* the exact GGN block in ``p.flatten()`` order (autograd) where KFLR/KFRA are exact: batch
  size 1 and one output position, and MSE on the layer's output for any batch size (also
  grouped);
* the ungrouped twin of a grouped transposed convolution (``conv_twins.py``);
* BackPACK 1.7.1's ``KFLR`` / ``KFRA`` (``groups=1``, no output padding: its unfolding
  ignores it): its factors are for ``weight.transpose(0, 1)`` (our layout), its ``G`` our
  ``"reduce"`` ``G`` and its ``A`` ``P`` times our ``"expand"`` ``A``;
* dense algebra for the transposed layout of :class:`KroneckerFactors`, and the optimizer's
  step against a dense solve in ``p.flatten()`` order.
"""

from __future__ import annotations

import copy
import itertools
import math
import pickle
import warnings

import pytest
import reference as ref
import torch
from conv_twins import slice_twin, twin_layers
from records import record
from torch import nn
from twins import run_backpack, run_extended

import hbpkit.extensions as exts
from hbpkit import KroneckerFactors, backprop, extend
from hbpkit.modules.tables import SECOND_ORDER
from hbpkit.optim import KroneckerPreconditioner
from hbpkit.optim.kronecker import damped_inverses

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-11)

CASES = {  # (factory, input shape, forward kwargs)
    "1d_stride_pad": (lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1), (2, 4), {}),
    "1d_output_size": (
        lambda: nn.ConvTranspose1d(2, 3, 3, stride=3, padding=1),
        (2, 4),
        {"output_size": (12,)},
    ),
    "2d_outpad_dilation": (
        lambda: nn.ConvTranspose2d(
            2, 3, (2, 3), stride=(2, 1), padding=(0, 1), dilation=(1, 2), output_padding=(1, 0)
        ),
        (2, 3, 3),
        {},
    ),
    "2d_groups_nobias": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, output_padding=1, bias=False),
        (4, 2, 3),
        {},
    ),
    "2d_depthwise": (lambda: nn.ConvTranspose2d(3, 3, 2, stride=2, groups=3), (3, 2, 2), {}),
    "3d_groups": (
        lambda: nn.ConvTranspose3d(2, 4, (2, 1, 2), stride=(1, 2, 2), padding=(0, 0, 1), groups=2),
        (2, 2, 2, 3),
        {},
    ),
}


def close(actual, expected, what: str = "") -> None:
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def _case(name: str, n: int = 3):
    torch.manual_seed(0)
    factory, shape, kwargs = CASES[name]
    module = extend(factory().to(DT))
    x = torch.randn(n, *shape, dtype=DT, requires_grad=True)
    out = module(x, **kwargs)
    return module, x, out, kwargs


def _patches_loop(module: nn.Module, x: torch.Tensor, out_shape) -> torch.Tensor:
    """``[[x]]^T`` ``[N, C_in * prod(k), P]`` by its definition: entry ``((c, k), q)`` is
    ``x[c, i]`` where ``q = i * stride - padding + k * dilation`` on every axis."""
    N, C_in = x.shape[:2]
    ins, ks = x.shape[2:], module.kernel_size
    K, P = math.prod(ks), math.prod(out_shape)
    U = torch.zeros(N, C_in, K, P, dtype=x.dtype)
    for i in itertools.product(*(range(n) for n in ins)):
        for k_flat, k in enumerate(itertools.product(*(range(n) for n in ks))):
            q = [
                a * s - p + b * d
                for a, b, s, p, d in zip(i, k, module.stride, module.padding, module.dilation)
            ]
            if all(0 <= v < n for v, n in zip(q, out_shape)):
                q_flat = 0
                for v, n in zip(q, out_shape):
                    q_flat = q_flat * n + v
                U[:, :, k_flat, q_flat] = x[(slice(None), slice(None), *i)]
    return U.reshape(N, C_in * K, P)


def _patches_autograd(module: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``dz[n, o, q] / dW[c, o, k]`` with ``o`` the first output channel of ``c``'s group."""
    W = module.weight.detach()

    def f(w):
        return torch.func.functional_call(
            module, {"weight": w}, (x.detach(),), kwargs, strict=False
        )

    J = torch.autograd.functional.jacobian(f, W, vectorize=True)  # [N, C_out, *out, *W.shape]
    N, C_out = J.shape[:2]
    J = J.reshape(N, C_out, -1, *W.shape)
    g, C_in = module.groups, W.shape[0]
    rows = []
    for c in range(C_in):
        o = (c // (C_in // g)) * (C_out // g)  # first output channel of c's group
        rows.append(J[:, o, :, c, 0].flatten(2).transpose(1, 2))  # [N, K, P]
    return torch.stack(rows, 1).flatten(1, 2)


@pytest.mark.parametrize("name", sorted(CASES))
def test_patches_and_input_factors(name):
    """``[[x]]^T`` against the loop and autograd; ``A`` (both approximations, per group)."""
    module, x, out, kwargs = _case(name)
    rules, call = SECOND_ORDER.lookup(module), record(out)
    U = rules.transposed_unfold(call)
    close(U, _patches_loop(module, x.detach(), out.shape[2:]), f"{name}: loop")
    close(U, _patches_autograd(module, x, kwargs), f"{name}: autograd")
    g, (N, _, P) = module.groups, U.shape
    u = U.unflatten(1, (g, -1))
    expand = torch.einsum("ngsp,ngtp->gst", u, u) / (N * P)
    ubar = u.mean(3)
    reduce = torch.einsum("ngs,ngt->gst", ubar, ubar) / N
    for approx, A in (("expand", expand), ("reduce", reduce)):
        close(rules.input_factor(call, approx), A[0] if g == 1 else A, f"{name}: A {approx}")


P1_CASES = {  # one output position (P = 1), (factory, input shape)
    "1d": (lambda: nn.ConvTranspose1d(2, 3, 3, padding=1), (2, 1)),
    "2d_stride": (
        lambda: nn.ConvTranspose2d(2, 3, (2, 3), stride=(1, 2), padding=(1, 1)),
        (2, 2, 1),
    ),
    "3d": (lambda: nn.ConvTranspose3d(2, 2, (1, 2, 3), padding=(0, 1, 1)), (2, 1, 2, 1)),
    "1d_groups": (lambda: nn.ConvTranspose1d(4, 6, 3, padding=1, groups=2), (4, 1)),
}


def _exact_ggn(model, loss_fn, X, y, param) -> torch.Tensor:
    return ref.ggn(model(X), loss_fn, y, [param])


def _head(conv: nn.Module, shape, classes: int = 4) -> nn.Module:
    with torch.no_grad():
        features = conv(torch.zeros(1, *shape, dtype=DT)).numel()
    return nn.Sequential(nn.Sigmoid(), nn.Flatten(), nn.Linear(features, classes, dtype=DT))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", ["1d", "2d_stride", "3d"])
def test_kflr_kfra_exact_batch_one(name, approx):
    """Batch size 1, ``P = 1``: KFLR's and KFRA's ``to_dense()`` is the exact GGN block of the
    weight in ``p.flatten()`` order, the bias factor the exact bias block."""
    torch.manual_seed(0)
    factory, shape = P1_CASES[name]
    conv = factory().to(DT)
    with torch.no_grad():
        assert conv(torch.zeros(1, *shape, dtype=DT)).shape[2:].numel() == 1
    model = nn.Sequential(conv, *_head(conv, shape))
    X, y = torch.randn(1, *shape, dtype=DT), torch.tensor([2])
    loss_fn = nn.CrossEntropyLoss()
    exact_w = _exact_ggn(model, loss_fn, X, y, model[0].weight)
    exact_b = _exact_ggn(model, loss_fn, X, y, model[0].bias)
    for ext, field in (
        (exts.KFLR(kfac_approx=approx), "kflr"),
        (exts.KFRA(kfac_approx=approx), "kfra"),
    ):
        ext_model = run_extended(model, loss_fn, X, y, ext)
        factors = getattr(ext_model[0].weight, field)
        assert isinstance(factors, KroneckerFactors) and factors.transposed
        close(factors.to_dense(), exact_w, f"{name} {field} weight")
        close(getattr(ext_model[0].bias, field)[0], exact_b, f"{name} {field} bias")
        # the layout matters: the plain kron is in another order (not the exact block)
        assert (torch.kron(*factors) - exact_w).abs().max() > 1e-6


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", sorted(P1_CASES))
def test_kflr_exact_with_mse_on_the_output(name, approx):
    """MSE on the layer's output, ``P = 1``, any batch size: exact (grouped too)."""
    torch.manual_seed(0)
    factory, shape = P1_CASES[name]
    model = nn.Sequential(factory().to(DT), nn.Flatten())
    X = torch.randn(4, *shape, dtype=DT)
    with torch.no_grad():
        y = torch.randn_like(model(X))
    loss_fn = nn.MSELoss(reduction="sum")
    exact = _exact_ggn(model, loss_fn, X, y, model[0].weight)
    for ext, field in (
        (exts.KFLR(kfac_approx=approx), "kflr"),
        (exts.KFRA(kfac_approx=approx), "kfra"),
    ):
        ext_model = run_extended(model, loss_fn, X, y, ext)
        close(getattr(ext_model[0].weight, field).to_dense(), exact, f"{name} {field} (MSE)")


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", ["2d_groups_nobias", "2d_depthwise", "3d_groups"])
def test_grouped_factors_are_the_twins(name, approx):
    """Each group's factors are those of the ungrouped twin layer (KFLR, KFRA)."""
    torch.manual_seed(0)
    factory, shape, _ = CASES[name]
    conv = factory().to(DT)
    head = _head(conv, shape, classes=3)
    grouped = nn.Sequential(conv, *copy.deepcopy(head))
    twin = nn.Sequential(slice_twin(conv, shape), *copy.deepcopy(head))
    X, y = torch.randn(3, *shape, dtype=DT), torch.tensor([0, 2, 1])
    with torch.no_grad():
        close(twin(X), grouped(X), "the twin computes the same function")
    loss_fn = nn.CrossEntropyLoss()
    for ext, field in (
        (exts.KFLR(kfac_approx=approx), "kflr"),
        (exts.KFRA(kfac_approx=approx), "kfra"),
    ):
        ours = run_extended(grouped, loss_fn, X, y, ext)
        theirs = run_extended(twin, loss_fn, X, y, ext)
        factors = getattr(ours[0].weight, field)
        assert factors.groups == conv.groups and factors.transposed
        for i, layer in enumerate(twin_layers(theirs[0])):
            G_i, A_i = getattr(layer.weight, field)
            close(factors[0][i], G_i, f"{name} {field} G group {i}")
            close(factors[1][i], A_i, f"{name} {field} A group {i}")


BP_CASES = {
    "1d": (lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1), (2, 4)),
    "2d_dilation": (lambda: nn.ConvTranspose2d(2, 2, (2, 3), stride=(1, 2), dilation=2), (2, 3, 2)),
    "3d": (lambda: nn.ConvTranspose3d(1, 2, 2, stride=(2, 1, 1), padding=(1, 0, 0)), (1, 2, 2, 2)),
}


@pytest.mark.parametrize("name", sorted(BP_CASES))
def test_against_backpack(name):
    """BackPACK's KFLR / KFRA weight factors ``[G_reduce, P * A_expand]`` for
    ``weight.transpose(0, 1)`` and its bias factors, against ours."""
    from backpack import extensions as bpx

    torch.manual_seed(0)
    factory, shape = BP_CASES[name]
    conv = factory().to(DT)
    model = nn.Sequential(conv, *_head(conv, shape, classes=3))
    X, y = torch.randn(3, *shape, dtype=DT), torch.tensor([0, 2, 1])
    loss_fn = nn.CrossEntropyLoss()
    reduce = run_extended(
        model, loss_fn, X, y, exts.KFLR(kfac_approx="reduce"), exts.KFRA(kfac_approx="reduce")
    )
    expand = run_extended(model, loss_fn, X, y, exts.KFLR(kfac_approx="expand"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BackPACK warns about its transposed layout
        theirs = run_backpack(model, loss_fn, X, y, bpx.KFLR(), bpx.KFRA())
    with torch.no_grad():
        P = conv(X).shape[2:].numel()
    for field in ("kflr", "kfra"):
        G_bp, A_bp = getattr(theirs[0].weight, field)
        close(getattr(reduce[0].weight, field)[0], G_bp, f"{name} {field} G")
        close(P * expand[0].weight.kflr[1], A_bp, f"{name} {field} A")
        close(getattr(reduce[0].bias, field)[0], getattr(theirs[0].bias, field)[0], f"{name} bias")
        # BackPACK's [G, A] is the block of weight.transpose(0, 1), our transposed layout
        ours = KroneckerFactors([G_bp, A_bp], conv.weight.shape, transposed=True).to_dense()
        perm = (
            torch.arange(conv.weight.numel()).reshape(conv.weight.shape).transpose(0, 1).flatten()
        )
        dense_t = torch.kron(G_bp, A_bp)  # in the order of weight.transpose(0, 1).flatten()
        close(ours[perm][:, perm], dense_t, f"{name} {field} layout")


def _spd(*shape: int) -> torch.Tensor:
    M = torch.randn(*shape, dtype=DT)
    return M @ M.mT + 0.1 * torch.eye(shape[-1], dtype=DT)


@pytest.mark.parametrize("groups", [1, 2])
def test_transposed_layout_matches_dense(groups):
    """``to_dense`` entry ``(W[c,o,k], W[c',o',k'])`` is ``G[o,o'] A[(c,k),(c',k')]`` within a
    group (zero across groups); ``mv`` and ``solve`` agree with it."""
    torch.manual_seed(0)
    shape = torch.Size([2 * groups, 3, 2])  # [C_in, C_out/g, k]: C_in/g = 2 per group
    G, A = _spd(groups, 3, 3), _spd(groups, 4, 4)
    kron = KroneckerFactors([G[0], A[0]] if groups == 1 else [G, A], shape, transposed=True)
    numel = shape.numel()
    dense = torch.zeros(numel, numel, dtype=DT)
    index = torch.arange(numel).reshape(shape)
    for c, o, k, c2, o2, k2 in itertools.product(*(range(n) for n in (*shape, *shape))):
        if c // 2 != c2 // 2:
            continue
        grp = c // 2
        dense[index[c, o, k], index[c2, o2, k2]] = (
            G[grp, o, o2] * A[grp, (c % 2) * 2 + k, (c2 % 2) * 2 + k2]
        )
    close(kron.to_dense(), dense, "to_dense")
    v = torch.randn(2, *shape, dtype=DT)
    close(kron.mv(v), (v.reshape(2, -1) @ dense.T).reshape(v.shape), "mv")
    system = dense + 0.3 * torch.eye(numel, dtype=DT)
    expected = torch.linalg.solve(system, v.reshape(2, -1).T).T.reshape(v.shape)
    close(kron.solve(v, 0.3), expected, "solve")
    again = pickle.loads(pickle.dumps(kron))
    assert again.transposed and again.groups == groups
    close(again.to_dense(), dense, "pickled")


@pytest.mark.parametrize("mode", ["factored", "correct"])
@pytest.mark.parametrize("groups", [1, 2])
def test_optimizer_step_against_dense(mode, groups):
    """One ``KroneckerPreconditioner`` step on a transposed convolution, against the dense
    block in ``p.flatten()`` order: ``(G kron A + lambda I)^{-1} grad`` ("correct") and the
    Kronecker product of the damped inverses ("factored")."""
    torch.manual_seed(0)
    shape = (4, 2, 3)
    conv = nn.ConvTranspose2d(4, 2 * groups, 3, stride=2, groups=groups, bias=False).to(DT)
    model = extend(nn.Sequential(conv, *_head(conv, shape, classes=3)))
    X, y = torch.randn(3, *shape, dtype=DT), torch.tensor([0, 2, 1])
    lr, damping = 0.5, 1e-2
    opt = KroneckerPreconditioner(
        [conv.weight], curvature="kflr", lr=lr, damping=damping, damping_mode=mode
    )
    with backprop(*opt.extensions):
        extend(nn.CrossEntropyLoss())(model(X), y).backward()
    factors, grad = conv.weight.kflr, conv.weight.grad.clone()
    before = conv.weight.detach().clone()
    opt.step()
    if mode == "correct":
        system = factors.to_dense() + damping * torch.eye(grad.numel(), dtype=DT)
        direction = torch.linalg.solve(system, grad.flatten())
    else:
        fs = [f if f.dim() == 3 else f.unsqueeze(0) for f in factors]
        inverses = [damped_inverses([fs[0][i], fs[1][i]], damping) for i in range(groups)]
        stacked = [torch.stack(t) for t in zip(*inverses)]
        stacked = stacked if groups > 1 else [s[0] for s in stacked]
        inv = factors.like(stacked)
        direction = inv.to_dense() @ grad.flatten()
    close(conv.weight.detach(), before - lr * direction.reshape(grad.shape), f"{mode} step")
