"""First-order quantities keep their graph under ``create_graph=True``: values and derivatives
against per-sample autograd (``torch.func.grad`` under ``vmap``, differentiable itself),
``gradcheck`` / ``gradgradcheck`` against finite differences, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from hbpkit import backprop, extend
from hbpkit.extensions import BatchGrad, BatchL2, DiagGGNExact, SumGradSquared, Variance

N = 3


class Gate(nn.Module):
    """A module without rules (the generic path), nonlinear in its parameters."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))
        self.b = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.w.square() + torch.sin(self.b)


def _model(name: str):
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
        X, loss_fn = torch.randn(N, 3), nn.CrossEntropyLoss()
        y = torch.randint(0, 2, (N,))
    elif name == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Sigmoid(), nn.Flatten(), nn.Linear(8, 2))
        X, loss_fn = torch.randn(N, 1, 3, 3), nn.MSELoss(reduction="sum")
        y = torch.randn(N, 2)
    else:  # through the generic path
        model = nn.Sequential(nn.Linear(3, 2), Gate(2), nn.Tanh(), nn.Linear(2, 2))
        X, loss_fn = torch.randn(N, 3), nn.MSELoss()
        y = torch.randn(N, 2)
    model = extend(model.double())
    y = y.double() if y.is_floating_point() else y
    return model, extend(loss_fn), X.double(), y


def _slots(model):
    return [(m, n) for m in model.modules() for n, p in m._parameters.items() if p is not None]


def _quantities(model, loss_fn, y, use_grad: bool):
    """``(X, *theta) -> every first-order quantity of every parameter``, with ``theta``
    placed into the model (so gradcheck perturbs the parameters too)."""
    slots = _slots(model)
    extensions = (BatchGrad(), BatchL2(), SumGradSquared(), Variance())

    def f(X, *theta):
        for (module, name), t in zip(slots, theta):
            module._parameters[name] = t
        with backprop(*extensions):
            loss = loss_fn(model(X), y)
            if use_grad:
                torch.autograd.grad(loss, theta, create_graph=True)
            else:
                loss.backward(create_graph=True, inputs=list(theta))
        out = []
        for t in theta:
            out += [t.grad_batch, t.batch_l2, t.sum_grad_squared, t.variance]
        return tuple(out)

    return f


def _reference(model, loss_fn, y):
    """The same quantities from per-sample autograd (create-graph semantics of torch.func)."""
    slots = _slots(model)
    names = [n for n, _ in model.named_parameters()]
    scale = 1 / N if loss_fn.reduction == "mean" else 1.0

    def f(X, *theta):
        params = dict(zip(names, theta))

        def loss_n(p, x, t):
            return loss_fn(functional_call(model, p, (x[None],)), t[None]) * scale

        grads = vmap(grad(loss_n), in_dims=(None, 0, 0))(params, X, y)
        out = []
        for n in names:
            g = grads[n]
            out += [
                g,
                g.flatten(1).square().sum(1),
                g.square().sum(0),
                g.square().sum(0) / N - (g.sum(0) / N).square(),
            ]
        return tuple(out)

    assert len(slots) == len(names)
    return f


def _inputs(model, X):
    theta = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    return (X.clone().requires_grad_(True), *theta)


@pytest.mark.parametrize("use_grad", [False, True], ids=["backward", "autograd.grad"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "generic"])
def test_values_and_derivatives_equal_per_sample_autograd(name, use_grad):
    model, loss_fn, X, y = _model(name)
    ours = _quantities(model, loss_fn, y, use_grad)(*_inputs(model, X))
    inputs = _inputs(model, X)
    expected = _reference(model, loss_fn, y)(*inputs)
    assert len(ours) == len(expected)
    weights = [torch.randn_like(e) for e in expected]
    for a, e in zip(ours, expected):
        torch.testing.assert_close(a, e)
        assert a.requires_grad
    # d <w, q> / d(X, theta) through hbpkit's graph equals the reference's
    ours_inputs = _inputs(model, X)
    ours = _quantities(model, loss_fn, y, use_grad)(*ours_inputs)
    ours_grad = torch.autograd.grad(
        sum((w * q).sum() for w, q in zip(weights, ours)), ours_inputs, allow_unused=True
    )
    ref_grad = torch.autograd.grad(
        sum((w * q).sum() for w, q in zip(weights, expected)), inputs, allow_unused=True
    )
    for a, e in zip(ours_grad, ref_grad):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("name", ["mlp", "cnn", "generic"])
def test_gradcheck_and_gradgradcheck(name):
    model, loss_fn, X, y = _model(name)
    f = _quantities(model, loss_fn, y, use_grad=True)
    inputs = _inputs(model, X)
    assert torch.autograd.gradcheck(f, inputs)
    if name != "cnn":  # the slowest; its first derivatives are checked above
        assert torch.autograd.gradgradcheck(f, inputs)


def test_without_create_graph_nothing_keeps_a_graph():
    model, loss_fn, X, y = _model("mlp")
    with backprop(BatchGrad(), Variance(), DiagGGNExact()):
        loss_fn(model(X.requires_grad_(True)), y).backward()
    for p in model.parameters():
        assert not p.grad_batch.requires_grad and not p.variance.requires_grad


def test_diagonals_are_not_differentiable_but_unchanged():
    model, loss_fn, X, y = _model("mlp")
    with backprop(DiagGGNExact()):
        loss_fn(model(X), y).backward()
    plain = [p.diag_ggn_exact for p in model.parameters()]
    with backprop(DiagGGNExact(), BatchGrad()):
        loss_fn(model(X), y).backward(create_graph=True)
    for p, d in zip(model.parameters(), plain):
        torch.testing.assert_close(p.diag_ggn_exact, d)
        assert not p.diag_ggn_exact.requires_grad and p.grad_batch.requires_grad
        p.grad = None  # break the parameter <-> gradient cycle of create_graph


def test_tied_weights_keep_their_graph():
    torch.manual_seed(1)
    lin = nn.Linear(3, 3).double()
    model = extend(nn.Sequential(lin, nn.Tanh(), lin))
    loss_fn = extend(nn.MSELoss())
    X, y = torch.randn(N, 3, dtype=torch.float64), torch.randn(N, 3, dtype=torch.float64)
    with backprop(BatchGrad()):
        loss = loss_fn(model(X), y)
        torch.autograd.grad(loss, [lin.weight], create_graph=True)

    def loss_n(W, b, x, t):  # written out: functional_call does not restore tied parameters
        z = nn.functional.linear(torch.tanh(nn.functional.linear(x, W, b)), W, b)
        return nn.functional.mse_loss(z, t) / N

    ref = vmap(grad(loss_n), in_dims=(None, None, 0, 0))(lin.weight, lin.bias, X, y)
    torch.testing.assert_close(lin.weight.grad_batch, ref)
    (g_ours,) = torch.autograd.grad(lin.weight.grad_batch.square().sum(), lin.weight)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), lin.weight)
    torch.testing.assert_close(g_ours, g_ref)


def test_batch_norm_in_training_mode_is_refused_before_anything_is_written():
    torch.manual_seed(2)
    model = extend(nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2)).double())  # supported first
    loss_fn = extend(nn.CrossEntropyLoss())
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    with backprop(BatchGrad()):  # without a graph, BackPACK's per-sample gradients
        loss_fn(model(X), y).backward()
    for p in model.parameters():
        del p.grad_batch
    with pytest.raises(NotImplementedError, match="batch norm in training mode"):
        with backprop(BatchGrad()):
            loss_fn(model(X), y).backward(create_graph=True)
    assert not any(hasattr(p, "grad_batch") for p in model.parameters())
    for p in model.parameters():
        p.grad = None
    model.eval()
    with backprop(BatchGrad()):
        loss = loss_fn(model(X), y)
        torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    assert all(p.grad_batch.requires_grad for p in model.parameters())


def test_weight_sharing_over_positions_keeps_its_graph():
    """Linear on ``[N, T, D]``: every sample's gradient sums over its positions."""
    torch.manual_seed(3)
    model = extend(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(8, 2)))
    model = model.double()
    loss_fn = extend(nn.CrossEntropyLoss())
    X, y = torch.randn(N, 2, 3, dtype=torch.float64), torch.randint(0, 2, (N,))
    f = _quantities(model, loss_fn, y, use_grad=True)
    inputs = _inputs(model, X)
    ours = f(*inputs)
    expected = _reference(model, loss_fn, y)(*_inputs(model, X))
    for a, e in zip(ours, expected):
        torch.testing.assert_close(a, e)
    assert torch.autograd.gradcheck(f, inputs)
