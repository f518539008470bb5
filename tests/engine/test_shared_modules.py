"""A parameter-free module called several times in one forward pass (issue 15, item 3).

torchvision's ResNets reuse one ``self.relu``; pools and activations are often shared.
Each call of an extended module is its own record (its own input, output and captured
state), so sharing a parameter-free module changes nothing: every quantity must equal
the one of the same model with a separate copy of the module per call, and the
first-order and diagonal quantities must equal their autograd definitions. A module
*with* parameters called twice (tied weights) is still refused before the pass.
"""

from __future__ import annotations

import copy

import pytest
import torch
from quantities import ALL_EXTENSIONS, DT, Case, first_and_diag_against_plain
from torch import nn

import hbpkit
import hbpkit.extensions as exts
from hbpkit import backprop, extend
from hbpkit.branching import Residual

PRODUCTS = (exts.GGNMP, exts.HMP)


def shared_mlp(act: type[nn.Module]) -> nn.Sequential:
    """Three Linear layers with ONE activation instance between them (called twice)."""
    f = act()
    return nn.Sequential(nn.Linear(5, 4), f, nn.Linear(4, 4), f, nn.Linear(4, 3))


def shared_residual(act: type[nn.Module]) -> nn.Sequential:
    """A residual block whose branch and whose output share one activation (ResNet style)."""
    f = act()
    return nn.Sequential(
        nn.Linear(5, 4),
        f,
        Residual(nn.Sequential(nn.Linear(4, 4), f, nn.Linear(4, 4))),
        f,
        nn.Linear(4, 3),
    )


class FunctionalStyle(nn.Module):
    """``self.act`` used twice in ``forward``, as torchvision writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.act = nn.Tanh()

    def forward(self, x):
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def unshared(model: nn.Module) -> nn.Module:
    """A deep copy in which every module appears once (shared instances duplicated)."""
    copied = copy.deepcopy(model)
    seen: set[int] = set()
    for name, module in list(copied.named_modules(remove_duplicate=False)):
        if id(module) in seen:
            parent, _, attr = name.rpartition(".")
            setattr(copied.get_submodule(parent), attr, copy.deepcopy(module))
        seen.add(id(module))
    return copied


def _quantities(model, X, y, extension) -> list:
    model = extend(model)
    loss = extend(nn.CrossEntropyLoss())(model(X), y)
    with backprop(extension):
        loss.backward()
    return [getattr(p, extension.savefield) for p in model.parameters()]


def _assert_same(a, b, V=None):
    if callable(a):
        torch.testing.assert_close(a(V), b(V), rtol=1e-12, atol=1e-14)
    elif isinstance(a, (tuple, list)):
        for x, z in zip(a, b):
            torch.testing.assert_close(x, z, rtol=1e-12, atol=1e-14)
    else:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("build", [shared_mlp, shared_residual], ids=["chain", "residual"])
@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid, nn.ReLU])
@pytest.mark.parametrize("make", [*ALL_EXTENSIONS, *PRODUCTS], ids=lambda m: repr(m())[:20])
def test_shared_equals_unshared(build, act, make):
    """Every quantity of the shared model equals that of the model with one copy per call."""
    torch.manual_seed(0)
    model = build(act).double()
    twin = unshared(model)
    assert sum(1 for _ in twin.modules()) > sum(1 for _ in model.modules())
    X, y = torch.randn(6, 5, dtype=DT), torch.randint(0, 3, (6,))
    torch.manual_seed(1)  # the same Monte-Carlo draws for both
    shared = _quantities(model, X, y, make())
    torch.manual_seed(1)
    separate = _quantities(twin, X, y, make())
    for p, a, b in zip(model.parameters(), shared, separate):
        _assert_same(a, b, torch.randn(2, *p.shape, dtype=DT))


@pytest.mark.parametrize("build", [shared_mlp, shared_residual], ids=["chain", "residual"])
def test_shared_against_autograd(build):
    """Per-sample gradients, their statistics and the exact diagonals against autograd."""
    case = Case(lambda: build(nn.Tanh), "ce", "mean", (6, 5))
    first_and_diag_against_plain(case)


def test_torchvision_style_module_reused_in_forward():
    """``self.act`` called twice: works with ``extend()`` alone and after ``convert``."""
    torch.manual_seed(0)
    model = FunctionalStyle().double()
    X, y = torch.randn(6, 5, dtype=DT), torch.randint(0, 3, (6,))
    expected = _quantities(unshared_functional(model), X, y, exts.KFLR())
    for candidate in (copy.deepcopy(model), hbpkit.convert(copy.deepcopy(model))):
        got = _quantities(candidate, X, y, exts.KFLR())
        for a, b in zip(got, expected):
            _assert_same(a, b)


def unshared_functional(model: FunctionalStyle) -> nn.Module:
    """The same function as a Sequential with one activation per call."""
    return nn.Sequential(model.fc1, nn.Tanh(), model.fc2, nn.Tanh(), model.fc3)


def test_shared_module_with_parameters_is_still_refused():
    """Tied weights are refused before anything is written (issue 15 will support them)."""
    lin = nn.Linear(3, 3).double()
    model = extend(nn.Sequential(lin, nn.Tanh(), lin))
    X, y = torch.randn(2, 3, dtype=DT), torch.tensor([0, 1])
    loss = extend(nn.CrossEntropyLoss())(model(X), y)
    with pytest.raises(NotImplementedError, match="called 2 times.*parameters shared"):
        with backprop(exts.BatchGrad()):
            loss.backward()
    assert not hasattr(lin.weight, "grad_batch")
