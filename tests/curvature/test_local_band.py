"""The faster forms of DiagHessian through convolutions (issue 17, item 5) against autograd.

In float64, with the column forms at every convolution (the forward form off): the weight
diagonal of a convolution from the band of its output curvature
(``hbpkit/modules/conv/band.py``), forced on and chosen by its cost model, the first step
from a diagonal source as an outer product (``ConvTransposeStep.from_diagonal``) and the
patch mask from the integer geometry (``LocalGeometry.valid``), each against brute force.
"""

from __future__ import annotations

import itertools

import pytest
import reference as ref
import torch
from test_local_factors import CASES, IDS, _random_cnn
from torch import nn

from hbpkit import backprop, extend
from hbpkit.curvature import local as local_factor
from hbpkit.curvature.memory import MemoryPolicy
from hbpkit.extensions import DiagGGNExact, DiagHessian
from hbpkit.extensions import diagonal as diagonal_ext
from hbpkit.modules.conv import band as band_module
from hbpkit.modules.conv import diagonal as conv_diagonal

DT = torch.float64
RTOL, ATOL = 1e-9, 1e-13


@pytest.fixture(autouse=True)
def column_forms(monkeypatch):
    """The column forms at every convolution: the forward form would take the first ones
    (it has its own tests, ``test_forward_diagonal.py``)."""
    monkeypatch.setattr(diagonal_ext, "prefers_forward", lambda *args: False)


def _expected(model, X, y) -> list[torch.Tensor]:
    params = list(model.parameters())
    H = ref.hessian(nn.CrossEntropyLoss()(model(X), y), params)
    return [block.diagonal().reshape(p.shape) for p, block in zip(params, ref.blocks(H, params))]


def _diag_h(model, X, y, store: int, chunk: int) -> list[torch.Tensor]:
    memory = MemoryPolicy(local_store_bytes=store, local_chunk_bytes=chunk)
    with backprop(DiagHessian(), memory=memory):
        extend(nn.CrossEntropyLoss())(model(X), y).backward()
    return [p.diag_h for p in model.parameters()]


def _spy_forms(monkeypatch) -> dict[str, int]:
    """Count the chunks that took the band form and the direct form of the weight diagonal."""
    counts = {"band": 0, "direct": 0, "pooled": 0}
    add = band_module.BandCurvature.add
    direct = conv_diagonal.UnfoldedDiagonal._param_diag_local_weight
    pooled = conv_diagonal.pooled_diags

    def spy_pooled(*args):
        counts["pooled"] += 1
        return pooled(*args)

    monkeypatch.setattr(conv_diagonal, "pooled_diags", spy_pooled)

    def spy_add(self, chunk):
        counts["band"] += 1
        return add(self, chunk)

    def spy_direct(self, call, chunk):
        counts["direct"] += 1
        return direct(self, call, chunk)

    monkeypatch.setattr(band_module.BandCurvature, "add", spy_add)
    monkeypatch.setattr(conv_diagonal.UnfoldedDiagonal, "_param_diag_local_weight", spy_direct)
    return counts


# materialised local factors; lazy ones in chunks of a few columns
PATHS = {"materialised": (2**28, 2**27), "lazy": (0, 2**12)}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_band_form_forced_equals_autograd(case, path, monkeypatch):
    """Conv1d/2d/3d with random stride, padding, dilation and groups, pooling and padding in
    the chain, smooth activations (residuals of both signs): every local weight diagonal
    in the band form."""
    model, X = _random_cnn(*case)
    model = extend(model)
    y = torch.tensor([0, 2, 1])
    expected = _expected(model, X, y)
    monkeypatch.setattr(conv_diagonal, "band_wins", lambda *args: True)
    monkeypatch.setattr(conv_diagonal, "pooled_tail", lambda f: None)
    counts = _spy_forms(monkeypatch)
    result = _diag_h(model, X, y, *PATHS[path])
    assert counts["band"] > 0 and counts["direct"] == 0, counts
    for a, b in zip(result, expected):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_pooled_form_forced_equals_autograd(case, monkeypatch):
    """The weight and bias diagonals from the columns before a max-pooling (overlapping and
    padded windows, zero / constant padding and activations after it), for every lazy
    factor with such a tail."""
    model, X = _random_cnn(*case)
    model = extend(model)
    y = torch.tensor([0, 2, 1])
    expected = _expected(model, X, y)
    monkeypatch.setattr(conv_diagonal, "pooled_cost", lambda *args: 0)
    counts = _spy_forms(monkeypatch)
    result = _diag_h(model, X, y, *PATHS["lazy"])
    has_max_pool = any(isinstance(m, nn.modules.pooling._MaxPoolNd) for m in model)
    assert (counts["pooled"] > 0) == has_max_pool, counts
    for a, b in zip(result, expected):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def _max_pool_cnn(d: int) -> nn.Sequential:
    """Max-poolings behind convolutions: overlapping padded windows after an activation and
    a zero padding, a max-pooling right after a convolution (no activation between),
    stride, dilation and groups on the convolutions before them."""
    torch.manual_seed(7 + d)
    return nn.Sequential(
        getattr(nn, f"Conv{d}d")(2, 4, 3, padding=1, dilation=[1, 2, 1][:d]),
        nn.Sigmoid(),
        getattr(nn, f"ZeroPad{d}d")([1, 0, 0, 1, 1, 0][: 2 * d]),
        getattr(nn, f"MaxPool{d}d")(3, 2, padding=1),
        getattr(nn, f"Conv{d}d")(4, 6, 2, stride=[2, 1, 1][:d], groups=2),
        getattr(nn, f"MaxPool{d}d")(2, 1),
        nn.Tanh(),
        getattr(nn, f"Conv{d}d")(6, 3, 2),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.LazyLinear(3),
        nn.ELU(),
        nn.Linear(3, 3),
    ).to(DT)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_pooled_form_forced_max_pools(d, monkeypatch):
    model = _max_pool_cnn(d)
    X = torch.randn(2, 2, *([{1: 15, 2: 10, 3: 11}[d]] * d), dtype=DT)
    model(X)  # initialise the lazy Linear
    model = extend(model)
    y = torch.tensor([0, 2])
    expected = _expected(model, X, y)
    monkeypatch.setattr(conv_diagonal, "pooled_cost", lambda *args: 0)
    counts = _spy_forms(monkeypatch)
    result = _diag_h(model, X, y, *PATHS["lazy"])
    assert counts["pooled"] > 0, counts
    for a, b in zip(result, expected):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def _record(monkeypatch, owner, name: str, what) -> list:
    """Wrap method ``name`` of ``owner``; record ``what(*args)`` of every call."""
    calls, method = [], getattr(owner, name)

    def spy(*args):
        calls.append(what(*args))
        return method(*args)

    monkeypatch.setattr(owner, name, spy)
    return calls


def _force_gathered_band(monkeypatch) -> list[int]:
    """Take the pooled form with the weight diagonal from the band on the pooled map
    (``BandCurvature.weight_diag_gathered``); record the samples of each contraction."""
    monkeypatch.setattr(conv_diagonal, "pooled_cost", lambda *args: 1)
    monkeypatch.setattr(conv_diagonal, "gathered_band_cost", lambda *args: 0)
    owner = band_module.BandCurvature
    return _record(monkeypatch, owner, "weight_diag_gathered", lambda self, ut, b: ut.shape[0])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gathered_band_forced_equals_autograd(case, monkeypatch):
    """The pooled form's weight diagonal from the band of the columns on the pooled map,
    contracted with the input gathered per output channel."""
    model, X = _random_cnn(*case)
    model = extend(model)
    y = torch.tensor([0, 2, 1])
    expected = _expected(model, X, y)
    calls = _force_gathered_band(monkeypatch)
    result = _diag_h(model, X, y, *PATHS["lazy"])
    has_max_pool = any(isinstance(m, nn.modules.pooling._MaxPoolNd) for m in model)
    assert bool(calls) == has_max_pool, calls
    for a, b in zip(result, expected):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("chunk", [2**12, 2**30], ids=["sample-blocks", "one-block"])
def test_gathered_band_forced_max_pools(d, chunk, monkeypatch):
    """Overlapping padded windows, groups, stride and dilation; in blocks of samples (each
    with its own band and gathered input) and in one."""
    model = _max_pool_cnn(d)
    X = torch.randn(3, 2, *([{1: 15, 2: 10, 3: 11}[d]] * d), dtype=DT)
    model(X)  # initialise the lazy Linear
    model = extend(model)
    y = torch.tensor([0, 2, 1])
    expected = _expected(model, X, y)
    calls = _force_gathered_band(monkeypatch)
    result = _diag_h(model, X, y, 0, chunk)
    assert calls and (min(calls) < 3) == (chunk == 2**12), calls  # samples per contraction
    for a, b in zip(result, expected):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_band_refuses_to_add_after_contracting():
    geom = local_factor.LocalGeometry((3,), (1,), (0,), (2,), (4,), 2)
    band = band_module.BandCurvature(geom, 1, DT, "cpu")
    band.weight_diag_gathered(torch.randn(1, 2, 3, 4, dtype=DT), 2**20)
    values = torch.randn(1, 3, 1, 2, 2, dtype=DT)
    with pytest.raises(RuntimeError, match="after a contraction"):
        band.add(local_factor.LocalValues(values, None, geom))


def _force_gram(monkeypatch) -> list[int]:
    """Take the per-channel Gram form of the weight diagonal of dense sqrt factors
    (``UnfoldedDiagonal._weight_diag_gram``); record the column count of each call."""
    monkeypatch.setattr(conv_diagonal, "gram_cost", lambda *args: 0)
    owner = conv_diagonal.UnfoldedDiagonal
    return _record(monkeypatch, owner, "_weight_diag_gram", lambda self, call, f: f.S.shape[0])


@pytest.mark.parametrize("d", [1, 2, 3])
def test_gram_form_forced_equals_autograd(d, monkeypatch):
    """DiagHessian (materialised residuals: dense columns of both signs) and DiagGGNExact
    through the Gram form, in one block of samples and in several."""
    model = _max_pool_cnn(d)
    X = torch.randn(3, 2, *([{1: 15, 2: 10, 3: 11}[d]] * d), dtype=DT)
    model(X)  # initialise the lazy Linear
    model = extend(model)
    y = torch.tensor([0, 2, 1])
    params = list(model.parameters())
    expected = _expected(model, X, y)
    ggn = ref.ggn(model(X), nn.CrossEntropyLoss(), y, params)
    expected_ggn = [b.diagonal().reshape(p.shape) for p, b in zip(params, ref.blocks(ggn, params))]
    calls = _force_gram(monkeypatch)
    for chunk in (2**27, 2**21):  # the layers where the Gram fits, in blocks of samples
        calls.clear()
        memory = MemoryPolicy(local_factors=False, local_chunk_bytes=chunk)
        with backprop(DiagHessian(), DiagGGNExact(), memory=memory):
            extend(nn.CrossEntropyLoss())(model(X), y).backward()
        assert calls and (max(calls) > 3 or d == 3), calls  # the residuals' columns too
        for p, h, g in zip(params, expected, expected_ggn):
            torch.testing.assert_close(p.diag_h, h, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(p.diag_ggn_exact, g, rtol=RTOL, atol=ATOL)


def _wide_cnn() -> nn.Sequential:
    """Many input channels and short patches (the band form wins at the second and third
    convolutions), a max-pooling after the first (the pooled form wins for lazy factors,
    the direct form for the longest materialised patches),
    stride 2, dilation, groups, padding, max-pooling; sigmoid and tanh residuals change sign."""
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(2, 12, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(12, 12, 3, stride=2, padding=2, dilation=2, groups=2),
        nn.Sigmoid(),
        nn.ZeroPad2d((1, 0, 0, 1)),
        nn.Conv2d(12, 8, 2, padding=1),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 3),
    ).to(DT)


@pytest.mark.parametrize("path", list(PATHS))
def test_forms_chosen_by_cost(path, monkeypatch):
    model = extend(_wide_cnn())
    torch.manual_seed(6)
    X, y = torch.randn(2, 2, 14, 14, dtype=DT), torch.tensor([1, 2])
    expected = _expected(model, X, y)
    counts = _spy_forms(monkeypatch)
    result = _diag_h(model, X, y, *PATHS[path])
    if path == "lazy":  # the columns before each max-pooling
        assert counts["pooled"] > 0 and counts["band"] > 0, counts
    else:  # materialised after the pooling: no pooled form
        assert counts["band"] > 0 and counts["direct"] > 0, counts
    for a, b in zip(result, expected):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_band_form_in_sample_blocks(monkeypatch):
    """A band larger than ``local_chunk_bytes`` is accumulated in blocks of samples (the
    factor's steps rerun per block); where a step cannot be restricted to samples the
    direct form is used."""
    model = extend(_wide_cnn())
    X, y = torch.randn(3, 2, 14, 14, dtype=DT), torch.tensor([1, 2, 0])
    expected = _expected(model, X, y)
    monkeypatch.setattr(conv_diagonal, "band_wins", lambda *args: True)
    monkeypatch.setattr(conv_diagonal, "band_bytes", lambda *args: 2**40)
    batches = []
    init = band_module.BandCurvature.__init__

    def spy_init(self, geom, batch, dtype, device):
        batches.append(batch)
        init(self, geom, batch, dtype, device)

    monkeypatch.setattr(band_module.BandCurvature, "__init__", spy_init)
    for store, chunk in PATHS.values():
        batches.clear()
        result = _diag_h(model, X, y, store, chunk)
        assert batches and set(batches) == {1}, batches
        for a, b in zip(result, expected):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    monkeypatch.setattr(local_factor.ScaleStep, "samples", lambda self, index: None)
    counts = _spy_forms(monkeypatch)
    result = _diag_h(model, X, y, 0, 2**12)
    assert counts["direct"] > 0, counts  # forced band_wins: direct only as the fallback
    for a, b in zip(result, expected):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_first_step_from_diagonal_is_the_transposed_convolution(d):
    """``from_diagonal`` equals the transposed convolution of the one-hot columns."""
    torch.manual_seed(d)
    conv = getattr(nn, f"Conv{d}d")(4, 6, [3, 2, 2][:d], dilation=[2, 1, 2][:d], groups=2)
    step = local_factor.ConvTransposeStep(
        conv.weight.detach().to(DT), conv.stride, conv.dilation, 2, (0,) * d, (7,) * d
    )
    N, size = 2, (3, 2, 2)[:d]
    s = torch.randn(N, 6, *size, dtype=DT)
    values = step.from_diagonal(s[:, 2:5], slice(2, 5))  # [3, *A, N, C_in, *patch]
    for c, a in itertools.product(range(2, 5), itertools.product(*map(range, size))):
        one_hot = torch.zeros(N, 6, *([1] * d), dtype=DT)
        one_hot[:, c] = s[(slice(None), c, *a)].reshape(N, *([1] * d))
        expected = getattr(torch.nn.functional, f"conv_transpose{d}d")(
            one_hot, step.weight, None, 1, 0, 0, 2, conv.dilation
        )
        torch.testing.assert_close(values[(c - 2, *a)], expected)


def test_valid_mask_from_integer_geometry():
    """``LocalGeometry.valid`` marks exactly the patch entries inside the map."""
    for anchors, stride, offset, patch in [
        ((3, 2), (2, 3), (-1, 1), (3, 2)),
        ((2, 2), (1, 1), (0, 0), (2, 2)),
        ((4,), (2,), (1,), (3,)),
    ]:
        size = (5, 6)[: len(anchors)]
        geom = local_factor.LocalGeometry(anchors, stride, offset, patch, size, 1)
        mask = geom.valid(torch.device("cpu"))
        expected = torch.ones(*anchors, *patch, dtype=torch.bool)
        for a in itertools.product(*map(range, anchors)):
            for p in itertools.product(*map(range, patch)):
                pos = [ai * s + o + pi for ai, s, o, pi in zip(a, stride, offset, p)]
                expected[(*a, *p)] = all(0 <= x < n for x, n in zip(pos, size))
        if bool(expected.all()):
            assert mask is None and geom.inside()
        else:
            assert not geom.inside()
            torch.testing.assert_close(mask.expand_as(expected), expected)
