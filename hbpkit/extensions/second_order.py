"""The table of modules that curvature can be backpropagated through."""

from __future__ import annotations

from hbpkit.core.dispatch import SECOND_ORDER
from hbpkit.extensions.base import Extension
from hbpkit.modules import BACKPROPAGATABLE

for _module_type, _rules in BACKPROPAGATABLE.items():
    SECOND_ORDER.register(_module_type, _rules)


class SecondOrder(Extension):
    """Base of the extensions that backpropagate curvature from the loss."""

    table = SECOND_ORDER
