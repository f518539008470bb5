"""hbpkit: block-diagonal curvature in one backward pass (Hessian backpropagation).

>>> from hbpkit import extend, backprop
>>> from hbpkit.extensions import KFAC
"""

from hbpkit import distributed, extensions
from hbpkit.branching import Parallel, Residual, Sum
from hbpkit.curvature.kronecker import KroneckerFactors
from hbpkit.curvature.memory import MemoryPolicy
from hbpkit.engine.context import backprop
from hbpkit.engine.convert import convert
from hbpkit.engine.extend import extend
from hbpkit.modules.tables import register

__version__ = "0.1.0"

__all__ = ["KroneckerFactors", "backprop", "extend", "extensions", "register", "__version__"]
__all__ += ["Parallel", "Residual", "Sum", "convert"]  # branching models
__all__ += ["MemoryPolicy", "distributed"]
__all__ += ["reshaping"]  # MergeBatch, ReducedLoss (imported with the dispatch tables)
