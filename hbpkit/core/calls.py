"""One record per module call in the forward pass, linked through the tensors.

The forward hook that :func:`hbpkit.extend` installs creates a :class:`ModuleCall`
for every call of an extended module while autograd records a graph. The record
holds the call's inputs and the records of the modules that produced them, so
the graph of calls (a chain, or a DAG with residual blocks and sums) can be
walked back from the loss. It is reachable
only from the autograd graph (through a tensor hook on the call's output) and
from the output tensor itself: when the graph is gone, so is the record. It is
released after the first backward pass that reaches it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

_LINK = "_hbpkit_call"
NODE_KEY = "hbpkit_call"  # key of the call in its output's autograd node's metadata


@dataclass(frozen=True)
class CallPlan:
    """How curvature leaves a call towards its input, decided once per backward pass.

    Set on every call of the graph by the pass's plan (:mod:`hbpkit.engine.plan`)
    before anything is computed; rules and messages read it instead of deciding again.

    Attributes:
        position_blocks: batch-averaged curvature leaves as exact position blocks
            (``hbpkit.curvature.blocks``), not as a dense matrix.
        takes_local: the module's rules backpropagate local sqrt factors
            (``hbpkit.curvature.local``).
        local_out: sqrt factors may leave as local factors (this module and the one
            that produced its input take them).
    """

    position_blocks: bool = False
    takes_local: bool = False
    local_out: bool = False


class ModuleCall:
    """What one forward call of an extended module left for the backward pass.

    Attributes:
        module: the module that was called.
        inputs: the positional arguments of the call (``inputs[0]`` is the input
            ``x``; a loss also has the target at ``inputs[1]``).
        parents: per input, the record of the extended module whose output it is,
            or ``None`` (data, a leaf, or an operation hbpkit does not see).
        origins: per input, the autograd node that produced it if it is not an
            extended module's output (used in checks and error messages), else ``None``.
        parent, input_origin: ``parents[0]`` and ``origins[0]`` (the input ``x``).
        rules: the module's curvature rules (``SECOND_ORDER``'s entry), resolved once when the
            call is recorded (``None``: no rules).
        plan: how curvature leaves the call (:class:`CallPlan`), set by a backward pass.
        captured: whatever the module's rules captured during the forward pass
            (for instance the mask of a ``Dropout`` layer).
        cache: quantities shared by several extensions during one backward pass
            (cleared on release).
        grad_slots: the positions of the inputs that required gradients when recorded.
        kwargs: the keyword arguments of the call (``attn_mask=...``), replayed by the
            generic path; curvature is backpropagated through positional inputs only.
        output_index: where the recorded output sits in the tuple the module returned
            (an ``nn.LSTM``'s ``(output, (h, c))``), ``None`` for a tensor output.
        memory: the memory policy (``hbpkit.curvature.memory.MemoryPolicy``) of the
            backward pass that takes the call, set by that pass; ``None`` before (rules
            then use the default policy).
    """

    __slots__ = (
        "module",
        "rules",
        "plan",
        "inputs",
        "parents",
        "origins",
        "captured",
        "cache",
        "released",
        "kept",
        "output_shape",
        "output_index",
        "grad_slots",
        "kwargs",
        "memory",
        "__weakref__",
    )

    def __init__(
        self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor, rules: Any = None
    ) -> None:
        self.module = module
        self.rules = rules
        self.plan: CallPlan | None = None
        self.inputs = inputs
        self.output_shape = output.shape
        self.output_index: int | None = None
        self.kwargs: dict[str, Any] = {}
        self.grad_slots = tuple(
            i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad
        )
        self.captured: Any = None
        self.cache: dict[Any, Any] = {}
        self.released = False
        self.kept = False
        self.memory: Any = None
        if len(inputs) == 1:
            parent, origin = _producer(inputs[0])
            self.parents, self.origins = (parent,), (origin,)
        else:
            self.parents, self.origins = zip(*map(_producer, inputs))

    @property
    def parent(self) -> ModuleCall | None:
        """The record of the module that produced the input ``x`` (``inputs[0]``)."""
        return self.parents[0]

    @property
    def input_origin(self) -> Any:
        """The autograd node that produced ``x`` outside extended modules, or ``None``."""
        return self.origins[0]

    @property
    def input(self) -> Tensor:
        """The module's input ``x`` (detached), ``[N, *in]``."""
        self._check_alive()
        return self.inputs[0].detach()

    def param(self, name: str) -> Tensor:
        """The module's parameter ``name`` (dotted for a submodule's, e.g. ``"cell.weight"``)."""
        module = self.module
        for part in name.split("."):
            module = getattr(module, part)
        return module

    def keep(self) -> None:
        """Keep the forward data past :meth:`release` (for products applied after the pass).

        Call it during the backward pass, before the call's release. The cache is
        still dropped on release; rules refill it lazily when the products use them.
        """
        self.kept = True

    def release(self) -> None:
        """Drop the tensors of the forward pass (after the backward pass used them).

        A kept call (:meth:`keep`) drops only its cache and detaches its inputs.
        """
        if self.kept:
            self.inputs = tuple(t.detach() if isinstance(t, Tensor) else t for t in self.inputs)
            self.kwargs = {
                k: v.detach() if isinstance(v, Tensor) else v for k, v in self.kwargs.items()
            }
        else:
            self.inputs = ()
            self.kwargs = {}
            self.captured = None
        self.cache = {}
        self.released = True

    def _check_alive(self) -> None:
        if self.released and not self.kept:
            raise RuntimeError(
                f"The forward data of {type(self.module).__name__} was released by an earlier "
                "backward pass through this graph. hbpkit computes its quantities in the first "
                "backward pass after a forward pass: run the forward pass again."
            )


def _producer(x: Any) -> tuple[ModuleCall | None, Any]:
    """The extended call that produced tensor ``x`` (and its version), or the alien node."""
    if not isinstance(x, Tensor) or not x.requires_grad:
        return None, None
    link = getattr(x, _LINK, None)
    if link is not None:
        call, version = link
        if version == x._version:
            return call, None
    return None, x.grad_fn


_REPLAY = threading.local()


@contextmanager
def replaying() -> Iterator[None]:
    """Run modules without recording their calls: the generic path recomputing a call's
    forward pass under ``torch.func``, and the modules inside a region (the region is
    the call)."""
    depth = getattr(_REPLAY, "depth", 0)
    _REPLAY.depth = depth + 1
    try:
        yield
    finally:
        _REPLAY.depth = depth


def is_replaying() -> bool:
    """Whether a call's forward pass is being recomputed (:func:`replaying`)."""
    return getattr(_REPLAY, "depth", 0) > 0


PATH = "_hbpkit_path"  # attribute of a module: its path in the model extend() was given


def describe(module: nn.Module) -> str:
    """``Type 'path'`` for error messages (``ReLU 'layer1.0.relu'``), or the type alone; a
    region adds the source line of the code it runs (``Region 'hbpkit_region_0' (from
    model.py:42)``)."""
    path = getattr(module, PATH, None)
    name = type(module).__name__
    named = f"{name} '{path}'" if path else name
    source = getattr(module, "source", "")  # a region: the model's code it runs
    if isinstance(source, str) and source:
        named = f"{named} (from {source}"
        inner = getattr(module, "called_modules", None)
        calls = [describe(m) for m in inner()] if inner is not None else []
        named += f", calling {', '.join(calls)})" if calls else ")"
    return named


def call_of(output: Tensor) -> ModuleCall | None:
    """The record of the extended module call that returned ``output``, or ``None``."""
    node = output.grad_fn
    return None if node is None else node.metadata.get(NODE_KEY)


def link_output(output: Tensor, call: ModuleCall) -> None:
    """Mark ``output`` as produced by ``call`` (valid until it is modified in place).

    The tensor carries the link to the next module; its autograd node carries it
    for the walk over the graph (and lives exactly as long as the graph).
    """
    setattr(output, _LINK, (call, output._version))
    output.grad_fn.metadata[NODE_KEY] = call
