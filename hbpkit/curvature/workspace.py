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
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor, nn

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
def active(ws: Workspace | None) -> Iterator[None]:
    """Make ``ws`` the workspace :func:`empty` draws from while the block runs."""
    token = _CURRENT.set(ws)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def empty(shape: tuple[int, ...] | torch.Size, like: Tensor) -> Tensor:
    """Memory for a rule's result of ``shape`` (dtype and device of ``like``): from the
    active pass's workspace, else ``torch.empty``."""
    ws = _CURRENT.get()
    if ws is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return ws.empty(shape, like)
