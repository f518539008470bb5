"""The table of modules that curvature can be backpropagated through."""

from __future__ import annotations

from hbpkit.extensions.base import Extension
from hbpkit.modules.tables import SECOND_ORDER


class SecondOrder(Extension):
    """Base of the extensions that backpropagate curvature from the loss."""

    table = SECOND_ORDER
