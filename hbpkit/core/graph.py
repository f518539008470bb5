"""The graph of module calls one backward pass runs through: a chain or a DAG.

Calls are linked through their inputs (:attr:`ModuleCall.parents`). A call's
output may feed several consumers (a residual block's input feeds the block and
the skip connection) and a multi-input module (:class:`hbpkit.branching.Sum`) has one
parent per input. Curvature flows from the loss along these links; the messages
that reach a tensor from its consumers are merged there (``messages.py``).
"""

from __future__ import annotations

from hbpkit.core.calls import ModuleCall


class PerInput:
    """Messages that differ per input of a call (``rules.per_input(call)``: the generic path's
    ``cat``, products of two tensors, attention), keyed by the input's position in
    ``call.inputs``; the pass delivers each to the producer of its input."""

    __slots__ = ("by_slot",)

    def __init__(self, slots: tuple[int, ...], values: list) -> None:
        self.by_slot = dict(zip(slots, values))

    def at(self, slot: int):
        return self.by_slot[slot]


def per_input(rules: object, call: ModuleCall) -> bool:
    """Whether ``rules`` send each input of ``call`` its own message (:class:`PerInput`)."""
    check = getattr(rules, "per_input", None)
    return check is not None and check(call)


def followed_inputs(call: ModuleCall) -> tuple[int, ...]:
    """The inputs curvature is backpropagated to: all for a multi-input module, else ``x``.

    A loss's target (``inputs[1]``) is data, never followed.
    """
    if len(call.parents) > 1 and getattr(call.rules, "multi_input", False):
        return tuple(range(len(call.parents)))  # (parents outlive the released inputs)
    return (0,)


def input_parents(call: ModuleCall) -> list[ModuleCall]:
    """The extended calls that produced the followed inputs (repeated if used twice)."""
    parents = call.parents
    if len(parents) == 1:
        return [] if parents[0] is None else [parents[0]]
    return [parents[i] for i in followed_inputs(call) if parents[i] is not None]


class CallGraph:
    """The extended calls reached from ``roots`` (the losses) through input links.

    Attributes:
        roots: the losses the backward pass starts from (one, or several summed).
        root: the first of them.
        order: the calls, every call after all of its consumers (roots first): the
            order in which the backward pass reaches them.
        parents: ``id(call) -> [producer calls]`` of its followed inputs.
        consumers: ``id(call) -> number of (consumer, input) links`` out of its output.
        is_chain: one root, and no call has two consumers or two parents.
    """

    def __init__(self, roots: ModuleCall | list[ModuleCall]) -> None:
        self.roots = roots if isinstance(roots, list) else [roots]
        self.root = self.roots[0]
        self.parents: dict[int, list[ModuleCall]] = {}
        postorder: list[ModuleCall] = []
        for root in self.roots:
            if id(root) in self.parents:
                continue
            stack: list[tuple[ModuleCall, int]] = [(root, 0)]
            self.parents[id(root)] = input_parents(root)
            while stack:  # iterative depth-first search over parent links
                call, i = stack.pop()
                parents = self.parents[id(call)]
                if i < len(parents):
                    stack.append((call, i + 1))
                    parent = parents[i]
                    if id(parent) not in self.parents:
                        self.parents[id(parent)] = input_parents(parent)
                        stack.append((parent, 0))
                else:
                    postorder.append(call)
        self.order = postorder[::-1]
        self.consumers: dict[int, int] = dict.fromkeys(self.parents, 0)
        for call in self.order:
            for parent in self.parents[id(call)]:
                self.consumers[id(parent)] += 1
        self.is_chain = (
            len(self.roots) == 1
            and all(len(p) <= 1 for p in self.parents.values())
            and all(n <= 1 for n in self.consumers.values())
        )

    def __contains__(self, call: ModuleCall) -> bool:
        return id(call) in self.parents
