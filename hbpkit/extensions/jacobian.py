"""Per-sample Jacobians of the model output w.r.t. each parameter, in one backward pass.

``BatchJacobian`` backpropagates the identity from the output ``f`` that feeds the loss
(the loss's input, ``[N, *out]`` with ``C = prod(out)`` entries per sample) instead of
the loss Hessian's factor: the same recursion as the GGN's sqrt factors (eq. 7 without
residuals), ``S_x = J^T S_z`` with ``S_f[c, n] = e_c``, so at a parameter ``p``

``p.jac_batch[c, n] = d f[n].flatten()[c] / d p``, ``[C, N, *p.shape]``,

````C`` columns at once, where a loop over outputs needs ``C`` backward passes. The loss
only marks the output: its value, target and reduction do not enter. With several losses
their outputs' columns stack (in the order the losses reach the backward pass). Through a
batch-merging view (``loss_fn(f.view(-1, C), y)`` on ``f`` ``[N, T, C]``) the samples
stay the sequences and the ``T C`` columns are ordered ``(c, t)``, c-major, as
``MergeBatch`` expands them (``hbpkit/modules/batch_reshape.py``).
:func:`hbpkit.integrations.jacobians.batch_jacobian` starts the pass from a model output
without a loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hbpkit.core.calls import ModuleCall
from hbpkit.curvature.factors import SqrtFactor
from hbpkit.extensions.messages import Factors, SqrtMessage
from hbpkit.extensions.sqrt_ggn import ColumnsInRankOrder, _SqrtGGN
from hbpkit.modules.base import LossRules


@dataclass(frozen=True)
class JacobianMessage(SqrtMessage):
    """Per-sample columns ``[C, N, *features]`` started from the identity on the loss input."""

    loss_hessian: str = "identity"
    mc_samples: int = 1
    curvature: str = "ggn"

    def required_loss_rules(self) -> list[str]:
        """None: the loss only marks the output."""
        return []

    def initial(self, rules: LossRules, call: ModuleCall, weight: float = 1.0) -> Factors:
        """``S[c, n] = e_c`` on the loss's input ``[N, *out]`` (independent of ``weight``)."""
        x = call.inputs[0]
        N, features = x.shape[0], x.shape[1:]
        C = features.numel()
        eye = torch.eye(C, dtype=x.dtype, device=x.device).reshape(C, 1, *features)
        return {call: SqrtFactor(eye.expand(C, N, *features))}


class BatchJacobian(_SqrtGGN):
    """Per-sample Jacobians of the output that feeds the loss, ``jac_batch``:
    ``[C, N, *p.shape]`` with ``C`` the output entries per sample."""

    savefield = "jac_batch"
    message = JacobianMessage()
    reduction = ColumnsInRankOrder(scaled=False)  # the samples of every rank, as they are


def flat_jacobian(params: list, field: str = "jac_batch") -> Tensor:
    """``[N, C, P]``: the columns ``[C, N, *p.shape]`` saved under ``field`` on ``params``,
    flattened and concatenated in the order of ``params`` (laplace's ``jacobians`` layout)."""
    parts: list[Tensor] = [getattr(p, field).flatten(2) for p in params]
    return torch.cat(parts, dim=2).transpose(0, 1)


__all__ = ["BatchJacobian", "JacobianMessage", "flat_jacobian"]
