"""The memory policy of a backward pass (``hbpkit/curvature/memory.py``), float64.

``backprop(*extensions, memory=MemoryPolicy(...))`` gives the policy to every call the
pass takes; the up-front checks and the rules read it from there. Two passes with
different policies in one process do not affect each other, and a policy that only
changes chunk and buffer sizes does not change any result.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from hbpkit import backprop, extend
from hbpkit.curvature.memory import DEFAULT_POLICY, DenseBudgetError, MemoryPolicy, policy_of
from hbpkit.extensions import KFAC, KFRA, BatchGrad, DiagGGNExact, DiagHessian

DT = torch.float64

# every chunk and buffer as small as it gets, every local factor lazy
TINY_CHUNKS = MemoryPolicy(
    chunk_bytes=1, buffer_bytes=1, stack_min_patch=0, local_chunk_bytes=1, local_store_bytes=0
)


def _problem(groups: int = 1, seed: int = 0):
    """A small CNN (conv, max-pool, conv with ``groups``, smooth activations, Linear)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 2, groups=groups),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(36, 3),
    ).to(DT)
    X = torch.randn(3, 2, 8, 8, dtype=DT)
    y = torch.tensor([0, 2, 1])
    return extend(model), X, y, extend(nn.CrossEntropyLoss())


def _run(model, X, y, loss_fn, extensions, memory=None) -> dict[str, list[torch.Tensor]]:
    loss = loss_fn(model(X), y)
    torch.manual_seed(1)  # the same Monte Carlo draws in every run
    with backprop(*extensions, memory=memory):
        loss.backward()
    return {e.savefield: [getattr(p, e.savefield) for p in model.parameters()] for e in extensions}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for field in a:
        for x, y in zip(a[field], b[field], strict=True):
            for u, v in zip(x, y, strict=True) if isinstance(x, (list, tuple)) else [(x, y)]:
                torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


def test_defaults_and_frozen():
    assert policy_of(None) is DEFAULT_POLICY
    assert DEFAULT_POLICY == MemoryPolicy()
    assert MemoryPolicy().max_dense_bytes == 2**31 and MemoryPolicy().local_factors is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_POLICY.max_dense_bytes = 0


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"max_dense_bytes": -1}, ValueError),
        ({"chunk_bytes": 1.5}, ValueError),
        ({"buffer_bytes": True}, ValueError),
        ({"local_factors": 1}, TypeError),
    ],
)
def test_invalid_fields(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        MemoryPolicy(**kwargs)


@pytest.mark.parametrize("memory", [2**20, {"max_dense_bytes": 2**20}, MemoryPolicy])
def test_backprop_rejects_other_types(memory):
    with pytest.raises(TypeError, match="MemoryPolicy"):
        backprop(DiagGGNExact(), memory=memory)


def test_two_passes_do_not_affect_each_other():
    """A small budget refuses in its own pass only, before and after a default pass."""
    model, X, y, loss_fn = _problem()
    small = MemoryPolicy(max_dense_bytes=10_000)
    contexts = {"small": backprop(KFRA(), memory=small), "default": backprop(KFRA())}
    assert contexts["small"].memory is small and contexts["default"].memory is DEFAULT_POLICY
    results = []
    for name in ("small", "default", "small", "default"):
        loss = loss_fn(model(X), y)
        if name == "small":
            with pytest.raises(DenseBudgetError, match="max_dense_bytes.*memory=MemoryPolicy"):
                with contexts[name]:
                    loss.backward()
            # refused up front: nothing written (the earlier default pass's factors stay)
            kept = [getattr(p, "kfra", None) for p in model.parameters()]
            before = results[-1]["kfra"] if results else [None] * len(kept)
            assert all(k is b for k, b in zip(kept, before, strict=True))
        else:
            with contexts[name]:
                loss.backward()
            results.append({"kfra": [p.kfra for p in model.parameters()]})
    _assert_same(*results)
    assert small == MemoryPolicy(max_dense_bytes=10_000)  # unchanged by the passes


def test_local_factors_switch_is_read_from_the_pass():
    """Without local factors the residual of ``Tanh`` is densified at the second convolution:
    a budget between the two paths' needs refuses only the pass that turns them off."""
    model, X, y, loss_fn = _problem(groups=2)
    budget = 50_000  # below the 102 528 B of the dense [36, 3, 64] factor at the second conv
    expected = _run(model, X, y, loss_fn, [DiagHessian()])
    local = _run(model, X, y, loss_fn, [DiagHessian()], MemoryPolicy(max_dense_bytes=budget))
    _assert_same(local, expected)
    off = MemoryPolicy(max_dense_bytes=budget, local_factors=False)
    with pytest.raises(DenseBudgetError, match="diagonal"):
        _run(model, X, y, loss_fn, [DiagHessian()], off)
    dense = _run(model, X, y, loss_fn, [DiagHessian()], MemoryPolicy(local_factors=False))
    _assert_same(dense, expected)


@pytest.mark.parametrize("groups", [1, 2])
def test_chunk_sizes_do_not_change_results(groups):
    """The tiniest chunks and buffers give the default policy's results, pass after pass
    (grouped weights take the chunked diagonal and per-group Kronecker factors)."""
    model, X, y, loss_fn = _problem(groups)
    extensions = [DiagGGNExact(), DiagHessian(), BatchGrad(), KFAC(), KFRA()]
    default = _run(model, X, y, loss_fn, extensions)
    tiny = _run(model, X, y, loss_fn, extensions, TINY_CHUNKS)
    again = _run(model, X, y, loss_fn, extensions)
    _assert_same(tiny, default)
    _assert_same(again, default)
