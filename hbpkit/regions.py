"""Functional code of a model as modules: what :func:`hbpkit.convert` wraps.

hbpkit records modules. A model's ``forward`` also computes between its modules:
reshapes and transposes, ``torch.cat``, slicing, ``F.scaled_dot_product_attention``,
products of two tensors, bare ``nn.Parameter`` s (a positional embedding, a class
token). ``convert`` cuts the traced graph into *regions*, maximal connected pieces
of such code between modules, and replaces each by one :class:`Region` module that
runs the piece (a small ``torch.fx.GraphModule``) on the region's inputs. Regions
have no rules of their own: the generic path (``hbpkit/modules/generic.py``)
differentiates them exactly; the parameters a region uses become its parameters
(per-sample gradients, diagonals and products included).

The subclasses only say what the generic path may exploit: a
:class:`LinearRegion` is linear in its inputs (no residual term of eq. 7), a
:class:`SelectionRegion` only copies entries (reshapes, indexing, concatenation),
so diagonal curvature factors stay diagonal.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from hbpkit.core.calls import replaying


class Region(nn.Module):
    """A piece of a model's functional code: ``graph(*inputs)``, one output.

    Args:
        graph: the piece, a ``torch.fx.GraphModule`` whose placeholders are the region's
            inputs (tensors of the model, or values such as sizes) and whose parameters
            are the model's parameters it uses (the same objects).
        source: where it comes from, for error messages (``forward`` lines).
    """

    def __init__(self, graph: fx.GraphModule, source: str = "") -> None:
        super().__init__()
        self.graph = graph
        self.source = source
        #: per input, whether it has the batch dimension (depends on the model's inputs;
        #: a mask or a size does not), for the per-sample function of the generic path
        self.batched_inputs: tuple[bool, ...] | None = None

    def forward(self, *inputs: Any) -> Any:
        with replaying():  # modules inside the region record no calls of their own
            return self.graph(*inputs)

    def called_modules(self) -> list[nn.Module]:
        """The modules the region's code calls (modules without rules join a region)."""
        return [
            self.graph.get_submodule(n.target)
            for n in self.graph.graph.nodes
            if n.op == "call_module"
        ]

    def extra_repr(self) -> str:
        ops = [
            getattr(n.target, "__name__", str(n.target))
            for n in self.graph.graph.nodes
            if n.op in ("call_function", "call_method", "call_module")
        ]
        return f"ops={ops}" + (f", source={self.source!r}" if self.source else "")


class LinearRegion(Region):
    """A region linear in its tensor inputs (its second derivative vanishes)."""


class SelectionRegion(LinearRegion):
    """A region whose every output entry is a copy of one input entry, or zero."""


class RecordedOps(nn.Module):
    """Functional operations between extended modules that only the autograd graph saw.

    ``extend()`` alone records modules; where a model computes between them
    (``self.fc2(torch.relu(self.fc1(x)) * 2)``), the backward pass stands one
    ``RecordedOps`` in for the operations, as a virtual call whose derivatives come from
    the recorded graph (``hbpkit/modules/generic/recorded.py``). It is never called.

    Args:
        source: the autograd nodes and the module they feed, for error messages.
    """

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def forward(self, *inputs: Any) -> Any:
        raise RuntimeError("RecordedOps stands for recorded autograd operations; it is not run")
