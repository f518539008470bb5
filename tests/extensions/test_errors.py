"""Error paths of the extensions: unsupported modules, losses and options (float64).

Every refusal raises before anything is written on a parameter, and names the module
and the extension; what is not refused is correct (checked against :mod:`reference`).
"""

from __future__ import annotations

import copy

import pytest
import reference as ref
import torch
from quantities import (
    ALL_EXTENSIONS,
    DT,
    SAVEFIELDS,
    Case,
    assert_nothing_attached,
    close,
    mlp,
)
from torch import nn

from hbpkit import backprop, extend
from hbpkit.extensions import (
    GGNMP,
    HBP,
    KFAC,
    KFLR,
    DiagGGNExact,
    DiagGGNMC,
)
from hbpkit.reshaping import ReducedLoss

SECOND_ORDER = ALL_EXTENSIONS[4:]
FIRST_ORDER = ALL_EXTENSIONS[:4]


def _ext_id(e):
    return "HBP" if not isinstance(e, type) else e.__name__


class Cube(nn.Module):
    """A parameter-free module hbpkit has no rules for."""

    def forward(self, x):
        return x**3


class Scale(nn.Module):
    """A module with a parameter of its own that hbpkit has no rules for."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        return x * self.scale


UNSUPPORTED = {"Softmax": lambda: nn.Softmax(dim=1), "Cube": Cube, "Scale": Scale}


def unsupported_in_the_middle(name):
    return lambda: nn.Sequential(nn.Linear(5, 4), UNSUPPORTED[name](), nn.Linear(4, 3))


def check_names(err, module_name, ext):
    msg = str(err)
    assert module_name in msg and type(ext).__name__ in msg, msg


KRONECKER = [e for e in SECOND_ORDER if _ext_id(e) in ("KFAC", "KFLR", "KFRA", "HBP")]


@pytest.mark.parametrize("ext", KRONECKER, ids=_ext_id)
def test_kronecker_factors_of_a_module_without_rules_are_refused(ext):
    """Scale has a parameter and no rules: the generic path gives every quantity but
    Kronecker factors, which are refused before anything is written."""
    ext = ext()
    case = Case(unsupported_in_the_middle("Scale"), "ce", "mean", (3, 5))
    with pytest.raises(NotImplementedError) as info:
        case.run(ext)
    check_names(info.value, "Scale", ext)
    assert "kron" in str(info.value)
    assert_nothing_attached(case.model)


@pytest.mark.parametrize("ext", FIRST_ORDER, ids=_ext_id)
def test_module_with_parameters_without_rules_first_order_is_exact(ext):
    """Scale's own parameter gets its per-sample gradients from the generic path."""
    ext = ext()
    case = Case(unsupported_in_the_middle("Scale"), "ce", "mean", (3, 5))
    case.run(ext)
    _check_first_order(case, ext, "through Scale")


@pytest.mark.parametrize("module", ["Softmax", "Cube"])
@pytest.mark.parametrize("ext", FIRST_ORDER, ids=_ext_id)
def test_parameter_free_unsupported_first_order_raises_or_is_correct(ext, module):
    """First-order quantities need no rules for parameter-free modules: either a clean
    NotImplementedError (as for second order) or the autograd value."""
    ext = ext()
    case = Case(unsupported_in_the_middle(module), "ce", "mean", (3, 5))
    try:
        case.run(ext)
    except NotImplementedError as err:
        check_names(err, module, ext)
        assert_nothing_attached(case.model)
        return
    _check_first_order(case, ext, f"through {module}")


def _check_first_order(case: Case, ext, what: str) -> None:
    qs = case.plain_params()
    gb = ref.per_sample_grads_loop(case.plain, case.lf_plain, case.X, case.y, qs)
    N = case.batch_size
    for (p, _), g in zip(case.params(), gb):
        expected = {
            "grad_batch": g,
            "batch_l2": (g**2).flatten(1).sum(1),
            "sum_grad_squared": (g**2).sum(0),
            "variance": (g**2).sum(0) / N - (g.sum(0) / N) ** 2,
        }[SAVEFIELDS[type(ext)]]
        close(getattr(p, SAVEFIELDS[type(ext)]), expected, what)


class LastStepLSTM(nn.Module):
    """An LSTM reduced to its last hidden state ``[N, 3]``."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 3, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0][:, -1]


@pytest.mark.parametrize("ext", ALL_EXTENSIONS, ids=_ext_id)
def test_lstm_parameters_are_not_silently_skipped(ext):
    """LSTM -> Linear: the LSTM's parameters require grad and feed the loss, so either the
    whole backward raises NotImplementedError (nothing written) or every one of them gets
    its quantity (docs/design.md, Principles: no half-written results)."""
    ext = ext()
    case = Case(lambda: nn.Sequential(LastStepLSTM(), nn.Linear(3, 3)), "ce", "mean", (3, 2, 4))
    field = SAVEFIELDS[type(ext)]
    try:
        case.run(ext)
    except NotImplementedError:  # the message is checked in the test above
        assert_nothing_attached(case.model)
        return
    missing = [n for n, p in case.model.named_parameters() if not hasattr(p, field)]
    assert not missing, f"no error, but no {field} on {missing}"


@pytest.mark.parametrize(
    "make",
    [
        lambda: HBP(curvature="foo"),
        lambda: HBP("ggn", "foo", "sqrt"),
        lambda: HBP("ggn", "exact", "foo"),
        lambda: HBP("ggn", "average", "sqrt"),
        lambda: HBP("ggn", "exact", "batch-average"),
        lambda: HBP("ggn", "sampled", "sqrt", mc_samples=0),
        lambda: KFAC(mc_samples=0),
        lambda: KFAC(mc_samples=-1),
        lambda: DiagGGNMC(mc_samples=0),
        lambda: KFLR(kfac_approx="foo"),
    ],
    ids=[
        "curvature",
        "loss_hessian",
        "backprop",
        "average-sqrt",
        "exact-batch-average",
        "hbp-mc0",
        "kfac-mc0",
        "kfac-mc-neg",
        "diagggnmc-mc0",
        "kfac_approx",
    ],
)
def test_bad_options_raise_value_error(make):
    with pytest.raises(ValueError) as info:
        make()
    assert str(info.value)


@pytest.mark.parametrize(
    "make_loss_fn",
    [  # class weights and ignore_index are supported (tests/modules/test_loss_rules.py)
        lambda: ReducedLoss(nn.NLLLoss(reduction="none")),
        lambda: ReducedLoss(nn.MultiMarginLoss(reduction="none"), "mean"),
    ],
    ids=["reduced-nll", "reduced-multi-margin"],
)
def test_unsupported_loss_options_raise(make_loss_fn):
    torch.manual_seed(0)
    model = extend(mlp("Tanh").double())
    X, y = torch.randn(4, 5, dtype=DT), torch.tensor([0, 1, 2, 0])
    with pytest.raises(NotImplementedError):
        lf = extend(make_loss_fn())
        with backprop(DiagGGNExact()):
            lf(model(X), y).backward()
    assert_nothing_attached(model)


@pytest.mark.parametrize("option", ["weight", "pos_weight"])
def test_bce_weights_raise_or_are_correct(option):
    """Not in the contract: either NotImplementedError or the right diag_ggn_exact."""
    w = torch.tensor([1.0, 2.0, 0.5], dtype=DT)
    case = Case(lambda: mlp("Tanh"), "bce", "mean", (3, 5))
    case.lf_plain = nn.BCEWithLogitsLoss(**{option: w})
    try:
        case.lf = extend(copy.deepcopy(case.lf_plain))
        case.run(DiagGGNExact())
    except NotImplementedError:
        assert_nothing_attached(case.model)
        return
    qs = case.plain_params()
    G = ref.blocks(ref.ggn(case.plain(case.X), case.lf_plain, case.y, qs), qs)
    for (p, _), Gb in zip(case.params(), G):
        close(p.diag_ggn_exact, Gb.diagonal().reshape(p.shape), option)


def test_frozen_parameter_gets_nothing():
    case = Case(lambda: mlp("Tanh"), "mse", "mean", (3, 5))
    case.model[0].weight.requires_grad_(False)
    case.plain[0].weight.requires_grad_(False)
    exts = [e() for e in ALL_EXTENSIONS]
    case.run(*exts)
    assert not any(hasattr(case.model[0].weight, f) for f in SAVEFIELDS.values())
    qs = case.plain_params()
    G = ref.blocks(ref.ggn(case.plain(case.X), case.lf_plain, case.y, qs), qs)
    for (p, _), Gb in zip(case.params(), G):
        close(
            p.diag_ggn_exact, Gb.diagonal().reshape(p.shape), "diag_ggn_exact with a frozen layer"
        )


@pytest.mark.parametrize("make", [KFAC, DiagGGNExact, GGNMP], ids=["KFAC", "DiagGGNExact", "GGNMP"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_are_refused_before_writing(make, bad):
    """Non-finite loss inputs: a ValueError naming the loss and the count, nothing written."""
    torch.manual_seed(0)
    model = extend(mlp("Tanh").double())
    X, y = torch.randn(4, 5, dtype=DT), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        model[-1].bias[1] = bad  # every sample's second logit
    loss = extend(nn.CrossEntropyLoss())(model(X), y)
    with pytest.raises(ValueError, match=r"CrossEntropyLoss \(shape \(4, 3\)\) has 4 non-finite"):
        with backprop(make()):
            loss.backward()
    assert_nothing_attached(model)
