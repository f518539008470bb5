"""Kronecker-factored curvature: the general ``HBP`` and its named special cases.

``KFAC == HBP("ggn", "sampled", "sqrt")``, ``KFLR == HBP("ggn", "exact", "sqrt")``,
``KFRA == HBP("ggn", "average", "batch-average")``. Per-sample sqrt factors give
``G = sum_{v,n} sign s s^T``; the batch-averaged strategy gives ``G = H_z`` of
approximation (9) (S.11a/b). ``A = 1/N sum_n x_n x_n^T`` (S.8c); layers that share
weights over positions follow ``kfac_approx`` (see the module rules).
"""

from __future__ import annotations

from hbpkit.collectives import KroneckerFactorwise
from hbpkit.curvature.kronecker import KroneckerFactors
from hbpkit.extensions.base import check_choice, check_mc_samples
from hbpkit.extensions.messages import CURVATURES, AverageMessage, SqrtMessage
from hbpkit.extensions.second_order import SecondOrder

LOSS_HESSIANS = ("exact", "sampled", "average")
BACKPROPS = ("sqrt", "batch-average")
KFAC_APPROXES = ("expand", "reduce")


def as_kronecker_factors(factors, param) -> KroneckerFactors:
    """The rules' factors as :class:`KroneckerFactors` of ``param``; rules of a layout other
    than the default (groups, transposed convolutions) return them as such already."""
    if isinstance(factors, KroneckerFactors):
        return factors
    return KroneckerFactors(factors, param.shape)


class HBP(SecondOrder):
    """Hessian backpropagation with a choice of curvature, loss Hessian and strategy.

    Args:
        curvature: ``"ggn"`` (drop second-order module terms), ``"hessian"`` (keep
            them, eq. 7), ``"pch-abs"`` / ``"pch-clip"`` (their absolute value /
            positive part per sample, Chen et al. 2018).
        loss_hessian: ``"exact"`` (symmetric factorisation), ``"sampled"``
            (``mc_samples`` draws from the model's predictive distribution) or
            ``"average"`` (the batch-summed loss Hessian).
        backprop: ``"sqrt"`` (per-sample factors) or ``"batch-average"`` (one
            matrix, approximation (9) / S.11).
        mc_samples: draws for ``loss_hessian="sampled"``.
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight sharing.

    Result ``p.hbp``: :class:`~hbpkit.curvature.kronecker.KroneckerFactors`.
    """

    savefield = "hbp"
    #: factor by factor, ``G = sum_r w_r G_r``, ``A = sum_r a_r A_r``: exact for ``A`` and for
    #: the per-sample (``"sqrt"``) ``G``; ``"batch-average"``'s ``G`` is exact at the last
    #: layer only (the rank average drops cross terms between shards), see hbpkit.distributed
    reduction = KroneckerFactorwise()

    def __init__(
        self,
        curvature: str = "ggn",
        loss_hessian: str = "exact",
        backprop: str = "sqrt",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
    ) -> None:
        self.curvature = check_choice("curvature", curvature, CURVATURES)
        self.loss_hessian = check_choice("loss_hessian", loss_hessian, LOSS_HESSIANS)
        self.backprop = check_choice("backprop", backprop, BACKPROPS)
        self.mc_samples = check_mc_samples(mc_samples)
        self.kfac_approx = check_choice("kfac_approx", kfac_approx, KFAC_APPROXES)
        if backprop == "sqrt" and loss_hessian == "average":
            raise ValueError(
                "loss_hessian='average' sums the loss Hessian over the batch, which has no "
                "per-sample factorisation to backpropagate with backprop='sqrt'; use "
                "backprop='batch-average' or loss_hessian='exact'/'sampled'"
            )
        if backprop == "batch-average" and loss_hessian == "exact":
            raise ValueError(
                "backprop='batch-average' backpropagates the batch-summed loss Hessian: "
                "use loss_hessian='average' (exact) or 'sampled' (Monte-Carlo)"
            )
        samples = mc_samples if loss_hessian == "sampled" else 1
        if backprop == "sqrt":
            self.message = SqrtMessage(loss_hessian, samples, curvature)
        else:
            self.message = AverageMessage(loss_hessian, samples, curvature)

    @property
    def accepts_position_blocks(self) -> bool:
        """``kfac_approx="reduce"`` sums over all pairs of positions: it needs the dense matrix."""
        return self.kfac_approx == "expand"

    def required_param_rules(self, rules) -> list[str]:
        """The Kronecker factors from per-sample sqrt factors or from the averaged matrix."""
        return ["kron_from_sqrt" if self.backprop == "sqrt" else "kron_from_average"]

    def param_quantity(self, rules, call, name, param, grad_output, message) -> KroneckerFactors:
        if self.backprop == "sqrt":
            factors = rules.kron_from_sqrt(call, name, message, self.kfac_approx)
        else:
            factors = rules.kron_from_average(call, name, message, self.kfac_approx)
        return as_kronecker_factors(factors, param)

    # a tied parameter (a block applied twice): its uses are taken as extra positions of a
    # shared weight, kfac_approx="expand" (Grosse and Martens 2016; a Linear on [N, U, D]
    # with the U uses as positions gives the same factors): the output factors summed,
    # the input factors averaged over the uses, G = sum_u G_u, A = mean_u A_u
    @property
    def combines_tied_uses(self) -> bool:
        return self.backprop == "sqrt" and self.kfac_approx == "expand"

    def required_tied_rules(self, rules) -> list[str]:
        return ["kron_from_sqrt"]

    def tied_refusal(self, uses: list) -> str | None:
        kinds = {type(rules).__name__ for rules, _ in uses}
        if len(kinds) > 1:
            return (
                f"its uses have Kronecker factors of different kinds ({', '.join(sorted(kinds))}, "
                "e.g. an embedding tied to the output layer), which one Kronecker product cannot "
                "combine; DiagGGNExact, GGNMP and per-sample gradients are exact for it"
            )
        return None

    def tied_contribution(self, rules, call, name, grad_output, factors=None) -> tuple:
        kron = rules.kron_from_sqrt(call, name, list(factors.values()), "expand")
        return rules.kron_output_factor, kron

    def combine_tied(self, contributions: list[tuple]) -> KroneckerFactors:
        output, first = contributions[0]
        U = len(contributions)
        combined = [
            sum(kron[i] for _, kron in contributions) * (1 if i == output else 1 / U)
            for i in range(len(first))
        ]
        if isinstance(first, KroneckerFactors):
            return first.like(combined)  # (its layout: groups, transposed)
        return combined

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(curvature={self.curvature!r}, "
            f"loss_hessian={self.loss_hessian!r}, backprop={self.backprop!r}, "
            f"mc_samples={self.mc_samples}, kfac_approx={self.kfac_approx!r})"
        )


class KFAC(HBP):
    """K-FAC (Martens and Grosse 2015): ``HBP("ggn", "sampled", "sqrt")``, ``kfac``."""

    savefield = "kfac"

    def __init__(self, mc_samples: int = 1, kfac_approx: str = "expand") -> None:
        super().__init__("ggn", "sampled", "sqrt", mc_samples, kfac_approx)

    def __repr__(self) -> str:
        return f"KFAC(mc_samples={self.mc_samples}, kfac_approx={self.kfac_approx!r})"


class KFLR(HBP):
    """KFLR (Botev et al. 2017): ``HBP("ggn", "exact", "sqrt")``, ``kflr``."""

    savefield = "kflr"

    def __init__(self, kfac_approx: str = "expand") -> None:
        super().__init__("ggn", "exact", "sqrt", 1, kfac_approx)

    def __repr__(self) -> str:
        return f"KFLR(kfac_approx={self.kfac_approx!r})"


class KFRA(HBP):
    """KFRA (Botev et al. 2017): ``HBP("ggn", "average", "batch-average")``, ``kfra``."""

    savefield = "kfra"

    def __init__(self, kfac_approx: str = "expand") -> None:
        super().__init__("ggn", "average", "batch-average", 1, kfac_approx)

    def __repr__(self) -> str:
        return f"KFRA(kfac_approx={self.kfac_approx!r})"
