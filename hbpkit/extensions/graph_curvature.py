"""Exact output-curvature products in branching graphs (residual blocks, sums).

On a chain, the output curvature of a layer is applied link by link,
``H_x m = J^T H_z (J m) + r * m`` (eq. 7, :class:`~hbpkit.extensions.messages.OutputCurvature`).
Where a tensor feeds several consumers that meet again (a residual block,
supplement B.3: ``Hx = (I + Dy)^T Hz (I + Dy) + ...``), a sum of per-path
operators would miss the cross terms ``J_a^T H J_b`` between paths. Instead the
backward pass records the DAG of calls below the loss (:class:`ProductGraph`)
and :class:`GraphCurvature` applies the exact curvature at a call's output as
one second-order pass over the region of the DAG downstream of it:

1. forward: push the tangent ``m`` [K, N, *features] through every downstream
   call (``t_out = J t_in``; a sum adds the tangents of its inputs);
2. at the loss, ``d2L/dz_n dz_n t``; at every elementwise call, ``r_n * t_in``
   (the residual of S.9, modified by the curvature option);
3. backward: transposed products ``J^T``, summed over consumers, back to the start.

This is ``sum_o J_o^T R_o J_o m`` with ``J_o`` the full Jacobian (sum over paths)
to every origin ``o`` of curvature (the loss Hessian, each residual): exact.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from torch import Tensor

from hbpkit.core.calls import ModuleCall
from hbpkit.core.graph import input_parents, per_input
from hbpkit.modules.base import LossRules, ModuleRules


class ProductGraph:
    """The calls below the loss with their rules and residuals, in backward order."""

    def __init__(self) -> None:
        self.nodes: dict[ModuleCall, tuple[ModuleRules | LossRules, Tensor | None]] = {}
        self._consumers: dict[ModuleCall, list[ModuleCall]] | None = None
        # weak: a GraphCurvature holds its graph, and the graph must not hold it back (a
        # cycle would keep the forward data alive until the garbage collector runs)
        self._at: weakref.WeakValueDictionary[int, GraphCurvature] = weakref.WeakValueDictionary()

    def add(
        self, rules: ModuleRules | LossRules, call: ModuleCall, residual: Tensor | None
    ) -> None:
        call.keep()
        self.nodes[call] = (rules, residual)

    def curvature_at(self, call: ModuleCall) -> GraphCurvature:
        """The output curvature of ``call`` (one object per call: extensions share it)."""
        curvature = self._at.get(id(call))
        if curvature is None:
            curvature = self._at[id(call)] = GraphCurvature(self, call)
        return curvature

    def region(self, source: ModuleCall) -> list[ModuleCall]:
        """The recorded calls downstream of ``source``, in forward (topological) order."""
        if self._consumers is None:
            self._consumers = {}
            for call in self.nodes:
                for parent in input_parents(call):
                    self._consumers.setdefault(parent, []).append(call)
        reached, stack = set(), [source]
        while stack:
            for consumer in self._consumers.get(stack.pop(), []):
                if consumer not in reached:
                    reached.add(consumer)
                    stack.append(consumer)
        return [c for c in reversed(self.nodes) if c in reached]


class GraphCurvature:
    """``[K, N, *out] -> [K, N, *out]``: the exact per-sample curvature at ``source``'s output.

    With several sources (the calls of one tied parameter, each use's output),
    :meth:`apply` takes one tangent per source and returns, per source, the curvature
    between its output and all of them applied, ``sum_s' H_{s,s'} m_s'``: the tangents
    are pushed from every source at once (a source downstream of another adds its own to
    what reaches it), and the cotangents are read at every source's output.
    """

    __slots__ = ("graph", "sources", "_region", "_members", "__weakref__")

    def __init__(self, graph: ProductGraph, source: ModuleCall | tuple[ModuleCall, ...]) -> None:
        self.graph = graph
        self.sources = source if isinstance(source, tuple) else (source,)
        self._region: list[ModuleCall] | None = None
        self._members: set[ModuleCall] = set()

    @property
    def source(self) -> ModuleCall:
        return self.sources[0]

    def __call__(self, mat: Tensor) -> Tensor:
        return self.apply([mat])[0]

    def apply(self, mats: list[Tensor]) -> list[Tensor]:
        """Per source ``[K, N, *out_s]`` -> per source ``[K, N, *out_s]``."""
        if self._region is None:
            reached = {c for s in self.sources for c in self.graph.region(s)}
            self._region = [c for c in reversed(self.graph.nodes) if c in reached]
            self._members = {*self.sources, *self._region}
        nodes = self.graph.nodes
        injected = dict(zip(self.sources, mats))
        region = set(self._region)
        tangent_out = {s: m for s, m in injected.items() if s not in region}
        tangent_in: dict[ModuleCall, Tensor] = {}
        for call in self._region:  # 1. forward-mode push
            rules = nodes[call][0]
            if per_input(rules, call):  # one tangent per input (zero outside the region)
                t = [tangent_out.get(call.parents[i]) for i in rules.input_slots(call)]
                tangent_in[call] = t
                out = rules.jac_mat_prod_inputs(call, t)
            else:
                t = _sum(tangent_out[p] for p in input_parents(call) if p in tangent_out)
                tangent_in[call] = t
                if isinstance(rules, LossRules):
                    continue
                out = rules.jac_mat_prod(call, t)
            tangent_out[call] = out + injected[call] if call in injected else out
        del tangent_out
        cotangent: dict[ModuleCall, Tensor] = {}
        at_source: dict[ModuleCall, Tensor] = {}

        def send(parent: ModuleCall | None, out: Tensor) -> None:
            if parent in self._members:
                cotangent[parent] = out if parent not in cotangent else cotangent[parent] + out

        for call in reversed(self._region):  # 2. and 3.: curvature sources, transposed products
            rules, residual = nodes[call]
            t = tangent_in.pop(call)
            if isinstance(rules, LossRules):  # (its residual slot: the loss's weight)
                out = rules.hessian_mat_prod(call, t)
                if residual is not None:
                    out = residual * out
                for parent in input_parents(call):
                    send(parent, out)
                continue
            cot = cotangent.pop(call)
            if call in injected:  # a source downstream of another: read its output here
                at_source[call] = cot
            if per_input(rules, call):
                slots = rules.input_slots(call)
                outs = list(rules.jac_t_mat_prod_inputs(call, cot))
                if residual is not None:  # couples the inputs: d2z / dx_i dx_j
                    K = next(m.shape[0] for m in t if m is not None)
                    full = [
                        m if m is not None else mats[0].new_zeros(K, *call.inputs[i].shape)
                        for m, i in zip(t, slots)
                    ]
                    outs = [o + r for o, r in zip(outs, residual(full))]
                for slot, o in zip(slots, outs):
                    send(call.parents[slot], o)
                continue
            out = rules.jac_t_mat_prod(call, cot)
            if residual is not None:
                out = out + residual * t
            for parent in input_parents(call):
                send(parent, out)
        return [at_source[s] if s in at_source else cotangent[s] for s in self.sources]


def _sum(tensors) -> Tensor:
    out = None
    for t in tensors:
        out = t if out is None else out + t
    return out


class DagProductMessage:
    """:class:`~hbpkit.extensions.messages.ProductMessage` in a branching graph, one pass.

    The value sent along every link is the pass's :class:`ProductGraph`; each call
    adds itself (rules and residual) and its parameters read
    :meth:`ProductGraph.curvature_at` its output.
    """

    def __init__(self, curvature: str, residual: Callable) -> None:
        self.curvature = curvature
        self._residual = residual
        self.graph = ProductGraph()

    def initial(self, rules: LossRules, call: ModuleCall, weight: float = 1.0) -> ProductGraph:
        if type(rules).hessian_mat_prod is LossRules.hessian_mat_prod:
            raise NotImplementedError(f"{type(rules).__name__} does not implement hessian_mat_prod")
        self.graph.add(rules, call, None if weight == 1.0 else weight)
        return self.graph

    def propagate(
        self, rules: ModuleRules, call: ModuleCall, grad_output: Tensor, graph: ProductGraph
    ) -> ProductGraph:
        graph.add(rules, call, self._residual(rules, call, grad_output, self.curvature))
        return graph

    def merge(self, messages: list[ProductGraph], call: ModuleCall) -> ProductGraph:
        return messages[0]

    def for_params(self, graph: ProductGraph, call: ModuleCall) -> GraphCurvature:
        return graph.curvature_at(call)
