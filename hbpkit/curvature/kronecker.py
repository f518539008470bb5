"""Kronecker-factored curvature blocks, as attached by ``KFAC``, ``KFLR``, ``KFRA``, ``HBP``.

A :class:`KroneckerFactors` is a tuple ``(G, A)`` for a weight (``torch.kron(G, A)``
approximates the block in ``p.flatten()`` order, the weight matricised as
``[out, rest]``) or ``(G,)`` for a bias. It also knows the parameter's shape, so
an optimizer can multiply and solve without knowing the layer type.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KroneckerFactors(tuple):
    """``(G, A)`` or ``(G,)`` with the parameter's shape; behaves like a tuple.

    Args:
        factors: ``G`` ``[m, m]`` and optionally ``A`` ``[k, k]`` with ``m * k = p.numel()``.
        param_shape: shape of the parameter the block belongs to.
    """

    param_shape: torch.Size

    def __new__(cls, factors: list[Tensor] | tuple[Tensor, ...], param_shape: torch.Size):
        self = super().__new__(cls, factors)
        numel = 1
        for f in self:
            numel *= f.shape[0]
        if numel != torch.Size(param_shape).numel():
            raise ValueError(
                f"factors of sizes {[tuple(f.shape) for f in self]} do not match parameter "
                f"shape {tuple(param_shape)}"
            )
        self.param_shape = torch.Size(param_shape)
        return self

    def __reduce__(self):
        return (KroneckerFactors, (tuple(self), self.param_shape))

    def _matrix(self, v: Tensor) -> Tensor:
        """``v`` as ``[*batch, m, k]`` (the weight matricised)."""
        sizes = [f.shape[0] for f in self]
        batch = v.shape[: v.dim() - len(self.param_shape)]
        if v.shape[len(batch) :] != self.param_shape:
            raise ValueError(
                f"expected a tensor of shape [*, {', '.join(map(str, self.param_shape))}], "
                f"got {tuple(v.shape)}"
            )
        return v.reshape(*batch, sizes[0], -1)

    def to_dense(self) -> Tensor:
        """The block as a ``[p.numel(), p.numel()]`` matrix in ``p.flatten()`` order."""
        out = self[0].contiguous()  # torch.kron fails on some strides (einsum through opt_einsum)
        for f in self[1:]:
            out = torch.kron(out, f.contiguous())
        return out

    def mv(self, v: Tensor) -> Tensor:
        """``(G kron A) vec(v)`` for ``v`` of shape ``[*, *param_shape]``: ``G V A^T``."""
        V = self._matrix(v)
        out = self[0] @ V
        if len(self) == 2:
            out = out @ self[1].T
        return out.reshape(v.shape)

    def solve(self, v: Tensor, damping: float = 0.0) -> Tensor:
        """Solve ``(G kron A + damping I) x = v`` exactly, through eigendecompositions.

        ``v``: ``[*, *param_shape]``. The factors must be symmetric; ``G kron A +
        damping I`` must be invertible.
        """
        V = self._matrix(v)
        eig_g, Q_g = torch.linalg.eigh(self[0])
        if len(self) == 2:
            eig_a, Q_a = torch.linalg.eigh(self[1])
        else:
            eig_a = torch.ones(1, dtype=V.dtype, device=V.device)
            Q_a = torch.ones(1, 1, dtype=V.dtype, device=V.device)
        rotated = Q_g.T @ V @ Q_a
        rotated = rotated / (eig_g[:, None] * eig_a[None, :] + damping)
        return (Q_g @ rotated @ Q_a.T).reshape(v.shape)

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(f.shape)) for f in self)
        return f"KroneckerFactors({shapes}; param_shape={tuple(self.param_shape)})"
