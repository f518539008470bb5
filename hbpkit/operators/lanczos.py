"""Top-k eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

Lanczos (Golub & Van Loan, Matrix Computations, 4th ed., Alg. 10.1.1) builds an
orthonormal basis ``Q_m`` ``[P, m]`` of the Krylov space of a start vector with a
tridiagonal ``T_m = Q_m^T C Q_m`` ``[m, m]``; the Ritz pairs ``(theta_i, Q_m s_i)`` of
``T_m = S diag(theta) S^T`` approximate the extreme eigenpairs of ``C``. Every new
vector is orthogonalised against the whole basis (twice, "twice is enough"), so the
basis stays orthonormal in floating point and no eigenvalue is found twice. A Ritz
pair has the residual ``||C y_i - theta_i y_i|| = beta_m |S[m-1, i]|`` (Alg. 10.1.1
notes), which is the stopping test. Where the Krylov space becomes invariant
(``beta_m = 0``: a low-rank GGN, repeated eigenvalues), the iteration goes on with a
random direction orthogonal to the basis, so the copies of a repeated eigenvalue and the
eigenvalues outside the first Krylov space are found too. Like every single-vector
Krylov method, it can miss a copy of a repeated eigenvalue that the residual test does
not see; ``max_dim=size`` with a tight ``tol`` makes that unlikely.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

WHICH = ("LA", "LM", "SA")


def lanczos_eigh(
    matvec: Callable[[Tensor], Tensor],
    size: int,
    k: int,
    which: str = "LA",
    tol: float | None = None,
    max_dim: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """``k`` eigenpairs of the symmetric ``[size, size]`` operator ``matvec``.

    Args:
        matvec: ``v [size] -> C v [size]``, ``C`` symmetric.
        k: how many eigenpairs, ``1 <= k <= size``.
        which: ``"LA"`` largest algebraic (default), ``"LM"`` largest magnitude,
            ``"SA"`` smallest algebraic (scipy's ``eigsh`` names).
        tol: stop when every wanted Ritz pair has ``||C y - theta y|| <= tol * ||T||``
            (default ``eps ** 0.75`` of ``dtype``).
        max_dim: the largest Krylov dimension (default ``size``: exact at the end).
        seed: of the random start vector (a local generator; the global one is untouched).

    Returns:
        ``(eigenvalues [k], eigenvectors [size, k])``, eigenvalues ordered as ``which``
        asks (``"LA"``: descending), eigenvectors orthonormal.
    """
    if which not in WHICH:
        raise ValueError(f"which={which!r} is not one of {WHICH}")
    if not 1 <= k <= size:
        raise ValueError(f"k={k} eigenpairs of a {size} x {size} operator: need 1 <= k <= {size}")
    m_max = size if max_dim is None else min(int(max_dim), size)
    if m_max < k:
        raise ValueError(f"max_dim={max_dim} is smaller than k={k}")
    tol = torch.finfo(dtype).eps ** 0.75 if tol is None else tol
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def random_vector() -> Tensor:
        return torch.randn(size, generator=generator, dtype=dtype).to(device)

    Q = torch.zeros(size, m_max, dtype=dtype, device=device)
    alphas: list[float] = []
    betas: list[float] = []  # betas[j]: T[j, j+1]
    q = random_vector()
    q = q / q.norm()
    block_start = 0  # where the current Krylov block (after a restart) began
    for j in range(m_max):
        Q[:, j] = q
        w = matvec(q)
        alphas.append(float(q @ w))
        basis = Q[:, : j + 1]
        for _ in range(2):  # full reorthogonalisation (removes alpha q and beta q_prev too)
            w = w - basis @ (basis.T @ w)
        beta = float(w.norm())
        if j + 1 == m_max:
            break
        T = _tridiagonal(alphas, betas, dtype)
        scale = max(float(T.abs().max()), torch.finfo(dtype).tiny)
        invariant = beta <= tol * scale
        if invariant and j == block_start:
            # a random direction orthogonal to the basis is itself an eigenvector: the rest
            # of the space is (almost surely) one eigenspace of eigenvalue alphas[-1]; stop
            # where none of its further copies is wanted
            theta = torch.linalg.eigvalsh(T)
            rest = theta.new_full((size - j - 1,), alphas[-1])
            if bool((_pick(torch.cat([theta, rest]), k, which) < len(theta)).all()):
                break
        elif not invariant and j + 1 >= k:
            theta, S = torch.linalg.eigh(T)
            picked = _pick(theta, k, which)
            if bool((beta * S[-1, picked].abs() <= tol * scale).all()):
                break
        if invariant:  # an invariant subspace: continue with a fresh direction (a new block)
            w = random_vector()
            for _ in range(2):
                w = w - basis @ (basis.T @ w)
            betas.append(0.0)
            block_start = j + 1
            q = w / w.norm()
        else:
            betas.append(beta)
            q = w / beta
    T = _tridiagonal(alphas, betas, dtype)
    theta, S = torch.linalg.eigh(T)
    picked = _pick(theta, k, which)
    vectors = Q[:, : len(alphas)] @ S[:, picked].to(device)
    return theta[picked].to(device), vectors


def _tridiagonal(alphas: list[float], betas: list[float], dtype: torch.dtype) -> Tensor:
    """``T`` ``[m, m]`` with diagonal ``alphas`` and off-diagonals ``betas[: m - 1]``."""
    m = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=dtype))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=dtype)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return T


def _pick(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices of the ``k`` wanted values of ``theta`` (ties: the earlier index first)."""
    key = {"LA": -theta, "SA": theta, "LM": -theta.abs()}[which]
    return key.argsort(stable=True)[:k]
