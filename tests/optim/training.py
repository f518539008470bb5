"""Test support: a few full-batch training steps with an ``hbpkit.optim`` optimizer."""

from __future__ import annotations

import torch
from torch import nn

from hbpkit import backprop


def train(
    model: nn.Module, loss_fn: nn.Module, opt: torch.optim.Optimizer, X, y, steps: int
) -> list[float]:
    """``steps`` steps on ``(X, y)``, each backward pass with the optimizer's extensions.

    Returns the loss before each step.
    """
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        with backprop(*opt.extensions):
            loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
