"""The diagonal of the weight / bias block of a convolution (D.4), the hot loop of
DiagGGNExact: ``H_W = ([[X]]^T kron I)^T H_Z ([[X]]^T kron I)``.
"""

from __future__ import annotations

import math

import torch
from einops import einsum
from torch import Tensor

from hbpkit.core.calls import ModuleCall
from hbpkit.curvature.factors import DiagonalFactor, Factor, SqrtFactor
from hbpkit.curvature.local import LocalFactor, LocalValues, windows
from hbpkit.curvature.memory import policy_of
from hbpkit.modules.conv.band import (
    BandCurvature,
    band_bytes,
    band_costs,
    band_wins,
    gathered_band_cost,
)
from hbpkit.modules.conv.pooled import (
    PooledInput,
    pooled_bytes,
    pooled_cost,
    pooled_diags,
    pooled_tail,
)
from hbpkit.modules.roles import per_role

#: batched products that contract fewer entries than this run at about that fraction of the
#: rate of long ones (measured on the table S.2 nets: 6 G multiply-adds per second for the
#: pooled form's 3x3 patches, 32 G for 14x14, 2 threads)
SHORT_CONTRACTION = 32


class ConvDiagonal:
    """``param_diag`` of convolutions and transposed convolutions (a mixin of the base)."""

    param_diag = per_role("param_diag")
    _param_diag_local = per_role("_param_diag_local")  # local columns, see ConvRules

    def param_diag_weight(self, call: ModuleCall, factors: list[Factor]) -> Tensor:
        """``diag(sum_{v,n} sign (J_W^T s)(J_W^T s)^T)``, shape ``weight.shape``.

        Sqrt factors ``[V, N, C_out, *out]`` are processed in chunks over ``V``
        (``MemoryPolicy.chunk_bytes``); a :class:`DiagonalFactor` ``diag(d_n)`` needs no
        per-column work: for Conv ``sum_{n,p} d_{n,o,p} u_{n,s,p}^2``.
        """
        shape = call.module.weight.shape

        def of_diagonal(f: DiagonalFactor) -> Tensor:
            left, right = self._weight_factors(call, f.signed_square(), square_input=True)
            return einsum(left, right, "n g a p, n g b p -> g a b")  # d: [N, C_out, *out]

        return sum(
            f.match(
                dense=lambda f: self._weight_diag(call, f),
                diagonal=of_diagonal,
                local=lambda f: self._param_diags_local(call, f)["weight"],
            ).reshape(shape)
            for f in factors
        )

    def param_diag_bias(self, call: ModuleCall, factors: list[Factor]) -> Tensor:
        """``diag(sum_{v,n} sign (1_P^T s)(1_P^T s)^T)``, ``[C_out]``."""

        def of_dense(f: SqrtFactor) -> Tensor:
            per_sample = f.S.flatten(3).sum(3)  # [V, N, C_out]
            return SqrtFactor(per_sample, f.sign).signed_square().sum((0, 1))

        return sum(
            f.match(
                dense=of_dense,
                diagonal=lambda f: f.signed_square().flatten(2).sum((0, 2)),
                local=lambda f: self._param_diags_local(call, f)["bias"],
            )
            for f in factors
        )

    def param_diag_cost(self, call: ModuleCall, factors: list[Factor]) -> int:
        """Multiply-adds of the weight diagonals from ``factors`` (the direct forms'; local
        factors also run their pending steps), weighed against the forward form."""
        m, N = call.module, call.output_shape[0]
        per_column = m.out_channels * m.weight[0].numel()  # per sample and patch position
        P = math.prod(call.output_shape[2:])
        return sum(
            f.match(
                dense=lambda f: f.S.shape[0] * N * per_column * P,
                diagonal=lambda f: N * per_column * P,
                local=lambda f: (
                    f.pending_macs() + f.columns * N * per_column * math.prod(f.geom.patch)
                ),
            )
            for f in factors
        )

    def _weight_diag(self, call: ModuleCall, f: SqrtFactor) -> Tensor:
        """``sum_{v,n} sign (J_W^T s_{v,n})^2`` of a dense sqrt factor, in chunks over ``V``."""
        V, N = f.S.shape[:2]
        per_column = N * self._column_numel(call) * f.S.element_size()
        chunk = max(1, policy_of(call).chunk_bytes // per_column)
        result = 0
        for start in range(0, V, chunk):
            left, right = self._weight_factors(call, f.S[start : start + chunk])
            if self._output_left:
                JtS = einsum(left, right, "v n g a p, n g b p -> v n g a b")
            else:
                JtS = einsum(left, right, "n g a p, v n g b p -> v n g a b")
            sign = None if f.sign is None else f.sign[start : start + chunk]
            result = result + SqrtFactor(JtS, sign).signed_square().sum((0, 1))
        return result

    def _param_diags_local(self, call: ModuleCall, f: LocalFactor) -> dict[str, Tensor]:
        """``param_diag`` of every parameter from one pass over the chunks of ``f`` (cached).

        A lazy factor recomputes its pending steps per chunk: one pass serves weight and bias.
        """
        key = ("conv_local_diag", id(f))  # f lives in the message during this call's hook
        if key not in call.cache:
            pooled = self._pooled_plan(call, f)
            if pooled is not None:
                call.cache[key] = self._pooled_diags(call, f, *pooled)
            else:
                call.cache[key] = self._chunk_diags(call, f)
        return call.cache[key]

    def _chunk_diags(self, call: ModuleCall, f: LocalFactor) -> dict[str, Tensor]:
        """Every parameter's diagonal from the chunks of ``f`` after all its steps: the weight
        from the band of the output curvature where that wins (``band.py``, in blocks of
        samples that rerun the pending steps), else per chunk (the direct form)."""
        names = self.param_names(call.module)
        diags = dict.fromkeys(names, 0)
        blocks = self._band_blocks(call, f)
        for block in [None] if blocks is None else blocks:
            # one block at a time: a block's factor holds its steps' caches
            part = f if blocks is None or len(blocks) == 1 else f.samples(block)
            band = None
            if block is not None:
                band = BandCurvature(part.geom, part.batch, part.dtype, call.module.weight.device)
            # the band form's intermediates per column: the signed columns and the two
            # operands of its batched product, each of a column's size
            numel = self._column_numel(call) if band is None else 3 * f.geom.column_numel
            for chunk in part.chunks(consumer_numel=numel):
                # one patch: a dense factor (cropped to the map) for the dense kernels
                one = math.prod(chunk.geom.anchors) == 1
                dense = chunk.tidy().to_sqrt() if one else None
                for name in names:
                    if name == "weight" and band is not None:
                        band.add(chunk)  # the samples of this block only
                        continue
                    if dense is not None:
                        diag = self.param_diag(call, name, [dense])
                    else:
                        diag = self._param_diag_local(call, name, chunk)
                    diags[name] = diags[name] + diag
            if band is not None:
                diags["weight"] = diags["weight"] + self._band_weight_diag(call, band, block)
        return diags

    def _band_blocks(self, call: ModuleCall, f: LocalFactor) -> list[slice] | None:
        """The sample blocks of the band form of the weight diagonal, where that wins
        (``None``: the direct form per chunk)."""
        return None

    def _pooled_plan(self, call: ModuleCall, f: LocalFactor) -> tuple | None:
        """``(k, PooledInput)`` where the columns before a max-pooling give the weight
        diagonal with fewer products (``pooled.py``; ``None``: not here)."""
        return None


class UnfoldedDiagonal:
    """The weight diagonal of ``nn.Conv1d/2d/3d`` from the cached ``[[x]]`` (a mixin of
    :class:`ConvRules`)."""

    def _param_diag_local_weight(self, call: ModuleCall, chunk: LocalValues) -> Tensor:
        """``sum_{j,n} sign (J_W^T v_{j,n})^2`` for local columns ``v`` (D.4, S.14).

        Column ``j`` of sample ``n`` lives on output positions ``start_j + o``; its weight
        derivative is ``sum_o v[:, o] u[:, start_j + o]^T`` per group, with ``u`` the
        unfolded input ``[[x_n]]`` ``[S, *out]`` read on the same patch (zero outside).
        """
        G = call.module.groups
        u = self._local_patches(call, chunk.geom)  # [A, N, G, P, S/G]
        A, N, _, P, S = u.shape
        Cj = chunk.values.shape[0]
        v = chunk.values.reshape(Cj, A, N, G, -1, P)  # [C_j, A, N, G, C_out/G, P]
        v = v.permute(1, 2, 3, 0, 4, 5).reshape(A * N * G, -1, P)
        JtV = torch.bmm(v, u.reshape(A * N * G, P, S))  # [(A N G), (C_j C_out/G), S/G]
        sq = JtV.square_()  # entries outside the output map meet zeros of the windowed input
        sq = sq.view(A, N, G, Cj, -1)
        if chunk.sign is not None:
            sign = chunk.sign.reshape(Cj, A, N).permute(1, 2, 0)
            sq = sq.mul_(sign.reshape(A, N, 1, Cj, 1))
        return sq.sum((0, 1, 3)).reshape(call.module.weight.shape)

    def _band_blocks(self, call: ModuleCall, f: LocalFactor) -> list[slice] | None:
        """Sample blocks for a :class:`BandCurvature` where it needs fewer multiply-adds than
        :meth:`_param_diag_local_weight` (short patches of many inputs, ``band.py``); each
        block's band fits ``MemoryPolicy.local_chunk_bytes`` (the blocks rerun the factor's
        pending steps on their samples: the same products, in more chunks)."""
        if "weight" not in self.param_names(call.module):
            return None
        geom, m, N = f.geom, call.module, f.batch
        S = m.weight[0].numel()  # C_in / G * prod(kernel)
        if not band_wins(geom, f.columns, N, m.out_channels, S):
            return None
        budget = policy_of(call).local_chunk_bytes
        per_sample = band_bytes(geom, 1, m.out_channels, f.dtype.itemsize)
        nb = _row_samples(f, len(f.steps), 0, min(N, budget // per_sample), budget)
        if nb < N and f.samples(slice(0, 1)) is None:
            return None
        return [slice(n0, min(N, n0 + nb)) for n0 in range(0, N, nb)]

    def _pooled_plan(self, call: ModuleCall, f: LocalFactor) -> tuple | None:
        """``(k, blocks, band)`` where the columns after the first ``k`` steps of ``f`` (before
        its last max-pooling, ``pooled.py``) need fewer products than the direct form and the
        band form; ``blocks`` of samples whose gathered input fits
        ``MemoryPolicy.local_chunk_bytes`` (each reruns the first ``k`` steps); ``band``:
        the weight diagonal from the band on the pooled map (``band.py``) where that wins."""
        k = pooled_tail(f)
        if k is None or "weight" not in self.param_names(call.module):
            return None
        m, N = call.module, f.batch
        S = m.weight[0].numel()  # C_in / G * prod(kernel)
        cost = pooled_cost(f, k, m.out_channels, S)
        banded = gathered_band_cost(f.geoms[k], f.columns, N, m.out_channels, S)
        direct, band = band_costs(f.geom, f.columns, N, m.out_channels, S)
        if 2 * min(cost, banded) > min(direct, 2 * band):
            return None
        # the direct pooled form contracts prod(patch) entries: slow per multiply-add if short
        use_band = banded < cost * max(1, SHORT_CONTRACTION / math.prod(f.geoms[k].patch))
        budget = policy_of(call).local_chunk_bytes
        per_sample = pooled_bytes(f, k, m.out_channels, S)
        if use_band:  # the block's band lives with its gathered input
            per_sample += band_bytes(f.geoms[k], 1, m.out_channels, f.dtype.itemsize)
        nb = _row_samples(f, k, self._column_numel(call), min(N, budget // per_sample), budget)
        if nb < N and f.samples(slice(0, 1)) is None:
            return None
        return k, [slice(n0, min(N, n0 + nb)) for n0 in range(0, N, nb)], use_band

    def _pooled_diags(
        self, call: ModuleCall, f: LocalFactor, k: int, blocks: list[slice], banded: bool
    ) -> dict[str, Tensor]:
        """Every parameter's diagonal from the columns before the pooling (``pooled.py``),
        per block of samples; the weight's from the band on the pooled map if ``banded``."""
        m, names = call.module, tuple(self.param_names(call.module))
        u = self.unfold(call)  # [N, S, P]
        size = tuple(call.output_shape[2:])
        diags = dict.fromkeys(names, 0)
        budget = policy_of(call).local_chunk_bytes
        direct = tuple(n for n in names if not (banded and n == "weight"))
        for block in blocks:
            part = pooled = band = None  # free the last block's factor, caches and input
            part = f if len(blocks) == 1 else f.samples(block)
            pooled = PooledInput(part.steps[k:], size, u[block], m.groups)
            if banded:
                band = BandCurvature(part.geoms[k], part.batch, part.dtype, m.weight.device)
            for chunk in part.chunks(consumer_numel=self._column_numel(call), steps=k):
                if band is not None:
                    band.add(chunk)
                result = pooled_diags(chunk, pooled, direct, budget) if direct else {}
                for name in direct:
                    diags[name] = diags[name] + result[name]
            if band is not None:
                diags["weight"] = diags["weight"] + band.weight_diag_gathered(pooled.u, budget)
        diags["weight"] = diags["weight"].reshape(m.weight.shape)
        return diags

    def _band_weight_diag(self, call: ModuleCall, band: BandCurvature, block: slice) -> Tensor:
        """The weight diagonal from the band accumulated for the samples ``block``."""
        u = self.unfold(call)[block]
        u = u.reshape(*u.shape[:2], *call.output_shape[2:])
        diag = band.weight_diag(u, call.module.groups, policy_of(call).local_chunk_bytes)
        return diag.reshape(call.module.weight.shape)

    def _local_patches(self, call: ModuleCall, geom) -> Tensor:
        """``[[x]]`` on the patches of ``geom``, ``[A, N, G, P_patch, S/G]`` (zero outside the
        output map), cached for the last geometry: the chunks of one anchor row share it."""
        cached = call.cache.get("conv_local_patches")
        if cached is None or cached[0] != geom:
            call.cache.pop("conv_local_patches", None)  # free the old one first
            G = call.module.groups
            u = self.unfold(call)
            u = windows(u.reshape(*u.shape[:2], *call.output_shape[2:]), geom)  # [N, S, *A, *P]
            u = u.reshape(u.shape[0], G, -1, math.prod(geom.anchors), math.prod(geom.patch))
            cached = (geom, u.permute(3, 0, 1, 4, 2).contiguous())
            call.cache["conv_local_patches"] = cached
        return cached[1]

    def _param_diag_local_bias(self, call: ModuleCall, chunk: LocalValues) -> Tensor:
        """``sum_{j,n} sign (1^T v_{j,n})^2`` for local columns ``v``, ``[C_out]``."""
        columns = chunk.columns()  # [J, N, C_out, *patch]
        per_sample = columns.S.flatten(3).sum(3)  # [J, N, C_out]
        return SqrtFactor(per_sample, columns.sign).signed_square().sum((0, 1))

    # the weight diagonal from a dense sqrt factor (the hot loop of DiagGGNExact) ------------
    def _weight_diag(self, call: ModuleCall, f: SqrtFactor) -> Tensor:
        """``sum_{v,n} sign (s_{v,n} [[x_n]]^T)^2`` (S.14), ``[weight.numel()]``.

        Batched products of the cached ``[[x]]`` with the ``V`` columns of a few samples
        stacked (``[V C_out, P] @ [P, S]`` per sample; one column at a time, without the
        copy, for short patches ``S`` < ``MemoryPolicy.stack_min_patch``), landing in a
        reused buffer of ``MemoryPolicy.buffer_bytes`` that is squared in place and reduced
        while still in cache: no ``[V, N, C_out, S]`` tensor. (Per-sample weight gradients
        as one convolution grouped over samples avoid ``[[x]]`` and are faster on one thread,
        but oneDNN runs grouped weight gradients single-threaded and about 50x slower with
        2 threads.)
        """
        if call.module.groups == 1:
            V, N, C_out = f.S.shape[:3]
            P, S = math.prod(f.S.shape[3:]), call.module.weight[0].numel()
            fits = S * P * P * f.S.element_size() <= policy_of(call).local_chunk_bytes
            if fits and 2 * gram_cost(V, N, C_out, S, P) <= V * N * C_out * S * P:
                return self._weight_diag_gram(call, f)
            return self._weight_diag_unfolded(call, f)
        return super()._weight_diag(call, f)

    def _weight_diag_gram(self, call: ModuleCall, f: SqrtFactor) -> Tensor:
        """:meth:`_weight_diag` from the per-channel Gram of the columns (``groups == 1``),
        ``H_n[o] = sum_v sign S_v[n, o] S_v[n, o]^T`` ``[P, P]``, then
        ``diag[o, s] = sum_n sum_{p, p'} u_n[s, p] u_n[s, p'] H_n[o, p, p']`` (``u = [[x]]``;
        the band form of ``band.py`` with the whole map as the patch): ``(V + S) P`` instead
        of ``V S`` multiply-adds per sample and channel, in two batched products; in blocks
        of samples within ``MemoryPolicy.local_chunk_bytes`` (the products ``u u`` of one
        sample must fit it)."""
        S = f.S.flatten(3)  # [V, N, C_out, P]
        V, N, C_out, P = S.shape
        u = self.unfold(call)  # [N, K, P]
        K = u.shape[1]
        per_sample = (V * C_out * P + C_out * P * P + K * P * P) * S.element_size()
        nb = max(1, min(N, policy_of(call).local_chunk_bytes // per_sample))
        result = S.new_zeros(K, C_out)
        for n0 in range(0, N, nb):
            block = slice(n0, min(N, n0 + nb))
            Sb = S[:, block].permute(1, 2, 3, 0)  # [b, C_out, P, V]
            sign = None if f.sign is None else f.sign[:, block].T.to(Sb.dtype)
            signed = Sb if sign is None else Sb * sign.reshape(-1, 1, 1, V)
            H = torch.matmul(signed, Sb.mT).flatten(2)  # [b, C_out, P P]
            ub = u[block]
            uu = (ub.unsqueeze(3) * ub.unsqueeze(2)).flatten(2)  # [b, K, P P]
            result += torch.bmm(uu, H.mT).sum(0)  # [K, C_out]
        return result.T.reshape(-1)

    def _weight_diag_unfolded(self, call: ModuleCall, f: SqrtFactor) -> Tensor:
        """:meth:`_weight_diag` from the cached ``[[x]]`` (``groups == 1``)."""
        S, sign = f.S.flatten(3), f.sign  # [V, N, C_out, P]
        V, N, C_out, P = S.shape
        ut = self.unfold(call).mT  # [N, P, S], a view
        K = ut.shape[-1]
        col_bytes = C_out * K * S.element_size()
        memory = policy_of(call)
        buffer_bytes = memory.buffer_bytes
        vb = max(1, min(V, buffer_bytes // col_bytes)) if K >= memory.stack_min_patch else 1
        nb = max(1, min(N, buffer_bytes // (vb * col_bytes)))
        buffer = S.new_empty(nb * vb * C_out * K)
        result = S.new_zeros(C_out * K)
        for v0 in range(0, V, vb):
            v1 = min(V, v0 + vb)
            for n0 in range(0, N, nb):
                n1 = min(N, n0 + nb)
                b, c = n1 - n0, v1 - v0
                left = S[v0:v1, n0:n1].transpose(0, 1).reshape(b, c * C_out, P)  # (n, (v, o))
                out = buffer[: b * c * C_out * K].view(b, c * C_out, K)
                torch.bmm(left, ut[n0:n1], out=out)
                w = None if sign is None else sign[v0:v1, n0:n1].T.reshape(-1)
                result += _square_sum(out.view(b * c, C_out * K), w)
        return result


def gram_cost(V: int, N: int, C_out: int, S: int, P: int) -> int:
    """Multiply-adds of :meth:`UnfoldedDiagonal._weight_diag_gram`: the Gram of ``V`` columns
    and its contraction with ``[[x]]`` (``S x P``) per sample and channel."""
    return N * C_out * (V + S) * P * P


def _row_samples(f: LocalFactor, steps: int, consumer_numel: int, most: int, budget: int) -> int:
    """Samples per block (at most ``most``, at least 1) such that a chunk of ``f`` after
    ``steps`` steps holds a whole anchor row of every source channel: the batched products
    of the band and pooled forms contract or stack the columns' channels, and are slow on
    the few channels per chunk of a large batch."""
    row = f.columns // f.geoms[0].anchors[0]
    numel = max(max(g.column_numel for g in f.geoms[: steps + 1]), consumer_numel)
    return max(1, min(most, budget // max(1, row * numel * f.dtype.itemsize)))


def _square_sum(t: Tensor, weights: Tensor | None) -> Tensor:
    """``sum_r weights[r] t[r]**2`` of ``[R, M]`` (``weights`` all 1 if ``None``); squares ``t``."""
    t = t.square_()
    return t.sum(0) if weights is None else weights.to(t.dtype) @ t
