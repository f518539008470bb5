"""The previous pass's results, recycled as the memory of this pass's results.

Why: a training loop runs ``loss.backward()`` inside ``backprop(...)`` every step, and
every step replaces ``p.grad_batch``, ``p.kfac``, ... with results of the same shapes.
The large ones are fresh memory each time (glibc returns freed blocks above 32 MB to the
kernel), whose pages fault in when first written: for the table S.2 FCNN's ``grad_batch``
(1.6 GB) that costs more than computing it (``docs/benchmarks.md``).

How: the pass removes the previous results from the parameters before it starts
(``BackwardPass._drop_previous_results``) and *offers* them here (:meth:`ResultPool.offer`);
rules that write a large result ask for its memory with :func:`empty`, which hands out an
offered tensor of the same size, dtype and device, else ``torch.empty``. The pool is
emptied when the pass ends, so nothing is kept longer than before.

**Ownership rule** (the one of :mod:`hbpkit.curvature.workspace`): an offered tensor is
reused only if the pool holds its last reference: no Python name, container (a
``KroneckerFactors`` a user kept, an optimizer's state) or other tensor (a view) refers to
it or its storage. So a result a user still holds is never overwritten; it is simply not
recycled. Only CPU tensors that do not require grad are recycled (device allocators cache
freed blocks themselves, and differentiable results belong to their graph).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor

from hbpkit.curvature.workspace import MIN_BYTES, _unshared, _use_count, scoped


class ResultPool:
    """The results a pass removed from the parameters, until the pass ends."""

    def __init__(self) -> None:
        self._offered: list[Tensor] = []
        self.reused = 0  # requests served from an offered result (for tests and benchmarks)

    def offer(self, value: Any) -> None:
        """Offer the large tensors of a removed result (a tensor, or a list / tuple of them,
        e.g. Kronecker factors)."""
        for t in _tensors(value):
            if (
                _use_count is not None
                and t.numel() * t.element_size() >= MIN_BYTES
                and t.device.type == "cpu"
                and not t.requires_grad
                and t._base is None
                and t.is_contiguous()
                and not any(t is o for o in self._offered)
            ):
                self._offered.append(t)

    def empty(self, shape: tuple[int, ...] | torch.Size, like: Tensor) -> Tensor:
        """A contiguous uninitialised tensor of ``shape`` (``like``'s dtype and device): an
        offered result of the same size that nothing else refers to, else new memory."""
        i = self._find(math.prod(shape), like)
        if i is not None:
            group = [self._offered.pop(i)]  # its only name here: _unshared counts the list's
            if _unshared(group):
                self.reused += 1
                t = group.pop()  # reshaped without a view (a view is not offered next pass)
                return t if t.shape == shape else t.new_empty(0).set_(t.untyped_storage(), 0, shape)
            # still held elsewhere: not ours to overwrite (and dropped from the pool)
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    def _find(self, numel: int, like: Tensor) -> int | None:
        """The index of an offered tensor of ``numel`` entries, ``like``'s dtype and device
        (a function: no loop name outlives it)."""
        for i, t in enumerate(self._offered):
            if t.numel() == numel and t.dtype == like.dtype and t.device == like.device:
                return i
        return None

    def finish(self) -> None:
        """Release what was not reused (the allocator frees it, as without the pool)."""
        self._offered = []


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


_CURRENT: ContextVar[ResultPool | None] = ContextVar("hbpkit_result_pool", default=None)


def active(pool: ResultPool | None) -> AbstractContextManager[None]:
    """Make ``pool`` the one :func:`empty` draws from while the block runs."""
    return scoped(_CURRENT, pool)


def empty(shape: tuple[int, ...] | torch.Size, like: Tensor) -> Tensor:
    """Memory for a result of ``shape`` (dtype and device of ``like``): a recycled result of
    the active pass's pool where one fits, else ``torch.empty``."""
    pool = _CURRENT.get()
    if pool is None or math.prod(shape) * like.element_size() < MIN_BYTES:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return pool.empty(shape, like)


def matmul(a: Tensor, b: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
    """``a @ b`` (``[*B, n, k] @ [*B, k, m]``) into :func:`empty` memory, returned in
    ``shape`` (same entries in the same order; default ``[*B, n, m]``). Plain where a graph
    is recorded (``out=`` takes no autograd)."""
    product = (*a.shape[:-1], b.shape[-1])
    if a.requires_grad or b.requires_grad:
        out = a @ b
        return out if shape is None else out.reshape(shape)
    out = empty(product if shape is None else shape, a)
    torch.matmul(a, b, out=out.view(product))
    return out
