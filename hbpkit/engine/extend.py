"""``extend(module)``: install the forward hooks that record module calls.

The hook of a module runs in every forward pass while autograd records a graph.
It creates a :class:`~hbpkit.core.calls.ModuleCall` and attaches a tensor hook to
the output; the tensor hook does nothing unless a ``backprop(...)`` context is
active during the backward pass. Activations and dropout layers created with
``inplace=True`` are switched to ``inplace=False``: their values are the same,
and their inputs stay available for the curvature rules.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from hbpkit.core.calls import PATH, ModuleCall, is_replaying, link_output
from hbpkit.engine.context import current
from hbpkit.modules.tables import SECOND_ORDER, is_registered

_HANDLE = "_hbpkit_hook_handle"


def extend(module: nn.Module) -> nn.Module:
    """Prepare ``module`` and its submodules for hbpkit; returns ``module``.

    Idempotent. Leaf modules, modules of registered types and modules with parameters
    of their own get a forward hook (their children are then left alone: a module
    without rules is differentiated as a whole by the generic path,
    ``hbpkit/modules/generic.py``); other containers are entered.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"extend() expects a torch.nn.Module, got {type(module).__name__}")
    _extend(module)
    for name, child in module.named_modules(remove_duplicate=False):  # for error messages
        if name and getattr(child, PATH, None) is None:
            setattr(child, PATH, name)  # a plain string attribute
    return module


def _extend(module: nn.Module) -> None:
    children = list(module.children())
    if is_registered(module) or not children:
        _install(module)
        return
    if any(p is not None for p in module._parameters.values()):
        _install(module)  # parameters of its own and no rules: the generic path, as a whole
        return
    for child in children:
        _extend(child)


def _install(module: nn.Module) -> None:
    if getattr(module, _HANDLE, None) is not None:
        return
    if getattr(module, "inplace", False) is True:
        module.inplace = False
    setattr(module, _HANDLE, module.register_forward_hook(_forward_hook, with_kwargs=True))


def _forward_hook(module: nn.Module, inputs: tuple, kwargs: dict, output: object) -> Tensor | None:
    if not torch.is_grad_enabled() or not any(isinstance(t, Tensor) for t in inputs):
        return None
    if is_replaying():
        return None
    replaced, index = None, None
    if isinstance(output, (tuple, list)):  # e.g. an LSTM: record the call on its first output
        index = next(
            (i for i, o in enumerate(output) if isinstance(o, Tensor) and o.requires_grad), None
        )
        output = None if index is None else output[index]
    elif isinstance(output, Tensor) and output.requires_grad and output is inputs[0]:
        output = replaced = output.view_as(output)  # its own autograd node and tensor hook
    if not isinstance(output, Tensor) or not output.requires_grad or output.grad_fn is None:
        return None
    rules = SECOND_ORDER.lookup(module)
    call = ModuleCall(module, inputs, output, rules)
    call.kwargs = kwargs
    call.output_index = index
    if rules is not None:
        try:
            call.captured = rules.capture(module, inputs, output)
        except NotImplementedError as error:  # reported if a backward pass needs it
            call.captured = error
    link_output(output, call)
    output.register_hook(partial(_on_output_grad, call))
    return replaced


def _on_output_grad(call: ModuleCall, grad_output: Tensor) -> None:
    if is_replaying():  # a derivative through the recorded graph (modules/generic/recorded.py)
        return
    state = current()
    try:
        if state is not None:
            state.process(call, grad_output)
    finally:
        call.release()
