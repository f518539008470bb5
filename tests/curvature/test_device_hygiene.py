"""Nothing on the hot path reads a device tensor back to the host (issue 17).

A ``meta`` tensor has no data: any host read (``bool``, ``.item()``) raises, so code that
runs on it cannot synchronise with a device either.
"""

from __future__ import annotations

import torch

from hbpkit.curvature import workspace
from hbpkit.curvature.factors import DiagonalFactor


def test_diagonal_factor_from_values_needs_no_host_read():
    f = DiagonalFactor.from_values(torch.empty(3, 4, device="meta"))
    assert f.sign is not None and f.sign.device.type == "meta"
    assert f.s.shape == (3, 4)


def test_diagonal_factor_from_values_keeps_the_curvature():
    diag = torch.tensor([[4.0, -9.0, 0.0], [1.0, 0.0, 2.0]], dtype=torch.float64)
    for d in (diag, diag.abs()):
        f = DiagonalFactor.from_values(d)
        torch.testing.assert_close(f.signed_square(), d)
    assert DiagonalFactor.from_values(diag.abs()).sign is None  # CPU: all +1 dropped


def test_workspace_allocates_on_the_device_without_host_reads(monkeypatch):
    monkeypatch.setattr(workspace, "MIN_BYTES", 0)
    ws = workspace.Workspace(2**20)
    like = torch.empty(1, device="meta")
    out = ws.empty((2, 3), like)
    assert out.device.type == "meta" and ws.reused == 0
    ws.offer(out)
    del out
    ws.begin()  # a device allocator caches blocks itself: nothing is kept
    assert ws.empty((2, 3), like).device.type == "meta" and ws.reused == 0
