"""The quantities hbpkit computes; names and savefields follow BackPACK."""

from hbpkit.extensions.base import Extension
from hbpkit.extensions.curvmatprod import GGNMP, HMP, PCHMP
from hbpkit.extensions.diagonal import DiagGGNExact, DiagGGNMC, DiagHessian
from hbpkit.extensions.first_order import BatchGrad, BatchL2, SumGradSquared, Variance
from hbpkit.extensions.kronecker import HBP, KFAC, KFLR, KFRA
from hbpkit.extensions.roots import EmpiricalKFAC, InputCovariance, KroneckerRoots

__all__ = [
    "GGNMP",
    "HBP",
    "HMP",
    "KFAC",
    "KFLR",
    "KFRA",
    "PCHMP",
    "BatchGrad",
    "BatchL2",
    "DiagGGNExact",
    "DiagGGNMC",
    "DiagHessian",
    "EmpiricalKFAC",
    "Extension",
    "InputCovariance",
    "KroneckerRoots",
    "SumGradSquared",
    "Variance",
]
