"""The patch Gram ``sum_{n,p} u_{n,p} u_{n,p}^T`` of a convolution from the autocorrelation
of its input over kernel offsets (the expand input factor ``A`` of KFAC / KFLR, up to
``1/(NP)``; issue 17, item 3).

Along the last spatial dimension (stride 1, no dilation, ``K`` kernel offsets, ``out``
output positions, ``L = out + K - 1`` padded input positions) an entry of the Gram pairs
offsets ``k, k'`` of the same window position ``p``:

    ``A[(a, k), (b, k')] = sum_{m, p < out} X[m, a, p + k] X[m, b, p + k']``,

with ``a, b`` the channels ``(c_in, k_1, .., k_{d-1})`` of the input unfolded along the
other dimensions only (``X`` ``[N, C K_f, P_f, L]``, ``m = (n, p_f)``). For ``k >= k'``
write ``k = j + t``, ``k' = t``: the sum runs over ``q = p + t in [t, t + out)``, the
window of the lag ``j`` shifted by ``t``. So

    ``A[(a, j + t), (b, t)] = B_j[a, b] + sum_{q < t} (X_q+out+j X_q+out^T - X_q+j X_q^T)[a, b]``

with ``B_j = sum_{m, q < out} X[m, :, q + j] X[m, :, q]^T`` the autocorrelation at lag
``j`` (one weight-gradient convolution for all lags: ``1/K`` of the Gram's products) and
the corrections from the Grams of the ``K - 1`` first and last input columns
(``2 (K - 1)^2 / (K^2 out)`` of the Gram's products). Pairs ``k < k'`` are transposes.
The result is the Gram of the unfolded input (rows ``(c_in, k_1, .., k_d)`` as in
``F.unfold``) to round-off: the same sums, grouped differently.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hbpkit.modules.conv.geometry import _CONV_WEIGHT


def autocorrelation_applies(
    kernel_size: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...], out: int
) -> bool:
    """Whether :func:`patch_gram` applies and saves work: stride 1 and no dilation along the
    last spatial dimension, at least two offsets there and more output positions than that."""
    K = kernel_size[-1]
    return stride[-1] == 1 and dilation[-1] == 1 and K > 1 and out > K


def patch_gram(
    x: Tensor,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
) -> Tensor:
    """``sum_{n,p} u_{n,p} u_{n,p}^T`` per group, ``[groups, S, S]`` (``S = C_in/groups *
    prod(k)``), of the padded input ``x`` ``[N, C_in, *L]`` (module docstring).

    Needs :func:`autocorrelation_applies` (stride 1, no dilation along the last dimension);
    the other dimensions take any stride and dilation.
    """
    K = kernel_size[-1]
    X = _unfold_front(x, kernel_size, stride, dilation)  # [N, C Kf, Pf, L]
    N, C_hat, Pf, L = X.shape
    out, m = L - K + 1, C_hat // groups
    # B[b, a, 0, j] = sum X[a, q + j] X[b, q] over q < out (a, b in one group)
    B = _CONV_WEIGHT[2](X, [C_hat, m, 1, K], X[..., :out], groups=groups)
    B = B.reshape(groups, m, m, K).permute(0, 3, 2, 1).contiguous()  # [g, j, a, b]
    # Grams of the first and last K - 1 columns, E[e, g, (a, q), (b, r)] = sum X[a, q] X[b, r]
    # (e = 0 head, 1 tail), as one batched product of a small copy
    edges = torch.stack([X[..., : K - 1], X[..., out:]])  # [2, N, C Kf, Pf, K - 1]
    edges = edges.unflatten(2, (groups, m)).permute(0, 2, 1, 4, 3, 5)  # [2, g, N, Pf, a, q]
    edges = edges.reshape(2 * groups, N * Pf, m * (K - 1))
    E = torch.bmm(edges.mT, edges).reshape(2, groups, m, K - 1, m, K - 1)
    D = (E[1] - E[0]).permute(0, 2, 4, 1, 3).contiguous()  # [g, q, r, a, b]
    # contiguous [a, b] blocks at [k, k'], rearranged once at the end
    blocks = x.new_empty(groups, K, K, m, m)
    for j in range(K):
        block = B[:, j]  # t = 0
        for t in range(K - j):
            if t > 0:  # the window moves by one: + column q + out, - column q (q = t - 1)
                block = block + D[:, j + t - 1, t - 1]
            blocks[:, j + t, t] = block
            if j > 0:
                blocks[:, t, j + t] = block.mT
    return blocks.permute(0, 3, 1, 4, 2).reshape(groups, m * K, m * K)


def _unfold_front(
    x: Tensor, kernel_size: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]
) -> Tensor:
    """``[N, C, *L] -> [N, C prod(k[:-1]), prod(out[:-1]), L[-1]]``: the input unfolded along
    all spatial dimensions but the last (rows ``(c, k_1, .., k_{d-1})``)."""
    d = len(kernel_size)
    t = x
    for i in range(d - 1):
        k, s, dil = kernel_size[i], stride[i], dilation[i]
        t = t.unfold(2 + i, dil * (k - 1) + 1, s)[..., ::dil]  # appends the offset axis
    # [N, C, *out_f, L, *k_f] -> [N, C, *k_f, *out_f, L]
    order = [0, 1, *range(d + 2, 2 * d + 1), *range(2, d + 1), d + 1]
    t = t.permute(order)
    N, C = x.shape[:2]
    Kf = math.prod(kernel_size[:-1])
    return t.reshape(N, C * Kf, -1, x.shape[-1])
