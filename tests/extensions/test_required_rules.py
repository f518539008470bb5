"""What each extension needs of the rules is checked before the backward pass (float64).

A user's rules class that lacks a rule method an active extension needs for a call
(``Extension.required_param_rules`` / ``required_message_rules`` / ``required_loss_rules``)
is refused by the pass's plan: nothing computed (no rule method called), nothing
written on any parameter, the module, the extension and the missing method named.
The same class serves every extension that does not need the method, with the
values of the complete rules.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hbpkit
from hbpkit import backprop, extend
from hbpkit.branching import Residual
from hbpkit.extensions import (
    GGNMP,
    HBP,
    HMP,
    KFLR,
    KFRA,
    BatchGrad,
    BatchL2,
    DiagGGNExact,
    DiagHessian,
    SumGradSquared,
    Variance,
)
from hbpkit.modules.base import LossRules, ModuleRules, rules_implement
from hbpkit.modules.tables import FIRST_ORDER, SECOND_ORDER

DT = torch.float64
SAVEFIELDS = ["grad_batch", "batch_l2", "sum_grad_squared", "variance", "diag_ggn_exact"]
SAVEFIELDS += ["diag_h", "kflr", "kfra", "hbp", "ggnmp", "hmp"]


def _without(rules: object, *methods: str, calls: list[str] | None = None) -> object:
    """A copy of ``rules`` whose ``methods`` are the base class's missing ones; with ``calls``,
    the copy records every parameter or message rule it runs (a computation started)."""
    base = LossRules if isinstance(rules, LossRules) else ModuleRules
    body = {m: getattr(base, m) for m in methods}
    if calls is not None:
        for m in ("jac_t_mat_prod", "jac_mat_prod", "ea_jac_t_mat_jac_prod", "param_diag"):
            if m not in methods and hasattr(type(rules), m):
                body[m] = _recording(getattr(type(rules), m), m, calls)
        for m in ("kron_from_sqrt", "kron_from_average", "batch_grad", "residual_diag"):
            if m not in methods and hasattr(type(rules), m):
                body[m] = _recording(getattr(type(rules), m), m, calls)
    cls = type(f"Without{type(rules).__name__}", (type(rules),), body)
    out = copy.copy(rules)
    out.__class__ = cls
    return out


def _recording(method, name: str, calls: list[str]):
    def wrapper(self, *args, **kwargs):
        calls.append(name)
        return method(self, *args, **kwargs)

    return wrapper


# module types served by restricted rules (registered per test: the last registration counts)
class UserLinear(nn.Linear):
    pass


class UserSigmoid(nn.Sigmoid):
    pass


class UserCrossEntropy(nn.CrossEntropyLoss):
    pass


def _register(module_type: type, rules: object, families=None) -> None:
    hbpkit.register(module_type, rules, families)


def _net(first=nn.Linear, act=nn.Sigmoid, last=nn.Linear) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(first(3, 4), act(), last(4, 2)).to(DT)


def _run(model: nn.Module, extension, loss_type: type = nn.CrossEntropyLoss) -> list:
    """``extension``'s result per parameter on a fixed batch of 5 samples."""
    model = extend(model)
    torch.manual_seed(1)
    X = torch.randn(5, 3, dtype=DT)
    loss = extend(loss_type())(model(X), torch.tensor([0, 1, 0, 1, 1]))
    with backprop(extension):
        loss.backward()
    values = []
    for p in model.parameters():
        value = getattr(p, extension.savefield)
        if callable(value):  # a curvature-matrix product: apply it to fixed directions
            g = torch.Generator().manual_seed(2)
            value = value(torch.randn(2, *p.shape, dtype=DT, generator=g))
        values.append(value)
    return values


def _same_as_full_rules(restricted: nn.Module, extension, loss_type=nn.CrossEntropyLoss) -> None:
    """The restricted model's values equal those of the same weights under the full rules."""
    full = nn.Sequential(*(_plain(m) for m in restricted)).to(DT)
    got = _run(restricted, extension, loss_type)
    expected = _run(full, extension)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)


def _plain(module: nn.Module) -> nn.Module:
    """A copy of ``module`` as its torch.nn base type (served by the built-in rules)."""
    base = next(t for t in type(module).__mro__ if t.__module__.startswith("torch.nn"))
    out = copy.deepcopy(module)
    out.__class__ = base
    return out


def _refused(model: nn.Module, extension, calls: list[str], *names: str, loss_type=None) -> str:
    """Run and expect the up-front refusal; nothing computed, nothing written."""
    model = extend(model)
    X = torch.randn(5, 3, dtype=DT)
    loss = extend((loss_type or nn.CrossEntropyLoss)())(model(X), torch.tensor([0, 1, 0, 1, 1]))
    with pytest.raises(NotImplementedError) as info, backprop(extension):
        loss.backward()
    assert calls == [], f"rules ran before the refusal: {calls}"
    message = str(info.value)
    for name in (*names, type(extension).__name__, "hbpkit.register"):
        assert name in message, message
    for p in model.parameters():
        assert not any(hasattr(p, field) for field in SAVEFIELDS)
    return message


# ------------------------------------------------------------------------------ message rules
def test_linear_without_jac_t_mat_prod():
    """The message needs ``J^T`` of every module between the loss and the first parameters."""
    calls: list[str] = []
    rules = SECOND_ORDER.lookup(nn.Linear(1, 1))
    _register(UserLinear, _without(rules, "jac_t_mat_prod", calls=calls), ("second_order",))
    for extension in (KFLR(), DiagGGNExact(), GGNMP()):
        _refused(_net(last=UserLinear), extension, calls, "UserLinear", "jac_t_mat_prod")
    # not needed: the first module (nothing to send further), or a batch-averaged message
    _same_as_full_rules(_net(first=UserLinear), KFLR())
    _same_as_full_rules(_net(first=UserLinear), DiagGGNExact())
    _same_as_full_rules(_net(last=UserLinear), KFRA())
    assert calls  # the accepted runs used the recording rules


def test_sigmoid_without_residual_diag():
    """Only curvatures with second-order module terms need the residual (eq. 7, S.9)."""
    calls: list[str] = []
    rules = SECOND_ORDER.lookup(nn.Sigmoid())
    _register(UserSigmoid, _without(rules, "residual_diag", calls=calls), ("second_order",))
    for extension, missing in [
        (DiagHessian(), "residual_factor"),
        (HMP(), "residual_mat_prod"),
        (HBP("hessian", "average", "batch-average"), "residual_sum"),
    ]:
        message = _refused(_net(act=UserSigmoid), extension, calls, "UserSigmoid", missing)
        assert "residual_diag" in message  # the method the default builds on
    for extension in (DiagGGNExact(), KFLR(), KFRA(), GGNMP()):
        _same_as_full_rules(_net(act=UserSigmoid), extension)


def test_parameter_free_module_before_any_parameter_needs_no_message_rules():
    """A module with no parameters and none towards the input passes nothing on."""
    calls: list[str] = []
    rules = SECOND_ORDER.lookup(nn.Sigmoid())
    restricted = _without(rules, "jac_t_mat_prod", "residual_diag", "ea_jac_t_mat_jac_prod")
    _register(UserSigmoid, restricted, ("second_order",))
    torch.manual_seed(0)
    model = nn.Sequential(UserSigmoid(), nn.Linear(3, 2)).to(DT)
    for extension in (DiagHessian(), KFLR(), KFRA(), HMP()):
        _same_as_full_rules(model, extension)
    _refused(_net(act=UserSigmoid), DiagHessian(), calls, "UserSigmoid", "jac_t_mat_prod")


def test_branching_average_needs_jac_t_mat_prod():
    """In a residual block the batch-averaged message also needs ``J^T`` (cross blocks)."""
    calls: list[str] = []
    rules = SECOND_ORDER.lookup(nn.Linear(1, 1))
    _register(UserLinear, _without(rules, "jac_t_mat_prod", calls=calls), ("second_order",))
    torch.manual_seed(0)
    dag = nn.Sequential(
        nn.Linear(3, 4), Residual(nn.Sequential(UserLinear(4, 4), nn.Sigmoid())), nn.Linear(4, 2)
    ).to(DT)
    _refused(dag, KFRA(), calls, "UserLinear", "jac_t_mat_prod")


# ---------------------------------------------------------------------------- parameter rules
def test_linear_without_param_diag():
    calls: list[str] = []
    rules = SECOND_ORDER.lookup(nn.Linear(1, 1))
    _register(UserLinear, _without(rules, "param_diag", calls=calls), ("second_order",))
    for model in (_net(first=UserLinear), _net(last=UserLinear)):
        _refused(model, DiagGGNExact(), calls, "UserLinear", "param_diag")
        _refused(model, DiagHessian(), calls, "UserLinear", "param_diag")
    for extension in (KFLR(), KFRA(), GGNMP()):
        _same_as_full_rules(_net(last=UserLinear), extension)


def test_first_order_statistics_build_on_batch_grad():
    """``batch_l2`` & co. have defaults from ``batch_grad``: either is enough for them."""
    calls: list[str] = []
    rules = FIRST_ORDER.lookup(nn.Linear(1, 1))
    defaults = ("batch_l2", "sum_grad_squared", "summed_grad")
    _register(UserLinear, _without(rules, "batch_grad", *defaults, calls=calls), ("first_order",))
    for extension in (BatchGrad(), BatchL2(), SumGradSquared(), Variance()):
        _refused(_net(last=UserLinear), extension, calls, "UserLinear", "batch_grad")
    only_batch_grad = _without(rules, *defaults)
    _register(UserLinear, only_batch_grad, ("first_order",))
    for extension in (BatchGrad(), BatchL2(), SumGradSquared(), Variance()):
        _same_as_full_rules(_net(last=UserLinear), extension)
    # a class with its own batch_l2 but no batch_grad: BatchL2 yes, BatchGrad no
    own_l2 = type(rules).batch_l2
    body = {"batch_grad": ModuleRules.batch_grad, "batch_l2": own_l2}
    l2_only = copy.copy(rules)
    l2_only.__class__ = type("L2Only", (type(rules),), body)
    _register(UserLinear, l2_only, ("first_order",))
    _same_as_full_rules(_net(last=UserLinear), BatchL2())
    _refused(_net(last=UserLinear), BatchGrad(), calls, "UserLinear", "batch_grad")


# --------------------------------------------------------------------------------- loss rules
def test_loss_without_hessian_mat_prod():
    calls: list[str] = []
    rules = SECOND_ORDER.lookup(nn.CrossEntropyLoss())
    _register(UserCrossEntropy, _without(rules, "hessian_mat_prod"), ("second_order",))
    for extension in (HMP(), GGNMP()):
        _refused(
            _net(),
            extension,
            calls,
            "UserCrossEntropy",
            "hessian_mat_prod",
            loss_type=UserCrossEntropy,
        )
    _same_as_full_rules(_net(), KFLR(), UserCrossEntropy)
    _same_as_full_rules(_net(), DiagHessian(), UserCrossEntropy)


def test_loss_without_sqrt_hessian():
    calls: list[str] = []
    rules = SECOND_ORDER.lookup(nn.CrossEntropyLoss())
    _register(UserCrossEntropy, _without(rules, "sqrt_hessian"), ("second_order",))
    for extension in (KFLR(), DiagGGNExact(), DiagHessian()):
        _refused(
            _net(), extension, calls, "UserCrossEntropy", "sqrt_hessian", loss_type=UserCrossEntropy
        )
    _same_as_full_rules(_net(), KFRA(), UserCrossEntropy)
    _same_as_full_rules(_net(), HMP(), UserCrossEntropy)


# -------------------------------------------------------------------------------- the API
def test_required_rules_follow_the_flags():
    linear = SECOND_ORDER.lookup(nn.Linear(1, 1))
    sigmoid = SECOND_ORDER.lookup(nn.Sigmoid())
    assert KFLR().required_rules(linear) == ["kron_from_sqrt", "jac_t_mat_prod"]
    assert KFLR().required_rules(linear, messages=False) == ["kron_from_sqrt"]
    assert DiagHessian().required_rules(sigmoid, params=False) == [
        "jac_t_mat_prod",
        "residual_factor",
    ]
    assert DiagGGNExact().required_message_rules(sigmoid) == ["jac_t_mat_prod"]
    assert KFRA().required_message_rules(linear, branching=True) == [
        "ea_jac_t_mat_jac_prod",
        "jac_t_mat_prod",
    ]
    assert BatchGrad().required_rules(linear) == ["batch_grad"]
    assert BatchGrad().required_loss_rules() == []
    assert KFRA().required_loss_rules() == ["sum_hessian"]
    for extension in (KFLR(), DiagHessian(), KFRA(), HMP(), BatchL2(), Variance()):
        for rules in (linear, sigmoid):
            needed = extension.required_rules(rules, params=rules is linear)
            assert all(rules_implement(rules, m) for m in needed), (extension, rules)
