"""The plan of one backward pass: checked and decided before anything is computed.

The first tensor hook that fires (the loss's, for curvature) walks the autograd
graph back to the input and collects the recorded module calls and trainable
parameters it reaches. :class:`PassPlan` then, once for the whole pass:

* resolves each call's rules for every active extension;
* checks that every module is supported by every active extension, that no
  trainable parameter hides outside extended modules and, for curvature, that the
  calls are linked through extended modules (a chain, or a DAG with residual blocks
  and sums, :mod:`hbpkit.core.graph`);
* decides how curvature leaves each call towards its input (:class:`CallPlan`: dense
  or position blocks for batch averages, dense or local sqrt factors) and checks
  every dense tensor a rule will form against the memory budget.

With a selection of modules (``backprop(..., modules=[model.head])``) only the
selected modules' parameters count as trainable for the extensions: curvature flows
from the loss down to the lowest selected call and no further, the calls below are
neither checked nor computed (they need no rules, nor to be extended), and every other
parameter gets its ``.grad`` from autograd alone.

The pass (:mod:`hbpkit.engine.backward_pass`) and the rules read these decisions
from ``call.plan``; an error here leaves nothing half-written.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from hbpkit.core.calls import NODE_KEY, CallPlan, ModuleCall, describe
from hbpkit.core.graph import CallGraph, followed_inputs, per_input
from hbpkit.curvature.local import accepts_local, parent_accepts_local
from hbpkit.curvature.memory import (
    DEFAULT_POLICY,
    DIAGONAL_ADVICE,
    RAISE_BUDGET,
    MemoryPolicy,
    check_dense_budget,
)
from hbpkit.engine.coupling import below, check_coupling, couples, refuse_unlinked_coupling
from hbpkit.extensions.base import Extension
from hbpkit.extensions.forward_diagonal import COLUMNS_PER_TANGENT
from hbpkit.modules.base import DEFAULTS_BUILT_ON, LossRules, UnsupportedRules, rules_implement
from hbpkit.modules.generic import GenericRules
from hbpkit.modules.generic.recorded import CONVERT_ADVICE, RecordedGraphRules


def trainable(module: nn.Module, names: list[str]) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of ``module``'s parameters ``names`` that require gradients."""
    params = [(name, _get(module, name)) for name in names]
    return [(name, p) for name, p in params if p is not None and p.requires_grad]


def _get(module: nn.Module, name: str) -> nn.Parameter | None:
    """``module``'s parameter ``name`` (dotted for a child's: ``cell.weight``), or ``None``."""
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part, None)
        if module is None:
            return None
    return getattr(module, leaf, None)


def _lookup(ext: Extension, module: nn.Module, selected: bool = True) -> Any:
    """``ext``'s rules for ``module``: registered ones, else the generic path where the
    extension needs rules for it (it backpropagates curvature, or the module has
    trainable parameters and is ``selected``)."""
    own = selected and _own_trainable(module)
    return ext.table.lookup(module, fallback=ext.needs_backprop or own)


def _own_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class PassPlan:
    """The calls one backward pass from ``root`` reaches, their rules and representations.

    Attributes:
        graph: the calls curvature flows through (:class:`~hbpkit.core.graph.CallGraph`).
        calls: every extended call the pass reaches (first-order extensions process
            calls outside the graph too).
        second_order: the active extensions that backpropagate curvature.
        selection: ids of the modules whose parameters the extensions compute for
            (``backprop(..., modules=...)``), or ``None``: every module.
    """

    def __init__(
        self,
        extensions: tuple[Extension, ...],
        roots: ModuleCall | list[ModuleCall],
        memory: MemoryPolicy = DEFAULT_POLICY,
        earlier: tuple[ModuleCall, ...] = (),
        selection: frozenset[int] | None = None,
    ) -> None:
        self.extensions = extensions
        self.memory = memory
        self.selection = selection
        self.second_order = [e for e in extensions if e.needs_backprop]
        self.roots = roots if isinstance(roots, list) else [roots]
        self.root = self.roots[0]
        self.graph = graph = CallGraph(self.roots)
        self.calls, params = reachable(self.roots)
        known = {id(c) for c in self.calls}  # a pass that takes one more loss: its calls so far;
        # virtual calls (a view between the model and the loss, engine/views.py)
        for c in (*earlier, *graph.order):
            if id(c) not in known:
                known.add(id(c))
                self.calls.append(c)
        for call in (*self.calls, *graph.order):  # the rules read the policy from their call
            call.memory = memory
        # does any call upstream of a call have trainable parameters (needs messages)?
        self._needs: dict[int, bool] = {}
        for call in reversed(graph.order):
            self._needs[id(call)] = any(
                self._needs[id(p)] or self.owns_trainable(p) for p in graph.parents[id(call)]
            )
        self._rules = {id(c): self._resolve(c) for c in self.calls}
        # train-mode BatchNorm with trainable parameters towards the input: coupled columns
        self.coupling = [
            c for c in graph.order if not c.released and self._needs[id(c)] and couples(c)
        ]
        self.below_coupling = below(graph, self.coupling)
        #: whether the first-order extensions need the coupled gradient columns
        self.coupled_first_order = bool(self.coupling) and len(self.second_order) < len(extensions)
        self._check(self.calls, params)

    def selected(self, call: ModuleCall) -> bool:
        """Whether the extensions compute ``call``'s parameter quantities (the selection)."""
        return self.selection is None or id(call.module) in self.selection

    def owns_trainable(self, call: ModuleCall) -> bool:
        """Whether ``call``'s module has trainable parameters the extensions compute for."""
        return self.selected(call) and _own_trainable(call.module)

    def trainable(self, call: ModuleCall, names: list[str]) -> list[tuple[str, nn.Parameter]]:
        """:func:`trainable` parameters ``names`` of ``call.module``, none outside the
        selection."""
        return trainable(call.module, names) if self.selected(call) else []

    def _resolve(self, call: ModuleCall) -> tuple[tuple[Extension, Any], ...]:
        """Every extension's rules for ``call``; outside the selection only the curvature
        rules of calls that carry messages towards selected calls, else ``None``."""
        if self.selected(call):
            return tuple((ext, _lookup(ext, call.module)) for ext in self.extensions)
        carries = self._needs.get(id(call), False)
        return tuple(
            (ext, _lookup(ext, call.module, False) if ext.needs_backprop and carries else None)
            for ext in self.extensions
        )

    def rules(self, call: ModuleCall) -> tuple[tuple[Extension, Any], ...]:
        """``(extension, rules or None)`` for every active extension, resolved once."""
        return self._rules[id(call)]

    def needs_messages(self, call: ModuleCall) -> bool:
        """Whether a call towards the input has trainable parameters (needs curvature)."""
        return self._needs[id(call)]

    def receives(self, call: ModuleCall) -> bool:
        """Whether ``call`` needs the curvature at its output (its own or upstream parameters)."""
        return self._needs[id(call)] or self.owns_trainable(call)

    # the checks --------------------------------------------------------------------------
    def _check(self, calls: list[ModuleCall], params: list[nn.Parameter]) -> None:
        for root in self.roots:
            if self.second_order and not isinstance(root.rules, LossRules):
                raise RuntimeError(
                    f"backward() started at the output of {type(root.module).__name__}, not at "
                    f"an extended loss module; {self.second_order[0]!r} backpropagates "
                    "curvature from the loss: extend() the loss module (e.g. "
                    "extend(nn.CrossEntropyLoss())) and call backward() on its output"
                )
        if len(self.roots) > 1:
            self._check_several_losses()
        if self.second_order:
            for root in self.roots:
                if not root.released:  # (a loss processed before another joined)
                    self._check_finite_loss_input(root)
        owned: set[int] = set()
        selected = [c for c in calls if self.selected(c)]
        if self.selection is not None and not [c for c in selected if c not in self.roots]:
            raise ValueError(
                "none of the modules given to backprop(..., modules=...) is reached by this "
                "backward pass: pass modules of the model whose loss is differentiated "
                "(extend() them)"
            )
        for call in calls:
            if self.selection is not None and all(r is None for _, r in self.rules(call)):
                continue  # below the selection (or nothing to carry): not used
            self._check_call(call)
            owned.update(id(p) for p in call.module.parameters())
        self._check_tied(calls)
        # with a selection, other parameters get their .grad only: none is stray
        stray = [p for p in params if id(p) not in owned] if self.selection is None else []
        linked = self.second_order or self.coupling  # messages need the calls linked
        outside = [c for c in selected if c not in self.graph] if linked else []
        if not linked:
            refuse_unlinked_coupling(calls, self.graph)
        if stray or outside:
            self._refuse_outside(stray, outside)
        if linked:
            self._check_hidden_paths()
        if self.coupling:
            check_coupling(self)
        if self.second_order:
            self._decide_representations()
        self._offer_forward_form()

    def _check_several_losses(self) -> None:
        """Several losses summed in one backward (multi-task heads, auxiliary losses): the
        curvature of a sum is the sum of the curvatures, so per-sample sqrt factors gain
        the columns of every loss; one batch-averaged matrix or one chain of product links
        cannot be extended after the pass started."""
        for ext in self.second_order:
            if not ext.message.several_losses:
                names = ", ".join(describe(r.module) for r in self.roots)
                raise NotImplementedError(
                    f"{ext!r} with several losses in one backward pass ({names}) is not "
                    "supported yet; per-sample extensions (DiagGGNExact, DiagHessian, KFAC, "
                    "KFLR, HBP with backprop='sqrt') and first-order extensions are, or call "
                    "backward() once per loss"
                )

    def _check_finite_loss_input(self, root: ModuleCall) -> None:
        """Curvature of a loss at non-finite inputs is undefined: refuse it up front (one
        reduction over the loss's input per pass)."""
        x = root.inputs[0]
        finite = torch.isfinite(x.detach())
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(
                f"the input of {describe(root.module)} (shape {tuple(x.shape)}) has {bad} "
                f"non-finite entries (nan or inf); {self.second_order[0]!r} needs the loss's "
                "curvature there, which is undefined: check the model's outputs (a diverging "
                "step, a log of 0) before the backward pass"
            )

    def _check_hidden_paths(self) -> None:
        """Refuse inputs of graph calls computed by operations that depend on the network.

        Such an input (``h * 2`` or ``h + x`` written functionally) carries curvature
        that hbpkit cannot see, even when every module and parameter is in the graph.
        """
        for call in self.graph.order:
            if call in self.roots:
                continue
            if self.selection is not None and not self._needs[id(call)]:
                continue  # no curvature goes below it: what computed its input is irrelevant
            origins = call.origins
            slots = followed_inputs(call) if len(origins) > 1 else (0,)
            for i in slots:
                origin = origins[i]
                if origin is not None and _depends_on_network(origin):
                    self._refuse_hidden(call, origin)

    def _refuse_hidden(self, call: ModuleCall, origin: Any) -> None:
        name = type(origin).__name__
        hint = (
            "Write the addition as a module (hbpkit.branching.Sum, or hbpkit.branching.Residual / "
            "hbpkit.branching.Parallel), or convert the model with hbpkit.convert(model)"
            if name.startswith("Add")
            else "Write it as a module (e.g. nn.Flatten instead of .view, nn.Sigmoid instead "
            "of torch.sigmoid; hbpkit.convert(model) rewrites + and flatten) and extend() the model"
        )
        raise NotImplementedError(
            f"the input of {describe(call.module)} comes from {name}, an operation outside "
            "extended modules that depends on parameters; hbpkit cannot backpropagate "
            f"curvature through it. {hint}"
        )

    def _decide_representations(self) -> None:
        """Decide how curvature leaves each call (:class:`CallPlan`) and check the memory budget.

        Batch-averaged messages switch to exact position blocks where the dense
        matrix exceeds the budget (``curvature/blocks.py``); every module
        towards the input must then handle blocks exactly, and weights that receive
        them must take their Kronecker factors from blocks (``expand`` only).

        A diagonal residual factor that enters a module taking local factors
        (``curvature/local.py``) is not densified there: its columns are counted
        and checked as a dense factor where the next module takes no local factors.
        Every module refuses up front what it would densify (``curvature/memory.py``).
        The pass reads the decisions from ``call.plan``; nothing decides them again. The
        checks read the pass's ``MemoryPolicy`` from the calls, as the rules do.
        """
        for call in self.graph.order:  # what parent_accepts_local reads; coupled columns
            if self.selection is not None and call not in self.roots and not self.receives(call):
                call.plan = CallPlan()  # below the selection: no curvature arrives
                continue
            local = id(call) not in self.below_coupling and accepts_local(call.rules, call)
            call.plan = CallPlan(takes_local=local)  # (train-mode BatchNorm) stay dense
        keys = [e.message for e in self.second_order]
        averaged = any(k.batch_averaged for k in keys)
        dense = [e for e in self.second_order if not e.accepts_position_blocks]
        residuals = any(k.residual_factors for k in keys)
        # what arrives at a call's output: diagonal residual factors, position blocks,
        # and the columns of local factors
        diagonal_out: dict[int, bool] = {}
        blocks_out: dict[int, bool] = {}
        columns_out: dict[int, int] = {}
        for call in self.graph.order:
            if call in self.roots or call.released:
                continue
            rules = call.rules
            blocks = blocks_out.get(id(call), False)
            if blocks and self.owns_trainable(call) and (dense or not rules.kron_from_blocks):
                raise NotImplementedError(
                    "the batch-averaged curvature at the output of "
                    f"{describe(call.module)} is carried as position blocks (its dense form "
                    "exceeds the memory budget, "
                    "MemoryPolicy.max_dense_bytes), from which "
                    f"{dense[0] if dense else describe(call.module)} cannot form "
                    "its quantity; use kfac_approx='expand', a per-sample extension "
                    f"(KFLR, KFAC), or raise the budget with {RAISE_BUDGET}"
                )
            if not self.needs_messages(call):
                continue
            diagonal = diagonal_out.get(id(call), False)
            if averaged and self.graph.is_chain:  # blocks on chains only
                if blocks:
                    rules.check_blocks(call, from_blocks=True)
                elif rules.ea_needs_blocks(call):
                    blocks = True
            takes_local = call.plan.takes_local
            local = takes_local and parent_accepts_local(call)
            call.plan = CallPlan(blocks, takes_local, local)
            rules.check_budget(call, averaged and not blocks, diagonal and not local)
            if not rules.linear_in_input:
                rules.check_residual_budget(call, keys)
            local_columns = columns_out.get(id(call), 0)
            if diagonal and local and not rules.keeps_diagonal:
                local_columns += call.output_shape[1:].numel()
            if local_columns and not local and takes_local:
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

    def _offer_forward_form(self) -> None:
        """Where the diagonal extensions may take their forward form
        (``extensions/forward_diagonal.py``): :attr:`forward_form`, the ids of the calls with
        parameters that send no message on and have ``COLUMNS_PER_TANGENT`` times fewer
        parameter entries than there are residual entries behind them (each one column of
        the column form), on a graph whose every call forward products reach can carry them
        (``ProductMessage``'s rules; no train-mode BatchNorm, no tied parameters);
        :attr:`forward_extensions`, the extensions that take it."""
        self.forward_extensions = [
            e for e in self.second_order if getattr(e, "forward_message", None) is not None
        ]
        self.forward_form: frozenset[int] = frozenset()
        if not self.forward_extensions or self.coupling or getattr(self, "tied", None):
            return
        if not all(rules_implement(r.rules, "hessian_mat_prod") for r in self.roots):
            return
        carriers = [c for c in self.graph.order if c not in self.roots and self.needs_messages(c)]
        residual_entries = 0
        for call in carriers:
            rules = call.rules
            for ext in self.forward_extensions:
                needed = ext.forward_message.required_rules(rules, True)
                if per_input(rules, call):
                    needed = [*needed, "jac_mat_prod_inputs"]
                if not all(rules_implement(rules, m) for m in needed):
                    return
            if not rules.linear_in_input:
                residual_entries += math.prod(call.output_shape[1:])
        candidates = set()
        for call in self.graph.order:
            if call in self.roots or call.released or self.needs_messages(call):
                continue
            for ext, rules in self.rules(call):
                if ext not in self.forward_extensions or rules is None:
                    continue
                names = [n for n, _ in self.trainable(call, rules.param_names(call.module))]
                entries = sum(p.numel() for _, p in self.trainable(call, names))
                if (
                    names
                    and entries * COLUMNS_PER_TANGENT <= residual_entries
                    and rules_implement(rules, "param_jac_mat_prod")
                ):
                    candidates.add(id(call))
        self.forward_form = frozenset(candidates)

    def _check_tied(self, calls: list[ModuleCall]) -> None:
        """Find the parameters used by several calls (a module called twice, weights tied
        between modules: ``self.tied``) and refuse the extensions that cannot combine the
        uses (``Extension.combines_tied_uses``); per-sample gradients are the sum over uses."""
        uses: dict[int, list[tuple[ModuleCall, str]]] = {}
        for call in calls:
            rules = next((r for _, r in self.rules(call) if r is not None), None)
            if rules is None or isinstance(rules, LossRules):
                continue
            for name, p in self.trainable(call, rules.param_names(call.module)):
                uses.setdefault(id(p), []).append((call, name))
        self.tied = {k: v for k, v in uses.items() if len(v) > 1}
        if not self.tied:
            return
        refused = [e for e in self.extensions if not e.combines_tied_uses]
        for ext in self.extensions:
            if ext in refused:
                continue
            for c, _ in (u for uses in self.tied.values() for u in uses):
                rules = dict(self.rules(c))[ext]
                missing = [
                    m for m in ext.required_tied_rules(rules) if not rules_implement(rules, m)
                ]
                if missing:
                    self._refuse_missing(c, ext, rules, missing, "for a tied parameter's use")
            for where in self.tied.values():
                reason = ext.tied_refusal([(dict(self.rules(c))[ext], n) for c, n in where])
                if reason is not None:
                    names = ", ".join(f"{describe(c.module)}.{n}" for c, n in where)
                    raise NotImplementedError(f"{ext!r} for the parameter of {names}: {reason}")
        if refused:
            where = next(iter(self.tied.values()))
            names = ", ".join(f"{describe(c.module)}.{n}" for c, n in where)
            raise NotImplementedError(
                f"a parameter is used {len(where)} times in one forward pass ({names}: a module "
                "called several times, or weights tied between modules); "
                f"{refused[0]!r} cannot combine its uses yet; per-sample gradients and their "
                "statistics, the GGN diagonals (DiagGGNExact, DiagGGNMC), GGN products (GGNMP) "
                "and KFAC / KFLR with kfac_approx='expand' are computed for it"
            )

    def _check_call(self, call: ModuleCall) -> None:
        if call.released:  # processed before another loss joined the pass: checked then
            return
        module = call.module
        name = describe(module)
        if call not in self.roots and isinstance(call.rules, LossRules):
            raise NotImplementedError(f"{name} is used inside the network, not as its loss")
        validated = set()
        for ext, rules in self.rules(call):
            if rules is None:
                if ext.needs_backprop or self.owns_trainable(call):
                    raise NotImplementedError(
                        f"{name} is not supported by {ext!r}; register rules for it with "
                        "hbpkit.register(...)"
                    )
                continue
            if id(rules) not in validated:
                rules.validate(call)
                validated.add(id(rules))
            self._check_required(call, ext, rules)
            ext.check(call, rules)

    def _check_required(self, call: ModuleCall, ext: Extension, rules: Any) -> None:
        """Refuse rules that lack a method ``ext`` needs for ``call`` (``Extension.required_*``).

        The loss's rules for the message's start; ``rules`` (``ext``'s table's entry) for
        the parameter quantity where the module has trainable parameters; the call's
        curvature rules (``call.rules``, which the pass propagates with) where the
        message goes on towards trainable parameters (:meth:`needs_messages`).
        """
        if isinstance(rules, UnsupportedRules):
            return  # validate() refused it with its reason
        if call in self.roots:
            if ext.needs_backprop:
                loss = call.rules
                missing = [m for m in ext.required_loss_rules() if not rules_implement(loss, m)]
                self._refuse_missing(call, ext, loss, missing, "to start its message")
            return
        if ext.needs_backprop and call not in self.graph:
            return  # refused as outside the graph (_refuse_outside)
        module = call.module
        if self.trainable(call, rules.param_names(module)):
            missing = [m for m in ext.required_param_rules(rules) if not rules_implement(rules, m)]
            self._refuse_missing(call, ext, rules, missing, "for the module's parameters")
        if ext.message is not None and self._needs.get(id(call), False):
            carrier = call.rules
            if carrier is None:
                raise NotImplementedError(
                    f"{describe(module)} has no curvature rules to carry the message of "
                    f"{ext!r} to its input; register rules for it with hbpkit.register(...)"
                )
            if per_input(carrier, call) and not ext.message.per_input:
                raise NotImplementedError(
                    f"{describe(module)} has several inputs that need their own curvature "
                    f"(rules {type(carrier).__name__}); {ext!r} backpropagates one "
                    "batch-averaged matrix, which cannot be split over inputs: use a "
                    "per-sample extension (KFLR, KFAC, DiagGGNExact) or products (GGNMP)"
                )
            needed = ext.required_message_rules(carrier, not self.graph.is_chain)
            missing = [m for m in needed if not rules_implement(carrier, m)]
            self._refuse_missing(
                call, ext, carrier, missing, "to carry its message to the module's input"
            )

    def _refuse_missing(
        self, call: ModuleCall, ext: Extension, rules: Any, missing: list[str], purpose: str
    ) -> None:
        if not missing:
            return
        name = describe(call.module)
        methods = ", ".join(
            f"{m} (or {DEFAULTS_BUILT_ON[m]}, on which its default builds)"
            if m in DEFAULTS_BUILT_ON
            else m
            for m in missing
        )
        them = "it" if len(missing) == 1 else "them"
        if isinstance(rules, RecordedGraphRules):
            raise NotImplementedError(
                f"{name} is functional code between modules, seen only in the autograd graph, "
                "which gives the transposed Jacobian products that per-sample gradients, GGN "
                f"diagonals, KFAC and KFLR need, but not {methods}, which {ext!r} needs "
                f"{purpose}; {CONVERT_ADVICE}"
            )
        if isinstance(rules, GenericRules):
            raise NotImplementedError(
                f"{name} has no rules of its own: the generic path (autograd) gives it "
                "per-sample gradients, diagonals and curvature products, but not "
                f"{methods}, which {ext!r} needs {purpose}; register rules for "
                f"{type(call.module).__name__} with hbpkit.register(...) (docs/own-module.md)"
            )
        raise NotImplementedError(
            f"{name} (rules {type(rules).__name__}) does not implement {methods}, which "
            f"{ext!r} needs {purpose}; implement {them} in the rules class and register it "
            f"with hbpkit.register({type(call.module).__name__}, rules) (docs/own-module.md lists "
            "the rule methods "
            "each extension needs)"
        )

    def _refuse_outside(self, stray: list[nn.Parameter], outside: list[ModuleCall]) -> None:
        """Parameters or modules the loss reaches outside the graph of extended modules."""
        if self.second_order:
            for call in self.graph.order:
                if self.selection is not None and not self._needs[id(call)]:
                    continue  # no curvature goes below it
                for origin in call.origins[:1] if call in self.roots else call.origins:
                    if origin is not None:
                        self._refuse_hidden(call, origin)
        if outside:
            raise NotImplementedError(
                f"{describe(outside[0].module)} is reached from the loss outside the graph "
                "of extended modules (through an operation hbpkit does not see); curvature "
                "extensions need extended modules linked tensor to tensor"
            )
        shapes = ", ".join(str(tuple(p.shape)) for p in stray[:3])
        raise NotImplementedError(
            f"the loss depends on {len(stray)} trainable parameter(s) of shape {shapes}"
            f"{', ...' if len(stray) > 3 else ''} that no extended module owns: extend() the "
            "whole model (or set requires_grad=False on parameters hbpkit should ignore)"
        )


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


def reachable(roots: list[ModuleCall]) -> tuple[list[ModuleCall], list[nn.Parameter]]:
    """The extended calls and trainable parameters the backward pass from ``roots`` reaches.

    Walks the autograd graph from ``root``'s inputs; a call is found through the
    metadata of its output's autograd node, a parameter through its
    ``AccumulateGrad`` node.
    """
    calls, params = list(roots), []
    found = {id(r) for r in roots}
    stack, visited, seen = [], [], set()
    for root in roots:
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
        if call is not None and not call.released and id(call) not in found:
            found.add(id(call))
            calls.append(call)
        variable = getattr(node, "variable", None)
        if isinstance(variable, nn.Parameter) and variable.requires_grad:
            params.append(variable)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return calls, params
