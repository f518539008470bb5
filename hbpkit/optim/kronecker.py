"""A K-FAC-style optimizer on the Kronecker factors of ``KFAC``, ``KFLR``, ``KFRA`` or ``HBP``.

Per parameter, with ``(G, A)`` the factors of a weight (``(G,)`` for a bias) as
attached by the extension (hbpkit convention: ``kron(G, A)`` approximates the
block in ``p.flatten()`` order, the weight matricised as ``[out, rest]``):

1. **Moving averages** ``G <- ema * G + (1 - ema) * G_new`` (same for ``A``),
   every step. The first step initialises the averages with the factors
   themselves (no bias towards zero), so ``ema=0`` uses the current factors only.
2. **Damped inverses**, recomputed from the averages at steps ``0, T, 2T, ...``
   (``T = update_every``) and reused in between, with factored Tikhonov damping
   (Martens and Grosse 2015, section 6.3)::

       pi    = sqrt((tr A / dim A) / (tr G / dim G))
       G_inv = (G + pi sqrt(damping) I)^{-1},  A_inv = (A + sqrt(damping) / pi I)^{-1}

   (``pi = 1`` if a trace is not positive). A bias, factor ``(G,)``, gets
   ``G_inv = (G + sqrt(damping) I)^{-1}``: biases are their own blocks in hbpkit
   (not folded into the weight), and this is the weight's rule with ``A = [1]``
   undamped. Inverses are ``torch.linalg.inv`` of the symmetrised damped factors.
3. **Direction** ``D = G_inv grad A_inv`` (the weight's gradient matricised as
   ``[out, rest]``), ``D = G_inv grad`` for a bias.
4. **Momentum** (heavy ball, as ``torch.optim.SGD`` without dampening):
   ``buf <- momentum * buf + D``; then ``p <- p - lr * buf``.

Curvature factors are read on every step (the moving average needs them), so
every backward pass before ``step()`` runs inside ``backprop(*opt.extensions)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from hbpkit.optim.curvatures import (
    KRONECKER_CURVATURES,
    CurvatureOptimizer,
    missing_quantity,
)


def damped_inverses(factors: list[Tensor], damping: float) -> list[Tensor]:
    """Factored-Tikhonov damped inverses of ``(G, A)`` or ``(G,)`` (see the module doc)."""
    sqrt_damping = math.sqrt(damping)
    if len(factors) == 1:
        shifts = [sqrt_damping]
    elif len(factors) == 2:
        G, A = factors
        mean_g = (G.diagonal().sum() / G.shape[0]).item()
        mean_a = (A.diagonal().sum() / A.shape[0]).item()
        if mean_g > 0 and mean_a > 0 and math.isfinite(mean_g) and math.isfinite(mean_a):
            pi = math.sqrt(mean_a / mean_g)
        else:
            pi = 1.0
        shifts = [pi * sqrt_damping, sqrt_damping / pi]
    else:
        raise ValueError(f"expected factors (G, A) or (G,), got {len(factors)} factors")
    inverses = []
    for f, shift in zip(factors, shifts):
        sym = 0.5 * (f + f.T)
        eye = torch.eye(f.shape[0], dtype=f.dtype, device=f.device)
        inverses.append(torch.linalg.inv(sym + shift * eye))
    return inverses


def precondition(inverses: list[Tensor], grad: Tensor) -> Tensor:
    """``G_inv grad A_inv`` (or ``G_inv grad``), shaped like ``grad``."""
    V = grad.reshape(inverses[0].shape[0], -1)
    out = inverses[0] @ V
    if len(inverses) == 2:
        out = out @ inverses[1].T
    return out.reshape(grad.shape)


class KroneckerPreconditioner(CurvatureOptimizer):
    """K-FAC-style preconditioned steps from the Kronecker factors the extensions attach.

    Training loop::

        opt = KroneckerPreconditioner(model.parameters(), curvature="kfac", lr=0.1,
                                      damping=1e-3, update_every=10, momentum=0.9)
        opt.zero_grad()
        with backprop(*opt.extensions):
            loss_fn(model(X), y).backward()
        opt.step()

    Args:
        params: parameters or parameter groups (groups may override ``lr``,
            ``damping``, ``momentum``, ``ema``, ``update_every``).
        curvature: ``"kfac"``, ``"kflr"``, ``"kfra"`` or ``"hbp"``: which factors.
        lr: step size.
        damping: Tikhonov damping ``lambda``, split between the factors as above.
        update_every: recompute the damped inverses every this many steps.
        momentum: heavy-ball momentum on the preconditioned direction.
        ema: decay of the factors' moving averages (0: current factors only).
        extension: the hbpkit extension to run instead of the default one for
            ``curvature`` (same savefield), e.g. ``KFAC(mc_samples=4)`` or
            ``HBP("pch-abs", "average", "batch-average")`` with ``curvature="hbp"``.

    See the module docstring for the formulas. ``opt.state[p]`` holds ``"step"``,
    ``"factors"`` (the averages), ``"inverses"`` and ``"momentum_buffer"``.
    """

    def __init__(
        self,
        params: Iterable,
        curvature: str = "kfac",
        lr: float = 0.1,
        damping: float = 1e-3,
        update_every: int = 1,
        momentum: float = 0.0,
        ema: float = 0.95,
        extension: Any = None,
    ) -> None:
        defaults = dict(
            lr=lr, damping=damping, update_every=update_every, momentum=momentum, ema=ema
        )
        self._setup(params, curvature, KRONECKER_CURVATURES, extension, defaults)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        every = group["update_every"]
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"update_every must be a positive integer, got {every!r}")
        if not 0 <= group["momentum"] < 1:
            raise ValueError(f"momentum must be in [0, 1), got {group['momentum']}")
        if not 0 <= group["ema"] < 1:
            raise ValueError(f"ema must be in [0, 1), got {group['ema']}")

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One preconditioned step per parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        savefield = self.curvature_spec.savefield
        # read every quantity first, so a missing one raises before any parameter moves
        todo = []
        for g_idx, group in enumerate(self.param_groups):
            for p_idx, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                factors = getattr(p, savefield, None)
                if factors is None:
                    raise missing_quantity(
                        f"{p_idx} of group {g_idx} (shape {tuple(p.shape)})", savefield
                    )
                if not isinstance(factors, tuple) or len(factors) not in (1, 2):
                    raise TypeError(
                        f"p.{savefield} must be Kronecker factors (G, A) or (G,), "
                        f"got {type(factors)}"
                    )
                todo.append((group, p, factors))
        due = [(group, p) for group, p, factors in todo if self._average(group, p, factors)]
        if due:
            self._refresh_inverses(due)
        for group, p, _ in todo:
            self._descend(group, p)
        return loss

    def _average(self, group: dict, p: Tensor, factors: tuple) -> bool:
        """Fold the new factors into the moving average; whether ``p``'s inverses are due."""
        state = self.state[p]
        factors = [f.detach() for f in factors]
        if "factors" not in state:
            state["factors"] = [f.clone() for f in factors]
        else:
            ema = group["ema"]
            state["factors"] = [
                ema * avg + (1.0 - ema) * f for avg, f in zip(state["factors"], factors)
            ]
        step = state.get("step", 0)
        return step % group["update_every"] == 0 or "inverses" not in state

    def _refresh_inverses(self, due: list[tuple[dict, Tensor]]) -> None:
        """Recompute ``state[p]["inverses"]`` for every ``(group, p)`` in ``due``.

        The one place inverses are formed: a subclass may spread this work (e.g.
        over processes) as long as every ``state[p]["inverses"]`` is set on return.
        """
        for group, p in due:
            state = self.state[p]
            state["inverses"] = damped_inverses(state["factors"], group["damping"])

    def _descend(self, group: dict, p: Tensor) -> None:
        """Precondition ``p.grad``, apply momentum, take the step."""
        state = self.state[p]
        d = precondition(state["inverses"], p.grad.detach())
        if group["momentum"] != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = d.clone()
            else:
                buf.mul_(group["momentum"]).add_(d)
            state["momentum_buffer"] = buf
            d = buf
        p.add_(d, alpha=-group["lr"])
        state["step"] = state.get("step", 0) + 1
