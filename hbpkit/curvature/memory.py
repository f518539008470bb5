"""The memory policy of a backward pass: budgets and chunk sizes of the rules.

Batch-averaged backpropagation (KFRA, ``HBP(..., backprop="batch-average")``)
carries a dense ``[D, D]`` matrix per layer output, and a diagonal residual
factor becomes a dense ``[D, N, *]`` factor behind a layer that mixes features.
For a convolution output ``D = C * H * W`` can make these enormous; rules call
:func:`check_dense_budget` before allocating and fail early with the size.
Other rules work in chunks or buffers of a bounded size. All these bounds are
fields of one :class:`MemoryPolicy`, passed as
``backprop(*extensions, memory=MemoryPolicy(...))``; the backward pass gives it to
every call it takes (``ModuleCall.memory``) and rules read it with :func:`policy_of`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from hbpkit.core.calls import ModuleCall, describe


@dataclass(frozen=True)
class MemoryPolicy:
    """Budgets and chunk sizes of one backward pass (bytes unless said otherwise).

    None of them changes a result: they choose between exact ways of computing it,
    or refuse (:class:`DenseBudgetError`) before allocating too much.
    """

    max_dense_bytes: int = 2**31
    """The largest dense tensor a rule may allocate (batch-averaged matrices of KFRA,
    densified diagonal or local factors). Larger ones are refused up front with
    :class:`DenseBudgetError`, or carried as exact position blocks where a module can;
    2 GiB keeps a pass within the memory of a workstation."""

    chunk_bytes: int = 2**27
    """Memory of one chunk of per-sample, per-column parameter derivatives of a
    convolution (the weight diagonal of grouped and transposed convolutions, processed
    in chunks over the sqrt-factor columns) and of one chunk of gathered position blocks
    (exact ``J^T H J`` blocks of a convolution). 128 MiB: large enough that the
    products stay efficient, small next to :attr:`max_dense_bytes`."""

    buffer_bytes: int = 2**22
    """A reused buffer of products that are reduced at once (the weight diagonal of a
    convolution from its unfolded input), kept small to stay in cache (4 MiB)."""

    stack_min_patch: int = 128
    """Entries of a convolution patch (``C_in/groups * prod(k)``) from which the ``V``
    columns of a sample are stacked into one product for the weight diagonal. Stacking
    copies the factor; measured on the table S.2 convolutions, that pays off only for
    patches of at least this many entries."""

    local_factors: bool = True
    """Use local factors at all (``curvature/local.py``); ``False``: diagonal
    factors are densified behind convolutions (within :attr:`max_dense_bytes`)."""

    local_chunk_bytes: int = 2**24
    """The largest intermediate one chunk of local factor columns may need (the
    consumers, ``param_diag`` and ``kron_from_sqrt`` of a convolution, sum over chunks).
    16 MiB: below glibc's largest mmap threshold (32 MiB), so the chunk loop's intermediates,
    freed chunk after chunk, come back from the heap instead of as fresh pages (measured:
    DiagHessian on the table S.2 CNN and c3d3 at batch 16, 128 MiB -> 16 MiB: 13.4 -> 7.3 s
    and 19.3 -> 12.1 s, minor page faults 5.8 M -> 1.2 M and 6.1 M -> 0.7 M; 8 MiB was
    slower on c3d3; see ``docs/benchmarks.md``)."""

    local_store_bytes: int = 2**28
    """A lazily backpropagated local factor is materialised when all its columns fit in
    this many bytes (later consumers then need not recompute its pending steps)."""

    scatter_cost: int = 40
    """Measured cost of one random index addition in streamed entries (a number, not
    bytes): with ``K`` window entries the strided form of
    ``MaxPoolRules.ea_jac_t_mat_jac_prod`` streams ``K^2 (N + 3)`` entries per pair of
    outputs, the sample loop ``N`` random additions; the cheaper one is taken."""

    workspace_bytes: int = 0
    """The most memory a pass keeps in its workspace of reused buffers, between its
    calls and for the next pass from the same loss (``curvature/workspace.py``): large
    dead messages are reused instead of faulting in fresh pages (on the CPU). Off
    (``0``) by default: a kept buffer waits for its next use, so the peak grows (measured
    on table S.2 after consumed factors are overwritten in place and convolutions work in
    chunks: fewer page faults from the second pass on, 20 to 70 % more peak memory; see
    ``docs/benchmarks.md``); ``2**30`` turns it on."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in (bool, "bool"):
                if not isinstance(value, bool):
                    raise TypeError(f"MemoryPolicy.{f.name} must be a bool, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"MemoryPolicy.{f.name} must be a non-negative int, got {value!r}")


#: the policy of rules called outside a backward pass (``call.memory`` is ``None``)
DEFAULT_POLICY = MemoryPolicy()

#: how to raise the dense budget, for error messages
RAISE_BUDGET = "backprop(..., memory=MemoryPolicy(max_dense_bytes=...))"


def policy_of(call: ModuleCall | None) -> MemoryPolicy:
    """The :class:`MemoryPolicy` of the backward pass that took ``call`` (else the default)."""
    memory = None if call is None else call.memory
    return DEFAULT_POLICY if memory is None else memory


EA_ADVICE = (
    "Use a per-sample extension (KFLR, KFAC, DiagGGNExact) instead of batch-averaged "
    "backpropagation (KFRA, HBP(..., backprop='batch-average'))"
)
DIAGONAL_ADVICE = (
    "The diagonal factor is the residual of an activation behind this layer (DiagHessian, "
    "HBP(curvature='hessian' / 'pch-*')); the GGN (DiagGGNExact, curvature='ggn') has none"
)


class DenseBudgetError(MemoryError, NotImplementedError):
    """A rule would allocate a dense tensor above :attr:`MemoryPolicy.max_dense_bytes`.

    Raised before allocating; also a :class:`NotImplementedError`, since a
    structured form would avoid it.
    """


def check_dense_budget(
    call: ModuleCall, shape: tuple[int, ...] | int, dtype: torch.dtype, what: str, advice: str
) -> None:
    """Raise :class:`DenseBudgetError` if a dense tensor of ``shape`` (or that many entries)
    of ``dtype`` would exceed the ``max_dense_bytes`` of ``call``'s :class:`MemoryPolicy`."""
    numel = shape if isinstance(shape, int) else math.prod(shape)
    nbytes = numel * dtype.itemsize
    budget = policy_of(call).max_dense_bytes
    if nbytes > budget:
        described = "" if isinstance(shape, int) else f" {tuple(shape)} {dtype}"
        raise DenseBudgetError(
            f"{what} through {describe(call.module)} needs a dense{described} tensor "
            f"({nbytes / 1e9:.3g} GB), above the budget of {budget / 1e9:.3g} GB "
            f"(MemoryPolicy.max_dense_bytes). {advice}, shrink the layer, or raise "
            f"the budget with {RAISE_BUDGET}"
        )
