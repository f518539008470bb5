"""The base of hbpkit's curvature operators over the flattened parameters.

An operator ``C`` ``[P, P]`` (``P`` the number of entries of the parameters it covers,
in the order of ``params``, each flattened row-major like ``p.flatten()``) multiplies
flat vectors ``[P]`` and matrices ``[P, K]`` (``C @ v``), forms its dense matrix for
small models (:meth:`CurvatureOperator.to_dense`), finds its top-k eigenpairs by
Lanczos over the exact products (:meth:`CurvatureOperator.eigh_lowrank`), and becomes a
``scipy.sparse.linalg.LinearOperator`` (:meth:`CurvatureOperator.to_scipy`, float64
numpy in and out, as curvlinops' operators).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hbpkit.operators.lanczos import lanczos_eigh


class CurvatureOperator:
    """A symmetric ``[P, P]`` matrix known by its products (subclasses: :meth:`_matmat`).

    Attributes:
        params: the parameters it covers, in order.
        shape: ``(P, P)``.
        dtype, device: of the products (the parameters').
    """

    params: list[nn.Parameter]

    def __init__(self, params: list[Tensor]) -> None:
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__} needs at least one parameter")
        self.params = params
        self.sizes = [p.numel() for p in params]
        P = sum(self.sizes)
        self.shape = (P, P)
        self.dtype = params[0].dtype
        self.device = params[0].device

    def _matmat(self, V: list[Tensor]) -> list[Tensor]:
        """``C V`` per parameter: ``V[i]`` ``[K, *params[i].shape]`` -> the same shapes."""
        raise NotImplementedError

    # products ---------------------------------------------------------------------------
    def __matmul__(self, v: Tensor) -> Tensor:
        """``C v`` for ``v`` ``[P]`` or ``C V`` for ``V`` ``[P, K]`` (the same shape back)."""
        if not isinstance(v, Tensor):
            return NotImplemented
        P = self.shape[0]
        if v.dim() not in (1, 2) or v.shape[0] != P:
            raise ValueError(
                f"{type(self).__name__} of shape {self.shape} multiplies [P] or [P, K] with "
                f"P = {P}, got shape {tuple(v.shape)}"
            )
        V = v.reshape(P, -1).to(self.dtype)
        if V.shape[1] == 0:
            return v.new_zeros(v.shape)
        blocks = [b.T.reshape(-1, *p.shape) for b, p in zip(V.split(self.sizes), self.params)]
        out = torch.cat([b.reshape(b.shape[0], -1) for b in self._matmat(blocks)], dim=1).T
        return out.reshape(v.shape)

    def matvec(self, v: Tensor) -> Tensor:
        """``C v``, ``v`` ``[P]``."""
        return self @ v

    def matmat(self, V: Tensor) -> Tensor:
        """``C V``, ``V`` ``[P, K]``."""
        return self @ V

    def to_dense(self) -> Tensor:
        """The dense ``[P, P]`` matrix (``P`` products at once: for small models)."""
        eye = torch.eye(self.shape[0], dtype=self.dtype, device=self.device)
        return self @ eye

    def eigh_lowrank(
        self,
        k: int,
        which: str = "LA",
        tol: float | None = None,
        max_dim: int | None = None,
        seed: int = 0,
    ) -> tuple[Tensor, Tensor]:
        """The top-``k`` eigenpairs by Lanczos with full reorthogonalisation.

        Returns ``(eigenvalues [k], eigenvectors [P, k])``, eigenvalues in descending
        order for ``which="LA"`` (largest algebraic; ``"LM"``: largest magnitude,
        ``"SA"``: smallest algebraic). laplace's ``LowRankLaplace`` takes
        ``(eigenvectors, eigenvalues)``. See :func:`hbpkit.operators.lanczos_eigh` for
        ``tol``, ``max_dim`` and ``seed``.
        """
        return lanczos_eigh(
            self.matvec,
            self.shape[0],
            k,
            which=which,
            tol=tol,
            max_dim=max_dim,
            dtype=self.dtype,
            device=self.device,
            seed=seed,
        )

    def to_scipy(self) -> Any:
        """This operator as a ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in/out)."""
        from hbpkit.operators.scipy_interop import to_scipy

        return to_scipy(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"
