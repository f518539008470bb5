"""hbpkit: block-diagonal curvature in one backward pass (Hessian backpropagation).

>>> from hbpkit import extend, backprop
>>> from hbpkit.extensions import KFAC
"""

from hbpkit import distributed, extensions
from hbpkit.context import backprop
from hbpkit.dispatch import register
from hbpkit.extend import extend
from hbpkit.fx import convert
from hbpkit.kronecker import KroneckerFactors

__version__ = "0.1.0"

__all__ = ["KroneckerFactors", "backprop", "extend", "extensions", "register", "__version__"]
__all__ += ["convert"]  # branching models (hbpkit.nn: Sum, Residual, Parallel)
__all__ += ["distributed"]
