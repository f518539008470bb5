"""ISAAC (Petersen et al., "ISAAC Newton: Input-based Approximate Curvature for Newton's Method").

Per weight ``[m, n]`` with gradient ``grad`` and the Kronecker factors of hbpkit
(``G = g_bar^T g_bar``, ``A = a^T a / b``, from :class:`~hbpkit.extensions.KroneckerRoots`),
the regularised Kronecker step of eq. 17 is::

    zeta = lambda_g lambda_a (G + lambda_g I)^{-1} grad (A + lambda_a I)^{-1}

(for a mean-reduced loss with one Monte-Carlo draw, hbpkit's ``G`` is the paper's
``g_bar^T g_bar / b``). Theorem 1 (eq. 20) computes it in the sample space, with
``b`` rows of ``a`` and ``g`` (``g^T a = grad``) and ``rb`` rows of ``g_bar``::

    lambda_a (A + lambda_a I)^{-1}  = I - a^T (b lambda_a I + a a^T)^{-1} a
    lambda_g (G + lambda_g I)^{-1}  = I - g_bar^T (lambda_g I + g_bar g_bar^T)^{-1} g_bar

so ``R = g^T [b lambda_a (b lambda_a I + a a^T)^{-1}] a`` (``b x b`` solve) and
``zeta = R - g_bar^T (lambda_g I + g_bar g_bar^T)^{-1} (g_bar R)`` (``rb x rb`` solve).
Each side switches to the direct form (an ``n x n`` or ``m x m`` solve) when its
number of rows is at least the dimension (``b >= n``, ``rb >= m``).
``lambda_g=None`` is the limit ``lambda_g -> infinity`` (theorem 3, eq. 21),
``zeta* = R``, which needs only the layer inputs and the output gradients (no
backpropagated curvature). ``lambda_a -> infinity`` gives the gradient (theorem 1 ii).

A bias is its own block with input factor ``A = [1]`` undamped (as in
:class:`~hbpkit.optim.KroneckerPreconditioner`): ``zeta_b = lambda_g (G + lambda_g I)^{-1}
grad_b``, the gradient itself for ``zeta*``.

``zeta`` replaces the gradient of an optimizer (eq. 18, ``theta -= lr * zeta`` for
SGD): :meth:`ISAAC.step` writes it into ``p.grad`` and calls the ``base``
optimizer (SGD, SGD with momentum, Adam, ...). Parameter groups with
``precondition=False`` keep their gradient (the paper's experiment E3).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from hbpkit.optim.curvatures import loss_of, missing_g_bar, with_quantities

SAVEFIELD = "kronecker_roots"


def input_side(g: Tensor, a: Tensor, lambda_a: float) -> Tensor:
    """``R = grad lambda_a (a^T a / b + lambda_a I)^{-1}`` ``[m, n]``; ``g [b, m]``, ``a [b, n]``.

    Woodbury (ISAAC eq. 20/21) if ``b < n``: ``g^T [b lambda_a (b lambda_a I + a a^T)^{-1}] a``;
    else the direct ``n x n`` solve.
    """
    b, n = a.shape
    if b < n:
        K = a @ a.T
        K.diagonal().add_(b * lambda_a)
        M = torch.linalg.solve(K, g) * (b * lambda_a)  # [b, m], K symmetric
        return M.T @ a
    A = a.T @ a / b
    A.diagonal().add_(lambda_a)
    grad = g.T @ a
    return torch.linalg.solve(A, grad.T).T * lambda_a


def output_side(g_bar: Tensor, R: Tensor, lambda_g: float) -> Tensor:
    """``lambda_g (g_bar^T g_bar + lambda_g I)^{-1} R`` for ``R [m, k]``, ``g_bar [rb, m]``.

    Woodbury if ``rb < m``: ``R - g_bar^T (lambda_g I + g_bar g_bar^T)^{-1} g_bar R``;
    else the direct ``m x m`` solve.
    """
    rows, m = g_bar.shape
    if rows < m:
        K = g_bar @ g_bar.T
        K.diagonal().add_(lambda_g)
        return R - g_bar.T @ torch.linalg.solve(K, g_bar @ R)
    G = g_bar.T @ g_bar
    G.diagonal().add_(lambda_g)
    return torch.linalg.solve(G, R) * lambda_g


def isaac_direction(roots: Any, grad: Tensor, lambda_a: float, lambda_g: float | None) -> Tensor:
    """``zeta`` (``lambda_g`` a number) or ``zeta*`` (``None``) for one parameter, like ``grad``.

    ``roots``: the parameter's :class:`~hbpkit.extensions.roots.FactorRoots` (``a`` is
    ``None`` for a bias).
    """
    m = roots.g.shape[1]
    if roots.a is None:
        R = grad.reshape(m, -1)
    else:
        R = input_side(roots.g, roots.a, lambda_a)
    if lambda_g is not None:
        R = output_side(roots.g_bar, R, lambda_g)
    return R.reshape(grad.shape)


class ISAAC(torch.optim.Optimizer):
    """ISAAC's ``zeta`` / ``zeta*`` in place of the gradient of a base optimizer.

    Training loop::

        opt = ISAAC(model.parameters(), lr=0.1, lambda_a=1.0)   # zeta*, SGD
        opt = ISAAC(model.parameters(), lr=1e-3, lambda_a=1.0, lambda_g=0.1,
                    base=torch.optim.Adam)                        # zeta, Adam
        opt.zero_grad()
        with backprop(*opt.extensions):
            loss_fn(model(X), y).backward()
        opt.step()

    Args:
        params: parameters or groups (groups may set ``lambda_a``, ``lambda_g``,
            ``precondition`` and the base optimizer's options).
        lr: the base optimizer's step size ``eta*`` of eq. 18.
        lambda_a: input regularisation ``lambda_a > 0``.
        lambda_g: output regularisation ``lambda_g > 0``, or ``None`` for ``zeta*``.
        loss_hessian: what ``g_bar`` roots (``"sampled"``, the paper's random
            labels; ``"exact"``; ``"empirical"``), unused for ``zeta*``.
        mc_samples: draws for ``"sampled"``.
        precondition: ``False`` keeps the plain gradient (per group).
        base: the optimizer class that takes the step (``torch.optim.SGD`` default).
        **base_kwargs: passed to ``base`` (``momentum=0.9``, ``betas=...``).

    ``p.grad`` holds ``zeta`` after :meth:`step`. Needs ``Linear`` / ``Conv`` layers
    (``kfac_approx="expand"`` rows, so that ``g^T a`` is the gradient).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.1,
        lambda_a: float = 1.0,
        lambda_g: float | None = None,
        loss_hessian: str = "sampled",
        mc_samples: int = 1,
        precondition: bool = True,
        base: type[torch.optim.Optimizer] = torch.optim.SGD,
        **base_kwargs: Any,
    ) -> None:
        defaults = dict(lambda_a=lambda_a, lambda_g=lambda_g, precondition=precondition)
        self._check_group(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)
        self.loss_hessian = loss_hessian
        self.mc_samples = mc_samples
        self.base = base(self.param_groups, lr=lr, **base_kwargs)
        self._extension = None

    @staticmethod
    def _check_group(group: dict) -> None:
        if not group["lambda_a"] > 0:
            raise ValueError(f"lambda_a must be positive, got {group['lambda_a']}")
        if group["lambda_g"] is not None and not group["lambda_g"] > 0:
            raise ValueError(f"lambda_g must be positive or None (zeta*), got {group['lambda_g']}")

    @property
    def extensions(self) -> tuple:
        """``KroneckerRoots`` without ``g_bar`` if every group uses ``zeta*``, else with it."""
        if self._extension is None:
            from hbpkit.extensions import KroneckerRoots

            need_g_bar = any(
                g["precondition"] and g["lambda_g"] is not None for g in self.param_groups
            )
            loss_hessian = self.loss_hessian if need_g_bar else None
            self._extension = KroneckerRoots(loss_hessian, self.mc_samples, "expand")
        return (self._extension,)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Replace each preconditioned ``p.grad`` by ``zeta``, then take the base step."""
        loss = loss_of(closure)
        todo = with_quantities(self.param_groups, SAVEFIELD, lambda g: g["precondition"])
        for group, p, roots in todo:
            if group["lambda_g"] is not None and roots.g_bar is None:
                raise missing_g_bar(p, f"lambda_g={group['lambda_g']}")
        directions = [
            isaac_direction(roots, p.grad, group["lambda_a"], group["lambda_g"])
            for group, p, roots in todo
        ]
        for (_, p, _), zeta in zip(todo, directions):
            p.grad.copy_(zeta)
        self.base.step()
        return loss
