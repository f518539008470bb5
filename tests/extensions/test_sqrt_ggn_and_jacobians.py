"""``SqrtGGNExact`` / ``SqrtGGNMC`` and ``BatchJacobian`` against their definitions (float64).

* ``sum_{c,n} vec(V_p[c, n]) vec(V_q[c, n])^T`` equals the dense GGN ``J^T H J`` (from
  ``torch.func.jacrev`` and the loss Hessian w.r.t. the output) for every pair of
  parameters ``p``, ``q``, cross blocks included;
* ``sqrt_ggn_exact`` equals BackPACK 1.7.1's number for number (same column layout);
* ``jac_batch[c, n]`` equals ``jacrev`` of the model output per sample;
* ``sqrt_ggn_mc`` has BackPACK's shape and the exact GGN as its mean over many draws.
"""

from __future__ import annotations

import copy

import backpack.extensions as bpext
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev
from twins import run_backpack, run_extended

import hbpkit
from hbpkit import backprop, extend
from hbpkit import extensions as hx
from hbpkit.integrations.jacobians import batch_jacobian

DT = torch.float64

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:backpack.*"),
]


class Scale(nn.Module):
    """A module without rules of its own (the generic path): ``x * w``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.w


class Functional(nn.Module):
    """Functional code between modules: ``convert`` makes it a region."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.tanh(h) * 2.0 + h)


def mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def cnn():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 3)
    )


def norms():
    bn = nn.BatchNorm1d(5).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    return nn.Sequential(
        nn.Linear(4, 5), bn, nn.Tanh(), nn.Linear(5, 6), nn.LayerNorm(6), Scale(6), nn.Linear(6, 3)
    )


def transposed():
    return nn.Sequential(
        nn.Unflatten(1, (2, 2)), nn.ConvTranspose1d(2, 3, 2, stride=2), nn.Sigmoid(),
        nn.Flatten(), nn.Linear(12, 3),
    )  # fmt: skip


class GRUHead(nn.Module):
    """A GRU over 3 steps (the generic path on its recurrence), its last output classified."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.fc = nn.GRU(4, 3, batch_first=True), nn.Linear(3, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


def embedding():
    return nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(12, 3))


MODELS = {
    "mlp": (mlp, (4,)),
    "embedding": (embedding, "tokens"),
    "recurrent": (lambda: hbpkit.convert(GRUHead()), (3, 4)),
    "cnn": (cnn, (2, 4, 4)),
    "norms": (norms, (4,)),
    "transposed": (transposed, (4,)),
    "converted": (lambda: hbpkit.convert(Functional()), (4,)),
}


def _data(shape, N=5, C=3, seed=0):
    torch.manual_seed(seed)
    if shape == "tokens":  # four tokens of a vocabulary of 7 per sample
        return torch.randint(0, 7, (N, 4)), torch.randint(0, C, (N,))
    return torch.randn(N, *shape, dtype=DT), torch.randint(0, C, (N,))


def _reference(model, loss_fn, X, y):
    """Per-sample Jacobians ``{name: [N, C, *p]}`` and the dense GGN ``[P, P]``."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    J = jacrev(lambda p: functional_call(model, p, (X,)))(params)
    out = model(X).detach()
    Hz = hessian(lambda z: loss_fn(z, y))(out).reshape(out.numel(), out.numel())
    Jflat = torch.cat([J[k].reshape(out.numel(), -1) for k in params], 1)
    return J, Jflat.T @ Hz @ Jflat


def _gram(values):
    """``sum_{c,n} V V^T`` over the columns ``[C, N, *p]`` of every parameter: ``[P, P]``."""
    flat = torch.cat([v.flatten(2) for v in values], 2)  # [C, N, P]
    return torch.einsum("cnp,cnq->pq", flat, flat)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(
    "loss_fn",
    [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum"), nn.MSELoss()],
    ids=["ce-mean", "ce-sum", "mse-mean"],
)
def test_sqrt_ggn_exact_gives_the_full_ggn_and_jacobians(name, loss_fn):
    build, shape = MODELS[name]
    torch.manual_seed(1)
    model = build().to(DT)
    X, y = _data(shape)
    if isinstance(loss_fn, nn.MSELoss):
        y = torch.randn(X.shape[0], 3, dtype=DT)
    J, G = _reference(copy.deepcopy(model), loss_fn, X, y)
    twin = run_extended(model, loss_fn, X, y, hx.SqrtGGNExact(), hx.BatchJacobian())
    params = [p for p in twin.parameters()]
    for ref, p in zip(J.values(), params):
        assert p.sqrt_ggn_exact.shape == (3, X.shape[0], *p.shape)  # C columns, as BackPACK
        torch.testing.assert_close(p.jac_batch, ref.transpose(0, 1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_gram([p.sqrt_ggn_exact for p in params]), G, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(),
        nn.CrossEntropyLoss(reduction="sum"),
        nn.MSELoss(),
        nn.MSELoss(reduction="sum"),
    ],
    ids=["ce-mean", "ce-sum", "mse-mean", "mse-sum"],
)
def test_sqrt_ggn_exact_equals_backpack(name, loss_fn):
    build, shape = MODELS[name]
    torch.manual_seed(2)
    model = build().to(DT)
    X, y = _data(shape)
    if isinstance(loss_fn, nn.MSELoss):
        y = torch.randn(X.shape[0], 3, dtype=DT)
    ours = run_extended(model, loss_fn, X, y, hx.SqrtGGNExact())
    theirs = run_backpack(model, loss_fn, X, y, bpext.SqrtGGNExact())
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p.sqrt_ggn_exact, q.sqrt_ggn_exact, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sqrt_ggn_exact_equals_backpack_bce(reduction):
    """BCEWithLogitsLoss (BackPACK 1.7.1: scalar outputs only)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)
    X, y = torch.randn(5, 4, dtype=DT), torch.rand(5, 1, dtype=DT).round()
    loss_fn = nn.BCEWithLogitsLoss(reduction=reduction)
    ours = run_extended(model, loss_fn, X, y, hx.SqrtGGNExact())
    theirs = run_backpack(model, loss_fn, X, y, bpext.SqrtGGNExact())
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert p.sqrt_ggn_exact.shape == (1, 5, *p.shape)
        torch.testing.assert_close(p.sqrt_ggn_exact, q.sqrt_ggn_exact, rtol=1e-10, atol=1e-12)


def test_sqrt_ggn_mc_shape_as_backpack_and_mean_is_the_ggn():
    torch.manual_seed(3)
    model = mlp().to(DT)
    X, y = _data((4,), N=3)
    loss_fn = nn.CrossEntropyLoss()
    theirs = run_backpack(model, loss_fn, X, y, bpext.SqrtGGNMC(mc_samples=4))
    ours = run_extended(model, loss_fn, X, y, hx.SqrtGGNMC(mc_samples=4))
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert p.sqrt_ggn_mc.shape == q.sqrt_ggn_mc.shape == (4, 3, *p.shape)
    _, G = _reference(copy.deepcopy(model), loss_fn, X, y)
    draws = run_extended(model, loss_fn, X, y, hx.SqrtGGNMC(mc_samples=40000))
    estimate = _gram(list(p.sqrt_ggn_mc for p in draws.parameters()))
    assert (estimate - G).abs().max() < 0.05 * G.abs().max()


def test_jacobians_of_several_output_dims_and_the_entry_point():
    """Outputs ``[N, T, C]`` (C entries per position): ``jac_batch`` has ``T C`` columns,
    from ``loss.backward()`` on a loss over the tokens (``view(-1, C)``: columns ``(c, t)``,
    c-major, as the batch-merging view expands them) and from ``batch_jacobian(model, X)``
    (no loss, ``f[n].flatten()`` order), both equal to ``jacrev``."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(DT)
    X = torch.randn(2, 5, 4, dtype=DT)  # N = 2, T = 5
    J, _ = _reference(copy.deepcopy(model), lambda z, y: z.square().sum(), X, None)
    ours = extend(copy.deepcopy(model))
    y = torch.randint(0, 3, (10,))
    loss = extend(nn.CrossEntropyLoss())(ours(X).view(-1, 3), y)
    with backprop(hx.BatchJacobian()):
        loss.backward()
    grads = [p.grad.clone() for p in ours.parameters()]
    for ref, p in zip(J.values(), ours.parameters()):
        assert p.jac_batch.shape == (15, 2, *p.shape)
        ref = ref.transpose(1, 2).reshape(2, 15, *p.shape).transpose(0, 1)  # [(c t), N, *p]
        torch.testing.assert_close(p.jac_batch, ref, rtol=1e-10, atol=1e-12)
    Js, f = batch_jacobian(ours, X)
    torch.testing.assert_close(f, model(X), rtol=0, atol=0)
    ref = torch.cat([J[k].reshape(2, 15, -1) for k in J], 2)
    assert Js.shape == (2, 15, sum(p.numel() for p in model.parameters()))
    torch.testing.assert_close(Js, ref, rtol=1e-10, atol=1e-12)
    for g, p in zip(grads, ours.parameters()):  # the entry point leaves .grad alone
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
        assert not hasattr(p, "jac_batch")  # and takes its columns along


def test_tied_parameters_sum_the_columns_of_their_uses():
    """A Linear applied twice: the Jacobian is the sum over the uses' Jacobians."""
    torch.manual_seed(5)
    lin = nn.Linear(3, 3).to(DT)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    X, y = _data((3,), N=4)
    J, G = _reference(copy.deepcopy(model), nn.CrossEntropyLoss(), X, y)
    ours = extend(model)
    with backprop(hx.SqrtGGNExact(), hx.BatchJacobian()):
        extend(nn.CrossEntropyLoss())(ours(X), y).backward()
    params = [lin.weight, lin.bias]
    for k, p in zip(["0.weight", "0.bias"], params):
        torch.testing.assert_close(p.jac_batch, J[k].transpose(0, 1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_gram([p.sqrt_ggn_exact for p in params]), G, rtol=1e-10, atol=1e-12)


def test_through_batch_norm_in_train_mode():
    """Behind a BatchNorm with batch statistics a column of sample ``n``'s output spreads
    over every sample: ``jac_batch[c, n]`` is the total derivative of ``f_{n,c}`` through the
    batch statistics, and the columns square to the GGN of the batch map."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    X, y = torch.randn(5, 3, dtype=DT), torch.tensor([0, 1, 1, 0, 1])
    ours = extend(copy.deepcopy(model))
    with backprop(hx.BatchJacobian(), hx.SqrtGGNExact()):
        extend(nn.CrossEntropyLoss())(ours(X), y).backward()
    model[1].track_running_stats = False  # the same batch map, without the in-place update
    params = {k: v.detach() for k, v in model.named_parameters()}
    J = jacrev(lambda p: functional_call(model, p, (X,)))(params)  # [N, C, *p]
    out = model(X).detach()
    H = hessian(lambda z: F.cross_entropy(z, y))(out).reshape(out.numel(), -1)
    for k, p in ours.named_parameters():
        torch.testing.assert_close(p.jac_batch, J[k].transpose(0, 1), rtol=1e-10, atol=1e-12)
        Jk = J[k].reshape(out.numel(), -1)
        V = p.sqrt_ggn_exact.flatten(2).flatten(0, 1)
        torch.testing.assert_close(V.T @ V, Jk.T @ H @ Jk, rtol=1e-10, atol=1e-12)


def test_refused_before_anything_is_written():
    """A loss with negative weights has signed GGN factors, which the columns cannot carry."""
    X, y = torch.randn(4, 3, dtype=DT), torch.tensor([0, 1, 1, 0])
    lin = extend(nn.Linear(3, 2).to(DT))
    loss = -extend(nn.CrossEntropyLoss())(lin(X), y)
    with pytest.raises(ValueError, match="negative"):
        with backprop(hx.SqrtGGNExact()):
            loss.backward()
    assert not hasattr(lin.weight, "sqrt_ggn_exact")
