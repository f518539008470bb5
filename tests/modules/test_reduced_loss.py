"""``ReducedLoss``: a ``reduction="none"`` loss summed or averaged with weights (float64).

The rules scale the Hessian of each term of the inner loss by its weight ``c_i w_i``; they
are checked against the per-sample blocks of the loss Hessian by autograd, for weights per
sample ``[N]`` and per entry of the unreduced loss, negative ones included (signed
factors), and end to end against autograd on a small network.
"""

from __future__ import annotations

import copy

import pytest
import reference as ref
import torch
from quantities import close
from records import record
from torch import nn

from hbpkit import backprop, extend
from hbpkit.extensions import HMP, BatchGrad, DiagGGNExact
from hbpkit.modules.tables import SECOND_ORDER
from hbpkit.reshaping import ReducedLoss

DT = torch.float64


def _inner(name: str):
    """An inner loss with ``reduction="none"``, an input and a target."""
    torch.manual_seed(5)
    x = torch.randn(4, 3, 2, dtype=DT)
    if name == "mse":
        return nn.MSELoss(reduction="none"), x, torch.randn_like(x)
    if name == "bce":
        return nn.BCEWithLogitsLoss(reduction="none"), x, torch.rand_like(x)
    if name == "ce":
        return nn.CrossEntropyLoss(reduction="none"), x[:, :, 0], torch.tensor([0, 2, 1, 2])
    if name == "ce_seq":  # [N, C, T] with ignored targets and class weights
        target = torch.tensor([[0, 2], [1, -100], [2, 2], [-100, 0]])
        weight = torch.tensor([0.5, 1.0, 2.0], dtype=DT)
        return nn.CrossEntropyLoss(weight=weight, reduction="none"), x, target
    raise ValueError(name)


def _weights(kind: str, unreduced_shape: torch.Size) -> torch.Tensor | float | None:
    torch.manual_seed(6)
    if kind == "none":
        return None
    if kind == "scalar":  # ``l.sum() / k`` is ReducedLoss(l, "sum")(x, y, 1 / k)
        return 0.7
    if kind == "per-sample":
        return torch.rand(unreduced_shape[0], dtype=DT) + 0.1
    if kind == "per-entry":
        return torch.rand(unreduced_shape, dtype=DT) + 0.1
    if kind == "signed":  # per entry, some negative
        return torch.randn(unreduced_shape, dtype=DT)
    raise ValueError(kind)


def _case(name: str, kind: str, reduce: str):
    inner, x, target = _inner(name)
    with torch.no_grad():
        w = _weights(kind, inner(x, target).shape)
    module = extend(ReducedLoss(inner, reduce))
    x = x.clone().requires_grad_(True)
    args = (x, target) if w is None else (x, target, w)
    out = module(*args)
    return module, record(out), x, args


def _blocks(module, x, args) -> torch.Tensor:
    """``[N, D, D]``: the per-sample blocks of the Hessian w.r.t. the input, by autograd."""
    hess = torch.autograd.functional.hessian(lambda z: module(z, *args[1:]), x.detach())
    n, d = x.shape[0], x[0].numel()
    hess = hess.reshape(n, d, n, d)
    return torch.stack([hess[i, :, i, :] for i in range(n)])


NAMES = ["mse", "bce", "ce", "ce_seq"]
KINDS = ["none", "scalar", "per-sample", "per-entry", "signed"]


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_reduced_loss_rules(name, kind, reduce):
    """Signed exact factor, batch-summed Hessian and products against autograd."""
    module, call, x, args = _case(name, kind, reduce)
    rules = SECOND_ORDER.lookup(module)
    blocks = _blocks(module, x, args)
    f = rules.signed_sqrt_hessian(call)
    S = f.S.flatten(2)
    signed = S if f.sign is None else S * f.sign[:, :, None]
    torch.testing.assert_close(torch.einsum("vni,vnj->nij", signed, S), blocks)
    assert (f.sign is not None) == (kind == "signed")
    torch.testing.assert_close(rules.sum_hessian(call), blocks.sum(0))
    V = torch.randn(3, *x.shape, dtype=DT)
    expected = torch.einsum("nij,knj->kni", blocks, V.flatten(2)).reshape(V.shape)
    torch.testing.assert_close(rules.hessian_mat_prod(call, V), expected)


@pytest.mark.parametrize("name", NAMES)
def test_reduced_loss_sampled_factor_is_unbiased(name):
    """The signed Monte-Carlo factor averages to the signed Hessian blocks."""
    module, call, x, args = _case(name, "signed", "sum")
    rules = SECOND_ORDER.lookup(module)
    torch.manual_seed(2)
    f = rules.signed_sqrt_hessian_sampled(call, 40_000)
    S = f.S.flatten(2)
    estimate = torch.einsum("vni,vnj->nij", S * f.sign[:, :, None], S)
    blocks = _blocks(module, x, args)
    assert (estimate - blocks).abs().max() / blocks.abs().max() < 0.03


def test_unsigned_factors_refuse_negative_weights():
    module, call, _, _ = _case("ce", "signed", "sum")
    rules = SECOND_ORDER.lookup(module)
    with pytest.raises(NotImplementedError, match="negative term weights"):
        rules.sqrt_hessian(call)
    with pytest.raises(NotImplementedError, match="negative term weights"):
        rules.sqrt_hessian_sampled(call, 1)


def test_reduced_loss_module_checks():
    with pytest.raises(ValueError, match="reduction='none'"):
        ReducedLoss(nn.MSELoss())
    with pytest.raises(ValueError, match="reduce"):
        ReducedLoss(nn.MSELoss(reduction="none"), "max")
    x, y, w = torch.randn(3, 2), torch.randn(3, 2), torch.rand(3)
    loss = ReducedLoss(nn.MSELoss(reduction="none"), "mean")(x, y, w)
    torch.testing.assert_close(loss, ((x - y) ** 2 * w[:, None]).mean())


# --------------------------------------------------------------------------- end to end
def _network_case(signed: bool):
    torch.manual_seed(8)
    plain = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(6, 4, dtype=DT)
    y = torch.randint(0, 3, (6,))
    w = torch.randn(6, dtype=DT) if signed else torch.rand(6, dtype=DT) + 0.1
    loss_fn = ReducedLoss(nn.CrossEntropyLoss(reduction="none"), "mean")
    model = extend(copy.deepcopy(plain))
    return plain, model, extend(loss_fn), X, y, w


def test_weighted_loss_end_to_end():
    """Per-sample gradients ``w_n / N * dl_n``, the weighted GGN diagonal, KFLR at batch
    size 1 scaled, and HMP, against autograd on the plain network."""
    plain, model, loss_fn, X, y, w = _network_case(signed=False)
    with backprop(BatchGrad(), DiagGGNExact(), HMP()):
        loss_fn(model(X), y, w).backward()
    qs = list(plain.parameters())
    out = plain(X)
    loss = loss_fn(out, y, w)
    GGN = ref.ggn(out, lambda o, t: loss_fn(o, t, w), y, qs)
    Hmat = ref.hessian(loss, qs)
    per = [torch.autograd.grad(loss_fn(plain(X[n : n + 1]), y[n : n + 1]), qs) for n in range(6)]
    for i, (p, Gb, Hb) in enumerate(
        zip(model.parameters(), ref.blocks(GGN, qs), ref.blocks(Hmat, qs))
    ):
        gb = torch.stack([per[n][i] * w[n] / 6 for n in range(6)])
        close(p.grad_batch, gb, "grad_batch")
        close(p.diag_ggn_exact, Gb.diagonal().reshape(p.shape), "diag_ggn_exact")
        V = torch.randn(2, *p.shape, dtype=DT)
        close(p.hmp(V), (V.reshape(2, -1) @ Hb.T).reshape(V.shape), "hmp")


def test_negative_weights_products_are_exact():
    """Negative weights: the Hessian-matrix products need no factor and stay exact."""
    plain, model, loss_fn, X, y, w = _network_case(signed=True)
    with backprop(HMP()):
        loss_fn(model(X), y, w).backward()
    qs = list(plain.parameters())
    Hmat = ref.hessian(loss_fn(plain(X), y, w), qs)
    for p, Hb in zip(model.parameters(), ref.blocks(Hmat, qs)):
        V = torch.randn(2, *p.shape, dtype=DT)
        close(p.hmp(V), (V.reshape(2, -1) @ Hb.T).reshape(V.shape), "hmp")


def test_negative_weights_sqrt_factor_extensions():
    """Negative weights: the pass starts from the loss's signed factor."""
    plain, model, loss_fn, X, y, w = _network_case(signed=True)
    with backprop(DiagGGNExact()):
        loss_fn(model(X), y, w).backward()
    qs = list(plain.parameters())
    out = plain(X)
    GGN = ref.ggn(out, lambda o, t: loss_fn(o, t, w), y, qs)
    for p, Gb in zip(model.parameters(), ref.blocks(GGN, qs)):
        close(p.diag_ggn_exact, Gb.diagonal().reshape(p.shape), "diag_ggn_exact")
