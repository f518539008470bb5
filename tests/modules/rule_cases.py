"""The table of rule cases: one module and one input shape per row, every module family.

Each :class:`RuleCase` builds a float64 module and its input; :func:`recorded` forwards it
through :func:`hbpkit.extend` and returns the record (``ModuleCall``) its rules act on,
together with a second forward pass on a fresh leaf under the same seed (the same dropout
mask) that the brute-force autograd references of ``test_rule_contract.py`` use.

``layout`` says how the output features ``[*out]`` of one sample split into shared
positions and output channels (weight sharing, ``kfac_approx``): ``"first"`` for
``[C, *spatial]`` (convolutions, BatchNorm, GroupNorm, pooling), ``"last"`` for
``[*positions, *features]`` with ``features`` the trailing ``feature_dims`` axes (Linear,
Embedding, LayerNorm). ``out_axis`` is the axis of a two-factor weight that indexes the
output channels (``[C_out, ...]`` for Linear and convolutions, ``[E, D]`` for Embedding).
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from records import record
from torch import Tensor, nn

from hbpkit import extend
from hbpkit.modules import ACTIVATIONS
from hbpkit.modules.tables import SECOND_ORDER

DT = torch.float64
N = 3
E = 7  # embedding rows


@dataclass(frozen=True)
class RuleCase:
    factory: Callable[[], nn.Module]
    shape: tuple[int, ...]
    #: ``randn`` (floats), ``ties`` (integers 0 / 1 as floats: ties in max pooling),
    #: ``indices`` (token indices ``[N, T]`` for Embedding)
    inputs: str = "randn"
    forward_kwargs: dict = field(default_factory=dict)
    randomize_params: bool = False
    layout: str = "last"
    feature_dims: int = 1
    out_axis: int = 0
    #: the match of the ``NotImplementedError`` its Kronecker factors raise, if refused,
    #: and for which parameters
    kron_refused: str | None = None
    kron_refused_for: tuple[str, ...] = ("weight", "bias")


@dataclass
class Recorded:
    """A forward pass of the extended module: record, rules and a reference graph."""

    case: RuleCase
    module: nn.Module
    rules: object
    call: object
    x: Tensor  # the input data (a copy; the record holds its own)
    out_shape: torch.Size
    x_ref: Tensor  # leaf of the reference forward pass
    out_ref: Tensor

    @property
    def params(self) -> list[tuple[str, nn.Parameter]]:
        named = dict(self.module.named_parameters())
        return [(name, named[name]) for name in self.rules.param_names(self.module)]


def _input(case: RuleCase) -> Tensor:
    if case.inputs == "ties":
        return torch.randint(0, 2, case.shape).to(DT)
    if case.inputs == "indices":
        idx = torch.randint(1, E, case.shape)
        idx[1, 1] = idx[1, 0]  # a repeated index
        idx[0, 0] = 0  # padding_idx = 0 where the case sets it
        return idx
    return torch.randn(*case.shape, dtype=DT)


def recorded(case: RuleCase) -> Recorded:
    torch.manual_seed(0)
    module = case.factory().double()
    if case.randomize_params:
        with torch.no_grad():
            for p in module.parameters():
                p.normal_()
    x = _input(case)
    extend(module)
    grad = x.is_floating_point()

    def forward():
        torch.manual_seed(1)
        leaf = x.clone().requires_grad_(grad)
        return leaf, module(leaf, **case.forward_kwargs)

    _, out = forward()
    x_ref, out_ref = forward()
    rules = SECOND_ORDER.lookup(module)
    return Recorded(case, module, rules, record(out), x, out.shape, x_ref, out_ref)


def implementing(
    cases: dict[str, RuleCase], *methods: str, floats: bool | None = None, params: bool = False
) -> list[str]:
    """Names of the cases whose rules implement every one of ``methods``.

    ``floats``: only cases with float inputs (``True``) or integer inputs (``False``);
    ``params``: only cases whose module has parameters the rules handle.
    """
    names = []
    for name, case in cases.items():
        if floats is not None and (case.inputs != "indices") != floats:
            continue
        module = case.factory()
        rules = SECOND_ORDER.lookup(module)
        if params and not rules.param_names(module):
            continue
        if all(rules.implements(m) for m in methods):
            names.append(name)
    return names


# --------------------------------------------------------------------------- positions
def positions_and_channels(case: RuleCase, out_shape) -> tuple[Tensor, Tensor]:
    """``[D_out]`` each: the shared position and the output channel of each output feature."""
    feats = tuple(out_shape[1:])
    D = math.prod(feats)
    f = torch.arange(D)
    if case.layout == "first":
        P = math.prod(feats[1:])
        return f % P, f // P
    F = math.prod(feats[len(feats) - case.feature_dims :])
    return f // F, f % F


# --------------------------------------------------------------------------- the table
def _activation(cls: type) -> nn.Module:
    kwargs = {nn.Threshold: dict(threshold=0.1, value=-0.5)}.get(cls, {})
    return cls(**kwargs)


ELEMENTWISE_AND_RESHAPE = {
    **{cls.__name__: RuleCase(lambda c=cls: _activation(c), (N, 4)) for cls in ACTIVATIONS},
    "GELU_tanh": RuleCase(lambda: nn.GELU(approximate="tanh"), (N, 4)),
    "LeakyReLU_inplace": RuleCase(lambda: nn.LeakyReLU(0.2, inplace=True), (N, 4)),
    "Identity": RuleCase(nn.Identity, (N, 4)),
    "Flatten": RuleCase(nn.Flatten, (N, 2, 3)),
    "Flatten_partial": RuleCase(lambda: nn.Flatten(2), (N, 2, 2, 3)),
    "Unflatten": RuleCase(lambda: nn.Unflatten(1, (2, 3)), (N, 6)),
    "Dropout_eval": RuleCase(lambda: nn.Dropout(0.5).eval(), (N, 4)),
    "Dropout_train": RuleCase(lambda: nn.Dropout(0.5), (N, 6)),
    "Dropout2d_train": RuleCase(lambda: nn.Dropout2d(0.5), (N, 4, 2, 2)),
}

LINEAR = {
    "Linear": RuleCase(lambda: nn.Linear(4, 3), (N, 4)),
    "Linear_nobias": RuleCase(lambda: nn.Linear(4, 3, bias=False), (N, 4)),
    "Linear_3d": RuleCase(lambda: nn.Linear(4, 3), (N, 2, 4)),
    "Linear_4d": RuleCase(lambda: nn.Linear(4, 3), (N, 2, 2, 4)),
}

EMBEDDING = {
    "Embedding": RuleCase(lambda: nn.Embedding(E, 4), (N, 3), inputs="indices", out_axis=1),
    "Embedding_padding_idx": RuleCase(
        lambda: nn.Embedding(E, 4, padding_idx=0), (N, 3), inputs="indices", out_axis=1
    ),
}


def _batchnorm(cls, C):
    module = cls(C).eval()
    module.running_mean.normal_()
    module.running_var.uniform_(0.5, 2.0)
    return module


def _norm(factory, shape, layout, feature_dims=1):
    return RuleCase(factory, shape, randomize_params=True, layout=layout, feature_dims=feature_dims)


NORMALIZATION = {
    "LayerNorm": _norm(lambda: nn.LayerNorm(4), (N, 4), "last"),
    "LayerNorm_seq": _norm(lambda: nn.LayerNorm(4), (N, 2, 4), "last"),
    "LayerNorm_2d": _norm(lambda: nn.LayerNorm((2, 3)), (N, 2, 2, 3), "last", 2),
    "LayerNorm_nobias": _norm(lambda: nn.LayerNorm(4, bias=False), (N, 3, 4), "last"),
    "LayerNorm_noaffine": _norm(lambda: nn.LayerNorm(4, elementwise_affine=False), (N, 4), "last"),
    "GroupNorm": _norm(lambda: nn.GroupNorm(2, 4), (N, 4, 3), "first"),
    "GroupNorm_2d": _norm(lambda: nn.GroupNorm(3, 3), (N, 3, 2, 2), "first"),
    "GroupNorm_noaffine": _norm(lambda: nn.GroupNorm(1, 2, affine=False), (N, 2, 3), "first"),
    "BatchNorm1d": _norm(lambda: _batchnorm(nn.BatchNorm1d, 4), (N, 4), "first"),
    "BatchNorm1d_seq": _norm(lambda: _batchnorm(nn.BatchNorm1d, 4), (N, 4, 3), "first"),
    "BatchNorm2d": _norm(lambda: _batchnorm(nn.BatchNorm2d, 3), (N, 3, 2, 2), "first"),
    "BatchNorm3d": _norm(lambda: _batchnorm(nn.BatchNorm3d, 2), (N, 2, 2, 1, 2), "first"),
}


def _conv(factory, shape, **forward_kwargs):
    return RuleCase(factory, (N, *shape), forward_kwargs=forward_kwargs, layout="first")


CONVOLUTION = {
    "Conv2d": _conv(lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 5, 6)),
    "Conv2d_groups_dilation_nobias": _conv(
        lambda: nn.Conv2d(
            4, 6, (2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1), groups=2, bias=False
        ),
        (4, 5, 6),
    ),
    "Conv2d_depthwise": _conv(lambda: nn.Conv2d(3, 3, 3, groups=3, padding=1), (3, 4, 4)),
    "Conv2d_same_even": _conv(lambda: nn.Conv2d(2, 3, (2, 4), padding="same"), (2, 4, 5)),
    "Conv2d_valid": _conv(lambda: nn.Conv2d(2, 3, 2, padding="valid", stride=(2, 1)), (2, 4, 5)),
    "Conv2d_reflect": _conv(
        lambda: nn.Conv2d(2, 3, 3, padding=2, padding_mode="reflect"), (2, 4, 5)
    ),
    "Conv2d_replicate": _conv(
        lambda: nn.Conv2d(2, 3, (3, 2), padding=(1, 2), padding_mode="replicate"), (2, 3, 4)
    ),
    "Conv2d_circular_stride": _conv(
        lambda: nn.Conv2d(2, 2, 3, stride=2, padding=1, padding_mode="circular"), (2, 4, 5)
    ),
    "Conv2d_P1": _conv(lambda: nn.Conv2d(3, 4, (3, 4)), (3, 3, 4)),
    "Conv1d": _conv(lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2), (2, 9)),
    "Conv1d_same_reflect": _conv(
        lambda: nn.Conv1d(2, 3, 4, padding="same", padding_mode="reflect", bias=False), (2, 7)
    ),
    "Conv3d": _conv(
        lambda: nn.Conv3d(2, 2, (2, 2, 3), stride=(1, 2, 1), padding=(1, 0, 1)), (2, 3, 4, 4)
    ),
    "Conv3d_circular_groups": _conv(
        lambda: nn.Conv3d(2, 4, 2, groups=2, padding=1, padding_mode="circular"), (2, 2, 3, 3)
    ),
    "ConvTranspose2d": _conv(
        lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), (2, 3, 4)
    ),
    "ConvTranspose2d_groups_dilation_nobias": _conv(
        lambda: nn.ConvTranspose2d(
            4, 6, (2, 3), dilation=2, output_padding=1, groups=2, bias=False
        ),
        (4, 3, 3),
    ),
    "ConvTranspose1d_output_size": _conv(
        lambda: nn.ConvTranspose1d(2, 3, 3, stride=3, padding=1),
        (2, 4),
        output_size=(12,),
    ),
    "ConvTranspose3d": _conv(
        lambda: nn.ConvTranspose3d(2, 2, 2, stride=(2, 1, 1), padding=(0, 1, 0)), (2, 2, 3, 2)
    ),
}


def _random_pool(rng: random.Random, kind: str, d: int) -> RuleCase:
    """A valid random ``MaxPool{d}d`` / ``AvgPool{d}d`` on an input ``[N, 2, *spatial]``."""
    lo, hi = {1: (5, 9), 2: (4, 7), 3: (3, 5)}[d]
    while True:
        k = [rng.randint(1, 3) for _ in range(d)]
        kwargs = dict(
            kernel_size=k,
            stride=[rng.randint(1, 3) for _ in range(d)],
            padding=[rng.randint(0, ki // 2) for ki in k],
            ceil_mode=rng.random() < 0.5,
        )
        if kind == "Max":
            kwargs["dilation"] = [rng.randint(1, 2) for _ in range(d)]
        else:
            kwargs["count_include_pad"] = rng.random() < 0.5
            if d > 1 and rng.random() < 0.4:
                kwargs["divisor_override"] = rng.randint(1, 5)
        cls = getattr(nn, f"{kind}Pool{d}d")
        shape = (N, 2, *[rng.randint(lo, hi) for _ in range(d)])
        try:
            out = cls(**kwargs)(torch.zeros(shape))
        except RuntimeError:
            continue
        if out.numel():
            return RuleCase(functools.partial(cls, **kwargs), shape, layout="first")


def _random_pools() -> dict[str, RuleCase]:
    rng = random.Random(0)
    cases = {}
    for d in (1, 2, 3):
        for kind, count in (("Max", 4), ("Avg", 3)):
            for i in range(count):
                cases[f"{kind}Pool{d}d-random{i}"] = _random_pool(rng, kind, d)
    return cases


def _first(factory, shape, **kwargs) -> RuleCase:
    return RuleCase(factory, shape, layout="first", **kwargs)


POOLING = {
    **_random_pools(),
    "MaxPool2d-overlap-dilation": _first(lambda: nn.MaxPool2d(3, 1, 1, dilation=2), (N, 2, 5, 6)),
    "MaxPool1d-no-channels": _first(lambda: nn.MaxPool1d(2, 1), (N, 7)),  # [N, L]: N plays C
    "MaxPool2d-ties": _first(lambda: nn.MaxPool2d(2, 1), (N, 2, 4, 4), inputs="ties"),
    "AdaptiveMaxPool1d": _first(lambda: nn.AdaptiveMaxPool1d(3), (N, 2, 7)),
    "AdaptiveMaxPool2d": _first(lambda: nn.AdaptiveMaxPool2d((2, None)), (N, 2, 5, 3)),
    "AdaptiveMaxPool3d": _first(lambda: nn.AdaptiveMaxPool3d((2, 1, 3)), (N, 2, 3, 3, 4)),
    "AvgPool2d-no-channels": _first(lambda: nn.AvgPool2d(2, 1, ceil_mode=True), (N, 3, 5)),
    "AdaptiveAvgPool1d": _first(lambda: nn.AdaptiveAvgPool1d(3), (N, 2, 7)),
    "AdaptiveAvgPool2d": _first(lambda: nn.AdaptiveAvgPool2d((2, None)), (N, 2, 5, 3)),
    "AdaptiveAvgPool3d": _first(lambda: nn.AdaptiveAvgPool3d((2, 1, 3)), (N, 2, 3, 3, 4)),
}

PADDING = {
    "ZeroPad1d": _first(lambda: nn.ZeroPad1d(2), (N, 2, 5)),
    "ZeroPad2d": _first(lambda: nn.ZeroPad2d((0, 1, 2, 0)), (N, 2, 3, 4)),
    "ZeroPad3d": _first(lambda: nn.ZeroPad3d((1, 0, 0, 1, 1, 0)), (N, 2, 2, 3, 3)),
    "ConstantPad1d-crop": _first(lambda: nn.ConstantPad1d((-1, -2), 3.0), (N, 2, 6)),
    "ConstantPad1d-extra-axes": _first(lambda: nn.ConstantPad1d((1, 2), 0.5), (N, 2, 2, 4)),
    "ConstantPad2d-mixed": _first(lambda: nn.ConstantPad2d((1, -1, -2, 1), 0.7), (N, 2, 4, 4)),
    "ConstantPad3d": _first(lambda: nn.ConstantPad3d(1, -2.0), (N, 1, 2, 2, 3)),
    "ReflectionPad1d": _first(lambda: nn.ReflectionPad1d((2, 1)), (N, 2, 5)),
    "ReflectionPad2d": _first(lambda: nn.ReflectionPad2d((1, 0, 2, 1)), (N, 2, 4, 3)),
    "ReflectionPad3d": _first(lambda: nn.ReflectionPad3d(1), (N, 1, 2, 3, 3)),
    "ReplicationPad1d": _first(lambda: nn.ReplicationPad1d((3, 1)), (N, 2, 4)),
    "ReplicationPad2d": _first(lambda: nn.ReplicationPad2d((1, 2, 0, 1)), (N, 2, 3, 3)),
    "ReplicationPad3d": _first(lambda: nn.ReplicationPad3d((1, 0, 1, 0, 0, 1)), (N, 1, 2, 3, 3)),
    "CircularPad1d": _first(lambda: nn.CircularPad1d((2, 3)), (N, 2, 4)),
    "CircularPad2d": _first(lambda: nn.CircularPad2d((1, 1, 2, 0)), (N, 2, 3, 3)),
    "CircularPad3d": _first(lambda: nn.CircularPad3d(1), (N, 1, 2, 3, 3)),
}

CASES: dict[str, RuleCase] = {
    **ELEMENTWISE_AND_RESHAPE,
    **LINEAR,
    **EMBEDDING,
    **NORMALIZATION,
    **CONVOLUTION,
    **POOLING,
    **PADDING,
}
