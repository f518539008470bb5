"""First-order extensions: per-sample gradients and their statistics.

They need only the module's input and the gradient at its output, so they do
not backpropagate anything; ``grad_batch[n]`` is the gradient of the ``n``-th
term of the loss as reduced (``grad_batch.sum(0) == p.grad``).

In a backward pass that creates a graph (``loss.backward(create_graph=True)``) they
are differentiable: formed from per-sample gradients that keep their graph to the
parameters and the inputs (``hbpkit/extensions/differentiable.py``).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from hbpkit.collectives import (
    GatherInRankOrder,
    ReduceContext,
    Reduction,
    WeightedSum,
    all_reduce_sum,
)
from hbpkit.extensions.base import Extension
from hbpkit.extensions.differentiable import check_differentiable, graph_batch_grad
from hbpkit.modules.tables import FIRST_ORDER


class _FirstOrder(Extension):
    table = FIRST_ORDER

    # a tied parameter's per-sample gradient is the sum over its uses (the chain rule);
    # every statistic is then formed from that sum
    combines_tied_uses = True

    def required_tied_rules(self, rules) -> list[str]:
        return ["batch_grad"]

    def tied_contribution(self, rules, call, name, grad_output, factors=None) -> Tensor:
        return rules.cached_batch_grad(call, name, grad_output)

    def combine_tied(self, contributions: list[Tensor]) -> Tensor:
        return self.from_batch_grad(sum(contributions))

    def from_batch_grad(self, g: Tensor) -> Tensor:
        """The quantity from the per-sample gradients ``g`` ``[N, *p.shape]``."""
        raise NotImplementedError

    # backward passes that create a graph (create_graph=True) --------------------------------
    differentiable = True

    def check_graph(self, call) -> None:
        """Refuse, before the pass, a module whose per-sample gradients cannot keep a graph."""
        check_differentiable(call)

    def graph_quantity(self, rules, call, name, grad_output) -> Tensor:
        """The quantity with its graph to ``grad_output``, the inputs and the parameters."""
        return self.from_batch_grad(graph_batch_grad(call, rules, name, grad_output))

    def graph_tied_contribution(self, rules, call, name, grad_output) -> Tensor:
        """One use's per-sample gradients of a tied parameter, with their graph."""
        return graph_batch_grad(call, rules, name, grad_output)


class BatchGrad(_FirstOrder):
    """Per-sample gradients, ``grad_batch``: ``[N, *p.shape]``."""

    savefield = "grad_batch"
    reduction = GatherInRankOrder("w_r")

    def required_param_rules(self, rules) -> list[str]:
        return ["batch_grad"]

    def param_quantity(self, rules, call, name, param, grad_output, message) -> Tensor:
        return rules.cached_batch_grad(call, name, grad_output)

    def from_batch_grad(self, g: Tensor) -> Tensor:
        return g


class BatchL2(_FirstOrder):
    """Squared norms of the per-sample gradients, ``batch_l2``: ``[N]``."""

    savefield = "batch_l2"
    reduction = GatherInRankOrder("w_r**2")

    def required_param_rules(self, rules) -> list[str]:
        return ["batch_l2"]  # default: from batch_grad

    def param_quantity(self, rules, call, name, param, grad_output, message) -> Tensor:
        return rules.batch_l2(call, name, grad_output)

    def from_batch_grad(self, g: Tensor) -> Tensor:
        return g.flatten(1).square().sum(1)


class SumGradSquared(_FirstOrder):
    """``sum_n grad_batch[n]**2``, ``sum_grad_squared``: ``p.shape``."""

    savefield = "sum_grad_squared"
    reduction = WeightedSum("w_r**2")

    def required_param_rules(self, rules) -> list[str]:
        return ["sum_grad_squared"]  # default: from batch_grad

    def param_quantity(self, rules, call, name, param, grad_output, message) -> Tensor:
        return rules.sum_grad_squared(call, name, grad_output)

    def from_batch_grad(self, g: Tensor) -> Tensor:
        return g.square().sum(0)


class VarianceReduction(Reduction):
    """The full batch's ``sgs / N - (grad / N)**2`` from each rank's local quantities.

    ``sgs = sum_r w_r**2 sgs_r`` (the rank's ``p.sum_grad_squared`` if present, else
    ``sgs_r = n_r variance_r + grad_r**2 / n_r`` from its shard gradient, ``grad="local"``)
    and ``grad = sum_r w_r grad_r``: exact. Needs the shard sizes (``batch_size=``).
    """

    formula = "sgs / N - (grad / N)**2, sgs = sum_r w_r**2 sgs_r, grad = sum_r w_r grad_r"

    def check(self, savefield, params, values, ctx: ReduceContext) -> None:
        weights = ctx.weights
        if weights.sizes is None:
            raise ValueError(
                f"reducing {savefield!r} needs batch_size= (this rank's number of samples)"
            )
        for p in params:
            if not hasattr(p, "sum_grad_squared") and ctx.grad != "local":
                raise ValueError(
                    f"{savefield} of parameter of shape {tuple(p.shape)}: DDP has averaged "
                    "p.grad, so the shard's gradient is gone; run SumGradSquared() in the same "
                    "backward pass, or run the backward under model.no_sync() and pass "
                    "grad='local'"
                )
        if ctx.grad == "ddp" and weights.loss != 1.0 and len(set(weights.sizes)) > 1:
            raise ValueError(
                f"{savefield}: DDP averaged gradients over shards of different sizes "
                f"{weights.sizes}, which is not the full-batch gradient of a mean loss; run the "
                "backward under model.no_sync() and pass grad='local'"
            )

    def reduce(self, params, values, ctx: ReduceContext) -> list[Tensor]:
        weights, group = ctx.weights, ctx.group
        n, N = weights.sizes[dist.get_rank(group)], weights.total
        local_sgs = []
        for p, variance in zip(params, values):
            if hasattr(p, "sum_grad_squared"):
                local_sgs.append(p.sum_grad_squared)
            else:  # grad="local": variance_r = sgs_r / n - (grad_r / n)**2
                local_sgs.append(n * variance + p.grad.square() / max(n, 1))
        sgs = all_reduce_sum([s * weights.loss**2 for s in local_sgs], group)
        if ctx.grad == "local":
            grads = all_reduce_sum([p.grad * weights.loss for p in params], group)
        else:  # DDP averaged: p.grad = 1/R sum_r grad_r, the full gradient as all w_r are
            # equal (checked), so sum_r w_r grad_r = w R p.grad
            grads = [p.grad.detach() * (weights.loss * weights.world_size) for p in params]
        return [s / N - (g / N).square() for s, g in zip(sgs, grads)]


class Variance(_FirstOrder):
    """Gradient variance ``sum_n g_n**2 / N - (sum_n g_n / N)**2``, ``variance``: ``p.shape``.

    With ``g_n = grad_batch[n]``, as BackPACK defines it.
    """

    savefield = "variance"
    reduction = VarianceReduction()

    def required_param_rules(self, rules) -> list[str]:
        return ["sum_grad_squared", "summed_grad"]  # defaults: from batch_grad

    def param_quantity(self, rules, call, name, param, grad_output, message) -> Tensor:
        N = grad_output.shape[0]
        sgs = rules.sum_grad_squared(call, name, grad_output)
        return sgs / N - (rules.summed_grad(call, name, grad_output) / N).square()

    def from_batch_grad(self, g: Tensor) -> Tensor:
        N = g.shape[0]
        return g.square().sum(0) / N - (g.sum(0) / N).square()


__all__ = ["BatchGrad", "BatchL2", "SumGradSquared", "Variance", "VarianceReduction"]
