"""What second-order extensions backpropagate, and how (eq. 7 of the paper).

Extensions that need the same message share it: ``KFLR`` and ``DiagGGNExact``
both use the exact GGN sqrt factors, and they are backpropagated once.

* :class:`SqrtMessage`: per-sample sqrt factors ``[V, N, *features]`` (``backprop="sqrt"``),
  ``S_x = J^T S_z``, plus one signed diagonal factor per residual (S.9).
* :class:`AverageMessage`: one batch-averaged ``[D, D]`` matrix
  (``backprop="batch-average"``, approximation (9)),
  ``H_x = mean_n J_n^T H_z J_n + sum_n R_n``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hbpkit.calls import ModuleCall
from hbpkit.modules.base import DiagonalFactor, Factor, LossRules, ModuleRules, SqrtFactor

CURVATURES = ("ggn", "hessian", "pch-abs", "pch-clip")


def modify_residual(residual: Tensor, curvature: str) -> Tensor | None:
    """The residual term as the curvature keeps it: dropped, exact, ``|r|`` or ``max(r, 0)``.

    PCH (Chen et al. 2018) modifies each sample's residual ``diag[phi''(x_n) * dz_n]``.
    """
    if curvature == "ggn":
        return None
    if curvature == "hessian":
        return residual
    if curvature == "pch-abs":
        return residual.abs()
    if curvature == "pch-clip":
        return residual.clamp(min=0)
    raise ValueError(f"unknown curvature {curvature!r}; choose from {CURVATURES}")


@dataclass(frozen=True)
class SqrtMessage:
    """Per-sample symmetric factors of the output curvature."""

    loss_hessian: str  # "exact" | "sampled"
    mc_samples: int
    curvature: str

    def initial(self, rules: LossRules, call: ModuleCall) -> list[SqrtFactor]:
        if self.loss_hessian == "exact":
            return [SqrtFactor(rules.sqrt_hessian(call))]
        return [SqrtFactor(rules.sqrt_hessian_sampled(call, self.mc_samples))]

    def propagate(
        self, rules: ModuleRules, call: ModuleCall, grad_output: Tensor, factors: list[Factor]
    ) -> list[Factor]:
        out = [rules.jac_t_factor(call, f) for f in factors]
        if self.curvature != "ggn" and not rules.linear_in_input:
            residual = modify_residual(rules.residual_diag(call, grad_output), self.curvature)
            out.append(DiagonalFactor.from_values(residual))
        return out


@dataclass(frozen=True)
class AverageMessage:
    """One batch-averaged ``[D, D]`` output curvature (approximation (9), S.11)."""

    loss_hessian: str  # "average" | "sampled"
    mc_samples: int
    curvature: str

    def initial(self, rules: LossRules, call: ModuleCall) -> Tensor:
        if self.loss_hessian == "average":
            return rules.sum_hessian(call)
        S = rules.sqrt_hessian_sampled(call, self.mc_samples).flatten(2)
        return torch.einsum("vni,vnj->ij", S, S)

    def propagate(
        self, rules: ModuleRules, call: ModuleCall, grad_output: Tensor, mat: Tensor
    ) -> Tensor:
        out = rules.ea_jac_t_mat_jac_prod(call, mat)
        if self.curvature != "ggn" and not rules.linear_in_input:
            residual = modify_residual(rules.residual_diag(call, grad_output), self.curvature)
            out = out + torch.diag(residual.flatten(1).sum(0))
        return out
