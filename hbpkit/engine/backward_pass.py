"""One backward pass with active extensions: plan, compute hook by hook, commit.

The first tensor hook that fires plans the pass (:class:`~hbpkit.engine.plan.PassPlan`:
every check, each call's rules and representations). Each hook then computes its
module's parameter quantities from the messages its consumers sent (merged where its
output feeds several) and sends the backpropagated messages (sqrt factors,
batch-averaged matrices, output-curvature operators) to the producers of its
inputs. Results are staged and written to the parameters only when the last
call is done, so an error leaves no half-written attributes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hbpkit.core.calls import ModuleCall, describe
from hbpkit.core.graph import PerInput, followed_inputs
from hbpkit.curvature import recycling, workspace
from hbpkit.curvature.factors import DiagonalFactor, SqrtFactor
from hbpkit.curvature.memory import DEFAULT_POLICY, MemoryPolicy
from hbpkit.engine.plan import PassPlan
from hbpkit.engine.recorded_ops import bridge_recorded
from hbpkit.engine.views import bridge_view, is_virtual
from hbpkit.extensions.base import Extension
from hbpkit.extensions.coupled import GRADIENT_COLUMNS, LAZY, keep_coupled, resolve
from hbpkit.modules.base import LossRules


class BackwardState:
    """The per-context state: at most one unfinished :class:`BackwardPass`."""

    def __init__(
        self,
        extensions: tuple[Extension, ...],
        memory: MemoryPolicy = DEFAULT_POLICY,
        selection: frozenset[int] | None = None,
    ) -> None:
        self.extensions = extensions
        self.memory = memory
        self.selection = selection  # backprop(..., modules=...): ids of the modules
        self.pass_: BackwardPass | None = None

    def process(self, call: ModuleCall, grad_output: Tensor) -> None:
        if call.released:
            if self.pass_ is None and isinstance(call.rules, LossRules):
                raise RuntimeError(
                    "this graph was already used by a backward pass; hbpkit computes its "
                    "quantities in the first backward pass after a forward pass"
                )
            return  # a later pass (e.g. double backward) re-traverses the graph
        try:
            if isinstance(call.rules, LossRules) and not call.released:
                bridge_view(call)  # logits.view(-1, V) between the model and the loss
                bridge_recorded(call)  # functional code between modules
            if self.pass_ is not None and not self.pass_.owns(call):
                if not isinstance(call.rules, LossRules):
                    raise NotImplementedError(
                        f"{describe(call.module)} is not reached from the loss where this "
                        "backward pass started, nor from another extended loss; several "
                        "forward passes per backward are not supported"
                    )
                self.pass_.add_root(call)  # another loss of a sum (multi-task, auxiliary)
            if self.pass_ is None:  # the plan raises before anything is computed
                plan = PassPlan(self.extensions, call, self.memory, selection=self.selection)
                # a backward pass that creates a graph runs its hooks with grad mode on
                self.pass_ = BackwardPass(plan, create_graph=torch.is_grad_enabled())
            pass_ = self.pass_
            with (
                torch.no_grad(),
                workspace.active(pass_.workspace),
                recycling.active(pass_.results),
            ):
                graph_grad = grad_output if self.pass_.create_graph else None
                self.pass_.process(call, grad_output.detach(), graph_grad)
            if self.pass_.finished:
                self.pass_.commit()
                self.pass_ = None
        except BaseException:
            if self.pass_ is not None:
                self.pass_.workspace.finish()
                self.pass_.results.finish()
            self.pass_ = None
            raise


class BackwardPass:
    """All extended calls one backward pass reaches from ``root``, processed hook by hook.

    Curvature extensions need the calls that feed the loss to be connected through
    extended modules (a chain, or a DAG of residual blocks and :class:`hbpkit.branching.Sum`):
    messages flow along the links, and where a tensor feeds several consumers the
    messages they send are merged before its producer uses them. First-order
    extensions process every call on its own.
    """

    def __init__(self, plan: PassPlan, create_graph: bool = False) -> None:
        self.create_graph = create_graph
        if create_graph:
            self._check_graph(plan.calls, plan)
        self.plan = plan
        self.extensions = plan.extensions
        self.second_order = plan.second_order
        self.root = plan.root
        self.graph = graph = plan.graph
        keys = dict.fromkeys(e.message for e in self.second_order)
        if plan.forward_form:  # the diagonals' forward form (extensions/forward_diagonal.py)
            keys.update(dict.fromkeys(e.forward_message for e in plan.forward_extensions))
        if plan.coupled_first_order:  # gradient columns through batch statistics
            keys[GRADIENT_COLUMNS] = None
        # the DAG forms also where a tied parameter's uses meet (their cross terms)
        chain = graph.is_chain and not plan.tied
        self._handlers = {
            k: k if chain and not getattr(k, "dag_always", False) else k.for_dag() for k in keys
        }
        # messages not yet delivered to each call's output, from how many consumer links
        self._waiting = {
            id(c): n
            for c in (graph.order if self._handlers else ())
            if (n := graph.consumers[id(c)]) and plan.receives(c)
        }
        self._inbox: dict[int, list[dict[Any, Any]]] = {}
        self._pending = {id(c) for c in plan.calls}
        # the previous pass's results, memory for this pass's (curvature/recycling.py)
        self.results = recycling.ResultPool()
        self._drop_previous_results()
        self.staged: list[tuple[nn.Parameter, str, Any]] = []
        self.tied: dict[tuple[int, str], tuple[nn.Parameter, Extension, list]] = {}
        # buffers reused between calls and passes (ownership rule: curvature/workspace.py)
        self.workspace = workspace.workspace_for(self.root.module, plan.memory.workspace_bytes)

    def add_root(self, loss: ModuleCall) -> None:
        """Take one more loss of a sum into the running pass: plan again over all losses.

        Autograd fires a module's hook only when the gradient of its output is complete,
        which needs every loss it feeds: the calls processed so far belong to the earlier
        losses alone, and keep their results.
        """
        processed = {id(c) for c in self.plan.calls} - self._pending
        plan = PassPlan(
            self.extensions,
            [*self.plan.roots, loss],
            self.plan.memory,
            earlier=self.plan.calls,
            selection=self.plan.selection,
        )
        graph = plan.graph
        for c in plan.calls:  # cannot happen in autograd's order; never silently wrong
            if id(c) in processed and graph.consumers.get(id(c)) != self.graph.consumers.get(id(c)):
                raise RuntimeError(
                    f"{describe(c.module)} was processed before {describe(loss.module)}, "
                    "which it feeds, reached this backward pass"
                )
        new = [c for c in plan.calls if id(c) not in processed and not self.owns(c)]
        if self.create_graph:
            self._check_graph(new, plan)
        self.plan, self.graph = plan, graph
        self._drop_previous_results(new)
        self._pending = {id(c) for c in plan.calls} - processed
        self._waiting = {
            id(c): n - len(self._inbox.get(id(c), ()))
            for c in (graph.order if self._handlers else ())
            if id(c) not in processed and (n := graph.consumers[id(c)]) and plan.receives(c)
        }

    def _drop_previous_results(self, calls: list[ModuleCall] | None = None) -> None:
        """Delete what an earlier backward pass attached, so its memory is free for this one
        (offered to :attr:`results` for this pass's results of the same size)."""
        for call in self.plan.calls if calls is None else calls:
            for ext, rules in self.plan.rules(call):
                if rules is None or isinstance(rules, LossRules):
                    continue
                for _, param in self.plan.trainable(call, rules.param_names(call.module)):
                    if hasattr(param, ext.savefield):
                        self.results.offer(getattr(param, ext.savefield))
                        delattr(param, ext.savefield)

    @staticmethod
    def _check_graph(calls: list[ModuleCall], plan: PassPlan) -> None:
        """With create_graph: refuse, before anything is computed, the calls whose
        differentiable quantities (first-order extensions) cannot keep their graph."""
        for call in calls:
            for ext, rules in plan.rules(call):
                if rules is None or isinstance(rules, LossRules):
                    continue
                if getattr(ext, "differentiable", False) and plan.trainable(
                    call, rules.param_names(call.module)
                ):
                    ext.check_graph(call)

    def owns(self, call: ModuleCall) -> bool:
        return id(call) in self._pending

    @property
    def finished(self) -> bool:
        return not self._pending

    # processing ---------------------------------------------------------------------------
    def process(
        self, call: ModuleCall, grad_output: Tensor, graph_grad: Tensor | None = None
    ) -> None:
        """Compute ``call``'s quantities and send its messages; ``grad_output`` detached,
        ``graph_grad`` the same gradient with its graph where the pass creates one (the
        differentiable extensions' quantities keep it)."""
        self._pending.discard(id(call))
        if self._waiting.get(id(call), 0) > 0:
            raise RuntimeError(
                f"hbpkit received the gradient of {type(call.module).__name__}'s output before "
                "the curvature from all of its consumers; the graph changed during backward"
            )
        second_rules = call.rules
        if isinstance(second_rules, LossRules):
            if self._handlers:
                self._start(second_rules, call, grad_output)
            self._process_virtual_parents(call, grad_output)
            return
        messages = self._collect(call)
        columns = None  # the gradient columns through batch statistics (extensions/coupled.py)
        if GRADIENT_COLUMNS in self._handlers:
            if call in self.plan.roots and not messages:  # the pass starts at a module
                messages = {GRADIENT_COLUMNS: LAZY}
            columns = resolve(messages.get(GRADIENT_COLUMNS), grad_output)
        self._param_quantities(call, messages, columns, grad_output, graph_grad)
        for key in getattr(second_rules, "param_only_cache", ()):
            call.cache.pop(key, None)
        if messages and self.plan.needs_messages(call):
            # the factors this call alone holds may take their J^T in place (ownership
            # rule: curvature/workspace.py)
            owned = () if self.create_graph else workspace.exclusive_factors(messages)
            with workspace.owning(owned):
                sent = {
                    key: self._handlers[key].propagate(second_rules, call, grad_output, value)
                    for key, value in messages.items()
                }
            del owned
            if self.plan.coupling:  # coupled factors stay coupled through every rule
                sent = {k: keep_coupled(messages[k], v, call) for k, v in sent.items()}
            self._send(call, sent)
        self._offer(messages)
        self._process_virtual_parents(call, grad_output)

    def _param_quantities(
        self,
        call: ModuleCall,
        messages: dict[Any, Any],
        columns: Tensor | None,
        grad_output: Tensor,
        graph_grad: Tensor | None,
    ) -> None:
        """Stage ``call``'s parameter quantities of every extension (a method of its own:
        none of its names holds a message afterwards, so the factors the call alone holds
        stay recognisable, ``workspace.exclusive_factors``)."""
        module = call.module
        for ext, rules in self.plan.rules(call):
            if rules is None:
                continue
            params = self.plan.trainable(call, rules.param_names(module))
            if not params:  # (outside a selection of modules: carries messages only)
                continue
            message, offered = None, {}
            if ext.message is not None:
                message = ext.message
                message = self._handlers[message].for_params(messages[message], call)
            key = getattr(ext, "forward_message", None)
            if id(call) in self.plan.forward_form and key in self._handlers and key in messages:
                offered["curvature"] = self._handlers[key].for_params(messages[key], call)
            graph = graph_grad is not None and getattr(ext, "differentiable", False)
            for name, param in params:
                coupled = columns is not None and ext.message is None
                if coupled:  # grad_batch[n] = sum_m J_{p,m}^T G[n, m], every statistic from it
                    key = ("batch_grad", name)
                    if key not in call.cache:
                        call.cache[key] = rules.param_jac_t_mat_prod_sum(call, name, columns)
                tied = id(param) in self.plan.tied  # combined over its uses at commit
                if graph:  # create_graph: the quantity keeps its graph
                    with torch.enable_grad():
                        if tied:
                            part = ext.graph_tied_contribution(rules, call, name, graph_grad)
                        else:
                            value = ext.graph_quantity(rules, call, name, graph_grad)
                elif tied:
                    raw = messages.get(ext.message) if ext.message is not None else None
                    part = ext.tied_contribution(rules, call, name, grad_output, raw)
                elif coupled:
                    value = ext.from_batch_grad(call.cache[("batch_grad", name)])
                else:
                    value = ext.param_quantity(
                        rules, call, name, param, grad_output, message, **offered
                    )
                if tied:
                    self.tied.setdefault((id(param), ext.savefield), (param, ext, []))[2].append(
                        part
                    )
                else:
                    self.staged.append((param, ext.savefield, value))

    def _offer(self, messages: dict[Any, Any]) -> None:
        """Offer the consumed sqrt factors to the workspace: reused once nothing else holds
        them (a factor sent on unchanged, or to a second parent, is still held)."""
        for value in messages.values():
            if isinstance(value, dict):
                for f in value.values():
                    if isinstance(f, SqrtFactor):
                        self.workspace.offer(f.S)
                    elif isinstance(f, DiagonalFactor):
                        self.workspace.offer(f.s)

    def _process_virtual_parents(self, call: ModuleCall, grad_output: Tensor) -> None:
        """Process the virtual calls that feed ``call`` (a view before the loss,
        ``engine/views.py``; functional code between modules, ``engine/recorded_ops.py``):
        they have no hook, and ``call`` is their only consumer. Their ``grad_output`` is
        zeros: they carry no parameters, and no residual of eq. 7 is formed for them."""
        for parent in dict.fromkeys(p for p in call.parents if p is not None):
            if is_virtual(parent) and self.owns(parent):
                try:
                    self.process(parent, grad_output.new_zeros(parent.output_shape))
                finally:
                    parent.release()

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
        """Deliver the messages at ``call``'s inputs to the calls that produced them (each
        its own where they differ per input, :class:`PerInput`)."""
        links = 0
        split = any(isinstance(v, PerInput) for v in messages.values())
        for slot in followed_inputs(call):
            parent = call.parents[slot]
            if parent is None or not self.plan.receives(parent):
                continue
            delivered = dict(messages)  # one dict per link: a factor sent twice is shared
            if split:
                delivered = {
                    k: v.at(slot) if isinstance(v, PerInput) else v for k, v in messages.items()
                }
            self._inbox.setdefault(id(parent), []).append(delivered)
            self._waiting[id(parent)] -= 1
            links += 1
        for key, value in messages.items():
            delivered = getattr(self._handlers[key], "delivered", None)
            if delivered is not None:  # batch-averaged matrices in a branching graph
                delivered(value, links)

    def _start(self, rules: LossRules, call: ModuleCall, grad_output: Tensor) -> None:
        """Send the loss's curvature, of ``w * loss`` where the loss received the gradient
        ``w`` (``backward()`` on ``loss``: 1; on ``l1 + 0.5 * l2``: 1 and 0.5)."""
        if grad_output.numel() != 1:
            raise NotImplementedError(
                f"{type(call.module).__name__} must return a scalar loss, got shape "
                f"{tuple(grad_output.shape)}"
            )
        weight = float(grad_output)
        self._send(call, {key: h.initial(rules, call, weight) for key, h in self._handlers.items()})

    def commit(self) -> None:
        self.workspace.finish()
        self.results.finish()
        for (_, field), (param, ext, parts) in self.tied.items():
            with torch.set_grad_enabled(self.create_graph):
                self.staged.append((param, field, ext.combine_tied(parts)))
        for param, field, value in self.staged:
            setattr(param, field, value)
        self.staged = []
