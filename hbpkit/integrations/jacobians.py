"""Per-sample Jacobians of a model output without a loss: one backward pass.

:func:`batch_jacobian` runs the :class:`~hbpkit.extensions.BatchJacobian` pass from a
model output: a scalar root ``0 = MSE(f, f.detach())`` (zero value and gradient) marks
``f`` as the output, and ``torch.autograd.grad`` to the parameters starts the pass, so
``p.grad`` is left as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from hbpkit.engine.context import backprop
from hbpkit.engine.extend import extend
from hbpkit.extensions.jacobian import BatchJacobian, flat_jacobian

_ROOT = extend(nn.MSELoss(reduction="sum"))


def output_root(output: Tensor) -> Tensor:
    """A scalar (zero) through an extended loss whose input is ``output``: inside
    ``backprop(BatchJacobian())``, ``torch.autograd.grad(output_root(f), params)`` saves the
    Jacobians of ``f``."""
    return _ROOT(output, output.detach())


def batch_jacobian(
    model: nn.Module | Callable[..., Tensor],
    x: object,
    params: Sequence[nn.Parameter] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(J, f)``: ``f = model(x)`` ``[N, *out]`` and ``J`` ``[N, C, P]`` with
    ``J[n, c] = d f[n].flatten()[c] / d theta``, ``C = prod(out)``, ``theta`` the
    ``params`` (default: the model's trainable parameters) flattened and concatenated in
    order. ``model`` must be extended (``hbpkit.extend``); ``x`` is passed as is (a
    tensor or a dict). Both are detached; the parameters keep no ``jac_batch``.
    """
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    params = list(params)
    if not params:
        raise ValueError("batch_jacobian needs at least one trainable parameter")
    f = model(x)
    if not isinstance(f, Tensor) or f.dim() < 1:
        raise ValueError(f"batch_jacobian needs a batched tensor output [N, *out], got {f!r}")
    try:
        with backprop(BatchJacobian()):
            torch.autograd.grad(output_root(f), params, allow_unused=True)
        missing = [tuple(p.shape) for p in params if not hasattr(p, "jac_batch")]
        if missing:
            raise ValueError(
                f"batch_jacobian: no Jacobian reached the parameters of shapes {missing} "
                "(not used by the model, or not in an extended module)"
            )
        J = flat_jacobian(params)
    finally:
        for p in params:
            if hasattr(p, "jac_batch"):
                del p.jac_batch
    return J, f.detach()


__all__ = ["batch_jacobian", "output_root"]
