"""Dispatch tables: which derivative rules serve which module type.

Every extension family (first-order, diagonal, Kronecker) owns one
:class:`DispatchTable`. A lookup walks the module's method resolution order, so a
subclass of ``nn.Linear`` is served by the ``nn.Linear`` rules unless it registers
rules of its own.
"""

from __future__ import annotations

from torch import nn


class DispatchTable:
    """Map ``module type -> rules object`` for one extension family.

    Args:
        family: human-readable family name, used in error messages.
    """

    def __init__(self, family: str) -> None:
        self.family = family
        self._rules: dict[type, object] = {}

    def register(self, module_type: type, rules: object) -> None:
        """Serve ``module_type`` (and its subclasses) with ``rules``."""
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise TypeError(f"expected a subclass of torch.nn.Module, got {module_type!r}")
        self._rules[module_type] = rules

    def lookup(self, module: nn.Module) -> object | None:
        """The rules for ``module``'s type or its closest registered base class."""
        for cls in type(module).__mro__:
            if cls in self._rules:
                return self._rules[cls]
        return None

    def types(self) -> list[type]:
        """The module types registered here (not their subclasses)."""
        return list(self._rules)


FIRST_ORDER = DispatchTable("first-order")
"""Rules for per-sample gradients (BatchGrad, BatchL2, SumGradSquared, Variance)."""

SECOND_ORDER = DispatchTable("second-order")
"""Rules that backpropagate curvature (diagonals, Kronecker factors, HBP)."""

FAMILIES = {"first_order": FIRST_ORDER, "second_order": SECOND_ORDER}


def register(module_type: type, rules: object, families: tuple[str, ...] | None = None) -> None:
    """Teach hbpkit a module type: ``rules`` implements its derivatives.

    ``rules`` is an instance of a subclass of :class:`hbpkit.modules.ModuleRules`
    (or :class:`hbpkit.modules.LossRules` for a loss). ``families`` picks the
    extension families (``"first_order"``, ``"second_order"``); default all.
    See ``examples/custom_module.py``.
    """
    names = tuple(FAMILIES) if families is None else families
    for name in names:
        if name not in FAMILIES:
            raise ValueError(f"unknown extension family {name!r}; choose from {sorted(FAMILIES)}")
        FAMILIES[name].register(module_type, rules)


def is_registered(module: nn.Module) -> bool:
    """Whether any family has rules for ``module``."""
    return any(table.lookup(module) is not None for table in FAMILIES.values())
