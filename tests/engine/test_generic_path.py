"""The generic path: modules and functional code without rules, exact through autograd.

Two kinds of checks, in float64:

* twins: a module without rules (``forward`` written with torch functions) against the
  same function served by hbpkit's rules (``nn.Tanh``, ``nn.Linear``, :class:`Sum`), for
  every extension, in one backward pass each; the two must agree to round-off (Monte-Carlo
  extensions draw the same samples at the loss);
* brute force: converted models with attention, bare parameters, ``torch.cat`` and products
  of two tensors, ``nn.MultiheadAttention``, ``nn.Upsample``/``nn.PixelShuffle`` and a user
  module with parameters, against per-sample gradients, GGN and Hessian blocks computed with
  ``torch.func`` on the plain model (:func:`brute_force`).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from quantities import ALL_EXTENSIONS, DT, SAVEFIELDS, assert_nothing_attached, close
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import hbpkit
from hbpkit import backprop, extend
from hbpkit.branching import Sum
from hbpkit.extensions import (
    GGNMP,
    HBP,
    HMP,
    KFAC,
    KFLR,
    KFRA,
    PCHMP,
    BatchGrad,
    DiagGGNExact,
    DiagHessian,
)
from hbpkit.regions import LinearRegion, Region, SelectionRegion

N = 3


# ----------------------------------------------------------------------------- twins
class FunctionalTanh(nn.Module):
    def forward(self, x):
        return torch.tanh(x)


class FunctionalLinear(nn.Module):
    """``F.linear`` with parameters of its own: no rules, the generic path."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class TwoInputSum(nn.Module):
    """``a + b`` of two branches: a generic module with two followed inputs."""

    def forward(self, a, b):
        return a + b


class Branches(nn.Module):
    def __init__(self, add: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.a, self.b, self.act, self.add = nn.Linear(5, 4), nn.Linear(5, 4), act, add
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.add(self.act(self.a(x)), self.b(x)))


def _twin_pairs():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    rules = nn.Sequential(
        nn.Linear(5, 4), nn.Tanh(), copy.deepcopy(lin), nn.Tanh(), nn.Linear(4, 3)
    )
    generic = copy.deepcopy(rules)
    generic[1], generic[3] = FunctionalTanh(), FunctionalTanh()
    torch.manual_seed(1)
    branch_rules = Branches(Sum(), nn.Sigmoid())
    branch_generic = copy.deepcopy(branch_rules)
    branch_generic.add = TwoInputSum()
    return {
        "elementwise": (rules, generic),
        "two inputs": (branch_rules, branch_generic),
    }


TWINS = _twin_pairs()


def _run(model, X, y, ext, seed=5):
    model = extend(copy.deepcopy(model).double())
    loss = extend(nn.CrossEntropyLoss())(model(X), y)
    torch.manual_seed(seed)  # the same Monte-Carlo samples for both twins
    with backprop(ext):
        loss.backward()
    return model


@pytest.mark.parametrize("twin", list(TWINS))
@pytest.mark.parametrize("make", ALL_EXTENSIONS, ids=lambda e: getattr(e, "__name__", "HBP"))
def test_generic_modules_agree_with_rules(twin, make):
    """Every extension through parameter-free modules without rules equals the rules' result."""
    with_rules, generic = TWINS[twin]
    torch.manual_seed(2)
    X, y = torch.randn(N, 5, dtype=DT), torch.tensor([0, 2, 1])
    ext = make()
    if twin == "two inputs" and getattr(ext.message, "batch_averaged", False):  # not split
        with pytest.raises(NotImplementedError, match="TwoInputSum 'add' has several inputs"):
            _run(generic, X, y, ext)
        return
    a, b = _run(with_rules, X, y, ext), _run(generic, X, y, make())
    field = ext.savefield
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        expected, actual = getattr(p, field), getattr(q, field)
        if isinstance(expected, list):
            assert len(actual) == len(expected)
            for e, g in zip(expected, actual):
                close(g, e, f"{field} of {name}")
        else:
            close(actual, expected, f"{field} of {name}")


@pytest.mark.parametrize("make", [BatchGrad, DiagGGNExact, DiagHessian])
def test_generic_module_with_parameters_agrees_with_linear_rules(make):
    """A module with parameters and no rules: per-sample gradients and diagonals as Linear's."""
    torch.manual_seed(0)
    with_rules = nn.Sequential(
        nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)
    )
    generic = copy.deepcopy(with_rules)
    generic[2] = FunctionalLinear(with_rules[2])
    X, y = torch.randn(N, 5, dtype=DT), torch.tensor([0, 2, 1])
    a, b = _run(with_rules, X, y, make()), _run(generic, X, y, make())
    field = SAVEFIELDS[make]
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        close(getattr(q, field), getattr(p, field), f"{field} of {name}")


# ----------------------------------------------------------------------------- brute force
def brute_force(model: nn.Module, X, y):
    """Per-sample gradients, GGN and Hessian blocks ``{name: ...}`` of the mean cross-entropy
    of ``model`` by definition (``torch.func`` on the plain model, attention in its
    composite form, which has forward-mode derivatives)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def out_n(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    def loss_n(p, x, t):  # sample n's term of the mean
        return F.cross_entropy(out_n(p, x).unsqueeze(0), t.unsqueeze(0)) / X.shape[0]

    with sdpa_kernel(SDPBackend.MATH):
        grads = vmap(grad(loss_n), in_dims=(None, 0, 0))(params, X, y)
        J = vmap(jacrev(out_n), in_dims=(None, 0))(params, X)  # {name: [N, C, *p]}
        Z = vmap(out_n, in_dims=(None, 0))(params, X)
        Hz = vmap(hessian(lambda z, t: F.cross_entropy(z[None], t[None]) / X.shape[0]))(Z, y)
        H = hessian(lambda p: F.cross_entropy(functional_call(model, p, (X,)), y))(params)
    ggn, hess = {}, {}
    for k, p in params.items():
        Jk = J[k].reshape(X.shape[0], Z.shape[1], -1)
        ggn[k] = torch.einsum("nci,ncd,ndj->ij", Jk, Hz, Jk)
        hess[k] = H[k][k].reshape(p.numel(), p.numel())
    return grads, ggn, hess


class Attention(nn.Module):
    """Single-head self-attention written out: matmuls, a scaling and a softmax."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 2.0, -1)
        return self.head((a @ self.v(x)).flatten(1))


class BareParameters(nn.Module):
    """A scale and a positional embedding as bare ``nn.Parameter`` s."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(8, 3)
        self.pos = nn.Parameter(torch.randn(2, 4))
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        h = torch.tanh(self.a(x) * self.scale + self.pos)
        return self.b(h.reshape(h.shape[0], -1))


class CatProduct(nn.Module):
    """``cat([u * v, sin(u)])``: a product of two branches (residual cross terms)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(8, 3)

    def forward(self, x):
        u, v = self.a(x), self.b(x)
        return self.c(torch.cat([u * v, torch.sin(u)], dim=1))


class SineProjection(nn.Module):
    """A user module with a parameter of its own and no rules."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return torch.sin(x @ self.w)


class TorchAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].flatten(1))


class MaskedAttention(nn.Module):
    """Masks passed by keyword: the generic path replays the call with them (a padding
    mask per sample, sliced per sample for per-sample gradients)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(12, 3)
        self.register_buffer("causal", torch.ones(3, 3).triu(1).bool())

    def forward(self, x):
        pad = (x[:, :, 0] > 1.0) & (torch.arange(3) > 0)  # [N, T]: data, never the first
        out = self.attn(x, x, x, attn_mask=self.causal, key_padding_mask=pad, need_weights=False)
        return self.head(out[0].flatten(1))


class Upsampling(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.up, self.shuffle = nn.Upsample(scale_factor=2), nn.PixelShuffle(2)
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        return self.head(torch.flatten(self.shuffle(self.up(torch.tanh(self.conv(x)))), 1))


MODELS = {
    "attention": (Attention, (3, 4), True),
    "bare parameters": (BareParameters, (2, 3), True),
    "cat and product": (CatProduct, (3,), True),
    "user module": (
        lambda: nn.Sequential(nn.Linear(3, 3), SineProjection(), nn.Linear(4, 3)),
        (3,),
        False,
    ),
    "MultiheadAttention": (TorchAttention, (3, 4), True),
    "masks by keyword": (MaskedAttention, (3, 4), True),
    "upsample and pixel shuffle": (Upsampling, (1, 2, 2), True),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_generic_path_matches_brute_force(name):
    build, shape, convert = MODELS[name]
    torch.manual_seed(0)
    plain = build().double()
    X, y = torch.randn(N, *shape, dtype=DT), torch.tensor([0, 2, 1])
    model = hbpkit.convert(copy.deepcopy(plain)) if convert else copy.deepcopy(plain)
    extend(model)
    torch.testing.assert_close(model(X), plain(X), rtol=0, atol=1e-14)
    with backprop(BatchGrad(), DiagGGNExact(), DiagHessian(), GGNMP(), HMP()):
        extend(nn.CrossEntropyLoss())(model(X), y).backward()
    grads, ggn, hess = brute_force(plain, X, y)
    ours = {id(p): p for p in model.parameters()}
    assert len(ours) == len(list(plain.parameters()))
    plain_to_ours = dict(zip([n for n, _ in plain.named_parameters()], _matching(plain, model)))
    for k in grads:
        p = plain_to_ours[k]
        P = p.numel()
        V = torch.randn(2, *p.shape, dtype=DT)
        close(p.grad_batch, grads[k], f"grad_batch {k}")
        close(p.diag_ggn_exact, ggn[k].diagonal().reshape(p.shape), f"diag_ggn_exact {k}")
        close(p.diag_h, hess[k].diagonal().reshape(p.shape), f"diag_h {k}")
        close(p.ggnmp(V).reshape(2, P), V.reshape(2, P) @ ggn[k], f"ggnmp {k}")
        close(p.hmp(V).reshape(2, P), V.reshape(2, P) @ hess[k], f"hmp {k}")


def _matching(plain: nn.Module, model: nn.Module) -> list[nn.Parameter]:
    """``model``'s parameters in the order of ``plain``'s (a converted model moves bare
    parameters into regions; values identify them, all are distinct random draws)."""
    ours = list(dict.fromkeys(model.parameters()))
    out = []
    for q in plain.parameters():
        match = [p for p in ours if p.shape == q.shape and torch.equal(p.detach(), q.detach())]
        assert len(match) == 1
        out.append(match[0])
    return out


# ----------------------------------------------------------------------------- what convert makes
def test_convert_classifies_regions():
    """Reshapes are selections, scalings linear, attention general (no residual skipped)."""
    converted = hbpkit.convert(Attention())
    kinds = {type(m) for m in converted.modules() if isinstance(m, Region)}
    assert kinds == {Region}

    class Reshapes(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.a(x).view(x.shape[0], 2, 3).transpose(1, 2).reshape(x.shape[0], 6)
            return self.b(2.0 * h.flip(1) - h)

    converted = hbpkit.convert(Reshapes())
    kinds = [type(m) for m in converted.modules() if isinstance(m, Region)]
    assert kinds == [LinearRegion]

    class Select(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(self.a(x).view(-1, 2, 3).permute(0, 2, 1).flatten(1))

    kinds = [type(m) for m in hbpkit.convert(Select()).modules() if isinstance(m, Region)]
    assert kinds == [SelectionRegion]


# ----------------------------------------------------------------------------- refusals
def _refused(model, ext, match, X=None):
    X = torch.randn(N, 5, dtype=DT) if X is None else X
    model = extend(model.double())
    loss = extend(nn.CrossEntropyLoss())(model(X), torch.tensor([0, 2, 1]))
    with pytest.raises(NotImplementedError, match=match):
        with backprop(ext):
            loss.backward()
    assert_nothing_attached(model)


KRONECKER = (KFAC, KFLR, KFRA, lambda: HBP("hessian", "average", "batch-average"))


@pytest.mark.parametrize("make", KRONECKER, ids=lambda e: getattr(e, "__name__", "HBP"))
def test_kronecker_factors_of_a_module_without_rules_are_refused(make):
    """No Kronecker factors for a module without rules: refused before anything is written,
    naming the module's path and the extension."""
    torch.manual_seed(0)
    inner = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), FunctionalLinear(inner), nn.Linear(4, 3))
    ext = make()
    _refused(model, ext, rf"FunctionalLinear '2'.*{type(ext).__name__}")


def test_active_dropout_inside_a_module_without_rules_is_refused():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return self.drop(x @ self.w)

    model = nn.Sequential(nn.Linear(5, 4), Noisy(), nn.Linear(4, 3))
    _refused(model, BatchGrad(), r"Noisy '1'.*active dropout layer 'drop'.*eval\(\)")


def test_batch_dimension_must_stay_first():
    class Transposed(nn.Module):
        def forward(self, x):
            return x.T

    class Back(nn.Module):
        def forward(self, x):
            return x.T

    model = nn.Sequential(nn.Linear(5, 4), Transposed(), Back(), nn.Linear(4, 3))
    _refused(model, DiagGGNExact(), r"(Transposed '1'|Back '2').*batch dimension first")


def test_products_through_regions_with_several_inputs():
    """PCH products need the eigenvalues of the coupled residual of ``u * v``: exact when the
    residual is what the brute force gives (Hessian), and a valid PSD product otherwise."""
    torch.manual_seed(0)
    plain = CatProduct().double()
    X, y = torch.randn(N, 3, dtype=DT), torch.tensor([0, 2, 1])
    model = extend(hbpkit.convert(copy.deepcopy(plain)))
    with backprop(PCHMP()):
        extend(nn.CrossEntropyLoss())(model(X), y).backward()
    for p in model.parameters():
        V = torch.randn(4, *p.shape, dtype=DT)
        M = p.pchmp(V).reshape(4, -1) @ V.reshape(4, -1).T
        assert torch.linalg.eigvalsh((M + M.T) / 2).min() > -1e-12


@pytest.mark.parametrize("modify", ["abs", "clip"])
def test_pch_products_of_a_parameter_without_rules(modify):
    """Next to the loss, the PCH block of a parameter without rules is ``G + m(R_p)``: the
    GGN plus the modified residual ``R_p = H - G`` of its own second derivatives."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 3), SineProjection()).double()
    X, y = torch.randn(N, 3, dtype=DT), torch.tensor([0, 3, 1])
    model = extend(copy.deepcopy(plain))
    with backprop(PCHMP(modify)):
        extend(nn.CrossEntropyLoss())(model(X), y).backward()
    _, ggn, hess = brute_force(plain, X, y)
    values, vectors = torch.linalg.eigh(hess["1.w"] - ggn["1.w"])
    values = values.abs() if modify == "abs" else values.clamp(min=0)
    pch = ggn["1.w"] + (vectors * values) @ vectors.T
    w = model[1].w
    V = torch.randn(2, *w.shape, dtype=DT)
    close(w.pchmp(V).reshape(2, -1), V.reshape(2, -1) @ pch, "pchmp of a parameter without rules")


def test_the_dense_residual_is_checked_before_the_pass():
    """The per-sample residual of a nonlinear module without rules is dense ``[N, D, D]``:
    over the budget, DiagHessian is refused before anything is written; the GGN and
    Hessian products (Hessian-vector products) need no dense residual and run."""
    from hbpkit import MemoryPolicy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 40), FunctionalTanh(), nn.Linear(40, 3))
    small = MemoryPolicy(max_dense_bytes=2 * 40 * N * 40 * 8 - 1)
    X, y = torch.randn(N, 5, dtype=DT), torch.tensor([0, 2, 1])
    ours = extend(copy.deepcopy(model).double())
    loss = extend(nn.CrossEntropyLoss())(ours(X), y)
    with pytest.raises(NotImplementedError, match=r"per-sample residual.*FunctionalTanh '1'"):
        with backprop(DiagHessian(), memory=small):
            loss.backward()
    assert_nothing_attached(ours)
    for ext in (DiagGGNExact(), HMP()):
        loss = extend(nn.CrossEntropyLoss())(ours(X), y)
        with backprop(ext, memory=small):
            loss.backward()
