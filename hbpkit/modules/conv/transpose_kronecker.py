"""Kronecker factors of ``nn.ConvTranspose1d/2d/3d`` (eq. S.14 in the transposed geometry).

``z = conv_transpose(x, W) + b`` with ``W`` ``[C_in, C_out/g, *k]`` is linear in ``W``: per
sample and group of channels,

    ``Z = M [[x]]^T + b 1_P^T``,  ``M[o, (c, k)] = W[c, o, k]`` ``[C_out/g, C_in/g prod(k)]``,

where ``[[x]]^T`` ``[C_in/g prod(k), P]`` (``P`` the output positions) holds at row
``(c, k)`` and column ``q`` the input entry ``x[c, i]`` that kernel offset ``k`` carries
to output position ``q`` (``q = i s - pad + k dil`` per axis), zero where none does: the
patches of the zero-stuffed, padded input that a convolution with the flipped,
transposed kernel would see. They are computed as ``conv_transpose(x, E)`` with ``E``
the one-hot kernel ``E[c, (c, k), k] = 1`` (each channel on its own, ``groups=C_in``).

This is eq. S.14 with ``M`` for the weight and ``[[x]]^T`` for the patches, so the
factors are those of a convolution (``hbpkit/modules/conv/kronecker.py``, both
``kfac_approx``, groups): ``G`` over the ``C_out`` output channels from the output
curvature, ``A = 1/(NP) sum_{n,q} u u^T`` (expand) or ``1/N sum_n ubar ubar^T``
(reduce) over the columns ``u`` of ``[[x]]^T``. The weight is matricised as ``M``, its
first two dimensions swapped per group: ``KroneckerFactors(..., transposed=True)``
(``kron(G, A)`` in the row-major order of ``M``; ``to_dense`` is in ``p.flatten()``
order). BackPACK 1.7.1's ``KFAC``/``KFLR`` (``groups=1``) return the same
``A`` and the reduce ``G`` for ``weight.transpose(0, 1)``, its KFRA the reduce ``G``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hbpkit.core.calls import ModuleCall
from hbpkit.modules.conv.geometry import _CONV_TRANSPOSE
from hbpkit.modules.conv.kronecker import ConvOutputKronecker, grouped_input_factor


class ConvTransposeKronecker(ConvOutputKronecker):
    """Kronecker factors of ``nn.ConvTranspose1d/2d/3d`` (a mixin of
    :class:`ConvTransposeRules`)."""

    _kron_transposed = True

    def transposed_unfold(self, call: ModuleCall) -> Tensor:
        """``[[x]]^T`` for all samples, ``[N, C_in * prod(k), P]``, rows ``(c_in, k_1, ...)``."""
        m, x = call.module, call.input.detach()
        C_in, K = x.shape[1], math.prod(m.kernel_size)
        eye = torch.eye(K, dtype=x.dtype, device=x.device).reshape(1, K, *m.kernel_size)
        patches = _CONV_TRANSPOSE[self._dims(call)](
            x,
            eye.expand(C_in, *eye.shape[1:]),
            None,
            stride=m.stride,
            padding=m.padding,
            output_padding=self._output_padding(call),
            groups=C_in,
            dilation=m.dilation,
        )  # [N, C_in K, *out]
        return patches.flatten(2)

    def input_factor(self, call: ModuleCall, approx: str) -> Tensor:
        """``A`` ``[S, S]`` (``[g, S, S]`` for ``g = groups > 1``, ``S = C_in/g prod(k)``)
        from the columns of ``[[x]]^T``, per group of input channels."""
        key = ("conv_transpose_A", approx)
        if key not in call.cache:
            u = self.transposed_unfold(call)
            call.cache[key] = grouped_input_factor(u, call.module.groups, approx)
        return call.cache[key]
