"""A view between the model and the loss: ``loss_fn(logits.view(-1, V), y.view(-1))``.

The loss's input is then not a module output but a view of one, which the hooks do not
see. Where it is one view of an extended call's output (one ``view`` / ``reshape`` /
``flatten`` autograd node between them), the backward pass inserts the module that does
the same as a *virtual call*: :class:`~hbpkit.reshaping.MergeBatch` where the batch
dimension is merged with the next (``[N, T, *f] -> [N T, *f]``: the samples stay the
sequences), ``nn.Flatten`` within each sample, ``nn.Identity`` for the same shape. The
virtual call has no hook: the pass processes it right after the loss.
"""

from __future__ import annotations

import torch
from torch import nn

from hbpkit.core.calls import NODE_KEY, ModuleCall
from hbpkit.modules.tables import SECOND_ORDER
from hbpkit.reshaping import MergeBatch

#: autograd nodes of a view or reshape (``view``, ``reshape``, ``flatten`` record these)
VIEW_NODES = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0")


def bridge_view(loss: ModuleCall) -> ModuleCall | None:
    """Insert a virtual call between ``loss`` and the extended call whose output it views;
    returns it (linked: the loss's parent), or ``None`` where the input is no such view."""
    if loss.parents[0] is not None or loss.released:
        return None
    origin = loss.origins[0]
    if origin is None or type(origin).__name__ not in VIEW_NODES:
        return None
    producers = [fn for fn, _ in origin.next_functions if fn is not None]
    if len(producers) != 1:
        return None
    producer = producers[0].metadata.get(NODE_KEY)
    if producer is None or producer.released:
        return None
    x = loss.inputs[0]
    source, target = tuple(producer.output_shape), tuple(x.shape)
    module = _module(source, target)
    if module is None:
        return None
    placeholder = torch.empty(source, dtype=x.dtype, device="meta")  # its shape, no data
    call = ModuleCall(module, (placeholder,), x, SECOND_ORDER.lookup(module))
    call.parents, call.origins, call.grad_slots = (producer,), (None,), (0,)
    loss.parents = (call, *loss.parents[1:])
    loss.origins = (None, *loss.origins[1:])
    return call


def is_virtual(call: ModuleCall) -> bool:
    """Whether ``call`` was inserted by :func:`bridge_view` (no hook: the pass runs it)."""
    x = call.inputs[0] if call.inputs else None
    return isinstance(x, torch.Tensor) and x.is_meta


def _module(source: tuple[int, ...], target: tuple[int, ...]) -> nn.Module | None:
    """The module that maps ``source`` to ``target`` as the view does, if any."""
    if source == target:
        return nn.Identity()
    if len(source) >= 2 and source[0] * source[1] == target[0] and source[2:] == target[1:]:
        return MergeBatch()
    if len(target) == 2 and len(source) > 2 and source[0] == target[0]:
        return nn.Flatten()
    return None
