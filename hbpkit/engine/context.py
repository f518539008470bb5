"""The ``backprop(*extensions)`` context manager.

Entering pushes a :class:`~hbpkit.engine.backward_pass.BackwardState` on a stack that
the tensor hooks consult; leaving pops it, also after an exception, so nothing
outlives the ``with`` block. The stack is process-wide (not thread-local)
because autograd may run hooks on its own worker threads.
"""

from __future__ import annotations

import threading
from types import TracebackType

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
    """

    def __init__(self, *extensions: Extension, memory: MemoryPolicy | None = None) -> None:
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
        self._state = None

    def __enter__(self) -> backprop:
        from hbpkit.engine.backward_pass import BackwardState

        if self._state is not None:
            raise RuntimeError("this backprop(...) context is already active")
        self._state = BackwardState(self.extensions, self.memory)
        with _LOCK:
            _STACK.append(self._state)
        return self

    def __exit__(
        self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with _LOCK:
            _STACK.remove(self._state)
        self._state = None
