"""``scipy.sparse.linalg.LinearOperator`` views of hbpkit's operators (scipy imported lazily).

The view takes and returns float64 numpy arrays, ``[P]`` or ``[P, K]``, as curvlinops'
operators do; the products run in the operator's own dtype and device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # (base imports this module in to_scipy)
    from hbpkit.operators.base import CurvatureOperator


def to_scipy(operator: CurvatureOperator) -> Any:
    """``operator`` (symmetric) as a ``scipy.sparse.linalg.LinearOperator``."""
    try:
        from scipy.sparse.linalg import LinearOperator
    except ImportError as error:  # an optional dependency
        raise ImportError("to_scipy() needs scipy: pip install scipy") from error

    def matmat(X: np.ndarray) -> np.ndarray:
        V = torch.as_tensor(np.asarray(X), dtype=operator.dtype, device=operator.device)
        return (operator @ V).detach().cpu().numpy().astype(np.float64)

    def matvec(x: np.ndarray) -> np.ndarray:
        return matmat(np.asarray(x).reshape(-1))

    return LinearOperator(
        operator.shape,
        matvec=matvec,
        rmatvec=matvec,
        matmat=matmat,
        rmatmat=matmat,
        dtype=np.float64,
    )
