"""Sqrt factors whose columns are local: the residual of an activation behind convolutions.

The residual of an elementwise activation (S.9) enters the backward pass as a
:class:`~hbpkit.modules.base.DiagonalFactor` ``diag(s_n)`` over the ``C_j * prod(A)``
features of its input (channel ``c``, spatial anchor ``a``). Column ``j = (c, a)`` is
an impulse; after ``J^T`` through ``k``-local modules (convolutions, pooling,
padding, elementwise maps) it is non-zero only on the receptive field of ``j``,
a patch that starts at ``a * stride + offset`` (per spatial dimension) and has
the same size for every anchor. A :class:`LocalValues` stores exactly these
patches,

    ``values`` ``[C_j, *A, N, C, *patch]``, ``sign`` ``[C_j, *A, N]``,

with the current feature map ``[C, *size]`` and the patch geometry in a
:class:`LocalGeometry`; entries of a patch outside ``[0, size)`` are kept zero.
A dense :class:`~hbpkit.modules.base.SqrtFactor` ``[V, N, C, *size]`` is the special
case ``C_j = V``, one anchor, ``patch = size``.

Even local, all columns of a CNN's residuals are several GB at batch 128 (e.g.
``32 * 16 * 16`` anchors times ``128`` samples times ``16 * 12 * 12`` patch entries
at the first layer of the table S.2b CNN). A :class:`LocalFactor` therefore keeps
a small materialised *source* and the pending ``J^T`` products (:class:`LocalStep`,
holding only what they need of the forward pass) and produces its columns in
chunks of at most ``MemoryPolicy.local_chunk_bytes`` (:meth:`LocalFactor.chunks`): the consumers
(``param_diag``, ``kron_from_sqrt`` of a convolution) sum over chunks. A factor is
materialised again as soon as it fits ``MemoryPolicy.local_store_bytes``. Later consumers
recompute the early steps of their chunks, which are the cheap ones (patches
grow along the chain).

Consumers may stop a chunk before the last steps (``LocalFactor.chunks(steps=k)``: the
weight diagonal of a convolution reads the columns before a max-pooling,
hbpkit/modules/conv/pooled.py) and restrict a factor to a block of samples
(:meth:`LocalFactor.samples`: the band form of hbpkit/modules/conv/band.py bounds its
memory that way). The first step from a diagonal source through a convolution is an outer
product (:meth:`ConvTransposeStep.from_diagonal`).

Rules take part by overriding ``ModuleRules.local_step`` (their ``J^T`` as a
:class:`LocalStep`, or ``None`` where unsupported). A factor that would reach a
module without a local step is made dense first (:meth:`LocalFactor.to_dense`,
budget-checked), so other rules never see a :class:`LocalFactor`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from hbpkit.core.calls import ModuleCall
from hbpkit.curvature.factors import DiagonalFactor, Handler, SqrtFactor
from hbpkit.curvature.memory import (
    DEFAULT_POLICY,
    DIAGONAL_ADVICE,
    MemoryPolicy,
    check_dense_budget,
    policy_of,
)

_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class LocalGeometry(NamedTuple):
    """Where the patches of a local factor lie in the current feature map ``[C, *size]``.

    Per spatial dimension ``d``: the patch of anchor ``a`` covers positions
    ``a * stride[d] + offset[d] + [0, patch[d])``, ``a`` in ``[0, anchors[d])``.
    """

    anchors: tuple[int, ...]
    stride: tuple[int, ...]
    offset: tuple[int, ...]
    patch: tuple[int, ...]
    size: tuple[int, ...]
    channels: int

    @property
    def column_numel(self) -> int:
        """Entries of one column of one sample, ``C * prod(patch)``."""
        return self.channels * math.prod(self.patch)

    @staticmethod
    def dense(channels: int, size: tuple[int, ...]) -> LocalGeometry:
        """One anchor whose patch is the whole feature map."""
        d = len(size)
        return LocalGeometry((1,) * d, (1,) * d, (0,) * d, tuple(size), tuple(size), channels)

    def is_dense(self) -> bool:
        """Whether this is :meth:`dense` (the patch is the feature map)."""
        return self == LocalGeometry.dense(self.channels, self.size)

    def tidy(self) -> tuple[LocalGeometry, tuple[slice, ...]]:
        """Crop dimensions with one anchor to the feature map; the crop of the patch axes."""
        offset, patch, crop = list(self.offset), list(self.patch), []
        for i, (A, o, p, n) in enumerate(zip(self.anchors, self.offset, self.patch, self.size)):
            lo, hi = max(o, 0), min(o + p, n)
            if A == 1 and hi > lo and (lo, hi) != (o, o + p):
                offset[i], patch[i] = lo, hi - lo
                crop.append(slice(lo - o, hi - o))
            else:
                crop.append(slice(None))
        geom = self._replace(offset=tuple(offset), patch=tuple(patch))
        return geom, tuple(crop)

    def inside(self) -> bool:
        """Whether every patch entry lies inside the feature map (from the integer geometry)."""
        return all(
            o >= 0 and (A - 1) * s + o + p <= n
            for A, s, o, p, n in zip(self.anchors, self.stride, self.offset, self.patch, self.size)
        )

    def valid(self, device: torch.device) -> Tensor | None:
        """``[*A, *patch]`` mask of the patch entries inside the feature map (``None``: all)."""
        if self.inside():
            return None
        d, mask = len(self.size), None
        for i, (A, s, o, p, n) in enumerate(
            zip(self.anchors, self.stride, self.offset, self.patch, self.size)
        ):
            pos = torch.arange(A, device=device)[:, None] * s + o + torch.arange(p, device=device)
            m = (pos >= 0) & (pos < n)  # [A_i, p_i] at axes i and d + i of [*A, *patch]
            shape = [1] * (2 * d)
            shape[i], shape[d + i] = m.shape
            mask = m.reshape(shape) if mask is None else mask & m.reshape(shape)
        return mask


def windows(t: Tensor, geom: LocalGeometry, fill: float = 0) -> Tensor:
    """The patches of ``t`` ``[B, C, *size]`` at every anchor, ``[B, C, *A, *patch]``.

    Positions outside ``[0, size)`` read ``fill``. A strided view where no padding is needed.
    """
    pad, starts = [], []
    for A, s, o, p, n in zip(geom.anchors, geom.stride, geom.offset, geom.patch, geom.size):
        end = (A - 1) * s + o + p
        lo, hi = max(0, -o), max(0, end - n)
        pad.append((lo, hi))
        starts.append(o + lo)
    if any(lo or hi for lo, hi in pad):
        t = F.pad(t, [x for side in reversed(pad) for x in side], value=fill)
    for i, (A, s, p, start) in enumerate(zip(geom.anchors, geom.stride, geom.patch, starts)):
        t = t.narrow(2 + i, start, (A - 1) * s + p).unfold(2 + i, p, s)
    return t  # unfold appends the patch axes after the anchor axes: [B, C, *A, *patch]


@dataclass
class LocalValues:
    """Materialised local columns.

    ``values`` ``[C_j, *A, N, C, *patch]``, ``sign`` ``[C_j, *A, N]`` (or ``None``: all +1).
    """

    values: Tensor
    sign: Tensor | None
    geom: LocalGeometry
    #: whether the entries outside the feature map are known to be zero (see :meth:`mask`)
    masked: bool = True

    @property
    def batch(self) -> int:
        return self.values.shape[1 + len(self.geom.anchors)]

    def flat(self) -> Tensor:
        """``[C_j * prod(A) * N, C, *patch]``: every (column, sample) as a small image."""
        d = len(self.geom.size)
        return self.values.reshape(-1, *self.values.shape[-d - 1 :])

    def from_flat(self, flat: Tensor, geom: LocalGeometry, masked: bool) -> LocalValues:
        """New values ``[C_j * prod(A) * N, C', *patch']`` with the same columns."""
        lead = self.values.shape[: 2 + len(self.geom.anchors)]
        return LocalValues(flat.reshape(*lead, *flat.shape[1:]), self.sign, geom, masked)

    def tidy(self) -> LocalValues:
        """Crop one-anchor dimensions to the feature map (a view)."""
        geom, crop = self.geom.tidy()
        return LocalValues(self.values[(..., *crop)], self.sign, geom, self.masked)

    def mask(self) -> LocalValues:
        """The same columns with the entries outside the feature map set to zero.

        Steps and consumers that read those entries call it; most steps make them
        zero anyway (a scale by zero-padded derivatives, a selection), so it is lazy.
        """
        if self.masked:
            return self
        valid = self.geom.valid(self.values.device)
        if valid is None:
            return LocalValues(self.values, self.sign, self.geom)
        A = len(self.geom.anchors)
        valid = valid.reshape(*valid.shape[:A], 1, 1, *valid.shape[A:])
        return LocalValues(self.values * valid.to(self.values.dtype), self.sign, self.geom)

    def columns(self) -> SqrtFactor:
        """The columns on their patches, ``[C_j * prod(A), N, C, *patch]``, zero outside the map."""
        masked, A = self.mask(), len(self.geom.anchors)
        sign = None if self.sign is None else self.sign.flatten(0, A)
        return SqrtFactor(masked.values.flatten(0, A), sign)

    def to_sqrt(self) -> SqrtFactor:
        """The dense :class:`SqrtFactor` ``[C_j * prod(A), N, C, *size]`` of these columns."""
        geom, d, A = self.geom, len(self.geom.size), len(self.geom.anchors)
        sign = None if self.sign is None else self.sign.flatten(0, A)
        if geom.is_dense():
            return SqrtFactor(self.values.flatten(0, A), sign)
        lo = [max(0, -o) for o in geom.offset]
        ends = [
            (a - 1) * s + o + p
            for a, s, o, p in zip(geom.anchors, geom.stride, geom.offset, geom.patch)
        ]
        hi = [max(0, e - n) for e, n in zip(ends, geom.size)]
        lead = self.values.shape[: A + 1 + 2]  # C_j, *A, N, C
        padded = [n + a + b for n, a, b in zip(geom.size, lo, hi)]
        full = self.values.new_zeros(*lead, *padded)
        st = full.stride()
        strides = [st[0]]
        strides += [st[1 + i] + s * st[A + 3 + i] for i, s in enumerate(geom.stride)]
        strides += [st[A + 1], st[A + 2]] + [st[A + 3 + i] for i in range(d)]
        start = sum((o + l) * st[A + 3 + i] for i, (o, l) in enumerate(zip(geom.offset, lo)))
        full.as_strided(self.values.shape, strides, start).copy_(self.values)
        crop = tuple(slice(l, l + n) for l, n in zip(lo, geom.size))
        full = full[(..., *crop)]
        return SqrtFactor(full.flatten(0, A), sign)


class LocalStep:
    """One module's ``J^T`` on local columns (built by the module's rules, see their files)."""

    def geometry(self, geom: LocalGeometry) -> LocalGeometry:
        """The geometry after ``J^T`` (before :meth:`LocalGeometry.tidy`)."""
        raise NotImplementedError

    def __call__(self, chunk: LocalValues) -> LocalValues:
        raise NotImplementedError

    def samples(self, index: slice) -> LocalStep | None:
        """This step on the samples ``index`` only (``None``: not supported); steps that read
        no per-sample tensor are the same for every sample."""
        return None


class _GeometryCache:
    """The last value computed for one geometry: the chunks of one anchor row share their
    geometry (they differ in channels only), and so do the passes of later consumers over
    the same chunks. Holds one tensor of ``N C prod(A) prod(patch)`` entries (the windows
    of the forward-pass tensor a step reads, not the chunk's columns)."""

    def __init__(self) -> None:
        self.key: LocalGeometry | None = None
        self.value: Tensor | None = None

    def get(self, geom: LocalGeometry, compute) -> Tensor:
        if self.key != geom:
            self.key, self.value = None, None  # free the old value before computing the new
            self.value, self.key = compute(geom), geom
        return self.value


class ScaleStep(LocalStep):
    """``J^T = diag(d_n)`` (elementwise modules, S.9): multiply by ``d`` ``[N, C, *size]``."""

    def __init__(self, d: Tensor) -> None:
        self.d = d
        self._windows = _GeometryCache()

    def geometry(self, geom: LocalGeometry) -> LocalGeometry:
        return geom

    def _scale(self, geom: LocalGeometry) -> Tensor:
        """``d`` on the patches, ``[*A, N, C, *patch]`` (contiguous: a fast broadcast over C_j)."""
        w = windows(self.d, geom)  # [N, C, *A, *patch]
        A = len(geom.anchors)
        return w.permute([*range(2, 2 + A), 0, 1, *range(2 + A, w.dim())]).contiguous()

    def samples(self, index: slice) -> ScaleStep:
        return ScaleStep(self.d[index])

    def __call__(self, chunk: LocalValues) -> LocalValues:
        w = self._windows.get(chunk.geom, self._scale)
        return LocalValues(chunk.values * w, chunk.sign, chunk.geom, True)


class ShiftStep(LocalStep):
    """``J^T`` of a zero / constant padding: a crop, i.e. the patches move by ``-left``."""

    def __init__(self, left: tuple[int, ...], size: tuple[int, ...]) -> None:
        self.left, self.size = left, size

    def geometry(self, geom: LocalGeometry) -> LocalGeometry:
        offset = tuple(o - l for o, l in zip(geom.offset, self.left))
        return geom._replace(offset=offset, size=self.size)

    def samples(self, index: slice) -> ShiftStep:
        return self

    def __call__(self, chunk: LocalValues) -> LocalValues:
        return LocalValues(chunk.values, chunk.sign, self.geometry(chunk.geom), False)


class ConvTransposeStep(LocalStep):
    """``J^T`` of a convolution ``[N, C_in, *size] -> [N, C_out, *out]`` (D.4) on patches.

    Each patch is a small output image; its transposed convolution (no padding)
    covers ``(patch - 1) * s + dil * (k - 1) + 1`` input positions starting at
    ``start * s - left`` (``left`` the zero padding in front).
    """

    def __init__(self, weight: Tensor, stride, dilation, groups: int, left, size) -> None:
        self.weight, self.stride, self.dilation = weight, tuple(stride), tuple(dilation)
        self.groups, self.left, self.size = groups, tuple(left), tuple(size)
        self._impulses: Tensor | None = None

    def geometry(self, geom: LocalGeometry) -> LocalGeometry:
        k = self.weight.shape[2:]
        return LocalGeometry(
            geom.anchors,
            tuple(t * s for t, s in zip(geom.stride, self.stride)),
            tuple(o * s - l for o, s, l in zip(geom.offset, self.stride, self.left)),
            tuple(
                (p - 1) * s + dil * (ki - 1) + 1
                for p, s, dil, ki in zip(geom.patch, self.stride, self.dilation, k)
            ),
            self.size,
            self.weight.shape[1] * self.groups,
        )

    def samples(self, index: slice) -> ConvTransposeStep:
        return self

    def impulses(self) -> Tensor:
        """``[C_out, C_in, *patch]``: ``J^T`` of a unit entry of each output channel (one
        position): the channel's kernel, dilated, in its group's input channels (D.4)."""
        if self._impulses is None:
            C_out, d = self.weight.shape[0], len(self.size)
            eye = torch.eye(C_out, dtype=self.weight.dtype, device=self.weight.device)
            eye = eye.reshape(C_out, C_out, *([1] * d))
            conv_t = _CONV_TRANSPOSE[d]
            self._impulses = conv_t(eye, self.weight, None, 1, 0, 0, self.groups, self.dilation)
        return self._impulses

    def from_diagonal(self, s: Tensor, channels: slice) -> Tensor:
        """This step on columns ``(c, a)`` of ``diag(s_n)`` (``c`` in ``channels``, ``a`` every
        anchor): ``s_n[c, a]`` times the impulse of channel ``c``, placed at
        ``a``; an outer product instead of a transposed convolution of one-hot patches
        (which spends ``C_out`` times the products). ``s`` ``[N, C_j, *A]`` (``C_j`` the
        output channels ``channels``) ->
        ``[C_j, *A, N, C_in, *patch]`` (the values after :meth:`geometry`)."""
        d = len(self.size)
        s = s.movedim(0, 1 + d)  # [C_j, *A, N]
        imp = self.impulses()[channels]  # [C_j, C_in, *patch]
        imp = imp.reshape(imp.shape[0], *([1] * (d + 1)), *imp.shape[1:])
        return s.reshape(*s.shape, *([1] * (d + 1))) * imp

    def __call__(self, chunk: LocalValues) -> LocalValues:
        conv_t = _CONV_TRANSPOSE[len(self.size)]
        chunk = chunk.mask()  # entries outside the output map must not spread
        out = conv_t(chunk.flat(), self.weight, None, self.stride, 0, 0, self.groups, self.dilation)
        return chunk.from_flat(out, self.geometry(chunk.geom), False)


class SelectStep(LocalStep):
    """``J^T`` of a max-pooling ``z_n = Pi_n x_n`` (D.2): scatter each entry to its argmax.

    ``index`` ``[N, C, *out]`` holds the flat input position (in ``prod(size)``) that
    every output entry copies.
    """

    def __init__(self, index: Tensor, kernel, stride, padding, dilation, size) -> None:
        self.index, self.kernel, self.stride = index, tuple(kernel), tuple(stride)
        self.padding, self.dilation, self.size = tuple(padding), tuple(dilation), tuple(size)
        self._targets = _GeometryCache()

    def geometry(self, geom: LocalGeometry) -> LocalGeometry:
        return geom._replace(
            stride=tuple(t * s for t, s in zip(geom.stride, self.stride)),
            offset=tuple(o * s - p for o, s, p in zip(geom.offset, self.stride, self.padding)),
            patch=tuple(
                (p - 1) * s + dil * (k - 1) + 1
                for p, s, dil, k in zip(geom.patch, self.stride, self.dilation, self.kernel)
            ),
            size=self.size,
        )

    def samples(self, index: slice) -> SelectStep:
        return SelectStep(
            self.index[index], self.kernel, self.stride, self.padding, self.dilation, self.size
        )

    def __call__(self, chunk: LocalValues) -> LocalValues:
        geom, new = chunk.geom, self.geometry(chunk.geom)
        P_new = math.prod(new.patch)
        local = self._targets.get(geom, self._local_targets)  # [A, N, C, P_old]
        Aprod, Cj = math.prod(geom.anchors), chunk.values.shape[0]
        vals = chunk.values.reshape(Cj, Aprod, *local.shape[1:])  # [C_j, A, N, C, P_old]
        out = vals.new_zeros(*vals.shape[:-1], P_new + 1)
        out.scatter_add_(-1, local.unsqueeze(0).expand_as(vals), vals)
        values = out[..., :P_new].reshape(Cj, *geom.anchors, *vals.shape[2:4], *new.patch)
        return LocalValues(values, chunk.sign, new, True)

    def _local_targets(self, geom: LocalGeometry) -> Tensor:
        """``[A, N, C, P_old]``: where each patch entry lands in the new patch (flat), or
        ``P_new`` (a dropped slot) for entries outside the output map."""
        new = self.geometry(geom)
        P_new = math.prod(new.patch)
        # flat input positions; -1 outside the output map (those entries go to a dropped slot)
        idx = windows(self.index, geom, fill=-1)  # [N, C, *A, *patch]
        local = torch.zeros_like(idx)
        rest = math.prod(self.size)
        for i in range(len(self.size)):  # the input coordinate relative to the new patch start
            rest //= self.size[i]
            coord = (idx // rest) % self.size[i]
            anchor = (
                torch.arange(geom.anchors[i], device=idx.device) * new.stride[i] + new.offset[i]
            )
            shape = [1] * idx.dim()
            shape[2 + i] = geom.anchors[i]
            local = local * new.patch[i] + (coord - anchor.reshape(shape))
        local = local.masked_fill_(idx < 0, P_new)
        Aprod, P_old = math.prod(geom.anchors), math.prod(geom.patch)
        return local.reshape(*local.shape[:2], Aprod, P_old).permute(2, 0, 1, 3).contiguous()


def _column_chunks(total: int, per_column: int, max_bytes: int, itemsize: int) -> int:
    return max(1, min(total, max_bytes // max(1, per_column * itemsize)))


@dataclass
class LocalFactor:
    """Local columns as a materialised source and pending ``J^T`` steps, produced in chunks.

    ``source``: a :class:`DiagonalFactor` (columns ``(c, a)`` of a residual, ``[N, C, *size]``),
    a :class:`SqrtFactor` ``[V, N, C, *size]`` or :class:`LocalValues`; ``steps`` are applied
    in order to every chunk of columns. ``geoms[i]`` is the geometry after ``i`` steps.
    ``memory``: the policy of the backward pass (chunk and store sizes).
    """

    source: DiagonalFactor | SqrtFactor | LocalValues
    steps: list[LocalStep] = field(default_factory=list)
    geoms: list[LocalGeometry] = field(default_factory=list)
    memory: MemoryPolicy = DEFAULT_POLICY

    def __post_init__(self) -> None:
        if not self.geoms:
            self.geoms = [_source_geometry(self.source)]

    @property
    def geom(self) -> LocalGeometry:
        return self.geoms[-1]

    @property
    def batch(self) -> int:
        """``N``."""
        src = self.source
        if isinstance(src, LocalValues):
            return src.batch
        return src.s.shape[0] if isinstance(src, DiagonalFactor) else src.S.shape[1]

    @property
    def columns(self) -> int:
        """``J``, the number of columns (``C_j * prod(A)``, or ``V`` of a dense source)."""
        src = self.source
        if isinstance(src, DiagonalFactor):
            return src.s[0].numel()
        if isinstance(src, SqrtFactor):
            return src.S.shape[0]
        return src.values.shape[0] * math.prod(src.geom.anchors)

    @property
    def dtype(self) -> torch.dtype:
        src = self.source
        if isinstance(src, LocalValues):
            return src.values.dtype
        return src.s.dtype if isinstance(src, DiagonalFactor) else src.S.dtype

    def pending_macs(self) -> int:
        """Multiply-adds of one pass of the pending steps over all columns (an estimate): a
        transposed convolution spreads each entry over ``C_in / G prod(kernel)`` positions
        (none for the outer product from a diagonal source), other steps touch each entry."""
        total = 0
        fused = isinstance(self.source, DiagonalFactor)
        for k, step in enumerate(self.steps):
            if isinstance(step, ConvTransposeStep) and not (fused and k == 0):
                total += self.geoms[k].column_numel * step.weight[0].numel()
            else:
                total += self.geoms[k + 1].column_numel
        return total * self.columns * self.batch

    def max_column_numel(self) -> int:
        """The largest ``C * prod(patch)`` along the steps (sizes the chunks)."""
        return max(g.column_numel for g in self.geoms)

    def then(self, step: LocalStep) -> LocalFactor:
        """This factor followed by ``step``; materialised if it fits ``local_store_bytes``."""
        geom, _ = step.geometry(self.geom).tidy()
        memory = self.memory
        out = LocalFactor(self.source, [*self.steps, step], [*self.geoms, geom], memory)
        nbytes = out.columns * out.batch * out.max_column_numel() * out.dtype.itemsize
        if nbytes <= memory.local_store_bytes:
            (values,) = out.chunks(max_bytes=None)
            return LocalFactor(values, memory=memory)
        return out

    def samples(self, index: slice) -> LocalFactor | None:
        """The same columns of the samples ``index`` only (``None`` where a step cannot say)."""
        steps = [step.samples(index) for step in self.steps]
        if any(step is None for step in steps):
            return None
        src = self.source
        if isinstance(src, DiagonalFactor):
            source = DiagonalFactor(src.s[index], None if src.sign is None else src.sign[index])
        elif isinstance(src, SqrtFactor):
            sign = None if src.sign is None else src.sign[:, index]
            source = SqrtFactor(src.S[:, index], sign)
        else:
            A = len(src.geom.anchors)
            values = src.values[(slice(None),) * (1 + A) + (index,)]
            sign = None if src.sign is None else src.sign[..., index]
            source = LocalValues(values, sign, src.geom, src.masked)
        return LocalFactor(source, steps, list(self.geoms), self.memory)

    def chunks(
        self, max_bytes: int | None = -1, consumer_numel: int = 0, steps: int | None = None
    ) -> Iterator[LocalValues]:
        """The columns after all steps, in chunks whose intermediates stay below ``max_bytes``.

        ``-1`` (default): ``MemoryPolicy.local_chunk_bytes``; ``None``: one chunk.
        ``consumer_numel``: entries per column and sample of the consumer's own intermediates.
        ``steps``: apply only the first ``steps`` pending steps (default: all); the chunks
        then lie on ``geoms[steps]``.
        """
        pending = self.steps if steps is None else self.steps[:steps]
        if max_bytes == -1:
            max_bytes = self.memory.local_chunk_bytes
        numel = max(g.column_numel for g in self.geoms[: len(pending) + 1])
        per_column = self.batch * max(numel, consumer_numel)
        if max_bytes is None:
            cols = self.columns
        else:
            cols = _column_chunks(self.columns, per_column, max_bytes, self.dtype.itemsize)
        # the first step from a diagonal source through a convolution: an outer product
        first = pending[0] if pending else None
        fused = isinstance(self.source, DiagonalFactor) and isinstance(first, ConvTransposeStep)
        for chunk in _split(self.source, cols, first if fused else None):
            for step in pending[1:] if fused else pending:
                chunk = step(chunk).tidy()
            yield chunk

    def match(
        self, dense: Handler, diagonal: Handler | None = None, local: Handler | None = None
    ) -> Any:
        """``local(self)``: only rules that take local factors (a ``local`` handler) see one."""
        if local is None:
            raise TypeError("a local factor reached rules without a local path (a planning error)")
        return local(self)

    def to_dense(self, call: ModuleCall) -> SqrtFactor:
        """All columns as one dense :class:`SqrtFactor` ``[J, N, C, *size]`` (budget-checked).

        ``call`` is the module whose input the columns live on (for the error message).
        """
        shape = (self.columns, self.batch, self.geom.channels, *self.geom.size)
        check_dense_budget(
            call, shape, self.dtype, "Densifying local curvature factors", DIAGONAL_ADVICE
        )
        parts = [c.to_sqrt() for c in self.chunks()]
        S = torch.cat([p.S for p in parts])
        signs = [p.sign for p in parts]
        if all(s is None for s in signs):
            return SqrtFactor(S)
        signs = [
            torch.ones(p.S.shape[:2], dtype=S.dtype, device=S.device) if s is None else s
            for p, s in zip(parts, signs)
        ]
        return SqrtFactor(S, torch.cat(signs))


def _source_geometry(src) -> LocalGeometry:
    if isinstance(src, LocalValues):
        return src.geom
    t = src.s if isinstance(src, DiagonalFactor) else src.S[0]
    C, size = t.shape[1], tuple(t.shape[2:])
    if isinstance(src, SqrtFactor):
        return LocalGeometry.dense(C, size)
    d = len(size)
    return LocalGeometry(size, (1,) * d, (0,) * d, (1,) * d, size, C)


def _split(src, cols: int, conv: ConvTransposeStep | None = None) -> Iterator[LocalValues]:
    """Chunks of about ``cols`` columns (anchor rows outermost, then channels; at least
    one channel of one row of anchors); for a diagonal source with ``conv`` given, the
    chunks after ``conv`` (:meth:`ConvTransposeStep.from_diagonal`)."""
    if isinstance(src, SqrtFactor):
        S, V = src.S, src.S.shape[0]
        geom = _source_geometry(src)
        d = len(geom.size)
        for v in range(0, V, cols):
            part = S[v : v + cols]
            values = part.reshape(part.shape[0], *([1] * d), *part.shape[1:])
            sign = None if src.sign is None else src.sign[v : v + cols]
            sign = None if sign is None else sign.reshape(sign.shape[0], *([1] * d), -1)
            yield LocalValues(values, sign, geom)
        return
    geom = _source_geometry(src)
    if isinstance(src, DiagonalFactor):
        Cj = geom.channels
    else:
        Cj = src.values.shape[0]
    # as many channels as possible per chunk: the consumers' products are batched over
    # anchors and samples, with the channels in the matrix dimension
    A = geom.anchors
    per_row = math.prod(A[1:])
    channels = min(Cj, max(1, cols // per_row))
    rows = min(A[0], max(1, cols // (channels * per_row)))
    for r in range(0, A[0], rows):
        nr = min(rows, A[0] - r)
        g = geom._replace(
            anchors=(nr, *A[1:]), offset=(geom.offset[0] + r * geom.stride[0], *geom.offset[1:])
        )
        for c in range(0, Cj, channels):
            nc = min(channels, Cj - c)
            if isinstance(src, DiagonalFactor) and conv is not None:
                s = src.s[:, c : c + nc, r : r + nr]
                values = conv.from_diagonal(s, slice(c, c + nc))
                sign = _diagonal_sign(src, c, nc, r, nr)
                yield LocalValues(values, sign, conv.geometry(g), False).tidy()
            elif isinstance(src, DiagonalFactor):
                yield _diagonal_chunk(src, c, nc, r, nr, g)
            else:
                values = src.values[c : c + nc, r : r + nr]
                sign = None if src.sign is None else src.sign[c : c + nc, r : r + nr]
                yield LocalValues(values, sign, g, src.masked)


def _diagonal_chunk(src: DiagonalFactor, c: int, nc: int, r: int, nr: int, geom) -> LocalValues:
    """Columns ``(c .. c+nc, rows r .. r+nr)`` of ``diag(s_n)``: one-hot patches of size 1."""
    s = src.s[:, c : c + nc, r : r + nr]  # [N, nc, *A_chunk]
    N, C, d = s.shape[0], src.s.shape[1], len(geom.size)
    Aprod = math.prod(geom.anchors)
    values = s.new_zeros(nc, Aprod, N, C)
    values[..., c : c + nc].diagonal(dim1=0, dim2=3).copy_(
        rearrange(s.reshape(N, nc, Aprod), "n k a -> a n k")
    )
    values = values.reshape(nc, *geom.anchors, N, C, *([1] * d))
    return LocalValues(values, _diagonal_sign(src, c, nc, r, nr), geom)


def _diagonal_sign(src: DiagonalFactor, c: int, nc: int, r: int, nr: int) -> Tensor | None:
    """The signs ``[nc, *A_chunk, N]`` of columns ``(c .. c+nc, rows r .. r+nr)``."""
    if src.sign is None:
        return None
    return rearrange(src.sign[:, c : c + nc, r : r + nr], "n k ... -> k ... n")


def accepts_local(rules: object, call: ModuleCall) -> bool:
    """Whether ``rules`` backpropagate :class:`LocalFactor` columns through ``call``."""
    supports = getattr(rules, "supports_local", None)
    if not policy_of(call).local_factors:
        return False
    return supports is not None and bool(supports(call))


def parent_accepts_local(call: ModuleCall) -> bool:
    """Whether the module that produced ``call``'s input takes local factors."""
    parent = call.parent
    if parent is None:
        return False
    return parent.plan.takes_local if parent.plan else accepts_local(parent.rules, parent)


def _takes_local(rules: object, call: ModuleCall) -> bool:
    """The pass's decision (``call.plan``), or ``rules``' capability outside a pass."""
    return call.plan.takes_local if call.plan else accepts_local(rules, call)


def jac_t_local(rules, call: ModuleCall, factor) -> LocalFactor | SqrtFactor | None:
    """``J^T factor`` through ``rules``' :class:`LocalStep`, or ``None`` for the dense path.

    A :class:`LocalFactor` always stays on this path (made dense where the next
    module needs that); a :class:`DiagonalFactor` that would be densified, or a
    :class:`SqrtFactor` whose result exceeds ``MemoryPolicy.local_store_bytes``, enters it
    when this module and the one before it take local factors.
    """
    local = _takes_local(rules, call)
    if isinstance(factor, LocalFactor):
        if not local:
            return rules.jac_t_factor(call, factor.to_dense(call))
        return finish(factor.then(rules.local_step(call)), call)
    if not local or not parent_accepts_local(call):
        return None
    if isinstance(factor, DiagonalFactor):
        if rules.keeps_diagonal:
            return None
    else:
        in_numel = call.inputs[0][0].numel()
        if (
            factor.S.shape[0] * factor.S.shape[1] * in_numel * factor.S.element_size()
            <= policy_of(call).local_store_bytes
        ):
            return None
    local_factor = LocalFactor(factor, memory=policy_of(call))
    return finish(local_factor.then(rules.local_step(call)), call)


def finish(factor: LocalFactor, call: ModuleCall) -> LocalFactor | SqrtFactor:
    """What a rule returns: the local factor, or a dense one where that is all it is or
    the module before ``call`` needs it."""
    src = factor.source
    if not factor.steps and isinstance(src, LocalValues) and src.geom.is_dense():
        return src.to_sqrt()
    if parent_accepts_local(call):
        return factor
    return factor.to_dense(call)
