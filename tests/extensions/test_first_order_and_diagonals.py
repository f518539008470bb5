"""First-order quantities and diagonals against their autograd definitions (float64).

grad, grad_batch, batch_l2, sum_grad_squared, variance, diag_ggn_exact and diag_h on
MLPs with every activation, on structural variants (Identity, Dropout, in-place ReLU,
Flatten of a sequence) and through Dropout in train mode; references from
:mod:`reference` on a plain copy of the model, ``rtol=1e-8, atol=1e-10``.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from quantities import (
    FIRST_AND_DIAG,
    LOSSES,
    SAVEFIELDS,
    SEQ_STRUCTURES,
    STRUCTURES,
    Case,
    activation_params,
    check_first_and_diag,
    close,
    first_and_diag_against_plain,
    mlp,
)
from torch import nn

from hbpkit import extend


@pytest.mark.parametrize("N", [1, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", activation_params())
def test_first_order_and_diagonals_mlp(act, loss, reduction, N):
    """grad, grad_batch, batch_l2, sum_grad_squared, variance, diag_ggn_exact, diag_h."""
    first_and_diag_against_plain(Case(lambda: mlp(act), loss, reduction, (N, 5)))


@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("structure", list(STRUCTURES) + list(SEQ_STRUCTURES))
def test_first_order_and_diagonals_structures(structure, loss, reduction, N):
    build = {**STRUCTURES, **SEQ_STRUCTURES}[structure]
    x_shape = (N, 2, 4) if structure in SEQ_STRUCTURES else (N, 5)
    first_and_diag_against_plain(Case(build, loss, reduction, x_shape))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_dropout_train_mode_uses_the_forward_mask(loss, reduction):
    """Dropout in train mode: the references go through the very graph hbpkit used."""
    case = Case(
        lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 3)),
        loss,
        reduction,
        (4, 5),
    )
    case.model.train()
    torch.manual_seed(123)
    out, loss_value = case.run(*(e() for e in FIRST_AND_DIAG), retain_graph=True)
    with torch.no_grad():
        assert not torch.allclose(out, case.model.eval()(case.X)), "dropout did nothing"
    ps = [p for p, _ in case.params()]
    grad = list(torch.autograd.grad(loss_value, ps, retain_graph=True))
    H = ref.hessian(loss_value, ps)
    GGN = ref.ggn(out, case.lf_plain, case.y, ps)
    gb = ref.per_sample_grads_from_graph(out, case.lf_plain, case.y, ps)
    names = [n for n, _ in case.model.named_parameters()]
    check_first_and_diag(list(zip(ps, names)), case.batch_size, grad, gb, H, GGN)


def test_each_extension_alone_equals_all_together():
    """One backward with six extensions == six backward passes with one each."""
    case = Case(lambda: mlp("Softplus"), "ce", "mean", (3, 5))
    case.run(*(e() for e in FIRST_AND_DIAG))
    together = {
        (i, e): getattr(p, SAVEFIELDS[e]).clone()
        for i, (p, _) in enumerate(case.params())
        for e in FIRST_AND_DIAG
    }
    for e in FIRST_AND_DIAG:
        fresh = Case(lambda: mlp("Softplus"), "ce", "mean", (3, 5))
        fresh.run(e())
        for i, (p, _) in enumerate(fresh.params()):
            close(getattr(p, SAVEFIELDS[e]), together[(i, e)], f"{e.__name__} alone")
            others = [f for f in SAVEFIELDS.values() if f != SAVEFIELDS[e]]
            assert not any(hasattr(p, f) for f in others)


@pytest.mark.parametrize("target", ["ce", "ce-prob", "ce-mass"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_with_label_smoothing(target, reduction):
    """``CrossEntropyLoss(label_smoothing=0.1)``: the logit Hessian depends on the target only
    through its mass, so every first-order and diagonal quantity equals autograd's."""
    case = Case(lambda: mlp("Tanh"), target, reduction, (5, 5))
    case.lf_plain = nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.1)
    case.lf = extend(nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.1))
    first_and_diag_against_plain(case)
