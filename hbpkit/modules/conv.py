"""Rules of convolutions (supplement section D): placeholder, filled in by the CNN work."""

from __future__ import annotations

from hbpkit.modules.base import ModuleRules

#: convolution module types and their rules
CONVOLUTIONS: dict[type, ModuleRules] = {}
