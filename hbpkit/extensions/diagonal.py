"""Diagonals of the GGN and of the Hessian, from backpropagated sqrt factors.

``diag(sum_n sum_v sign (J_p^T s_{v,n})^2)`` for the parameter Jacobian ``J_p``:
exact for ``DiagGGNExact`` / ``DiagHessian`` (whose residual factors carry signs),
a Monte-Carlo estimate for ``DiagGGNMC``.
"""

from __future__ import annotations

from torch import Tensor

from hbpkit.collectives import WeightedSum
from hbpkit.curvature.factors import CoupledFactor, SqrtFactor
from hbpkit.curvature.memory import check_dense_budget
from hbpkit.extensions.base import check_mc_samples
from hbpkit.extensions.coupled import coupled_columns, coupled_diag
from hbpkit.extensions.forward_diagonal import param_diag_forward, prefers_forward
from hbpkit.extensions.messages import ProductMessage, SqrtMessage
from hbpkit.extensions.second_order import SecondOrder


class _Diagonal(SecondOrder):
    reduction = WeightedSum("w_r")  # linear in the loss: exact

    def _with_own_residual(self, rules) -> bool:
        """Whether the parameter's own second-order term of eq. 7 enters (a module nonlinear
        in its parameters, for a curvature other than the GGN)."""
        return not rules.linear_in_params and self.message.curvature != "ggn"

    def required_param_rules(self, rules) -> list[str]:
        if self._with_own_residual(rules):
            return ["param_diag", "param_residual_diag"]
        return ["param_diag"]

    @property
    def forward_message(self) -> ProductMessage | None:
        """The message of the forward form (``forward_diagonal.py``) at the calls the pass
        offers it: the Hessian's, whose residual columns multiply behind convolutions (the
        GGN's few columns, or sampled ones, never lose to it)."""
        message = self.message
        if message.loss_hessian != "exact" or message.curvature == "ggn":
            return None
        return ProductMessage(message.curvature)

    def param_quantity(
        self, rules, call, name, param, grad_output, message, curvature=None
    ) -> Tensor:
        """``curvature``: the exact output curvature where the pass offers the forward form."""
        coupled = [f for f in message if isinstance(f, CoupledFactor)]  # behind a train-mode
        if curvature is not None and prefers_forward(rules, call, message, curvature):
            diag = param_diag_forward(rules, call, name, curvature)
        elif coupled:  # BatchNorm: columns summed over the samples before squaring
            per_sample = [f for f in message if not isinstance(f, CoupledFactor)]
            diag = sum(coupled_diag(rules, call, name, f) for f in coupled)
            if per_sample:
                diag = diag + rules.param_diag(call, name, per_sample)
        else:
            diag = rules.param_diag(call, name, message)
        if self._with_own_residual(rules):  # + diag(sum_n sum_k d2z_nk/dp2 dz_nk)
            diag = diag + rules.param_residual_diag(call, name, grad_output, self.message.curvature)
        return diag

    # a tied parameter (several uses): the columns of each origin are summed over the
    # uses before they are squared, sum_{v,n} sign (sum_c J_{c,n}^T s_{c,v,n})**2 (eq. 7).
    # Exact for the GGN; the Hessian of tied uses also has mixed second derivatives of a
    # later use in its parameter and its input (cross blocks), which this does not hold
    @property
    def combines_tied_uses(self) -> bool:
        return self.message.curvature == "ggn"

    def required_tied_rules(self, rules) -> list[str]:
        needed = ["param_jac_t_columns"]
        return needed + (["param_residual_diag"] if self._with_own_residual(rules) else [])

    def tied_contribution(self, rules, call, name, grad_output, factors=None) -> tuple:
        columns = {}
        for origin, f in factors.items():
            check_dense_budget(
                call,
                (f.dense().S.shape[0], grad_output.shape[0], *call.param(name).shape),
                grad_output.dtype,
                "The columns of a tied parameter's use",
                "use BatchGrad for tied parameters, or untie them",
            )
            if isinstance(f, CoupledFactor):  # [C, 1, *p]: summed over the samples
                q = coupled_columns(rules, call, name, f).unsqueeze(1)
                sign = None if f.sign is None else f.sign[:, :1]
                columns[origin] = SqrtFactor(q, sign)
            else:
                columns[origin] = rules.param_jac_t_columns(call, name, f)
        residual = None
        if self._with_own_residual(rules):
            residual = rules.param_residual_diag(call, name, grad_output, self.message.curvature)
        return columns, residual

    def combine_tied(self, contributions: list[tuple]) -> Tensor:
        summed: dict = {}
        diag = 0
        for columns, residual in contributions:
            for origin, c in columns.items():
                if origin not in summed:
                    summed[origin] = c
                    continue
                a = summed[origin]
                if a.S.shape != c.S.shape:  # one use behind a train-mode BatchNorm: column
                    a, c = _as_coupled(a), _as_coupled(c)  # (v, n) of the other is (v N + n)
                summed[origin] = a._replace(S=a.S + c.S)
            if residual is not None:
                diag = diag + residual
        for c in summed.values():
            diag = diag + c.signed_square().sum((0, 1))
        return diag


def _as_coupled(c: SqrtFactor) -> SqrtFactor:
    """Per-sample parameter columns ``[V, N, *p]`` as coupled ones ``[V N, 1, *p]``."""
    V, N = c.S.shape[:2]
    sign = None if c.sign is None else c.sign.reshape(V * N, 1)
    return SqrtFactor(c.S.reshape(V * N, 1, *c.S.shape[2:]), sign)


class DiagGGNExact(_Diagonal):
    """Diagonal of the exact generalized Gauss-Newton matrix, ``diag_ggn_exact``: ``p.shape``."""

    savefield = "diag_ggn_exact"
    message = SqrtMessage("exact", 1, "ggn")


class DiagGGNMC(_Diagonal):
    """Monte-Carlo estimate of the GGN diagonal with ``mc_samples`` draws, ``diag_ggn_mc``."""

    savefield = "diag_ggn_mc"

    def __init__(self, mc_samples: int = 1) -> None:
        self.mc_samples = check_mc_samples(mc_samples)
        self.message = SqrtMessage("sampled", mc_samples, "ggn")

    def __repr__(self) -> str:
        return f"DiagGGNMC(mc_samples={self.mc_samples})"


class DiagHessian(_Diagonal):
    """Diagonal of the exact Hessian, ``diag_h``: ``p.shape`` (residuals of S.9 included)."""

    savefield = "diag_h"
    message = SqrtMessage("exact", 1, "hessian")
