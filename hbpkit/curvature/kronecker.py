"""Kronecker-factored curvature blocks, as attached by ``KFAC``, ``KFLR``, ``KFRA``, ``HBP``.

A :class:`KroneckerFactors` is a tuple ``(G, A)`` for a weight (``torch.kron(G, A)``
approximates the block in ``p.flatten()`` order, the weight matricised as
``[out, rest]``) or ``(G,)`` for a bias. It also knows the parameter's shape, so
an optimizer can multiply and solve without knowing the layer type.

Two layouts generalise this (docs/user-guide.md, Conventions):

* **groups** (a convolution with ``groups = g > 1``): every factor has a leading group
  dimension, ``G`` ``[g, m, m]`` and ``A`` ``[g, k, k]``, and the block is
  block-diagonal over the groups, ``block_diag(kron(G[0], A[0]), ..., kron(G[g-1],
  A[g-1]))`` in ``p.flatten()`` order: the weight's first dimension is split into
  ``g`` contiguous groups, group ``i`` matricised as ``[m, k]``.
* **transposed** (``nn.ConvTranspose*d``, weight ``[C_in, C_out/g, *k]``): group ``i``
  is matricised as ``[C_out/g, C_in/g * prod(k)]``, i.e. its first two dimensions
  swapped (:func:`matricise`), and ``kron(G[i], A[i])`` is the block in the row-major
  order of that matrix; :meth:`KroneckerFactors.to_dense` permutes it back into
  ``p.flatten()`` order.

Algebra for client libraries (docs/user-guide.md, For client libraries): ``c * F`` scales
the block (the first factor: ``c (G kron A) = (c G) kron A``), ``F + F2`` adds two blocks
where the sum is again one Kronecker product (a shared factor), ``F.scale_(c)`` and
``F[i] *= c`` change a factor in place. Eigendecompositions and damped inverses are
computed once and cached; the cache is keyed by each factor's identity and version
counter (``Tensor._version``), so any in-place change of a factor invalidates it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def matricise(v: Tensor, param_shape: torch.Size, groups: int = 1, transposed: bool = False):
    """``[*batch, *param_shape] -> [*batch, groups, m, k]``: the layout of the factors.

    Without ``transposed``: ``v.reshape(*batch, groups, m, k)`` (the first dimension
    split into ``groups`` contiguous blocks). With ``transposed`` (a weight ``[a, b,
    *rest]`` whose group ``i`` is ``v[i a/g : (i+1) a/g]``): each group's ``[a/g, b,
    *rest]`` becomes ``[b, a/g * prod(rest)]``.
    """
    batch = v.shape[: v.dim() - len(param_shape)]
    if not transposed:
        return v.reshape(*batch, groups, param_shape[0] // groups, -1)
    a, b = param_shape[0], param_shape[1]
    t = v.reshape(*batch, groups, a // groups, b, -1).transpose(-3, -2)
    return t.reshape(*batch, groups, b, -1)


def unmatricise(M: Tensor, param_shape: torch.Size, groups: int = 1, transposed: bool = False):
    """The inverse of :func:`matricise`: ``[*batch, groups, m, k] -> [*batch, *param_shape]``."""
    batch = M.shape[:-3]
    if transposed:
        a, b = param_shape[0], param_shape[1]
        M = M.reshape(*batch, groups, b, a // groups, -1).transpose(-3, -2)
    return M.reshape(*batch, *param_shape)


class KroneckerFactors(tuple):
    """``(G, A)`` or ``(G,)`` with the parameter's shape; behaves like a tuple.

    Args:
        factors: ``G`` ``[m, m]`` and optionally ``A`` ``[k, k]`` with ``m * k = p.numel()``;
            or, for ``g`` groups, ``G`` ``[g, m, m]`` and ``A`` ``[g, k, k]`` with
            ``g * m * k = p.numel()`` (block-diagonal over the groups, module docstring).
        param_shape: shape of the parameter the block belongs to.
        transposed: the parameter's first two dimensions are swapped per group before it is
            matricised (transposed convolutions, module docstring); needs ``(G, A)``.
    """

    param_shape: torch.Size
    transposed: bool
    _cache: dict

    def __new__(
        cls,
        factors: list[Tensor] | tuple[Tensor, ...],
        param_shape: torch.Size,
        transposed: bool = False,
    ):
        self = super().__new__(cls, factors)
        dims = {f.dim() for f in self}
        if len(self) == 0 or len(dims) != 1 or dims - {2, 3}:
            raise ValueError(
                "expected square factors, all [n, n] or all [groups, n, n], got shapes "
                f"{[tuple(f.shape) for f in self]}"
            )
        groups = {f.shape[0] for f in self} if dims == {3} else {1}
        square = all(f.shape[-1] == f.shape[-2] for f in self)
        numel = math.prod([groups.pop(), *(f.shape[-1] for f in self)]) if len(groups) == 1 else 0
        if not square or numel != torch.Size(param_shape).numel():
            raise ValueError(
                f"factors of sizes {[tuple(f.shape) for f in self]} do not match parameter "
                f"shape {tuple(param_shape)}"
            )
        if transposed and (len(self) != 2 or len(param_shape) < 2):
            raise ValueError("transposed=True needs factors (G, A) of a parameter with dim >= 2")
        self.param_shape = torch.Size(param_shape)
        self.transposed = bool(transposed)
        self._cache = {}
        return self

    def __reduce__(self):
        return (KroneckerFactors, (tuple(self), self.param_shape, self.transposed))

    @property
    def groups(self) -> int:
        """``g``: the leading group dimension of the factors (1 for ``[n, n]`` factors)."""
        return self[0].shape[0] if self[0].dim() == 3 else 1

    def like(self, factors: list[Tensor] | tuple[Tensor, ...]) -> KroneckerFactors:
        """Other factors of the same parameter and layout (e.g. reduced over processes)."""
        return KroneckerFactors(factors, self.param_shape, self.transposed)

    def _grouped_factors(self) -> list[Tensor]:
        """The factors as ``[g, n, n]``, with ``[[1]]`` for a missing ``A``."""
        fs = [f if f.dim() == 3 else f.unsqueeze(0) for f in self]
        if len(fs) == 1:
            fs.append(fs[0].new_ones(fs[0].shape[0], 1, 1))
        return fs

    def matricise(self, v: Tensor) -> Tensor:
        """``v`` ``[*batch, *param_shape]`` as ``[*batch, g, m, k]`` (the factors' layout)."""
        n = len(self.param_shape)
        if v.dim() < n or v.shape[v.dim() - n :] != self.param_shape:
            raise ValueError(
                f"expected a tensor of shape [*, {', '.join(map(str, self.param_shape))}], "
                f"got {tuple(v.shape)}"
            )
        if self.transposed:
            return matricise(v, self.param_shape, self.groups, True)
        batch = v.shape[: v.dim() - n]
        return v.reshape(*batch, self.groups, self._grouped_factors()[0].shape[-1], -1)

    def unmatricise(self, M: Tensor) -> Tensor:
        """The inverse of :meth:`matricise`: ``[*batch, g, m, k] -> [*batch, *param_shape]``."""
        return unmatricise(M, self.param_shape, self.groups, self.transposed)

    def to_dense(self) -> Tensor:
        """The block as a ``[p.numel(), p.numel()]`` matrix in ``p.flatten()`` order."""
        G, A = self._grouped_factors()
        # torch.kron needs contiguous operands (a transposed view raises)
        out = torch.block_diag(*(torch.kron(g.contiguous(), a.contiguous()) for g, a in zip(G, A)))
        if not self.transposed:
            return out
        numel = self.param_shape.numel()
        index = torch.arange(numel, device=out.device).reshape(self.param_shape)
        perm = self.matricise(index).flatten()  # matricised position j is p.flatten()[perm[j]]
        dense = torch.empty_like(out)
        dense[perm[:, None], perm[None, :]] = out
        return dense

    def mv(self, v: Tensor) -> Tensor:
        """``(G kron A) vec(v)`` for ``v`` of shape ``[*, *param_shape]``: ``G V A^T`` per group."""
        G, A = self._grouped_factors()
        V = self.matricise(v)
        return self.unmatricise(G @ V @ A.mT)

    def solve(self, v: Tensor, damping: float = 0.0) -> Tensor:
        """Solve ``(G kron A + damping I) x = v`` exactly, through eigendecompositions.

        ``v``: ``[*, *param_shape]``. The factors must be symmetric; ``G kron A +
        damping I`` must be invertible. Groups are solved independently. The
        eigendecompositions are cached (:meth:`eigh`): solves with other ``v`` or
        ``damping`` reuse them.
        """
        (eig_g, Q_g), (eig_a, Q_a) = self._grouped_eigh()
        V = self.matricise(v)
        rotated = Q_g.mT @ V @ Q_a
        rotated = rotated / (eig_g[..., :, None] * eig_a[..., None, :] + damping)
        return self.unmatricise(Q_g @ rotated @ Q_a.mT)

    # caches (invalidated by in-place changes of a factor) ---------------------------------
    def _state(self) -> tuple:
        """Identity and version counter of every factor: changes with any in-place write."""
        return tuple((id(f), f._version) for f in self)

    def _cached(self, key: object, compute, keep: int = 8):
        """``compute()``, cached under ``key`` while no factor changes; at most ``keep``
        entries (the oldest is dropped), plus the eigendecompositions."""
        cache = self._cache
        state = self._state()
        hit = cache.get(key)
        if hit is not None and hit[0] == state:
            return hit[1]
        value = compute()
        cache.pop(key, None)
        cache[key] = (state, value)
        others = [k for k in cache if k != "eigh"]
        for stale in others[: max(len(others) - keep, 0)]:
            del cache[stale]
        return value

    def eigh(self) -> tuple[tuple[Tensor, Tensor], ...]:
        """The eigendecomposition ``(eigenvalues, eigenvectors)`` of every factor, cached.

        Per factor ``F`` ``[n, n]`` (or ``[g, n, n]``): eigenvalues ``[n]`` (``[g, n]``),
        ascending, and eigenvectors ``[n, n]`` (``[g, n, n]``) with ``F = Q diag(l) Q^T``.
        The eigenvalues of the block are all products ``l_G[i] * l_A[j]`` (per group). The
        factors must be symmetric. Computed once; an in-place change of a factor
        (``F[1] *= c``, :meth:`scale_`) computes it again. Do not modify the result.
        """
        return self._cached(
            "eigh", lambda: tuple(tuple(torch.linalg.eigh(f)) for f in self), keep=8
        )

    def _grouped_eigh(self) -> list[tuple[Tensor, Tensor]]:
        """:meth:`eigh` as ``[g, n]`` / ``[g, n, n]``, ``([1], [[1]])`` for a missing ``A``."""
        pairs = [(l, Q) if l.dim() == 2 else (l[None], Q[None]) for l, Q in self.eigh()]
        if len(pairs) == 1:
            l = pairs[0][0]
            pairs.append((l.new_ones(l.shape[0], 1), l.new_ones(l.shape[0], 1, 1)))
        return pairs

    def inverse(self, damping: float | tuple[float, ...] = 0.0) -> KroneckerFactors:
        """The factor-wise damped inverse ``(G + d_G I)^{-1} kron (A + d_A I)^{-1}``, cached.

        ``damping``: one number for every factor, or one per factor (``(d_G, d_A)``); the
        usual Kronecker damping of KFAC (Martens & Grosse, 2015) splits ``d`` as
        ``d_G = d_A = sqrt(d)``. Formed from the cached :meth:`eigh`, and itself cached
        per damping (invalidated by in-place changes of a factor). For the exact inverse
        of ``G kron A + d I`` (not a Kronecker product) use :meth:`solve`.
        """
        damps = tuple(float(d) for d in damping) if isinstance(damping, (tuple, list)) else None
        if damps is None:
            damps = (float(damping),) * len(self)
        if len(damps) != len(self):
            raise ValueError(
                f"inverse(damping={damping!r}) needs one damping per factor ({len(self)}) or "
                "one number"
            )

        def compute() -> KroneckerFactors:
            inverses = [(Q / (l + d).unsqueeze(-2)) @ Q.mT for (l, Q), d in zip(self.eigh(), damps)]
            return self.like(inverses)

        return self._cached(("inverse", damps), compute)

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(G kron A + damping I)``, exact, from the cached :meth:`eigh` (a scalar)."""
        (eig_g, _), (eig_a, _) = self._grouped_eigh()
        return torch.log(eig_g[..., :, None] * eig_a[..., None, :] + damping).sum()

    # algebra ------------------------------------------------------------------------------
    def __mul__(self, c: object) -> KroneckerFactors:
        """``c (G kron A) = (c G) kron A`` for a number ``c`` (or a 0-dim tensor)."""
        if not _is_scalar(c):
            return NotImplemented
        return self.like([self[0] * c, *self[1:]])

    __rmul__ = __mul__

    def __truediv__(self, c: object) -> KroneckerFactors:
        """``(G kron A) / c = (G / c) kron A``."""
        if not _is_scalar(c):
            return NotImplemented
        return self.like([self[0] / c, *self[1:]])

    def __add__(self, other: object) -> KroneckerFactors | tuple:
        """The sum of two blocks of the same parameter and layout, where it is exact.

        ``G1 kron A + G2 kron A = (G1 + G2) kron A`` (and likewise for a shared ``G``; a
        bias: ``G1 + G2``). Two blocks that share no factor do not sum to a Kronecker
        product: ``ValueError`` (sum their factors explicitly, ``F.like([G1 + G2, A1 +
        A2])``, if that approximation is meant). A plain tuple is concatenated, as before.
        """
        if not isinstance(other, KroneckerFactors):
            return tuple.__add__(self, other)
        layout = (self.param_shape, self.transposed, self.groups, len(self))
        if layout != (other.param_shape, other.transposed, other.groups, len(other)):
            raise ValueError(f"cannot add {other!r} to {self!r}: the layouts differ")
        if len(self) == 1:
            return self.like([self[0] + other[0]])
        (G1, A1), (G2, A2) = self, other
        if _same(A1, A2):
            return self.like([G1 + G2, A1])
        if _same(G1, G2):
            return self.like([G1, A1 + A2])
        raise ValueError(
            f"{self!r} + {other!r}: the two blocks share no factor, and a sum of Kronecker "
            "products is not one; sum the factors explicitly (F.like([G1 + G2, A1 + A2])) if "
            "that approximation is meant"
        )

    def __radd__(self, other: object) -> KroneckerFactors | tuple:
        if isinstance(other, (int, float)) and not isinstance(other, bool) and other == 0:
            return self  # sum([F1, F2, ...]) starts from 0
        return NotImplemented

    def scale_(self, c: float | Tensor) -> KroneckerFactors:
        """Scale the block in place (its first factor, ``G *= c``); returns ``self``.

        The factor's tensor is changed in place: the cached decompositions are dropped.
        """
        if not _is_scalar(c):
            raise TypeError(f"scale_ expects a number or a 0-dim tensor, got {c!r}")
        with torch.no_grad():
            self[0].mul_(c)
        return self

    def __setitem__(self, index: int, value: Tensor) -> None:
        """``F[i] *= c`` (and ``F[i] = T`` of the same shape) write factor ``i`` in place.

        The augmented assignment changes the tensor in place and stores it back (the same
        object: nothing more to do); another tensor is copied into the factor.
        """
        if not isinstance(index, int) or not -len(self) <= index < len(self):
            raise IndexError(f"factor index {index!r} out of range for {self!r}")
        current = tuple.__getitem__(self, index)
        if value is current:
            return
        if not isinstance(value, Tensor) or value.shape != current.shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"factor {index} of {self!r} has shape {tuple(current.shape)}; cannot assign "
                f"{shape} to it"
            )
        with torch.no_grad():
            current.copy_(value)

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(f.shape)) for f in self)
        extra = ", transposed" if self.transposed else ""
        return f"KroneckerFactors({shapes}; param_shape={tuple(self.param_shape)}{extra})"


def _is_scalar(c: object) -> bool:
    """A Python number (not a bool) or a 0-dim tensor."""
    if isinstance(c, Tensor):
        return c.dim() == 0
    return isinstance(c, (int, float)) and not isinstance(c, bool)


def _same(a: Tensor, b: Tensor) -> bool:
    """The same factor: the same tensor, or equal values."""
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))


__all__ = ["KroneckerFactors", "matricise", "unmatricise"]
