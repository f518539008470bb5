"""One backward pass with active extensions: check the graph, compute, commit.

The first tensor hook that fires (the loss's, for curvature) walks the autograd
graph back to the input, collects the recorded module calls and trainable
parameters it reaches, and checks, before computing anything, that every
module is supported by every active extension, that no trainable parameter
hides outside extended modules and, for curvature, that the calls form a
chain. Each hook
then computes its module's parameter quantities and backpropagates the
messages (sqrt factors or batch-averaged matrices) to the module's input.
Results are staged and written to the parameters only when the last module of
the chain is done, so an error leaves no half-written attributes.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import Tensor, nn

from hbpkit.calls import NODE_KEY, ModuleCall
from hbpkit.dispatch import SECOND_ORDER
from hbpkit.extensions.base import Extension
from hbpkit.extensions.messages import AverageMessage, SqrtMessage
from hbpkit.modules.base import LossRules
from hbpkit.modules.budget import DIAGONAL_ADVICE, check_dense_budget
from hbpkit.modules.local_factor import accepts_local, parent_accepts_local


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
                        f"{type(call.module).__name__} is not reached from "
                        f"{type(self.pass_.chain[0].module).__name__}, where this backward "
                        "pass started: several losses or forward passes per backward are not "
                        "supported yet"
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
    return any(p.requires_grad for p in module.parameters())


class BackwardPass:
    """All extended calls one backward pass reaches from ``root``, processed hook by hook.

    Curvature extensions need the calls to form a chain ``root <- parent <- ...``
    (messages flow along it); first-order extensions process every call on its own.
    """

    def __init__(self, extensions: tuple[Extension, ...], root: ModuleCall) -> None:
        self.extensions = extensions
        self.second_order = [e for e in extensions if e.needs_backprop]
        chain = [root]
        while chain[-1].parent is not None:
            chain.append(chain[-1].parent)
        self.chain = chain
        self._chain_index = {id(c): i for i, c in enumerate(chain)}
        self._position = 0
        # does any call upstream of chain[i] have trainable parameters (needs messages)?
        upstream, seen = [], False
        for call in reversed(chain):
            upstream.append(seen)
            seen = seen or _own_trainable(call.module)
        self._upstream = upstream[::-1]
        calls, params = reachable(root)
        self._check(calls, params)
        self._pending = {id(c) for c in calls}
        self._drop_previous_results(calls)
        self.messages: dict[Any, Any] = {}
        self.staged: list[tuple[nn.Parameter, str, Any]] = []

    def _drop_previous_results(self, calls: list[ModuleCall]) -> None:
        """Delete what an earlier backward pass attached, so its memory is free for this one."""
        for call in calls:
            for ext in self.extensions:
                rules = ext.table.lookup(call.module)
                if rules is None or isinstance(rules, LossRules):
                    continue
                for _, param in _trainable(call.module, rules.param_names(call.module)):
                    if hasattr(param, ext.savefield):
                        delattr(param, ext.savefield)

    def owns(self, call: ModuleCall) -> bool:
        return id(call) in self._pending

    @property
    def finished(self) -> bool:
        return not self._pending

    # the check before anything is computed ---------------------------------------------
    def _check(self, calls: list[ModuleCall], params: list[nn.Parameter]) -> None:
        root = self.chain[0]
        if self.second_order and not isinstance(SECOND_ORDER.lookup(root.module), LossRules):
            raise RuntimeError(
                f"backward() started at the output of {type(root.module).__name__}, not at an "
                f"extended loss module; {self.second_order[0]!r} backpropagates curvature from "
                "the loss: extend() the loss module (e.g. extend(nn.CrossEntropyLoss())) and "
                "call backward() on its output"
            )
        modules = [id(c.module) for c in calls]
        owned: set[int] = set()
        for call in calls:
            self._check_call(call, modules.count(id(call.module)))
            owned.update(id(p) for p in call.module.parameters())
        stray = [p for p in params if id(p) not in owned]
        in_chain = set(self._chain_index)
        outside = [c for c in calls if id(c) not in in_chain] if self.second_order else []
        if stray or outside:
            self._refuse_outside(stray, outside)
        if self.second_order:
            self._check_budgets()
            consumers = Counter(id(c.parent) for c in calls if c.parent is not None)
            for call in self.chain[1:]:
                if consumers[id(call)] > 1:
                    raise NotImplementedError(
                        f"the output of {type(call.module).__name__} feeds "
                        f"{consumers[id(call)]} modules; branching graphs are not supported yet"
                    )

    def _check_budgets(self) -> None:
        """Let every module refuse up front what it would densify (see ``modules/budget.py``).

        A diagonal residual factor that enters a module taking local factors
        (``modules/local_factor.py``) is not densified there: its columns are counted
        and checked as a dense factor where the next module takes no local factors.
        """
        keys = [e.message for e in self.second_order]
        averaged = any(isinstance(k, AverageMessage) for k in keys)
        residuals = any(isinstance(k, SqrtMessage) and k.curvature != "ggn" for k in keys)
        diagonal = False  # do diagonal residual factors arrive at this call's output?
        local_columns = 0  # columns of local factors arriving at this call's output
        for i, call in enumerate(self.chain[1:], start=1):
            if not self._upstream[i]:
                break
            rules = SECOND_ORDER.lookup(call.module)
            local = accepts_local(rules, call) and parent_accepts_local(call)
            rules.check_budget(call, averaged, diagonal and not local)
            if diagonal and local and not rules.keeps_diagonal:
                local_columns += call.output_shape[1:].numel()
            if local_columns and not local and accepts_local(rules, call):
                x = call.inputs[0]
                check_dense_budget(
                    call,
                    (local_columns, *x.shape),
                    x.dtype,
                    "Densifying local curvature factors",
                    DIAGONAL_ADVICE,
                )
            if not local:
                local_columns = 0
            if residuals and not rules.linear_in_input:
                diagonal = True
            elif not rules.keeps_diagonal:
                diagonal = False

    def _check_call(self, call: ModuleCall, times_called: int) -> None:
        module = call.module
        name = type(module).__name__
        if times_called > 1:
            raise NotImplementedError(
                f"{name} is called {times_called} times in one forward pass; shared modules "
                "are not supported yet"
            )
        if call is not self.chain[0] and isinstance(SECOND_ORDER.lookup(module), LossRules):
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

    def _refuse_outside(self, stray: list[nn.Parameter], outside: list[ModuleCall]) -> None:
        """Parameters or modules the loss reaches outside the chain of extended modules."""
        origin = self.chain[-1].input_origin
        if self.second_order and origin is not None:
            raise NotImplementedError(
                f"the input of {type(self.chain[-1].module).__name__} comes from "
                f"{type(origin).__name__}, an operation outside extended modules that depends on "
                "parameters; hbpkit cannot backpropagate curvature through it. Write it as a "
                "module (e.g. nn.Flatten instead of .view, nn.Sigmoid instead of torch.sigmoid) "
                "and extend() the model"
            )
        if outside:
            raise NotImplementedError(
                f"{type(outside[0].module).__name__} is reached from the loss outside the chain "
                "of extended modules (a branch, or an operation hbpkit does not see); curvature "
                "extensions need a chain of extended modules"
            )
        shapes = ", ".join(str(tuple(p.shape)) for p in stray[:3])
        raise NotImplementedError(
            f"the loss depends on {len(stray)} trainable parameter(s) of shape {shapes}"
            f"{', ...' if len(stray) > 3 else ''} that no extended module owns: extend() the "
            "whole model (or set requires_grad=False on parameters hbpkit should ignore)"
        )

    # processing ---------------------------------------------------------------------------
    def process(self, call: ModuleCall, grad_output: Tensor) -> None:
        self._pending.discard(id(call))
        i = self._chain_index.get(id(call))
        if self.second_order:
            if i != self._position:
                raise RuntimeError(
                    f"hbpkit expected the gradient of a different module than "
                    f"{type(call.module).__name__}'s; the graph is not a chain"
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


def reachable(root: ModuleCall) -> tuple[list[ModuleCall], list[nn.Parameter]]:
    """The extended calls and trainable parameters the backward pass from ``root`` reaches.

    Walks the autograd graph from ``root``'s inputs; a call is found through the
    metadata of its output's autograd node, a parameter through its
    ``AccumulateGrad`` node.
    """
    calls, params = [root], []
    stack, visited, seen = [], [], set()
    for t in root.inputs:
        if isinstance(t, Tensor) and t.requires_grad:
            if t.grad_fn is not None:
                stack.append(t.grad_fn)
            elif isinstance(t, nn.Parameter):
                params.append(t)
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        visited.append(node)  # keep the Python wrapper (and its id) alive during the walk
        call = node.metadata.get(NODE_KEY)
        if call is not None and not call.released:
            calls.append(call)
        variable = getattr(node, "variable", None)
        if isinstance(variable, nn.Parameter) and variable.requires_grad:
            params.append(variable)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return calls, params
