"""Batch-averaged backpropagation (KFRA, approximation (9)) through branching graphs.

On a chain one matrix per tensor is backpropagated: ``H_x = mean_n J_n^T H_z J_n
+ sum_n R_n``. Where a tensor ``x`` feeds several consumers whose paths meet
again (a residual block, supplement B.3), the curvature at ``x`` is the sum of
all blocks of the curvature w.r.t. the pending copies of ``x``, cross blocks
included: ``(I + J)^T H (I + J) = H + J^T H J + J^T H + H J``. So, in a
branching graph, each message sent along a link is an :class:`Entry` with its
matrix, and every pair of entries pending at the same time has its cross block
``C(a, b)`` (``[D_a, D_b]``, ``C(a, a) = H_a``):

* where a call's output receives entries ``E``: ``H = sum_{a, b in E} C(a, b)``;
* the entry sent to its input: ``H_x = mean_n J_n^T H J_n + sum_n R_n`` (eq. 9 and
  S.9, as on a chain), and for every other pending entry ``f``:
  ``C(x, f) = mean_n J_n^T sum_{a in E} C(a, f)`` (the residual ``R_n`` is a
  second derivative of this module alone: no cross term).

At batch size 1 every mean is exact, so this is the exact curvature (the
Hessian w.r.t. the joint pending tensors, eq. 7). For ``N > 1`` the diagonal
blocks follow approximation (9) and the cross blocks average the one-sided
products ``mean_n J_n^T C`` (exact when the Jacobians do not depend on the
sample, e.g. linear layers); on a chain there are no cross blocks and this is
eq. 9 / S.11 unchanged.
"""

from __future__ import annotations

from torch import Tensor

from hbpkit.core.calls import ModuleCall
from hbpkit.modules.base import ModuleRules


class Entry:
    """One batch-averaged matrix ``H`` ``[D, D]`` sent to the producer of a tensor."""

    __slots__ = ("H", "pending", "index")

    def __init__(self, H: Tensor, index: int) -> None:
        self.H = H
        self.pending = 0  # links it was sent along and that have not used it yet
        self.index = index  # creation order: cross blocks are stored as C(later, earlier)


class Group:
    """The entries that reached one call's output, and their summed matrix."""

    __slots__ = ("entries", "H")

    def __init__(self, entries: list[Entry], H: Tensor) -> None:
        self.entries = entries
        self.H = H


def mean_jac_t(rules: ModuleRules, call: ModuleCall, mat: Tensor) -> Tensor:
    """``[D_out, D] -> [D_in, D]``: ``mean_n J_n^T mat`` (the same ``mat`` for every sample)."""
    N, out_shape = call.inputs[0].shape[0], call.output_shape[1:]
    cols = mat.T.reshape(mat.shape[1], 1, *out_shape).expand(mat.shape[1], N, *out_shape)
    return rules.jac_t_mat_prod(call, cols).mean(1).reshape(mat.shape[1], -1).T


class DagAverageMessage:
    """:class:`~hbpkit.extensions.messages.AverageMessage` in a branching graph, one pass."""

    def __init__(self, message) -> None:
        self.message = message
        self._cross: dict[tuple[int, int], Tensor] = {}
        self._live: dict[int, Entry] = {}
        self._count = 0

    def _entry(self, H: Tensor) -> Entry:
        self._count += 1
        return Entry(H, self._count)

    def cross(self, a: Entry, b: Entry) -> Tensor:
        """``C(a, b)`` ``[D_a, D_b]``."""
        if a is b:
            return a.H
        if a.index > b.index:
            return self._cross[(a.index, b.index)]
        return self._cross[(b.index, a.index)].T

    def initial(self, rules, call: ModuleCall, weight: float = 1.0) -> Entry:
        return self._entry(self.message.initial(rules, call, weight))

    def delivered(self, entry: Entry, links: int) -> None:
        """``entry`` was sent along ``links`` links (called by the backward pass)."""
        if links:
            entry.pending += links
            self._live[entry.index] = entry

    def merge(self, entries: list[Entry], call: ModuleCall) -> Group:
        H = sum(self.cross(a, b) for a in entries for b in entries)
        return Group(entries, H)

    def for_params(self, value: Entry | Group, call: ModuleCall) -> Tensor:
        return value.H

    def propagate(
        self, rules: ModuleRules, call: ModuleCall, grad_output: Tensor, value: Entry | Group
    ) -> Entry:
        group = value.entries if isinstance(value, Group) else [value]
        for a in group:
            a.pending -= 1
        new = self._entry(self.message.propagate(rules, call, grad_output, value.H))
        for f in list(self._live.values()):
            if f.pending <= 0:
                continue
            C = sum(self.cross(a, f) for a in group)
            self._cross[(new.index, f.index)] = mean_jac_t(rules, call, C)
        for a in group:  # forget what no link waits for
            if a.pending <= 0 and self._live.pop(a.index, None) is not None:
                self._cross = {k: v for k, v in self._cross.items() if a.index not in k}
        return new
