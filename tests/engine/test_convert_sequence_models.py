"""A GPT block as users write it, converted: exact per sequence (float64).

Token ``nn.Embedding``, a bare ``nn.Parameter`` positional embedding, pre-norm causal
self-attention through ``F.scaled_dot_product_attention`` (head split and merge by
views and transposes, shape arithmetic ``D // heads``), a GELU MLP, residuals, and the
next-token loss ``F.cross_entropy(logits.view(-1, V), targets.view(-1))`` inside
``forward``: ``hbpkit.convert`` makes the loss a module, the ``view`` a
:class:`~hbpkit.reshaping.MergeBatch` and the attention a region. The samples are the
sequences: per-sample gradients, GGN and Hessian diagonals and block products are
checked against ``torch.func`` by definition.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import hbpkit
from hbpkit import backprop, extend
from hbpkit.extensions import GGNMP, HMP, KFAC, KFLR, BatchGrad, DiagGGNExact, DiagHessian
from hbpkit.regions import Region
from hbpkit.reshaping import MergeBatch

DT = torch.float64
N, T, V, D, HEADS = 3, 4, 5, 4, 2


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q = q.view(B, L, HEADS, C // HEADS).transpose(1, 2)
        k = k.view(B, L, HEADS, C // HEADS).transpose(1, 2)
        v = v.view(B, L, HEADS, C // HEADS).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, L, C))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(V, D)
        self.wpe = nn.Parameter(0.1 * torch.randn(T, D))
        self.block = Block()
        self.ln_f, self.head = nn.LayerNorm(D), nn.Linear(D, V, bias=False)

    def logits(self, idx):
        x = self.wte(idx) + self.wpe[: idx.size(1)]
        return self.head(self.ln_f(self.block(x)))

    def forward(self, idx, targets):
        logits = self.logits(idx)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def _randomized():
    torch.manual_seed(0)
    model = GPT().double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(0.3 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))
    idx = torch.randint(0, V, (N, T))
    targets = torch.randint(0, V, (N, T))
    return model, idx, targets


def _reference(model: GPT, idx, targets):
    """Per-sequence gradients, GGN and Hessian blocks of the mean next-token loss."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def out_n(p, i):  # the logits of sequence i, [T, V]
        return functional_call(_Logits(model), {f"gpt.{k}": v for k, v in p.items()}, (i[None],))[0]

    def loss_of_logits(z, t):  # sequence n's term of the mean over all N T tokens
        return F.cross_entropy(z, t, reduction="sum") / (N * T)

    with sdpa_kernel(SDPBackend.MATH):
        g = vmap(grad(lambda p, i, t: loss_of_logits(out_n(p, i), t)), in_dims=(None, 0, 0))(
            params, idx, targets
        )
        J = vmap(jacrev(out_n), in_dims=(None, 0))(params, idx)  # {name: [N, T, V, *p]}
        Z = vmap(out_n, in_dims=(None, 0))(params, idx)
        Hz = vmap(hessian(loss_of_logits))(Z, targets)  # [N, T, V, T, V]
        H = hessian(lambda p: functional_call(model, p, (idx, targets)))(params)
    ggn, hess = {}, {}
    for k, p in params.items():
        Jk = J[k].reshape(N, T * V, -1)
        ggn[k] = torch.einsum("nai,nab,nbj->ij", Jk, Hz.reshape(N, T * V, T * V), Jk)
        hess[k] = H[k][k].reshape(p.numel(), p.numel())
    return g, ggn, hess


class _Logits(nn.Module):
    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, idx):
        return self.gpt.logits(idx)


def test_convert_maps_the_loss_the_merge_and_the_attention():
    model, idx, targets = _randomized()
    converted = hbpkit.convert(model)
    kinds = [type(m) for m in converted.modules()]
    assert nn.CrossEntropyLoss in kinds and MergeBatch in kinds and Region in kinds
    torch.testing.assert_close(converted(idx, targets), model(idx, targets), rtol=0, atol=1e-15)


def test_gpt_block_is_exact_per_sequence():
    model, idx, targets = _randomized()
    ours = extend(hbpkit.convert(copy.deepcopy(model)))
    with backprop(BatchGrad(), DiagGGNExact(), DiagHessian(), GGNMP(), HMP()):
        ours(idx, targets).backward()
    g, ggn, hess = _reference(model, idx, targets)
    by_value = {id(q): name for name, q in model.named_parameters()}
    mapping = dict(zip(by_value.values(), _same_params(model, ours)))
    for name, p in mapping.items():
        P = p.numel()
        Vs = torch.randn(2, *p.shape, dtype=DT)
        torch.testing.assert_close(p.grad_batch, g[name], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(
            p.diag_ggn_exact, ggn[name].diagonal().reshape(p.shape), rtol=1e-8, atol=1e-10
        )
        torch.testing.assert_close(
            p.diag_h, hess[name].diagonal().reshape(p.shape), rtol=1e-8, atol=1e-10
        )
        torch.testing.assert_close(
            p.ggnmp(Vs).reshape(2, P), Vs.reshape(2, P) @ ggn[name], rtol=1e-8, atol=1e-10
        )
        torch.testing.assert_close(
            p.hmp(Vs).reshape(2, P), Vs.reshape(2, P) @ hess[name], rtol=1e-8, atol=1e-10
        )


@pytest.mark.parametrize("make", [KFAC, KFLR])
def test_gpt_block_kronecker_factors_of_its_linear_layers(make):
    """The Linear layers get Kronecker factors; the bare positional embedding, which acts
    through a region, has none: the extension says so before writing anything."""
    model, idx, targets = _randomized()
    ours = extend(hbpkit.convert(copy.deepcopy(model)))
    with pytest.raises(NotImplementedError, match="has no rules of its own"):
        with backprop(make()):
            ours(idx, targets).backward()
    assert not any(hasattr(p, make().savefield) for p in ours.parameters())
    for name, p in ours.named_parameters():  # the bare parameter now lives in a region
        if name.endswith("wpe"):
            p.requires_grad_(False)
    with backprop(make()):
        ours(idx, targets).backward()
    for m in ours.modules():
        if isinstance(m, nn.Linear):
            assert hasattr(m.weight, make().savefield), m


def _same_params(model: nn.Module, ours: nn.Module) -> list[nn.Parameter]:
    """``ours``' parameters in the order of ``model``'s (the same values)."""
    mine = list(dict.fromkeys(ours.parameters()))
    out = []
    for q in model.parameters():
        match = [p for p in mine if p.shape == q.shape and torch.equal(p.detach(), q.detach())]
        assert len(match) == 1
        out.append(match[0])
    return out
