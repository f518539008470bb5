"""Curvature of a part of the model: ``backprop(..., modules=[...])`` computes the quantities of
the selected modules only, exact, without running the curvature backward below them."""

from __future__ import annotations

import inspect

import pytest
import reference as ref
import torch
from torch import nn

from hbpkit import backprop, extend
from hbpkit.core.calls import ModuleCall
from hbpkit.extensions import GGNMP, KFAC, KFLR, KFRA, BatchGrad, DiagGGNExact, DiagHessian
from hbpkit.modules.tables import SECOND_ORDER

FIELDS = ("kflr", "diag_ggn_exact", "diag_h", "kfra", "grad_batch")


def _extensions():
    return (KFLR(), DiagGGNExact(), DiagHessian(), KFRA(), BatchGrad())


class Gate(nn.Module):
    """A module hbpkit has no rules for (no Kronecker factors on the generic path)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.w.square()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), Gate(5), nn.Linear(5, 5), nn.Sigmoid(), nn.Linear(5, 3)
    ).double()


def _data():
    torch.manual_seed(1)
    return torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))


def _dense(value):
    return value.to_dense() if isinstance(value, tuple) else value


def test_selected_blocks_equal_brute_force_and_the_rest_gets_grad_only():
    X, y = _data()
    model, loss_fn = extend(_model()), extend(nn.CrossEntropyLoss())
    with pytest.raises(NotImplementedError, match="Gate"):  # everything: KFLR refuses Gate
        with backprop(*_extensions()):
            loss_fn(model(X), y).backward()
    model.zero_grad()
    with backprop(*_extensions(), modules=[model[3], model[5]]):
        loss_fn(model(X), y).backward()
    # brute force on the chosen blocks (tests/reference.py)
    out = model(X)
    params = [model[3].weight, model[3].bias, model[5].weight, model[5].bias]
    G = ref.blocks(ref.ggn(out, loss_fn, y, params), params)
    H = ref.blocks(ref.hessian(loss_fn(out, y), params), params)
    grads = ref.per_sample_grads_loop(model, loss_fn, X, y, params)
    for i, p in enumerate(params):
        torch.testing.assert_close(p.diag_ggn_exact.flatten(), G[i].diagonal())
        torch.testing.assert_close(p.diag_h.flatten(), H[i].diagonal())
        torch.testing.assert_close(p.grad_batch, grads[i])
    factors = ref.kron_factors_sqrt(model, loss_fn, X, y)  # KFLR by definition
    for p in params:
        for ours, expected in zip(p.kflr, factors[p]):
            torch.testing.assert_close(ours, expected)
    for p in (*model[0].parameters(), *model[2].parameters()):
        assert p.grad is not None
        assert not any(hasattr(p, f) for f in FIELDS)


def test_equal_to_the_whole_models_quantities_where_both_exist():
    X, y = _data()
    loss_fn = extend(nn.CrossEntropyLoss())
    full = extend(_model())
    full[2] = nn.Identity()  # a model the whole-model pass supports
    with backprop(*_extensions()):
        loss_fn(full(X), y).backward()
    part = extend(_model())
    part[2] = nn.Identity()
    with backprop(*_extensions(), modules=[part[3], part[4], part[5]]):  # Sigmoid: no params
        loss_fn(part(X), y).backward()
    for a, b in zip(part[3:].parameters(), full[3:].parameters()):
        for field in FIELDS:
            torch.testing.assert_close(_dense(getattr(a, field)), _dense(getattr(b, field)))


def test_modules_below_need_no_rules_nor_extend():
    X, y = _data()
    model, loss_fn = _model(), extend(nn.CrossEntropyLoss())
    extend(model[5])  # only the head
    with pytest.raises(NotImplementedError, match="comes from SigmoidBackward0"):
        with backprop(KFAC()):
            loss_fn(model(X), y).backward()
    model.zero_grad()
    with backprop(KFLR(), GGNMP(), BatchGrad(), modules=model[5]):
        loss_fn(model(X), y).backward()
    out = model(X)
    params = list(model[5].parameters())
    G = ref.blocks(ref.ggn(out, loss_fn, y, params), params)
    torch.testing.assert_close(model[5].bias.kflr.to_dense(), G[1])  # exact for a bias
    V = torch.randn(2, *model[5].weight.shape, dtype=torch.float64)
    torch.testing.assert_close(model[5].weight.ggnmp(V).reshape(2, -1), V.reshape(2, -1) @ G[0])
    assert all(p.grad is not None for p in model.parameters())


def _spy(monkeypatch, modules):
    """Record the module of every rule method called with a :class:`ModuleCall`."""
    seen = []
    classes = {type(SECOND_ORDER.lookup(m)) for m in modules} - {type(None)}
    for cls in classes:
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            if name.startswith("__"):
                continue

            def wrapper(self, *args, _fn=fn, **kwargs):
                if args and isinstance(args[0], ModuleCall):
                    seen.append(args[0].module)
                return _fn(self, *args, **kwargs)

            monkeypatch.setattr(cls, name, wrapper)
    return seen


@pytest.mark.parametrize("extension", [KFLR(), KFRA(), DiagHessian(), GGNMP()], ids=repr)
def test_nothing_is_computed_below_the_selection(monkeypatch, extension):
    X, y = _data()
    model = _model()
    model[2] = nn.Identity()
    model, loss_fn = extend(model), extend(nn.CrossEntropyLoss())
    seen = _spy(monkeypatch, list(model))
    with backprop(extension, modules=[model[5]]):
        loss_fn(model(X), y).backward()
    below = {id(m) for m in model[:5]}
    assert seen and not [m for m in seen if id(m) in below]
    assert hasattr(model[5].weight, extension.savefield)
    seen.clear()
    with backprop(extension, modules=[model[3]]):  # the curvature passes through the head
        loss_fn(model(X), y).backward()
    touched = {id(m) for m in seen}
    assert id(model[5]) in touched and id(model[4]) in touched
    assert not touched & {id(m) for m in model[:3]}
    assert hasattr(model[3].weight, extension.savefield)


def test_selection_errors():
    X, y = _data()
    model, loss_fn = extend(_model()), extend(nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match="expects nn.Module instances"):
        backprop(KFLR(), modules=[model[5].weight])
    with pytest.raises(TypeError, match="an nn.Module or an iterable"):
        backprop(KFLR(), modules=3)
    with pytest.raises(ValueError, match="selects no module"):
        backprop(KFLR(), modules=[])
    other = extend(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="none of the modules given"):
        with backprop(KFLR(), modules=[other]):
            loss_fn(model(X), y).backward()
    assert not hasattr(model[5].weight, "kflr")
    # the selected head feeds the loss through functional code that couples the samples
    with pytest.raises(NotImplementedError, match="couples the samples"):
        with backprop(KFLR(), modules=[model[5]]):
            out = model(X)
            loss_fn(out - out.mean(0), y).backward()
    assert not hasattr(model[5].weight, "kflr")
