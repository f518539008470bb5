"""Test support: the record (``ModuleCall``) that a forward pass of an extended module leaves.

The forward hook of :func:`hbpkit.extend` links the record to the output's autograd node;
:func:`hbpkit.core.calls.call_of` reads it back (no private attribute of a tensor is read).
"""

from __future__ import annotations

from torch import Tensor

from hbpkit.core.calls import ModuleCall, call_of


def record(output: Tensor) -> ModuleCall:
    """The record of the extended module call that returned ``output``."""
    call = call_of(output)
    assert call is not None, "the output of an extended module call is expected"
    return call
