"""The cases where an approximation must equal the exact curvature block (or tend to it).

Each limit names its condition, the extensions that produce the approximation, the
savefields they write and the exact quantity (from :mod:`reference`, autograd only) that
every parameter's dense block must equal. The tests take them as fixtures
(``tests/conftest.py``) and supply the model, the data and their tolerance.

* ``KFLR_KFRA_BATCH_ONE``: KFLR and KFRA at batch size 1 without weight sharing are the
  exact GGN block (hbp supplement, eq. S.12 with one sample: the Kronecker product of
  ``J^T H J`` and ``x x^T`` is the block itself).
* ``KFLR_DEEP_LINEAR_MSE``: deep linear network + MSE, any batch size: the loss Hessian and
  the Jacobians of the later layers do not depend on the sample, so the block factorises
  exactly (KFRA backpropagates the same matrix).
* ``HBP_HESSIAN_BATCH_ONE``: ``HBP("hessian", "average", "batch-average")`` at batch size 1
  is the exact Hessian block of each Linear weight (eq. 7 with one sample);
  ``HBP_HESSIAN_SQRT_BATCH_ONE`` the same for the per-sample ``HBP("hessian", "exact", "sqrt")``.
* ``KFAC_MEAN_TO_KFLR``: KFAC's Monte-Carlo loss-Hessian factor is unbiased, so the mean of
  many draws tends to KFLR's output factor; the input factor does not depend on the draws.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import reference as ref
import torch
from torch import Tensor, nn

from hbpkit import backprop
from hbpkit.extensions import HBP, KFAC, KFLR, KFRA

Close = Callable[[Tensor, Tensor, str], None]


def dense(factors) -> Tensor:
    """The dense block ``kron(*factors)`` that a tuple of Kronecker factors stands for."""
    if hasattr(factors, "to_dense"):
        return factors.to_dense()
    result = factors[0]
    for f in factors[1:]:
        result = torch.kron(result, f)
    return result


@dataclass(frozen=True)
class ExactLimit:
    """An approximation that equals the exact ``ggn`` or ``hessian`` block under ``condition``."""

    name: str
    condition: str
    make: Callable[..., tuple]
    fields: tuple[str, ...]
    exact: str

    def extensions(self, **options) -> tuple:
        """Fresh extension objects (``options``, e.g. ``kfac_approx``, passed to each)."""
        return self.make(**options)

    def backward(self, loss: Tensor, **options) -> None:
        """``loss.backward()`` with the limit's extensions active."""
        with backprop(*self.extensions(**options)):
            loss.backward()

    def exact_blocks(self, model: nn.Module, loss_fn: nn.Module, X, y, params) -> list[Tensor]:
        """The exact blocks of ``params`` (autograd on ``model``, a plain or extended copy)."""
        out = model(X)
        if self.exact == "ggn":
            full = ref.ggn(out, loss_fn, y, params)
        else:
            full = ref.hessian(loss_fn(out, y), params)
        return ref.blocks(full, params)

    def check(self, params, blocks: list[Tensor], close: Close, what: str = "") -> None:
        """Every field of every parameter, densified, equals its exact block."""
        for i, (p, block) in enumerate(zip(params, blocks)):
            for field in self.fields:
                close(dense(getattr(p, field)), block, f"{self.name} {what} param {i}.{field}")


@dataclass(frozen=True)
class MonteCarloLimit:
    """The mean over ``mc_samples`` draws of ``field`` tends to ``target`` (relative error)."""

    name: str
    make: Callable[[int], tuple]
    field: str
    target: str
    mc_samples: int
    rel_tol: float

    def backward(self, loss: Tensor) -> None:
        with backprop(*self.make(self.mc_samples)):
            loss.backward()

    def check(self, named_params, close: Close) -> None:
        """Output factor within ``rel_tol`` (Frobenius); the input factor exactly equal."""
        for name, p in named_params:
            drawn, exact = getattr(p, self.field), getattr(p, self.target)
            err = ((drawn[0] - exact[0]).norm() / exact[0].norm()).item()
            assert err < self.rel_tol, (name, err)
            if p.dim() == 2:
                close(drawn[1], exact[1], f"{name}: A does not depend on the sampling")


KFLR_KFRA_BATCH_ONE = ExactLimit(
    "kflr-kfra-batch-one",
    "batch size 1, no weight sharing",
    lambda **o: (KFLR(**o), KFRA(**o)),
    ("kflr", "kfra"),
    "ggn",
)
KFLR_DEEP_LINEAR_MSE = ExactLimit(
    "kflr-deep-linear-mse",
    "a deep linear network with MSE, any batch size",
    lambda **o: (KFLR(**o), KFRA(**o)),
    ("kflr", "kfra"),
    "ggn",
)
HBP_HESSIAN_BATCH_ONE = ExactLimit(
    "hbp-hessian-batch-one",
    "batch size 1, no weight sharing",
    lambda **o: (HBP("hessian", "average", "batch-average", **o),),
    ("hbp",),
    "hessian",
)
HBP_HESSIAN_SQRT_BATCH_ONE = ExactLimit(
    "hbp-hessian-sqrt-batch-one",
    "batch size 1, no weight sharing",
    lambda **o: (HBP("hessian", "exact", "sqrt", **o),),
    ("hbp",),
    "hessian",
)
KFAC_MEAN_TO_KFLR = MonteCarloLimit(
    "kfac-mean-to-kflr",
    lambda mc: (KFLR(), KFAC(mc_samples=mc)),
    "kfac",
    "kflr",
    10_000,
    0.05,
)
EXACT_LIMITS = (
    KFLR_KFRA_BATCH_ONE,
    KFLR_DEEP_LINEAR_MSE,
    HBP_HESSIAN_BATCH_ONE,
    HBP_HESSIAN_SQRT_BATCH_ONE,
)
