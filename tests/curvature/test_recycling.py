"""Recycling the previous pass's results (``hbpkit/curvature/recycling.py``): a result
nobody holds lends its memory to the next pass's result of the same size, a result
someone holds (a name, a container, a view) is never overwritten, and the values are
those of a fresh computation (per-sample autograd, dense Gram)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hbpkit import backprop, extend
from hbpkit.curvature.workspace import MIN_BYTES
from hbpkit.extensions import KFAC, BatchGrad

N, D_IN, D_OUT = 64, 1024, 160  # grad_batch [64, 160, 1024] float32: above MIN_BYTES


def _model_and_data(seed: int):
    torch.manual_seed(seed)
    model = extend(nn.Sequential(nn.Linear(D_IN, D_OUT), nn.Tanh(), nn.Linear(D_OUT, 3)))
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    return model, loss_fn, torch.randn(N, D_IN), torch.randint(3, (N,))


def _per_sample_grads(model, loss_fn, X, y) -> torch.Tensor:
    weight = model[0].weight
    rows = []
    for n in range(N):
        loss = loss_fn(model(X[n : n + 1]), y[n : n + 1])
        rows.append(torch.autograd.grad(loss, weight)[0])
    return torch.stack(rows)


def _batch_grad_pass(model, loss_fn, X, y) -> None:
    model.zero_grad()
    with backprop(BatchGrad()):
        loss_fn(model(X), y).backward()


def test_sizes_are_above_the_threshold():
    assert N * D_IN * D_OUT * 4 >= MIN_BYTES  # else nothing here would be recycled


def test_dropped_grad_batch_lends_its_memory_and_values_are_fresh():
    model, loss_fn, X, y = _model_and_data(0)
    _batch_grad_pass(model, loss_fn, X, y)
    old_ptr = model[0].weight.grad_batch.data_ptr()
    for _ in range(2):  # a recycled result is recycled again in the pass after
        X2 = torch.randn_like(X)  # other data: other values in the same memory
        _batch_grad_pass(model, loss_fn, X2, y)
        new = model[0].weight.grad_batch
        assert new.data_ptr() == old_ptr and new._base is None
        torch.testing.assert_close(new, _per_sample_grads(model, loss_fn, X2, y))
        del new  # (a name still holding it would keep it from being recycled)


@pytest.mark.parametrize("hold", ["name", "view", "container"])
def test_a_held_result_is_never_overwritten(hold):
    model, loss_fn, X, y = _model_and_data(1)
    _batch_grad_pass(model, loss_fn, X, y)
    old = model[0].weight.grad_batch
    expected_old = old.clone()
    kept = {"name": old, "view": old[3], "container": [old]}[hold]
    if hold != "name":
        del old
    X2 = torch.randn_like(X)
    _batch_grad_pass(model, loss_fn, X2, y)
    new = model[0].weight.grad_batch
    held = {"name": kept, "view": kept, "container": kept[0]}[hold]
    torch.testing.assert_close(held, expected_old if hold != "view" else expected_old[3])
    assert new.untyped_storage().data_ptr() != held.untyped_storage().data_ptr()
    torch.testing.assert_close(new, _per_sample_grads(model, loss_fn, X2, y))


def test_kfac_input_factor_recycled_only_when_dropped():
    torch.manual_seed(2)
    D = 3072  # A [3072, 3072] float32: 38 MB
    model = extend(nn.Sequential(nn.Linear(D, 4)))
    loss_fn = extend(nn.CrossEntropyLoss())
    X, y = torch.randn(16, D), torch.randint(4, (16,))

    def kfac_pass(X):
        with backprop(KFAC()):
            loss_fn(model(X), y).backward()
        return model[0].weight.kfac

    old_ptr = kfac_pass(X)[1].data_ptr()
    X2 = torch.randn_like(X)
    A = kfac_pass(X2)[1]
    assert A.data_ptr() == old_ptr
    torch.testing.assert_close(A, X2.T @ X2 / 16)
    kept = model[0].weight.kfac  # the user keeps the factors: the next pass must not touch A
    expected = kept[1].clone()
    A3 = kfac_pass(torch.randn_like(X))[1]
    torch.testing.assert_close(kept[1], expected)
    assert A3.data_ptr() != kept[1].data_ptr()


@pytest.mark.parametrize("conv", ["conv", "grouped", "transposed"])
def test_conv_grad_batch_recycled_in_the_weight_layout(conv):
    """Per-sample conv weight gradients written through the recycled memory keep the
    weight's layout (groups, transposed): equal to ``torch.func`` per-sample gradients."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(3)
    layer = {
        "conv": nn.Conv2d(64, 64, 3, padding=1),
        "grouped": nn.Conv2d(64, 128, 3, padding=1, groups=2),
        "transposed": nn.ConvTranspose2d(64, 128, 3, padding=1, groups=2),
    }[conv]
    model = extend(nn.Sequential(layer, nn.Flatten(), nn.Linear(layer.out_channels * 16, 3)))
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    X, y = torch.randn(256, 64, 4, 4), torch.randint(3, (256,))
    assert 256 * layer.weight.numel() * 4 >= MIN_BYTES
    params = dict(model.named_parameters())

    def sample_loss(p, x, t):
        return loss_fn(functional_call(model, p, (x[None],)), t[None])

    with backprop(BatchGrad()):
        loss_fn(model(X), y).backward()
    old_ptr = layer.weight.grad_batch.data_ptr()
    X2 = torch.randn_like(X)
    with backprop(BatchGrad()):
        loss_fn(model(X2), y).backward()
    assert layer.weight.grad_batch.data_ptr() == old_ptr
    expected = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, X2, y)["0.weight"]
    torch.testing.assert_close(layer.weight.grad_batch, expected)
