"""The weight diagonal of a convolution from local columns before a max-pooling (D.2, D.4).

A max-pooling behind a convolution (``conv, [activation], [zero padding], max-pool``)
makes the local columns on the conv output sparse: ``J^T`` of the pooling (S.9 / D.2,
``Pi_n^T``, hbpkit/curvature/local.py ``SelectStep``) puts each entry ``h[o, q]`` of a
column on the pooling output at the one input position ``pi_n(o, q)`` it copies, so a
patch of ``prod(patch_q)`` pooled positions covers ``(patch_q - 1) * stride + kernel``
positions per dimension of which at most ``prod(patch_q)`` per channel are non-zero (a
quarter for ``2x2`` windows). With ``g = d * Pi^T h`` (``d`` the activation's derivative,
the padding a crop) the weight derivative of one column and sample is

    ``sum_p g[o, p] u[s, p] = sum_q h[o, q] u~[o, s, q]``,
    ``u~[o, s, q] = d[o, pi(o, q)] u[s, pi(o, q)]``

(``u = [[x]]``, zero where ``pi(o, q)`` falls into the padding): the direct form's batched
products on ``prod(patch_q)`` instead of ``prod(patch)`` positions, on the columns before
the pooling (the pooling, padding and activation steps are not applied), with the input
gathered per output channel. The bias: ``sum_q h[o, q] d[o, pi(o, q)]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hbpkit.curvature.local import (
    LocalFactor,
    LocalGeometry,
    LocalValues,
    ScaleStep,
    SelectStep,
    ShiftStep,
    windows,
)


def pooled_tail(f: LocalFactor) -> int | None:
    """The number of steps of ``f`` before its last max-pooling, where only activations and
    paddings follow that pooling (``None``: no such tail)."""
    for k in range(len(f.steps) - 1, -1, -1):
        step = f.steps[k]
        if isinstance(step, SelectStep):
            return k
        if not isinstance(step, (ScaleStep, ShiftStep)):
            return None
    return None


class PooledInput:
    """``u~`` ``[N, C_out, S/G, *pooled]``: the unfolded input ``u`` ``[N, S, P]`` read where each
    pooled position ``(n, o, q)`` of a factor's tail (a :class:`SelectStep`, then shifts and
    scales, ending on the conv output ``[N, C_out, *size]``) reads the conv output, times the
    activations' derivatives there (0 where the position falls into a padding).
    """

    def __init__(self, steps: list, size: tuple[int, ...], u: Tensor, groups: int) -> None:
        select: SelectStep = steps[0]
        index = select.index  # [N, C, *pooled] flat positions in select.size
        rest, coords = index, []
        for n in reversed(select.size):  # the last dimension varies fastest
            coords.append(rest % n)
            rest = rest // n
        coords.reverse()
        valid = torch.ones_like(index, dtype=torch.bool)
        scale = valid.to(u.dtype)
        current = select.size
        for step in steps[1:]:
            if isinstance(step, ShiftStep):  # J^T of a padding: a crop
                coords = [c - left for c, left in zip(coords, step.left)]
                current = step.size
                for c, n in zip(coords, current):
                    valid &= (c >= 0) & (c < n)
            else:  # ScaleStep on the current map
                flat = _flat(coords, current, valid).flatten(2)
                scale = scale * step.d.flatten(2).gather(2, flat).reshape(index.shape)
        if tuple(current) != tuple(size):
            raise ValueError(f"pooled tail ends on {tuple(current)}, the conv output is {size}")
        self.pooled = tuple(index.shape[2:])
        #: the derivatives at the read positions, 0 where dropped, ``[N, C_out, *pooled]``
        self.scale = scale * valid.to(scale.dtype)
        position = _flat(coords, current, valid).flatten(2)  # [N, C_out, Q]
        N, S, P = u.shape
        (C, Q), G = position.shape[1:], groups
        ug = u.reshape(N, G, 1, S // G, P).expand(N, G, C // G, S // G, P)
        index = position.reshape(N, G, C // G, 1, Q).expand(-1, -1, -1, S // G, -1)
        ut = torch.gather(ug, 4, index)  # [N, G, C/G, S/G, Q]
        ut = ut.mul_(self.scale.reshape(N, G, C // G, 1, Q))
        self.u = ut.reshape(N, C, S // G, *self.pooled)
        self._key: tuple | None = None
        self._value: Tensor | None = None

    def windows(self, geom: LocalGeometry, block: slice, cache: bool) -> Tensor:
        """``u~`` on the patches of ``geom``, ``[(A b C_out), prod(patch), S/G]`` (zero outside
        the pooled map); cached for the last geometry if ``cache``: the chunks of one anchor
        row share it."""
        key = (geom, block.start, block.stop)
        if self._key == key:
            return self._value
        self._key, self._value = None, None  # free the old one first
        ut = self.u[block]
        b, C, S = ut.shape[:3]
        A, P = math.prod(geom.anchors), math.prod(geom.patch)
        w = windows(ut.reshape(b, C * S, *self.pooled), geom)  # [b, C S, *A, *patch]
        w = w.reshape(b, C, S, A, P).permute(3, 0, 1, 4, 2).reshape(A * b * C, P, S)
        if cache:
            self._key, self._value = key, w
        return w


def _flat(coords: list[Tensor], size, valid: Tensor) -> Tensor:
    """Flat positions in ``size`` of the coordinates (0 where not ``valid``)."""
    flat = torch.zeros_like(coords[0])
    for c, n in zip(coords, size):
        flat = flat * n + c.clamp(0, n - 1)
    return torch.where(valid, flat, torch.zeros_like(flat))


def pooled_diags(
    chunk: LocalValues, pooled: PooledInput, names: tuple[str, ...], max_bytes: int
) -> dict[str, Tensor]:
    """``sum_{j, n} sign (J_p^T g_{j,n})^2`` of the weight ``[C_out, S/G]`` and the bias
    ``[C_out]`` for the columns ``chunk`` on the pooling output (before the pooling), in
    groups of samples whose windows of ``u~`` fit ``max_bytes``."""
    geom: LocalGeometry = chunk.geom
    Cj, A, N = chunk.values.shape[0], math.prod(geom.anchors), chunk.batch
    C, Pq = geom.channels, math.prod(geom.patch)
    S = pooled.u.shape[2]
    v = chunk.values.reshape(Cj, A, N, C, Pq)
    sign = None if chunk.sign is None else chunk.sign.reshape(Cj, A, N).to(v.dtype)
    per_sample = A * C * Pq * S * v.element_size()
    nb = max(1, min(N, max_bytes // max(1, per_sample)))
    out = {name: 0 for name in names}
    for n0 in range(0, N, nb):
        block = slice(n0, min(N, n0 + nb))
        b = block.stop - block.start
        vb = v[:, :, block]
        sb = None if sign is None else sign[:, :, block]
        if "weight" in names:
            w = pooled.windows(geom, block, cache=nb == N)
            left = vb.permute(1, 2, 3, 0, 4).reshape(A * b * C, Cj, Pq)
            sq = torch.bmm(left, w).square_().view(A, b, C, Cj, S)
            if sb is not None:
                sq = sq.mul_(sb.permute(1, 2, 0).reshape(A, b, 1, Cj, 1))
            out["weight"] = out["weight"] + sq.sum((0, 1, 3))
        if "bias" in names:
            scale = windows(pooled.scale[block], geom)  # [b, C, *A, *patch]
            scale = scale.reshape(b, C, A, Pq).permute(2, 0, 1, 3)  # [A, b, C, Pq]
            per = (vb * scale).sum(-1).square_()  # [C_j, A, b, C]
            if sb is not None:
                per = per.mul_(sb.reshape(Cj, A, b, 1))
            out["bias"] = out["bias"] + per.sum((0, 1, 2))
    return out


def pooled_cost(f: LocalFactor, k: int, c_out: int, s: int) -> int:
    """Multiply-adds of :func:`pooled_diags` over all columns (the weight)."""
    return f.columns * f.batch * c_out * s * math.prod(f.geoms[k].patch)


def pooled_bytes(f: LocalFactor, k: int, c_out: int, s: int) -> int:
    """Bytes of ``u~`` per sample."""
    select: SelectStep = f.steps[k]
    return c_out * s * math.prod(select.index.shape[2:]) * f.dtype.itemsize
