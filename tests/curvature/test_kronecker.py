"""``KroneckerFactors``: dense form, products and damped solves against dense algebra."""

from __future__ import annotations

import pickle

import pytest
import torch

from hbpkit import KroneckerFactors


def _spd(n: int) -> torch.Tensor:
    M = torch.randn(n, n, dtype=torch.float64)
    return M @ M.T + 0.1 * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(3, 4), (3, 2, 2), (5,)], ids=["weight", "conv", "bias"])
def test_products_and_solve_match_dense(shape):
    torch.manual_seed(0)
    numel = torch.Size(shape).numel()
    factors = [_spd(shape[0])] + ([_spd(numel // shape[0])] if len(shape) > 1 else [])
    kron = KroneckerFactors(factors, torch.Size(shape))
    dense = factors[0] if len(factors) == 1 else torch.kron(*factors)
    torch.testing.assert_close(kron.to_dense(), dense)
    v = torch.randn(2, *shape, dtype=torch.float64)  # a leading batch dimension
    expected = (v.reshape(2, -1) @ dense.T).reshape(v.shape)
    torch.testing.assert_close(kron.mv(v), expected)
    damping = 0.3
    solved = kron.solve(v, damping)
    system = dense + damping * torch.eye(numel, dtype=torch.float64)
    torch.testing.assert_close(
        solved.reshape(2, -1), torch.linalg.solve(system, v.reshape(2, -1).T).T
    )
    assert isinstance(kron, tuple) and len(kron) == len(factors)
    assert pickle.loads(pickle.dumps(kron)).param_shape == kron.param_shape


def test_shape_errors():
    with pytest.raises(ValueError, match="do not match parameter shape"):
        KroneckerFactors([torch.eye(3), torch.eye(2)], torch.Size([3, 3]))
    kron = KroneckerFactors([torch.eye(3), torch.eye(2)], torch.Size([3, 2]))
    with pytest.raises(ValueError, match="expected a tensor of shape"):
        kron.mv(torch.ones(2, 3))
