"""The factor types of the rules: ``DiagonalFactor`` against its dense form (float64)."""

from __future__ import annotations

import torch

from hbpkit.curvature.factors import DiagonalFactor

N = 3


def test_diagonal_factor():
    """``DiagonalFactor`` represents ``diag[d_n]`` with signs, densely and through modules."""
    d = torch.randn(N, 2, 2, dtype=torch.float64)
    f = DiagonalFactor.from_values(d)
    torch.testing.assert_close(f.signed_square(), d)
    dense = f.dense()
    S = dense.signed().flatten(2)
    torch.testing.assert_close(
        torch.einsum("vni,vnj->nij", S, dense.S.flatten(2)), torch.diag_embed(d.flatten(1))
    )
