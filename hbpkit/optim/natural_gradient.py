"""Exact subsampled natural gradient through the ``b x b`` Woodbury identity.

The FOOF paper's baseline (Benzing 2022, appendix I, after Ren and Goldfarb 2019).
The curvature of a mini-batch is a sum of ``R = r * N`` outer products of
parameter-space vectors ``u_{v,n} = J_n^T s_{v,n}`` (``s`` the columns of the
loss-Hessian root: sampled labels for the Fisher, exact for the GGN, the true
labels' gradients for the empirical Fisher), ``F = U^T U`` with ``U`` ``[R, P]``.
With ``K = U U^T`` (``R x R``), eq. 20 of the paper::

    (F + lambda I)^{-1} grad = (grad - U^T (lambda I + K)^{-1} U grad) / lambda

``U`` is never formed. For a weight with roots ``a`` (rows ``(n, t)``, ``T``
positions) and ``g_bar`` (rows ``(v, n, t)``) from ``KroneckerRoots``, the row of
``(v, n)`` is ``sum_t g_bar[v,n,t] a[n,t]^T`` (rank ``T``), so (eqs. 21-23)::

    K[r, q]   = sum_{t, s} (g_bar[r,t] . g_bar[q,s]) (a[r,t] . a[q,s])
    (U V)[r]  = sum_t g_bar[r,t]^T V a[r,t]
    U^T w     = sum_{r, t} w[r] g_bar[r,t] a[r,t]^T

(a bias has ``a = 1``). ``blocks="global"`` sums ``K`` and ``U grad`` over all
parameters (the full subsampled curvature); ``blocks="parameter"`` solves each
parameter's block on its own (block-diagonal, hbpkit's blocks: weight and bias
separately). The step is ``p <- p - lr * d`` (with optional heavy-ball momentum).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from hbpkit.optim.curvatures import heavy_ball, loss_of, missing_g_bar, with_quantities

SAVEFIELD = "kronecker_roots"
BLOCKS = ("global", "parameter")
FISHERS = ("sampled", "exact", "empirical")


class SampleRows:
    """One parameter's rows of ``U``: ``g_bar`` ``[R, T, m]`` and ``a`` ``[R, T, n]``."""

    def __init__(self, roots, param_shape: torch.Size) -> None:
        T = roots.positions
        g_bar = roots.g_bar.reshape(-1, T, roots.g_bar.shape[1])  # [R, T, m]
        R = g_bar.shape[0]
        if roots.a is None:
            a = torch.ones(R, T, 1, dtype=g_bar.dtype, device=g_bar.device)
        else:
            a = roots.a.reshape(-1, T, roots.a.shape[1])  # [N, T, n]
            a = a.repeat(R // a.shape[0], 1, 1)  # rows (v, n): v-major, like g_bar
        self.g_bar, self.a, self.shape = g_bar, a, param_shape

    def gram(self) -> Tensor:
        """``U U^T`` ``[R, R]`` (eq. 22)."""
        if self.a.shape[1] == 1:
            return (self.g_bar[:, 0] @ self.g_bar[:, 0].T) * (self.a[:, 0] @ self.a[:, 0].T)
        gg = torch.einsum("rtm,qsm->rtqs", self.g_bar, self.g_bar)
        aa = torch.einsum("rtn,qsn->rtqs", self.a, self.a)
        return (gg * aa).sum((1, 3))

    def apply(self, V: Tensor) -> Tensor:
        """``U vec(V)`` ``[R]`` for a parameter-shaped ``V`` (eq. 21)."""
        V = V.reshape(self.g_bar.shape[2], -1)
        return torch.einsum("rtm,mn,rtn->r", self.g_bar, V, self.a)

    def apply_t(self, w: Tensor) -> Tensor:
        """``U^T w`` for ``w`` ``[R]``, parameter-shaped (eq. 23)."""
        return torch.einsum("r,rtm,rtn->mn", w, self.g_bar, self.a).reshape(self.shape)


def woodbury_directions(
    rows: list[SampleRows], grads: list[Tensor], damping: float
) -> list[Tensor]:
    """``(U^T U + damping I)^{-1} grad`` for the stacked parameters (one shared ``K``)."""
    K = sum(r.gram() for r in rows)
    K.diagonal().add_(damping)
    w = torch.linalg.solve(K, sum(r.apply(g) for r, g in zip(rows, grads)))
    return [(g - r.apply_t(w)) / damping for r, g in zip(rows, grads)]


class SubsampledNaturalGradient(torch.optim.Optimizer):
    """Exact damped natural-gradient (or Gauss-Newton) steps on the mini-batch's curvature.

    Training loop::

        opt = SubsampledNaturalGradient(model.parameters(), lr=0.1, damping=1e-2)
        opt.zero_grad()
        with backprop(*opt.extensions):
            loss_fn(model(X), y).backward()
        opt.step()

    Args:
        params: parameters or groups (groups may override ``lr``, ``damping``,
            ``momentum``; with ``blocks="global"`` all groups share the first
            group's damping).
        lr: step size.
        damping: ``lambda > 0``.
        fisher: ``"sampled"`` (Monte-Carlo Fisher, ``mc_samples`` labels per
            sample), ``"exact"`` (the GGN) or ``"empirical"``.
        blocks: ``"global"`` or ``"parameter"`` (block-diagonal).
        momentum: heavy-ball momentum on the direction.

    Needs ``Linear`` / ``Conv`` layers (``KroneckerRoots``).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.1,
        damping: float = 1e-2,
        fisher: str = "sampled",
        mc_samples: int = 1,
        blocks: str = "global",
        momentum: float = 0.0,
    ) -> None:
        if fisher not in FISHERS:
            raise ValueError(f"fisher={fisher!r} is not one of {FISHERS}")
        if blocks not in BLOCKS:
            raise ValueError(f"blocks={blocks!r} is not one of {BLOCKS}")
        defaults = dict(lr=lr, damping=damping, momentum=momentum)
        self._check_group(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)
        self.fisher, self.mc_samples, self.blocks = fisher, mc_samples, blocks
        self._extension = None

    @staticmethod
    def _check_group(group: dict) -> None:
        if not group["damping"] > 0:
            raise ValueError(f"damping must be positive, got {group['damping']}")
        if group["lr"] < 0 or not 0 <= group["momentum"] < 1:
            raise ValueError("lr must be non-negative and momentum in [0, 1)")

    @property
    def extensions(self) -> tuple:
        """``(KroneckerRoots(fisher, mc_samples),)``."""
        if self._extension is None:
            from hbpkit.extensions import KroneckerRoots

            self._extension = KroneckerRoots(self.fisher, self.mc_samples, "expand")
        return (self._extension,)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One damped natural-gradient step for every parameter with a gradient."""
        loss = loss_of(closure)
        todo = []
        for group, p, roots in with_quantities(self.param_groups, SAVEFIELD):
            if roots.g_bar is None:
                raise missing_g_bar(p, "the natural gradient")
            todo.append((group, p, SampleRows(roots, p.shape)))
        if not todo:
            return loss
        grads = [p.grad for _, p, _ in todo]
        if self.blocks == "global":
            counts = {r.g_bar.shape[0] for _, _, r in todo}
            if len(counts) != 1:
                raise RuntimeError(
                    f"blocks='global' needs the same samples for every parameter, got row "
                    f"counts {sorted(counts)}: run one backward pass of one loss"
                )
            rows = [r for _, _, r in todo]
            directions = woodbury_directions(rows, grads, todo[0][0]["damping"])
        else:
            directions = [
                woodbury_directions([r], [g], group["damping"])[0]
                for (group, _, r), g in zip(todo, grads)
            ]
        for (group, p, _), d in zip(todo, directions):
            d = heavy_ball(self.state[p], d, group["momentum"])
            p.add_(d, alpha=-group["lr"])
        return loss
