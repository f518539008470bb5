"""The framework: extend(), backprop(), dispatch, graph checks, error paths, lifetimes."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from torch import nn

import hbpkit
from hbpkit import backprop, extend
from hbpkit.engine.context import current
from hbpkit.extensions import KFLR, BatchGrad, DiagGGNExact, DiagHessian
from hbpkit.modules import ElementwiseRules

SAVEFIELDS = ["grad_batch", "diag_ggn_exact", "diag_h", "kflr"]


def _mlp(act: nn.Module | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    act = nn.Sigmoid() if act is None else act
    return nn.Sequential(nn.Linear(4, 5), act, nn.Linear(5, 3)).double()


def _data(n: int = 4):
    torch.manual_seed(1)
    return torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))


def _run(model, loss_fn, *extensions, data=None):
    X, y = _data() if data is None else data
    loss = loss_fn(model(X), y)
    with backprop(*extensions):
        loss.backward()
    return model


def _attached(model: nn.Module) -> set[str]:
    return {f for p in model.parameters() for f in SAVEFIELDS if hasattr(p, f)}


def test_extend_is_idempotent_and_returns_module():
    model = _mlp()
    assert extend(model) is model
    extend(model)
    assert all(len(m._forward_hooks) == 1 for m in model)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        extend(lambda x: x)


def test_nothing_computed_or_attached_without_context():
    model, loss_fn = extend(_mlp()), extend(nn.CrossEntropyLoss())
    X, y = _data()
    loss_fn(model(X), y).backward()
    assert _attached(model) == set()
    assert current() is None


def test_forward_data_released_after_plain_backward():
    """The records keep nothing alive beyond the first backward pass."""
    model, loss_fn = extend(_mlp()), extend(nn.CrossEntropyLoss())
    refs = []
    handle = model[0].register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
    X, y = _data()
    loss = loss_fn(model(X), y)
    handle.remove()
    assert refs[0]() is not None  # still needed by the graph
    loss.backward()
    assert refs[0]() is None  # released although `loss` is still alive


def test_context_leaves_no_state_after_exception_and_nesting():
    with pytest.raises(ZeroDivisionError):
        with backprop(KFLR()):
            raise ZeroDivisionError
    assert current() is None
    outer = backprop(KFLR())
    with outer:
        with backprop(BatchGrad()) as inner:
            assert current().extensions is inner.extensions
        assert current().extensions is outer.extensions
    assert current() is None


def test_nested_context_uses_innermost_extensions():
    model, loss_fn = extend(_mlp()), extend(nn.CrossEntropyLoss())
    X, y = _data()
    loss = loss_fn(model(X), y)
    with backprop(KFLR()):
        with backprop(BatchGrad()):
            loss.backward()
    assert _attached(model) == {"grad_batch"}


def test_backprop_rejects_bad_arguments():
    with pytest.raises(TypeError, match="instantiate"):
        backprop(KFLR)
    with pytest.raises(ValueError, match="savefield"):
        backprop(KFLR(), KFLR())


def test_inplace_activation_gives_same_result():
    reference = _run(extend(_mlp(nn.ReLU())), extend(nn.CrossEntropyLoss()), DiagGGNExact())
    inplace = _run(
        extend(_mlp(nn.ReLU(inplace=True))), extend(nn.CrossEntropyLoss()), DiagGGNExact()
    )
    for p, q in zip(reference.parameters(), inplace.parameters()):
        torch.testing.assert_close(p.diag_ggn_exact, q.diag_ggn_exact)


def test_dispatch_respects_subclasses():
    class MyLinear(nn.Linear):
        pass

    model = _mlp()
    sub = copy.deepcopy(model)
    sub[2] = MyLinear(5, 3).double()
    sub[2].load_state_dict(model[2].state_dict())
    _run(extend(model), extend(nn.CrossEntropyLoss()), KFLR())
    _run(extend(sub), extend(nn.CrossEntropyLoss()), KFLR())
    for p, q in zip(model.parameters(), sub.parameters()):
        for a, b in zip(p.kflr, q.kflr):
            torch.testing.assert_close(a, b)


class Cube(nn.Module):
    """A user's own elementwise module, ``x**3``."""

    def forward(self, x):
        return x**3


def test_register_custom_module_matches_autograd():
    hbpkit.register(Cube, ElementwiseRules())
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(3, 2), Cube(), nn.Linear(2, 2)).double())
    loss_fn = extend(nn.MSELoss())
    X, y = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    loss = loss_fn(model(X), y)
    with backprop(DiagHessian()):
        loss.backward()
    W = model[0].weight
    hessian = torch.autograd.functional.hessian(
        lambda w: nn.functional.mse_loss(model[2]((X @ w.T + model[0].bias) ** 3), y),
        W.detach(),
    )
    torch.testing.assert_close(W.diag_h, torch.diagonal(hessian.reshape(6, 6)).reshape(2, 3))


class Gain(nn.Module):
    """A parameter without rules: the generic path, no Kronecker factors."""

    def __init__(self, d: int = 3):
        super().__init__()
        self.g = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.g


def test_refused_extension_raises_before_writing():
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 3), Gain(), nn.Linear(3, 3)).double())
    with pytest.raises(NotImplementedError, match=r"Gain '1' has no rules of its own.*KFLR"):
        _run(model, extend(nn.CrossEntropyLoss()), BatchGrad(), KFLR())
    assert _attached(model) == set()
    _run(model, extend(nn.CrossEntropyLoss()), BatchGrad())  # the generic path
    assert _attached(model) == {"grad_batch"}


def test_errors_name_the_module_path():
    """Errors name the module by its path in the model given to ``extend``, not only its type."""
    encoder = nn.Sequential(nn.Linear(4, 3), Gain())
    model = extend(nn.Sequential(nn.ModuleDict({"encoder": encoder}), nn.Linear(3, 3)).double())

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            return self.body[1](self.body[0]["encoder"](x))

    with pytest.raises(NotImplementedError, match=r"Gain '0.encoder.1' has no rules"):
        _run(Net(), extend(nn.CrossEntropyLoss()), KFLR())
    assert _attached(model) == set()


class FunctionalSigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(x)))


def test_untracked_operation_is_refused_for_the_hessian():
    """A functional operation between modules (``extend()`` alone) carries the GGN
    (tests/engine/test_recorded_ops.py), not the residual that the Hessian needs."""
    model = extend(FunctionalSigmoid().double())
    with pytest.raises(NotImplementedError, match="SigmoidBackward0.*hbpkit.convert"):
        _run(model, extend(nn.CrossEntropyLoss()), DiagHessian())
    assert _attached(model) == set()
    _run(model, extend(nn.CrossEntropyLoss()), BatchGrad())
    assert _attached(model) == {"grad_batch"}


def test_loss_not_extended():
    model = extend(_mlp())
    with pytest.raises(RuntimeError, match="extended loss"):
        _run(model, nn.CrossEntropyLoss(), KFLR())
    _run(model, nn.CrossEntropyLoss(), BatchGrad())
    assert _attached(model) == {"grad_batch"}


def test_scaled_loss_scales_the_curvature():
    """``(2 * loss).backward()``: the loss's curvature is that of ``2 * loss``."""
    model, loss_fn = extend(_mlp()), extend(nn.CrossEntropyLoss())
    X, y = _data()
    with backprop(KFLR()):
        loss_fn(model(X), y).backward()
    once = [p.kflr for p in model.parameters()]
    with backprop(KFLR()):
        (2 * loss_fn(model(X), y)).backward()
    for p, factors in zip(model.parameters(), once):
        torch.testing.assert_close(p.kflr[0], 2 * factors[0], rtol=1e-12, atol=1e-14)
        for a, b in zip(p.kflr[1:], factors[1:]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_shared_module_and_functional_branching_are_refused():
    """A shared module's Hessian needs its uses' mixed terms: refused; a branch merged by a
    functional ``+`` is exact."""
    lin = nn.Linear(3, 3).double()
    shared = extend(nn.Sequential(lin, nn.Tanh(), lin))
    X, y = torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1])
    with pytest.raises(NotImplementedError, match="used 2 times"):
        _run(shared, extend(nn.CrossEntropyLoss()), DiagHessian(), data=(X, y))

    class Branch(nn.Module):
        def __init__(self, live: bool):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 3), nn.Tanh(), nn.Sigmoid()
            self.live = live

        def forward(self, x):
            h = self.a(x)
            side = self.c(h)  # a second consumer of h
            return self.b(h) + side if self.live else self.b(h)

    # the functional + goes through the recorded graph (tests/engine/test_recorded_ops.py):
    # the same factors as with the addition as a module
    torch.manual_seed(0)
    live = Branch(True).double()
    converted = hbpkit.convert(copy.deepcopy(live))
    _run(extend(live), extend(nn.CrossEntropyLoss()), KFLR(), data=(X, y))
    _run(extend(converted), extend(nn.CrossEntropyLoss()), KFLR(), data=(X, y))
    for p, q in zip(live.parameters(), converted.parameters()):
        for a, b in zip(p.kflr, q.kflr):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # a dead branch does not feed the loss: the chain a -> b is all there is
    dead = _run(extend(Branch(False).double()), extend(nn.CrossEntropyLoss()), KFLR(), data=(X, y))
    kflr = [p.kflr for p in dead.parameters()]
    for p in dead.parameters():
        del p.kflr
    chain = _run(
        extend(nn.Sequential(dead.a, dead.b)), extend(nn.CrossEntropyLoss()), KFLR(), data=(X, y)
    )
    for factors, p in zip(kflr, chain.parameters()):
        for a, b in zip(factors, p.kflr):
            torch.testing.assert_close(a, b)


def test_frozen_parameter_gets_nothing():
    model = extend(_mlp())
    model[0].bias.requires_grad_(False)
    _run(model, extend(nn.CrossEntropyLoss()), KFLR(), BatchGrad())
    assert not hasattr(model[0].bias, "kflr") and not hasattr(model[0].bias, "grad_batch")
    assert hasattr(model[0].weight, "kflr") and hasattr(model[0].weight, "grad_batch")


def test_second_backward_through_retained_graph_is_refused():
    model, loss_fn = extend(_mlp()), extend(nn.CrossEntropyLoss())
    X, y = _data()
    loss = loss_fn(model(X), y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already used"):
        with backprop(KFLR()):
            loss.backward()


@pytest.mark.parametrize("active", [False, True], ids=["plain", "in_context"])
def test_double_and_triple_backward(active):
    """Extended models stay differentiable to higher order, with or without extensions."""
    plain = _mlp()
    model, loss_fn = extend(copy.deepcopy(plain)), extend(nn.CrossEntropyLoss())
    X, y = _data()
    v = [torch.randn_like(p) for p in plain.parameters()]

    def third_order(net, loss_fn, context):
        params = list(net.parameters())
        loss = loss_fn(net(X), y)
        with context:
            grads = torch.autograd.grad(loss, params, create_graph=True)
        gv = sum((g * u).sum() for g, u in zip(grads, v))
        hv = torch.autograd.grad(gv, params, create_graph=True)
        hvv = sum((h * u).sum() for h, u in zip(hv, v))
        return hv, torch.autograd.grad(hvv, params)

    context = backprop(DiagGGNExact()) if active else backprop()
    hv, tv = third_order(model, loss_fn, context)
    hv_ref, tv_ref = third_order(plain, nn.CrossEntropyLoss(), backprop())
    for a, b in zip(hv + tv, hv_ref + tv_ref):
        torch.testing.assert_close(a, b)
    assert ("diag_ggn_exact" in _attached(model)) == active
