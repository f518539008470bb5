"""Per-sample gradients that keep their graph, for backward passes that create one.

Under ``loss.backward(create_graph=True)`` (or ``torch.autograd.grad(..., create_graph=
True)``) the first-order quantities must be differentiable w.r.t. everything they depend
on: the gradient at the module's output ``g_n`` (through the layers above and the loss),
the module's input ``x_n`` (the layers below and the data), and the module's own
parameters. The rules compute on detached tensors (no graph, and nothing recorded in the
pass without one); here the module's call is replayed per sample with the live tensors,

    ``grad_batch[n] = J_{theta}(x_n, theta)^T g_n``,  ``J = d f(x_n, theta) / d theta``,

one vector-Jacobian product per sample under ``vmap`` (the per-sample function of the
generic path, ``hbpkit/modules/generic/function.py``). ``torch.func`` transforms compose
with autograd, so the result carries the graph to ``g``, ``x`` and ``theta``. The values
equal the rules' (``grad_batch.sum(0) == p.grad``) wherever each sample is processed on
its own, which is what hbpkit assumes of every module; a batch norm in training mode (its
statistics couple the samples) and active dropout (its mask cannot be replayed) are
refused.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.func import vjp, vmap

from hbpkit.core.calls import ModuleCall, describe
from hbpkit.modules.generic.function import CallFunction
from hbpkit.modules.generic.rules import GenericRules

_KEY = ("graph_batch_grad",)
_REPLAY = GenericRules()  # its call function and trainable parameters, for any module


def check_differentiable(call: ModuleCall) -> None:
    """Refuse what cannot be replayed per sample (before anything is computed)."""
    for name, sub in call.module.named_modules():
        where = f"'{name}' in " if name else ""
        if sub.training and isinstance(sub, nn.modules.batchnorm._BatchNorm):
            raise NotImplementedError(
                f"differentiable per-sample gradients (create_graph=True): {where}"
                f"{describe(call.module)} is a batch norm in training mode, whose statistics "
                "couple the samples; call eval() on it, or backward without create_graph"
            )
        if sub.training and isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0:
            raise NotImplementedError(
                f"differentiable per-sample gradients (create_graph=True): {where}"
                f"{describe(call.module)} is an active dropout layer whose mask cannot be "
                "replayed; call eval() on it, or backward without create_graph"
            )


def graph_batch_grad(call: ModuleCall, rules: Any, name: str, grad_output: Tensor) -> Tensor:
    """``[N, *p.shape]``: the per-sample gradients of parameter ``name`` of ``call.module``,
    differentiable w.r.t. ``grad_output`` ``[N, *out]``, the call's inputs and parameters.

    ``rules``: the call's first-order rules; a module on the generic path (or a region)
    replays its own function, any other module is called as it is.
    """
    if _KEY not in call.cache:
        replay = rules if isinstance(rules, GenericRules) else _REPLAY
        f = CallFunction(call, replay)
        f.inputs = (*call.inputs, *call.kwargs.values())  # live: the graph to the inputs
        f.params = dict(replay.trainable_params(call.module))  # live: to the parameters

        def one(*args: Any) -> dict[str, Tensor]:
            *values, g = args
            _, pull = vjp(lambda p: f.per_sample(p, *values), f.params)
            return pull(g)[0]

        call.cache[_KEY] = vmap(one, in_dims=(*f.in_dims(), 0))(*f.inputs, grad_output)
    return call.cache[_KEY][name]
