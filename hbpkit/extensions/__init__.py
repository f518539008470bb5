"""The quantities hbpkit computes; names and savefields follow BackPACK."""

from hbpkit.extensions.base import Extension
from hbpkit.extensions.curvmatprod import GGNMP, HMP, PCHMP
from hbpkit.extensions.diagonal import DiagGGNExact, DiagGGNMC, DiagHessian
from hbpkit.extensions.first_order import BatchGrad, BatchL2, SumGradSquared, Variance
from hbpkit.extensions.jacobian import BatchJacobian
from hbpkit.extensions.kronecker import HBP, KFAC, KFLR, KFRA
from hbpkit.extensions.roots import EmpiricalKFAC, InputCovariance, KroneckerRoots
from hbpkit.extensions.sqrt_ggn import SqrtGGNExact, SqrtGGNMC

#: every extension class hbpkit provides, one savefield each: the one registry that
#: savefield lookups (``hbpkit.distributed.all_reduce_quantities``) go through
EXTENSIONS: tuple[type[Extension], ...] = (
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    KFAC,
    KFLR,
    KFRA,
    HBP,
    EmpiricalKFAC,
    InputCovariance,
    KroneckerRoots,
    GGNMP,
    HMP,
    PCHMP,
    SumGradSquared,
    BatchGrad,
    BatchL2,
    Variance,
    SqrtGGNExact,
    SqrtGGNMC,
    BatchJacobian,
)

__all__ = [
    "EXTENSIONS",
    "GGNMP",
    "HBP",
    "HMP",
    "KFAC",
    "KFLR",
    "KFRA",
    "PCHMP",
    "BatchGrad",
    "BatchJacobian",
    "BatchL2",
    "DiagGGNExact",
    "DiagGGNMC",
    "DiagHessian",
    "EmpiricalKFAC",
    "Extension",
    "InputCovariance",
    "KroneckerRoots",
    "SqrtGGNExact",
    "SqrtGGNMC",
    "SumGradSquared",
    "Variance",
]
