"""Rules of ``nn.Conv1d/2d/3d`` (supplement D.3/D.4, eq. S.13/S.14)."""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor

from hbpkit.core.calls import ModuleCall
from hbpkit.curvature.blocks import PositionBlocks
from hbpkit.curvature.local import ConvTransposeStep, LocalStep
from hbpkit.curvature.memory import policy_of
from hbpkit.modules.conv.base import _ConvBase
from hbpkit.modules.conv.diagonal import UnfoldedDiagonal
from hbpkit.modules.conv.geometry import (
    _CONV,
    _CONV_TRANSPOSE,
    _CONV_WEIGHT,
    ConvGeometry,
    _dense_kernel,
    _padding_sides,
)
from hbpkit.modules.conv.kronecker import ConvKronecker
from hbpkit.modules.kronecker_roots import ConvRoots


class ConvRules(ConvRoots, ConvKronecker, UnfoldedDiagonal, ConvGeometry, _ConvBase):
    """HBP rules of ``nn.Conv1d/2d/3d`` (supplement D.3/D.4, eq. S.13/S.14).

    Any kernel size, stride, dilation, groups, bias or not, integer or string
    padding and every ``padding_mode``. Inputs must be batched, ``[N, C_in, *in]``.
    """

    kron_from_blocks = True
    param_only_cache = ("conv_unfold",)

    # local columns (curvature/local.py) ---------------------------------------------------
    def supports_local(self, call: ModuleCall) -> bool:
        return call.module.padding_mode == "zeros"

    def local_step(self, call: ModuleCall) -> LocalStep:
        """``J^T`` (D.4) on patches: a transposed convolution of each patch, no padding."""
        m = call.module
        left = [a for a, _ in _padding_sides(m)]
        size = call.inputs[0].shape[2:]
        return ConvTransposeStep(m.weight.detach(), m.stride, m.dilation, m.groups, left, size)

    # input derivatives (eq. S.14 / D.4: [[X]] -> I_P kron W) ---------------------------------
    def _jac_t(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[B, C_out, *out] -> [B, C_in, *in]``: a transposed convolution (D.4, D.2)."""
        m = call.module
        padded = self._padded_shape(call)[2:]
        padding = self._conv_padding(call)
        # the trailing input positions a strided kernel never reaches (fewer than the stride)
        extra = [
            n + 2 * p - ((o - 1) * s + dil * (k - 1) + 1)
            for n, o, p, s, dil, k in zip(
                padded, mat.shape[2:], padding, m.stride, m.dilation, m.kernel_size
            )
        ]
        # conv_transpose runs oneDNN's backward-data kernel directly: cheaper than
        # torch.nn.grad.conv*_input (convolution_backward) for the V * N columns
        out = _CONV_TRANSPOSE[self._dims(call)](
            mat,
            m.weight.detach(),
            None,
            stride=m.stride,
            padding=padding,
            output_padding=extra,
            groups=m.groups,
            dilation=m.dilation,
        )
        return self._pad_t(call, out)

    def _jac(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[B, C_in, *in] -> [B, C_out, *out]``: the convolution without bias (eq. S.14)."""
        return self._apply_weight(call, mat, call.module.weight.detach())

    def jac_mat_prod_channel(
        self, call: ModuleCall, mat: Tensor, channel: int
    ) -> tuple[Tensor, int | None]:
        """Ungrouped: the convolution with the kernels of input ``channel`` only."""
        if call.module.groups != 1:
            return super().jac_mat_prod_channel(call, mat, channel)
        V, N = mat.shape[:2]
        weight = call.module.weight.detach()[:, channel : channel + 1]
        return self._apply_weight(call, mat.flatten(0, 1), weight).unflatten(0, (V, N)), None

    def param_channel_block(self, call: ModuleCall, name: str) -> int | None:
        """Kernel ``o`` (``C_in / G prod(kernel)`` entries) and ``b[o]`` reach output channel
        ``o`` only (S.14)."""
        return call.module.weight[0].numel() if name == "weight" else 1

    def _apply_weight(self, call: ModuleCall, x: Tensor, weight: Tensor) -> Tensor:
        conv = _CONV[self._dims(call)]
        return conv(self._pad(call, x), weight, None, **self._conv_kwargs(call))

    def param_jac_t_mat_prod_sum_weight(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[K, N, C_out, *out] -> [K, *W.shape]``: ``sum_n M_{k,n} [[x_n]]^T`` (S.14).

        The weight gradient of one convolution with the ``K`` kernels stacked (as in
        :meth:`param_jac_mat_prod_weight`), without unfolding ``x``.
        """
        K, G = mat.shape[0], call.module.groups
        W = call.module.weight
        grad_out = mat.unflatten(2, (G, -1)).movedim(0, 2).flatten(1, 3)  # [N, G K C_out/G, *out]
        size = [K * W.shape[0], *W.shape[1:]]
        conv_weight = _CONV_WEIGHT[self._dims(call)]
        x = self._pad(call, call.input)
        stacked = conv_weight(x, size, grad_out, **self._conv_kwargs(call))
        return stacked.unflatten(0, (G, K, -1)).transpose(0, 1).reshape(K, *W.shape)

    # exact position blocks of J^T H J from a dense H (curvature/blocks.py) ----------
    def check_blocks(self, call: ModuleCall, from_blocks: bool) -> None:
        """Exact only from a dense ``H`` and with zero padding (an injective pre-padding)."""
        if from_blocks or call.module.padding_mode != "zeros":
            super().check_blocks(call, from_blocks)

    def ea_blocks(self, call: ModuleCall, mat: Tensor | PositionBlocks) -> PositionBlocks:
        """Position blocks ``[P_in, C_in, C_in]`` of ``J^T H J`` for a dense ``H`` (D.4).

        Input position ``p`` is seen by output ``o(p, k)`` through kernel offset ``k``, so
        ``B_p = sum_{k, k'} W_k^T H[(:, o(p, k)), (:, o(p, k'))] W_k'`` with ``W_k``
        ``[C_out, C_in]`` the kernel at offset ``k`` (zero across groups). Only the
        ``K^2`` output-position pairs of each input position are gathered, in chunks.
        """
        module = call.module
        C_out = module.out_channels
        P_out = math.prod(call.output_shape[2:])
        out_pos, valid = self._seen_by(call)  # [P_in, K]
        P_in, K = out_pos.shape
        H = mat.reshape(C_out, P_out, C_out, P_out)
        W = _dense_kernel(module.weight.detach(), module.groups)  # [C_out, C_in, K]
        Wk = rearrange(W, "c a k -> (k c) a")
        chans = torch.arange(C_out, device=H.device)
        c1, c2 = chans.reshape(1, 1, -1, 1, 1), chans.reshape(1, 1, 1, 1, -1)
        block_bytes = K * K * C_out * C_out * H.element_size()
        chunk = max(1, policy_of(call).chunk_bytes // block_bytes)
        blocks = []
        for start in range(0, P_in, chunk):
            o, v = out_pos[start : start + chunk], valid[start : start + chunk].to(H.dtype)
            E = H[c1, o[:, :, None, None, None], c2, o[:, None, None, :, None]]  # [p, K, C, K, C]
            E = E * (v[:, :, None, None, None] * v[:, None, None, :, None])
            E = E.reshape(-1, K * C_out, K * C_out)
            blocks.append(Wk.T @ E @ Wk)
        return PositionBlocks(torch.cat(blocks), tuple(call.inputs[0].shape[2:]))

    def _weight_factors(
        self, call: ModuleCall, out: Tensor, square_input: bool = False, grad: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``out`` ``[*, N, G, C_out/G, P]`` and ``[[x]]`` ``[N, G, S, P]`` (squared if asked)."""
        u = self.unfold(call)
        u = u.square() if square_input else u
        return self._grouped(call, out), u.unflatten(1, (call.module.groups, -1))
