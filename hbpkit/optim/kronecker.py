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
   This is ``damping_mode="factored"`` (the default); two more modes compare the
   dampings of the FOOF paper (Benzing 2022):

   * ``"heuristic"`` (its eq. 4, Martens and Grosse's pi-damping):
     ``(A + lambda_A I) kron (G + lambda_G I)`` with ``lambda_A lambda_G = damping``
     and ``lambda_A / lambda_G = (tr A / dim A) / (tr G / dim G)`` (a bias: ``A = [1]``,
     damped like any factor). Unlike ``"factored"``, the larger damping goes to the
     factor with the larger mean eigenvalue, so both get the same relative damping.
   * ``"correct"`` (its eq. 3): ``(G kron A + damping I)^{-1}`` exactly, through the
     eigendecompositions ``G = Q_G diag(g) Q_G^T``, ``A = Q_A diag(a) Q_A^T``:
     ``D = Q_G [(Q_G^T grad Q_A) / (g a^T + damping)] Q_A^T``; ``state[p]["inverses"]``
     then holds ``[Q_G, Q_A, 1 / (g a^T + damping)]`` (``[Q_G, 1 / (g + damping)]``).
3. **Direction** ``D = G_inv grad A_inv`` (the weight's gradient matricised as
   ``[out, rest]``), ``D = G_inv grad`` for a bias.
4. **Momentum** (heavy ball, as ``torch.optim.SGD`` without dampening):
   ``buf <- momentum * buf + D``; then ``p <- p - lr * buf``.

Grouped factors (a convolution with ``groups = g > 1``: ``G`` ``[g, m, m]``, ``A``
``[g, k, k]``, the block block-diagonal over the groups, ``hbpkit/curvature/kronecker.py``)
are damped and inverted group by group, each group like the weight of a layer of its own
(its own ``pi``), and the gradient is matricised per group (``[g, m, k]``); transposed
convolutions' factors (``transposed``) matricise each group with its first two dimensions
swapped. So the step on a grouped convolution is the step on its ``g`` separate convolutions.

Curvature factors are read on every step (the moving average needs them), so
every backward pass before ``step()`` runs inside ``backprop(*opt.extensions)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from hbpkit.curvature.kronecker import matricise, unmatricise
from hbpkit.optim.curvatures import (
    KRONECKER_CURVATURES,
    CurvatureOptimizer,
    heavy_ball,
    iter_quantities,
    loss_of,
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


def spd_inverse(matrix: Tensor, shift: float) -> Tensor:
    """``(sym(matrix) + shift I)^{-1}`` through a Cholesky factorisation (``shift > 0``).

    Falls back to ``torch.linalg.inv`` where rounding makes the factorisation fail
    (float32 factors with a tiny shift).
    """
    sym = 0.5 * (matrix + matrix.T)
    sym.diagonal().add_(shift)
    L, info = torch.linalg.cholesky_ex(sym)
    if int(info) != 0:
        return torch.linalg.inv(sym)
    return torch.cholesky_inverse(L)


def heuristic_inverses(factors: list[Tensor], damping: float) -> list[Tensor]:
    """FOOF eq. 4: ``(G + lambda_G I)^{-1}, (A + lambda_A I)^{-1}``, pi-damping (module doc).

    ``lambda_A lambda_G = damping``, ``lambda_A / lambda_G = (tr A / dim A) / (tr G / dim G)``.
    A bias ``(G,)`` is the weight's rule with ``A = [1]``:
    ``(G + lambda_G I)^{-1} / (1 + lambda_A)``.
    """
    if len(factors) not in (1, 2):
        raise ValueError(f"expected factors (G, A) or (G,), got {len(factors)} factors")
    G = factors[0]
    A = factors[1] if len(factors) == 2 else torch.ones(1, 1, dtype=G.dtype, device=G.device)
    mean_g = (G.diagonal().sum() / G.shape[0]).item()
    mean_a = (A.diagonal().sum() / A.shape[0]).item()
    ratio = mean_a / mean_g if mean_g > 0 and mean_a > 0 else 1.0
    ratio = ratio if math.isfinite(ratio) else 1.0
    lambda_a, lambda_g = math.sqrt(damping * ratio), math.sqrt(damping / ratio)
    inverses = [spd_inverse(G, lambda_g), spd_inverse(A, lambda_a)]
    if len(factors) == 1:
        return [inverses[0] * inverses[1][0, 0]]
    return inverses


def correct_inverses(factors: list[Tensor], damping: float) -> list[Tensor]:
    """FOOF eq. 3: eigenbases and ``1 / (g a^T + damping)`` of ``(G kron A + damping I)^{-1}``."""
    if len(factors) not in (1, 2):
        raise ValueError(f"expected factors (G, A) or (G,), got {len(factors)} factors")
    eig_g, Q_g = torch.linalg.eigh(0.5 * (factors[0] + factors[0].T))
    if len(factors) == 1:
        return [Q_g, 1.0 / (eig_g[:, None] + damping)]
    eig_a, Q_a = torch.linalg.eigh(0.5 * (factors[1] + factors[1].T))
    return [Q_g, Q_a, 1.0 / (eig_g[:, None] * eig_a[None, :] + damping)]


def per_group(invert: Callable[[list[Tensor], float], list[Tensor]]):
    """``invert`` applied to each group of grouped factors ``[g, n, n]`` (results stacked);
    ungrouped factors ``[n, n]`` go to ``invert`` as they are."""

    def grouped(factors: list[Tensor], damping: float) -> list[Tensor]:
        if factors[0].dim() == 2:
            return invert(factors, damping)
        each = [invert([f[i] for f in factors], damping) for i in range(factors[0].shape[0])]
        return [torch.stack(parts) for parts in zip(*each)]

    grouped.__name__ = grouped.__qualname__ = invert.__name__
    grouped.__doc__ = invert.__doc__
    return grouped


#: ``damping_mode -> (factors, damping) -> state[p]["inverses"]`` (grouped factors per group)
DAMPING_MODES = {
    "factored": per_group(damped_inverses),
    "heuristic": per_group(heuristic_inverses),
    "correct": per_group(correct_inverses),
}


def _as_groups(first: Tensor, grad: Tensor, transposed: bool) -> Tensor:
    """``grad`` as ``[g, m, k]`` in the layout of factors whose first is ``first``."""
    groups = first.shape[0] if first.dim() == 3 else 1
    if transposed:
        return matricise(grad, grad.shape, groups, True)
    return grad.reshape(groups, first.shape[-1], -1)  # [m, m] may span several dimensions


def _from_groups(out: Tensor, grad: Tensor, transposed: bool) -> Tensor:
    groups = out.shape[0]
    return unmatricise(out, grad.shape, groups, transposed)


def precondition_correct(inverses: list[Tensor], grad: Tensor, transposed: bool = False) -> Tensor:
    """``(G kron A + damping I)^{-1} grad`` from :func:`correct_inverses`, shaped like ``grad``
    (grouped inverses per group; ``transposed``: the factors' layout, see the module doc)."""
    Q_g, scale = inverses[0], inverses[-1]
    V = _as_groups(Q_g, grad, transposed)
    Q_g, scale = Q_g.reshape(-1, *Q_g.shape[-2:]), scale.reshape(-1, *scale.shape[-2:])
    if len(inverses) == 3:
        Q_a = inverses[1].reshape(-1, *inverses[1].shape[-2:])
        out = Q_g @ ((Q_g.mT @ V @ Q_a) * scale) @ Q_a.mT
    else:
        out = Q_g @ ((Q_g.mT @ V) * scale)
    return _from_groups(out, grad, transposed)


def precondition(inverses: list[Tensor], grad: Tensor, transposed: bool = False) -> Tensor:
    """``G_inv grad A_inv`` (or ``G_inv grad``), shaped like ``grad`` (grouped inverses per
    group; ``transposed``: the factors' layout, see the module doc)."""
    V = _as_groups(inverses[0], grad, transposed)
    out = inverses[0].reshape(-1, *inverses[0].shape[-2:]) @ V
    if len(inverses) == 2:
        out = out @ inverses[1].reshape(-1, *inverses[1].shape[-2:]).mT
    return _from_groups(out, grad, transposed)


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
        curvature: ``"kfac"`` (Monte-Carlo), ``"kflr"`` (exact), ``"empirical"``
            (empirical Fisher, ``EmpiricalKFAC``), ``"kfra"`` or ``"hbp"``: which factors.
        lr: step size.
        damping: Tikhonov damping ``lambda``, split between the factors as above.
        update_every: recompute the damped inverses every this many steps.
        momentum: heavy-ball momentum on the preconditioned direction.
        ema: decay of the factors' moving averages (0: current factors only).
        damping_mode: ``"factored"`` (default), ``"heuristic"`` (FOOF eq. 4) or
            ``"correct"`` (FOOF eq. 3), see the module docstring.
        extension: the hbpkit extension to run instead of the default one for
            ``curvature`` (same savefield), e.g. ``KFAC(mc_samples=4)`` or
            ``HBP("pch-abs", "average", "batch-average")`` with ``curvature="hbp"``.

    See the module docstring for the formulas. ``opt.state[p]`` holds ``"step"``,
    ``"factors"`` (the averages), ``"inverses"``, ``"transposed"`` (the factors' layout)
    and ``"momentum_buffer"``.
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
        damping_mode: str = "factored",
    ) -> None:
        defaults = dict(
            lr=lr,
            damping=damping,
            update_every=update_every,
            momentum=momentum,
            ema=ema,
            damping_mode=damping_mode,
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
        if group.get("damping_mode", "factored") not in DAMPING_MODES:
            raise ValueError(
                f"damping_mode={group['damping_mode']!r} is not one of {tuple(DAMPING_MODES)}"
            )

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One preconditioned step per parameter that has a gradient."""
        loss = loss_of(closure)
        savefield = self.curvature_spec.savefield
        # read every quantity first, so a missing one raises before any parameter moves
        todo = []
        for group, p, factors in iter_quantities(self.param_groups, savefield):
            if not isinstance(factors, tuple) or len(factors) not in (1, 2):
                raise TypeError(
                    f"p.{savefield} must be Kronecker factors (G, A) or (G,), got {type(factors)}"
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
        state["transposed"] = bool(getattr(factors, "transposed", False))
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
            invert = DAMPING_MODES[group.get("damping_mode", "factored")]
            state["inverses"] = invert(state["factors"], group["damping"])

    def _descend(self, group: dict, p: Tensor) -> None:
        """Precondition ``p.grad``, apply momentum, take the step."""
        state = self.state[p]
        transposed = state.get("transposed", False)
        if group.get("damping_mode", "factored") == "correct":
            d = precondition_correct(state["inverses"], p.grad.detach(), transposed)
        else:
            d = precondition(state["inverses"], p.grad.detach(), transposed)
        d = heavy_ball(state, d, group["momentum"])
        p.add_(d, alpha=-group["lr"])
        state["step"] = state.get("step", 0) + 1
