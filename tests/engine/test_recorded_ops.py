"""Functional code between modules with ``extend()`` alone (``engine/recorded_ops.py``).

The pieces of ``forward`` between extended modules (``torch.relu(h) * 2``, ``a(x) + b(x)``,
``x.flatten(1)``, ``torch.tanh`` before the loss) are differentiated through the recorded
autograd graph. Checked in float64 against brute force from ``torch.func``: per-sample
gradients, the GGN diagonal (and its Monte-Carlo estimate's mean), and KFLR at batch size
1, where it is the exact GGN block of each Linear weight; and against the same model after
``hbpkit.convert``. What the graph cannot give is refused before anything is written.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap

import hbpkit
from hbpkit import backprop, extend
from hbpkit.branching import Sum
from hbpkit.extensions import (
    GGNMP,
    KFAC,
    KFLR,
    KFRA,
    BatchGrad,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
)

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}


class Gated(nn.Module):
    """Two branches multiplied: ``b(2 tanh(a(x)) * sigmoid(c(x)))``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 3), nn.Linear(3, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) * 2 * torch.sigmoid(self.c(x)))


class ScaledSkip(nn.Module):
    """``Sum()(b(h), 2 * h)``: ``h`` feeds a module and a functional product."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.add = nn.Linear(3, 4), nn.Linear(4, 4), Sum()

    def forward(self, x):
        h = self.a(x)
        return self.add(self.b(h), 2 * h)


class AddedHeads(nn.Module):
    """``b(h) + c(h)`` written with ``+`` right before the loss."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h) + self.c(h)


class FunctionalCNN(nn.Module):
    """Convolutions with ``F.relu``, ``F.max_pool2d`` and ``flatten`` between them."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 2, 3)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = torch.tanh(self.conv2(F.pad(h, (1, 1, 1, 1))))
        return self.fc(F.avg_pool2d(h, 2).flatten(1))


MODELS = {
    "gated": (Gated, (3,), "ce"),
    "scaled_skip": (ScaledSkip, (3,), "ce"),
    "added_heads": (AddedHeads, (3,), "mse"),
    "cnn": (FunctionalCNN, (2, 8, 8), "ce"),
}


def _case(name: str, N: int, seed: int = 0):
    cls, shape, loss = MODELS[name]
    torch.manual_seed(seed)
    model = cls().to(DT)
    X = torch.randn(N, *shape, dtype=DT)
    C = 4 if name == "scaled_skip" else 3
    if loss == "ce":
        return model, nn.CrossEntropyLoss(), X, torch.randint(0, C, (N,))
    return model, nn.MSELoss(), X, torch.randn(N, C, dtype=DT)


def _run(model, loss_fn, X, y, *extensions):
    model, loss_fn = extend(model), extend(loss_fn)
    with backprop(*extensions):
        loss_fn(model(X), y).backward()
    return model


def _ggn_diagonals(model, loss_fn, X, y) -> dict[str, torch.Tensor]:
    """``diag(J^T H J)`` per parameter from ``jacrev`` and the loss Hessian of the output."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = functional_call(model, params, (X,))
    H = hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
    J = jacrev(lambda p: functional_call(model, p, (X,)))(params)
    result = {}
    for name, p in params.items():
        Jp = J[name].reshape(out.numel(), -1)
        result[name] = torch.einsum("ai,ab,bi->i", Jp, H, Jp).reshape(p.shape)
    return result


def _per_sample_gradients(model, loss_fn, X, y) -> dict[str, torch.Tensor]:
    """Sample ``n``'s term of the batch loss, ``l(f(x_n), y_n) / N`` for a mean (MSE: the
    mean over the sample's entries, divided by ``N``, is its share of the mean over all)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    scale = 1 / len(X) if loss_fn.reduction == "mean" else 1.0

    def term(p, x, t):
        return scale * loss_fn(functional_call(model, p, (x[None],)), t[None])

    return vmap(torch.func.grad(term), in_dims=(None, 0, 0))(params, X, y)


@pytest.mark.parametrize("name", list(MODELS))
def test_per_sample_gradients_and_ggn_diagonal(name):
    model, loss_fn, X, y = _case(name, N=4)
    ours = _run(copy.deepcopy(model), loss_fn, X, y, BatchGrad(), DiagGGNExact())
    diagonals = _ggn_diagonals(model, loss_fn, X, y)
    grads = _per_sample_gradients(model, loss_fn, X, y)
    for k, p in ours.named_parameters():
        torch.testing.assert_close(p.diag_ggn_exact, diagonals[k], **TOL)
        torch.testing.assert_close(p.grad_batch, grads[k], **TOL)
        torch.testing.assert_close(p.grad_batch.sum(0), p.grad, **TOL)


@pytest.mark.parametrize("name", ["gated", "scaled_skip", "added_heads"])
def test_kflr_is_the_ggn_block_at_batch_size_one(name):
    """At ``N = 1`` a Linear weight's GGN block is ``G kron A`` exactly (DESIGN sec. 3)."""
    model, loss_fn, X, y = _case(name, N=1)
    ours = _run(copy.deepcopy(model), loss_fn, X, y, KFLR())
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = functional_call(model, params, (X,))
    H = hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
    J = jacrev(lambda p: functional_call(model, p, (X,)))(params)
    for k, p in ours.named_parameters():
        if not k.endswith("weight"):
            continue
        Jp = J[k].reshape(out.numel(), -1)
        G, A = p.kflr[0], p.kflr[1]
        torch.testing.assert_close(torch.kron(G, A.contiguous()), Jp.T @ H @ Jp, **TOL)


@pytest.mark.parametrize("name", list(MODELS))
def test_same_as_the_converted_model(name):
    """KFLR, KFAC and the MC diagonal (same seed) equal those of ``hbpkit.convert``'s model,
    whose modules and regions have rules of their own."""
    model, loss_fn, X, y = _case(name, N=3)
    extensions = (KFLR(), KFAC(mc_samples=2), DiagGGNMC(mc_samples=2))
    torch.manual_seed(1)
    ours = _run(copy.deepcopy(model), loss_fn, X, y, *extensions)
    torch.manual_seed(1)
    theirs = _run(hbpkit.convert(copy.deepcopy(model)), copy.deepcopy(loss_fn), X, y, *extensions)
    mine = dict(ours.named_parameters())
    for k, q in theirs.named_parameters():
        p = mine[k]
        torch.testing.assert_close(p.diag_ggn_mc, q.diag_ggn_mc, **TOL)
        for field in ("kflr", "kfac"):
            for a, b in zip(getattr(p, field), getattr(q, field)):
                torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize(
    "extension, needs", [(DiagHessian(), "residual"), (GGNMP(), "jac_mat_prod"), (KFRA(), "")]
)
def test_what_the_graph_cannot_give_is_refused(extension, needs):
    model, loss_fn, X, y = _case("gated", N=3)
    with pytest.raises(NotImplementedError, match=f"RecordedOps .*{needs}") as error:
        _run(model, loss_fn, X, y, extension)
    assert "TanhBackward0" in str(error.value) and "Linear 'b'" in str(error.value)
    assert not any(hasattr(p, extension.savefield) for p in model.parameters())


def test_samples_coupled_by_functional_code_are_refused():
    class Centered(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = self.a(x)
            return self.b(h - h.mean(0))

    model = Centered().to(DT)
    X, y = torch.randn(4, 3, dtype=DT), torch.tensor([0, 1, 2, 0])
    with pytest.raises(NotImplementedError, match="couples the samples"):
        _run(model, nn.CrossEntropyLoss(), X, y, DiagGGNExact())
    assert not any(hasattr(p, "diag_ggn_exact") for p in model.parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_jacobians_and_ggn_square_roots(name):
    """``BatchJacobian`` equals ``jacrev`` per sample; ``SqrtGGNExact``'s columns square to
    the GGN diagonal."""
    from hbpkit.extensions import BatchJacobian, SqrtGGNExact

    model, loss_fn, X, y = _case(name, N=3)
    ours = _run(copy.deepcopy(model), loss_fn, X, y, BatchJacobian(), SqrtGGNExact())
    params = {k: v.detach() for k, v in model.named_parameters()}
    J = jacrev(lambda p: functional_call(model, p, (X,)))(params)  # [N, C, *p]
    diagonals = _ggn_diagonals(model, loss_fn, X, y)
    for k, p in ours.named_parameters():
        torch.testing.assert_close(p.jac_batch, J[k].transpose(0, 1), **TOL)
        torch.testing.assert_close(p.sqrt_ggn_exact.square().sum((0, 1)), diagonals[k], **TOL)
