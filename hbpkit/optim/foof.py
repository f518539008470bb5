"""FOOF, gradient descent on neurons (Benzing 2022, eq. 6 and algorithm 1).

Per weight ``[m, n]`` with input covariance ``A = a^T a / b`` (``p.input_covariance``
from :class:`~hbpkit.extensions.InputCovariance`, computed without extra passes):

1. **Moving average** ``Sigma <- ema * Sigma + (1 - ema) * A`` over the ``S``
   steps up to and including each inversion step (``t mod T in {0, T-1, ...,
   T-S+1}``; ``S = T`` averages every step). The first step initialises
   ``Sigma = A`` (the paper's normalised average).
2. **Damped inverse** ``P = (Sigma + lambda I)^{-1}`` at steps ``0, T, 2T, ...``
   (after that step's average; algorithm 1 inverts before folding the current
   batch in and warms up on 50 batches, which this order makes unnecessary).
3. **Direction** ``D = grad P`` (eq. 6: ``(Delta W)^T = (lambda I + A A^T)^{-1} A E^T``;
   the weight matricised as ``[m, rest]``). A bias, input ``1``: ``D = grad / (1 + lambda)``.
   A grouped convolution (``Sigma`` ``[g, n, n]``, one per group): per group, the weight's
   group ``i`` matricised as ``[m/g, n]``.
4. **Step** with heavy-ball momentum and decoupled weight decay::

       buf <- momentum * buf + D;   p <- p - lr * lambda * buf - lr * weight_decay * p

Step size: the paper suggests ``alpha / lambda``; here the step is ``lr * lambda * D``
(docs/optimizers.md, ISAAC, FOOF), so ``lambda -> infinity`` is SGD with rate ``lr``, and with
``ema=0, update_every=1`` the step is exactly ``lr`` times ISAAC's ``zeta*`` with
``lambda_a = lambda`` (both tested).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from hbpkit.optim.curvatures import heavy_ball, loss_of, with_quantities
from hbpkit.optim.kronecker import spd_inverse

SAVEFIELD = "input_covariance"


class FOOF(torch.optim.Optimizer):
    """Gradient descent on neurons: ``grad (Sigma + lambda I)^{-1}`` with amortised inverses.

    Training loop::

        opt = FOOF(model.parameters(), lr=0.1, damping=1.0, update_every=100)
        opt.zero_grad()
        with backprop(*opt.extensions):
            loss_fn(model(X), y).backward()
        opt.step()

    Args:
        params: parameters or groups (groups may override every option below).
        lr: step size (``lr * damping`` multiplies the preconditioned gradient).
        damping: ``lambda > 0``.
        ema: decay ``m`` of the moving average of ``A`` (0.95 in the paper).
        update_every: ``T``, invert every this many steps.
        update_window: ``S <= T``, average ``A`` over the last ``S`` steps before an
            inversion (default ``T``: every step).
        momentum: heavy-ball momentum on the preconditioned direction.
        weight_decay: decoupled weight decay.

    ``opt.state[p]`` holds ``"step"``, ``"sigma"``, ``"inverse"``, ``"momentum_buffer"``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.1,
        damping: float = 1.0,
        ema: float = 0.95,
        update_every: int = 1,
        update_window: int | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = dict(
            lr=lr,
            damping=damping,
            ema=ema,
            update_every=update_every,
            update_window=update_window,
            momentum=momentum,
            weight_decay=weight_decay,
        )
        self._check_group(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)
        self._extension = None

    @staticmethod
    def _check_group(group: dict) -> None:
        every, window = group["update_every"], group["update_window"]
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"update_every must be a positive integer, got {every!r}")
        if window is not None and (not isinstance(window, int) or not 1 <= window <= every):
            raise ValueError(
                f"update_window must be an integer in [1, update_every={every}], got {window!r}"
            )
        if not group["damping"] > 0:
            raise ValueError(f"damping must be positive, got {group['damping']}")
        if group["lr"] < 0 or group["weight_decay"] < 0:
            raise ValueError("lr and weight_decay must be non-negative")
        if not 0 <= group["ema"] < 1 or not 0 <= group["momentum"] < 1:
            raise ValueError("ema and momentum must be in [0, 1)")

    @property
    def extensions(self) -> tuple:
        """``(InputCovariance(),)``: the step needs ``p.input_covariance``."""
        if self._extension is None:
            from hbpkit.extensions import InputCovariance

            self._extension = InputCovariance()
        return (self._extension,)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One FOOF step for every parameter with a gradient."""
        loss = loss_of(closure)
        for group, p, cov in with_quantities(self.param_groups, SAVEFIELD):
            self._update(group, p, cov.detach())
        return loss

    def _update(self, group: dict, p: Tensor, cov: Tensor) -> None:
        state = self.state[p]
        t = state.get("step", 0)
        T = group["update_every"]
        S = T if group["update_window"] is None else group["update_window"]
        if "sigma" not in state:
            state["sigma"] = cov.clone()
        elif (-t) % T < S:
            state["sigma"].mul_(group["ema"]).add_(cov, alpha=1.0 - group["ema"])
        if t % T == 0 or "inverse" not in state:
            sigma, damping = state["sigma"], group["damping"]
            if sigma.dim() == 3:  # per group of a grouped convolution
                state["inverse"] = torch.stack([spd_inverse(s, damping) for s in sigma])
            else:
                state["inverse"] = spd_inverse(sigma, damping)
        inverse = state["inverse"]
        rows = (inverse.shape[0], -1) if inverse.dim() == 3 else (p.shape[0],)
        d = (p.grad.reshape(*rows, inverse.shape[-1]) @ inverse).reshape(p.shape)
        d = heavy_ball(state, d, group["momentum"])
        if group["weight_decay"] != 0:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
        p.add_(d, alpha=-group["lr"] * group["damping"])
        state["step"] = t + 1
