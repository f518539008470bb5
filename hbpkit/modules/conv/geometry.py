"""Geometry of a convolution: padding sides, the pre-padding index map (D.2), windows
and the unfolded input ``[[x]]`` of eq. S.14.

``[[x]]`` (``unfold``, im2col) ``[N, S, P]`` holds the ``P = prod(out)`` flattened patches
of ``S = C_in/groups * prod(k)`` entries of every sample; :class:`ConvGeometry` computes it
once per call from a strided view of the padded input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import grad as nn_grad

from hbpkit.core.calls import ModuleCall

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_WEIGHT = {1: nn_grad.conv1d_weight, 2: nn_grad.conv2d_weight, 3: nn_grad.conv3d_weight}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _padding_sides(module: nn.modules.conv._ConvNd) -> list[tuple[int, int]]:
    """``(left, right)`` padding of every spatial dimension, in order."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [(0, 0)] * len(module.kernel_size)
        sides = []  # "same": like PyTorch, the odd element goes to the right
        for k, d in zip(module.kernel_size, module.dilation):
            total = d * (k - 1)
            sides.append((total // 2, total - total // 2))
        return sides
    return [(p, p) for p in module.padding]


def _windows(t: Tensor, module: nn.modules.conv._ConvNd, positions=None) -> Tensor:
    """The patches of a (padded) ``[B, C, *spatial]`` as a view ``[B, C, *positions, *k]``.

    ``module`` gives kernel size, stride and dilation; ``positions`` (default
    all) keeps the first positions along every spatial dimension.
    """
    for i, (k, s, dil) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        t = t.unfold(2 + i, dil * (k - 1) + 1, s)
    d = len(module.kernel_size)
    crop = (slice(None),) * 2 + tuple(slice(n) for n in positions or ()) + (slice(None),) * d
    dilate = tuple(slice(None, None, dil) for dil in module.dilation)
    return t[crop][(..., *dilate)]


def _flat_windows(w: Tensor, d: int) -> Tensor:
    """``[B, C, *positions, *k] -> [B, C * prod(k), prod(positions)]`` (``F.unfold`` layout)."""
    B, C = w.shape[:2]
    order = [0, 1, *range(2 + d, 2 + 2 * d), *range(2, 2 + d)]
    return w.permute(order).reshape(B, C * math.prod(w.shape[2 + d :]), -1)


def _dense_kernel(weight: Tensor, groups: int) -> Tensor:
    """``[C_out, C_in/groups, *k] -> [C_out, C_in, K]``, zero between different groups."""
    C_out, C_in_g = weight.shape[:2]
    flat = weight.reshape(groups, C_out // groups, C_in_g, -1)
    dense = weight.new_zeros(groups, C_out // groups, groups, C_in_g, flat.shape[-1])
    for g in range(groups):
        dense[g, :, g] = flat[g]
    return dense.reshape(C_out, groups * C_in_g, -1)


class ConvGeometry:
    """Padding and unfolding of ``nn.Conv1d/2d/3d`` (a mixin of :class:`ConvRules`)."""

    def _prepad(self, call: ModuleCall) -> tuple[list[int], str] | None:
        """``(F.pad's pad list, mode)`` of the index map in front of the convolution, if any."""
        module = call.module
        sides = _padding_sides(module)
        if module.padding_mode == "zeros" and all(a == b for a, b in sides):
            return None
        pad = [p for side in reversed(sides) for p in side]  # F.pad: last dimension first
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return pad, mode

    def _conv_padding(self, call: ModuleCall) -> tuple[int, ...]:
        """Zero padding of the convolution that follows the pre-padding."""
        if self._prepad(call) is not None:
            return (0,) * self._dims(call)
        return tuple(left for left, _ in _padding_sides(call.module))

    def _conv_kwargs(self, call: ModuleCall) -> dict:
        m = call.module
        return dict(
            stride=m.stride, padding=self._conv_padding(call), dilation=m.dilation, groups=m.groups
        )

    def _padded_shape(self, call: ModuleCall) -> torch.Size:
        """Shape ``[N, C_in, *in']`` of the input after the pre-padding."""
        shape = call.inputs[0].shape
        if self._prepad(call) is None:
            return shape
        sides = _padding_sides(call.module)
        spatial = [s + a + b for s, (a, b) in zip(shape[2:], sides)]
        return torch.Size([*shape[:2], *spatial])

    def _work_features(self, call: ModuleCall) -> int:
        return math.prod(self._padded_shape(call)[1:])

    # the pre-padding as an index map (D.2) ----------------------------------------------------
    def _pad(self, call: ModuleCall, t: Tensor) -> Tensor:
        """``[B, C, *in] -> [B, C, *in']``: the pre-padding, if any."""
        prepad = self._prepad(call)
        if prepad is None:
            return t
        pad, mode = prepad
        return F.pad(t, pad, mode=mode)

    def _pad_t(self, call: ModuleCall, t: Tensor) -> Tensor:
        """``[B, C, *in'] -> [B, C, *in]``: transpose of the pre-padding (D.2, ``Pi^T``)."""
        prepad = self._prepad(call)
        if prepad is None:
            return t
        in_shape = call.inputs[0].shape[2:]
        if prepad[1] == "constant":  # the transpose of zero padding crops
            sides = _padding_sides(call.module)
            crop = tuple(slice(a, a + n) for (a, _), n in zip(sides, in_shape))
            return t[(slice(None), slice(None), *crop)]
        out = t.new_zeros(*t.shape[:2], math.prod(in_shape))
        out.index_add_(2, self._pad_index(call), t.flatten(2))
        return out.reshape(*t.shape[:2], *in_shape)

    def _pad_index(self, call: ModuleCall) -> Tensor:
        """``pi``: padded position ``j`` holds input position ``pi(j)`` (flat, D.2)."""
        if "conv_pad_index" not in call.cache:
            pad, mode = self._prepad(call)
            in_shape = call.inputs[0].shape[2:]
            # float64 holds every index exactly; F.pad's modes need floating point
            positions = torch.arange(math.prod(in_shape), dtype=torch.float64)
            padded = F.pad(positions.reshape(1, 1, *in_shape), pad, mode=mode)
            call.cache["conv_pad_index"] = padded.flatten().long().to(call.inputs[0].device)
        return call.cache["conv_pad_index"]

    def _seen_by(self, call: ModuleCall) -> tuple[Tensor, Tensor]:
        """``(o, valid)`` ``[P_in, K]``: the output position that sees input ``p`` at offset ``k``.

        ``o = (p + left - k * dilation) / stride`` per spatial axis, valid where that is
        an integer inside the output (invalid entries hold ``0``).
        """
        module = call.module
        d = self._dims(call)
        ins, outs = call.inputs[0].shape[2:], call.output_shape[2:]
        sides = _padding_sides(module)
        o_flat, valid = torch.zeros((), dtype=torch.long), torch.ones((), dtype=torch.bool)
        for i in range(d):
            p = torch.arange(ins[i]).unsqueeze(1)
            k = torch.arange(module.kernel_size[i]).unsqueeze(0)
            num = p + sides[i][0] - k * module.dilation[i]
            o = torch.div(num, module.stride[i], rounding_mode="floor")
            ok = (num % module.stride[i] == 0) & (o >= 0) & (o < outs[i])
            view = [1] * (2 * d)
            view[i], view[d + i] = ins[i], module.kernel_size[i]
            o_flat = o_flat * outs[i] + o.reshape(view)
            valid = valid & ok.reshape(view)
        P_in, K = math.prod(ins), math.prod(module.kernel_size)
        o_flat, valid = o_flat.reshape(P_in, K), valid.reshape(P_in, K)
        device = call.inputs[0].device
        return torch.where(valid, o_flat, 0).to(device), valid.to(device)

    # the unfolded input (eq. S.14's [[X]]), computed once per call ----------------------------
    def _x_full(self, call: ModuleCall) -> Tensor:
        """The input with all its padding, ``[N, C_in, *in'']`` (cached)."""
        if "conv_x" not in call.cache:
            x = self._pad(call, call.input)
            zeros = [p for p in reversed(self._conv_padding(call)) for _ in range(2)]
            call.cache["conv_x"] = F.pad(x, zeros) if any(zeros) else x
        return call.cache["conv_x"]

    def unfold(self, call: ModuleCall) -> Tensor:
        """``[[x]]`` of eq. S.14 for all samples, ``[N, C_in * prod(k), P]`` (cached).

        Same layout as ``torch.nn.functional.unfold``: rows ``(c_in, k_1, ..., k_d)``,
        columns the output positions in row-major order.
        """
        if "conv_unfold" not in call.cache:
            w = _windows(self._x_full(call), call.module)
            call.cache["conv_unfold"] = _flat_windows(w, self._dims(call))
        return call.cache["conv_unfold"]
