"""Attention after ``hbpkit.convert``: twins of ``nn.MultiheadAttention`` and
``nn.TransformerEncoderLayer`` (``hbpkit/attention.py``, ``hbpkit/engine/attention.py``).

* The twin computes the module's function (float64 round-off) for every option it takes,
  and the calls it does not take stay whole modules (the generic path).
* Every extension on converted models (a plain self-attention model, ViT-like models with
  pre- and post-norm encoder layers) against brute-force definitions through ``torch.func``
  on the original model: per-sample gradients, GGN / Hessian diagonals and products per
  block (dense Jacobians, the loss Hessian w.r.t. the output; the exact Hessian block).
* Kronecker factors of the projections: KFLR exact at ``N = 1``, ``T = 1``; on ``[N, T, E]``
  the Linear rules' ``kfac_approx`` factors, equal to those of a hand-written model with
  separate ``nn.Linear`` modules.

float64; ``rtol=1e-8, atol=1e-10``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

import hbpkit
import hbpkit.extensions as exts
from hbpkit import backprop, extend
from hbpkit.attention import SelfAttentionTwin
from hbpkit.regions import Region

DT = torch.float64
TOL = {"rtol": 1e-8, "atol": 1e-10}
E, HEADS, C = 4, 2, 3


def close(actual: Tensor, expected: Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------- models
class AttentionModel(nn.Module):
    """``Linear`` embedding, one ``nn.MultiheadAttention`` call, ``Linear`` head, mean over
    tokens. ``call``: the call's keyword options; ``masks``: which masks are passed
    (``"attn"``: a causal boolean mask, ``"float"``: an additive float mask, ``"padding"``:
    padding from the input's last feature, ``> 0`` where a token is padding)."""

    def __init__(
        self, T: int, masks: tuple[str, ...] = (), call: dict | None = None, **options
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(3, E)
        self.mha = nn.MultiheadAttention(E, HEADS, **options)
        self.head = nn.Linear(E, C)
        self.masks, self.call = masks, dict(call or {})
        self.uses_weights = self.call.get("need_weights", False)
        S = T + int(options.get("add_bias_kv", False)) + int(options.get("add_zero_attn", False))
        if self.uses_weights:
            per_head = self.call.get("average_attn_weights", True)
            self.weights_head = nn.Linear(T * S * (1 if per_head else HEADS), C)
        causal = torch.ones(T, T, dtype=torch.bool).triu(1)
        self.register_buffer("causal", causal)
        self.register_buffer("additive", torch.randn(T, T, dtype=DT))
        self.register_buffer("per_head", torch.randn(3 * HEADS, T, T, dtype=DT))  # N = 3

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        kwargs = dict(self.call)
        if "attn" in self.masks:
            kwargs["attn_mask"] = self.causal
        if "float" in self.masks:
            kwargs["attn_mask"] = self.additive
        if "3d" in self.masks:
            kwargs["attn_mask"] = self.per_head
        if "padding" in self.masks:
            kwargs["key_padding_mask"] = x[:, :, -1] > 0
        if not self.mha.batch_first:
            h = h.transpose(0, 1)
        out, weights = self.mha(h, h, h, **kwargs)
        if not self.mha.batch_first:
            out = out.transpose(0, 1)
        logits = self.head(out).mean(1)
        if self.uses_weights:
            logits = logits + self.weights_head(weights.flatten(1))
        return logits


class ViT(nn.Module):
    """A tiny ViT: ``Conv2d`` patch embedding (or ``Linear`` on tokens), a class token and a
    positional embedding (bare parameters), encoder layers, a ``Linear`` head on the class
    token."""

    def __init__(
        self, norm_first: bool, layers: int = 1, conv: bool = True, container: bool = False
    ) -> None:
        super().__init__()
        self.conv = conv
        self.embed = nn.Conv2d(1, E, 2, stride=2) if conv else nn.Linear(3, E)
        T = 4 if conv else 3  # patches of a 4x4 image, or tokens
        self.cls = nn.Parameter(torch.randn(1, 1, E))
        self.pos = nn.Parameter(torch.randn(1, T + 1, E))
        make = lambda: nn.TransformerEncoderLayer(  # noqa: E731
            E, HEADS, 6, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        if container:  # nn.TransformerEncoder: copies of the layer, a final norm
            self.encoder = nn.TransformerEncoder(
                make(), layers, norm=nn.LayerNorm(E), enable_nested_tensor=False
            )
        else:
            self.encoder = nn.ModuleList(make() for _ in range(layers))
        self.head = nn.Linear(E, C)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        if self.conv:
            h = h.flatten(2).transpose(1, 2)  # [N, T, E]
        # expand_as, not expand(h.shape[0], ...): a size of a module output reaches the
        # region as a constant (the whole batch's) and breaks its per-sample evaluation
        h = torch.cat([self.cls.expand_as(h[:, :1]), h], dim=1) + self.pos
        if isinstance(self.encoder, nn.TransformerEncoder):
            h = self.encoder(h)
        else:
            for layer in self.encoder:
                h = layer(h)
        return self.head(h[:, 0])


def _randomize(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
            if isinstance(m, nn.MultiheadAttention):
                for p in (m.in_proj_bias, m.out_proj.bias, m.bias_k, m.bias_v):
                    if p is not None:
                        p.normal_()
    return model.to(DT)


def _tokens(N: int, T: int, padding: bool = False) -> Tensor:
    X = torch.randn(N, T, 3, dtype=DT)
    if padding:  # sample n: its last n tokens are padding (never all of them)
        X[..., -1] = -1.0
        for n in range(N):
            if n:
                X[n, T - min(n, T - 1) :, -1] = 1.0
    return X


# ------------------------------------------------------------------ the twin's function
MHA_CASES = {
    "default": ({}, (), {}),
    "no-bias": ({"bias": False}, (), {}),
    "seq-first": ({"batch_first": False}, (), {}),
    "causal-mask": ({}, ("attn",), {}),
    "is-causal": ({}, ("attn",), {"is_causal": True}),
    "float-mask": ({}, ("float",), {}),
    "3d-mask": ({}, ("3d",), {}),
    "padding": ({}, ("padding",), {}),
    "padding-and-causal": ({}, ("attn", "padding"), {"is_causal": True}),
    "weights": ({}, (), {"need_weights": True}),
    "weights-per-head": ({}, ("float",), {"need_weights": True, "average_attn_weights": False}),
    "bias-kv": ({"add_bias_kv": True}, ("attn", "padding"), {}),
    "zero-attn": ({"add_zero_attn": True}, ("float", "padding"), {}),
    "bias-kv-zero-attn-weights": (
        {"add_bias_kv": True, "add_zero_attn": True, "batch_first": False},
        ("padding",),
        {"need_weights": True},
    ),
    "dropout-eval": ({"dropout": 0.3}, ("attn",), {"is_causal": True}),
}


def _attention_model(case: str, T: int = 4) -> AttentionModel:
    options, masks, call = MHA_CASES[case]
    options = {"batch_first": True, **options}
    torch.manual_seed(0)
    model = _randomize(AttentionModel(T, masks, call, **options))
    if options.get("dropout", 0.0) > 0:
        model.eval()
    return model


def _twins(converted: nn.Module) -> list[nn.Module]:
    return [m for m in converted.modules() if isinstance(m, SelfAttentionTwin)]


def _called(converted: torch.fx.GraphModule) -> list[nn.Module]:
    """The modules the converted model calls, those inside its regions included (a module
    without rules joins the functional code around it)."""
    called = []
    for n in converted.graph.nodes:
        if n.op == "call_module":
            module = converted.get_submodule(n.target)
            called.append(module)
            if isinstance(module, Region):
                called += _called(module.graph)
    return called


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_twin_computes_the_module(case):
    model = _attention_model(case)
    X = _tokens(3, 4, padding="padding" in MHA_CASES[case][1])
    converted = hbpkit.convert(model)
    called = _called(converted)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in called), case
    (twin,) = _twins(converted)
    assert twin.need_weights == MHA_CASES[case][2].get("need_weights", False)  # used weights
    assert twin.in_proj in called and model.mha.out_proj in called
    assert twin.in_proj.weight is model.mha.in_proj_weight
    assert twin.in_proj.bias is model.mha.in_proj_bias
    assert converted.hbpkit_twin_1 is twin
    assert not list(twin.parameters(recurse=False))  # extend() enters it: hooks on in/out_proj
    expected = model(X)
    assert expected.isfinite().all()
    close(converted(X), expected, case)
    if case == "dropout-eval":  # train mode follows the module: dropout is applied
        converted.train()
        torch.manual_seed(3)
        assert twin.dropout.training and (converted(X) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("container", [False, True], ids=["layers", "TransformerEncoder"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("conv", [True, False], ids=["conv", "linear"])
def test_encoder_layer_twin_computes_the_layer(norm_first, conv, container):
    torch.manual_seed(0)
    model = _randomize(ViT(norm_first, layers=2, conv=conv, container=container))
    X = torch.randn(3, 1, 4, 4, dtype=DT) if conv else _tokens(3, 3)
    converted = hbpkit.convert(model)
    called = _called(converted)
    assert not any(
        isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerEncoder)) for m in called
    )
    if container:
        assert model.encoder.norm in called
    for layer in model.encoder.layers if container else model.encoder:
        for m in (layer.linear1, layer.linear2, layer.norm1, layer.norm2, layer.self_attn.out_proj):
            assert m in called
    assert {id(t.in_proj.weight) for t in _twins(converted)} == {
        id(layer.self_attn.in_proj_weight)
        for layer in (model.encoder.layers if container else model.encoder)
    }
    close(converted(X), model(X), "ViT")
    with torch.no_grad():  # eval and no grad: the layer's fused fast path (float round-off)
        model.eval()
        torch.testing.assert_close(converted(X), model(X))


def test_encoder_layer_with_masks_and_gelu():
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(3, E)
            self.layer = nn.TransformerEncoderLayer(
                E, HEADS, 6, dropout=0.0, activation="gelu", batch_first=True
            )
            self.head = nn.Linear(E, C)

        def forward(self, x):
            T = x.shape[1]
            mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=x.dtype)
            h = self.layer(self.embed(x), mask, x[:, :, -1] > 0, is_causal=True)
            return self.head(h).mean(1)

    torch.manual_seed(0)
    model = _randomize(Masked())
    X = _tokens(3, 4, padding=True)
    converted = hbpkit.convert(model)
    assert not any(isinstance(m, nn.TransformerEncoderLayer) for m in _called(converted))
    assert any(isinstance(m, nn.GELU) for m in _called(converted))
    close(converted(X), model(X), "masked encoder layer")


class CrossAttention(nn.Module):
    """Queries from one Linear, keys and values from another (``kdim``: their width)."""

    def __init__(self, kdim: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, E), nn.Linear(3, kdim)
        self.mha = nn.MultiheadAttention(E, HEADS, batch_first=True, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(E, C)

    def forward(self, x: Tensor) -> Tensor:
        kv, padding = self.b(x), x[:, :, -1] > 0
        return self.head(self.mha(self.a(x), kv, kv, key_padding_mask=padding)[0]).mean(1)


@pytest.mark.parametrize("kdim", [E, 3], ids=["cross", "separate-weights"])
def test_calls_without_a_twin_stay_whole_modules(kdim):
    """Cross-attention (slices of a packed weight cannot be Linear weights), also with
    separate q/k/v weights: the MultiheadAttention call stays, served by the generic path,
    its mask given by keyword passed positionally (a forward hook sees only those)."""
    torch.manual_seed(0)
    model = _randomize(CrossAttention(kdim))
    assert model.mha._qkv_same_embed_dim == (kdim == E)
    X, y = _tokens(3, 4, padding=True), torch.tensor([0, 2, 1])
    converted = _converted(model)
    assert converted.mha in _called(converted) and not _twins(converted)
    close(converted(X), model(X), "cross-attention")
    _run_and_check(model, converted, X, y, f"whole MHA (kdim={kdim})", EXACT)
    with pytest.raises(NotImplementedError, match="MultiheadAttention 'mha'.*KFLR"):
        with backprop(exts.KFLR()):
            extend(nn.CrossEntropyLoss())(converted(X), y).backward()


class Seq2Seq(nn.Module):
    """Memory and target tokens from one input (all its tokens, its last two), a
    ``nn.TransformerDecoderLayer`` with a causal target mask and memory padding (the
    cross-attention's masks given by keyword: ``convert`` passes them positionally)."""

    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        self.memory, self.target = nn.Linear(3, E), nn.Linear(3, E)
        self.decoder = nn.TransformerDecoderLayer(
            E, HEADS, 6, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.head = nn.Linear(E, C)
        # 2 target tokens: a [T, S] mask with T = N would be read as per-sample by the
        # generic path (its inputs of N rows are split over the samples)
        self.register_buffer("causal", torch.ones(2, 2, dtype=torch.bool).triu(1))

    def forward(self, x: Tensor) -> Tensor:
        memory, tgt = self.memory(x), self.target(x[:, 2:])  # [N, 4, E], [N, 2, E]
        h = self.decoder(
            tgt, memory, self.causal, memory_key_padding_mask=x[:, :, -1] > 0, tgt_is_causal=True
        )
        return self.head(h).mean(1)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_decoder_layer_self_attention_twin(norm_first):
    """The decoder layer's self-attention becomes Linear projections; its cross-attention
    stays a call of the whole ``multihead_attn`` (the generic path); every extension without
    Kronecker factors exact, which the cross-attention's parameters refuse."""
    torch.manual_seed(0)
    model = _randomize(Seq2Seq(norm_first))
    X, y = _tokens(3, 4, padding=True), torch.tensor([0, 2, 1])
    converted = _converted(model)
    called = _called(converted)
    assert not any(isinstance(m, nn.TransformerDecoderLayer) for m in called)
    assert converted.decoder.multihead_attn in called
    assert not any(m is converted.decoder.self_attn for m in called)
    (twin,) = _twins(converted)
    assert twin.in_proj.weight is converted.decoder.self_attn.in_proj_weight
    close(converted(X), model(X), "decoder layer")
    _run_and_check(model, converted, X, y, "decoder layer", EXACT)


# ------------------------------------------------------------------ brute-force reference
def _function(model: nn.Module):
    def f(params: dict[str, Tensor], X: Tensor) -> Tensor:
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no forward-mode AD
            return functional_call(model, params, (X,))

    return f


def reference(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> dict:
    """``{name: {...}}`` per parameter of the original ``model``: per-sample gradients
    ``[N, *p]`` (of ``loss_fn(f(x_n), y_n) / N``, from the whole batch's forward pass: the
    samples are independent), the GGN block ``sum_n J_n^T H_n J_n`` and the Hessian block
    ``d2 L / dp2``, ``[P, P]``."""
    f = _function(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    N = X.shape[0]
    out = f(params, X).detach()
    H = hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
    assert loss_fn.reduction == "mean"

    def terms(o: Tensor) -> Tensor:  # [N]: the loss's term of each sample
        return torch.stack([loss_fn(o[n : n + 1], y[n : n + 1]) for n in range(N)]) / N

    result = {}
    for name, p in params.items():

        def out_of(q: Tensor, name: str = name) -> Tensor:  # the output as a function of p
            return f({**params, name: q}, X)

        grads = jacrev(lambda q: terms(out_of(q)))(p)  # noqa: B023 (used in this iteration)
        J = jacrev(out_of)(p).reshape(out.numel(), p.numel())
        Hp = hessian(lambda q: loss_fn(out_of(q), y))(p)  # noqa: B023
        P = p.numel()
        result[name] = {"grads": grads, "ggn": J.T @ H @ J, "hessian": Hp.reshape(P, P)}
    return result


EXTENSIONS = [
    exts.BatchGrad(),
    exts.BatchL2(),
    exts.SumGradSquared(),
    exts.Variance(),
    exts.DiagGGNExact(),
    exts.DiagHessian(),
    exts.GGNMP(),
    exts.HMP(),
    exts.KFLR(),
    exts.KFAC(),
    exts.KFRA(),
    exts.HBP("hessian", "exact", "sqrt"),
]


#: without Kronecker factors (the generic path refuses those)
EXACT = EXTENSIONS[:8]


def _run_and_check(
    plain: nn.Module,
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    what: str,
    extensions=EXTENSIONS,
    named: dict[str, nn.Parameter] | None = None,
) -> None:
    """The ``extensions`` in one backward pass of ``model`` (converted, extended) against
    :func:`reference` on ``plain`` (its unconverted copy, same values); ``named``: the
    parameters of ``model`` by their names in ``plain`` (default :func:`_same_parameters`)."""
    loss_fn = nn.CrossEntropyLoss()
    with backprop(*extensions):
        extend(loss_fn)(model(X), y).backward()
    refs = reference(plain, loss_fn, X, y)
    N = X.shape[0]
    named = _same_parameters(plain, model) if named is None else named
    torch.manual_seed(2)
    for name, r in refs.items():
        q, g = named[name], r["grads"]
        P = q.numel()
        w = f"{what} {name}"
        close(q.grad_batch, g, f"grad_batch {w}")
        close(q.batch_l2, g.flatten(1).square().sum(1), f"batch_l2 {w}")
        close(q.sum_grad_squared, g.square().sum(0), f"sum_grad_squared {w}")
        close(q.variance, g.square().sum(0) / N - (g.sum(0) / N).square(), f"variance {w}")
        close(q.diag_ggn_exact, r["ggn"].diagonal().reshape(q.shape), f"diag_ggn {w}")
        close(q.diag_h, r["hessian"].diagonal().reshape(q.shape), f"diag_h {w}")
        V = torch.randn(2, *q.shape, dtype=DT)
        close(q.ggnmp(V).reshape(2, P), V.reshape(2, P) @ r["ggn"], f"ggnmp {w}")
        close(q.hmp(V).reshape(2, P), V.reshape(2, P) @ r["hessian"], f"hmp {w}")


def _converted(model: nn.Module) -> torch.fx.GraphModule:
    """``hbpkit.convert`` of a copy of ``model``, extended; the copy's parameters are
    recorded as the originals' (:func:`_same_parameters`)."""
    memo: dict = {}
    copied = copy.deepcopy(model, memo)
    converted = extend(hbpkit.convert(copied))
    converted._originals = {id(p): memo[id(p)] for p in model.parameters()}
    return converted


def _same_parameters(plain: nn.Module, converted: nn.Module) -> dict[str, nn.Parameter]:
    """``{name in plain: the parameter of converted}`` (the converted model's own names differ
    where a parameter moved into a region)."""
    originals = converted._originals
    mine = {id(p) for p in converted.parameters()}
    named = {n: originals[id(p)] for n, p in plain.named_parameters()}
    assert all(id(q) in mine for q in named.values())
    assert len(mine) == len(named)
    return named


def _kronecker_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    ids = {id(p) for m in linear for p in m.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


@pytest.mark.parametrize(
    "case", ["default", "seq-first", "padding-and-causal", "weights", "3d-mask", "bias-kv"]
)
def test_attention_model_every_extension(case):
    model = _attention_model(case)
    X = _tokens(3, 4, padding="padding" in MHA_CASES[case][1])
    y = torch.tensor([0, 2, 1])
    converted = _converted(model)
    extensions = EXTENSIONS
    if case == "weights":  # the model's ``logits + weights_head(...)``: a two-input region,
        extensions = [e for e in EXTENSIONS if not isinstance(e, exts.KFRA)]  # refused by KFRA
    if case == "bias-kv":  # bias_k / bias_v: parameters of the region, no Kronecker factors
        extensions = EXACT
    _run_and_check(model, converted, X, y, case, extensions)


@pytest.mark.parametrize(
    ("norm_first", "conv", "container"),
    [(False, True, False), (True, False, False), (True, True, True)],
    ids=["post-norm-conv", "pre-norm-linear", "pre-norm-conv-TransformerEncoder"],
)
def test_vit_every_extension(norm_first, conv, container):
    torch.manual_seed(0)
    model = _randomize(ViT(norm_first, conv=conv, container=container))
    X = torch.randn(3, 1, 4, 4, dtype=DT) if conv else _tokens(3, 3)
    y = torch.tensor([0, 2, 1])
    converted = _converted(model)
    _run_and_check(model, converted, X, y, "ViT", EXACT)
    # Kronecker factors: not for the bare parameters (their region has no such rules)
    with pytest.raises(NotImplementedError, match="Region.*kron_from_sqrt"):
        with backprop(exts.KFLR()):
            extend(nn.CrossEntropyLoss())(converted(X), y).backward()
    for bare in (model.cls, model.pos):
        converted._originals[id(bare)].requires_grad_(False)
    with backprop(*EXTENSIONS[8:]):
        extend(nn.CrossEntropyLoss())(converted(X), y).backward()
    params = [p for p in converted.parameters() if p.requires_grad]
    assert len(params) == 16 + 2 * container  # Conv2d or Linear, 2 LayerNorms, 5 Linears
    # (in_proj included), the TransformerEncoder's norm: 2 each
    for p in params:
        for field in ("kflr", "kfac", "kfra", "hbp"):
            assert getattr(p, field).to_dense().shape == (p.numel(), p.numel())


class FixedMask(nn.Module):
    """Dropout with a given scaled mask ``m``: ``x * m``."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask


def test_attention_dropout_in_train_mode():
    """Dropout on the attention weights in train mode: an ``nn.Dropout`` module of the twin
    (its mask read by the Dropout rules); every extension exact for the drawn mask, against
    the reference on the twin with that mask fixed."""
    model = _attention_model("dropout-eval").train()
    X, y = _tokens(3, 4), torch.tensor([0, 2, 1])
    plain = hbpkit.convert(copy.deepcopy(model))
    converted = extend(hbpkit.convert(copy.deepcopy(model)))
    dropout = converted.hbpkit_twin_1.dropout
    assert dropout.training and dropout in _called(converted)
    masks = []

    def fix_mask(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        x = inputs[0].detach()  # the weights: 0 where the causal mask hides a key
        masks.append(torch.where(x > 0, output.detach() / x, 0.0))  # 0 or 1 / (1 - p)
        plain.hbpkit_twin_1.dropout = FixedMask(masks[-1])

    dropout.register_forward_hook(fix_mask)
    extensions = [e for e in EXTENSIONS if not isinstance(e, exts.KFRA)]  # two-input region
    named = dict(converted.named_parameters())
    _run_and_check(plain, converted, X, y, "dropout", extensions, named)
    (mask,) = masks  # [N, H, T, T]; on the visible (causal) keys: dropped and kept entries
    visible = mask[:, :, torch.ones(4, 4, dtype=torch.bool).tril()]
    assert (visible == 0).any() and (visible != 0).any()
    converted.mha.eval()  # the twin's dropout follows the module's mode
    assert not dropout.training
    close(converted(X), model.eval()(X), "dropout in eval mode")


# ---------------------------------------------------------------------- Kronecker factors
class OneLayer(nn.Module):
    """``Linear`` embedding, a pre-norm encoder layer, ``Linear`` head on the first token."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(3, E), nn.Linear(E, C)
        self.layer = nn.TransformerEncoderLayer(
            E, HEADS, 6, dropout=0.0, batch_first=True, norm_first=True
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(self.embed(x))[:, 0])


@pytest.mark.parametrize("model_kind", ["mha", "encoder-layer"])
def test_kflr_exact_for_one_sample_and_one_token(model_kind):
    """N = 1, T = 1: no weight sharing over tokens or samples, so KFLR (and KFRA) of every
    Linear layer, the attention projections included, is its exact GGN block (S.12)."""
    torch.manual_seed(0)
    if model_kind == "mha":
        model = _randomize(AttentionModel(1, batch_first=True))
    else:
        model = _randomize(OneLayer())
    X, y = _tokens(1, 1), torch.tensor([2])
    converted = _converted(model)
    loss_fn = nn.CrossEntropyLoss()
    with backprop(exts.KFLR(), exts.KFRA()):
        extend(loss_fn)(converted(X), y).backward()
    refs = reference(model, loss_fn, X, y)
    named = _same_parameters(model, converted)
    linear = {id(p) for _, p in _kronecker_params(converted)}
    params = [(n, p) for n, p in named.items() if id(p) in linear]
    assert len(params) == (8 if model_kind == "mha" else 12)  # 4 or 6 Linears
    for name, p in params:
        close(p.kflr.to_dense(), refs[name]["ggn"], f"kflr {name}")
        close(p.kfra.to_dense(), refs[name]["ggn"], f"kfra {name}")


class HandWritten(nn.Module):
    """:class:`AttentionModel` with attention written out: separate ``nn.Linear`` modules."""

    def __init__(self, model: AttentionModel) -> None:
        super().__init__()
        self.embed, self.head = copy.deepcopy(model.embed), copy.deepcopy(model.head)
        self.in_proj, self.out_proj = nn.Linear(E, 3 * E), copy.deepcopy(model.mha.out_proj)
        with torch.no_grad():
            self.in_proj.weight.copy_(model.mha.in_proj_weight)
            self.in_proj.bias.copy_(model.mha.in_proj_bias)
        self.to(DT)

    @staticmethod
    def attention(qkv: Tensor) -> Tensor:
        """``[N, T, 3E] -> [N, T, E]``: head split, attention, head merge."""
        q, k, v = qkv.chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (HEADS, -1)).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.out_proj(self.attention(self.in_proj(self.embed(x))))).mean(1)


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_projection_factors_equal_hand_written_linears(kfac_approx):
    """KFAC (same draws), KFLR, KFRA and HBP factors of in_proj / out_proj on ``[N, T, E]``:
    the Linear rules' ``kfac_approx`` factors, as for separate Linear modules."""
    model = _attention_model("default")
    hand = HandWritten(model)
    X, y = _tokens(3, 4), torch.tensor([0, 2, 1])
    ours = extend(hbpkit.convert(model))
    theirs = extend(hbpkit.convert(hand))
    mha = model.mha
    pairs = [  # (twin's, hand-written's)
        (mha.in_proj_weight, hand.in_proj.weight),
        (mha.in_proj_bias, hand.in_proj.bias),
        (mha.out_proj.weight, hand.out_proj.weight),
        (mha.out_proj.bias, hand.out_proj.bias),
    ]
    for m in (ours, theirs):
        torch.manual_seed(5)  # the same Monte-Carlo draws for KFAC
        with backprop(
            exts.KFAC(kfac_approx=kfac_approx),
            exts.KFLR(kfac_approx=kfac_approx),
            exts.KFRA(kfac_approx=kfac_approx),
            exts.HBP("hessian", "exact", "sqrt", kfac_approx=kfac_approx),
        ):
            extend(nn.CrossEntropyLoss())(m(X), y).backward()
    for a, b in pairs:
        for field in ("kfac", "kflr", "kfra", "hbp"):
            fa, fb = getattr(a, field), getattr(b, field)
            assert len(fa) == len(fb) == a.dim()  # (G, A) for a weight, (G,) for a bias
            for i, (u, v) in enumerate(zip(fa, fb)):
                close(u, v, f"{field}[{i}] {tuple(a.shape)}")


def _definition_factors(hand: HandWritten, X: Tensor, y: Tensor, which: str, approx: str):
    """``(G, A)`` of ``hand.in_proj`` or ``hand.out_proj`` from their definitions on
    ``[N, T, D]`` (Eschenhagen et al., 2023): ``M_n`` the exact GGN w.r.t. the layer's output
    ``z_n`` ``[T D_out, T D_out]`` (dense Jacobians of the rest of the model, the loss
    Hessian); ``expand``: ``G = sum_{n,t} M_n[t, t]``, ``A = 1/(N T) sum_{n,t} x x^T``;
    ``reduce``: ``G = sum_{n,t,s} M_n[t, s]``, ``A = 1/N sum_n xbar xbar^T``."""
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        x_in = hand.embed(X)
        z_in = hand.in_proj(x_in)
    attention = HandWritten.attention

    def from_z_in(z: Tensor) -> Tensor:
        return hand.head(hand.out_proj(attention(z))).mean(1)

    def from_z_out(z: Tensor) -> Tensor:
        return hand.head(z).mean(1)

    x, z, rest = (x_in, z_in, from_z_in) if which == "in" else (None, None, from_z_out)
    if which == "out":
        with torch.no_grad():
            x = attention(z_in)
            z = hand.out_proj(x)
    N, T, D = z.shape
    with sdpa_kernel(SDPBackend.MATH):
        out = rest(z)
        J = jacrev(rest)(z).reshape(out.numel(), N, T, D)
    H = hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
    M = torch.einsum("anti,ab,bmsj->ntimsj", J, H, J)  # block-diagonal over samples
    M = torch.stack([M[n, :, :, n] for n in range(N)])  # [N, T, D, T, D]
    if approx == "expand":
        G = torch.einsum("ntitj->ij", M)
        A = torch.einsum("nti,ntj->ij", x, x) / (N * T)
    else:
        G = torch.einsum("ntisj->ij", M)
        xbar = x.mean(1)
        A = xbar.T @ xbar / N
    return G, A


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_projection_kflr_equals_its_definition(kfac_approx):
    """KFLR of in_proj_weight / out_proj.weight (the twin's Linear calls) against the
    definition of the weight-sharing factors, formed without hbpkit."""
    model = _attention_model("default")
    hand = HandWritten(model)
    X, y = _tokens(3, 4), torch.tensor([0, 2, 1])
    with backprop(exts.KFLR(kfac_approx=kfac_approx)):
        extend(nn.CrossEntropyLoss())(extend(hbpkit.convert(model))(X), y).backward()
    for which, p in (("in", model.mha.in_proj_weight), ("out", model.mha.out_proj.weight)):
        G, A = _definition_factors(hand, X, y, which, kfac_approx)
        close(p.kflr[0], G, f"G {which}_proj {kfac_approx}")
        close(p.kflr[1], A, f"A {which}_proj {kfac_approx}")
