"""Brute-force references of the rule contract, through ``torch.autograd`` only (float64).

All act on a :class:`rule_cases.Recorded`: its second forward pass (``x_ref -> out_ref``)
is the graph the derivatives are taken through.
"""

from __future__ import annotations

import torch
from rule_cases import N, Recorded

from hbpkit.curvature.factors import DiagonalFactor, SqrtFactor

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}


def close(actual, expected, what: str = "") -> None:
    """``assert_close`` at :data:`TOL` (dtype and shape included)."""
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def _jacobian_rows(out: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
    """``d out / d wrt`` as ``[out.numel(), wrt.numel()]``, through the graph (zero if unused)."""
    eye = torch.eye(out.numel(), dtype=out.dtype).reshape(-1, *out.shape)
    if not out.requires_grad:
        return torch.zeros(out.numel(), wrt.numel(), dtype=out.dtype)
    try:
        (jac,) = torch.autograd.grad(
            out, wrt, eye, retain_graph=True, is_grads_batched=True, allow_unused=True
        )
    except RuntimeError as error:
        if "not implemented" in str(error):
            raise
        grads = [
            torch.autograd.grad(out, wrt, e, retain_graph=True, allow_unused=True)[0] for e in eye
        ]
        jac = None if grads[0] is None else torch.stack(grads)
    if jac is None:
        return torch.zeros(out.numel(), wrt.numel(), dtype=out.dtype)
    return jac.reshape(out.numel(), -1)


def _per_sample_blocks(full: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """``[N, d_out, d_in]`` diagonal blocks of ``[N d_out, N d_in]``; the rest must be zero."""
    full = full.reshape(N, d_out, N, d_in)
    blocks = torch.stack([full[n, :, n] for n in range(N)])
    off = full.clone()
    for n in range(N):
        off[n, :, n] = 0
    assert off.abs().max() == 0, "the module couples the samples"
    return blocks


def input_jacobians(r: Recorded) -> torch.Tensor:
    """``[N, D_out, D_in]``: ``J_n = dz_n / dx_n``."""
    full = _jacobian_rows(r.out_ref, r.x_ref)
    return _per_sample_blocks(full, r.out_ref[0].numel(), r.x_ref[0].numel())


def param_jacobian(r: Recorded, param: torch.nn.Parameter) -> torch.Tensor:
    """``[N, D_out, P]``: ``J_{p,n} = dz_n / dp``."""
    return _jacobian_rows(r.out_ref, param).reshape(N, r.out_ref[0].numel(), -1)


def _finite_difference_hessians(r: Recorded, dz: torch.Tensor) -> torch.Tensor:
    """Central differences of autograd gradients of ``dz_n . f(x_n)`` (a fresh forward per
    sample), where PyTorch has no double backward (``Hardsigmoid``): exact for piecewise
    linear functions away from kinks."""
    module, h, result = r.module, 1e-6, []
    for n in range(N):
        xn = r.x[n]

        def scalar(z, g=dz[n]):
            return (type(module).forward(module, z.unsqueeze(0)) * g).sum()

        cols = []
        for i in range(xn.numel()):
            e = torch.zeros(xn.numel(), dtype=DT)
            e[i] = h
            e = e.reshape(xn.shape)
            g_plus = torch.autograd.functional.jacobian(scalar, xn + e)
            g_minus = torch.autograd.functional.jacobian(scalar, xn - e)
            cols.append(((g_plus - g_minus) / (2 * h)).flatten())
        result.append(torch.stack(cols, 1))
    return torch.stack(result)


def input_hessians(r: Recorded, dz: torch.Tensor) -> torch.Tensor:
    """``[N, D_in, D_in]``: ``R_n``, the Hessian of ``dz_n . f(x_n)`` w.r.t. ``x_n``."""
    (g,) = torch.autograd.grad(r.out_ref, r.x_ref, dz, create_graph=True, retain_graph=True)
    d_in = r.x_ref[0].numel()
    try:
        full = _jacobian_rows(g, r.x_ref)
    except RuntimeError as error:
        assert "not implemented" in str(error)
        return _finite_difference_hessians(r, dz)
    return _per_sample_blocks(full, d_in, d_in)


def modified(R: torch.Tensor, curvature: str) -> torch.Tensor:
    """``m(R_n)``: the eigenvalues of each symmetric ``R_n`` modified (identity, abs, clip)."""
    values, vectors = torch.linalg.eigh(R)
    values = {"hessian": values, "pch-abs": values.abs(), "pch-clip": values.clamp(min=0)}[
        curvature
    ]
    return vectors @ torch.diag_embed(values) @ vectors.mT


def curvature_of(factor) -> torch.Tensor:
    """Per-sample ``sum_v sign S S^T`` of one factor, ``[N, D, D]``."""
    if isinstance(factor, DiagonalFactor):
        return torch.diag_embed(factor.signed_square().flatten(1))
    return torch.einsum("vni,vnj->nij", factor.signed().flatten(2), factor.S.flatten(2))


def random_factors(out_shape) -> list:
    """A signed sqrt factor, an unsigned one and a diagonal factor at the output."""
    S = torch.randn(4, *out_shape, dtype=DT)
    sign = torch.sign(torch.randn(4, N, dtype=DT))
    diagonal = DiagonalFactor.from_values(torch.randn(out_shape, dtype=DT))
    return [SqrtFactor(S, sign), SqrtFactor(S[:2]), diagonal]
