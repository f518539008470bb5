"""Branching graphs (residual blocks, sums; supplement B.3) against autograd, float64.

Every quantity on a small ResNet (convolutions, BatchNorm in eval mode, residual
blocks with identity and projection shortcuts, pooling), a transformer-style block
(Linear on ``[N, T, D]``, pre-norm LayerNorm, GELU MLP, residual) and an MLP
with parallel branches is compared with its brute-force definition (:mod:`dag_reference`, dense
Jacobians through the forward graph of a plain copy of the model), all
extensions in one backward pass. Tolerances ``rtol=1e-8, atol=1e-10``.
"""

from __future__ import annotations

import copy

import pytest
import reference as ref
import torch
from dag_checks import (
    DT,
    MAX_ERR,
    check_every_extension,
    close,
    layers,
    randomize_norms,
)
from torch import nn

from hbpkit import backprop, extend
from hbpkit.branching import Parallel, Residual, Sum
from hbpkit.extensions import (
    HBP,
    HMP,
    KFAC,
    KFLR,
    KFRA,
    DiagHessian,
)


@pytest.fixture(autouse=True, scope="module")
def _report():
    yield
    if MAX_ERR:
        print("\nmax abs errors:", {k: f"{v:.1e}" for k, v in sorted(MAX_ERR.items())})


# ------------------------------------------------------------------------------ models
def small_resnet() -> nn.Module:
    """conv -> residual block (identity shortcut) -> residual block (1x1 projection) -> pool.

    BatchNorm2d (eval mode, see :func:`randomize_norms`) after the convolutions.
    """
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        Residual(
            nn.Sequential(
                nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Sigmoid(), nn.Conv2d(3, 3, 1)
            )
        ),
        nn.Tanh(),
        Residual(
            nn.Sequential(
                nn.Conv2d(3, 4, 3, stride=2, padding=1),
                nn.BatchNorm2d(4),
                nn.Tanh(),
                nn.Conv2d(4, 4, 1),
            ),
            shortcut=nn.Sequential(nn.Conv2d(3, 4, 1, stride=2), nn.BatchNorm2d(4)),
        ),
        nn.MaxPool2d(2, stride=1),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def transformer_block() -> nn.Module:
    """``[N, T, D]``: embedding Linear, pre-norm residual GELU MLP, readout (no attention)."""
    D = 4
    return nn.Sequential(
        nn.Linear(3, D),
        Residual(
            nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        ),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * D, 3),
    )


def parallel_mlp() -> nn.Module:
    """Three branches on one input (one of them an identity), summed; then a residual MLP."""
    return nn.Sequential(
        nn.Linear(4, 5),
        nn.Sigmoid(),
        Parallel(
            nn.Sequential(nn.Linear(5, 5), nn.Tanh()),
            nn.Sequential(nn.Linear(5, 3), nn.Softplus(), nn.Linear(3, 5)),
            nn.Identity(),
        ),
        Residual(nn.Sequential(nn.Tanh(), nn.Linear(5, 5))),
        nn.Linear(5, 3),
    )


MODELS = {
    "resnet": (small_resnet, (1, 6, 6)),
    "transformer": (transformer_block, (3, 3)),
    "parallel": (parallel_mlp, (4,)),
}


def _setup(name: str, N: int, seed: int = 0):
    torch.manual_seed(seed)
    build, shape = MODELS[name]
    plain = randomize_norms(build().to(DT))
    model = extend(copy.deepcopy(plain))
    X = torch.randn(N, *shape, dtype=DT)
    y = torch.randint(0, 3, (N,))
    return plain, model, X, y


@pytest.mark.parametrize(
    "name", [pytest.param("resnet", marks=pytest.mark.slow), "transformer", "parallel"]
)
def test_every_extension_against_autograd(name):
    plain, model, X, y = _setup(name, 3)
    check_every_extension(plain, model, X, y, name)


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize(
    "limit", ["kflr_kfra_batch_one", "hbp_hessian_batch_one", "hbp_hessian_sqrt_batch_one"]
)
def test_exact_limits_through_residual_blocks(limit, seed, request):
    """N = 1, no weight sharing: the Kronecker factors of every Linear are its exact blocks,
    per sample and batch-averaged (with the cross blocks between branches), B.3."""
    limit = request.getfixturevalue(limit)
    plain, model, X, y = _setup("parallel", 1, seed=seed)
    loss_fn = nn.CrossEntropyLoss()
    limit.backward(extend(loss_fn)(model(X), y))
    params = [p for layer in layers(plain) for p in (layer.weight, layer.bias)]
    blocks = limit.exact_blocks(plain, loss_fn, X, y, params)
    ours = [p for layer in layers(model) for p in (layer.weight, layer.bias)]
    limit.check(ours, blocks, close, f"seed {seed}")


def test_kfac_converges_to_kflr_on_a_residual_model():
    plain, model, X, y = _setup("parallel", 2, seed=1)
    loss_fn = extend(nn.CrossEntropyLoss())
    with backprop(KFLR(), KFAC(mc_samples=4000)):
        loss_fn(model(X), y).backward()
    for p in model.parameters():
        G_mc, G = p.kfac[0], p.kflr[0]
        assert ((G_mc - G).norm() / G.norm()).item() < 0.1  # about 6 MC standard errors


def test_residual_with_zero_branch_equals_the_chain():
    """A residual branch whose output is zero changes nothing: same quantities as the chain."""
    torch.manual_seed(0)
    head, tail = (
        nn.Sequential(nn.Linear(4, 5), nn.Tanh()),
        nn.Sequential(nn.Sigmoid(), nn.Linear(5, 3)),
    )
    branch = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5))
    for p in branch[2].parameters():
        nn.init.zeros_(p)
    res = extend(nn.Sequential(*head, Residual(branch), *tail).to(DT))
    chain = extend(copy.deepcopy(nn.Sequential(*head, *tail)).to(DT))
    X, y = torch.randn(3, 4, dtype=DT), torch.tensor([0, 2, 1])
    exts = (KFLR(), DiagHessian(), HBP("hessian", "exact", "sqrt"))
    for net in (res, chain):
        with backprop(*exts):
            extend(nn.CrossEntropyLoss())(net(X), y).backward()
    pairs = [(res[0], chain[0]), (res[4], chain[3])]
    for a, b in pairs:
        for pa, pb in zip(a.parameters(), b.parameters()):
            close(pa.diag_h, pb.diag_h, "zero branch diag_h")
            for fa, fb in zip(pa.kflr, pb.kflr):
                close(fa, fb, "zero branch kflr")
            for fa, fb in zip(pa.hbp, pb.hbp):
                close(fa, fb, "zero branch hbp")


def test_sum_of_a_tensor_with_itself():
    """``Sum()(h, h)`` doubles the Jacobian: same as scaling the next weight by 2."""
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.add, self.b = nn.Linear(3, 4), nn.Tanh(), Sum(), nn.Linear(4, 2)

        def forward(self, x):
            h = self.act(self.a(x))
            return self.b(self.add(h, h))

    model = extend(Twice().to(DT))
    plain = copy.deepcopy(model)
    X, y = torch.randn(3, 3, dtype=DT), torch.tensor([0, 1, 1])
    loss_fn = nn.CrossEntropyLoss()
    with backprop(DiagHessian(), HMP()):
        extend(loss_fn)(model(X), y).backward()
    loss = loss_fn(plain(X), y)
    for p, q in zip(plain.parameters(), model.parameters()):
        H = ref.hessian(loss, [p])
        close(q.diag_h, H.diagonal().reshape(p.shape), "sum(h, h) diag_h")
        V = torch.randn(1, *p.shape, dtype=DT)
        close(q.hmp(V).reshape(-1), H @ V.reshape(-1), "sum(h, h) hmp")


def test_batch_averaged_equals_per_sample_on_a_linear_dag():
    """Jacobians that do not depend on the sample make approximation (9) exact: KFRA == KFLR."""
    torch.manual_seed(5)
    model = extend(
        nn.Sequential(
            nn.Linear(4, 5),
            Parallel(
                nn.Linear(5, 5), nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 5)), nn.Identity()
            ),
            Residual(nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5))),
            nn.Linear(5, 2),
        ).to(DT)
    )
    X, Y = torch.randn(4, 4, dtype=DT), torch.randn(4, 2, dtype=DT)
    with backprop(KFRA(), KFLR()):
        extend(nn.MSELoss())(model(X), Y).backward()
    for p in model.parameters():
        for a, b in zip(p.kfra, p.kflr):
            close(a, b, "kfra == kflr, linear DAG")


def test_sum_of_different_shapes_is_refused():
    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.add = nn.Linear(3, 4), nn.Linear(3, 1), Sum()

        def forward(self, x):
            return self.add(self.a(x), self.b(x))

    model = extend(Broadcast().to(DT))
    X, y = torch.randn(2, 3, dtype=DT), torch.tensor([0, 1])
    with pytest.raises(NotImplementedError, match=r"Sum adds inputs of different shapes"):
        with backprop(KFLR()):
            extend(nn.CrossEntropyLoss())(model(X), y).backward()
