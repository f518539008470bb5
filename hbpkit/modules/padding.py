"""Rules of padding layers (supplement section D.2): placeholder, filled in by the CNN work."""

from __future__ import annotations

from hbpkit.modules.base import ModuleRules

#: padding module types and their rules
PADDING: dict[type, ModuleRules] = {}
