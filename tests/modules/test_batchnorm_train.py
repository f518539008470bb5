"""BatchNorm in train mode: every quantity of the batch loss as computed, batch statistics
included, against brute force through the whole batch (``tests/batch_coupled.py``).

Models: an MLP with BatchNorm1d after a Linear layer, a CNN with BatchNorm2d between
convolutions and inside residual blocks (also in the projection shortcut), with
``extend()`` alone and after ``convert``. Per-sample gradients are the gradients of each
sample's loss term through the batch statistics (they sum to ``.grad``); the GGN / Hessian
diagonals and products are exact through the batch-coupled Jacobian; Kronecker factors
follow the documented convention (coupled columns as extra samples); batch-averaged
extensions refuse, naming the module; running statistics are updated once per forward.
"""

from __future__ import annotations

import copy

import pytest
import torch
from batch_coupled import BatchReference, batch_statistics_copy, mean_ce_terms, mse_terms
from quantities import close
from torch import nn
from torch.func import functional_call, hessian, jacrev

import hbpkit
import hbpkit.extensions as hx
from hbpkit import backprop, extend
from hbpkit.branching import Residual
from hbpkit.curvature.memory import MemoryPolicy

DT = torch.float64

FIRST_ORDER = {
    "grad_batch": hx.BatchGrad,
    "batch_l2": hx.BatchL2,
    "sum_grad_squared": hx.SumGradSquared,
    "variance": hx.Variance,
}


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 4), nn.BatchNorm1d(4),
        nn.Sigmoid(), nn.Linear(4, 3),
    )  # fmt: skip


def cnn() -> nn.Module:
    """conv -> BN -> residual block (BN inside) -> residual block (BN in both branches)."""
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
        nn.Flatten(),
        nn.Linear(16, 3),
    )


class FunctionalCNN(nn.Module):
    """A CNN written with functional code (``+``, ``flatten``): for ``convert``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        h = torch.tanh(self.bn1(self.conv1(x)))
        h = torch.relu(h + self.bn2(self.conv2(h)))
        return self.fc(torch.flatten(h, 1))


def conv1d() -> nn.Module:
    """BatchNorm1d on ``[N, C, L]``; affine-free BatchNorm3d on ``[N, C, D, H, W]``."""
    return nn.Sequential(
        nn.Conv1d(2, 3, 2), nn.BatchNorm1d(3), nn.Tanh(), nn.Flatten(), nn.Linear(9, 3)
    )


def conv3d() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(1, 2, 2), nn.BatchNorm3d(2, affine=False), nn.Sigmoid(), nn.Flatten(),
        nn.Linear(16, 3),
    )  # fmt: skip


INPUTS = {
    "mlp": (5,),
    "cnn": (1, 4, 4),
    "functional-cnn": (1, 4, 4),
    "conv1d": (2, 4),
    "conv3d": (1, 3, 3, 3),
}
BUILD = {
    "mlp": mlp,
    "cnn": cnn,
    "functional-cnn": FunctionalCNN,
    "conv1d": conv1d,
    "conv3d": conv3d,
}


def _randomized(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = BUILD[name]().double().train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return model


def _data(name: str, loss: str, N: int = 4):
    torch.manual_seed(1)
    X = torch.randn(N, *INPUTS[name], dtype=DT)
    if loss == "ce":
        y = torch.randint(0, 3, (N,))
        return X, y, nn.CrossEntropyLoss(), mean_ce_terms
    y = torch.randn(N, 3, dtype=DT)
    return X, y, nn.MSELoss(reduction="sum"), mse_terms("sum")


def _hbpkit_model(name: str, model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    return extend(hbpkit.convert(model) if name == "functional-cnn" else model)


def _run(name: str, loss: str, *extensions, N: int = 4, memory=None):
    """``(extended model, reference)`` after one backward pass inside ``extensions``."""
    model = _randomized(name)
    X, y, criterion, terms = _data(name, loss, N)
    ours = _hbpkit_model(name, model)
    kwargs = {} if memory is None else {"memory": memory}
    with backprop(*extensions, **kwargs):
        extend(copy.deepcopy(criterion))(ours(X), y).backward()
    return ours, BatchReference(model, X, y, criterion, terms)


def _named(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters by the plain model's names (``convert`` keeps them)."""
    return dict(model.named_parameters())


CASES = [
    ("mlp", "ce"),
    ("mlp", "mse"),
    ("cnn", "ce"),
    ("cnn", "mse"),
    ("functional-cnn", "ce"),
    ("conv1d", "ce"),
    ("conv3d", "mse"),
]


@pytest.mark.parametrize("name, loss", CASES)
def test_first_order_through_batch_statistics(name, loss):
    """grad_batch[n] = d l_n / d p through the batch statistics; it sums to .grad."""
    ours, ref = _run(name, loss, *(e() for e in FIRST_ORDER.values()))
    gb, grad = ref.grad_batch(), ref.grad()
    params = _named(ours)
    assert params.keys() == gb.keys()
    for n, p in params.items():
        g = gb[n]
        close(p.grad, grad[n], f"{n} grad")
        close(p.grad_batch, g, f"{n} grad_batch")
        close(p.grad_batch.sum(0), p.grad, f"{n} grad_batch sums to grad")
        close(p.batch_l2, g.flatten(1).square().sum(1), f"{n} batch_l2")
        close(p.sum_grad_squared, g.square().sum(0), f"{n} sum_grad_squared")
        N = g.shape[0]
        close(p.variance, g.square().sum(0) / N - (g.sum(0) / N).square(), f"{n} variance")


@pytest.mark.parametrize("name, loss", CASES)
def test_diagonals_and_products_through_batch_statistics(name, loss):
    """DiagGGNExact, DiagHessian, GGNMP, HMP: exact through the batch-coupled Jacobian."""
    ours, ref = _run(name, loss, hx.DiagGGNExact(), hx.DiagHessian(), hx.GGNMP(), hx.HMP())
    torch.manual_seed(2)
    for n, p in _named(ours).items():
        G, H = ref.ggn_block(n), ref.hessian_block(n)
        close(p.diag_ggn_exact.flatten(), G.diagonal(), f"{n} diag_ggn_exact")
        close(p.diag_h.flatten(), H.diagonal(), f"{n} diag_h")
        V = torch.randn(2, *p.shape, dtype=DT)
        close(p.ggnmp(V).reshape(2, -1), V.reshape(2, -1) @ G, f"{n} ggnmp")
        close(p.hmp(V).reshape(2, -1), V.reshape(2, -1) @ H, f"{n} hmp")


def test_pch_products_through_batch_statistics():
    """PCHMP: the residual of the batch map with its eigenvalues modified, exact against
    the dense modified residual (a Linear, a BatchNorm1d and the loss only)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double().train()
    X, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    ours = extend(copy.deepcopy(model))
    with backprop(hx.PCHMP(modify="abs"), hx.GGNMP()):
        extend(nn.MSELoss(reduction="sum"))(ours(X), y).backward()
    ref = BatchReference(model, X, y, nn.MSELoss(reduction="sum"), mse_terms("sum"))
    twin = batch_statistics_copy(model)
    h = model[0](X).detach()
    z = twin[1](h).detach()
    g = 2 * (z - y)  # dL/dz
    R = hessian(lambda t: (twin[1](t) * g).sum())(h).reshape(h.numel(), h.numel())
    values, vectors = torch.linalg.eigh(R)
    R_abs = vectors @ torch.diag(values.abs()) @ vectors.T
    for name in ("0.weight", "0.bias"):
        p = dict(ours.named_parameters())[name]
        J = ref.jacobian(name)  # dz/dp
        Jh = jacrev(lambda w, name=name: functional_call(model[0], {name[2:]: w}, (X,)))(
            ref.params[name]
        ).reshape(h.numel(), -1)
        expected = ref.ggn_block(name) + Jh.T @ R_abs @ Jh
        assert J.shape[1] == p.numel()
        V = torch.randn(2, p.numel(), dtype=DT)
        close(p.pchmp(V.reshape(2, *p.shape)).reshape(2, -1), V @ expected, f"{name} pchmp")


def test_monte_carlo_diagonal_converges():
    """DiagGGNMC through the batch statistics: unbiased for the exact GGN diagonal."""
    ours, ref = _run("mlp", "ce", hx.DiagGGNMC(mc_samples=4000), hx.DiagGGNExact())
    for n, p in _named(ours).items():
        if n in ("0.bias", "3.bias"):  # before a BatchNorm: the output does not depend on it
            close(p.diag_ggn_exact, torch.zeros_like(p), n)
            close(p.diag_ggn_mc, torch.zeros_like(p), n)
            continue
        error = (p.diag_ggn_mc - p.diag_ggn_exact).norm() / p.diag_ggn_exact.norm()
        assert error < 0.1, (n, error)


@pytest.mark.parametrize("ext", [hx.KFLR, hx.KFAC])
def test_kronecker_factors_take_coupled_columns_as_samples(ext):
    """The documented convention: G of a weight below a train-mode BatchNorm is
    ``sum_{c,m} s_{c,m} s_{c,m}^T`` over the coupled columns, the sum of the diagonal
    sample blocks of the GGN w.r.t. the layer's output (cross-sample blocks dropped);
    A is the layer's input second moment as in eval mode."""
    model = _randomized("mlp")
    X, y, criterion, terms = _data("mlp", "ce", 5)
    ours = extend(copy.deepcopy(model))
    with backprop(ext() if ext is hx.KFLR else ext(mc_samples=4000)):
        extend(nn.CrossEntropyLoss())(ours(X), y).backward()
    twin = batch_statistics_copy(model)
    h = model[0](X).detach()  # the first Linear's output [N, 4]

    def out(t):
        return twin[1:](t)

    J = jacrev(out)(h).reshape(-1, h.numel())
    z = out(h).detach()
    Hz = hessian(lambda o: criterion(o, y))(z).reshape(z.numel(), z.numel())
    ggn = (J.T @ Hz @ J).reshape(5, 4, 5, 4)
    G = torch.diagonal(ggn, dim1=0, dim2=2).sum(-1)
    A = X.T @ X / 5
    factors = ours[0].weight.kflr if ext is hx.KFLR else ours[0].weight.kfac
    if ext is hx.KFLR:
        close(factors[0], G, "G")
    else:
        assert (factors[0] - G).norm() / G.norm() < 0.1
    close(factors[1], A, "A")


@pytest.mark.parametrize(
    "ext", [hx.KFRA, lambda: hx.HBP(backprop="batch-average", loss_hessian="average")]
)
def test_batch_averaged_extensions_refuse(ext):
    """Batch averaging has no per-sample Jacobian through batch statistics: refused up front,
    naming the module, nothing attached."""
    model = _hbpkit_model("mlp", _randomized("mlp"))
    X, y, _, _ = _data("mlp", "ce")
    loss = extend(nn.CrossEntropyLoss())(model(X), y)
    with pytest.raises(NotImplementedError, match=r"BatchNorm1d '\d'.*train mode.*model.eval"):
        with backprop(ext()):
            loss.backward()
    assert not any(hasattr(p, "kfra") or hasattr(p, "hbp") for p in model.parameters())


def test_memory_budget_refuses_coupled_columns():
    """Coupled columns above the budget: a clear refusal naming the module and what to do."""
    model = _hbpkit_model("cnn", _randomized("cnn"))
    X, y, _, _ = _data("cnn", "ce")
    loss = extend(nn.CrossEntropyLoss())(model(X), y)
    with pytest.raises(MemoryError, match=r"BatchNorm.*model.eval\(\).*smaller batch"):
        with backprop(hx.DiagHessian(), memory=MemoryPolicy(max_dense_bytes=2**12)):
            loss.backward()
    assert not any(hasattr(p, "diag_h") for p in model.parameters())


@pytest.mark.parametrize("name", ["mlp", "cnn", "functional-cnn"])
def test_running_statistics_updated_once_per_forward(name):
    """As in plain PyTorch: one update per forward pass, none from the backward pass."""
    model = _randomized(name)
    X, y, criterion, _ = _data(name, "ce")
    plain = copy.deepcopy(model)
    criterion(plain(X), y).backward()
    ours = _hbpkit_model(name, model)
    with backprop(hx.BatchGrad(), hx.DiagHessian(), hx.HMP()):
        extend(nn.CrossEntropyLoss())(ours(X), y).backward()
    for n, b in plain.named_buffers():
        close(dict(ours.named_buffers())[n], b, n)
    tracked = [b for n, b in ours.named_buffers() if n.endswith("num_batches_tracked")]
    assert tracked and all(int(t) == 1 for t in tracked)


def test_eval_mode_unchanged():
    """eval(): running statistics, per-sample quantities as before (a diagonal Jacobian)."""
    model = _randomized("mlp")
    model(torch.randn(8, 5, dtype=DT))  # running statistics away from their defaults
    model.eval()
    X, y, criterion, _ = _data("mlp", "ce")
    ours = extend(copy.deepcopy(model))
    with backprop(hx.BatchGrad()):
        extend(nn.CrossEntropyLoss())(ours(X), y).backward()
    for n, p in ours.named_parameters():
        per_sample = torch.stack(
            [
                torch.autograd.grad(
                    criterion(model(X[i : i + 1]), y[i : i + 1]) / X.shape[0],
                    dict(model.named_parameters())[n],
                )[0]
                for i in range(X.shape[0])
            ]
        )
        close(p.grad_batch, per_sample, n)


def test_functional_loss_first_order():
    """The loss written functionally (not extended): the pass starts at the model's last
    module, whose gradient holds the per-sample terms."""
    model = _randomized("mlp")
    X, y, criterion, terms = _data("mlp", "ce")
    ours = extend(copy.deepcopy(model))
    with backprop(hx.BatchGrad()):
        nn.functional.cross_entropy(ours(X), y).backward()
    gb = BatchReference(model, X, y, criterion, terms).grad_batch()
    for n, p in ours.named_parameters():
        close(p.grad_batch, gb[n], n)


class TiedAroundBatchNorm(nn.Module):
    """One Linear applied before and after a train-mode BatchNorm (a tied parameter with
    one use coupled and one not)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn, self.out = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.lin(torch.tanh(self.bn(self.lin(x)))))


def test_tied_parameter_across_batchnorm():
    """Per-sample gradients and the GGN diagonal of a parameter used on both sides."""
    torch.manual_seed(0)
    model = TiedAroundBatchNorm().double()
    X, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    ours = extend(hbpkit.convert(copy.deepcopy(model)))
    with backprop(hx.BatchGrad(), hx.DiagGGNExact()):
        extend(nn.CrossEntropyLoss())(ours(X), y).backward()
    ref = BatchReference(model, X, y, nn.CrossEntropyLoss(), mean_ce_terms)
    gb = ref.grad_batch()
    for n, p in ours.named_parameters():
        close(p.grad_batch, gb[n], f"{n} grad_batch")
        close(p.diag_ggn_exact.flatten(), ref.ggn_block(n).diagonal(), f"{n} diag_ggn_exact")
