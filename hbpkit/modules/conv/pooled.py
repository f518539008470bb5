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
    """Where each pooled position ``(n, o, q)`` reads the conv output, and the scale there.

    ``steps``: a factor's tail (a :class:`SelectStep`, then shifts and scales) that ends on
    the conv output ``[N, C_out, *size]``. ``position`` ``[N, C_out, Q]`` flat positions in
    ``size`` (0 where the entry is dropped), ``scale`` ``[N, C_out, *pooled]`` the product
    of the activations' derivatives there (0 where dropped).
    """

    def __init__(self, steps: list, size: tuple[int, ...]) -> None:
        select: SelectStep = steps[0]
        index = select.index  # [N, C, *pooled] flat positions in select.size
        rest = index
        coords = []
        for n in reversed(select.size):  # the last dimension varies fastest
            coords.append(rest % n)
            rest = rest // n
        coords.reverse()
        valid = torch.ones_like(index, dtype=torch.bool)
        scale = None
        current = select.size
        for step in steps[1:]:
            if isinstance(step, ShiftStep):  # J^T of a padding: a crop
                coords = [c - left for c, left in zip(coords, step.left)]
                current = step.size
                for c, n in zip(coords, current):
                    valid &= (c >= 0) & (c < n)
            else:  # ScaleStep on the current map
                flat = self._flat(coords, current, valid)
                factor = step.d.flatten(2).gather(2, flat.flatten(2)).reshape(index.shape)
                scale = factor if scale is None else scale * factor
        if tuple(current) != tuple(size):
            raise ValueError(f"pooled tail ends on {tuple(current)}, the conv output is {size}")
        self.position = self._flat(coords, current, valid).flatten(2)
        self._valid, self._scale = valid, scale
        self._windows_key: LocalGeometry | None = None
        self._windows_value: Tensor | None = None
        self.pooled = tuple(index.shape[2:])

    def scale(self, block: slice, dtype: torch.dtype) -> Tensor:
        """``[b, C_out, *pooled]``: the derivatives at the read positions, 0 where dropped."""
        valid = self._valid[block].to(dtype)
        return valid if self._scale is None else self._scale[block].to(dtype) * valid

    @staticmethod
    def _flat(coords: list[Tensor], size, valid: Tensor) -> Tensor:
        flat = torch.zeros_like(coords[0])
        for c, n in zip(coords, size):
            flat = flat * n + c.clamp(0, n - 1)
        return torch.where(valid, flat, torch.zeros_like(flat))

    def windows(self, geom: LocalGeometry, u: Tensor, groups: int, dtype) -> Tensor:
        """:meth:`compute_windows` of all samples, cached for the last geometry."""
        if self._windows_key != geom:
            self._windows_key, self._windows_value = None, None  # free the old one first
            self._windows_value = self.compute_windows(geom, u, slice(None), groups, dtype)
            self._windows_key = geom
        return self._windows_value

    def compute_windows(self, geom, u: Tensor, block: slice, groups: int, dtype) -> Tensor:
        """``u~`` on the patches of ``geom``, ``[(A b C_out), prod(patch), S/G]``."""
        ut = self.gathered(u, block, groups, dtype)  # [b, C, S, *pooled]
        b, C, S = ut.shape[:3]
        A, P = math.prod(geom.anchors), math.prod(geom.patch)
        w = windows(ut.reshape(b, C * S, *self.pooled), geom)  # [b, C S, *A, *patch]
        return w.reshape(b, C, S, A, P).permute(3, 0, 1, 4, 2).reshape(A * b * C, P, S)

    def gathered(self, u: Tensor, block: slice, groups: int, dtype: torch.dtype) -> Tensor:
        """``u~`` ``[b, C_out, S/G, *pooled]`` of the samples ``block`` from ``u`` ``[N, S, P]``."""
        u = u[block]
        b, S, P = u.shape
        position = self.position[block]  # [b, C_out, Q]
        C, Q = position.shape[1:]
        ug = u.reshape(b, groups, 1, S // groups, P).expand(b, groups, C // groups, S // groups, P)
        index = position.reshape(b, groups, C // groups, 1, Q).expand(-1, -1, -1, S // groups, -1)
        ut = torch.gather(ug, 4, index)  # [b, G, C/G, S/G, Q]
        ut = ut * self.scale(block, dtype).reshape(b, groups, C // groups, 1, Q)
        return ut.reshape(b, C, S // groups, *self.pooled)


def pooled_diags(
    chunk: LocalValues,
    pooled: PooledInput,
    u: Tensor,
    groups: int,
    names: tuple[str, ...],
    max_bytes: int,
) -> dict[str, Tensor]:
    """``sum_{j, n} sign (J_p^T g_{j,n})^2`` of the weight ``[C_out, S/G]`` and the bias
    ``[C_out]`` for the columns ``chunk`` on the pooling output (before the pooling)."""
    geom: LocalGeometry = chunk.geom
    Cj, A, N = chunk.values.shape[0], math.prod(geom.anchors), chunk.batch
    C, Pq = geom.channels, math.prod(geom.patch)
    S = u.shape[1] // groups
    v = chunk.values.reshape(Cj, A, N, C, Pq)
    sign = None if chunk.sign is None else chunk.sign.reshape(Cj, A, N).to(v.dtype)
    per_sample = (A * C * Pq * S + C * S * math.prod(pooled.pooled) + Cj * A * C * S) * 2
    nb = max(1, min(N, max_bytes // max(1, per_sample * v.element_size())))
    out = {name: 0 for name in names}
    for n0 in range(0, N, nb):
        block = slice(n0, min(N, n0 + nb))
        b = block.stop - block.start
        vb = v[:, :, block]
        sb = None if sign is None else sign[:, :, block]
        if "weight" in names:
            if nb == N:  # the chunks of one anchor row share their windows
                w = pooled.windows(geom, u, groups, v.dtype)
            else:
                w = pooled.compute_windows(geom, u, block, groups, v.dtype)
            left = vb.permute(1, 2, 3, 0, 4).reshape(A * b * C, Cj, Pq)
            sq = torch.bmm(left, w).square_().view(A, b, C, Cj, S)
            if sb is not None:
                sq = sq.mul_(sb.permute(1, 2, 0).reshape(A, b, 1, Cj, 1))
            out["weight"] = out["weight"] + sq.sum((0, 1, 3))
        if "bias" in names:
            scale = windows(pooled.scale(block, v.dtype), geom)  # [b, C, *A, *patch]
            scale = scale.reshape(b, C, A, Pq).permute(2, 0, 1, 3)  # [A, b, C, Pq]
            per = (vb * scale).sum(-1).square_()  # [C_j, A, b, C]
            if sb is not None:
                per = per.mul_(sb.reshape(Cj, A, b, 1))
            out["bias"] = out["bias"] + per.sum((0, 1, 2))
    return out


def pooled_cost(f: LocalFactor, k: int, c_out: int, s: int) -> int:
    """Multiply-adds of :func:`pooled_diags` over all columns (the weight)."""
    return f.columns * f.batch * c_out * s * math.prod(f.geoms[k].patch)
