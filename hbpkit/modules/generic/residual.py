"""The residual of eq. 7 on the generic path: second derivatives of a module without rules.

``R_n = sum_k d2z_k/dx_n dx_n dz_k``, the Hessian of ``<f(x), dz>`` w.r.t. the followed
inputs (block-diagonal over samples): Hessian-vector products for exact Hessian products,
its per-sample dense form (inside the memory budget) where a factor or its eigenvalues
are needed. With several inputs it couples them (``d2z/dx_i dx_j``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from hbpkit.core.calls import ModuleCall
from hbpkit.curvature.factors import Factor, SqrtFactor, modify_eigenvalues
from hbpkit.curvature.memory import check_dense_budget
from hbpkit.modules.generic.function import GENERIC_ADVICE


class GenericResiduals:
    """The residual forms of :class:`~hbpkit.modules.generic.rules.GenericRules`."""

    def _input_hvp(self, call: ModuleCall, grad_output: Tensor) -> Callable:
        """``(t_1, ..., t_k) -> (R t)_i``: products with ``d2 <f(x), dz> / dx dx``."""
        f = self._function(call)
        xs = f.followed_inputs()
        dz = grad_output.detach()

        def inner(*ys: Tensor) -> Tensor:
            return (f(f.params, *ys) * dz).sum()

        gradient = grad(inner, argnums=tuple(range(len(xs))))

        def hvp(*tangents: Tensor) -> tuple[Tensor, ...]:
            return jvp(gradient, xs, tangents)[1]

        return hvp

    def _residual_dense(self, call: ModuleCall, grad_output: Tensor) -> Tensor | None:
        """``R_n`` ``[N, D, D]`` over the concatenated followed inputs (``D = sum_i D_i``),
        ``None`` where it vanishes; cached per call."""
        key = ("generic_residual",)
        if key in call.cache:
            return call.cache[key]
        f = self._function(call)
        xs = f.followed_inputs()
        sizes = [x[0].numel() for x in xs]
        D, N = sum(sizes), f.N
        check_dense_budget(
            call, (2 * D, N, D), xs[0].dtype, "The per-sample residual (eq. 7)", GENERIC_ADVICE
        )
        basis = torch.eye(D, dtype=xs[0].dtype, device=xs[0].device)
        tangents = [
            part.unsqueeze(1).expand(D, N, size).reshape(D, *x.shape)
            for part, size, x in zip(basis.split(sizes, dim=1), sizes, xs)
        ]
        columns = vmap(self._input_hvp(call, grad_output))(*tangents)  # ([D, N, *in_i], ...)
        R = torch.cat([c.reshape(D, N, -1) for c in columns], dim=2).permute(1, 0, 2)
        R = None if not bool(R.any()) else (R + R.transpose(1, 2)) / 2
        call.cache[key] = R
        return R

    def _split_columns(self, call: ModuleCall, columns: Tensor) -> list[Tensor]:
        """``[V, N, D]`` over the concatenated inputs -> ``[V, N, *in_i]`` per input."""
        xs = self._function(call).followed_inputs()
        sizes = [x[0].numel() for x in xs]
        return [
            c.reshape(*columns.shape[:2], *x.shape[1:])
            for c, x in zip(columns.split(sizes, dim=2), xs)
        ]

    def residual_factor_inputs(
        self, call: ModuleCall, grad_output: Tensor, curvature: str
    ) -> list[Factor] | None:
        """``m(R_n)`` as one signed sqrt factor, its columns split over the followed inputs."""
        if curvature == "ggn" or self.linear_in_input:
            return None
        R = self._residual_dense(call, grad_output)
        if R is None:
            return None
        values, vectors = torch.linalg.eigh(R)  # [N, D], [N, D, D]
        values = modify_eigenvalues(values, curvature)
        columns = (vectors * values.abs().sqrt().unsqueeze(1)).permute(2, 0, 1)  # [D, N, D]
        sign = None if bool((values >= 0).all()) else torch.sign(values).T
        return [SqrtFactor(c, sign) for c in self._split_columns(call, columns)]

    def residual_factor(
        self, call: ModuleCall, grad_output: Tensor, curvature: str
    ) -> Factor | None:
        self._single_input(call, "residual_factor")
        factors = self.residual_factor_inputs(call, grad_output, curvature)
        return None if factors is None else factors[0]

    def residual_sum(self, call: ModuleCall, grad_output: Tensor, curvature: str) -> Tensor | None:
        self._single_input(call, "residual_sum")
        if curvature == "ggn" or self.linear_in_input:
            return None
        R = self._residual_dense(call, grad_output)
        if R is None or curvature == "hessian":
            return None if R is None else R.sum(0)
        values, vectors = torch.linalg.eigh(R)
        values = modify_eigenvalues(values, curvature)
        return torch.einsum("nij,nj,nkj->ik", vectors, values, vectors)

    def residual_mat_prod(
        self, call: ModuleCall, grad_output: Tensor, curvature: str
    ) -> Callable[[Any], Any] | None:
        """``m(R_n)`` applied per sample, on ``[K, N, *in]`` (one followed input) or on a list
        of them (several): Hessian-vector products for the Hessian, else the dense
        residual with modified eigenvalues."""
        if curvature == "ggn" or self.linear_in_input:
            return None
        single = not self.per_input(call)
        if curvature == "hessian":
            return InputResidual(vmap(self._input_hvp(call, grad_output)), single)
        R = self._residual_dense(call, grad_output)
        if R is None:
            return None
        values, vectors = torch.linalg.eigh(R)
        values = modify_eigenvalues(values, curvature)
        R = torch.einsum("nij,nj,nkj->nik", vectors, values, vectors)
        xs = self._function(call).followed_inputs()

        def apply(*mats: Tensor) -> tuple[Tensor, ...]:
            flat = torch.cat([m.flatten(2) for m in mats], dim=2)  # [K, N, D]
            out = torch.einsum("nij,knj->kni", R, flat)
            sizes = [x[0].numel() for x in xs]
            return tuple(o.reshape(m.shape) for o, m in zip(out.split(sizes, dim=2), mats))

        return InputResidual(apply, single)

    def ea_jac_t_mat_jac_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``mean_n J_n^T mat J_n`` from the eigenvectors of ``mat`` pushed back per sample."""
        self._single_input(call, "ea_jac_t_mat_jac_prod")
        f = self._function(call)
        x = f.followed_inputs()[0]
        N, D_out = f.N, mat.shape[0]
        check_dense_budget(
            call, (D_out, *x.shape), x.dtype, "Batch-averaged backpropagation", GENERIC_ADVICE
        )
        values, vectors = torch.linalg.eigh((mat + mat.T) / 2)
        roots = vectors * values.abs().sqrt()  # columns: mat = sum_j sign_j r_j r_j^T
        cols = roots.T.reshape(D_out, 1, *call.output_shape[1:]).expand(
            D_out, N, *call.output_shape[1:]
        )
        back = self.jac_t_mat_prod(call, cols.contiguous()).reshape(D_out, N, -1)
        return torch.einsum("jna,j,jnb->ab", back, torch.sign(values), back) / N


class InputResidual:
    """``m(R_n)`` applied per sample: on one ``[K, N, *in]`` tensor (``single``), else on the
    tuple of the followed inputs' tensors (returns a tuple)."""

    __slots__ = ("apply", "single")

    def __init__(self, apply: Callable, single: bool) -> None:
        self.apply = apply
        self.single = single

    def __call__(self, mat: Any) -> Any:
        if self.single:
            return self.apply(mat)[0]
        return self.apply(*mat)

    __mul__ = __call__  # ``residual * m``, as the product messages apply residuals
