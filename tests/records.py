"""Test support: the record (``ModuleCall``) that a forward pass of an extended module leaves.

The forward hook of :func:`hbpkit.extend` stores the record in the metadata of the output's
autograd node under :data:`hbpkit.calls.NODE_KEY` (public names only: no private attribute
of a tensor is read).
"""

from __future__ import annotations

from torch import Tensor

from hbpkit.calls import NODE_KEY, ModuleCall


def record(output: Tensor) -> ModuleCall:
    """The record of the extended module call that returned ``output``."""
    return output.grad_fn.metadata[NODE_KEY]
