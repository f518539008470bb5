"""A parameter-free module called several times in one forward pass (issue 15, item 3).

torchvision's ResNets reuse one ``self.relu``; pools and activations are often shared.
Each call of an extended module is its own record (its own input, output and captured
state), so sharing a parameter-free module changes nothing: every quantity must equal
the one of the same model with a separate copy of the module per call, and the
first-order and diagonal quantities must equal their autograd definitions. A module
*with* parameters called twice (tied weights) gets exact first-order quantities, GGN diagonals,
GGN products and Kronecker factors (its uses as positions); the Hessian's is refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from quantities import ALL_EXTENSIONS, DT, Case, first_and_diag_against_plain
from torch import nn

import hbpkit
import hbpkit.extensions as exts
from hbpkit import backprop, extend
from hbpkit.branching import Residual

PRODUCTS = (exts.GGNMP, exts.HMP)


def shared_mlp(act: type[nn.Module]) -> nn.Sequential:
    """Three Linear layers with ONE activation instance between them (called twice)."""
    f = act()
    return nn.Sequential(nn.Linear(5, 4), f, nn.Linear(4, 4), f, nn.Linear(4, 3))


def shared_residual(act: type[nn.Module]) -> nn.Sequential:
    """A residual block whose branch and whose output share one activation (ResNet style)."""
    f = act()
    return nn.Sequential(
        nn.Linear(5, 4),
        f,
        Residual(nn.Sequential(nn.Linear(4, 4), f, nn.Linear(4, 4))),
        f,
        nn.Linear(4, 3),
    )


class FunctionalStyle(nn.Module):
    """``self.act`` used twice in ``forward``, as torchvision writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.act = nn.Tanh()

    def forward(self, x):
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def unshared(model: nn.Module) -> nn.Module:
    """A deep copy in which every module appears once (shared instances duplicated)."""
    copied = copy.deepcopy(model)
    seen: set[int] = set()
    for name, module in list(copied.named_modules(remove_duplicate=False)):
        if id(module) in seen:
            parent, _, attr = name.rpartition(".")
            setattr(copied.get_submodule(parent), attr, copy.deepcopy(module))
        seen.add(id(module))
    return copied


def _quantities(model, X, y, extension) -> list:
    model = extend(model)
    loss = extend(nn.CrossEntropyLoss())(model(X), y)
    with backprop(extension):
        loss.backward()
    return [getattr(p, extension.savefield) for p in model.parameters()]


def _assert_same(a, b, V=None):
    if callable(a):
        torch.testing.assert_close(a(V), b(V), rtol=1e-12, atol=1e-14)
    elif isinstance(a, (tuple, list)):
        for x, z in zip(a, b):
            torch.testing.assert_close(x, z, rtol=1e-12, atol=1e-14)
    else:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("build", [shared_mlp, shared_residual], ids=["chain", "residual"])
@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid, nn.ReLU])
@pytest.mark.parametrize("make", [*ALL_EXTENSIONS, *PRODUCTS], ids=lambda m: repr(m())[:20])
def test_shared_equals_unshared(build, act, make):
    """Every quantity of the shared model equals that of the model with one copy per call."""
    torch.manual_seed(0)
    model = build(act).double()
    twin = unshared(model)
    assert sum(1 for _ in twin.modules()) > sum(1 for _ in model.modules())
    X, y = torch.randn(6, 5, dtype=DT), torch.randint(0, 3, (6,))
    torch.manual_seed(1)  # the same Monte-Carlo draws for both
    shared = _quantities(model, X, y, make())
    torch.manual_seed(1)
    separate = _quantities(twin, X, y, make())
    for p, a, b in zip(model.parameters(), shared, separate):
        _assert_same(a, b, torch.randn(2, *p.shape, dtype=DT))


@pytest.mark.parametrize("build", [shared_mlp, shared_residual], ids=["chain", "residual"])
def test_shared_against_autograd(build):
    """Per-sample gradients, their statistics and the exact diagonals against autograd."""
    case = Case(lambda: build(nn.Tanh), "ce", "mean", (6, 5))
    first_and_diag_against_plain(case)


def test_torchvision_style_module_reused_in_forward():
    """``self.act`` called twice: works with ``extend()`` alone and after ``convert``."""
    torch.manual_seed(0)
    model = FunctionalStyle().double()
    X, y = torch.randn(6, 5, dtype=DT), torch.randint(0, 3, (6,))
    expected = _quantities(unshared_functional(model), X, y, exts.KFLR())
    for candidate in (copy.deepcopy(model), hbpkit.convert(copy.deepcopy(model))):
        got = _quantities(candidate, X, y, exts.KFLR())
        for a, b in zip(got, expected):
            _assert_same(a, b)


def unshared_functional(model: FunctionalStyle) -> nn.Module:
    """The same function as a Sequential with one activation per call."""
    return nn.Sequential(model.fc1, nn.Tanh(), model.fc2, nn.Tanh(), model.fc3)


def _untied_twin(lin: nn.Linear) -> tuple[nn.Module, nn.Linear, nn.Linear]:
    first, second = copy.deepcopy(lin), copy.deepcopy(lin)
    return nn.Sequential(first, nn.Tanh(), second), first, second


@pytest.mark.parametrize("make", [exts.BatchGrad, exts.BatchL2, exts.SumGradSquared, exts.Variance])
def test_tied_parameters_first_order_is_the_sum_over_uses(make):
    """A Linear applied twice: its per-sample gradients are the sums of the two uses'
    (those of an untied twin), and every statistic is formed from the sums."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 3).double()
    twin, first, second = _untied_twin(lin)
    model = extend(nn.Sequential(lin, nn.Tanh(), lin))
    X, y = torch.randn(4, 3, dtype=DT), torch.tensor([0, 1, 2, 1])
    with backprop(exts.BatchGrad()):
        extend(nn.CrossEntropyLoss())(extend(twin)(X), y).backward()
    ext = make()
    with backprop(ext):
        extend(nn.CrossEntropyLoss())(model(X), y).backward()
    for p, a, b in ((lin.weight, first.weight, second.weight), (lin.bias, first.bias, second.bias)):
        g = a.grad_batch + b.grad_batch
        N = g.shape[0]
        expected = {
            "grad_batch": g,
            "batch_l2": g.flatten(1).square().sum(1),
            "sum_grad_squared": g.square().sum(0),
            "variance": g.square().sum(0) / N - (g.sum(0) / N).square(),
        }[ext.savefield]
        torch.testing.assert_close(getattr(p, ext.savefield), expected, rtol=1e-12, atol=1e-14)


def test_weights_tied_between_modules():
    """An embedding and an output layer sharing one weight (a language model's tying)."""
    torch.manual_seed(0)
    emb, head = nn.Embedding(5, 3).double(), nn.Linear(3, 5, bias=False).double()
    head.weight = emb.weight
    model = extend(nn.Sequential(emb, nn.Flatten(), nn.Linear(6, 3).double(), nn.Tanh(), head))
    X, y = torch.tensor([[1, 2], [3, 4], [0, 0]]), torch.tensor([0, 4, 2])
    loss = extend(nn.CrossEntropyLoss())(model(X), y)
    with backprop(exts.BatchGrad()):
        loss.backward()
    g = emb.weight.grad_batch
    assert g.shape == (3, 5, 3)
    torch.testing.assert_close(g.sum(0), emb.weight.grad, rtol=1e-12, atol=1e-14)
    ref = torch.stack(
        [
            torch.autograd.grad(
                extend(nn.CrossEntropyLoss(reduction="sum"))(model(X[n : n + 1]), y[n : n + 1]) / 3,
                emb.weight,
            )[0]
            for n in range(3)
        ]
    )
    torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-14)


def _diagonals(model, loss_fn, X, y):
    """GGN and Hessian diagonals of the loss by definition: ``torch.func`` on the model
    (a copy: ``functional_call`` leaves tied parameters of the model it ran as plain tensors)."""
    from torch.func import functional_call, hessian, jacrev

    params = {k: v.detach() for k, v in model.named_parameters()}
    H = hessian(lambda p: loss_fn(functional_call(model, p, (X,)), y))(params)
    out = model(X).detach()
    J = jacrev(lambda p: functional_call(model, p, (X,)))(params)
    Hz = hessian(lambda z: loss_fn(z, y))(out).reshape(out.numel(), out.numel())
    ggn, hess = {}, {}
    for k, p in params.items():
        Jk = J[k].reshape(out.numel(), -1)
        ggn[k] = (Jk.T @ Hz @ Jk).diagonal().reshape(p.shape)
        hess[k] = H[k][k].reshape(p.numel(), -1).diagonal().reshape(p.shape)
    return ggn, hess


def test_diagonals_of_a_module_applied_twice():
    """The uses' Jacobians are summed before squaring: the exact GGN diagonal. The Hessian
    has cross blocks between the uses (a later use's mixed second derivative in its
    parameter and its input): DiagHessian refuses tied parameters."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 3).double()
    model = nn.Sequential(lin, nn.Tanh(), lin)
    X, y = torch.randn(4, 3, dtype=DT), torch.tensor([0, 1, 2, 1])
    ggn, hess = _diagonals(copy.deepcopy(model), nn.CrossEntropyLoss(), X, y)
    ours = extend(model)
    with backprop(exts.DiagGGNExact(), exts.BatchGrad()):
        extend(nn.CrossEntropyLoss())(ours(X), y).backward()
    for name, p in [("0.weight", lin.weight), ("0.bias", lin.bias)]:
        torch.testing.assert_close(p.diag_ggn_exact, ggn[name], rtol=1e-10, atol=1e-12)
    loss = extend(nn.CrossEntropyLoss())(ours(X), y)
    with pytest.raises(NotImplementedError, match="used 2 times.*DiagHessian"):
        with backprop(exts.DiagHessian()):
            loss.backward()


def test_diagonals_of_embedding_tied_to_the_output_layer():
    torch.manual_seed(0)
    emb, head = nn.Embedding(5, 3).double(), nn.Linear(3, 5, bias=False).double()
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(6, 3).double(), nn.Tanh(), head)
    X, y = torch.tensor([[1, 2], [3, 4], [0, 0]]), torch.tensor([0, 4, 2])
    ggn, _ = _diagonals(copy.deepcopy(model), nn.CrossEntropyLoss(), X, y)
    ours = extend(model)
    with backprop(exts.DiagGGNExact()):
        extend(nn.CrossEntropyLoss())(ours(X), y).backward()
    torch.testing.assert_close(emb.weight.diag_ggn_exact, ggn["0.weight"], rtol=1e-10, atol=1e-12)


def _ggn_blocks(model, loss_fn, X, y):
    """Each parameter's GGN block ``J_p^T H_z J_p`` by definition (``torch.func``)."""
    from torch.func import functional_call, hessian, jacrev

    params = {k: v.detach() for k, v in model.named_parameters()}
    out = model(X).detach()
    J = jacrev(lambda p: functional_call(model, p, (X,)))(params)
    Hz = hessian(lambda z: loss_fn(z, y))(out).reshape(out.numel(), out.numel())
    return {k: J[k].reshape(out.numel(), -1).T @ Hz @ J[k].reshape(out.numel(), -1) for k in J}


def _tied_models():
    torch.manual_seed(0)
    lin = nn.Linear(3, 3).double()
    twice = nn.Sequential(nn.Linear(4, 3).double(), nn.Tanh(), lin, nn.Sigmoid(), lin)
    emb, head = nn.Embedding(5, 3).double(), nn.Linear(3, 5, bias=False).double()
    head.weight = emb.weight
    tied = nn.Sequential(emb, nn.Flatten(), nn.Linear(6, 3).double(), nn.Tanh(), head)
    return {
        "applied_twice": (twice, torch.randn(4, 4, dtype=DT), torch.tensor([0, 1, 2, 1])),
        "embedding_and_head": (
            tied,
            torch.tensor([[1, 2], [3, 4], [0, 0]]),
            torch.tensor([0, 4, 2]),
        ),
    }


@pytest.mark.parametrize("name", ["applied_twice", "embedding_and_head"])
def test_ggn_products_of_tied_parameters(name):
    """``p.ggnmp`` of a tied parameter multiplies by the GGN block of the sum of its uses
    (cross terms between the uses included), for every parameter."""
    model, X, y = _tied_models()[name]
    blocks = _ggn_blocks(copy.deepcopy(model), nn.CrossEntropyLoss(), X, y)
    ours = extend(model)
    with backprop(exts.GGNMP()):
        extend(nn.CrossEntropyLoss())(ours(X), y).backward()
    for k, p in ours.named_parameters():
        V = torch.randn(2, *p.shape, dtype=DT)
        expected = (blocks[k] @ V.flatten(1).T).T.reshape(V.shape)
        torch.testing.assert_close(p.ggnmp(V), expected, rtol=1e-10, atol=1e-12)


def test_kronecker_factors_of_a_linear_applied_twice():
    """KFLR of a tied weight takes its uses as positions (``expand``): ``G = sum_u G_u``
    with ``G_u = sum_n J_{u,n}^T H_n J_{u,n}`` (``J_{u,n}``: the model output's Jacobian
    w.r.t. use ``u``'s output) and ``A = mean_u 1/N sum_n x_{u,n} x_{u,n}^T``."""
    from torch.func import hessian, jacrev, vmap

    model, X, y = _tied_models()["applied_twice"]
    first, act1, lin, act2, _ = model
    with torch.no_grad():
        x1 = act1(first(X))
        x2 = act2(lin(x1))
    N = len(X)

    def output(x, e1, e2):  # perturbations e_u added to the outputs of the two uses
        return lin(act2(lin(act1(first(x))) + e1)) + e2

    zero = torch.zeros(3, dtype=DT)
    J = vmap(jacrev(output, argnums=(1, 2)), in_dims=(0, None, None))(X, zero, zero)
    out = model(X).detach()
    Hz = hessian(lambda z: nn.CrossEntropyLoss()(z, y))(out)  # [N, C, N, C], block-diagonal
    H = torch.stack([Hz[n, :, n] for n in range(N)])
    G = sum(torch.einsum("nco,ncd,ndp->op", Ju, H, Ju) for Ju in J)
    A = (x1.T @ x1 + x2.T @ x2) / (2 * N)
    ours = extend(model)
    with backprop(exts.KFLR()):
        extend(nn.CrossEntropyLoss())(ours(X), y).backward()
    torch.testing.assert_close(lin.weight.kflr[0], G, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lin.weight.kflr[1], A, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lin.bias.kflr[0], G, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "name, make, match",
    [
        ("applied_twice", exts.DiagHessian, r"used 2 times.*Linear '2'.weight"),
        ("applied_twice", exts.HMP, r"used 2 times.*Linear '2'.weight"),
        ("applied_twice", lambda: exts.KFLR(kfac_approx="reduce"), r"used 2 times"),
        ("embedding_and_head", exts.KFLR, r"Kronecker factors of different kinds"),
    ],
)
def test_curvature_of_tied_parameters_that_is_refused(name, make, match):
    """What cannot combine the uses is refused before anything is written, naming them."""
    model, X, y = _tied_models()[name]
    model = extend(model)
    loss = extend(nn.CrossEntropyLoss())(model(X), y)
    ext = make()
    with pytest.raises(NotImplementedError, match=match):
        with backprop(ext):
            loss.backward()
    assert not any(hasattr(p, ext.savefield) for p in model.parameters())
