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


class KroneckerRoles:
    """Kronecker factors by role (S.8c): ``[G, A]`` for the weight, ``[G]`` for the bias (the
    bias folded into the weight as an input 1).

    A mixin for the rules of ``z = W x + b``; they give the output factor ``G`` from sqrt
    factors (``_sqrt_output_factor``) and from the averaged ``H`` (``_average_output_factor``),
    the input factor ``A`` (``input_factor``), and may refuse a weight in ``_check_kron_weight``.
    """

    kron_from_sqrt = per_role("kron_from_sqrt")
    kron_from_average = per_role("kron_from_average")

    def _check_kron_weight(self, call) -> None:
        """Raise where the weight's block is no single ``G (x) A``; every weight fits here."""

    def kron_from_sqrt_weight(self, call, factors: list, approx: str) -> list:
        self._check_kron_weight(call)
        return [self._sqrt_output_factor(call, factors, approx), self.input_factor(call, approx)]

    def kron_from_sqrt_bias(self, call, factors: list, approx: str) -> list:
        return [self._sqrt_output_factor(call, factors, approx)]

    def kron_from_average_weight(self, call, mat, approx: str) -> list:
        self._check_kron_weight(call)
        return [self._average_output_factor(call, mat, approx), self.input_factor(call, approx)]

    def kron_from_average_bias(self, call, mat, approx: str) -> list:
        return [self._average_output_factor(call, mat, approx)]
