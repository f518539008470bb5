"""The roots of the Kronecker factors, and the input covariance alone.

* :class:`KroneckerRoots` (``p.kronecker_roots``): per ``Linear`` / ``Conv1d/2d/3d``
  parameter, the tall matrices whose products are the Kronecker factors, so an
  optimizer can work in the ``b x b`` sample space (ISAAC eq. 20, the Woodbury
  natural gradient of the FOOF paper, appendix I) without forming ``n x n`` or
  ``m x m`` matrices.
* :class:`InputCovariance` (``p.input_covariance``): ``A = a^T a / b`` only (FOOF).
* :class:`EmpiricalKFAC` (``p.kfac_empirical``): Kronecker factors with the empirical
  Fisher's output factor, ``G = g_bar^T g_bar`` from the gradients of the true labels.

Relation to ``KFAC`` / ``KFLR`` (docs/user-guide.md, Conventions; tested): same ``kfac_approx``
and, for ``"sampled"``, the same draw (both extensions in one ``backprop(...)`` share
the backpropagated factors), ``p.kflr == (g_bar^T g_bar, a^T a / b)`` for
``KroneckerRoots("exact")`` and ``p.kfac == ...`` for ``KroneckerRoots("sampled")``.
Row layout and the ``"expand"`` / ``"reduce"`` maps: ``hbpkit/modules/kronecker_roots.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from hbpkit.collectives import (
    KroneckerFactorwise,
    ReduceContext,
    Reduction,
    WeightedSum,
    all_gather_batch,
    count_device,
)
from hbpkit.core.calls import ModuleCall
from hbpkit.curvature.kronecker import KroneckerFactors
from hbpkit.extensions.base import Extension, check_choice, check_mc_samples
from hbpkit.extensions.kronecker import KFAC_APPROXES, as_kronecker_factors
from hbpkit.extensions.messages import Message, SqrtMessage
from hbpkit.modules.base import LossRules
from hbpkit.modules.kronecker_roots import reduction_scale
from hbpkit.modules.tables import FIRST_ORDER, SECOND_ORDER

ROOT_LOSS_HESSIANS = ("exact", "sampled", "empirical", None)


@dataclass(frozen=True)
class EmpiricalMessage(Message):
    """Backpropagates nothing but the loss's reduction factor ``c`` (``L = c sum_n l_n``)."""

    # required_rules / required_loss_rules: none (the factor is read from the loss module)

    def initial(self, rules: LossRules, call: ModuleCall, weight: float = 1.0) -> float:
        return weight * reduction_scale(call)  # of w * loss

    def propagate(self, rules, call: ModuleCall, grad_output: Tensor, scale: float) -> float:
        return scale

    def merge(self, messages: list[float], call: ModuleCall) -> float:
        return messages[0]  # one loss: every path carries the same factor

    def for_params(self, scale: float, call: ModuleCall) -> float:
        return scale

    def for_dag(self) -> EmpiricalMessage:
        return self


class FactorRoots(NamedTuple):
    """Roots of one parameter's Kronecker factors (rows: samples, and positions for ``expand``).

    Attributes:
        a: layer inputs ``[b, n]`` (unfolded patches for a convolution, a trailing
            column of ones if asked for), ``A = a^T a / b``; ``None`` for a bias.
        g: gradients of the loss at the layer output, same rows as ``a``, ``[b, m]``;
            for ``kfac_approx="expand"`` ``g^T a`` is the weight's gradient.
        g_bar: output-side roots ``[r * b, m]``, ``G = g_bar^T g_bar``; rows
            ``(v, n[, t])`` for the ``r`` columns ``v`` of the loss-Hessian factor
            (``r = 1`` for ``"empirical"``); ``None`` without ``loss_hessian``.
        positions: ``T`` (``P`` for a convolution) rows per sample in ``a`` and ``g``
            (1 for ``"reduce"``).
    """

    a: Tensor | None
    g: Tensor
    g_bar: Tensor | None
    positions: int

    def input_factor(self) -> Tensor | None:
        """``A = a^T a / b`` ``[n, n]`` (``None`` for a bias)."""
        if self.a is None:
            return None
        scaled = self.a / math.sqrt(self.a.shape[0])
        return scaled.T @ scaled

    def output_factor(self) -> Tensor:
        """``G = g_bar^T g_bar`` ``[m, m]``."""
        if self.g_bar is None:
            raise ValueError("these roots have no g_bar (KroneckerRoots(loss_hessian=None))")
        return self.g_bar.T @ self.g_bar


class RootsReduction(Reduction):
    """The full batch's roots: the ranks' rows stacked in rank order, with the loss scaling.

    Rows are samples (and positions), so one process on the full batch has the rows of
    every shard, with the full loss's scaling (``L = sum_r w_r L_r``):

    * ``a = cat_r a_r`` (inputs do not depend on the loss), so ``A = a^T a / b`` with
      ``b = sum_r b_r``;
    * ``g = cat_r w_r g_r`` (the gradients at the layer output are linear in the loss);
    * ``g_bar = cat_r sqrt(w_r) g_bar_r`` within each column ``v`` of the loss-Hessian
      factor (rows ``(v, n[, t])`` stay ``v``-major): for ``"exact"`` and ``"sampled"``
      ``g_bar`` roots a curvature linear in the loss; for ``"empirical"``
      ``g / sqrt(c)`` with ``c = 1/N`` (mean) becomes ``w_r g_r / sqrt(c)``, again
      ``sqrt(w_r) g_bar_r``. So ``G = g_bar^T g_bar = sum_r w_r G_r``.

    Exact (``"sampled"``: in distribution, the ranks' draws differ from one process's).
    The ranks must have the same ``positions`` (rows per sample): with different
    sequence lengths or image sizes the rows of ``"expand"`` are no longer
    ``(sample, position)`` with one ``T``, and there is no stacked layout; that raises.
    """

    formula = "a = cat_r a_r, g = cat_r w_r g_r, g_bar = cat_r sqrt(w_r) g_bar_r (per v)"

    def reduce(self, params, values: list[FactorRoots], ctx: ReduceContext) -> list[FactorRoots]:
        w, group = ctx.weights.loss, ctx.group
        columns = [  # v, the columns of the loss-Hessian factor (0 on an empty shard)
            0 if r.g_bar is None else r.g_bar.shape[0] // max(r.g.shape[0], 1) for r in values
        ]
        meta = torch.tensor(
            [[r.positions for r in values] + columns], dtype=torch.long, device=count_device(group)
        )
        every = all_gather_batch(meta, group)  # [R, 2 P]: positions and g_bar columns per rank
        k = len(values)
        for p, positions in zip(params, every[:, :k].T.tolist()):
            if len(set(positions)) > 1:
                raise ValueError(
                    f"kronecker_roots of the parameter of shape {tuple(p.shape)}: the ranks have "
                    f"{positions} rows per sample, so their rows do not stack into one "
                    "(sample, position) layout; give every rank inputs of the same size, or "
                    "use kfac_approx='reduce' (one row per sample)"
                )
        out = []
        for r, v in zip(values, every[:, k:].amax(0).tolist()):
            a = None if r.a is None else all_gather_batch(r.a, group)
            g = all_gather_batch(r.g * w, group)
            g_bar = None
            if r.g_bar is not None:  # [v * b_r, m] -> [b_r, v, m]: gather along the rows
                m = r.g_bar.shape[1]
                local = r.g_bar.reshape(v, -1, m).transpose(0, 1) * math.sqrt(w)
                g_bar = all_gather_batch(local, group).transpose(0, 1).reshape(-1, m)
            out.append(FactorRoots(a, g, g_bar, r.positions))
        return out


class KroneckerRoots(Extension):
    """The roots ``a``, ``g`` and ``g_bar`` of each weight's Kronecker factors, ``kronecker_roots``.

    Args:
        loss_hessian: what ``g_bar`` roots: ``"exact"`` (KFLR's symmetric factor of
            the loss Hessian, ``r = C - 1`` columns for a
            C-class cross-entropy, ``r = C`` for MSE), ``"sampled"`` (KFAC's ``mc_samples``
            Monte-Carlo draws, ``r = mc_samples``), ``"empirical"`` (the gradients
            of the true labels, ``g / sqrt(c)`` with ``c`` the loss's reduction
            factor: ``G`` is the empirical Fisher's output factor) or ``None``
            (no ``g_bar``: ``a`` and ``g`` only).
        mc_samples: draws for ``"sampled"``.
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight sharing
            (``hbpkit/modules/kronecker_roots.py``).
        bias_column: append a column of ones to ``a`` (the bias folded into the weight).

    Result: :class:`FactorRoots` for every weight and bias (a bias gets ``a = None``).
    ``"exact"`` and ``"sampled"`` backpropagate sqrt factors like ``KFLR`` / ``KFAC``
    (shared with them when both are active); ``"empirical"`` and ``None``
    backpropagate nothing: they read the layer's recorded input and the gradient at
    its output, which the ordinary backward pass computes anyway.
    """

    savefield = "kronecker_roots"
    reduction = RootsReduction()

    def __init__(
        self,
        loss_hessian: str | None = "exact",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        bias_column: bool = False,
    ) -> None:
        self.loss_hessian = check_choice("loss_hessian", loss_hessian, ROOT_LOSS_HESSIANS)
        self.mc_samples = check_mc_samples(mc_samples)
        self.kfac_approx = check_choice("kfac_approx", kfac_approx, KFAC_APPROXES)
        self.bias_column = bool(bias_column)
        if loss_hessian is None:
            self.table, self.message = FIRST_ORDER, None
        elif loss_hessian == "empirical":
            self.table, self.message = SECOND_ORDER, EmpiricalMessage()
        else:
            samples = mc_samples if loss_hessian == "sampled" else 1
            self.table = SECOND_ORDER
            self.message = SqrtMessage(loss_hessian, samples, "ggn")

    def required_param_rules(self, rules) -> list[str]:
        """The rows ``g`` (and ``g_bar``), the input root ``a`` and the positions per sample."""
        return ["output_rows", "param_input_root", "positions"]

    def check(self, call: ModuleCall, rules) -> None:
        _check_roots(call, rules)

    def param_quantity(self, rules, call, name, param, grad_output, message) -> FactorRoots:
        approx = self.kfac_approx
        g = rules.output_rows(call, grad_output, 0, approx)
        a = rules.param_input_root(call, name, approx, self.bias_column)
        if self.loss_hessian is None:
            g_bar = None
        elif self.loss_hessian == "empirical":
            g_bar = g / math.sqrt(message)
        else:
            key = ("roots_g_bar", approx, id(message))
            if key not in call.cache:
                call.cache[key] = torch.cat([_output_root(rules, call, f, approx) for f in message])
            g_bar = call.cache[key]
        positions = 1 if approx == "reduce" else rules.positions(call)
        return FactorRoots(a, g, g_bar, positions)

    def __repr__(self) -> str:
        return (
            f"KroneckerRoots(loss_hessian={self.loss_hessian!r}, mc_samples={self.mc_samples}, "
            f"kfac_approx={self.kfac_approx!r}, bias_column={self.bias_column})"
        )


def _output_root(rules, call: ModuleCall, factor, approx: str) -> Tensor:
    if getattr(factor, "sign", None) is not None or not hasattr(factor, "S"):
        raise NotImplementedError("Kronecker roots need positive sqrt factors (GGN curvature)")
    return rules.output_rows(call, factor.S, 1, approx)


class InputCovariance(Extension):
    """``A = a^T a / b``, the input factor of each weight alone, ``input_covariance``.

    ``[n, n]`` for a weight (``n = D_in``, or ``C_in prod(k)`` for a convolution; ``[g, n, n]``
    with ``n = C_in/g prod(k)`` for a convolution with ``g > 1`` groups), ``[[1]]`` for a
    bias (its input is the constant 1). Computed from the layer
    input that the forward pass recorded: nothing is backpropagated, no extra
    forward or backward pass runs; hbpkit forms the Gram matrix in the layer's hook
    during the ordinary ``backward()`` (where the input is still held), and shares
    it with ``KFAC`` / ``KFLR``'s ``A`` when they are active too. Rows follow
    ``kfac_approx`` as for :class:`KroneckerRoots`.
    """

    savefield = "input_covariance"
    table = FIRST_ORDER
    #: ``A = sum_r a_r A_r`` (``a_r = n_r / N``): exact, an average over samples, if every
    #: rank has the same rows per sample (a bias: ``sum_r a_r [[1]] = [[1]]``)
    reduction = WeightedSum("a_r")

    def __init__(self, kfac_approx: str = "expand") -> None:
        self.kfac_approx = check_choice("kfac_approx", kfac_approx, KFAC_APPROXES)

    def required_param_rules(self, rules) -> list[str]:
        """The input factor ``A`` alone."""
        return ["param_input_factor"]

    def check(self, call: ModuleCall, rules) -> None:
        _check_roots(call, rules, per_group=True)

    def param_quantity(self, rules, call, name, param, grad_output, message) -> Tensor:
        return rules.param_input_factor(call, name, self.kfac_approx, param)

    def __repr__(self) -> str:
        return f"InputCovariance(kfac_approx={self.kfac_approx!r})"


class EmpiricalKFAC(KroneckerRoots):
    """K-FAC with the empirical Fisher's ``G = g_bar^T g_bar`` (true labels), ``kfac_empirical``.

    ``G = (1/c) sum_rows g g^T`` (``c`` the loss's reduction factor, so ``G`` is the
    output factor of the loss as reduced, like ``p.kfac``), ``A`` as for ``KFAC``.
    Result: :class:`~hbpkit.curvature.kronecker.KroneckerFactors`. Backpropagates nothing.
    """

    savefield = "kfac_empirical"
    #: ``G = sum_r w_r G_r`` (``G = g_bar^T g_bar`` with ``g_bar -> sqrt(w_r) g_bar_r``, see
    #: :class:`RootsReduction`), ``A = sum_r a_r A_r``: exact, deterministic
    reduction = KroneckerFactorwise()

    def __init__(self, kfac_approx: str = "expand") -> None:
        super().__init__("empirical", 1, kfac_approx)

    def required_param_rules(self, rules) -> list[str]:
        """The roots' rules, and the Kronecker factors of ``G`` (``kron_of_output_factor``)."""
        return [*super().required_param_rules(rules), "kron_of_output_factor"]

    def check(self, call: ModuleCall, rules) -> None:
        _check_roots(call, rules, per_group=True)

    def param_quantity(self, rules, call, name, param, grad_output, message) -> KroneckerFactors:
        roots = super().param_quantity(rules, call, name, param, grad_output, message)
        factors = rules.kron_of_output_factor(call, name, roots.output_factor(), self.kfac_approx)
        return as_kronecker_factors(factors, param)

    def __repr__(self) -> str:
        return f"EmpiricalKFAC(kfac_approx={self.kfac_approx!r})"


__all__ = ["EmpiricalKFAC", "FactorRoots", "InputCovariance", "KroneckerRoots", "RootsReduction"]


def _check_roots(call: ModuleCall, rules, per_group: bool = False) -> None:
    """A layer with roots (``KroneckerRootRoles``) refuses what has no single pair of roots;
    ``per_group``: the extension saves factors only, which may be per group (grouped
    convolutions, hbpkit/modules/kronecker_roots.py)."""
    validate_roots = getattr(rules, "validate_roots", None)
    if validate_roots is not None:
        validate_roots(call, per_group=per_group)
