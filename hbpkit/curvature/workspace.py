"""Buffers a backward pass reuses instead of asking the allocator for fresh memory.

Why: glibc returns every freed block above 32 MB to the kernel, so each large
temporary of a pass (a sqrt factor ``[V, N, C, H, W]`` behind a convolution) is
fresh memory whose pages fault in when first touched, about 1 ms per MB on a
virtual machine (``docs/benchmarks.md``). PyTorch's CUDA caching allocator keeps
freed blocks; on the CPU, this workspace does it for the pass's own messages.

How: the pass *offers* the tensors of the messages a call has consumed
(:meth:`Workspace.offer`); rules that write a large result ask for its memory with
:func:`empty` (``torch.mul(mat, d, out=empty(shape, mat))``).

**Ownership rule.** An offered tensor becomes a free buffer only once the workspace
holds its last reference: no Python name, container or result refers to the tensor
object, and no other tensor (a view, a reshape sent on as a message, a factor sent
to two parents, a saved result) shares its storage (CPython's reference count and
the storage's use count, checked in :meth:`Workspace._collect`). So a factor a call
sends to two parents stays untouched until both have used it, and nothing a user
can reach is ever overwritten. Only CPU tensors are tracked: device allocators
(CUDA's caching allocator) reuse freed blocks themselves, and nothing here reads a
device tensor back to the host.

**Overwriting a consumed factor.** A rule may also write its result into the very
tensor it consumes (an elementwise ``J^T S = phi' * S``, in place), which bounds the
peak by one factor instead of two. The engine lists, before it backpropagates a call's
messages, the sqrt factors that call alone holds (:func:`exclusive_factors`): every
holder on the way from the call's message dict to the tensor holds the only reference
to the next (the message was delivered over one link, no other message, cache or name
shares the factor, the tensor or its storage; a view's base is held by the view alone),
the tensor has no internal overlap (no expanded dimension), no graph (``requires_grad``)
and no marks (Python attributes). Rules ask :func:`may_overwrite` while the engine's
:func:`owning` block runs. A factor sent to two parents (a residual block's sum, a
module used twice), kept in a call's cache, or passed on unchanged by one consumer while
another still holds it is therefore never overwritten.

The workspace of a pass lives as long as the loss module that started it (a weak
dictionary, no attribute on the module), so the buffers of one pass serve the next
one. It keeps a dead storage only for a request size of this pass or the last (at
most one buffer per request, at most twice its size), within
``MemoryPolicy.workspace_bytes`` (``0``: off); other storages are freed as before.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn

from hbpkit.curvature.factors import SqrtFactor

#: glibc serves smaller blocks from its heap and reuses them (its largest mmap threshold):
#: only larger ones are fresh pages
MIN_BYTES = 2**25

_use_count = getattr(torch._C, "_storage_Use_Count", None)


Request = tuple[int, torch.dtype, torch.device]  # numel, dtype, device of one request


class Workspace:
    """Free buffers (flat, one per storage) of at most ``max_bytes`` in all, the tensors
    offered for reuse that may still be in use elsewhere, and the requests of the last
    pass: a dead storage is kept only for a request of that pass that no free buffer
    serves yet (at most twice its size), so buffers nobody asks for are freed as before."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._free: list[Tensor] = []
        self._offered: list[Tensor] = []
        self._asked: list[Request] = []  # this pass's requests
        self._pending: list[Request] = []  # the last pass's, not yet covered by a buffer
        self.reused = 0  # requests served from a free buffer (for tests and benchmarks)

    @property
    def free_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._free)

    def offer(self, tensor: Tensor) -> None:
        """Take ``tensor`` back once nothing but the workspace refers to it (see the
        ownership rule in the module docstring)."""
        if (
            self.max_bytes
            and _use_count is not None
            and tensor.numel() * tensor.element_size() >= MIN_BYTES
            and not tensor.requires_grad
            and tensor.device.type == "cpu"  # device allocators (CUDA's) cache blocks already
            and not any(t is tensor for t in self._offered)
        ):
            self._offered.append(tensor)

    def _collect(self) -> None:
        """Move the storages that only offered tensors hold to the free buffers."""
        groups = _by_storage(self._offered)
        self._offered = []  # each tensor is now referenced by its group alone
        for group in groups:
            if _unshared(group):
                self._keep(group[0])
            else:
                self._offered.extend(group)

    def _keep(self, t: Tensor) -> None:
        """Keep the storage of ``t`` if it serves more upcoming requests than the free
        buffers already do (else the allocator frees it)."""
        storage = t.untyped_storage()
        numel = storage.nbytes() // t.element_size()
        if numel * t.element_size() + self.free_bytes > self.max_bytes:
            return
        flat = torch.empty(0, dtype=t.dtype, device=t.device).set_(storage, 0, (numel,))
        if self._wanted(flat):
            self._free.append(flat)

    def _wanted(self, b: Tensor) -> bool:
        """Whether ``b`` serves a request of this pass or the last (the next pass asks for
        the same) that no free buffer serves yet: at most one buffer per request."""
        served = [r for r in self._pending + self._asked if _fits(b, r)]
        covered = [f for f in self._free if any(_fits(f, r) for r in served)]
        return len(served) > len(covered)

    def empty(self, shape: tuple[int, ...] | torch.Size, like: Tensor) -> Tensor:
        """An uninitialised contiguous tensor of ``shape`` and ``like``'s dtype and device:
        the smallest free buffer that holds it and is at most twice as large, else new
        memory (offered back once the pass is done with it)."""
        numel = math.prod(shape)
        if (
            not self.max_bytes
            or like.device.type != "cpu"  # device allocators (CUDA's) cache blocks already
            or numel * like.element_size() < MIN_BYTES
        ):
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        request = (numel, like.dtype, like.device)
        self._asked.append(request)
        if request in self._pending:  # expected: no longer upcoming
            self._pending.remove(request)
        if self._offered:
            self._collect()
        best = None
        for i, b in enumerate(self._free):
            if (
                b.dtype == like.dtype
                and b.device == like.device
                and numel <= b.numel() <= 2 * numel
                and (best is None or b.numel() < self._free[best].numel())
            ):
                best = i
        if best is None:
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        self.reused += 1
        return self._free.pop(best)[:numel].view(shape)

    def finish(self) -> None:
        """End of a pass: keep what is free now (the last calls' caches are dropped after
        it: their offers are collected when the next pass begins)."""
        self._collect()

    def begin(self) -> None:
        """Start of a pass: the last pass's requests are the upcoming ones; keep the
        buffers that serve them, free the others, forget offers still in use."""
        self._pending, self._asked = self._asked, []
        free, self._free = self._free, []
        for b in sorted(free, key=lambda b: b.numel()):
            if self._wanted(b):
                self._free.append(b)
        self._collect()
        self._offered = []


def _fits(buffer: Tensor, request: Request) -> bool:
    """Whether ``buffer`` serves ``request``: same dtype and device, at most twice as large."""
    n, dtype, device = request
    return buffer.dtype == dtype and buffer.device == device and n <= buffer.numel() <= 2 * n


def _by_storage(tensors: list[Tensor]) -> list[list[Tensor]]:
    """``tensors`` grouped by their storage (a function: no loop name outlives it)."""
    groups: dict[int, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    return list(groups.values())


def _unshared(group: list[Tensor]) -> bool:
    """Whether the tensors of ``group`` (one storage) and the bases they view are all that
    refers to their storage, and nothing but ``group`` refers to them."""
    bases: set[int] = set()
    for i in range(len(group)):
        if sys.getrefcount(group[i]) != 2:  # the list and getrefcount's argument
            return False
        if _extra_base(group, i) and id(group[i]._base) not in bases:
            if sys.getrefcount(group[i]._base) != 2:  # held by its views alone
                return False
            bases.add(id(group[i]._base))
    # the storage: each tensor, each base, and the temporary untyped_storage() object
    return _use_count(group[0].untyped_storage()._cdata) == len(group) + len(bases) + 1


def _extra_base(group: list[Tensor], i: int) -> bool:
    """Whether ``group[i]`` views a base that is not in ``group``."""
    base = group[i]._base
    return base is not None and not any(base is t for t in group)


_WORKSPACES: weakref.WeakKeyDictionary[nn.Module, Workspace] = weakref.WeakKeyDictionary()
_CURRENT: ContextVar[Workspace | None] = ContextVar("hbpkit_workspace", default=None)


def workspace_for(module: nn.Module, max_bytes: int) -> Workspace:
    """The workspace of passes started by the loss ``module`` (made on first use)."""
    ws = _WORKSPACES.get(module)
    if ws is None or ws.max_bytes != max_bytes:
        ws = _WORKSPACES[module] = Workspace(max_bytes)
    ws.begin()
    return ws


@contextmanager
def scoped(var: ContextVar, value: object) -> Iterator[None]:
    """``var`` set to ``value`` while the block runs (the pass's workspace, result pool)."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def active(ws: Workspace | None) -> AbstractContextManager[None]:
    """Make ``ws`` the workspace :func:`empty` draws from while the block runs."""
    return scoped(_CURRENT, ws)


def empty(shape: tuple[int, ...] | torch.Size, like: Tensor) -> Tensor:
    """Memory for a rule's result of ``shape`` (dtype and device of ``like``): from the
    active pass's workspace, else ``torch.empty``."""
    ws = _CURRENT.get()
    if ws is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return ws.empty(shape, like)


_OWNED: ContextVar[tuple[Tensor, ...]] = ContextVar("hbpkit_owned", default=())


def exclusive_factors(messages: dict[Any, Any]) -> list[Tensor]:
    """The tensors ``S`` of the sqrt factors in ``messages`` (``{key: {origin: factor}}``, a
    call's incoming messages) that nothing but this chain of holders refers to (the ownership
    rule in the module docstring): each ``{origin: factor}`` dict is held by ``messages``
    alone, each factor by its dict alone, ``S`` by its factor alone, and its storage by ``S``
    (and, for a view, by a base that only the view holds). CPython reference counts: a loop
    name and ``getrefcount``'s argument add two."""
    owned = []
    for value in messages.values():
        if not isinstance(value, dict) or sys.getrefcount(value) != 3:
            continue
        for f in value.values():
            if type(f) is SqrtFactor and sys.getrefcount(f) == 3 and _sole(f):
                owned.append(f.S)
    return owned


def _sole(f: SqrtFactor) -> bool:
    """Whether ``f.S`` is held by ``f`` alone, with a storage of its own (see above)."""
    S = f.S
    if sys.getrefcount(S) != 3 or _use_count is None:  # f, the name S, the argument
        return False
    if S.requires_grad or S.__dict__ or not _no_overlap(S):
        return False
    holders = 1
    if S._base is not None:
        if sys.getrefcount(S._base) != 2:  # the temporary and the argument
            return False
        holders = 2
    return _use_count(S.untyped_storage()._cdata) == holders + 1  # + the temporary storage


def _no_overlap(t: Tensor) -> bool:
    """Whether no two entries of ``t`` share memory: ordered by stride, every axis steps over
    the whole extent of the smaller ones (true of contiguous tensors and their crops; an
    expanded axis, stride 0, fails)."""
    extent = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride < extent:
            return False
        extent = stride * (size - 1) + extent
    return True


def compacted(
    mat: Tensor, apply: Callable[[Tensor, slice, Tensor], Tensor], buffer_bytes: int = 2**22
) -> Tensor | None:
    """``apply`` on an owned ``[V, N, *f]`` view (a padding's crop of a pooling's factor), its
    result written contiguously into the view's own storage; ``None`` where its layout does
    not allow that (then the caller allocates).

    ``apply(rows, samples, out)`` writes the result for ``rows`` ``[n, *f]`` (the samples
    ``samples`` of one column) into ``out`` and returns it. Rows are processed in order
    through a buffer of about ``buffer_bytes`` (``MemoryPolicy.buffer_bytes``). Source row
    ``r`` (of ``V N``) lies within ``[o + r s, o + (r + 1) s)`` (stride ``s``, offset
    ``o``), destination row ``r`` at ``[r R, (r + 1) R)`` with ``R = prod(f) <= s``: it never
    reaches a later source row, so every row is read before it is overwritten.
    """
    V, N = mat.shape[:2]
    R = mat[0, 0].numel()
    row_stride = mat.stride(1)
    extent = 1 + sum((n - 1) * st for n, st in zip(mat.shape[2:], mat.stride()[2:]))
    storage = mat.untyped_storage()
    if (
        mat.dim() < 3
        or mat.stride(0) != N * row_stride
        or row_stride < R
        or extent > row_stride
        or min(mat.stride()[2:]) < 0
        or storage.nbytes() < mat.numel() * mat.element_size()
        or mat.device.type == "meta"
    ):
        return None
    out = torch.empty(0, dtype=mat.dtype, device=mat.device).set_(storage, 0, mat.shape)
    step = max(1, min(N, buffer_bytes // max(1, R * mat.element_size())))
    buffer = torch.empty(step, *mat.shape[2:], dtype=mat.dtype, device=mat.device)
    for v in range(V):
        for n0 in range(0, N, step):
            samples = slice(n0, min(N, n0 + step))
            rows = apply(mat[v, samples], samples, buffer[: samples.stop - n0])
            out[v, samples].copy_(rows)
    return out


@contextmanager
def owning(tensors: Sequence[Tensor]) -> Iterator[None]:
    """Let rules overwrite ``tensors`` (:func:`exclusive_factors` of the call being
    backpropagated) while the block runs."""
    token = _OWNED.set(tuple(tensors))
    try:
        yield
    finally:
        _OWNED.reset(token)


def may_overwrite(t: Tensor) -> bool:
    """Whether ``t`` is a consumed factor that the running call alone holds (the result of
    ``J^T t`` may be written into it)."""
    return any(t is o for o in _OWNED.get())
