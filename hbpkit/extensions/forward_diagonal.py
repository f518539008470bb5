"""A parameter's curvature diagonal by forward products: the forward form of ``DiagHessian``.

The column form (``diagonal.py``) squares ``J_p^T s`` for every column ``s`` of the
output curvature's sqrt factors. Behind convolutions the exact Hessian has one residual
column per activation entry (S.9), each carried back through every layer in between
(``curvature/local.py``): at the first layer of the table S.2b CNN that is about 50 000
columns per sample. The forward form reads the same diagonal from the other side,

    ``diag(J_p^T H J_p)[i] = (J_p e_i)^T H (J_p e_i)``,

pushing the tangent ``J_p e_i`` of each parameter entry ``i`` forward through the graph and
summing ``t^T R t`` at every residual and ``t^T (d2L/dz dz) t`` at the loss
(:meth:`~hbpkit.extensions.graph_curvature.GraphCurvature.quadratic`, eq. 7 unrolled): one
forward product per entry instead of one transposed product per column. It pays for a
layer with few parameters and many columns behind it.

The pass offers it (:attr:`PassPlan.forward_form`) at calls that send no message on, whose
columns' pending steps (lazy, ``LocalFactor``) then run for their own diagonal only, and
the call takes it where its estimated multiply-adds are below those of the column form
(``param_diag_cost`` of the rules; rules without an estimate keep the column form).
"""

from __future__ import annotations

import math

from torch import Tensor

from hbpkit.core.calls import ModuleCall
from hbpkit.curvature.factors import Factor
from hbpkit.curvature.memory import policy_of
from hbpkit.extensions.graph_curvature import GraphCurvature, forward_macs

#: the pass offers the forward form only where a call has at least this many residual
#: entries behind it (columns of the column form) per parameter entry (tangent): offering
#: it keeps the forward data of the calls behind until the pass ends. Measured on the
#: table S.2b CNN's first layer at batch 128: a local column costs 5 us, a tangent's push
#: 117 us (ratio 23; 111 columns per entry there, 14 on c3d3's first layer, which keeps
#: the column form)
COLUMNS_PER_TANGENT = 16

#: tangents of one chunk alive at once during the push (sizes the chunks; measured on the
#: table S.2b CNN at batch 16: 5 tangents per chunk 1.25 s, 16 per chunk 1.53 s)
LIVE_TANGENTS = 3


def forward_cost(rules, call: ModuleCall, curvature: GraphCurvature) -> int:
    """Multiply-adds of :func:`param_diag_forward` for every parameter of ``call``: per entry
    and sample, its tangent (about a forward product through ``call``) and its push."""
    entries = sum(call.param(name).numel() for name in rules.param_names(call.module))
    per_tangent = forward_macs(call) + curvature.push_macs()
    return entries * call.output_shape[0] * per_tangent


def prefers_forward(rules, call: ModuleCall, factors: list[Factor], curvature) -> bool:
    """Whether ``call``'s diagonals take the forward form (one decision for all of its
    parameters, cached: the column form computes them in one pass over the columns)."""
    key = "diag_by_forward"
    if key not in call.cache:
        columns = rules.param_diag_cost(call, factors)
        call.cache[key] = columns is not None and forward_cost(rules, call, curvature) < columns
    return call.cache[key]


def param_diag_forward(rules, call: ModuleCall, name: str, curvature: GraphCurvature) -> Tensor:
    """``diag(J_p^T H J_p)`` of parameter ``name`` ``[*p.shape]``, from the tangents of unit
    vectors (``rules.param_jac_mat_prod``) in chunks within ``MemoryPolicy.local_chunk_bytes``
    (about three tangents live at the widest call of the push: the one read, its product,
    and one kept for a later consumer)."""
    param = call.param(name)
    K, N = param.numel(), call.output_shape[0]
    widest = max(curvature.widest(), math.prod(call.output_shape[1:]))
    per_tangent = LIVE_TANGENTS * N * widest * param.element_size()
    chunk = max(1, policy_of(call).local_chunk_bytes // per_tangent)
    block = rules.param_channel_block(call, name) or K  # entries per output channel
    diag = param.new_empty(K)
    for c0 in range(0, K, block):  # a chunk's tangents lie in one channel (if block < K)
        for k0 in range(c0, min(K, c0 + block), chunk):
            k = min(chunk, K - k0, c0 + block - k0)
            units = param.new_zeros(k, K)
            units.diagonal(k0).fill_(1)  # e_{k0}, ..., e_{k0 + k - 1}
            tangents = rules.param_jac_mat_prod(call, name, units.reshape(k, *param.shape))
            if block == K:
                diag[k0 : k0 + k] = curvature.quadratic(tangents)
                continue
            channel = c0 // block
            narrowed = tangents[:, :, channel : channel + 1]
            diag[k0 : k0 + k] = curvature.quadratic(narrowed, channel)
    return diag.reshape(param.shape)
