"""Symmetric factors of the GGN per parameter (BackPACK's ``SqrtGGNExact`` / ``SqrtGGNMC``).

For a parameter ``p`` the value is ``V[c, n] = J_{p,n}^T S[c, n]`` ``[C, N, *p.shape]``,
the backpropagated sqrt factor ``S`` of the loss Hessian (eq. 7 without residuals: the
GGN) pulled back through the parameter Jacobian of sample ``n``. So

* ``sum_{c,n} vec(V[c, n]) vec(V[c, n])^T`` is the GGN block of ``p`` (of the loss as
  reduced), and
* ``sum_{c,n} vec(V_p[c, n]) vec(V_q[c, n])^T`` its block between parameters ``p`` and ``q``
  (the full GGN, ``G = V^T V`` with ``V`` the columns ``(c, n)`` stacked over parameters).

``SqrtGGNExact``: ``S`` is the exact factor in BackPACK 1.7.1's layout (``C`` columns for
a ``C``-class cross-entropy: ``sqrt(c p_v) (e_v - p)``, ``sqrt(2 c) I`` for MSE, ``c`` the
reduction factor). ``SqrtGGNMC``: ``C = mc_samples`` Monte-Carlo columns, unbiased for it.
Several losses (or ``C`` columns per position of a loss over positions) stack their columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hbpkit.collectives import ReduceContext, Reduction, all_gather_batch
from hbpkit.core.calls import ModuleCall
from hbpkit.curvature.factors import CoupledFactor, SqrtFactor
from hbpkit.extensions.base import check_mc_samples
from hbpkit.extensions.messages import Factors, SqrtMessage, weighted
from hbpkit.extensions.second_order import SecondOrder
from hbpkit.modules.base import LossRules


@dataclass(frozen=True)
class ColumnMessage(SqrtMessage):
    """The exact GGN's sqrt factors started from the loss Hessian's factor in BackPACK's
    column layout (:meth:`TermRules.terms_factor_columns`); else as :class:`SqrtMessage`."""

    loss_hessian: str = "exact"
    mc_samples: int = 1
    curvature: str = "ggn"

    def initial(self, rules: LossRules, call: ModuleCall, weight: float = 1.0) -> Factors:
        columns = getattr(rules, "signed_sqrt_hessian_columns", None)
        if columns is None:  # a registered loss without the layout: its own exact factor
            return super().initial(rules, call, weight)
        return {call: weighted(columns(call), weight)}


def stack_columns(columns: list[SqrtFactor], call: ModuleCall, name: str) -> Tensor:
    """``[C, N, *p.shape]``: the columns of every origin stacked; refuses signed columns."""
    for c in columns:
        if c.sign is not None and bool((c.sign < 0).any()):
            raise ValueError(
                f"{type(call.module).__name__}.{name}: the loss has negative term weights, so "
                "its GGN factor has negative signs, which [C, N, *p.shape] columns cannot "
                "carry; use DiagGGNExact / GGNMP, or non-negative weights"
            )
    return torch.cat([c.S for c in columns]) if len(columns) > 1 else columns[0].S


class ColumnsInRankOrder(Reduction):
    """``cat_r c_r V_r`` along the samples (dim 1 of ``[C, N_r, *p]``, rank order), with
    ``c_r = sqrt(w_r)`` for factors of the loss's curvature (``scaled``: linear in the loss,
    so its factor scales with the root) or ``1`` for Jacobians (independent of the loss)."""

    def __init__(self, scaled: bool) -> None:
        self.scaled = scaled
        self.formula = "cat_r sqrt(w_r) V_r along N" if scaled else "cat_r V_r along N"

    def check(self, savefield, params, values, ctx: ReduceContext):
        if self.scaled and ctx.weights.loss < 0:
            raise ValueError(f"p.{savefield}: a negative loss weight has no real square root")

    def reduce(self, params, values, ctx: ReduceContext):
        c = ctx.weights.loss**0.5 if self.scaled else 1.0
        return [
            all_gather_batch((v * c).transpose(0, 1), ctx.group).transpose(0, 1) for v in values
        ]


def _columns(rules, call: ModuleCall, name: str, factor) -> SqrtFactor:
    """``[V, N, *p]``: ``J_{p,n}^T S[v, n]`` per column and sample; behind a BatchNorm in
    train mode (a :class:`CoupledFactor`, column ``(v, n)`` spread over every sample ``m``)
    the sum ``sum_m J_{p,m}^T S[(v, n), m]``, the column of sample ``n``'s output."""
    columns = rules.param_jac_t_columns(call, name, factor)
    if not isinstance(factor, CoupledFactor):
        return columns
    N = columns.S.shape[1]
    S = columns.S.sum(1)  # [V N, *p]
    sign = factor.column_signs()
    return SqrtFactor(S.reshape(-1, N, *S.shape[1:]), None if sign is None else sign.reshape(-1, N))


class _SqrtGGN(SecondOrder):
    #: shards hold other samples: their columns stack along N, scaled by ``sqrt(w_r)``
    reduction = ColumnsInRankOrder(scaled=True)

    def required_param_rules(self, rules) -> list[str]:
        return ["param_jac_t_columns"]

    def param_quantity(self, rules, call, name, param, grad_output, message) -> Tensor:
        return stack_columns([_columns(rules, call, name, f) for f in message], call, name)

    # a tied parameter: the columns of its uses are summed (the Jacobian is the sum of the
    # uses' Jacobians), per origin, then stacked
    combines_tied_uses = True

    def required_tied_rules(self, rules) -> list[str]:
        return ["param_jac_t_columns"]

    def tied_contribution(self, rules, call, name, grad_output, factors=None) -> tuple:
        columns = {o: _columns(rules, call, name, f) for o, f in factors.items()}
        return call, name, columns

    def combine_tied(self, contributions: list[tuple]) -> Tensor:
        summed: dict = {}
        for _, _, columns in contributions:
            for origin, c in columns.items():
                prev = summed.get(origin)
                summed[origin] = c if prev is None else prev._replace(S=prev.S + c.S)
        call, name, _ = contributions[0]
        return stack_columns(list(summed.values()), call, name)


class SqrtGGNExact(_SqrtGGN):
    """Exact symmetric factor of the GGN, ``sqrt_ggn_exact``: ``[C, N, *p.shape]``."""

    savefield = "sqrt_ggn_exact"
    message = ColumnMessage()


class SqrtGGNMC(_SqrtGGN):
    """Monte-Carlo factor of the GGN with ``mc_samples`` draws, ``sqrt_ggn_mc``:
    ``[mc_samples, N, *p.shape]``."""

    savefield = "sqrt_ggn_mc"

    def __init__(self, mc_samples: int = 1) -> None:
        self.mc_samples = check_mc_samples(mc_samples)
        self.message = SqrtMessage("sampled", mc_samples, "ggn")

    def __repr__(self) -> str:
        return f"SqrtGGNMC(mc_samples={self.mc_samples})"
