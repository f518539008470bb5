"""``KroneckerFactors`` algebra for client libraries (scaling, sums, in-place changes, cached
decompositions and damped inverses) against dense ``torch.kron`` algebra."""

from __future__ import annotations

import math

import pytest
import torch

from hbpkit import KroneckerFactors


def _spd(*shape: int) -> torch.Tensor:
    M = torch.randn(*shape, dtype=torch.float64)
    return M @ M.mT + 0.1 * torch.eye(shape[-1], dtype=torch.float64)


LAYOUTS = {
    "weight": (lambda: [_spd(3, 3), _spd(4, 4)], (3, 4), False),
    "bias": (lambda: [_spd(5, 5)], (5,), False),
    "groups": (lambda: [_spd(2, 2, 2), _spd(2, 3, 3)], (4, 3), False),
    "transposed": (lambda: [_spd(1, 2, 2), _spd(1, 6, 6)], (3, 2, 2), True),
}


def _factors(layout: str) -> KroneckerFactors:
    make, shape, transposed = LAYOUTS[layout]
    return KroneckerFactors(make(), torch.Size(shape), transposed)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scaling_matches_dense(layout):
    torch.manual_seed(0)
    F = _factors(layout)
    dense = F.to_dense()
    c = 0.37
    for scaled in (F * c, c * F, F * torch.tensor(c, dtype=torch.float64), F / (1 / c)):
        assert isinstance(scaled, KroneckerFactors) and len(scaled) == len(F)
        torch.testing.assert_close(scaled.to_dense(), c * dense)
    torch.testing.assert_close(F.to_dense(), dense)  # F itself is unchanged
    assert (2 * F).param_shape == F.param_shape and (2 * F).transposed == F.transposed
    with pytest.raises(TypeError):
        F * torch.ones(3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sum_with_a_shared_factor_matches_dense(layout):
    torch.manual_seed(1)
    F = _factors(layout)
    other = [_spd(*f.shape[:-1], f.shape[-1]) for f in F]
    F2 = F.like([other[0], *F[1:]])  # shares A (a bias: its only factor is summed)
    torch.testing.assert_close((F + F2).to_dense(), F.to_dense() + F2.to_dense())
    torch.testing.assert_close(sum([F, F2, F]).to_dense(), 2 * F.to_dense() + F2.to_dense())
    if len(F) == 2:
        F3 = F.like([F[0].clone(), other[1]])  # shares G (equal values, another tensor)
        torch.testing.assert_close((F + F3).to_dense(), F.to_dense() + F3.to_dense())
        with pytest.raises(ValueError, match="share no factor"):
            F + F.like(other)


def test_sum_refuses_other_layouts_and_keeps_tuple_concatenation():
    torch.manual_seed(2)
    F = _factors("weight")
    with pytest.raises(ValueError, match="layouts differ"):
        F + KroneckerFactors([_spd(4, 4), _spd(3, 3)], torch.Size([4, 3]))
    assert F + (1,) == (F[0], F[1], 1)  # a plain tuple is concatenated, as before


@pytest.mark.parametrize("layout", LAYOUTS)
def test_in_place_scaling_and_assignment(layout):
    torch.manual_seed(3)
    F = _factors(layout)
    dense = F.to_dense()
    F[-1] *= 2.0  # laplace's F[1] *= M / N
    torch.testing.assert_close(F.to_dense(), 2 * dense)
    assert F.scale_(0.25) is F
    torch.testing.assert_close(F.to_dense(), 0.5 * dense)
    F[0] = F[0] * 2.0  # another tensor: copied into the factor
    torch.testing.assert_close(F.to_dense(), dense)
    with pytest.raises(ValueError, match="cannot assign"):
        F[0] = torch.ones(7, 7, dtype=torch.float64)
    with pytest.raises(IndexError):
        F[5] = F[0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_eigh_inverse_logdet_solve_match_dense_and_are_cached(layout):
    torch.manual_seed(4)
    F = _factors(layout)
    eye = torch.eye(F.param_shape.numel(), dtype=torch.float64)
    pairs = F.eigh()
    for f, (evals, evecs) in zip(F, pairs):
        torch.testing.assert_close(evecs @ torch.diag_embed(evals) @ evecs.mT, f)
    assert F.eigh() is pairs  # cached
    damping = 0.3
    torch.testing.assert_close(F.logdet(damping), torch.logdet(F.to_dense() + damping * eye))
    inverse = F.inverse(damping)
    d = math.sqrt(damping)
    split = F.inverse((d,) * len(F))
    assert F.inverse(damping) is inverse  # cached per damping
    damped = F.like([f + damping * torch.eye(f.shape[-1], dtype=f.dtype) for f in F])
    torch.testing.assert_close(inverse.to_dense(), torch.linalg.inv(damped.to_dense()))
    damped = F.like([f + d * torch.eye(f.shape[-1], dtype=f.dtype) for f in F])
    torch.testing.assert_close(split.to_dense(), torch.linalg.inv(damped.to_dense()))
    v = torch.randn(2, *F.param_shape, dtype=torch.float64)
    expected = torch.linalg.solve(F.to_dense() + damping * eye, v.reshape(2, -1).T).T
    torch.testing.assert_close(F.solve(v, damping).reshape(2, -1), expected)
    # an in-place change drops the caches: results follow the new factors
    F[0] *= 3.0
    assert F.eigh() is not pairs and F.inverse(damping) is not inverse
    expected = torch.linalg.solve(F.to_dense() + damping * eye, v.reshape(2, -1).T).T
    torch.testing.assert_close(F.solve(v, damping).reshape(2, -1), expected)
    torch.testing.assert_close(F.logdet(damping), torch.logdet(F.to_dense() + damping * eye))
    with pytest.raises(ValueError, match="one damping per factor"):
        F.inverse((1.0, 2.0, 3.0))


def test_eigh_is_computed_once(monkeypatch):
    torch.manual_seed(5)
    F = _factors("weight")
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda M: calls.append(1) or eigh(M))
    v = torch.randn(*F.param_shape, dtype=torch.float64)
    for damping in (0.1, 0.2, 0.3):
        F.solve(v, damping)
        F.inverse(damping)
        F.logdet(damping)
    assert len(calls) == 2  # G and A, once
    F.scale_(2.0)
    F.solve(v, 0.1)
    assert len(calls) == 4
