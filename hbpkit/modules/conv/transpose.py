"""Rules of ``nn.ConvTranspose1d/2d/3d``, the adjoints of convolutions (D.4)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from hbpkit.core.calls import ModuleCall
from hbpkit.modules.conv.base import _ConvBase
from hbpkit.modules.conv.geometry import _CONV, _CONV_TRANSPOSE, _flat_windows, _windows
from hbpkit.modules.conv.transpose_kronecker import ConvTransposeKronecker


class ConvTransposeRules(ConvTransposeKronecker, _ConvBase):
    """HBP rules of ``nn.ConvTranspose1d/2d/3d``, the adjoints of convolutions (D.4).

    ``z = conv_transpose(x, W) + b`` with ``W`` ``[C_in, C_out/groups, *k]``: the
    transposed input Jacobian is the convolution ``conv(., W)``, and the weight
    derivative of one sample is ``sum_p x_p [[g]]_p^T`` per group, with
    ``[[g]]`` ``[C_out/groups * prod(k), P_in]`` the patches of the output-side
    tensor ``g`` (``unfold`` with the module's kernel, stride, padding, dilation).
    Any ``output_padding`` (also implied by ``output_size``), groups, dilation.
    Kronecker factors: :mod:`.transpose_kronecker`.
    """

    _output_left = False

    def _kwargs(self, call: ModuleCall) -> dict:
        m = call.module
        return dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)

    def _output_padding(self, call: ModuleCall) -> tuple[int, ...]:
        """The output padding the forward pass used (``output_size`` may have set it)."""
        m = call.module
        ins, outs = call.inputs[0].shape[2:], call.output_shape[2:]
        return tuple(
            o - ((i - 1) * s - 2 * p + dil * (k - 1) + 1)
            for i, o, s, p, dil, k in zip(ins, outs, m.stride, m.padding, m.dilation, m.kernel_size)
        )

    def _column_numel(self, call: ModuleCall) -> int:
        # the weight's derivative and the patches of the factor column, [C_out * prod(k), P_in]
        patches = call.output_shape[1] * math.prod(call.module.kernel_size)
        return max(call.module.weight.numel(), patches * math.prod(call.inputs[0].shape[2:]))

    def _crop_input(self, call: ModuleCall, t: Tensor) -> Tensor:
        """Keep the first ``in`` positions (an output padding can add unused ones)."""
        in_shape = call.inputs[0].shape[2:]
        if t.shape[2:] == in_shape:
            return t
        return t[(slice(None), slice(None), *(slice(n) for n in in_shape))]

    def _jac_t(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[B, C_out, *out] -> [B, C_in, *in]``: the convolution ``conv(mat, W)``."""
        conv = _CONV[self._dims(call)]
        out = conv(mat, call.module.weight.detach(), None, **self._kwargs(call))
        return self._crop_input(call, out)

    def _jac(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[B, C_in, *in] -> [B, C_out, *out]``: the transposed convolution without bias."""
        return self._apply_weight(call, mat, call.module.weight.detach())

    def _apply_weight(self, call: ModuleCall, x: Tensor, weight: Tensor) -> Tensor:
        conv_t = _CONV_TRANSPOSE[self._dims(call)]
        m = call.module
        return conv_t(
            x,
            weight,
            None,
            stride=m.stride,
            padding=m.padding,
            output_padding=self._output_padding(call),
            groups=m.groups,
            dilation=m.dilation,
        )

    def unfold_output(self, call: ModuleCall, t: Tensor) -> Tensor:
        """``[*, C_out, *out] -> [*, C_out * prod(k), P_in]``: patches of an output-side tensor."""
        d = self._dims(call)
        lead = t.shape[: -d - 1]
        flat = t.reshape(-1, *t.shape[-d - 1 :])
        zeros = [p for p in reversed(call.module.padding) for _ in range(2)]
        flat = F.pad(flat, zeros) if any(zeros) else flat
        w = _windows(flat, call.module, call.inputs[0].shape[2:])
        return _flat_windows(w, d).reshape(*lead, -1, math.prod(call.inputs[0].shape[2:]))

    def _weight_factors(
        self, call: ModuleCall, out: Tensor, square_input: bool = False, grad: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``x`` ``[N, G, C_in/G, P_in]`` (squared if asked), ``[[out]]`` ``[*, N, G, ., P_in]``."""
        x = call.input.square() if square_input else call.input
        if grad:  # the patches of grad_output, shared by the first-order quantities
            if "conv_transpose_unfold_grad" not in call.cache:
                call.cache["conv_transpose_unfold_grad"] = self.unfold_output(call, out)
            patches = call.cache["conv_transpose_unfold_grad"]
        else:
            patches = self.unfold_output(call, out)
        groups = call.module.groups
        return self._grouped(call, x), patches.unflatten(-2, (groups, -1))
