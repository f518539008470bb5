"""Functional code between extended modules, with ``extend()`` alone.

``self.fc2(torch.relu(self.fc1(x)) * 2)``: the input of ``fc2`` is computed by
operations the hooks do not see. Where such a piece reaches extended calls and no
trainable parameter (a parameter used in ``forward`` needs :func:`hbpkit.convert`), the
backward pass inserts one virtual call per consumer input: its module is a
:class:`~hbpkit.regions.RecordedOps`, its parents the calls whose outputs the piece
reads, its rules differentiate the recorded graph
(``hbpkit/modules/generic/recorded.py``). Like the views of :mod:`hbpkit.engine.views`,
the virtual call has no hook: the pass processes it right after its consumer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge

from hbpkit.core.calls import NODE_KEY, ModuleCall, describe
from hbpkit.core.graph import followed_inputs
from hbpkit.modules.generic.recorded import RecordedGraph
from hbpkit.modules.tables import SECOND_ORDER
from hbpkit.regions import RecordedOps


def bridge_recorded(root: ModuleCall) -> None:
    """Insert a virtual call for every piece of recorded functional code that feeds a
    call reached from ``root`` (the loss), where the piece allows it."""
    stack, seen = [root], set()
    while stack:
        call = stack.pop()
        if id(call) in seen or call.released:
            continue
        seen.add(id(call))
        slots = followed_inputs(call) if len(call.parents) > 1 else (0,)
        for i in slots:
            origin = call.origins[i]
            if call.parents[i] is None and origin is not None and i < len(call.inputs):
                virtual = _virtual_call(call, i, origin)
                if virtual is not None:
                    call.parents = (*call.parents[:i], virtual, *call.parents[i + 1 :])
                    call.origins = (*call.origins[:i], None, *call.origins[i + 1 :])
        stack.extend(p for p in call.parents if p is not None)


def _virtual_call(consumer: ModuleCall, slot: int, origin: Any) -> ModuleCall | None:
    """The virtual call standing for the graph below ``origin``, or ``None`` where it
    reaches no extended call or a trainable parameter (refused by the plan)."""
    producers: dict[int, tuple[ModuleCall, GradientEdge]] = {}
    names: list[str] = []
    stack, seen, keep = [(origin, 0)], set(), []
    while stack:
        node, output_nr = stack.pop()
        if node is None:
            continue
        producer = node.metadata.get(NODE_KEY)
        if producer is not None:
            if producer.released:
                return None
            producers.setdefault(id(producer), (producer, GradientEdge(node, output_nr)))
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        keep.append(node)  # keep the wrappers (and their ids) alive during the walk
        variable = getattr(node, "variable", None)
        if isinstance(variable, nn.Parameter) and variable.requires_grad:
            return None  # a parameter used in forward: hbpkit.convert makes it a region's
        if variable is None:
            names.append(type(node).__name__)
        stack.extend(node.next_functions)
    if not producers:
        return None
    parents = [p for p, _ in producers.values()]
    output = consumer.inputs[slot]
    ops = ", ".join(dict.fromkeys(reversed(names)))
    module = RecordedOps(f"{ops} feeding {describe(consumer.module)}")
    placeholders = tuple(
        torch.empty(p.output_shape, dtype=output.dtype, device="meta") for p in parents
    )
    call = ModuleCall(module, placeholders, output, SECOND_ORDER.lookup(module))
    call.parents = tuple(parents)
    call.origins = (None,) * len(parents)
    call.grad_slots = tuple(range(len(parents)))
    call.captured = RecordedGraph(output, tuple(e for _, e in producers.values()))
    return call
