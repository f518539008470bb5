"""The workspace of reused buffers (``hbpkit/curvature/workspace.py``), float64.

The ownership rule: an offered tensor is reused only once the workspace holds its last
reference (no name, container, view or base of its storage elsewhere). End to end, passes
with the workspace (every tensor tracked: ``MIN_BYTES = 0``) give exactly the results of
passes without it, on a chain and on residual blocks whose sums send one factor to two
parents, and they do reuse buffers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hbpkit import backprop, extend
from hbpkit.branching import Residual
from hbpkit.curvature import workspace
from hbpkit.curvature.memory import MemoryPolicy
from hbpkit.extensions import KFAC, KFLR, DiagGGNExact, DiagHessian

DT = torch.float64


@pytest.fixture
def track_all(monkeypatch):
    """Track tensors of every size (the default skips those glibc reuses itself)."""
    monkeypatch.setattr(workspace, "MIN_BYTES", 0)


def _asked_once(ws: workspace.Workspace, shape, like) -> None:
    """Let ``ws`` see one request of ``shape``, as in a previous pass, then a new pass."""
    ws.empty(shape, like)
    ws.begin()


def test_a_dead_offer_is_reused(track_all):
    ws = workspace.Workspace(2**20)
    like = torch.zeros(1, dtype=DT)
    _asked_once(ws, (4, 5), like)
    t = torch.randn(4, 5, dtype=DT)
    ptr = t.data_ptr()
    ws.offer(t)
    del t
    out = ws.empty((4, 5), like)
    assert out.data_ptr() == ptr and ws.reused == 1


@pytest.mark.parametrize("holder", ["name", "container", "view", "base"])
def test_a_held_offer_is_not_reused(track_all, holder):
    ws = workspace.Workspace(2**20)
    like = torch.zeros(1, dtype=DT)
    _asked_once(ws, (4, 5), like)
    t = torch.randn(4, 5, dtype=DT) if holder != "base" else torch.randn(20, dtype=DT)
    before = t.clone()
    keep = {"name": t, "container": [t], "view": t.view(20), "base": t}[holder]
    if holder == "base":
        t = t.view(4, 5)  # offer the view, the base stays referenced
    ws.offer(t)
    if holder != "name":
        del t
    out = ws.empty((4, 5), like)
    out.fill_(7.0)
    assert ws.reused == 0
    kept = keep[0] if holder == "container" else keep
    assert torch.equal(kept.reshape(-1), before.reshape(-1))


def test_views_and_their_base_offered_together_are_reused(track_all):
    ws = workspace.Workspace(2**20)
    like = torch.zeros(1, dtype=DT)
    _asked_once(ws, (20,), like)
    base = torch.randn(4, 5, dtype=DT)
    ws.offer(base[:, :4])  # e.g. a padding's crop of a pooling's factor
    ws.offer(base.view(20))
    del base
    assert ws.empty((20,), like).numel() == 20 and ws.reused == 1


def test_off_and_unrequested_sizes_allocate(track_all):
    like = torch.zeros(1, dtype=DT)
    off = workspace.Workspace(0)
    off.offer(torch.randn(3, dtype=DT))
    assert off.empty((3,), like).shape == (3,) and off.reused == 0
    ws = workspace.Workspace(2**20)
    _asked_once(ws, (3,), like)
    ws.offer(torch.randn(100, dtype=DT))  # more than twice the request: freed
    assert ws.empty((3,), like).shape == (3,) and ws.reused == 0


def _nets():
    torch.manual_seed(0)
    chain = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Sigmoid(), nn.MaxPool2d(2), nn.Tanh(),
        nn.Flatten(), nn.Linear(12, 6), nn.Sigmoid(), nn.Linear(6, 3),
    )  # fmt: skip
    residual = nn.Sequential(
        nn.Linear(5, 6),
        Residual(nn.Sequential(nn.Sigmoid(), nn.Linear(6, 6), nn.Tanh())),
        Residual(nn.Sequential(nn.Sigmoid(), nn.Linear(6, 6))),
        nn.Sigmoid(),
        nn.Linear(6, 3),
    )
    return [(chain, torch.randn(6, 2, 4, 4)), (residual, torch.randn(6, 5))]


@pytest.mark.parametrize("net", [0, 1], ids=["chain", "residual"])
@pytest.mark.parametrize("ext", [KFAC, KFLR, DiagGGNExact, DiagHessian])
def test_results_equal_those_without_workspace(track_all, net, ext):
    model, X = _nets()[net]
    model, X = model.to(DT), X.to(DT)
    y = torch.randint(0, 3, (X.shape[0],))
    results = {}
    for label, policy in (("off", MemoryPolicy()), ("on", MemoryPolicy(workspace_bytes=2**20))):
        m, loss_fn = extend(model), extend(nn.CrossEntropyLoss())
        passes = []
        for _ in range(3):  # later passes reuse the buffers of earlier ones
            torch.manual_seed(1)  # KFAC's draws
            with backprop(ext(), memory=policy):
                loss_fn(m(X), y).backward()
            field = ext().savefield
            passes.append([_flat(getattr(p, field)) for p in m.parameters()])
        results[label] = passes
        if label == "on":
            assert workspace._WORKSPACES[loss_fn].reused > 0
    for off, on in zip(results["off"], results["on"]):
        for a, b in zip(off, on):
            torch.testing.assert_close(b, a, rtol=0, atol=0)


def _flat(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.clone()
    return torch.cat([f.flatten() for f in value]).clone()
