"""Rules of convolutions ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` (supplement D).

A convolution of an input ``x`` ``[N, C_in, *in]`` with a kernel ``W``
``[C_out, C_in/groups, *k]`` is, per sample and per group of channels, the
matrix product of eq. S.14 (S.13 in index notation),

    ``Z = W [[x]] + b 1_P^T``,

where ``[[x]]`` (``unfold``, im2col) ``[S, P]`` holds the ``P = prod(out)``
flattened patches of ``S = C_in/groups * prod(k)`` entries each, and ``W`` is
matricised as ``[C_out, S]``. Everything is linear in ``x`` (no residual in
eq. 7) and the input Jacobian ``J`` does not depend on the sample (D.4:
``I_P kron W`` composed with the index map of ``unfold``, D.2). Paddings other
than symmetric zeros (``padding="same"`` with an even kernel, ``padding_mode``
``"reflect"``, ``"replicate"``, ``"circular"``) are an index map in front of the
zero-padded convolution, ``x -> pad(x)`` (D.2), which is linear too.

Notation in this file: ``u_{n,p}`` ``[S]`` is the ``p``-th patch of sample ``n``
(a column of ``[[x_n]]``), ``s_{v,n,p}`` ``[C_out]`` the sqrt factor ``v`` at output
position ``p``, ``D = C * prod(spatial)`` the number of features.

A transposed convolution ``z = conv_transpose(x, W) + b`` (``W`` ``[C_in,
C_out/groups, *k]``) is the adjoint of a convolution: its rules swap the roles
of input and output (the input Jacobian's transpose is a convolution; the weight
derivative pairs ``x`` with the patches of the output-side tensor). Its Kronecker
factors are those of eq. S.14 in the transposed geometry (the weight matricised with its
first two dimensions swapped, the patches of the zero-stuffed input).

Dense matrices over the features of a convolution grow like ``D^2`` (the
batch-averaged matrix of KFRA; a diagonal factor backpropagated through the
convolution, ``[D_out, N, *in]``). Such products check their size against
``MemoryPolicy.max_dense_bytes`` before allocating and raise :class:`DenseBudgetError`.

The rules are split by concern: :mod:`.geometry` (padding, windows, ``unfold``),
:mod:`.base` (input Jacobians and parameter Jacobian products shared with the
transposed convolution), :mod:`.diagonal` (the weight diagonal, the hot loop of
DiagGGNExact), :mod:`.kronecker` (Kronecker factors, per group of channels with ``groups > 1``),
:mod:`.transpose_kronecker` (those of transposed convolutions), :mod:`.convolution`
(:class:`ConvRules`) and :mod:`.transpose` (:class:`ConvTransposeRules`).
"""

from __future__ import annotations

from torch import nn

from hbpkit.modules.base import ModuleRules
from hbpkit.modules.conv.convolution import ConvRules
from hbpkit.modules.conv.transpose import ConvTransposeRules

# the rule classes' public home (``hbpkit.modules.conv``: their family in the support table)
ConvRules.__module__ = ConvTransposeRules.__module__ = __name__

CONV = ConvRules()
CONV_TRANSPOSE = ConvTransposeRules()

#: convolution module types and their rules
CONVOLUTIONS: dict[type, ModuleRules] = {
    nn.Conv1d: CONV,
    nn.Conv2d: CONV,
    nn.Conv3d: CONV,
    nn.ConvTranspose1d: CONV_TRANSPOSE,
    nn.ConvTranspose2d: CONV_TRANSPOSE,
    nn.ConvTranspose3d: CONV_TRANSPOSE,
}

__all__ = [
    "CONVOLUTIONS",
    "ConvRules",
    "ConvTransposeRules",
]
