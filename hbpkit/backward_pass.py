"""One backward pass with active extensions: check the graph, compute, commit.

The first tensor hook that fires (the loss's, for curvature) walks the chain of
recorded module calls back to the input and checks, before computing
anything, that every module is supported by every active extension. Each hook
then computes its module's parameter quantities and backpropagates the
messages (sqrt factors or batch-averaged matrices) to the module's input.
Results are staged and written to the parameters only when the last module of
the chain is done, so an error leaves no half-written attributes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hbpkit.calls import ModuleCall
from hbpkit.dispatch import SECOND_ORDER
from hbpkit.extensions.base import Extension
from hbpkit.modules.base import LossRules


class BackwardState:
    """The per-context state: at most one unfinished :class:`BackwardPass`."""

    def __init__(self, extensions: tuple[Extension, ...]) -> None:
        self.extensions = extensions
        self.pass_: BackwardPass | None = None

    def process(self, call: ModuleCall, grad_output: Tensor) -> None:
        if call.released:
            if self.pass_ is None and isinstance(SECOND_ORDER.lookup(call.module), LossRules):
                raise RuntimeError(
                    "this graph was already used by a backward pass; hbpkit computes its "
                    "quantities in the first backward pass after a forward pass"
                )
            return  # a later pass (e.g. double backward) re-traverses the graph
        try:
            if self.pass_ is None or not self.pass_.owns(call):
                if self.pass_ is not None:
                    raise NotImplementedError(
                        f"{type(call.module).__name__} feeds the loss outside the chain of "
                        f"modules that ends in {type(self.pass_.chain[0].module).__name__}: "
                        "branching graphs and several losses or forward passes per backward "
                        "are not supported yet"
                    )
                self.pass_ = BackwardPass(self.extensions, call)
            with torch.no_grad():
                self.pass_.process(call, grad_output.detach())
            if self.pass_.finished:
                self.pass_.commit()
                self.pass_ = None
        except BaseException:
            self.pass_ = None
            raise


def _trainable(module: nn.Module, names: list[str]) -> list[tuple[str, nn.Parameter]]:
    params = [(name, getattr(module, name, None)) for name in names]
    return [(name, p) for name, p in params if p is not None and p.requires_grad]


def _own_trainable(module: nn.Module) -> bool:
    return any(p is not None and p.requires_grad for p in module._parameters.values())


class BackwardPass:
    """The chain of calls from ``root`` back to the input, processed hook by hook."""

    def __init__(self, extensions: tuple[Extension, ...], root: ModuleCall) -> None:
        self.extensions = extensions
        self.second_order = [e for e in extensions if e.needs_backprop]
        chain = [root]
        while chain[-1].parent is not None:
            chain.append(chain[-1].parent)
        self.chain = chain
        self._index = {id(c): i for i, c in enumerate(chain)}
        self._position = 0
        self._check()
        # does any call upstream of call i have trainable parameters?
        upstream, seen = [], False
        for call in reversed(chain):
            upstream.append(seen)
            seen = seen or _own_trainable(call.module)
        self._upstream = upstream[::-1]
        self.messages: dict[Any, Any] = {}
        self.staged: list[tuple[nn.Parameter, str, Any]] = []

    def owns(self, call: ModuleCall) -> bool:
        return id(call) in self._index

    @property
    def finished(self) -> bool:
        return self._position == len(self.chain)

    # the check before anything is computed ---------------------------------------------
    def _check(self) -> None:
        root = self.chain[0]
        if self.second_order and not isinstance(SECOND_ORDER.lookup(root.module), LossRules):
            raise RuntimeError(
                f"backward() started at the output of {type(root.module).__name__}, not at an "
                f"extended loss module; {self.second_order[0]!r} backpropagates curvature from "
                "the loss: extend() the loss module (e.g. extend(nn.CrossEntropyLoss())) and "
                "call backward() on its output"
            )
        modules = [id(c.module) for c in self.chain]
        for i, call in enumerate(self.chain):
            module = call.module
            name = type(module).__name__
            if modules.count(id(module)) > 1:
                raise NotImplementedError(
                    f"{name} is called more than once in one forward pass; shared modules "
                    "are not supported yet"
                )
            if i > 0 and call.consumers > 1:
                raise NotImplementedError(
                    f"the output of {name} feeds {call.consumers} modules; branching graphs "
                    "are not supported yet"
                )
            if i > 0 and isinstance(SECOND_ORDER.lookup(module), LossRules):
                raise NotImplementedError(f"{name} is used inside the network, not as its loss")
            validated = set()
            for ext in self.extensions:
                rules = ext.table.lookup(module)
                if rules is None:
                    if ext.needs_backprop or _own_trainable(module):
                        raise NotImplementedError(
                            f"{name} is not supported by {ext!r}; register rules for it with "
                            "hbpkit.register(...)"
                        )
                    continue
                if id(rules) not in validated:
                    rules.validate(call)
                    validated.add(id(rules))
        if self.second_order:
            self._check_chain_start(self.chain[-1])

    def _check_chain_start(self, call: ModuleCall) -> None:
        """The chain may only start at data: nothing trainable may hide behind its input."""
        origin = call.input_origin
        if origin is None or not _reaches_parameter(origin):
            return
        raise NotImplementedError(
            f"the input of {type(call.module).__name__} comes from {type(origin).__name__}, an "
            "operation outside extended modules that depends on parameters; hbpkit cannot "
            "backpropagate curvature through it. Write it as a module (e.g. nn.Flatten "
            "instead of .view, nn.Sigmoid instead of torch.sigmoid) and extend() the model"
        )

    # processing ---------------------------------------------------------------------------
    def process(self, call: ModuleCall, grad_output: Tensor) -> None:
        i = self._index[id(call)]
        if i != self._position:
            raise RuntimeError(
                "hbpkit expected the gradient of "
                f"{type(self.chain[self._position].module).__name__} "
                f"but got {type(call.module).__name__}'s; the graph is not a chain"
            )
        self._position += 1
        module = call.module
        second_rules = SECOND_ORDER.lookup(module)
        if isinstance(second_rules, LossRules):
            if self.second_order:
                self._start(second_rules, call, grad_output)
            return
        for ext in self.extensions:
            rules = ext.table.lookup(module)
            if rules is None:
                continue
            message = self.messages.get(ext.message)
            for name, param in _trainable(module, rules.param_names(module)):
                value = ext.param_quantity(rules, call, name, param, grad_output, message)
                self.staged.append((param, ext.savefield, value))
        if self.second_order and self._upstream[i]:
            self.messages = {
                key: key.propagate(second_rules, call, grad_output, value)
                for key, value in self.messages.items()
            }
        else:
            self.messages = {}

    def _start(self, rules: LossRules, call: ModuleCall, grad_output: Tensor) -> None:
        if grad_output.numel() != 1:
            raise NotImplementedError(
                f"{type(call.module).__name__} must return a scalar loss, got shape "
                f"{tuple(grad_output.shape)}"
            )
        if float(grad_output) != 1.0:
            raise ValueError(
                f"the loss received the gradient {float(grad_output)} instead of 1: hbpkit "
                f"computes the curvature of {type(call.module).__name__}'s output itself; call "
                "backward() on the loss (or a sum that contains it once)"
            )
        keys = dict.fromkeys(e.message for e in self.second_order)
        self.messages = {key: key.initial(rules, call) for key in keys}

    def commit(self) -> None:
        for param, field, value in self.staged:
            setattr(param, field, value)
        self.staged = []


def _reaches_parameter(node: Any) -> bool:
    """Whether autograd node ``node`` leads to a trainable ``nn.Parameter``."""
    stack, seen = [node], set()
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        variable = getattr(fn, "variable", None)
        if isinstance(variable, nn.Parameter):
            return True
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return False
