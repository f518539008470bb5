"""The expand input factor ``A`` of convolutions from the autocorrelation of the input
(``hbpkit/modules/conv/autocorrelation.py``) equals the Gram of the unfolded patches.

References: patches gathered by explicit index loops (no strided views), the unfolded-input
formula ``grouped_input_factor(unfold)`` of the rules, and BackPACK 1.7.1's KFAC / KFLR ``A``
(``P`` times the expand ``A``, see ``tests/modules/test_conv.py``). Float64 throughout.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from twins import run_backpack, run_extended

import hbpkit.modules.conv.kronecker as conv_kronecker
from hbpkit import extensions as exts
from hbpkit.modules.conv.autocorrelation import autocorrelation_applies, patch_gram
from hbpkit.modules.conv.kronecker import grouped_input_factor

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}


def _patches_by_loops(x, kernel, stride, dilation, groups):
    """``[N, g, S, P]``: every patch of the padded ``x`` ``[N, C, *L]`` read entry by entry."""
    N, C = x.shape[:2]
    d = len(kernel)
    out = [
        (L - dil * (k - 1) - 1) // s + 1
        for L, k, s, dil in zip(x.shape[2:], kernel, stride, dilation)
    ]
    cols = []
    for p in itertools.product(*map(range, out)):
        rows = []
        for c in range(C):
            for k in itertools.product(*map(range, kernel)):
                idx = tuple(p[i] * stride[i] + k[i] * dilation[i] for i in range(d))
                rows.append(x[(slice(None), c, *idx)])
        cols.append(torch.stack(rows, 1))  # [N, C prod(k)]
    u = torch.stack(cols, 2)  # [N, S_total, P]
    return u.unflatten(1, (groups, -1))


GEOMETRIES = {  # kernel, stride, dilation, groups, C, spatial size of the padded input
    "1d_k3": ((3,), (1,), (1,), 1, 2, (9,)),
    "1d_k2_groups": ((2,), (1,), (1,), 2, 4, (6,)),
    "2d_k3": ((3, 3), (1, 1), (1, 1), 1, 3, (6, 7)),
    "2d_k5": ((5, 5), (1, 1), (1, 1), 1, 2, (8, 9)),
    "2d_front_stride_dilation": ((2, 4), (2, 1), (2, 1), 2, 4, (7, 8)),
    "2d_depthwise": ((3, 3), (1, 1), (1, 1), 3, 3, (5, 6)),
    "2d_edges_overlap": ((4, 4), (1, 1), (1, 1), 1, 2, (5, 5)),  # out 2 < K - 1
    "3d": ((3, 2, 3), (1, 2, 1), (2, 1, 1), 1, 2, (7, 5, 6)),
    "3d_groups": ((2, 2, 2), (1, 1, 1), (1, 1, 1), 2, 4, (3, 4, 5)),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_patch_gram_is_the_gram_of_the_patches(name):
    kernel, stride, dilation, groups, C, size = GEOMETRIES[name]
    torch.manual_seed(0)
    x = torch.randn(3, C, *size, dtype=DT)
    u = _patches_by_loops(x, kernel, stride, dilation, groups)
    expected = torch.einsum("ngsp,ngtp->gst", u, u)
    torch.testing.assert_close(patch_gram(x, kernel, stride, dilation, groups), expected, **TOL)


def test_applies_only_with_unit_stride_and_dilation_along_the_last_dimension():
    assert autocorrelation_applies((3, 3), (1, 1), (1, 1), out=8)
    assert autocorrelation_applies((3, 3), (2, 1), (2, 1), out=8)
    assert not autocorrelation_applies((3, 3), (1, 2), (1, 1), out=8)
    assert not autocorrelation_applies((3, 3), (1, 1), (1, 2), out=8)
    assert not autocorrelation_applies((3, 1), (1, 1), (1, 1), out=8)  # one offset: no lags
    assert not autocorrelation_applies((3, 3), (1, 1), (1, 1), out=3)


CONVS = {  # module, input shape (without the batch); all take the autocorrelation path
    "1d_padded": (lambda: nn.Conv1d(2, 3, 3, padding=1), (2, 8)),
    "1d_same_reflect": (lambda: nn.Conv1d(2, 3, 4, padding="same", padding_mode="reflect"), (2, 9)),
    "2d_padded": (lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 6, 7)),
    "2d_front_stride": (lambda: nn.Conv2d(2, 3, (2, 3), stride=(2, 1), dilation=(2, 1)), (2, 7, 8)),
    "2d_groups": (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=(0, 1)), (4, 5, 6)),
    "3d": (lambda: nn.Conv3d(2, 3, (2, 2, 3), stride=(1, 2, 1), padding=(1, 0, 1)), (2, 3, 4, 5)),
}


def _model(name: str) -> nn.Sequential:
    torch.manual_seed(0)
    factory, shape = CONVS[name]
    conv = factory().to(DT)
    with torch.no_grad():
        features = conv(torch.zeros(1, *shape, dtype=DT)).numel()
    return nn.Sequential(conv, nn.Sigmoid(), nn.Flatten(), nn.Linear(features, 3).to(DT)), shape


def _data(shape, n=4):
    torch.manual_seed(1)
    return torch.randn(n, *shape, dtype=DT), torch.randint(0, 3, (n,))


@pytest.mark.parametrize("ext", ["KFAC", "KFLR"])
@pytest.mark.parametrize("name", sorted(CONVS))
def test_factors_take_the_autocorrelation_path_and_equal_the_unfold_formula(name, ext, monkeypatch):
    """Both approximations: expand from the autocorrelation (spied), reduce unchanged; both
    equal ``grouped_input_factor`` of the unfolded input (the formula used before)."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[1:])
        return patch_gram(*args, **kwargs)

    monkeypatch.setattr(conv_kronecker, "patch_gram", spy)
    plain, shape = _model(name)
    X, y = _data(shape)
    conv = plain[0]
    u = _unfold_like_the_module(conv, X)
    for approx in ("expand", "reduce"):
        calls.clear()
        model = run_extended(
            plain, nn.CrossEntropyLoss(), X, y, getattr(exts, ext)(kfac_approx=approx)
        )
        A = getattr(model[0].weight, ext.lower())[1]
        expected = grouped_input_factor(u, conv.groups, approx)
        torch.testing.assert_close(A, expected, **TOL, msg=lambda m, a=approx: f"{name} {a}: {m}")
        assert len(calls) == (approx == "expand"), f"{name} {approx}: {len(calls)} calls"


def _unfold_like_the_module(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[N, C_in prod(k), P]`` by the loop reference on the input padded like ``conv``."""
    from hbpkit.modules.conv.geometry import _padding_sides

    sides = _padding_sides(conv)
    pad = [p for side in reversed(sides) for p in side]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = torch.nn.functional.pad(x, pad, mode=mode)
    u = _patches_by_loops(xp, conv.kernel_size, conv.stride, conv.dilation, 1)
    return u.flatten(1, 2)


@pytest.mark.parametrize("name", ["1d_padded", "2d_padded", "2d_front_stride", "3d"])
def test_against_backpack(name):
    """BackPACK's KFAC and KFLR ``A`` is ``P`` times the expand ``A`` (sum over positions;
    BackPACK pads with zeros whatever the ``padding_mode``, so only zero padding here)."""
    from backpack import extensions as bpx

    plain, shape = _model(name)
    X, y = _data(shape)
    loss_fn = nn.CrossEntropyLoss()
    ours = run_extended(plain, loss_fn, X, y, exts.KFAC(), exts.KFLR())
    theirs = run_backpack(plain, loss_fn, X, y, bpx.KFAC(), bpx.KFLR())
    with torch.no_grad():
        P = math.prod(plain[0](X[:1]).shape[2:])
    for field in ("kfac", "kflr"):
        A = getattr(ours[0].weight, field)[1]
        A_bp = getattr(theirs[0].weight, field)[1]
        torch.testing.assert_close(P * A, A_bp, **TOL, msg=lambda m, f=field: f"{name} {f}: {m}")
