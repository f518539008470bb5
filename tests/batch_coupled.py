"""Brute-force references through batch statistics (BatchNorm in train mode), float64.

Every quantity is of the batch loss as computed, with the statistics of the batch: the
model is evaluated as one function of its parameters on the whole batch with
``torch.func.functional_call`` (a copy without running statistics, so the reference
touches no buffer and normalizes with the batch statistics, as train mode does):

* per-sample gradients: ``jacrev`` of the vector of loss terms ``l_n`` (reduction
  included, ``sum_n l_n = L``) through the batch map;
* the GGN ``J^T H J`` from the dense Jacobian of the whole batch's output ``[N, *out]``
  w.r.t. the parameters and the loss Hessian w.r.t. that output (block diagonal over
  samples, computed densely as well);
* the Hessian block of a parameter from Hessian-vector products of ``L``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, jvp, vjp

Params = dict[str, Tensor]


def batch_statistics_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose BatchNorm layers keep no running statistics (batch
    statistics in any mode; nothing is written to buffers)."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return twin


class BatchReference:
    """References of ``loss = criterion(model(X), y)`` with ``terms(output, y)`` its
    per-sample terms ``[N]`` (summing to the loss)."""

    def __init__(
        self,
        model: nn.Module,
        X: Tensor,
        y: Tensor,
        criterion: Callable[[Tensor, Tensor], Tensor],
        terms: Callable[[Tensor, Tensor], Tensor],
    ) -> None:
        self.model = batch_statistics_copy(model)
        self.X, self.y = X, y
        self.criterion, self.terms = criterion, terms
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.buffers = {n: b for n, b in self.model.named_buffers()}

    def output(self, params: Params) -> Tensor:
        return functional_call(self.model, (params, self.buffers), (self.X,))

    def loss(self, params: Params) -> Tensor:
        return self.criterion(self.output(params), self.y)

    def grad_batch(self) -> Params:
        """``d l_n / d p`` ``[N, *p.shape]`` through the batch statistics."""
        return jacrev(lambda p: self.terms(self.output(p), self.y))(self.params)

    def grad(self) -> Params:
        return torch.func.grad(self.loss)(self.params)

    def output_hessian(self) -> Tensor:
        """``d2L / dz dz`` ``[N D, N D]`` at the batch output ``z``."""
        z = self.output(self.params).detach()
        H = hessian(lambda o: self.criterion(o, self.y))(z)
        return H.reshape(z.numel(), z.numel())

    def jacobian(self, name: str) -> Tensor:
        """``dz / dp`` ``[N D, P]`` of the whole batch's output."""

        def out(p: Tensor) -> Tensor:
            return self.output({**self.params, name: p}).reshape(-1)

        J = jacrev(out)(self.params[name])
        return J.reshape(J.shape[0], -1)

    def ggn_block(self, name: str) -> Tensor:
        J = self.jacobian(name)
        return J.T @ self.output_hessian() @ J

    def hvp(self, name: str, v: Tensor) -> Tensor:
        """The Hessian block of ``name`` times ``v`` ``[*p.shape]``."""

        def g(p: Tensor) -> Tensor:
            return torch.func.grad(lambda q: self.loss({**self.params, name: q}))(p)

        return jvp(g, (self.params[name],), (v,))[1]

    def hessian_block(self, name: str) -> Tensor:
        p = self.params[name]
        eye = torch.eye(p.numel(), dtype=p.dtype).reshape(p.numel(), *p.shape)
        return torch.stack([self.hvp(name, e).reshape(-1) for e in eye])

    def ggn_product(self, name: str, v: Tensor) -> Tensor:
        """``J^T H J v`` for one parameter, matrix-free (large models)."""

        def out(p: Tensor) -> Tensor:
            return self.output({**self.params, name: p})

        z, Jv = jvp(out, (self.params[name],), (v,))
        z = z.detach()
        HJv = jvp(torch.func.grad(lambda o: self.criterion(o, self.y)), (z,), (Jv,))[1]
        return vjp(out, self.params[name])[1](HJv)[0]


def mean_ce_terms(output: Tensor, y: Tensor) -> Tensor:
    """Terms of ``CrossEntropyLoss()`` (mean over the batch)."""
    return nn.functional.cross_entropy(output, y, reduction="none") / output.shape[0]


def mse_terms(reduction: str) -> Callable[[Tensor, Tensor], Tensor]:
    """Terms of ``MSELoss(reduction)``: per sample the sum of its squared errors, divided by
    the number of entries for ``mean``."""

    def terms(output: Tensor, y: Tensor) -> Tensor:
        sq = (output - y).square().flatten(1).sum(1)
        return sq / output.numel() if reduction == "mean" else sq

    return terms
