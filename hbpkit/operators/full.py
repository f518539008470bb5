"""The full GGN and Hessian of a model's loss over all its parameters, cross blocks included.

For data ``D`` (one batch ``(X, y)`` or several) and the loss ``L(theta) = sum_b w_b
loss_fn(f(X_b, theta), y_b)`` (``w_b = 1`` for ``reduction="sum"``; the share of the
targets ``w_b = y_b.numel() / sum_b y_b.numel()`` for ``"mean"``, so ``L`` is the loss of
the whole data set, as curvlinops defines it):

* :class:`HessianOperator`: ``H = d2 L / dtheta2``, ``H V = d/dtheta <grad L, V>``
  (a Jacobian-vector product of the gradient, forward over reverse);
* :class:`GGNOperator`: ``G = sum_b w_b J_b^T H_{z_b} J_b`` with ``J_b = df(X_b)/dtheta``
  and ``H_{z_b}`` the Hessian of ``loss_fn`` w.r.t. the model output (eq. 7 of the paper
  without the residual terms): ``J V`` forward (jvp), ``H_z`` forward over reverse, and
  ``J^T`` by one vector-Jacobian product.

Both are exact and use ``torch.func`` on ``model`` with the parameters substituted
(``functional_call``), ``K`` columns at once under ``vmap``. The model must be
deterministic (no dropout in training mode, batch norm in eval mode): each product runs
the forward pass again. Parameters not in ``params`` stay as they are (constants).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from hbpkit.operators.base import CurvatureOperator

Batch = tuple[Any, Tensor]


def _batches(data: Batch | Iterable[Batch]) -> list[Batch]:
    """``(X, y)`` or an iterable of ``(X, y)`` as a list of batches."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], Tensor):
        if not isinstance(data[0], (tuple, list)):
            return [data]
    batches = list(data)
    for b in batches:
        if not (isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[1], Tensor)):
            raise TypeError(
                "data must be a batch (X, y) or an iterable of batches (X, y) with a tensor "
                f"target, got an element of type {type(b).__name__}"
            )
    if not batches:
        raise ValueError("data holds no batch")
    return [tuple(b) for b in batches]


class _ModelOperator(CurvatureOperator):
    """Shared set-up: the model, the loss, the batches and their weights."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        data: Batch | Iterable[Batch],
        params: Sequence[nn.Parameter] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        reduction = getattr(loss_fn, "reduction", None)
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"{type(self).__name__} needs a loss module with reduction 'mean' or 'sum', "
                f"got {type(loss_fn).__name__} with reduction {reduction!r}"
            )
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        names = {id(p): n for n, p in model.named_parameters()}
        missing = [tuple(p.shape) for p in params if id(p) not in names]
        if missing:
            raise ValueError(f"params of shapes {missing} are not parameters of the model")
        super().__init__(list(params))
        self.names = [names[id(p)] for p in self.params]
        self.model = model
        self.loss_fn = loss_fn
        self.batches = _batches(data)
        total = sum(y.numel() for _, y in self.batches)
        self.weights = [1.0 if reduction == "sum" else y.numel() / total for _, y in self.batches]

    def _output(self, X: Any):
        """``theta -> f(X, theta)`` over the covered parameters (a tuple)."""

        def f(*theta: Tensor) -> Tensor:
            return functional_call(self.model, dict(zip(self.names, theta)), (X,))

        return f

    def _params(self) -> tuple[Tensor, ...]:
        return tuple(p.detach() for p in self.params)


class HessianOperator(_ModelOperator):
    """The exact Hessian of the loss over ``params`` (default: every trainable parameter).

    Args:
        model: the network (deterministic, see the module docstring).
        loss_fn: a loss module with ``reduction`` ``"mean"`` or ``"sum"``
            (``nn.CrossEntropyLoss()``, ``nn.MSELoss()``, ...); it need not be extended.
        data: one batch ``(X, y)`` or an iterable of batches.
        params: the parameters covered (their order is the order of the flat vector).

    ``H @ v`` (``[P]``), ``H @ V`` (``[P, K]``), ``to_dense()``, ``eigh_lowrank(k)``,
    ``to_scipy()``: :class:`~hbpkit.operators.base.CurvatureOperator`.
    """

    def _matmat(self, V: list[Tensor]) -> list[Tensor]:
        theta = self._params()
        out = [torch.zeros_like(v) for v in V]
        for (X, y), w in zip(self.batches, self.weights):
            f = self._output(X)

            def loss(*t: Tensor, f=f) -> Tensor:
                return self.loss_fn(f(*t[:-1]), t[-1])

            gradient = grad(loss, argnums=tuple(range(len(theta))))
            # the target enters as a primal with a zero tangent where it is floating:
            # a constant captured by the closure meets immutable zero tensors (MSELoss)
            dy = torch.zeros_like(y) if y.is_floating_point() else None

            def hvp(*v: Tensor, gradient=gradient, y=y, dy=dy) -> tuple[Tensor, ...]:
                if dy is None:
                    return jvp(lambda *t: gradient(*t, y), theta, v)[1]
                return jvp(gradient, (*theta, y), (*v, dy))[1]

            for o, hv in zip(out, vmap(hvp)(*V)):
                o.add_(hv, alpha=w)
        return out


class GGNOperator(_ModelOperator):
    """The exact generalised Gauss-Newton matrix of the loss over ``params``.

    ``G = sum_b w_b J_b^T H_{z_b} J_b`` (module docstring), the cross blocks between
    parameters included. Arguments as :class:`HessianOperator`.
    """

    def _matmat(self, V: list[Tensor]) -> list[Tensor]:
        theta = self._params()
        out = [torch.zeros_like(v) for v in V]
        for (X, y), w in zip(self.batches, self.weights):
            f = self._output(X)
            z, pullback = vjp(f, *theta)
            z = z.detach()

            loss_grad = grad(self.loss_fn)  # w.r.t. the output
            dy = torch.zeros_like(y) if y.is_floating_point() else None

            def loss_hvp(t: Tensor, z=z, y=y, dy=dy, loss_grad=loss_grad) -> Tensor:
                # forward over reverse; a floating target enters as a primal with a zero
                # tangent (a captured constant meets immutable zero tensors in MSELoss)
                if dy is None:
                    return jvp(lambda out: loss_grad(out, y), (z,), (t,))[1]
                return jvp(loss_grad, (z, y), (t, dy))[1]

            def ggn_vp(*v: Tensor, f=f, pullback=pullback, loss_hvp=loss_hvp):
                return pullback(loss_hvp(jvp(f, theta, v)[1]))

            for o, gv in zip(out, vmap(ggn_vp)(*V)):
                o.add_(gv, alpha=w)
        return out
