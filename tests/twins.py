"""One backward pass on an extended copy of a model, by hbpkit and by BackPACK 1.7.1.

The tests compare the copies' savefields; the model and loss passed in stay untouched.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from hbpkit import backprop, extend
from hbpkit.curvature.memory import MemoryPolicy


def run_extended(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    *extensions,
    memory: MemoryPolicy | None = None,
) -> nn.Module:
    """An extended copy of ``model`` after ``loss_fn(copy(X), y).backward()`` inside
    ``backprop(*extensions, memory=memory)``."""
    twin = extend(copy.deepcopy(model))
    loss = extend(copy.deepcopy(loss_fn))(twin(X), y)
    with backprop(*extensions, memory=memory):
        loss.backward()
    return twin


def run_backpack(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor, *extensions):
    """The same with BackPACK's ``extend`` and ``backpack(*extensions)``."""
    from backpack import backpack as bp_backpack
    from backpack import extend as bp_extend

    twin = bp_extend(copy.deepcopy(model))
    loss = bp_extend(copy.deepcopy(loss_fn))(twin(X), y)
    with bp_backpack(*extensions):
        loss.backward()
    return twin
