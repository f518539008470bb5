"""First-order extensions: per-sample gradients and their statistics.

They need only the module's input and the gradient at its output, so they do
not backpropagate anything; ``grad_batch[n]`` is the gradient of the ``n``-th
term of the loss as reduced (``grad_batch.sum(0) == p.grad``).
"""

from __future__ import annotations

from torch import Tensor

from hbpkit.extensions.base import Extension
from hbpkit.modules.tables import FIRST_ORDER


class _FirstOrder(Extension):
    table = FIRST_ORDER


class BatchGrad(_FirstOrder):
    """Per-sample gradients, ``grad_batch``: ``[N, *p.shape]``."""

    savefield = "grad_batch"

    def required_param_rules(self, rules) -> list[str]:
        return ["batch_grad"]

    def param_quantity(self, rules, call, name, param, grad_output, message) -> Tensor:
        return rules.cached_batch_grad(call, name, grad_output)


class BatchL2(_FirstOrder):
    """Squared norms of the per-sample gradients, ``batch_l2``: ``[N]``."""

    savefield = "batch_l2"

    def required_param_rules(self, rules) -> list[str]:
        return ["batch_l2"]  # default: from batch_grad

    def param_quantity(self, rules, call, name, param, grad_output, message) -> Tensor:
        return rules.batch_l2(call, name, grad_output)


class SumGradSquared(_FirstOrder):
    """``sum_n grad_batch[n]**2``, ``sum_grad_squared``: ``p.shape``."""

    savefield = "sum_grad_squared"

    def required_param_rules(self, rules) -> list[str]:
        return ["sum_grad_squared"]  # default: from batch_grad

    def param_quantity(self, rules, call, name, param, grad_output, message) -> Tensor:
        return rules.sum_grad_squared(call, name, grad_output)


class Variance(_FirstOrder):
    """Gradient variance ``sum_n g_n**2 / N - (sum_n g_n / N)**2``, ``variance``: ``p.shape``.

    With ``g_n = grad_batch[n]``, as BackPACK defines it.
    """

    savefield = "variance"

    def required_param_rules(self, rules) -> list[str]:
        return ["sum_grad_squared", "summed_grad"]  # defaults: from batch_grad

    def param_quantity(self, rules, call, name, param, grad_output, message) -> Tensor:
        N = grad_output.shape[0]
        sgs = rules.sum_grad_squared(call, name, grad_output)
        return sgs / N - (rules.summed_grad(call, name, grad_output) / N).square()


__all__ = ["BatchGrad", "BatchL2", "SumGradSquared", "Variance"]
