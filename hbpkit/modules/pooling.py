"""Rules of pooling layers (supplement section D.2): placeholder, filled in by the CNN work."""

from __future__ import annotations

from hbpkit.modules.base import ModuleRules

#: pooling module types and their rules
POOLING: dict[type, ModuleRules] = {}
