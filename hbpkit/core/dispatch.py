"""Dispatch tables: which derivative rules serve which module type.

Every extension family (first-order, second-order) owns one
:class:`DispatchTable`, built in :mod:`hbpkit.modules.tables`. A lookup walks the
module's method resolution order, so a subclass of ``nn.Linear`` is served by the
``nn.Linear`` rules unless it registers rules of its own.
"""

from __future__ import annotations

from torch import nn


class DispatchTable:
    """Map ``module type -> rules object`` for one extension family.

    Args:
        family: human-readable family name, used in error messages.
        rules: the initial ``module type -> rules`` entries.
        fallback: the rules of every module type without an entry (the generic path),
            or ``None``.
    """

    def __init__(
        self,
        family: str,
        rules: dict[type, object] | None = None,
        fallback: object | None = None,
    ) -> None:
        self.family = family
        self.fallback = fallback
        self._rules: dict[type, object] = {}
        for module_type, module_rules in (rules or {}).items():
            self.register(module_type, module_rules)

    def register(self, module_type: type, rules: object) -> None:
        """Serve ``module_type`` (and its subclasses) with ``rules``."""
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise TypeError(f"expected a subclass of torch.nn.Module, got {module_type!r}")
        self._rules[module_type] = rules

    def lookup(self, module: nn.Module, fallback: bool = True) -> object | None:
        """The rules for ``module``'s type or its closest registered base class; else the
        table's fallback (``fallback=False``: ``None``)."""
        for cls in type(module).__mro__:
            if cls in self._rules:
                return self._rules[cls]
        return self.fallback if fallback else None

    def types(self) -> list[type]:
        """The module types registered here (not their subclasses)."""
        return list(self._rules)
