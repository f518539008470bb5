"""Local residual factors (``hbpkit/curvature/local.py``) against the dense path and autograd.

In float64 on small CNNs with every module that takes local factors (Conv1d/2d/3d with
random stride, padding, dilation and groups; zero / constant padding; overlapping max
and average pooling; smooth activations) and some that do not (Flatten, Linear,
Dropout, reflect padding): ``DiagHessian`` and the Kronecker factors of
``HBP("hessian" / "pch-abs", "exact", "sqrt")`` through the local path, materialised
or lazy in tiny chunks, equal those of the dense path (``MemoryPolicy(local_factors=
False)``), and ``diag_h`` equals the diagonal of the autograd Hessian.
"""

from __future__ import annotations

import random

import pytest
import reference as ref
import torch
from torch import nn

from hbpkit import backprop, extend
from hbpkit.curvature import local as local_factor
from hbpkit.curvature.memory import DenseBudgetError, MemoryPolicy
from hbpkit.extensions import HBP, DiagHessian

DT = torch.float64
RTOL, ATOL = 1e-9, 1e-13


def _conv(rng: random.Random, d: int, c_in: int, c_out: int, grouped: bool) -> nn.Module:
    """A random ``Conv{d}d`` (stride, padding, dilation; groups 2 if ``grouped``)."""
    groups = 2 if grouped else 1
    k = [rng.randint(1, 3) for _ in range(d)]
    return getattr(nn, f"Conv{d}d")(
        c_in,
        c_out,
        k,
        stride=[rng.randint(1, 2) for _ in range(d)],
        padding=[rng.randint(0, 2) for _ in range(d)],
        dilation=[rng.randint(1, 2) for _ in range(d)],
        groups=groups,
    )


def _random_cnn(seed: int, d: int, grouped: bool) -> tuple[nn.Sequential, torch.Tensor]:
    """Conv, act, [pad], pool, conv, act, [pool], conv, act, Flatten, Linear, act, Linear."""
    rng = random.Random(seed)
    size = {1: 13, 2: 9, 3: 6}[d]
    acts = [nn.Sigmoid, nn.Tanh, nn.ELU, nn.Softplus]
    while True:
        torch.manual_seed(seed)
        pad_cls = getattr(nn, rng.choice(["ZeroPad", "ConstantPad"]) + f"{d}d")
        pad_args = [rng.randint(0, 1) for _ in range(2 * d)]
        pad = pad_cls(pad_args) if pad_cls.__name__.startswith("Zero") else pad_cls(pad_args, 0.5)
        pool = getattr(nn, f"{rng.choice(['Max', 'Avg'])}Pool{d}d")(3, 2, padding=1)
        pool2 = getattr(nn, f"{rng.choice(['Max', 'Avg'])}Pool{d}d")(2, 1)
        c = [2, 4, 4, 2] if grouped else [2, 3, 3, 2]
        features = nn.Sequential(
            _conv(rng, d, c[0], c[1], grouped),
            rng.choice(acts)(),
            pad,
            pool,
            _conv(rng, d, c[1], c[2], grouped),
            rng.choice(acts)(),
            pool2,
            _conv(rng, d, c[2], c[3], grouped),
            rng.choice(acts)(),
            nn.Flatten(),
        )
        X = torch.randn(3, c[0], *([size] * d))
        try:
            out = features(X)
        except RuntimeError:
            continue
        if out.shape[1] == 0 or out.shape[1] > 40:
            continue
        model = nn.Sequential(*features, nn.Linear(out.shape[1], 4), nn.Sigmoid(), nn.Linear(4, 3))
        return model.to(DT), X.to(DT)


CASES = [(seed, d, grouped) for d in (1, 2, 3) for seed, grouped in ((0, False), (1, True))]
IDS = [f"{d}d-{'grouped' if g else 'dense'}-{s}" for s, d, g in CASES]


def _run(model, X, y, extensions, enabled: bool, store: int, chunk: int, monkeypatch):
    memory = MemoryPolicy(local_factors=enabled, local_store_bytes=store, local_chunk_bytes=chunk)
    loss_fn = extend(nn.CrossEntropyLoss())
    with backprop(*extensions, memory=memory):
        loss_fn(model(X), y).backward()
    results = {}
    for ext in extensions:
        results[ext.savefield] = [getattr(p, ext.savefield) for p in model.parameters()]
    return results


def _count_local(monkeypatch) -> list[int]:
    """Count the local steps taken (so a test notices when the local path is not used)."""
    calls = [0]
    then = local_factor.LocalFactor.then

    def spy(self, step):
        calls[0] += 1
        return then(self, step)

    monkeypatch.setattr(local_factor.LocalFactor, "then", spy)
    return calls


# store / chunk budgets: materialised local factors; lazy factors in chunks of a few
# columns (split over anchor rows and channels), every dense factor lazy too
PATHS = {"materialised": (2**28, 2**27), "lazy": (0, 2**12)}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_diag_hessian_local_equals_dense_and_autograd(case, monkeypatch):
    model, X = _random_cnn(*case)
    model = extend(model)
    y = torch.tensor([0, 2, 1])
    params = list(model.parameters())
    H = ref.hessian(nn.CrossEntropyLoss()(model(X), y), params)
    expected = [
        block.diagonal().reshape(p.shape) for p, block in zip(params, ref.blocks(H, params))
    ]
    dense = _run(model, X, y, [DiagHessian()], False, 2**28, 2**27, monkeypatch)["diag_h"]
    for a, b in zip(dense, expected):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    for path, (store, chunk) in PATHS.items():
        steps = _count_local(monkeypatch)
        local = _run(model, X, y, [DiagHessian()], True, store, chunk, monkeypatch)["diag_h"]
        assert steps[0] > 0, "the local path was not taken"
        for a, b in zip(local, expected):
            torch.testing.assert_close(
                a, b, rtol=RTOL, atol=ATOL, msg=lambda m, path=path: f"{path}: {m}"
            )


@pytest.mark.parametrize("curvature", ["hessian", "pch-abs"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("case", [c for c in CASES if not c[2]], ids=lambda c: f"{c[1]}d")
def test_hbp_factors_local_equal_dense(case, curvature, approx, monkeypatch):
    model, X = _random_cnn(*case)
    model = extend(model)
    y = torch.tensor([1, 0, 2])
    ext = [HBP(curvature, "exact", "sqrt", kfac_approx=approx)]
    dense = _run(model, X, y, ext, False, 2**28, 2**27, monkeypatch)["hbp"]
    for store, chunk in PATHS.values():
        steps = _count_local(monkeypatch)
        local = _run(model, X, y, ext, True, store, chunk, monkeypatch)["hbp"]
        assert steps[0] > 0
        for a, b in zip(local, dense):
            for fa, fb in zip(a, b):
                torch.testing.assert_close(fa, fb, rtol=RTOL, atol=ATOL)


def test_local_factors_through_unsupported_modules(monkeypatch):
    """Dropout, reflect padding and a Linear on feature maps densify local factors, exactly."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.Tanh(),
        nn.Dropout(0.3),
        nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"),
        nn.Sigmoid(),
        nn.Linear(5, 4),
        nn.Sigmoid(),
        nn.Conv2d(3, 2, 2, stride=2, padding=1),
        nn.Sigmoid(),
        nn.MaxPool2d(2, 1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).to(DT)
    model = extend(model.eval())
    X, y = torch.randn(2, 2, 7, 7, dtype=DT), torch.tensor([2, 0])
    steps = _count_local(monkeypatch)
    local = _run(model, X, y, [DiagHessian()], True, 0, 1, monkeypatch)["diag_h"]
    assert steps[0] > 0
    params = list(model.parameters())
    H = ref.hessian(nn.CrossEntropyLoss()(model(X), y), params)
    for p, a, block in zip(params, local, ref.blocks(H, params)):
        torch.testing.assert_close(a, block.diagonal().reshape(p.shape), rtol=RTOL, atol=ATOL)


def test_dense_blow_up_still_refused_up_front():
    """Local columns that must become dense before a module without local rules are refused."""
    model = extend(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.Dropout(0.0),
            nn.Sigmoid(),
            nn.Conv2d(8, 64, 3, padding=1),
            nn.Sigmoid(),
            nn.Flatten(),
            nn.Linear(64 * 64 * 64, 2),
        )
    )
    loss = extend(nn.CrossEntropyLoss())(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 1]))
    with pytest.raises(DenseBudgetError, match="Densifying local curvature factors"):
        with backprop(DiagHessian()):
            loss.backward()
    assert not any(hasattr(p, "diag_h") for p in model.parameters())


def test_to_dense_places_patches():
    """``LocalValues.to_sqrt`` puts every patch at ``a * stride + offset``, cropped to the map."""
    geom = local_factor.LocalGeometry((3, 2), (2, 3), (-1, 1), (3, 2), (5, 6), 1)
    values = torch.randn(1, 3, 2, 1, 1, 3, 2, dtype=DT)
    chunk = local_factor.LocalValues(values, None, geom).tidy()
    dense = chunk.to_sqrt().S  # [6, 1, 1, 5, 6]
    expected = torch.zeros(3, 2, 5, 6, dtype=DT)
    for a0 in range(3):
        for a1 in range(2):
            for p0 in range(3):
                for p1 in range(2):
                    i, j = a0 * 2 - 1 + p0, a1 * 3 + 1 + p1
                    if 0 <= i < 5 and 0 <= j < 6:
                        expected[a0, a1, i, j] = values[0, a0, a1, 0, 0, p0, p1]
    torch.testing.assert_close(dense.reshape(3, 2, 5, 6), expected)


@pytest.mark.parametrize("case", [c for c in CASES if c[1] == 2], ids=lambda c: f"2d-{c[0]}")
def test_diag_hessian_same_for_every_chunk_budget(case, monkeypatch):
    """The steps cache what they read of the forward pass per chunk geometry (the chunks of
    one anchor row, the passes of later consumers): every chunk budget, from one column per
    chunk to everything materialised, gives the same ``diag_h`` to round-off, and the caches
    are hit (values reused, not only computed)."""
    model, X = _random_cnn(*case)
    model = extend(model)
    y = torch.tensor([0, 2, 1])
    hits, misses = [0], [0]
    get = local_factor._GeometryCache.get

    def spy(self, geom, compute):
        (hits if self.key == geom else misses)[0] += 1
        return get(self, geom, compute)

    monkeypatch.setattr(local_factor._GeometryCache, "get", spy)
    results = {}
    for store, chunk in ((2**28, 2**27), (0, 2**14), (0, 2**12), (0, 2**10), (0, 1)):
        results[store, chunk] = _run(model, X, y, [DiagHessian()], True, store, chunk, monkeypatch)
    assert hits[0] > 0 and misses[0] > 0, (hits, misses)
    reference = results[2**28, 2**27]["diag_h"]
    for budget, result in results.items():
        for a, b in zip(result["diag_h"], reference):
            torch.testing.assert_close(
                a, b, rtol=1e-12, atol=1e-15, msg=lambda m, budget=budget: f"{budget}: {m}"
            )
