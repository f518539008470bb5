"""The full GGN / Hessian operators, Lanczos eigenpairs and scipy views against dense autograd
(``tests/reference.py``), ``torch.linalg.eigh``, and curvlinops, in float64."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch
from curvlinops import GGNLinearOperator, HessianLinearOperator
from scipy.sparse.linalg import eigsh
from torch import nn

from hbpkit import backprop, extend
from hbpkit.extensions import GGNMP, HMP, PCHMP
from hbpkit.operators import (
    BlockDiagonalOperator,
    GGNOperator,
    HessianOperator,
    lanczos_eigh,
)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 2), nn.Sigmoid(), nn.Flatten(), nn.Linear(3 * 2 * 2, 3)
    ).double()


def _case(name: str, loss: str, reduction: str):
    torch.manual_seed(0)
    model = _mlp() if name == "mlp" else _cnn()
    X = torch.randn(7, 4, dtype=torch.float64)
    if name == "cnn":
        X = torch.randn(7, 2, 3, 3, dtype=torch.float64)
    if loss == "ce":
        return model, nn.CrossEntropyLoss(reduction=reduction), X, torch.randint(0, 3, (7,))
    return model, nn.MSELoss(reduction=reduction), X, torch.randn(7, 3, dtype=torch.float64)


CASES = [("mlp", "ce", "mean"), ("mlp", "mse", "sum"), ("cnn", "ce", "sum"), ("cnn", "mse", "mean")]


def _dense(model, loss_fn, X, y):
    params = list(model.parameters())
    out = model(X)
    return ref.ggn(out, loss_fn, y, params), ref.hessian(loss_fn(out, y), params)


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_dense_and_products_match_autograd(case):
    model, loss_fn, X, y = _case(*case)
    G, H = _dense(model, loss_fn, X, y)
    for operator, dense in ((GGNOperator, G), (HessianOperator, H)):
        C = operator(model, loss_fn, (X, y))
        assert C.shape == dense.shape
        torch.testing.assert_close(C.to_dense(), dense)
        V = torch.randn(dense.shape[0], 3, dtype=torch.float64)
        torch.testing.assert_close(C @ V, dense @ V)
        torch.testing.assert_close(C @ V[:, 0], dense @ V[:, 0])
    assert not torch.allclose(G, H)  # the residual terms make them differ


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_several_batches_give_the_whole_data_sets_curvature(reduction):
    model, loss_fn, X, y = _case("mlp", "ce", reduction)
    G, H = _dense(model, loss_fn, X, y)
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    torch.testing.assert_close(GGNOperator(model, loss_fn, batches).to_dense(), G)
    torch.testing.assert_close(HessianOperator(model, loss_fn, batches).to_dense(), H)


def test_a_subset_of_parameters_is_the_submatrix():
    model, loss_fn, X, y = _case("mlp", "mse", "mean")
    G, H = _dense(model, loss_fn, X, y)
    params = [model[2].weight, model[0].bias]
    index = torch.arange(G.shape[0]).split([p.numel() for p in model.parameters()])
    rows = torch.cat([index[2], index[1]])
    for operator, dense in ((GGNOperator, G), (HessianOperator, H)):
        C = operator(model, loss_fn, (X, y), params=params)
        torch.testing.assert_close(C.to_dense(), dense[rows][:, rows])


@pytest.mark.parametrize("which", ["LA", "LM", "SA"])
def test_lanczos_eigenpairs_match_eigh(which):
    model, loss_fn, X, y = _case("cnn", "ce", "mean")
    H = HessianOperator(model, loss_fn, (X, y))
    dense = H.to_dense()
    k = 4
    values, vectors = H.eigh_lowrank(k, which=which)
    evals, evecs = torch.linalg.eigh(dense)
    order = {
        "LA": evals.argsort(descending=True),
        "SA": evals.argsort(),
        "LM": evals.abs().argsort(descending=True),
    }[which][:k]
    torch.testing.assert_close(values, evals[order], atol=1e-9, rtol=1e-9)
    assert vectors.shape == (dense.shape[0], k)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(k, dtype=torch.float64))
    torch.testing.assert_close(dense @ vectors, vectors * values, atol=1e-8, rtol=1e-8)
    overlap = (vectors.T @ evecs[:, order]).diagonal().abs()  # the same up to sign
    torch.testing.assert_close(overlap, torch.ones(k, dtype=torch.float64), atol=1e-7, rtol=0)


def test_lanczos_on_a_low_rank_ggn_and_degenerate_spectra():
    model, loss_fn, X, y = _case("mlp", "ce", "sum")
    G = GGNOperator(model, loss_fn, (X[:2], y[:2]))  # rank <= 2 * (3 - 1)
    dense = G.to_dense()
    values, vectors = G.eigh_lowrank(6)
    evals = torch.linalg.eigvalsh(dense).flip(0)[:6]
    torch.testing.assert_close(values, evals, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(dense @ vectors, vectors * values, atol=1e-8, rtol=1e-8)
    # an operator with repeated eigenvalues: every copy is found (a fresh start direction)
    D = torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0, 0.5, 0.0], dtype=torch.float64))
    values, vectors = lanczos_eigh(lambda v: D @ v, 6, 4)
    torch.testing.assert_close(values, torch.tensor([3.0, 3.0, 3.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="need 1 <= k"):
        lanczos_eigh(lambda v: D @ v, 6, 7)
    with pytest.raises(ValueError, match="which="):
        lanczos_eigh(lambda v: D @ v, 6, 2, which="BE")


def test_scipy_views_and_eigsh_match_dense():
    model, loss_fn, X, y = _case("mlp", "ce", "mean")
    G, H = _dense(model, loss_fn, X, y)
    for operator, dense in ((GGNOperator, G), (HessianOperator, H)):
        A = operator(model, loss_fn, (X, y)).to_scipy()
        dense = dense.numpy()
        x = np.random.default_rng(0).standard_normal((dense.shape[0], 2))
        assert A.dtype == np.float64 and A.shape == dense.shape
        np.testing.assert_allclose(A @ x, dense @ x, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(A.matvec(x[:, 0]), dense @ x[:, 0], rtol=1e-10, atol=1e-12)
        values = eigsh(A, k=3, which="LA", return_eigenvectors=False)
        np.testing.assert_allclose(
            np.sort(values), np.sort(np.linalg.eigvalsh(dense))[-3:], rtol=1e-8, atol=1e-10
        )


@pytest.mark.parametrize("case", CASES[:3], ids=["-".join(c) for c in CASES[:3]])
def test_equal_to_curvlinops(case):
    model, loss_fn, X, y = _case(*case)
    params = list(model.parameters())
    batches = [(X[:4], y[:4]), (X[4:], y[4:])]
    V = torch.randn(sum(p.numel() for p in params), 5, dtype=torch.float64)
    for ours, theirs in (
        (GGNOperator, GGNLinearOperator),
        (HessianOperator, HessianLinearOperator),
    ):
        expected = theirs(model, loss_fn, params, batches, num_data=len(X)) @ V
        torch.testing.assert_close(ours(model, loss_fn, batches) @ V, expected)


@pytest.mark.parametrize("extension", [GGNMP(), HMP(), PCHMP()], ids=repr)
def test_block_diagonal_operator_of_the_block_products(extension):
    model, loss_fn, X, y = _case("mlp", "ce", "mean")
    G, H = _dense(model, loss_fn, X, y)
    params = list(model.parameters())
    extend(model)
    with backprop(extension):
        extend(loss_fn)(model(X), y).backward()
    C = BlockDiagonalOperator(params, extension.savefield)
    dense = C.to_dense()
    sizes = [p.numel() for p in params]
    reference = G if extension.savefield == "ggnmp" else H
    for i, block in enumerate(ref.blocks(reference, params)):
        if extension.savefield != "pchmp":  # the PCH block has no dense autograd twin here
            start = sum(sizes[:i])
            rows = slice(start, start + sizes[i])
            torch.testing.assert_close(dense[rows, rows], block)
    off = dense.clone()
    for i in range(len(sizes)):
        start = sum(sizes[:i])
        off[start : start + sizes[i], start : start + sizes[i]] = 0
    assert not off.any()
    values = eigsh(C.to_scipy(), k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(values), torch.linalg.eigvalsh(dense)[-2:].numpy())


def test_errors_name_the_problem():
    model, loss_fn, X, y = _case("mlp", "ce", "mean")
    C = GGNOperator(model, loss_fn, (X, y))
    with pytest.raises(ValueError, match=r"multiplies \[P\] or \[P, K\] with P = 43"):
        C @ torch.ones(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="reduction 'mean' or 'sum'"):
        GGNOperator(model, nn.CrossEntropyLoss(reduction="none"), (X, y))
    with pytest.raises(ValueError, match="not parameters of the model"):
        GGNOperator(model, loss_fn, (X, y), params=[nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="have no 'hmp'"):
        BlockDiagonalOperator(list(model.parameters()), "hmp")
    with pytest.raises(TypeError, match="iterable of batches"):
        GGNOperator(model, loss_fn, [X])
