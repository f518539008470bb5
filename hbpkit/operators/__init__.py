"""Curvature over the flattened parameters as operators: the full GGN and Hessian (cross
blocks included), the block-diagonal products of a backward pass, top-k eigenpairs by
Lanczos, and scipy ``LinearOperator`` views (docs/user-guide.md, For client libraries)."""

from hbpkit.operators.base import CurvatureOperator
from hbpkit.operators.blocks import BlockDiagonalOperator
from hbpkit.operators.full import GGNOperator, HessianOperator
from hbpkit.operators.lanczos import lanczos_eigh
from hbpkit.operators.scipy_interop import to_scipy

__all__ = [
    "BlockDiagonalOperator",
    "CurvatureOperator",
    "GGNOperator",
    "HessianOperator",
    "lanczos_eigh",
    "to_scipy",
]
