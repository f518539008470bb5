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

import math
import weakref
from collections.abc import Callable

from torch import Tensor

from hbpkit.core.calls import ModuleCall
from hbpkit.core.graph import input_parents, per_input
from hbpkit.curvature.factors import DiagonalResidual
from hbpkit.modules.base import LossRules, ModuleRules, widen_channel


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
        self._consumers = None  # read during the pass too (GraphCurvature.quadratic)

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

    def _calls(self) -> list[ModuleCall]:
        """The downstream region of the sources, in forward order (found once)."""
        if self._region is None:
            reached = {c for s in self.sources for c in self.graph.region(s)}
            self._region = [c for c in reversed(self.graph.nodes) if c in reached]
            self._members = {*self.sources, *self._region}
        return self._region

    def quadratic(self, mat: Tensor, channel: int | None = None) -> Tensor:
        """``[K, N, *out] -> [K]``: ``sum_n m_{k,n}^T H_n m_{k,n}`` (one source), forward only.

        Step 1. above, with every curvature source read where the tangent reaches it: the
        loss's ``t^T (d2L/dz dz) t`` and each residual's ``t^T R t``, ``sum_o (J_o m)^T R_o
        (J_o m)`` (eq. 7 unrolled). The diagonal of ``J_p^T H J_p`` for a few parameter
        entries ``p`` this way (``extensions/forward_diagonal.py``) costs a forward pass per
        entry instead of a transposed product per column of ``H``. Summed over the samples
        (a residual that couples them, train-mode BatchNorm, is not split).

        ``channel``: ``m`` is zero outside this channel (dim 1 of the output) and given as
        ``[K, N, 1, *out]``; it stays narrowed through the calls that keep it in one channel
        (``ModuleRules.jac_mat_prod_channel``: an activation, then a convolution reads only
        its kernels of that channel).
        """
        (source,) = self.sources
        nodes = self.graph.nodes
        region = self._calls()
        # each tangent is freed once its last consumer has read it (chunks stay small)
        readers: dict[ModuleCall, int] = {source: 0}
        for call in region:
            for parent in _tangent_parents(nodes[call][0], call):
                readers[parent] = readers.get(parent, 0) + 1
        tangent_out = {source: mat}
        narrow = {} if channel is None else {source: channel}  # tangents held narrowed

        def read(parent: ModuleCall | None, widen: bool = True) -> Tensor | None:
            if parent not in tangent_out:
                return None
            readers[parent] -= 1
            t = tangent_out[parent] if readers[parent] else tangent_out.pop(parent)
            if widen and parent in narrow:
                t = widen_channel(t, narrow[parent], parent.output_shape[1])
            return t

        total = mat.new_zeros(mat.shape[0])
        for call in region:
            rules, residual = nodes[call]
            if per_input(rules, call):
                slots = rules.input_slots(call)
                t = [read(call.parents[i]) for i in slots]
                if residual is not None:
                    full = [
                        m if m is not None else mat.new_zeros(mat.shape[0], *call.inputs[i].shape)
                        for m, i in zip(t, slots)
                    ]
                    total += sum(_dot(r, m) for r, m in zip(residual(full), full))
                out = rules.jac_mat_prod_inputs(call, t)
            elif isinstance(rules, LossRules):  # (its residual slot: the loss's weight)
                t = _sum(m for p in input_parents(call) if (m := read(p)) is not None)
                q = _dot(rules.hessian_mat_prod(call, t), t)
                total += q if residual is None else residual * q
                continue
            else:
                parents = [p for p in input_parents(call) if p in tangent_out]
                c = narrow.get(parents[0]) if len(parents) == 1 else None
                if c is not None and readers[parents[0]] == 1 and _narrowable(residual):
                    t = read(parents[0], widen=False)
                    if residual is not None:  # r on the one channel
                        total += _dot(residual.r[:, c : c + 1] * t, t)
                    out, c = rules.jac_mat_prod_channel(call, t, c)
                    if c is not None:
                        narrow[call] = c
                else:
                    t = _sum(m for p in parents if (m := read(p)) is not None)
                    if residual is not None:
                        total += _dot(residual * t, t)
                    out = rules.jac_mat_prod(call, t)
            del t
            if readers.get(call):
                tangent_out[call] = out
        return total

    def widest(self) -> int:
        """The largest per-sample output of the region (sizes the chunks of tangents)."""
        return max((math.prod(c.output_shape[1:]) for c in self._calls()), default=1)

    def push_macs(self) -> int:
        """Multiply-adds per sample of pushing one tangent through :meth:`quadratic` (an
        estimate from the calls' shapes, :func:`forward_macs`)."""
        return sum(forward_macs(c) for c in self._calls())

    def apply(self, mats: list[Tensor]) -> list[Tensor]:
        """Per source ``[K, N, *out_s]`` -> per source ``[K, N, *out_s]``."""
        self._calls()
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


def _tangent_parents(rules, call: ModuleCall) -> list[ModuleCall | None]:
    """The calls whose output tangents ``call`` reads (per input, or summed)."""
    if per_input(rules, call):
        return [call.parents[i] for i in rules.input_slots(call)]
    return input_parents(call)


def forward_macs(call: ModuleCall) -> int:
    """Multiply-adds per sample of a forward product ``J t`` through ``call`` (estimate):
    ``weight.numel()`` per output position for a layer with a weight matrix or kernel
    (``Linear``, convolutions: ``C_out x (C_in / G) prod(kernel)`` times ``prod(out)``), one
    per output entry otherwise (elementwise maps, pooling, reshapes)."""
    per_sample = math.prod(call.output_shape[1:])
    weight = getattr(call.module, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() >= 2:
        return weight.numel() * max(1, per_sample // weight.shape[0])
    return per_sample


def _narrowable(residual) -> bool:
    """Whether a residual reads a narrowed tangent on its channel (a diagonal one)."""
    return residual is None or isinstance(residual, DiagonalResidual)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``[K, ...] x [K, ...] -> [K]``: the inner product per leading index."""
    return (a * b).flatten(1).sum(1)


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
