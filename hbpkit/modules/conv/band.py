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
instead of ``C_out S prod(patch)``, plus one contraction of about
``N C_out S P prod(2 patch - 1) / 2`` (symmetric: half the offsets); :func:`band_wins`
compares the two.
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


def _stored_deltas(geom: LocalGeometry) -> int:
    """The offsets stored per position: ``0 <= delta_0 <= h_0``, ``|delta_d| <= h_d``."""
    half = _half_widths(geom)
    return (half[0] + 1) * math.prod(2 * h + 1 for h in half[1:])


def band_costs(geom: LocalGeometry, columns: int, batch: int, c_out: int, s: int) -> tuple:
    """Multiply-adds of the weight diagonal of ``columns`` local columns on ``geom`` (the
    conv output), ``(direct, band)``; ``s`` the patch length ``C_in / G * prod(kernel)``.
    The contraction's products ``u u`` count as ``ELEMENTWISE`` multiply-adds each (they
    are written and read once, for ``C_out`` multiply-adds)."""
    patch, P = math.prod(geom.patch), math.prod(geom.size)
    direct = columns * batch * c_out * s * patch
    contraction = batch * s * P * _stored_deltas(geom) * (c_out + ELEMENTWISE)
    band = columns * batch * c_out * patch * patch + contraction
    return direct, band


#: the cost of one product ``u[s, p] u[s, p + delta]`` in multiply-adds (a rough weight:
#: with few output channels the contraction is bound by writing and reading ``u u``)
ELEMENTWISE = 32


def gathered_band_cost(geom: LocalGeometry, columns: int, batch: int, c_out: int, s: int) -> int:
    """Multiply-adds of accumulating the band of ``columns`` local columns on ``geom`` (the
    pooled map), ``C_out prod(patch)^2`` per column and sample, and of
    :meth:`BandCurvature.weight_diag_gathered`, ``C_out S P^2`` per sample."""
    patch, P = math.prod(geom.patch), math.prod(geom.size)
    return columns * batch * c_out * patch * patch + batch * c_out * s * P * P


def band_bytes(geom: LocalGeometry, batch: int, c_out: int, itemsize: int) -> int:
    """Bytes of the accumulated band ``[N, C_out, *size, h_0 + 1, *(2 h + 1)]``."""
    return batch * c_out * math.prod(geom.size) * _stored_deltas(geom) * itemsize


def band_wins(geom: LocalGeometry, columns: int, batch: int, c_out: int, s: int) -> bool:
    """Whether the band form needs at most half the direct form's multiply-adds (its batched
    products of a patch by a patch are smaller, hence slower per multiply-add)."""
    direct, band = band_costs(geom, columns, batch, c_out, s)
    return 2 * band <= direct


class BandCurvature:
    """``H_n[o, p, p + delta]`` of the output ``[N, C_out, *size]`` of a convolution for
    ``0 <= delta_0 <= h_0`` and ``|delta_d| <= h_d`` in the other dimensions (stored at
    ``delta_0`` and ``delta_d + h_d``), accumulated from local columns: ``H_n`` is symmetric,
    so the pairs with ``delta_0 < 0`` are those with ``delta_0 > 0`` (and of those with
    ``delta_0 = 0`` only the lexicographically positive half is contracted).

    ``geom``: the geometry of the factor's columns on the conv output (every chunk's
    patches lie within its patch size).
    """

    def __init__(self, geom: LocalGeometry, batch: int, dtype: torch.dtype, device) -> None:
        self.size, self.half = geom.size, _half_widths(geom)
        deltas = [self.half[0] + 1, *(2 * h + 1 for h in self.half[1:])]
        self.H = torch.zeros(batch, geom.channels, *geom.size, *deltas, dtype=dtype, device=device)
        self._folded = False  # see _fold_symmetric

    def add(self, chunk: LocalValues) -> None:
        """Add ``sum_j sign_j v_j v_j^T`` of the chunk's columns (channel blocks, band only)."""
        if self._folded:
            raise RuntimeError("BandCurvature.add after a contraction (the band is folded)")
        chunk = chunk.mask()  # entries outside the map must not enter the band
        geom, d = chunk.geom, len(self.size)
        Cj, A, N = chunk.values.shape[0], math.prod(geom.anchors), chunk.batch
        C, P = geom.channels, math.prod(geom.patch)
        v = chunk.values.reshape(Cj, A, N, C, P)
        signed = v if chunk.sign is None else v * chunk.sign.reshape(Cj, A, N, 1, 1)
        # B_a[o, i, k], batched over (a, n, o) with the column channels j contracted
        B = torch.einsum("janoi,janok->anoik", signed, v)  # the batched product's layout
        B = B.reshape(*geom.anchors, N, C, *geom.patch, *geom.patch)
        B = B.movedim(list(range(d)), list(range(2, 2 + d)))  # [N, C, *A, *patch, *patch]
        for i in itertools.product(*(range(p) for p in geom.patch)):
            target, source = [slice(None)] * 2, [slice(None)] * 2
            deltas, ks = [], []
            for dim, (A_d, s, o, p) in enumerate(
                zip(geom.anchors, geom.stride, geom.offset, geom.patch)
            ):
                n, h, at = self.size[dim], self.half[dim], i[dim]
                # anchors whose entry i lies in the map: 0 <= o + a s + i < n
                lo, hi = max(0, -((o + at) // s)), min(A_d, (n - 1 - o - at) // s + 1)
                if hi <= lo:
                    break
                start = o + lo * s + at
                target.append(slice(start, start + (hi - lo - 1) * s + 1, s))
                source.append(slice(lo, hi))
                # partners k with -h <= k - i <= h (0 <= k - i in dimension 0); the others
                # are outside the map or the mirrored pairs
                first = at if dim == 0 else max(0, at - h)
                last = min(p, at + h + 1)
                if last <= first:
                    break
                ks.append(slice(first, last))
                shift = 0 if dim == 0 else h
                deltas.append(slice(first - at + shift, last - at + shift))
            else:
                self.H[(*target, *deltas)] += B[(*source, *i, *ks)]

    def _fold_symmetric(self) -> None:
        """Prepare the stored half for contracting twice (once, in place): zero the
        lexicographically negative offsets of the ``delta_0 = 0`` row and halve ``delta = 0``.
        Both factors of the contraction are symmetric in the pair ``(p, p + delta)``, so twice
        the sum over the prepared half is the sum over all offsets."""
        if self._folded:
            return
        self._folded = True
        H, half, d = self.H, self.half, len(self.size)
        row = H[(slice(None),) * (2 + d) + (0,)]  # delta_0 = 0: [N, C, *size, *deltas[1:]]
        for j in range(1, d):  # zero the lexicographically negative delta of that row
            row[(slice(None),) * (2 + d) + (half[1:j]) + (slice(0, half[j]),)] = 0
        row[(slice(None),) * (2 + d) + tuple(half[1:])] *= 0.5

    def weight_diag(self, u: Tensor, groups: int, max_bytes: int) -> Tensor:
        """``sum_{n, p, delta} u_n[s, p] u_n[s, p + delta] H_n[o, p, delta]``, ``[C_out, S/G]``.

        ``u`` ``[N, S, *size]`` the unfolded input. Twice the contraction with the prepared
        half (:meth:`_fold_symmetric`): one batched product ``[S, P D] @ [P D, C_out]`` per
        sample and group, samples in groups of about ``max_bytes`` of products ``u u``.
        """
        self._fold_symmetric()
        N, S, d = u.shape[0], u.shape[1], len(self.size)
        H, half, size = self.H, self.half, self.size
        patch = H.shape[2 + d :]
        geom = LocalGeometry(size, (1,) * d, (0, *(-h for h in half[1:])), patch, size, S)
        C, Q = H.shape[1], math.prod(size) * math.prod(patch)
        nb = max(1, min(N, max_bytes // max(1, S * Q * u.element_size())))
        out = u.new_zeros(groups, S // groups, C // groups)
        for n0 in range(0, N, nb):
            un = u[n0 : n0 + nb]
            w = windows(un, geom)  # [b, S, *size, *patch]: u[s, p + delta]
            uu = torch.empty(w.shape, dtype=u.dtype, device=u.device)
            torch.mul(un.reshape(*un.shape, *([1] * d)), w, out=uu)
            uu = uu.view(-1, S // groups, Q)  # [(b g), S/G, Q]
            Hn = H[n0 : n0 + nb].view(-1, C // groups, Q)
            prod = torch.bmm(uu, Hn.mT)  # [(b g), S/G, C/G]
            out += prod.view(-1, groups, S // groups, C // groups).sum(0)
        return 2 * out.mT.reshape(C, S // groups)

    def weight_diag_gathered(self, ut: Tensor, max_bytes: int) -> Tensor:
        """``sum_{n, p, p'} ut_n[o, s, p] ut_n[o, s, p'] H_n[o, p, p']``, ``[C_out, S/G]``, for an
        input read per output channel: ``ut`` ``[N, C_out, S/G, *size]`` (the pooled form's
        ``u~``, ``pooled.py``, on the pooled map of ``P`` positions).

        Per sample and channel the band is laid out as the dense symmetric ``[P, P]`` block
        (:meth:`dense`), then one batched product ``[S, P] @ [P, P]`` and a row-wise dot with
        ``ut``; samples in blocks of about ``max_bytes`` of dense blocks.
        """
        N, C, S = ut.shape[:3]
        P = math.prod(self.size)
        per_sample = C * (P * P + S * P) * ut.element_size()
        nb = max(1, min(N, max_bytes // max(1, per_sample)))
        out = ut.new_zeros(C, S)
        for n0 in range(0, N, nb):
            un = ut[n0 : n0 + nb].reshape(-1, C, S, P)
            Hd = self.dense(slice(n0, n0 + nb))  # [b, C, P, P]
            z = torch.matmul(un, Hd)  # [b, C, S, P]
            out += z.mul_(un).sum((0, 3))
        return out

    def dense(self, block: slice) -> Tensor:
        """``H_n[o]`` of the samples ``block`` as dense symmetric blocks ``[b, C, P, P]``.

        Each stored offset ``delta`` fills the entries ``(p, p + delta)`` and their mirror
        ``(p + delta, p)`` (one strided view each) from the prepared half
        (:meth:`_fold_symmetric`: ``delta = 0`` is halved, so it is filled twice).
        """
        self._fold_symmetric()
        H, half, size, d = self.H[block], self.half, self.size, len(self.size)
        b, C, P = H.shape[0], H.shape[1], math.prod(size)
        Hd = H.new_zeros(b, C, *size, *size)
        st = Hd.stride()
        sp, sq = st[2 : 2 + d], st[2 + d :]  # strides of p and of p'
        for e in itertools.product(*(range(n) for n in H.shape[2 + d :])):
            delta = [e[0], *(x - h for x, h in zip(e[1:], half[1:]))]
            if delta[0] == 0 and _lexicographically_negative(delta[1:]):
                continue  # zero in the prepared half: its mirror carries it
            lo = [max(0, -x) for x in delta]
            hi = [min(n, n - x) for n, x in zip(size, delta)]
            if any(h <= lo_ for lo_, h in zip(lo, hi)):
                continue
            extent = (b, C, *(h - lo_ for lo_, h in zip(lo, hi)))
            steps = (st[0], st[1], *(a + c for a, c in zip(sp, sq)))
            source = H[(slice(None), slice(None), *(slice(lo_, h) for lo_, h in zip(lo, hi)), *e)]
            shifted = [x + y for x, y in zip(lo, delta)]
            for rows, cols in ((lo, shifted), (shifted, lo)):  # (p, p + delta), its mirror
                offset = sum(r * a + c * q for r, c, a, q in zip(rows, cols, sp, sq))
                Hd.as_strided(extent, steps, Hd.storage_offset() + offset).add_(source)
        return Hd.view(b, C, P, P)


def _lexicographically_negative(delta: list[int]) -> bool:
    """Whether the first non-zero entry of ``delta`` is negative."""
    return next((x < 0 for x in delta if x != 0), False)
