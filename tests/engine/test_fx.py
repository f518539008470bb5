"""``hbpkit.convert``: ordinary models with ``+``, ``torch.flatten``, functional activations.

The converted models compute the same function, and every extension on them
matches autograd (the checks of ``test_branching.py``); what cannot be
rewritten raises an error naming the operation.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from dag_checks import DT, check_every_extension, randomize_norms
from example_scripts import load_example
from torch import nn

import hbpkit
from hbpkit import extend
from hbpkit.branching import Sum
from hbpkit.regions import Region


class BasicBlock(nn.Module):
    """A torchvision-style residual block: ``out += identity`` in forward."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(c_out), nn.BatchNorm2d(c_out)
        self.downsample = None if stride == 1 else nn.Conv2d(c_in, c_out, 1, stride=stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(torch.tanh(self.bn1(self.conv1(x)))))
        out += identity
        return torch.sigmoid(out)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.layer1 = BasicBlock(2, 2)
        self.layer2 = BasicBlock(2, 3, stride=2)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        x = self.pool(self.layer2(self.layer1(F.relu(self.stem(x)))))
        return self.fc(torch.flatten(x, 1))


class MLPBlock(nn.Module):
    """Pre-norm transformer MLP block without attention, ``x + mlp(x)`` on ``[N, T, D]``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.block, self.head = nn.Linear(3, 4), MLPBlock(4), nn.Linear(8, 3)

    def forward(self, x):
        h = self.block(self.embed(x))
        return self.head(h.reshape(h.size(0), -1))


def _converted(model: nn.Module, shape: tuple[int, ...], N: int = 2):
    torch.manual_seed(0)
    model = randomize_norms(model.to(DT))
    X = torch.randn(N, *shape, dtype=DT)
    converted = hbpkit.convert(model)
    torch.testing.assert_close(converted(X), model(X), rtol=0, atol=0)
    return converted, X


@pytest.mark.parametrize(
    ("build", "shape", "sums"),
    [
        pytest.param(TinyResNet, (1, 4, 4), 2, marks=pytest.mark.slow, id="resnet"),
        pytest.param(TinyTransformer, (2, 3), 1, id="transformer"),
    ],
)
def test_converted_models_match_autograd(build, shape, sums):
    converted, X = _converted(build(), shape)
    assert sum(isinstance(m, Sum) for m in converted.modules()) == sums
    plain = copy.deepcopy(converted)
    y = torch.tensor([0, 2])
    check_every_extension(plain, extend(converted), X, y, f"convert {build.__name__}")


def test_view_add_and_flatten_forms():
    class Forms(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = x.view(x.size(0), -1)
            h = torch.add(self.a(h), h)
            h = h.add(torch.relu(h))
            return self.b(h.flatten(1))

    converted, X = _converted(Forms(), (2, 3))
    kinds = [type(m).__name__ for m in converted.children()]
    assert kinds.count("Sum") == 2 and kinds.count("Flatten") == 2 and "ReLU" in kinds


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), -1)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x):
        return self.a(x) + 1.0


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else x


def test_what_cannot_be_traced_is_named():
    with pytest.raises(NotImplementedError, match=r"could not trace Branchy with torch.fx"):
        hbpkit.convert(Branchy())


@pytest.mark.parametrize("model", [Attention(), Scaled()], ids=["attention", "add-constant"])
def test_functional_code_becomes_regions(model):
    """What has no module of its own (matmuls, softmax, adding a constant) becomes a region:
    the same function (exactness: ``test_generic_path.py``)."""
    converted = hbpkit.convert(model)
    assert any(isinstance(m, Region) for m in converted.modules())
    x = torch.randn(2, 3, 4) if isinstance(model, Attention) else torch.randn(2, 3)
    torch.testing.assert_close(converted(x), model(x), rtol=0, atol=0)


def test_convert_needs_a_module():
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        hbpkit.convert(lambda x: x)


@pytest.mark.slow
def test_resnet_example_matches_autograd():
    results = load_example("resnet_curvature").main()
    assert results["error"] < 1e-10
    assert len(results["kflr"]) == 14


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resnet_against_backpack_converter():
    """BackPACK 1.7.1 computes DiagGGNExact and BatchGrad through its own ``SumModule``.

    In float32: BackPACK's ``SumModule`` path fails in float64 ("expected scalar type
    Double but found Float"); tolerances are float32 round-off.
    """
    from backpack import backpack as bp_backpack
    from backpack import extend as bp_extend
    from backpack import extensions as bpext
    from backpack.custom_module.branching import SumModule

    from hbpkit.extensions import BatchGrad, DiagGGNExact

    torch.manual_seed(0)
    converted = hbpkit.convert(randomize_norms(TinyResNet()))  # BatchNorm in eval mode
    ours = extend(copy.deepcopy(converted))
    for name, module in list(converted.named_children()):
        if isinstance(module, Sum):
            setattr(converted, name, SumModule())
    theirs = bp_extend(converted, use_converter=True)
    X, y = torch.randn(3, 1, 4, 4), torch.tensor([0, 2, 1])
    with bp_backpack(bpext.DiagGGNExact(), bpext.BatchGrad()):
        bp_extend(nn.CrossEntropyLoss())(theirs(X), y).backward()
    with hbpkit.backprop(DiagGGNExact(), BatchGrad()):
        extend(nn.CrossEntropyLoss())(ours(X), y).backward()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p.diag_ggn_exact, q.diag_ggn_exact, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(p.grad_batch, q.grad_batch, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_unreduced_functional_loss_then_reduced(reduce):
    """``F.cross_entropy(out, y, reduction="none").mean()`` in ``forward`` becomes a
    ``ReducedLoss``; per-sample gradients and the GGN diagonal are exact."""
    from torch.func import functional_call, hessian

    from hbpkit.extensions import BatchGrad, DiagGGNExact
    from hbpkit.reshaping import ReducedLoss

    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)

        def forward(self, x, y):
            per = F.cross_entropy(self.b(torch.tanh(self.a(x))), y, reduction="none")
            return per.sum() if reduce == "sum" else per.mean()

    torch.manual_seed(0)
    model = WithLoss().double()
    X, y = torch.randn(4, 3, dtype=DT), torch.tensor([0, 2, 1, 1])
    converted = extend(hbpkit.convert(copy.deepcopy(model)))
    assert any(isinstance(m, ReducedLoss) for m in converted.modules())
    with hbpkit.backprop(BatchGrad(), DiagGGNExact()):
        converted(X, y).backward()
    params = {k: v.detach() for k, v in model.named_parameters()}
    last = params["b.weight"]  # behind the last nonlinearity: the GGN block is the Hessian's
    H = hessian(lambda w: functional_call(model, {**params, "b.weight": w}, (X, y)))(last)
    expected = H.reshape(last.numel(), -1).diagonal().reshape(last.shape)
    torch.testing.assert_close(converted.b.weight.diag_ggn_exact, expected, rtol=1e-10, atol=1e-12)
    for p in converted.parameters():
        torch.testing.assert_close(p.grad_batch.sum(0), p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("weights", ["per_sample", "number", "buffer"])
def test_weighted_unreduced_loss_then_reduced(reduce, weights):
    """``(F.cross_entropy(out, y, reduction="none") * w).sum()`` becomes a weighted
    ``ReducedLoss`` (weights an input, a number or a buffer, negative ones included);
    per-sample gradients and the GGN diagonal equal their ``torch.func`` definitions."""
    from torch.func import functional_call, hessian, jacrev

    from hbpkit.extensions import BatchGrad, DiagGGNExact
    from hbpkit.reshaping import ReducedLoss

    class WeightedLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)
            self.register_buffer("w", torch.tensor([0.5, -1.0, 2.0, 1.5], dtype=DT))

        def forward(self, x, y, w):
            per = F.cross_entropy(self.b(torch.tanh(self.a(x))), y, reduction="none")
            if weights == "per_sample":
                weighted = per * w
            elif weights == "number":
                weighted = 0.75 * per
            else:
                weighted = per.mul(self.w)
            return weighted.sum() if reduce == "sum" else torch.mean(weighted)

    torch.manual_seed(0)
    model = WeightedLoss().double()
    X, y = torch.randn(4, 3, dtype=DT), torch.tensor([0, 2, 1, 1])
    w = torch.tensor([1.0, -0.5, 2.0, 0.25], dtype=DT)
    converted = extend(hbpkit.convert(copy.deepcopy(model)))
    assert any(isinstance(m, ReducedLoss) for m in converted.modules())
    with hbpkit.backprop(BatchGrad(), DiagGGNExact()):
        converted(X, y, w).backward()
    params = {k: v.detach() for k, v in model.named_parameters()}
    last = params["b.weight"]  # behind the last nonlinearity: the GGN block is the Hessian's
    H = hessian(lambda v: functional_call(model, {**params, "b.weight": v}, (X, y, w)))(last)
    expected = H.reshape(last.numel(), -1).diagonal().reshape(last.shape)
    torch.testing.assert_close(converted.b.weight.diag_ggn_exact, expected, rtol=1e-10, atol=1e-12)

    factor = {"per_sample": w, "number": torch.full((4,), 0.75, dtype=DT), "buffer": model.w}
    scale = factor[weights] / (len(y) if reduce == "mean" else 1)

    def terms(p):  # the batch loss's per-sample terms w_n l_n (/ N for "mean")
        hidden = torch.tanh(F.linear(X, p["a.weight"], p["a.bias"]))
        logits = F.linear(hidden, p["b.weight"], p["b.bias"])
        return scale * F.cross_entropy(logits, y, reduction="none")

    per_sample = jacrev(terms)(params)
    for name, p in converted.named_parameters():
        torch.testing.assert_close(p.grad_batch, per_sample[name], rtol=1e-10, atol=1e-12)
    for p in converted.parameters():
        torch.testing.assert_close(p.grad_batch.sum(0), p.grad, rtol=1e-10, atol=1e-12)


def test_reduced_loss_refuses_a_weight_with_gradient():
    """A loss weight computed from parameters is not data: a clear error, not a silent detach."""
    from hbpkit.reshaping import ReducedLoss

    loss = ReducedLoss(nn.MSELoss(reduction="none"))
    weight = torch.ones(3, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match="loss weight requires grad"):
        loss(torch.randn(3, 2, dtype=DT), torch.randn(3, 2, dtype=DT), weight)
