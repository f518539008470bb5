"""Rules of padding layers: index selections (supplement D.2), the same for every sample.

Shapes follow :mod:`hbpkit.modules.base`: ``x`` ``[N, *in]`` is padded on its last
``k`` axes (``k = len(padding) // 2``) to ``z`` ``[N, *out]``. Every padding is a
selection ``z = Pi x`` (each output entry copies one input entry, or is a
constant), linear in ``x``, so ``Hx = Pi^T Hz Pi`` (D.2) and no residual.

* ``ZeroPad1d/2d/3d``, ``ConstantPad1d/2d/3d`` (any value: the constant does not
  depend on ``x``): ``jac`` pads with zeros, ``jac_t`` crops (``F.pad`` with the
  negated padding, so negative padding, i.e. cropping, becomes zero padding),
  ``Pi`` is injective, and a diagonal curvature stays diagonal: cropping
  ``diag(d)`` is exact, ``Pi^T diag(d) Pi = diag(crop(d))``.
* ``ReflectionPad*``, ``ReplicationPad*``, ``CircularPad*`` (1d/2d/3d): several
  outputs copy the same input, ``jac`` is the padding itself, ``jac_t`` its
  adjoint (autograd's vector-Jacobian product, a scatter-add of the copies).
  Rows of ``Pi`` are still one-hot, so ``Pi^T diag(d) Pi = diag(Pi^T d)``: a
  diagonal factor stays diagonal (its signed squares are scatter-added).

Batch-averaged backpropagation (approximation (9)) crops / maps the rows and
columns of the dense matrix, within the ``max_dense_bytes`` of the pass's ``MemoryPolicy``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from hbpkit.core.calls import ModuleCall
from hbpkit.curvature.blocks import PositionBlocks
from hbpkit.curvature.local import LocalStep, ShiftStep
from hbpkit.modules.base import ModuleRules
from hbpkit.modules.pooling import _AutogradLinearMapRules, _LinearMapRules


class _PaddingMixin:
    def _mapped_dims(self, module: nn.Module) -> int:
        return len(module.padding) // 2


class ConstantPadRules(_PaddingMixin, _LinearMapRules):
    """``ZeroPad*`` / ``ConstantPad*``: ``z = Pi x + c``, ``Pi`` zero rows at the padding.

    D.2: ``Hx = Pi^T Hz Pi``, i.e. ``Hz`` cropped to the input's entries.
    """

    selection = True
    diagonal_jacobian = True  # an injective selection: diagonal factors are cropped

    def _jac(self, call: ModuleCall, mat: Tensor) -> Tensor:
        return F.pad(mat, tuple(call.module.padding))

    def _jac_t(self, call: ModuleCall, mat: Tensor) -> Tensor:
        pad = call.module.padding
        if any(p < 0 for p in pad):  # the layer crops: its adjoint pads
            return F.pad(mat, tuple(-p for p in pad))
        # a pure padding: its adjoint is a crop, returned as a view (no copy of the factor)
        crop = [
            slice(left, mat.shape[-1 - i] - right)
            for i, (left, right) in enumerate(zip(pad[::2], pad[1::2]))
        ]
        return mat[(..., *reversed(crop))]

    def jac_t_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[V, N, *out] -> [V, N, *in]``: crop (and zero-pad where the layer cropped)."""
        return self._jac_t(call, mat)

    def jac_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[V, N, *in] -> [V, N, *out]``: pad with zeros (and crop where the layer cropped)."""
        return self._jac(call, mat)

    # local columns: the crop moves every patch by -left (entries in the padding are dropped)
    def supports_local(self, call: ModuleCall) -> bool:
        return len(call.module.padding) // 2 <= call.inputs[0].dim() - 2

    def local_step(self, call: ModuleCall) -> LocalStep:
        size = tuple(call.inputs[0].shape[2:])
        pad, d = call.module.padding, len(size)
        left = tuple(pad[2 * (d - 1 - i)] if d - 1 - i < len(pad) // 2 else 0 for i in range(d))
        return ShiftStep(left, size)

    def check_blocks(self, call: ModuleCall, from_blocks: bool) -> None:
        """Exact for any input: an injective selection keeps the blocks of the kept positions.

        The padded axes must be spatial (not the channel axis ``1``).
        """
        if self._mapped_dims(call.module) > call.inputs[0].dim() - 2:
            super().check_blocks(call, from_blocks)

    def ea_blocks(self, call: ModuleCall, mat: Tensor | PositionBlocks) -> PositionBlocks:
        """Position blocks of ``Pi^T H Pi`` (D.2): the blocks of the input's positions."""
        spatial_out = tuple(call.output_shape[2:])
        if not isinstance(mat, PositionBlocks):
            mat = PositionBlocks.from_dense(mat, spatial_out)
        C = mat.channels
        blocks = mat.blocks.reshape(*spatial_out, C * C).movedim(-1, 0)  # [C C, *out]
        blocks = self._jac_t(call, blocks.unsqueeze(0)).squeeze(0)  # [C C, *in]
        spatial_in = tuple(blocks.shape[1:])
        return PositionBlocks(blocks.flatten(1).T.reshape(-1, C, C), spatial_in)


class CopyPadRules(_PaddingMixin, _AutogradLinearMapRules):
    """``ReflectionPad*``, ``ReplicationPad*``, ``CircularPad*``: ``z = Pi x``, one-hot rows.

    D.2: ``Hx = Pi^T Hz Pi`` with ``Pi^T`` adding up the copies of each input entry.
    """

    selection = True


_CONSTANT = ConstantPadRules()
_COPY = CopyPadRules()

#: padding module types and their rules
PADDING: dict[type, ModuleRules] = {
    **{
        cls: _CONSTANT
        for cls in (
            nn.ZeroPad1d,
            nn.ZeroPad2d,
            nn.ZeroPad3d,
            nn.ConstantPad1d,
            nn.ConstantPad2d,
            nn.ConstantPad3d,
        )
    },
    **{
        cls: _COPY
        for cls in (
            nn.ReflectionPad1d,
            nn.ReflectionPad2d,
            nn.ReflectionPad3d,
            nn.ReplicationPad1d,
            nn.ReplicationPad2d,
            nn.ReplicationPad3d,
            nn.CircularPad1d,
            nn.CircularPad2d,
            nn.CircularPad3d,
        )
    },
}
