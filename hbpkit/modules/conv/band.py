"""The weight diagonal of a convolution from the band of its output curvature (D.4, S.14).

For local columns ``v_j`` of a sqrt factor of the output curvature (``hbpkit/curvature/
local.py``) the weight diagonal of ``nn.Conv1d/2d/3d`` is

    ``diag[o, s] = sum_n sum_j sign_j (sum_p v_j[o, p] u_n[s, p])^2
                 = sum_n sum_{p, p'} u_n[s, p] u_n[s, p'] H_n[o, p, p']``,

``u_n = [[x_n]]`` ``[S, P]`` (one group) and ``H_n[o] = sum_j sign_j v_j[o] v_j[o]^T`` the
per-channel blocks of the output curvature. A column lives on a patch of ``prod(patch)``
positions, so ``H_n[o, p, p + delta]`` is zero unless ``|delta| < patch`` per dimension: a
band. :class:`BandCurvature` accumulates it over all chunks of a factor (per anchor
``a``: ``B_a[o, i, k] = sum_j sign_j v_j[o, i] v_j[o, k]``, a batched product with the
columns' channels contracted, added at the patch's place) and contracts it once with
``u_n[s, p] u_n[s, p + delta]``. Multiply-adds per column and sample: ``C_out prod(patch)^2``
instead of ``C_out S prod(patch)``, plus one contraction ``N C_out S P prod(2 patch - 1)``;
:func:`band_wins` compares the two.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from hbpkit.curvature.local import LocalGeometry, LocalValues, windows


def _half_widths(geom: LocalGeometry) -> tuple[int, ...]:
    """Per dimension, the largest ``|delta|`` of two positions of one patch inside the map."""
    return tuple(min(p, n) - 1 for p, n in zip(geom.patch, geom.size))


def band_costs(geom: LocalGeometry, columns: int, batch: int, c_out: int, s: int) -> tuple:
    """Multiply-adds of the weight diagonal of ``columns`` local columns on ``geom`` (the
    conv output), ``(direct, band)``; ``s`` the patch length ``C_in / G * prod(kernel)``."""
    patch, P = math.prod(geom.patch), math.prod(geom.size)
    deltas = math.prod(2 * h + 1 for h in _half_widths(geom))
    direct = columns * batch * c_out * s * patch
    band = columns * batch * c_out * patch * patch + batch * c_out * s * P * deltas
    return direct, band


def band_bytes(geom: LocalGeometry, batch: int, c_out: int, itemsize: int) -> int:
    """Bytes of the accumulated band ``[N, C_out, *size, *(2 h + 1)]``."""
    deltas = math.prod(2 * h + 1 for h in _half_widths(geom))
    return batch * c_out * math.prod(geom.size) * deltas * itemsize


def band_wins(geom: LocalGeometry, columns: int, batch: int, c_out: int, s: int) -> bool:
    """Whether the band form needs at most half the direct form's multiply-adds (its batched
    products of a patch by a patch are smaller, hence slower per multiply-add)."""
    direct, band = band_costs(geom, columns, batch, c_out, s)
    return 2 * band <= direct


class BandCurvature:
    """``H_n[o, p, p + delta]`` of the output ``[N, C_out, *size]`` of a convolution,
    ``|delta_d| <= h_d`` (stored at ``delta + h``), accumulated from local columns.

    ``geom``: the geometry of the factor's columns on the conv output (every chunk's
    patches lie within its patch size).
    """

    def __init__(self, geom: LocalGeometry, batch: int, dtype: torch.dtype, device) -> None:
        self.size, self.half = geom.size, _half_widths(geom)
        deltas = [2 * h + 1 for h in self.half]
        self.H = torch.zeros(batch, geom.channels, *geom.size, *deltas, dtype=dtype, device=device)

    def add(self, chunk: LocalValues) -> None:
        """Add ``sum_j sign_j v_j v_j^T`` of the chunk's columns (channel blocks, band only)."""
        chunk = chunk.mask()  # entries outside the map must not enter the band
        geom, d = chunk.geom, len(self.size)
        Cj, A, N = chunk.values.shape[0], math.prod(geom.anchors), chunk.batch
        C, P = geom.channels, math.prod(geom.patch)
        v = chunk.values.reshape(Cj, A, N, C, P)
        signed = v if chunk.sign is None else v * chunk.sign.reshape(Cj, A, N, 1, 1)
        # [N, C, A, P, P]: batched over (a, n, o), the column channels j contracted
        B = torch.einsum("janoi,janok->noaik", signed, v)
        B = B.reshape(N, C, *geom.anchors, *geom.patch, *geom.patch)
        for i in itertools.product(*(range(p) for p in geom.patch)):
            target, source = [slice(None)] * 2, [slice(None)] * 2
            deltas, ks = [], []
            for dim in range(d):
                A_d, s, o, p = (
                    geom.anchors[dim],
                    geom.stride[dim],
                    geom.offset[dim],
                    geom.patch[dim],
                )
                n, h = self.size[dim], self.half[dim]
                # anchors whose entry i lies in the map: 0 <= o + a s + i < n
                lo = max(0, -((o + i[dim]) // s))
                hi = min(A_d, (n - 1 - o - i[dim]) // s + 1)
                if hi <= lo:
                    break
                start = o + lo * s + i[dim]
                target.append(slice(start, start + (hi - lo - 1) * s + 1, s))
                source.append(slice(lo, hi))
                # partners k with |k - i| <= h (the others are outside the map)
                k0, k1 = max(0, i[dim] - h), min(p, i[dim] + h + 1)
                ks.append(slice(k0, k1))
                deltas.append(slice(k0 - i[dim] + h, k1 - i[dim] + h))
            else:
                index = (*source, *i, *ks)
                self.H[(*target, *deltas)] += B[index]

    def weight_diag(self, u: Tensor, groups: int, max_bytes: int) -> Tensor:
        """``sum_{n, p, delta} u_n[s, p] u_n[s, p + delta] H_n[o, p, delta]``, ``[C_out, S/G]``.

        ``u`` ``[N, S, *size]`` the unfolded input; samples in groups of about
        ``max_bytes`` of products ``u u`` ``[S, P, prod(2 h + 1)]``.
        """
        N, S, d = u.shape[0], u.shape[1], len(self.size)
        geom = LocalGeometry(
            self.size,
            (1,) * d,
            tuple(-h for h in self.half),
            tuple(2 * h + 1 for h in self.half),
            self.size,
            S,
        )
        Q = math.prod(self.size) * math.prod(2 * h + 1 for h in self.half)
        per_sample = S * Q * u.element_size()
        nb = max(1, min(N, max_bytes // max(1, per_sample)))
        C = self.H.shape[1]
        out = u.new_zeros(groups, C // groups, S // groups)
        for n0 in range(0, N, nb):
            un = u[n0 : n0 + nb]
            w = windows(un, geom)  # [b, S, *size, *deltas]: u[s, p + delta]
            uu = (un.reshape(*un.shape, *([1] * d)) * w).reshape(-1, groups, S // groups, Q)
            H = self.H[n0 : n0 + nb].reshape(-1, groups, C // groups, Q)
            out += torch.einsum("ngsq,ngoq->gos", uu, H)
        return out.reshape(C, S // groups)
