"""Modules for branching models: :class:`Sum`, :class:`Residual`, :class:`Parallel`.

hbpkit sees modules, not functional operations: the ``+`` of a residual block
must be a :class:`Sum` module (``hbpkit.convert`` rewrites ``+`` in ordinary
models into one). Curvature through these modules is exact where the
extension is exact on chains (supplement B.3).
"""

from __future__ import annotations

from torch import Tensor, nn


class Sum(nn.Module):
    """``z = x_1 + ... + x_k`` for tensors of one shape ``[N, *features]``."""

    def forward(self, *inputs: Tensor) -> Tensor:
        if not inputs:
            raise ValueError("Sum needs at least one input")
        out = inputs[0]
        for x in inputs[1:]:
            out = out + x
        return out


class Residual(nn.Module):
    """``z = block(x) + shortcut(x)``, ``shortcut`` the identity unless given (B.3).

    Args:
        block: the residual branch ``y(x, theta)``, ``[N, *in] -> [N, *out]``.
        shortcut: optional projection (e.g. a 1x1 convolution) when ``*out != *in``.
    """

    def __init__(self, block: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.block = block
        self.shortcut = shortcut
        self.add = Sum()

    def forward(self, x: Tensor) -> Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.add(self.block(x), skip)


class Parallel(nn.Module):
    """``z = sum_i branch_i(x)``: branches on one input, outputs of one shape summed."""

    def __init__(self, *branches: nn.Module) -> None:
        super().__init__()
        if not branches:
            raise ValueError("Parallel needs at least one branch")
        self.branches = nn.ModuleList(branches)
        self.add = Sum()

    def forward(self, x: Tensor) -> Tensor:
        return self.add(*(branch(x) for branch in self.branches))
