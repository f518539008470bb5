"""The references of :mod:`brute_force` against ``torch.autograd.functional`` on a tiny MLP.

A wrong reference would make every zoo test meaningless, so each quantity is checked
against an independent definition (float64): the Hessian against
``torch.autograd.functional.hessian`` of the loss as a function of the flat parameter
vector; the GGN against ``J^T H J`` from ``torch.autograd.functional.jacobian`` and
``hessian`` (and against the Hessian on a model that is linear in its parameters, where
the two coincide); per-sample gradients against one backward per sample.
"""

from __future__ import annotations

import pytest
import torch
import zoo
from brute_force import BatchBruteForce, BruteForce
from torch import nn

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}


def tiny(layers: str = "mlp", batch: int = 3, loss: str = "ce", reduction: str = "mean"):
    torch.manual_seed(0)
    if layers == "mlp":
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).to(DT)
    else:  # linear in its parameters: GGN == Hessian
        model = nn.Sequential(nn.Linear(4, 3)).to(DT)
    X = torch.randn(batch, 4, dtype=DT)
    if loss == "ce":
        loss_fn, y = nn.CrossEntropyLoss(reduction=reduction), torch.randint(0, 3, (batch,))
    else:
        loss_fn, y = nn.MSELoss(reduction=reduction), torch.randn(batch, 3, dtype=DT)
    return zoo.ZooCase("tiny", model, loss_fn, zoo.ce, X, y)


def flat_problem(case):
    """The loss and the output as functions of the flat parameter vector."""
    names = [n for n, _ in case.model.named_parameters()]
    shapes = [p.shape for _, p in case.model.named_parameters()]
    sizes = [s.numel() for s in shapes]
    theta0 = torch.cat([p.detach().reshape(-1) for p in case.model.parameters()])

    def unflat(v):
        return {n: c.reshape(s) for n, c, s in zip(names, v.split(sizes), shapes)}

    def out(v):
        return torch.func.functional_call(case.model, unflat(v), (case.X,))

    def loss(v):
        return case.loss_fn(out(v), case.y)

    offsets = dict(zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist()))
    return theta0, out, loss, {n: slice(offsets[n], offsets[n] + k) for n, k in zip(names, sizes)}


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_hessian_products_and_diagonal(loss, reduction):
    case = tiny(loss=loss, reduction=reduction)
    theta0, _, L, where = flat_problem(case)
    H = torch.autograd.functional.hessian(L, theta0)
    bf = BruteForce(case)
    torch.manual_seed(1)
    for name, p in bf.theta.items():
        Hb = H[where[name], where[name]]
        V = torch.randn(2, *p.shape, dtype=DT)
        expected = (V.flatten(1) @ Hb).reshape(V.shape)
        torch.testing.assert_close(bf.hessian_matmul(name, V), expected, **TOL)
        torch.testing.assert_close(bf.hessian_diagonal(name), Hb.diagonal().reshape(p.shape), **TOL)


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ggn_against_jacobian_and_loss_hessian(loss, reduction):
    case = tiny(loss=loss, reduction=reduction)
    theta0, out, _, where = flat_problem(case)
    J = torch.autograd.functional.jacobian(lambda v: out(v).reshape(-1), theta0)  # [N*O, P]
    o = out(theta0).detach()
    H_out = torch.autograd.functional.hessian(
        lambda z: case.loss_fn(z.reshape(o.shape), case.y), o.reshape(-1)
    )
    G = J.T @ H_out @ J
    bf = BruteForce(case)
    torch.manual_seed(1)
    diag = bf.ggn_diagonal()
    for name, p in bf.theta.items():
        Gb = G[where[name], where[name]]
        torch.testing.assert_close(bf.ggn_block(name), Gb, **TOL)
        torch.testing.assert_close(diag[name], Gb.diagonal().reshape(p.shape), **TOL)
        V = torch.randn(3, *p.shape, dtype=DT)
        torch.testing.assert_close(
            bf.ggn_matmul(name, V), (V.flatten(1) @ Gb).reshape(V.shape), **TOL
        )


def test_ggn_is_the_hessian_of_a_model_linear_in_its_parameters():
    case = tiny("linear", batch=4)
    theta0, _, L, where = flat_problem(case)
    H = torch.autograd.functional.hessian(L, theta0)
    bf = BruteForce(case)
    for name in bf.theta:
        torch.testing.assert_close(bf.ggn_block(name), H[where[name], where[name]], **TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradient_and_per_sample_gradients(reduction):
    case = tiny(reduction=reduction, batch=4)
    bf = BruteForce(case)
    bf.check_terms()
    params = list(case.model.parameters())
    scale = 1 / 4 if reduction == "mean" else 1.0
    per_sample = bf.per_sample_gradients()
    for n in range(4):
        loss_n = case.loss_fn(case.model(case.X[n : n + 1]), case.y[n : n + 1]) * scale
        for (name, _), g in zip(bf.theta.items(), torch.autograd.grad(loss_n, params)):
            torch.testing.assert_close(per_sample[name][n], g, **TOL)
    full = torch.autograd.grad(case.loss(), params)
    for (name, g_bf), g in zip(bf.gradient().items(), full):
        torch.testing.assert_close(g_bf, g, **TOL)
        torch.testing.assert_close(per_sample[name].sum(0), g, **TOL)


def test_kflr_of_the_output_layer_at_batch_one_is_the_ggn_block():
    case = tiny(batch=1)
    bf = BruteForce(case)
    G, A = bf.kflr_output_layer("2")
    torch.testing.assert_close(torch.kron(G, A), bf.ggn_block("2.weight"), **TOL)
    torch.testing.assert_close(G, bf.ggn_block("2.bias"), **TOL)
    assert A.shape == (3, 3) and G.shape == (3, 3)


@pytest.mark.parametrize("name", [n for n, f in zoo.MODELS.items() if not f.slow])
def test_zoo_loss_terms_add_up(name):
    """Each zoo model's per-sample terms sum to the batch loss (the per-sample convention)."""
    reference = BatchBruteForce if zoo.MODELS[name].train else BruteForce
    reference(zoo.build(name, batch=3)).check_terms()


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_batch_references_against_autograd_functional(loss):
    """:class:`BatchBruteForce` (train-mode BatchNorm) against dense definitions on the flat
    parameter vector: the GGN ``J^T H J`` of the whole batch, the Hessian, and the
    per-sample gradients from one backward per loss term (through the batch output)."""
    case = tiny(loss=loss)
    torch.manual_seed(2)
    case.model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 3))
    case.model = case.model.to(DT).train()
    theta0, out, L, where = flat_problem(case)
    J = torch.autograd.functional.jacobian(lambda v: out(v).reshape(-1), theta0)
    o = out(theta0).detach()
    H_out = torch.autograd.functional.hessian(
        lambda z: case.loss_fn(z.reshape(o.shape), case.y), o.reshape(-1)
    )
    H = torch.autograd.functional.hessian(L, theta0)
    bf = BatchBruteForce(case)
    for name in bf.theta:
        Jb = J[:, where[name]]
        torch.testing.assert_close(bf.ggn_block(name), Jb.T @ H_out @ Jb, **TOL)
        V = torch.randn(2, Jb.shape[1], dtype=DT)
        expected = V @ H[where[name], where[name]]
        shape = bf.theta[name].shape
        torch.testing.assert_close(
            bf.hessian_matmul(name, V.reshape(2, *shape)).flatten(1), expected, **TOL
        )
    scale = 1 / len(case.X) if loss == "ce" else 1 / o.numel()  # the mean's reduction
    v = theta0.clone().requires_grad_(True)
    o_v = out(v)
    per_term = [
        torch.autograd.grad(_term(case, o_v, n, loss), v, retain_graph=True)[0]
        for n in range(len(case.X))
    ]
    gb = bf.per_sample_gradients()
    for name in bf.theta:
        expected = torch.stack([g[where[name]] for g in per_term]) * scale
        torch.testing.assert_close(gb[name].flatten(1), expected, **TOL)


def _term(case, o, n, loss):
    """Sample ``n``'s loss (unscaled) from the batch output ``o``."""
    if loss == "ce":
        return nn.functional.cross_entropy(o[n : n + 1], case.y[n : n + 1])
    return (o[n] - case.y[n]).square().sum()
