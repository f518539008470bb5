"""The ``backprop(*extensions)`` context manager.

Entering pushes a :class:`~hbpkit.engine.backward_pass.BackwardState` on a stack that
the tensor hooks consult; leaving pops it, also after an exception, so nothing
outlives the ``with`` block. The stack is process-wide (not thread-local)
because autograd may run hooks on its own worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from types import TracebackType

from torch import nn

from hbpkit.curvature.memory import DEFAULT_POLICY, MemoryPolicy
from hbpkit.extensions.base import Extension

_STACK: list = []
_LOCK = threading.Lock()


def current():
    """The innermost active :class:`BackwardState`, or ``None``."""
    return _STACK[-1] if _STACK else None


class backprop:  # noqa: N801 (a context manager, named like BackPACK's)
    """Compute ``extensions`` during the ``backward()`` calls inside the block.

    Example::

        with backprop(KFAC(), DiagGGNExact()):
            loss.backward()

    Args:
        *extensions: instances of :class:`hbpkit.extensions.Extension`, each with
            its own savefield.
        memory: the :class:`~hbpkit.curvature.memory.MemoryPolicy` of the backward
            passes in the block (dense budget, chunk sizes; default ``MemoryPolicy()``).
        modules: compute the quantities for these modules' parameters only (each module
            with its submodules), e.g. ``modules=[model.head]`` for last-layer curvature:
            curvature is backpropagated from the loss down to the lowest of them and no
            further; the modules below need no rules (nor ``extend()``) and their
            parameters get ``.grad`` only. Default: every parameter the loss depends on.
    """

    def __init__(
        self,
        *extensions: Extension,
        memory: MemoryPolicy | None = None,
        modules: nn.Module | Iterable[nn.Module] | None = None,
    ) -> None:
        for ext in extensions:
            if not isinstance(ext, Extension):
                raise TypeError(
                    f"backprop() expects hbpkit extensions such as KFAC(), got {ext!r}"
                    + (" (a class: instantiate it)" if isinstance(ext, type) else "")
                )
        fields = [ext.savefield for ext in extensions]
        duplicates = sorted({f for f in fields if fields.count(f) > 1})
        if duplicates:
            raise ValueError(f"two extensions write the same savefield(s) {duplicates}")
        if memory is None:
            memory = DEFAULT_POLICY
        elif not isinstance(memory, MemoryPolicy):
            raise TypeError(
                "backprop(..., memory=...) expects a MemoryPolicy (e.g. "
                f"MemoryPolicy(max_dense_bytes=2**32)), got {type(memory).__name__} {memory!r}"
            )
        self.extensions = tuple(extensions)
        self.memory = memory
        self.selection = None if modules is None else _selection(modules)
        self._state = None

    def __enter__(self) -> backprop:
        from hbpkit.engine.backward_pass import BackwardState

        if self._state is not None:
            raise RuntimeError("this backprop(...) context is already active")
        self._state = BackwardState(self.extensions, self.memory, self.selection)
        with _LOCK:
            _STACK.append(self._state)
        return self

    def __exit__(
        self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with _LOCK:
            _STACK.remove(self._state)
        self._state = None


def _selection(modules: nn.Module | Iterable[nn.Module]) -> frozenset[int]:
    """The ids of ``modules`` and of all their submodules (``backprop(..., modules=...)``)."""
    if isinstance(modules, nn.Module):
        modules = [modules]
    try:
        modules = list(modules)
    except TypeError:
        raise TypeError(
            "backprop(..., modules=...) expects an nn.Module or an iterable of them, got "
            f"{type(modules).__name__}"
        ) from None
    if not modules:
        raise ValueError("backprop(..., modules=[]) selects no module; leave modules out")
    ids = set()
    for m in modules:
        if not isinstance(m, nn.Module):
            raise TypeError(
                "backprop(..., modules=...) expects nn.Module instances (e.g. [model.fc]), got "
                f"{type(m).__name__} {m!r}"
            )
        ids.update(id(sub) for sub in m.modules())
    return frozenset(ids)
