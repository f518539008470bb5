"""GroupedNewton: one learning rate per subset of parameters from summarised derivatives.

Wolinski, "Adapting Newton's Method to Neural Networks through a Summary of
Higher-Order Derivatives": Method 1 with the training
loop of its algorithm 4 (appendix G). With a partition ``I_{S:P}`` of the parameters
into ``S`` subsets and a direction ``u_t``:

1. **Direction** (momentum on the gradients, ``mu_g`` = ``momentum``):
   ``u_t = momentum * u_{t-1} + (1 - momentum) * g_t``, ``u_1 = g_1``; ``g_t`` is ``p.grad``
   from the user's ordinary backward pass on the gradient batch ``Z_t``.
2. **Learning rates**, at steps ``0, T, 2T, ...`` (``T = update_every``, the paper's
   ``tau``; the paper's ``t % tau == 0`` with ``t`` from 0, so the first step has rates):
   on the loss of the Newton batch ``Z~_t`` returned by ``closure()``, the summarised
   derivatives ``g_bar = I U g``, ``H_bar = I U H U I^T`` and ``d3 = diag D^(3)(u)``
   (eqs. 9 and 15, nested autograd, :mod:`~hbpkit.optim.grouped_newton_derivatives`), then
   ``eta*``, the largest-``||D eta||`` solution of
   ``eta = (H_bar + damping_int / 2 ||D eta|| D^2)^{-1} g_bar``, ``D = Diag(|d3|^(1/3))``
   (eq. 10, Method 1, :mod:`~hbpkit.optim.grouped_newton_cubic`).
3. **Rate smoothing**: ``eta~_t = lr_momentum * eta~_prev + (1 - lr_momentum) * (eta*)_+``
   (``eta~ = (eta*)_+`` the first time; ``clip_negative=False`` keeps negative rates, as
   Method 1 without algorithm 4's positive part).
4. **Step**: ``theta <- theta - lr * U_t I_{P:S} eta~``: every scalar of subset ``s`` moves by
   ``-lr * eta~_s * u``; ``lr`` is the paper's step size ``lambda_t`` (``lambda_1`` at start).

Scheduling is the paper's ``torch.optim.lr_scheduler.ReduceLROnPlateau`` on ``lr``
(appendix G: called every epoch, patience 5, factor 0.5); attach it like to any optimizer.
``momentum=0, lr_momentum=0, update_every=1, clip_negative=False, lr=1`` and the same batch
for ``g`` and the closure is Method 1 / algorithm 1 exactly; ``damping_int=0`` drops the
cubic term (eq. 8), giving Cauchy's steepest descent with ``partition="trivial"`` and
Newton's method with ``partition="discrete"`` (appendix C).

Invariance (appendix E): with the gradient (or its momentum) as ``u``, the trajectory is
the same under ``theta_s = a_s theta~_s + b_s`` per subset: every guard below keeps it.

Degenerate summaries never raise (:mod:`~hbpkit.optim.grouped_newton_cubic` lists each
case): ``d3 = 0`` drops the cubic term (Newton's step where ``H_bar`` is positive definite),
tiny or subnormal summaries are solved exactly after a power-of-two scaling, and subsets
without a usable model (non-finite entries, no curvature, a minimiser beyond float64) get
``eta*_s = 0`` with a :class:`~hbpkit.optim.grouped_newton_cubic.DegenerateSummaryWarning`;
that 0 then goes through clipping and smoothing like any rate. An indefinite ``H_bar`` with
a tiny but non-zero ``d3`` is no degenerate case: its cubic model has a (large) minimiser,
and Method 1 takes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from hbpkit.optim.grouped_newton_cubic import cubic_regularised_lrs
from hbpkit.optim.grouped_newton_derivatives import Summary, summarise
from hbpkit.optim.grouped_newton_partition import Partition, build_partition

_STATE = "grouped_newton"  # key of the optimizer-wide state in ``self.state``


class GroupedNewton(torch.optim.Optimizer):
    """Per-subset learning rates from an ``S x S`` summary of the Hessian and cubic regularisation.

    Training loop (the closure returns the loss on the batch the learning rates are
    computed on, with its graph; it must not call ``backward()``; ``step`` calls it only at
    steps ``0, update_every, 2 update_every, ...``)::

        opt = GroupedNewton(model.parameters(), lr=0.1, damping_int=10.0)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=5)
        for X, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(X), y)
            loss.backward()
            opt.step(lambda: loss_fn(model(X_newton), y_newton))
        scheduler.step(epoch_loss)                      # once per epoch

    ``opt.extensions`` is ``()``: the step needs no hbpkit extension. It works on plain and
    on :func:`hbpkit.extend`-ed models; inside an active ``backprop(...)`` block the first
    derivative of the closure's loss is an ordinary backward pass for hbpkit, so the active
    extensions compute their quantities on the closure's batch as well.

    Args:
        params: the parameters (one group; subsets come from ``partition``). Tensors with
            ``requires_grad=False`` are left alone.
        lr: step size ``lambda`` (the paper's ``lambda_1`` initially), ``>= 0``.
        damping_int: internal damping ``lambda_int >= 0`` of the cubic term (0: none, eq. 8).
        momentum: ``mu_g`` in ``[0, 1)``, the moving average of the gradients that gives ``u``.
        lr_momentum: ``mu_eta`` in ``[0, 1)``, the moving average of the learning rates.
        update_every: ``tau``, recompute the learning rates every this many steps.
        partition: ``"canonical"`` (default), ``"trivial"``, ``"weights-biases"``,
            ``"blocks-k"``, ``"discrete"`` or a list of lists of the parameters
            (:mod:`~hbpkit.optim.grouped_newton_partition`).
        clip_negative: take the positive part of ``eta*`` (algorithm 4).

    After each step: :attr:`learning_rates` (``[S]``, the smoothed rates in use),
    :attr:`raw_learning_rates` (``[S]``, the last ``eta*``), :attr:`summary` (the last
    ``g_bar``, ``H_bar``, ``d3`` and loss) and :attr:`partition` (with ``.labels``).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.1,
        damping_int: float = 10.0,
        momentum: float = 0.9,
        lr_momentum: float = 0.5,
        update_every: int = 10,
        partition: str | Sequence[Sequence[Tensor]] = "canonical",
        clip_negative: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            damping_int=damping_int,
            momentum=momentum,
            lr_momentum=lr_momentum,
            update_every=update_every,
            clip_negative=clip_negative,
        )
        _check_hyperparameters(defaults)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(
                "GroupedNewton takes one parameter group (its subsets are a partition): pass "
                "partition=[[...], [...]] to choose the subsets"
            )
        self._params = [p for p in self.param_groups[0]["params"] if p.requires_grad]
        if not self._params:
            raise ValueError("GroupedNewton got no parameter with requires_grad=True")
        self.partition: Partition = build_partition(self._params, partition)

    @property
    def extensions(self) -> tuple:
        """No hbpkit extension is needed (the derivatives come from nested autograd)."""
        return ()

    @property
    def _global(self) -> dict:
        return self.state[_STATE]

    @property
    def learning_rates(self) -> Tensor | None:
        """``eta~ [S]``: the per-subset learning rates the steps use (``None`` before step 1)."""
        return self._global.get("learning_rates")

    @property
    def raw_learning_rates(self) -> Tensor | None:
        """``eta* [S]``: the last cubic-regularised solution, before clipping and smoothing."""
        return self._global.get("raw_learning_rates")

    @property
    def summary(self) -> Summary | None:
        """The last ``g_bar [S]``, ``H_bar [S, S]``, ``d3 [S]`` and loss of the Newton batch."""
        return self._global.get("summary")

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step; returns the closure's loss (detached) if it was called, else ``None``."""
        group = self.param_groups[0]
        _check_hyperparameters(group)
        grads = [p.grad for p in self._params]
        if all(g is None for g in grads):
            raise RuntimeError(
                "no parameter has a gradient: run loss.backward() on the gradient batch "
                "before opt.step(closure)"
            )
        u = self._directions(grads, group["momentum"])
        state = self._global
        step = state.get("step", 0)
        loss = None
        if step % group["update_every"] == 0:
            loss = self._update_learning_rates(closure, u, group)
        # nothing is written before here, so a failed update leaves the optimizer as it was
        for p, v in zip(self._params, u):
            self.state[p]["direction"] = v
        eta = state["learning_rates"]
        with torch.no_grad():
            for p, v, rate in zip(self._params, u, self.partition.expand(eta, self._params)):
                p.sub_(group["lr"] * rate * v)
        state["step"] = step + 1
        return loss

    def _directions(self, grads: list[Tensor | None], momentum: float) -> list[Tensor]:
        """``u_t``: the moving average of the gradients (``p.grad = None`` counts as zero)."""
        out = []
        for p, g in zip(self._params, grads):
            g = torch.zeros_like(p) if g is None else g.detach()
            previous = self.state[p].get("direction")
            if previous is None or momentum == 0:
                out.append(g.clone())
            else:
                out.append(momentum * previous + (1.0 - momentum) * g)
        return out

    def _update_learning_rates(
        self, closure: Callable[[], Tensor] | None, u: list[Tensor], group: dict
    ) -> Tensor:
        """Evaluate the closure, summarise, solve for ``eta*``, clip and smooth."""
        if closure is None:
            raise ValueError(
                f"step {self._global.get('step', 0)} recomputes the learning rates (every "
                f"update_every={group['update_every']} steps): pass "
                "opt.step(closure) with a closure returning the loss with its graph"
            )
        with torch.enable_grad():
            loss = closure()
        if not isinstance(loss, Tensor):
            raise TypeError(f"the closure must return the loss tensor, got {type(loss).__name__}")
        try:
            summary = summarise(
                loss, self._params, u, self.partition, third_order=group["damping_int"] > 0
            )
        except RuntimeError as error:
            if "second time" in str(error):
                raise RuntimeError(
                    "the closure's loss graph was freed: GroupedNewton differentiates the "
                    "closure's loss itself, so the closure must not call backward()"
                ) from error
            raise
        eta = cubic_regularised_lrs(summary.g_bar, summary.H_bar, summary.d3, group["damping_int"])
        state = self._global
        state["summary"] = summary
        state["raw_learning_rates"] = eta
        if group["clip_negative"]:
            eta = eta.clamp(min=0)
        previous = state.get("learning_rates")
        if previous is not None:
            eta = group["lr_momentum"] * previous + (1.0 - group["lr_momentum"]) * eta
        state["learning_rates"] = eta
        return summary.loss


def _check_hyperparameters(group: dict) -> None:
    """``ValueError`` naming the first invalid hyperparameter."""
    if not group["lr"] >= 0:
        raise ValueError(f"lr must be non-negative, got {group['lr']}")
    if not group["damping_int"] >= 0:
        raise ValueError(f"damping_int must be non-negative, got {group['damping_int']}")
    for name in ("momentum", "lr_momentum"):
        if not 0 <= group[name] < 1:
            raise ValueError(f"{name} must be in [0, 1), got {group[name]}")
    every = group["update_every"]
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"update_every must be a positive integer, got {every!r}")
