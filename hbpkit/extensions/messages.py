"""What second-order extensions backpropagate, and how (eq. 7 of the paper).

Extensions that need the same message share it: ``KFLR`` and ``DiagGGNExact``
both use the exact GGN sqrt factors, and they are backpropagated once.

Branching graphs (residual blocks, sums; supplement B.3): the Jacobian from a
tensor that feeds several consumers to the loss is the sum over paths, so the
messages arriving from the consumers are merged (:meth:`merge`): sqrt factors
of the same origin (the loss, or the residual of one module) are summed,
factors of different origins stay separate; output-Hessian operators are
replaced by one operator over the recorded DAG that keeps the cross terms
between paths (``graph_curvature.py``).

* :class:`SqrtMessage`: per-sample sqrt factors ``[V, N, *features]`` (``backprop="sqrt"``),
  ``S_x = J^T S_z``, plus one signed diagonal factor per residual (S.9).
* :class:`AverageMessage`: one batch-averaged ``[D, D]`` matrix
  (``backprop="batch-average"``, approximation (9)),
  ``H_x = mean_n J_n^T H_z J_n + sum_n R_n``, or its exact position blocks where
  the dense matrix would exceed the memory budget (``curvature/blocks.py``;
  cross blocks between the branches of a branching graph: ``graph_average.py``).
* :class:`ProductMessage`: an operator, :class:`OutputCurvature`, that applies the
  exact per-sample output curvature to ``[K, N, *features]`` tensors (the
  curvature-matrix products ``GGNMP``, ``HMP``, ``PCHMP``),
  ``H_x m = J^T H_z (J m) + r * m`` per sample (eq. 7, S.9).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hbpkit.core.calls import ModuleCall
from hbpkit.core.graph import PerInput, per_input
from hbpkit.curvature.blocks import PositionBlocks
from hbpkit.curvature.factors import (
    CURVATURE_OPTIONS,
    Factor,
    SqrtFactor,
    add_factors,
    modify_eigenvalues,
)
from hbpkit.extensions.graph_average import DagAverageMessage
from hbpkit.extensions.graph_curvature import DagProductMessage
from hbpkit.modules.base import LossRules, ModuleRules
from hbpkit.modules.losses import keep_marks

ProductRules = ModuleRules | LossRules

CURVATURES = CURVATURE_OPTIONS  # how a residual enters (curvature/factors.py: modify_eigenvalues)


Factors = dict  # origin -> Factor, in order of creation


def weighted(factor: SqrtFactor, weight: float) -> SqrtFactor:
    """The factor of ``weight`` times the curvature of ``factor``."""
    if weight == 1.0:
        return factor
    S = keep_marks(factor.S, factor.S * abs(weight) ** 0.5)
    sign = factor.sign
    if weight < 0:
        sign = -torch.ones(S.shape[:2], dtype=S.dtype, device=S.device) if sign is None else -sign
    return SqrtFactor(S, sign)


class Message:
    """What a second-order extension backpropagates; the flags the pass's plan reads.

    Subclasses implement ``initial`` (at the loss), ``propagate`` (through a module),
    ``merge`` (where a tensor feeds several consumers), ``for_params`` (what the
    parameter rules receive) and ``for_dag`` (the variant for branching graphs).
    """

    batch_averaged = False  # one [D, D] matrix per tensor instead of per-sample factors
    residual_factors = False  # modules add (diagonal) residual factors to the message
    per_input = True  # can send each input of a multi-input call its own message
    several_losses = False  # can take the curvature of losses that join a running pass
    dag_always = False  # the pass runs the for_dag() variant on chains too

    def required_rules(self, rules: ModuleRules, branching: bool = False) -> list[str]:
        """The methods of a module's ``rules`` that ``propagate`` calls (default: none).

        ``branching``: the pass runs the variant :meth:`for_dag` gives.
        """
        return []

    def required_loss_rules(self) -> list[str]:
        """The :class:`LossRules` methods that ``initial`` calls (default: none)."""
        return []


@dataclass(frozen=True)
class SqrtMessage(Message):
    """Per-sample symmetric factors of the output curvature, keyed by their origin."""

    loss_hessian: str  # "exact" | "sampled"
    mc_samples: int
    curvature: str

    several_losses = True  # each loss's factor is one more origin: its columns join

    @property
    def residual_factors(self) -> bool:
        """Whether modules add (diagonal) residual factors: every curvature but the GGN."""
        return self.curvature != "ggn"

    def required_rules(self, rules: ModuleRules, branching: bool = False) -> list[str]:
        """``S_x = J^T S_z`` per factor, plus the residual factor (S.9) of a module nonlinear
        in its input unless the curvature is the GGN."""
        if self.residual_factors and not rules.linear_in_input:
            return ["jac_t_mat_prod", "residual_factor"]
        return ["jac_t_mat_prod"]

    def required_loss_rules(self) -> list[str]:
        """The exact or the sampled symmetric factor of the loss Hessian."""
        return ["sqrt_hessian" if self.loss_hessian == "exact" else "sqrt_hessian_sampled"]

    def initial(self, rules: LossRules, call: ModuleCall, weight: float = 1.0) -> Factors:
        """The loss Hessian's (signed) factor, of ``weight * loss`` (the gradient the loss
        received): ``sqrt(|w|) S`` with the signs times that of ``w``; its origin is the
        loss's call (several losses: several origins)."""
        exact = self.loss_hessian == "exact"
        name = "signed_sqrt_hessian" if exact else "signed_sqrt_hessian_sampled"
        signed = getattr(rules, name, None)
        if signed is not None:  # losses whose terms may carry negative weights
            factor = signed(call) if exact else signed(call, self.mc_samples)
        elif exact:
            factor = SqrtFactor(rules.sqrt_hessian(call))
        else:
            factor = SqrtFactor(rules.sqrt_hessian_sampled(call, self.mc_samples))
        return {call: weighted(factor, weight)}

    def propagate(
        self, rules: ModuleRules, call: ModuleCall, grad_output: Tensor, factors: Factors
    ) -> Factors | PerInput:
        if per_input(rules, call):
            return self._propagate_per_input(rules, call, grad_output, factors)
        out = {origin: rules.jac_t_factor(call, f) for origin, f in factors.items()}
        residual = rules.residual_factor(call, grad_output, self.curvature)  # eq. 7, S.9
        if residual is not None:
            out[call] = residual
        return out

    def _propagate_per_input(
        self, rules: ModuleRules, call: ModuleCall, grad_output: Tensor, factors: Factors
    ) -> PerInput:
        """``J_i^T S`` for each input ``i``; the residual's columns (over all inputs jointly,
        cross terms included) split over the inputs under one origin."""
        slots = rules.input_slots(call)
        out: list[Factors] = [{} for _ in slots]
        for origin, f in factors.items():
            for i, fi in enumerate(rules.jac_t_factor_inputs(call, f)):
                out[i][origin] = fi
        residual = rules.residual_factor_inputs(call, grad_output, self.curvature)
        if residual is not None:
            for i, r in enumerate(residual):
                out[i][call] = r
        return PerInput(slots, out)

    def merge(self, messages: list[Factors], call: ModuleCall) -> Factors:
        """The factors at ``call``'s output from those its consumers sent (same origin: summed)."""
        out = dict(messages[0])
        for factors in messages[1:]:
            for origin, f in factors.items():
                out[origin] = add_factors(out[origin], f, call) if origin in out else f
        return out

    def for_params(self, factors: Factors, call: ModuleCall) -> list[Factor]:
        """What the parameter rules receive: the list of factors."""
        return list(factors.values())

    def for_dag(self) -> SqrtMessage:
        return self


@dataclass(frozen=True)
class AverageMessage(Message):
    """One batch-averaged ``[D, D]`` output curvature (approximation (9), S.11)."""

    loss_hessian: str  # "average" | "sampled"
    mc_samples: int
    curvature: str

    batch_averaged = True  # residuals are summed into the matrix: no residual factors
    per_input = False  # mean_n J_n^T H J_n has cross terms between inputs: not split

    def required_rules(self, rules: ModuleRules, branching: bool = False) -> list[str]:
        """``mean_n J_n^T H J_n`` (9), plus ``sum_n R_n`` (S.11) of a module nonlinear in its
        input unless the curvature is the GGN; in a branching graph also ``J^T`` (the
        cross blocks, ``graph_average.py``)."""
        needed = ["ea_jac_t_mat_jac_prod"]
        if self.curvature != "ggn" and not rules.linear_in_input:
            needed.append("residual_sum")
        if branching:
            needed.append("jac_t_mat_prod")
        return needed

    def required_loss_rules(self) -> list[str]:
        """The batch-summed loss Hessian, or its sampled factor."""
        return ["sum_hessian" if self.loss_hessian == "average" else "sqrt_hessian_sampled"]

    def initial(self, rules: LossRules, call: ModuleCall, weight: float = 1.0) -> Tensor:
        if self.loss_hessian == "average":
            return weight * rules.sum_hessian(call)
        S = rules.sqrt_hessian_sampled(call, self.mc_samples).flatten(2)
        return weight * torch.einsum("vni,vnj->ij", S, S)

    def propagate(
        self,
        rules: ModuleRules,
        call: ModuleCall,
        grad_output: Tensor,
        mat: Tensor | PositionBlocks,
    ) -> Tensor | PositionBlocks:
        """Dense while it fits the memory budget, then exact position blocks (see
        ``curvature/blocks.py``), as the pass's plan decided (``call.plan``)."""
        if call.plan.position_blocks:  # decided by the pass's plan (engine/plan.py)
            out = rules.ea_blocks(call, mat)
        else:
            out = rules.ea_jac_t_mat_jac_prod(call, mat)
        if isinstance(out, PositionBlocks):  # only modules with diagonal residuals give blocks
            if self.curvature != "ggn" and not rules.linear_in_input:
                raw = rules.residual_diag(call, grad_output)
                out = out.add_diagonal(modify_eigenvalues(raw, self.curvature).sum(0))
            return out
        residual = rules.residual_sum(call, grad_output, self.curvature)  # S.11: + sum_n R_n
        return out if residual is None else out + residual

    def merge(self, messages: list[Tensor], call: ModuleCall) -> Tensor:
        raise RuntimeError("chain matrices do not merge: use for_dag() in branching graphs")

    def for_params(self, mat: Tensor, call: ModuleCall) -> Tensor:
        return mat

    def for_dag(self) -> DagAverageMessage:
        """A fresh message for one backward pass through a branching graph (cross blocks)."""
        return DagAverageMessage(self)


class OutputCurvature:
    """The exact curvature of the loss w.r.t. a layer output, applied per sample.

    ``self(M)``: ``[K, N, *features] -> [K, N, *features]``, each ``M[k, n]``
    multiplied by sample ``n``'s curvature ``H_{z_n}`` (the loss Hessian is
    block-diagonal over samples and every module acts per sample). One link per
    module, built during the backward pass and applied afterwards (a CG loop):

    * at the loss (``upstream is None``): ``H_{z_n} m = d2L/dz_n dz_n m``;
    * at the input ``x`` of a module ``z = f(x)`` whose output curvature is
      ``upstream``: ``H_{x_n} m = J_n^T H_{z_n} (J_n m) + r_n * m`` (eq. 7), with the
      residual ``r_n = phi''(x_n) * dz_n`` of an elementwise module (S.9), modified
      per sample by the curvature option (``None``: dropped, the GGN).

    It holds the module calls it needs (kept past the backward pass, see
    :meth:`ModuleCall.keep`) and its upstream link: nothing else holds it.
    """

    __slots__ = ("rules", "call", "upstream", "residual", "weight")

    def __init__(
        self,
        rules: ProductRules,
        call: ModuleCall,
        upstream: OutputCurvature | None = None,
        residual: Tensor | None = None,
        weight: float = 1.0,
    ) -> None:
        self.weight = weight  # of the loss (at the loss only)
        self.rules = rules
        self.call = call
        self.upstream = upstream
        self.residual = residual
        call.keep()

    def __call__(self, mat: Tensor) -> Tensor:
        if self.upstream is None:
            out = self.rules.hessian_mat_prod(self.call, mat)
            return out if self.weight == 1.0 else self.weight * out
        rules, call = self.rules, self.call
        out = rules.jac_t_mat_prod(call, self.upstream(rules.jac_mat_prod(call, mat)))
        if self.residual is not None:
            out = out + self.residual * mat
        return out


@dataclass(frozen=True)
class ProductMessage(Message):
    """The exact output curvature as an operator (:class:`OutputCurvature`), no factors.

    Messages of different curvatures share their links where they coincide: the
    first links from the loss down to the first module with a (non-zero)
    residual are the same object for GGN, Hessian and PCH, and so is every link
    built from the same upstream link without a residual.
    """

    curvature: str

    # the DAG form (graph_curvature.py) costs the same Jacobian products on a chain, and
    # takes every loss that joins the pass (each one more curvature source of the graph)
    dag_always = True
    several_losses = True

    def required_rules(self, rules: ModuleRules, branching: bool = False) -> list[str]:
        """``J^T H_z (J m)`` (eq. 7), plus the residual ``r * m`` (S.9) of a module nonlinear
        in its input unless the curvature is the GGN."""
        needed = ["jac_mat_prod", "jac_t_mat_prod"]
        if self.curvature != "ggn" and not rules.linear_in_input:
            needed.append("residual_mat_prod")
        return needed

    def required_loss_rules(self) -> list[str]:
        """The per-sample loss Hessian applied to a matrix."""
        return ["hessian_mat_prod"]

    def initial(self, rules: LossRules, call: ModuleCall, weight: float = 1.0) -> OutputCurvature:
        if type(rules).hessian_mat_prod is LossRules.hessian_mat_prod:
            raise NotImplementedError(f"{type(rules).__name__} does not implement hessian_mat_prod")
        key = ("product_link", None, weight)
        if key not in call.cache:
            call.cache[key] = OutputCurvature(rules, call, weight=weight)
        return call.cache[key]

    def propagate(
        self, rules: ModuleRules, call: ModuleCall, grad_output: Tensor, op: OutputCurvature
    ) -> OutputCurvature:
        residual = product_residual(rules, call, grad_output, self.curvature)
        key = ("product_link", id(op), None if residual is None else self.curvature)
        if key not in call.cache:  # the cache lives during this call's hook: ids are unique
            call.cache[key] = OutputCurvature(rules, call, op, residual)
        return call.cache[key]

    def merge(self, messages: list[OutputCurvature], call: ModuleCall) -> OutputCurvature:
        raise RuntimeError("chain products do not merge: use for_dag() in branching graphs")

    def for_params(self, op: OutputCurvature, call: ModuleCall) -> OutputCurvature:
        return op

    def for_dag(self) -> DagProductMessage:
        """A fresh message for one backward pass through a branching graph."""
        return DagProductMessage(self.curvature, product_residual)


def product_residual(
    rules: ModuleRules, call: ModuleCall, grad_output: Tensor, curvature: str
) -> Callable[[Tensor], Tensor] | None:
    """The residual ``m(R_n)`` of a product link as ``residual * mat`` (``None``: dropped
    or zero, e.g. a saturated or piecewise-linear region: a GGN link); the raw
    residual is cached per call (see ``ModuleRules.residual_mat_prod``)."""
    return rules.residual_mat_prod(call, grad_output, curvature)
