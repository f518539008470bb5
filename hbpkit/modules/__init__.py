"""Derivative rules, one file per family of modules.

Each rules object implements the Jacobian products, residuals and parameter
derivatives of one module type (see :class:`ModuleRules`); the extension
families map module types to these objects (``hbpkit/extensions``).
"""

from hbpkit.curvature.factors import DiagonalFactor, SqrtFactor
from hbpkit.modules.activations import ACTIVATIONS, ElementwiseRules, IdentityRules
from hbpkit.modules.base import LossRules, ModuleRules, UnsupportedRules
from hbpkit.modules.linear import LinearRules
from hbpkit.modules.sum import SumRules
from hbpkit.modules.tables import (
    BACKPROPAGATABLE,
    FIRST_ORDER,
    PARAMETRIC,
    SECOND_ORDER,
    is_registered,
    register,
)

__all__ = [
    "ACTIVATIONS",
    "DiagonalFactor",
    "BACKPROPAGATABLE",
    "PARAMETRIC",
    "ElementwiseRules",
    "IdentityRules",
    "LinearRules",
    "LossRules",
    "ModuleRules",
    "SqrtFactor",
    "SumRules",
    "FIRST_ORDER",
    "SECOND_ORDER",
    "UnsupportedRules",
    "is_registered",
    "register",
]
