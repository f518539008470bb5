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
        damping I`` must be invertible. Groups are solved independently.
        """
        G, A = self._grouped_factors()
        V = self.matricise(v)
        eig_g, Q_g = torch.linalg.eigh(G)
        eig_a, Q_a = torch.linalg.eigh(A)
        rotated = Q_g.mT @ V @ Q_a
        rotated = rotated / (eig_g[..., :, None] * eig_a[..., None, :] + damping)
        return self.unmatricise(Q_g @ rotated @ Q_a.mT)

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(f.shape)) for f in self)
        extra = ", transposed" if self.transposed else ""
        return f"KroneckerFactors({shapes}; param_shape={tuple(self.param_shape)}{extra})"


__all__ = ["KroneckerFactors", "matricise", "unmatricise"]
