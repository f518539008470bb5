"""A memory budget for the dense matrices some rules must form.

Batch-averaged backpropagation (KFRA, ``HBP(..., backprop="batch-average")``)
carries a dense ``[D, D]`` matrix per layer output, and a diagonal residual
factor becomes a dense ``[D, N, *]`` factor behind a layer that mixes features.
For a convolution output ``D = C * H * W`` can make these enormous; rules call
:func:`check_dense_budget` before allocating and fail early with the size.
"""

from __future__ import annotations

import math

import torch

from hbpkit.core.calls import ModuleCall

#: the largest dense tensor (bytes) a rule may allocate; read at call time, so it can be
#: changed with ``hbpkit.curvature.memory.MAX_DENSE_BYTES = ...``
MAX_DENSE_BYTES = 2**31

EA_ADVICE = (
    "Use a per-sample extension (KFLR, KFAC, DiagGGNExact) instead of batch-averaged "
    "backpropagation (KFRA, HBP(..., backprop='batch-average'))"
)
DIAGONAL_ADVICE = (
    "The diagonal factor is the residual of an activation behind this layer (DiagHessian, "
    "HBP(curvature='hessian' / 'pch-*')); the GGN (DiagGGNExact, curvature='ggn') has none"
)


class DenseBudgetError(MemoryError, NotImplementedError):
    """A rule would allocate a dense tensor above :data:`MAX_DENSE_BYTES`.

    Raised before allocating; also a :class:`NotImplementedError`, since a
    structured form would avoid it.
    """


def check_dense_budget(
    call: ModuleCall, shape: tuple[int, ...] | int, dtype: torch.dtype, what: str, advice: str
) -> None:
    """Raise :class:`DenseBudgetError` if a dense tensor of ``shape`` (or that many entries)
    of ``dtype`` would exceed :data:`MAX_DENSE_BYTES`."""
    numel = shape if isinstance(shape, int) else math.prod(shape)
    nbytes = numel * dtype.itemsize
    if nbytes > MAX_DENSE_BYTES:
        described = "" if isinstance(shape, int) else f" {tuple(shape)} {dtype}"
        raise DenseBudgetError(
            f"{what} through {call.module} needs a dense{described} tensor "
            f"({nbytes / 1e9:.3g} GB), above the budget of {MAX_DENSE_BYTES / 1e9:.3g} GB "
            f"(hbpkit.curvature.memory.MAX_DENSE_BYTES). {advice}, shrink the layer, or raise "
            "the budget"
        )
