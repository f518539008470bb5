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


def test_sampled_factor_of_a_non_negative_scale_needs_no_host_read():
    from hbpkit.modules.losses import signed_sampled

    draws, h = torch.empty(2, 3, 4, device="meta"), torch.empty(3, 4, device="meta")
    f = signed_sampled(draws, h, maybe_negative=False)
    assert f.sign is None and f.S.shape == (2, 3, 4)


def test_losses_know_the_sign_of_their_scale_from_their_structure():
    from hbpkit.modules.losses import CrossEntropyLossRules, MSELossRules, Terms

    x, labels = torch.randn(3, 4), torch.tensor([0, 1, 3])
    ce, mse = CrossEntropyLossRules(), MSELossRules()
    assert not ce.maybe_negative(Terms(torch.nn.CrossEntropyLoss(), x, labels, 1 / 3))
    assert ce.maybe_negative(Terms(torch.nn.CrossEntropyLoss(), x, x.softmax(1), 1 / 3))
    weighted = torch.nn.CrossEntropyLoss(weight=torch.ones(4))
    assert ce.maybe_negative(Terms(weighted, x, labels, 1 / 3))
    assert not mse.maybe_negative(Terms(torch.nn.MSELoss(), x, x, 0.5))
    assert mse.maybe_negative(Terms(torch.nn.MSELoss(), x, x, -0.5))
    assert mse.maybe_negative(Terms(torch.nn.MSELoss(), x, x, torch.tensor(0.5)))


def test_a_residual_product_needs_no_host_read():
    from hbpkit.core.calls import ModuleCall
    from hbpkit.modules.activations import SIGMOID

    x = torch.empty(2, 3, device="meta")
    call = ModuleCall(torch.nn.Sigmoid(), (x,), x, SIGMOID)
    product = SIGMOID.residual_mat_prod(call, torch.empty(2, 3, device="meta"), "hessian")
    assert product is not None and product(torch.empty(4, 2, 3, device="meta")).shape == (4, 2, 3)
