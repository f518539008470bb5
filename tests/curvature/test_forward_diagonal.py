"""The forward form of DiagHessian (``hbpkit/extensions/forward_diagonal.py``) against autograd.

In float64: ``diag(J_p^T H J_p)`` from the forward products of unit tangents, forced on at
every call the pass offers it (convolutions of 1, 2, 3 dimensions with pooling, padding
and groups; Linear layers; a residual block; a weighted loss), each against the Hessian
from autograd; chosen by its cost model on the table S.2 CNN, against the column form;
offered only where no message goes on, never for the GGN, train-mode BatchNorm or
tied parameters.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from test_local_band import ATOL, DT, RTOL, _expected
from test_local_factors import CASES, IDS, _random_cnn
from torch import nn

from hbpkit import backprop, convert, extend
from hbpkit.architectures import cnn
from hbpkit.branching import Residual
from hbpkit.curvature.memory import MemoryPolicy
from hbpkit.engine import plan as plan_module
from hbpkit.extensions import HMP, DiagGGNExact, DiagHessian
from hbpkit.extensions import diagonal as diagonal_ext


def _record_forward(monkeypatch, force: bool | None) -> list[nn.Module]:
    """The modules whose diagonals took the forward form; ``force``: offer it wherever a call
    sends no message on and take it (``True``), never take it (``False``), or as the plan
    and the cost model say (``None``)."""
    used: list[nn.Module] = []
    if force:
        monkeypatch.setattr(plan_module, "COLUMNS_PER_TANGENT", 0)
    forward = diagonal_ext.param_diag_forward

    def spy(rules, call, name, curvature):
        used.append(call.module)
        return forward(rules, call, name, curvature)

    monkeypatch.setattr(diagonal_ext, "param_diag_forward", spy)
    if force is not None:
        monkeypatch.setattr(diagonal_ext, "prefers_forward", lambda *args: force)
    return used


def _diag_h(model, X, y, extensions=None, weight: float = 1.0, memory=None) -> list:
    extensions = extensions or [DiagHessian()]
    kwargs = {} if memory is None else {"memory": memory}
    with backprop(*extensions, **kwargs):
        (weight * extend(nn.CrossEntropyLoss())(model(X), y)).backward()
    return [p.diag_h for p in model.parameters()]


def _check(result, expected) -> None:
    for got, want in zip(result, expected):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forced_forward_form_equals_autograd(case, monkeypatch):
    """Convolutions with stride, padding, dilation, groups, max/avg pooling and padding
    behind them, smooth activations (residuals of both signs)."""
    model, X = _random_cnn(*case)
    model, X = extend(model.to(DT)), X.to(DT)
    y = torch.randint(0, 3, (X.shape[0],))
    used = _record_forward(monkeypatch, True)
    result = _diag_h(model, X, y)
    assert used == [model[0]] * 2  # the first convolution's weight and bias only
    _check(result, _expected(model, X, y))


def test_forced_forward_form_transposed_convolution(monkeypatch):
    """A transposed convolution first (its tangents are not narrowed: the default)."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1),
        nn.Sigmoid(),
        nn.Conv2d(3, 2, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 5 * 5, 3),
    )
    model = extend(model.to(DT))
    X, y = torch.randn(3, 2, 3, 3, dtype=DT), torch.tensor([0, 2, 1])
    used = _record_forward(monkeypatch, True)
    result = _diag_h(model, X, y)
    assert used == [model[0]] * 2
    _check(result, _expected(model, X, y))


# fewer parameter entries in the first layer (9) than residual entries behind it (11, 12):
# the pass offers the forward form there
def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 8), nn.Sigmoid(), nn.Linear(8, 3)
    ).to(DT)


def _residual_net() -> nn.Sequential:
    torch.manual_seed(1)
    block = nn.Sequential(nn.Linear(3, 6), nn.Softplus(), nn.Linear(6, 3))
    return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), Residual(block), nn.ELU(), nn.Linear(3, 3)).to(
        DT
    )


@pytest.mark.parametrize("weight", [1.0, -0.5])
@pytest.mark.parametrize("make", [_mlp, _residual_net], ids=["mlp", "residual"])
def test_forced_forward_form_linear_and_residual(make, weight, monkeypatch):
    """Linear first layers, a residual block (the tangents of both paths summed), the
    loss's weight (negative: every sign flips), and DiagHessian next to HMP (one product
    message for both)."""
    model = extend(make())
    X, y = torch.randn(4, 2, dtype=DT), torch.tensor([0, 2, 1, 2])
    used = _record_forward(monkeypatch, True)
    result = _diag_h(model, X, y, [DiagHessian(), HMP()], weight)
    assert used == [model[0]] * 2
    params = list(model.parameters())
    expected = _expected(model, X, y)
    _check(result, [weight * e for e in expected])
    assert all(hasattr(p, "hmp") for p in params)


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.trunk = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 8), nn.Sigmoid())
        self.h1, self.h2 = nn.Linear(8, 3), nn.Linear(8, 2)

    def forward(self, x):
        z = self.trunk(x)
        return self.h1(z), self.h2(z)


def test_forced_forward_form_two_losses(monkeypatch):
    """``(l1 + 0.5 l2).backward()``: the second loss joins the pass (the plan is made
    again), and the tangents reach both losses."""
    model = extend(_TwoHeads().to(DT))
    X, y1, y2 = torch.randn(4, 2, dtype=DT), torch.tensor([0, 2, 1, 2]), torch.randn(4, 2, dtype=DT)
    used = _record_forward(monkeypatch, True)
    with backprop(DiagHessian()):
        out1, out2 = model(X)
        l1 = extend(nn.CrossEntropyLoss())(out1, y1)
        (l1 + 0.5 * extend(nn.MSELoss())(out2, y2)).backward()
    assert used == [model.trunk[0]] * 2
    out1, out2 = model(X)
    loss = nn.CrossEntropyLoss()(out1, y1) + 0.5 * nn.MSELoss()(out2, y2)
    params = list(model.parameters())
    H = ref.hessian(loss, params)
    expected = [b.diagonal().reshape(p.shape) for p, b in zip(params, ref.blocks(H, params))]
    _check([p.diag_h for p in params], expected)


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(2, 3, batch_first=True)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


def _recurrent():
    torch.manual_seed(5)
    return convert(_Recurrent().to(DT)), torch.randn(4, 5, 2, dtype=DT)


def _embedding():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Embedding(7, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6, 3))
    return model.to(DT), torch.randint(0, 7, (4, 2))


def _batchnorm_eval():
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.Sigmoid(), nn.Flatten(), nn.Linear(9, 3)
    )
    for _ in range(2):  # running statistics that are not the defaults
        model(torch.randn(4, 2, 5))
    return model.to(DT).eval(), torch.randn(4, 2, 5, dtype=DT)


@pytest.mark.parametrize(
    "make", [_recurrent, _embedding, _batchnorm_eval], ids=["lstm", "embedding", "batchnorm"]
)
def test_forced_forward_form_other_first_modules(make, monkeypatch):
    """An LSTM (nonlinear in its parameters: its own residual is added as in the column
    form), an Embedding, and a convolution before an eval-mode BatchNorm."""
    model, X = make()
    model, y = extend(model), torch.tensor([0, 2, 1, 2])
    used = _record_forward(monkeypatch, True)
    result = _diag_h(model, X, y)
    first = next(m for m in model.modules() if list(m.parameters(recurse=False)))
    assert used and set(used) == {first}
    _check(result, _expected(model, X, y))


def test_cost_model_takes_forward_form_on_table_s2_cnn(monkeypatch):
    """The first convolution of the table S.2b CNN, lazy factors as at batch 128: the
    forward form is chosen there, and gives the column form's diagonals."""
    torch.manual_seed(0)
    model = extend(cnn().to(DT))
    X, y = torch.randn(2, 3, 32, 32, dtype=DT), torch.tensor([3, 7])
    memory = MemoryPolicy(local_store_bytes=0)
    used = _record_forward(monkeypatch, None)
    forward = _diag_h(model, X, y, memory=memory)
    assert used == [model[0]] * 2
    _record_forward(monkeypatch, False)
    columns = _diag_h(model, X, y, memory=memory)
    _check(forward, columns)


def test_not_offered_for_ggn_or_batchnorm(monkeypatch):
    """The GGN's diagonal keeps its few columns; train-mode BatchNorm couples the samples:
    the column form there (DiagHessian refuses tied parameters before the pass)."""
    used = _record_forward(monkeypatch, True)
    X, y = torch.randn(4, 2, dtype=DT), torch.tensor([0, 2, 1, 2])
    model = extend(_mlp())
    with backprop(DiagGGNExact()):
        extend(nn.CrossEntropyLoss())(model(X), y).backward()
    torch.manual_seed(2)
    bn = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), *list(_mlp())[1:])
    _diag_h(extend(bn.to(DT).train()), X, y)
    assert used == []


def test_offered_only_with_many_columns_per_entry(monkeypatch):
    """Offering the forward form keeps the forward data behind a call until the pass ends:
    not where its entries are more than 1 / ``COLUMNS_PER_TANGENT`` of the residual entries
    behind it (the MLP: 9 entries, 11 residual entries)."""
    used = _record_forward(monkeypatch, None)
    monkeypatch.setattr(diagonal_ext, "prefers_forward", lambda *args: True)
    model = extend(_mlp())
    X, y = torch.randn(4, 2, dtype=DT), torch.tensor([0, 2, 1, 2])
    _check(_diag_h(model, X, y), _expected(model, X, y))
    assert used == []
    monkeypatch.setattr(plan_module, "COLUMNS_PER_TANGENT", 1)
    _check(_diag_h(model, X, y), _expected(model, X, y))
    assert used == [model[0]] * 2
