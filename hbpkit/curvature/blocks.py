"""The position-diagonal blocks of a batch-averaged curvature over a feature map.

Batch-averaged backpropagation (``KFRA``, approximation (9) / S.11) carries a
dense ``[D, D]`` matrix ``H`` per layer output. On a convolutional feature map
``[C, *spatial]`` (``D = C P``, ``P = prod(spatial)``) that is ``C^2 P^2`` entries:
11.6 GB in float32 at the first max-pool of c3d3. The Kronecker factor ``G`` of
a convolution with ``kfac_approx="expand"`` needs only the ``P`` diagonal
position blocks ``H[(:, p), (:, p)]`` (``C x C`` each, see ``modules/conv/``),
and those blocks stay exact through the modules between two weight layers:

* an elementwise module (``J_n = diag(d_n)``):
  ``B'_p = B_p * mean_n d_{n,:,p} d_{n,:,p}^T``, plus the residual on the diagonal (S.9);
* zero / constant padding (an injective selection, D.2): the blocks of the kept positions;
* a convolution or a max-pool fed by a *dense* ``H`` (its input Jacobian mixes
  positions, so the input blocks need the off-diagonal blocks of ``H``, which
  the dense matrix has).

So when the dense matrix at a layer's input would exceed the memory budget,
the module computes the exact position blocks of ``mean_n J_n^T H J_n``
instead, and the modules further towards the input carry :class:`PositionBlocks`.
What cannot be exact from blocks alone (a convolution or pooling *fed by*
blocks, ``kfac_approx="reduce"``, which needs all blocks) is refused up front.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class PositionBlocks(NamedTuple):
    """``blocks[p] = H[(:, p), (:, p)]`` of a ``[C P, C P]`` matrix ``H`` (row-major ``[C, P]``).

    ``blocks``: ``[P, C, C]``; ``spatial``: the shape of the ``P`` positions.
    """

    blocks: Tensor
    spatial: tuple[int, ...]

    @staticmethod
    def from_dense(mat: Tensor, spatial: tuple[int, ...]) -> PositionBlocks:
        """The position blocks of a dense ``[C P, C P]`` matrix."""
        P = int(torch.Size(spatial).numel())
        C = mat.shape[0] // P
        H = mat.reshape(C, P, C, P)
        blocks = torch.diagonal(H, dim1=1, dim2=3).permute(2, 0, 1)  # [P, C, C]
        return PositionBlocks(blocks.contiguous(), tuple(spatial))

    @property
    def channels(self) -> int:
        return self.blocks.shape[1]

    def add_diagonal(self, diag: Tensor) -> PositionBlocks:
        """``H + diag(d)`` for ``d`` ``[C, *spatial]`` (a residual term summed over samples)."""
        d = diag.reshape(self.channels, -1).T  # [P, C]
        return PositionBlocks(self.blocks + torch.diag_embed(d), self.spatial)

    def sum_blocks(self) -> Tensor:
        """``sum_p H[(:, p), (:, p)]``, ``[C, C]``: the expand factor ``G`` of a convolution."""
        return self.blocks.sum(0)
