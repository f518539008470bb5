"""The ``backprop`` context and ``extend``: activation, nesting, clean exits (float64)."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from quantities import (
    Case,
    assert_nothing_attached,
    close,
    first_and_diag_against_plain,
    mlp,
)
from torch import nn

from hbpkit import backprop, extend
from hbpkit.extensions import (
    KFLR,
    BatchGrad,
)


@pytest.mark.parametrize("plain", ["model", "loss"])
def test_half_extended_raises(plain):
    """Extended loss, plain model: the network is invisible to hbpkit. Extended model,
    plain loss: no loss Hessian to start from."""
    case = Case(lambda: mlp("Tanh"), "ce", "mean", (3, 5))
    model = case.plain if plain == "model" else case.model
    loss_fn = case.lf_plain if plain == "loss" else case.lf
    loss = loss_fn(model(case.X), case.y)
    with pytest.raises((RuntimeError, ValueError, NotImplementedError)) as info:
        with backprop(KFLR()):
            loss.backward()
    assert str(info.value)
    assert_nothing_attached(model)


def test_nothing_extended_raises_or_computes_nothing():
    """Neither model nor loss extended: an error, or at least no (wrong) quantity."""
    case = Case(lambda: mlp("Tanh"), "ce", "mean", (3, 5))
    loss = case.lf_plain(case.plain(case.X), case.y)
    try:
        with backprop(KFLR()):
            loss.backward()
    except (RuntimeError, ValueError, NotImplementedError) as err:
        assert str(err)
    assert_nothing_attached(case.plain)


def test_context_exits_cleanly_after_exception():
    case = Case(lambda: mlp("Tanh"), "mse", "mean", (3, 5))
    with pytest.raises(KeyError):
        with backprop(KFLR(), BatchGrad()):
            raise KeyError("inside")
    # a later plain backward computes nothing extra
    case.lf(case.model(case.X), case.y).backward()
    assert_nothing_attached(case.model)
    # an exception raised by hbpkit during backward does not leave a context behind either
    bad = Case(
        lambda: nn.Sequential(nn.Linear(5, 4), Gain(), nn.Linear(4, 3)), "ce", "mean", (3, 5)
    )
    with pytest.raises(NotImplementedError):
        bad.run(KFLR())
    case.lf(case.model(case.X), case.y).backward()
    assert_nothing_attached(case.model)
    # and a new context still works
    case.run(KFLR())
    assert all(hasattr(p, "kflr") for p in case.model.parameters())


class Gain(nn.Module):
    """A parameter without rules: no Kronecker factors (KFLR refuses it)."""

    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.g


def test_nested_contexts():
    """The innermost context is the active one (as in BackPACK); leaving it restores the outer."""
    case = Case(lambda: mlp("Tanh"), "mse", "mean", (3, 5))
    with backprop(BatchGrad()):
        with backprop(KFLR()):
            case.lf(case.model(case.X), case.y).backward()
        for p in case.model.parameters():
            assert hasattr(p, "kflr") and not hasattr(p, "grad_batch")
        case.lf(case.model(case.X), case.y).backward()
    qs = case.plain_params()
    gb = ref.per_sample_grads_loop(case.plain, case.lf_plain, case.X, case.y, qs)
    for (p, _), g in zip(case.params(), gb):
        close(p.grad_batch, g, "outer context after the inner one closed")
    for p in case.model.parameters():
        del p.grad_batch, p.kflr
    case.lf(case.model(case.X), case.y).backward()
    assert_nothing_attached(case.model)


def _hook_count(model):
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {}))
        for m in model.modules()
    )


def test_extend_is_idempotent():
    case = Case(lambda: mlp("Tanh"), "ce", "mean", (3, 5))
    n_hooks = _hook_count(case.model)
    assert extend(case.model) is case.model
    assert extend(case.lf) is case.lf
    assert _hook_count(case.model) == n_hooks
    first_and_diag_against_plain(case)
    # and again, after one more extend
    extend(case.model)
    for p in case.model.parameters():
        p.grad = None
    first_and_diag_against_plain(case)


def test_no_active_extension_attaches_nothing():
    case = Case(lambda: mlp("Tanh"), "ce", "mean", (3, 5))
    case.lf(case.model(case.X), case.y).backward()
    assert_nothing_attached(case.model)
    loss = case.lf_plain(case.plain(case.X), case.y)
    for (p, _), g in zip(case.params(), torch.autograd.grad(loss, case.plain_params())):
        close(p.grad, g, "plain backward through an extended model")
