"""Parameter rules written per parameter role: the weight and the bias of ``z = W x + b``.

The weight's derivatives pair the output-side quantity with the input ``x`` (S.8,
or the patches ``[[x]]`` of S.14), the bias's sum it over positions. Rules of such
layers implement one method per quantity and role, ``<quantity>_<role>(call, *args)``
(``batch_grad_weight``, ``param_diag_bias``, ...); :func:`per_role` turns them into the
``<quantity>(call, name, *args)`` of :class:`~hbpkit.modules.base.ModuleRules`. So the
quantities do not test parameter names, and rules written against the ``name``
signature (``hbpkit.register``) keep working.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def per_role(quantity: str) -> Callable[..., Any]:
    """The rule method ``quantity(self, call, name, *args)`` that returns
    ``self.<quantity>_<name>(call, *args)``; the role is the parameter's name
    (``"weight"`` or ``"bias"``).
    """

    def method(self, call, name: str, *args):
        return getattr(self, f"{quantity}_{name}")(call, *args)

    method.__name__ = method.__qualname__ = quantity
    method.__doc__ = (
        f"``{quantity}`` of the parameter ``name``, by its role (``{quantity}_<role>``)."
    )
    return method
