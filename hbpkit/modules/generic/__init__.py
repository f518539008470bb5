"""The generic path: exact rules from autograd for every module and region without rules.

* :mod:`~hbpkit.modules.generic.function`: the call's function, replayed for ``torch.func``;
* :mod:`~hbpkit.modules.generic.rules`: :class:`GenericRules` (input derivatives, checks);
* :mod:`~hbpkit.modules.generic.residual`: the residual of eq. 7 (second derivatives);
* :mod:`~hbpkit.modules.generic.parameters`: per-sample and summed parameter derivatives.
"""

from hbpkit.modules.generic.function import CallFunction, call_module, followed_slots
from hbpkit.modules.generic.residual import InputResidual
from hbpkit.modules.generic.rules import GenericRules

__all__ = ["CallFunction", "GenericRules", "InputResidual", "call_module", "followed_slots"]
