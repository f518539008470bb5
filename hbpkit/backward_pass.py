"""One backward pass with active extensions: check the graph, compute, commit.

The first tensor hook that fires (the loss's, for curvature) walks the autograd
graph back to the input, collects the recorded module calls and trainable
parameters it reaches, and checks, before computing anything, that every
module is supported by every active extension, that no trainable parameter
hides outside extended modules and, for curvature, that the calls are linked
through extended modules (a chain, or a DAG with residual blocks and sums,
:mod:`hbpkit.graph`). Each hook then computes its module's parameter
quantities from the messages its consumers sent (merged where its output
feeds several) and sends the backpropagated messages (sqrt factors,
batch-averaged matrices, output-curvature operators) to the producers of its
inputs. Results are staged and written to the parameters only when the last
call is done, so an error leaves no half-written attributes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hbpkit.calls import NODE_KEY, ModuleCall
from hbpkit.dispatch import SECOND_ORDER
from hbpkit.extensions.base import Extension
from hbpkit.extensions.messages import AverageMessage, SqrtMessage
from hbpkit.graph import CallGraph, followed_inputs
from hbpkit.modules.base import LossRules
from hbpkit.modules.budget import (
    DEFAULT_POLICY,
    DIAGONAL_ADVICE,
    RAISE_BUDGET,
    MemoryPolicy,
    check_dense_budget,
)
from hbpkit.modules.local_factor import accepts_local, parent_accepts_local


class BackwardState:
    """The per-context state: at most one unfinished :class:`BackwardPass`."""

    def __init__(
        self, extensions: tuple[Extension, ...], memory: MemoryPolicy = DEFAULT_POLICY
    ) -> None:
        self.extensions = extensions
        self.memory = memory
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
                        f"{type(self.pass_.root.module).__name__}, where this backward "
                        "pass started: several losses or forward passes per backward are not "
                        "supported yet"
                    )
                self.pass_ = BackwardPass(self.extensions, call, self.memory)
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

    Curvature extensions need the calls that feed the loss to be connected through
    extended modules (a chain, or a DAG of residual blocks and :class:`hbpkit.nn.Sum`):
    messages flow along the links, and where a tensor feeds several consumers the
    messages they send are merged before its producer uses them. First-order
    extensions process every call on its own.
    """

    def __init__(
        self,
        extensions: tuple[Extension, ...],
        root: ModuleCall,
        memory: MemoryPolicy = DEFAULT_POLICY,
    ) -> None:
        self.extensions = extensions
        self.memory = memory
        self.second_order = [e for e in extensions if e.needs_backprop]
        self.root = root
        self.graph = graph = CallGraph(root)
        # does any call upstream of a call have trainable parameters (needs messages)?
        self._needs: dict[int, bool] = {}
        for call in reversed(graph.order):
            self._needs[id(call)] = any(
                self._needs[id(p)] or _own_trainable(p.module) for p in graph.parents[id(call)]
            )
        calls, params = reachable(root)
        for call in (*calls, *graph.order):  # the rules read the policy from their call
            call.memory = memory
        self._check(calls, params)
        keys = dict.fromkeys(e.message for e in self.second_order)
        self._handlers = {k: k if graph.is_chain else k.for_dag() for k in keys}
        # messages not yet delivered to each call's output, from how many consumer links
        self._waiting = {
            id(c): n
            for c in (graph.order if self.second_order else ())
            if (n := graph.consumers[id(c)]) and self._receives(c)
        }
        self._inbox: dict[int, list[dict[Any, Any]]] = {}
        self._pending = {id(c) for c in calls}
        self._drop_previous_results(calls)
        self.staged: list[tuple[nn.Parameter, str, Any]] = []

    def _receives(self, call: ModuleCall) -> bool:
        """Whether ``call`` needs the curvature at its output (its own or upstream parameters)."""
        return self._needs[id(call)] or _own_trainable(call.module)

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
        root = self.root
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
        outside = [c for c in calls if c not in self.graph] if self.second_order else []
        if stray or outside:
            self._refuse_outside(stray, outside)
        if self.second_order:
            self._check_hidden_paths()
            self._check_budgets()

    def _check_hidden_paths(self) -> None:
        """Refuse inputs of graph calls computed by operations that depend on the network.

        Such an input (``h * 2`` or ``h + x`` written functionally) carries curvature
        that hbpkit cannot see, even when every module and parameter is in the graph.
        """
        for call in self.graph.order:
            if call is self.root:
                continue
            origins = call.origins
            slots = followed_inputs(call) if len(origins) > 1 else (0,)
            for i in slots:
                origin = origins[i]
                if origin is not None and _depends_on_network(origin):
                    self._refuse_hidden(call, origin)

    def _refuse_hidden(self, call: ModuleCall, origin: Any) -> None:
        name = type(origin).__name__
        hint = (
            "Write the addition as a module (hbpkit.nn.Sum, or hbpkit.nn.Residual / "
            "hbpkit.nn.Parallel), or convert the model with hbpkit.convert(model)"
            if name.startswith("Add")
            else "Write it as a module (e.g. nn.Flatten instead of .view, nn.Sigmoid instead "
            "of torch.sigmoid; hbpkit.convert(model) rewrites + and flatten) and extend() the model"
        )
        raise NotImplementedError(
            f"the input of {type(call.module).__name__} comes from {name}, an operation outside "
            "extended modules that depends on parameters; hbpkit cannot backpropagate "
            f"curvature through it. {hint}"
        )

    def _check_budgets(self) -> None:
        """Let every module refuse up front what it would densify (see ``modules/budget.py``).

        Batch-averaged messages switch to exact position blocks where the dense
        matrix exceeds the budget (``modules/position_blocks.py``); every module
        towards the input must then handle blocks exactly, and weights that receive
        them must take their Kronecker factors from blocks (``expand`` only).

        A diagonal residual factor that enters a module taking local factors
        (``modules/local_factor.py``) is not densified there: its columns are counted
        and checked as a dense factor where the next module takes no local factors.

        The checks read the pass's ``MemoryPolicy`` from the calls, as the rules do.
        """
        keys = [e.message for e in self.second_order]
        averaged = any(isinstance(k, AverageMessage) for k in keys)
        reduce = [
            e
            for e in self.second_order
            if isinstance(e.message, AverageMessage) and getattr(e, "kfac_approx", "") == "reduce"
        ]
        residuals = any(isinstance(k, SqrtMessage) and k.curvature != "ggn" for k in keys)
        # what arrives at a call's output: diagonal residual factors, position blocks,
        # and the columns of local factors
        diagonal_out: dict[int, bool] = {}
        blocks_out: dict[int, bool] = {}
        columns_out: dict[int, int] = {}
        for call in self.graph.order[1:]:
            rules = SECOND_ORDER.lookup(call.module)
            blocks = blocks_out.get(id(call), False)
            if blocks and _own_trainable(call.module) and (reduce or not rules.kron_from_blocks):
                raise NotImplementedError(
                    f"the batch-averaged curvature at the output of {call.module} is carried as "
                    "position blocks (its dense form exceeds the memory budget, "
                    "MemoryPolicy.max_dense_bytes), from which "
                    f"{reduce[0] if reduce else type(call.module).__name__} cannot form "
                    "Kronecker factors; use kfac_approx='expand', a per-sample extension "
                    f"(KFLR, KFAC), or raise the budget with {RAISE_BUDGET}"
                )
            if not self._needs[id(call)]:
                continue
            diagonal = diagonal_out.get(id(call), False)
            if averaged and self.graph.is_chain:  # blocks on chains only
                if blocks:
                    rules.check_blocks(call, from_blocks=True)
                elif rules.ea_needs_blocks(call):
                    blocks = True
            local = accepts_local(rules, call) and parent_accepts_local(call)
            rules.check_budget(call, averaged and not blocks, diagonal and not local)
            local_columns = columns_out.get(id(call), 0)
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
            for parent in self.graph.parents[id(call)]:
                diagonal_out[id(parent)] = diagonal_out.get(id(parent), False) or diagonal
                blocks_out[id(parent)] = blocks
                columns_out[id(parent)] = columns_out.get(id(parent), 0) + local_columns

    def _check_call(self, call: ModuleCall, times_called: int) -> None:
        module = call.module
        name = type(module).__name__
        if times_called > 1:
            raise NotImplementedError(
                f"{name} is called {times_called} times in one forward pass; shared modules "
                "are not supported yet"
            )
        if call is not self.root and isinstance(SECOND_ORDER.lookup(module), LossRules):
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
        """Parameters or modules the loss reaches outside the graph of extended modules."""
        if self.second_order:
            for call in self.graph.order:
                for origin in call.origins[:1] if call is self.root else call.origins:
                    if origin is not None:
                        self._refuse_hidden(call, origin)
        if outside:
            raise NotImplementedError(
                f"{type(outside[0].module).__name__} is reached from the loss outside the graph "
                "of extended modules (through an operation hbpkit does not see); curvature "
                "extensions need extended modules linked tensor to tensor"
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
        if self._waiting.get(id(call), 0) > 0:
            raise RuntimeError(
                f"hbpkit received the gradient of {type(call.module).__name__}'s output before "
                "the curvature from all of its consumers; the graph changed during backward"
            )
        module = call.module
        second_rules = SECOND_ORDER.lookup(module)
        if isinstance(second_rules, LossRules):
            if self.second_order:
                self._start(second_rules, call, grad_output)
            return
        messages = self._collect(call)
        for ext in self.extensions:
            rules = ext.table.lookup(module)
            if rules is None:
                continue
            message = None
            if ext.message is not None:
                message = ext.message
                message = self._handlers[message].for_params(messages[message], call)
            for name, param in _trainable(module, rules.param_names(module)):
                value = ext.param_quantity(rules, call, name, param, grad_output, message)
                self.staged.append((param, ext.savefield, value))
        for key in getattr(second_rules, "param_only_cache", ()):
            call.cache.pop(key, None)
        if messages and self._needs[id(call)]:
            self._send(
                call,
                {
                    key: self._handlers[key].propagate(second_rules, call, grad_output, value)
                    for key, value in messages.items()
                },
            )

    def _collect(self, call: ModuleCall) -> dict[Any, Any]:
        """The messages at ``call``'s output, merged over its consumers."""
        received = self._inbox.pop(id(call), None)
        if not received:
            return {}
        if len(received) == 1:
            return received[0]
        return {
            key: self._handlers[key].merge([m[key] for m in received], call) for key in received[0]
        }

    def _send(self, call: ModuleCall, messages: dict[Any, Any]) -> None:
        """Deliver the messages at ``call``'s inputs to the calls that produced them."""
        links = 0
        for parent in self.graph.parents[id(call)]:
            if self._receives(parent):
                self._inbox.setdefault(id(parent), []).append(messages)
                self._waiting[id(parent)] -= 1
                links += 1
        for key, value in messages.items():
            delivered = getattr(self._handlers[key], "delivered", None)
            if delivered is not None:  # batch-averaged matrices in a branching graph
                delivered(value, links)

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
        self._send(call, {key: h.initial(rules, call) for key, h in self._handlers.items()})

    def commit(self) -> None:
        for param, field, value in self.staged:
            setattr(param, field, value)
        self.staged = []


def _depends_on_network(node: Any) -> bool:
    """Whether the autograd graph below ``node`` reaches an extended call or a trainable leaf."""
    stack, seen, visited = [node], set(), []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        visited.append(node)  # keep the wrappers (and their ids) alive during the walk
        if node.metadata.get(NODE_KEY) is not None:
            return True
        variable = getattr(node, "variable", None)
        if isinstance(variable, nn.Parameter) and variable.requires_grad:
            return True
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return False


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
