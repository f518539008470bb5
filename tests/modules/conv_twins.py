"""The twin of a grouped (transposed) convolution: its ``g`` groups as ``g`` ungrouped layers.

Group ``i`` of ``conv`` (``groups = g``) reads input channels ``[i C_in/g, (i+1) C_in/g)``
and writes output channels ``[i C_out/g, (i+1) C_out/g)``. The twin is a :class:`Parallel`
of ``g`` branches ``crop -> conv_i -> place``: a negative zero padding of the channels
(after flattening the spatial axes) keeps group ``i``'s inputs, ``conv_i`` is the
ungrouped layer with group ``i``'s slice of the weight (and bias), and a zero padding puts its
output into group ``i``'s channels; the branches sum to ``conv``'s output. Its parameters
are the groups' slices as ordinary parameters, with their own factors.
"""

from __future__ import annotations

import torch
from torch import nn

from hbpkit.branching import Parallel


def slice_twin(conv: nn.modules.conv._ConvNd, in_shape: tuple[int, ...]) -> Parallel:
    """The twin of ``conv`` for inputs ``[N, *in_shape]`` (see the module docstring)."""
    g = conv.groups
    transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
    ci, co = conv.in_channels // g, conv.out_channels // g
    with torch.no_grad():
        out_spatial = conv(torch.zeros(1, *in_shape, dtype=conv.weight.dtype)).shape[2:]
    rows = ci if transposed else co  # the weight's first dimension per group
    kwargs = dict(
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        dtype=conv.weight.dtype,
    )
    if transposed:
        kwargs["output_padding"] = conv.output_padding
    else:
        kwargs["padding_mode"] = conv.padding_mode
    branches = []
    for i in range(g):
        layer = type(conv)(ci, co, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(conv.weight[i * rows : (i + 1) * rows])
            if conv.bias is not None:
                layer.bias.copy_(conv.bias[i * co : (i + 1) * co])
        branches.append(
            nn.Sequential(
                nn.Flatten(2),
                nn.ZeroPad2d((0, 0, -i * ci, -(g - 1 - i) * ci)),
                nn.Unflatten(2, tuple(in_shape[1:])),
                layer,
                nn.Flatten(2),
                nn.ZeroPad2d((0, 0, i * co, (g - 1 - i) * co)),
                nn.Unflatten(2, tuple(out_spatial)),
            )
        )
    return Parallel(*branches)


def twin_layers(twin: Parallel) -> list[nn.Module]:
    """The ``g`` ungrouped layers of :func:`slice_twin`'s result, in group order."""
    return [branch[3] for branch in twin.branches]
