"""Parameter derivatives on the generic path: per-sample gradients and diagonals from the
per-sample function under ``vmap``, products from the batched function, the parameters'
own second derivatives from Hessian-vector products."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from hbpkit.core.calls import ModuleCall, describe
from hbpkit.curvature.factors import Factor, SqrtFactor, modify_eigenvalues
from hbpkit.curvature.memory import check_dense_budget, policy_of
from hbpkit.modules.generic.function import CallFunction


class GenericParameters:
    """The parameter rules of :class:`~hbpkit.modules.generic.rules.GenericRules`."""

    def _per_sample_vjp(self, call: ModuleCall, cotangent: Tensor) -> dict[str, Tensor]:
        """``{name: [N, V, *p]}``: ``J_{p,n}^T C[v, n]`` per sample; ``C``: ``[V, N, *out]``."""
        f = self._function(call)

        def one(*args: Any) -> dict[str, Tensor]:
            *inputs, c = args
            _, pull = vjp(lambda p: f.per_sample(p, *inputs), f.params)
            return vmap(pull)(c)[0]

        return vmap(one, in_dims=(*f.in_dims(), 1))(*f.inputs, cotangent)

    def batch_grad(self, call: ModuleCall, name: str, grad_output: Tensor) -> Tensor:
        key = ("generic_batch_grad",)
        if key not in call.cache:
            grads = self._per_sample_vjp(call, grad_output.unsqueeze(0))
            call.cache[key] = {n: g.squeeze(1) for n, g in grads.items()}
        return call.cache[key][name]

    def cached_batch_grad(self, call: ModuleCall, name: str, grad_output: Tensor) -> Tensor:
        return self.batch_grad(call, name, grad_output)

    def param_diag(self, call: ModuleCall, name: str, factors: list[Factor]) -> Tensor:
        """``sum_n sum_v sign (J_{p,n}^T S[v, n])**2`` for all parameters at once, in column
        chunks within ``MemoryPolicy.chunk_bytes``."""
        cache = call.cache.setdefault(("generic_param_diag",), {})
        key = tuple(id(f) for f in factors)  # the factors live while the call is processed
        if key not in cache:
            f = self._function(call)
            per_column = f.N * sum(p.numel() for p in f.params.values()) * _itemsize(f)
            chunk = max(1, policy_of(call).chunk_bytes // max(per_column, 1))
            out = {n: torch.zeros_like(p) for n, p in f.params.items()}
            for factor in factors:
                factor = factor.dense()
                for start in range(0, factor.S.shape[0], chunk):
                    S = factor.S[start : start + chunk]
                    sign = None if factor.sign is None else factor.sign[start : start + chunk]
                    for n, g in self._per_sample_vjp(call, S).items():  # [N, V, *p]
                        sq = g.square()
                        if sign is not None:
                            sq = sq * sign.T.reshape(*sign.T.shape, *[1] * (sq.dim() - 2))
                        out[n] += sq.sum((0, 1))
            cache[key] = out
        return cache[key][name]

    param_only_cache = (("generic_batch_grad",), ("generic_param_diag",))

    def param_jac_t_columns(self, call: ModuleCall, name: str, factor: Factor) -> SqrtFactor:
        f = factor.dense()
        columns = self._per_sample_vjp(call, f.S)[name]  # [N, V, *p]
        return SqrtFactor(columns.transpose(0, 1), f.sign)

    def param_jac_mat_prod(self, call: ModuleCall, name: str, mat: Tensor) -> Tensor:
        """``[K, *p] -> [K, N, *out]``: one batched forward-mode product per column."""
        f = self._function(call)
        xs = f.followed_inputs()
        p = f.params[name]

        def push(v: Tensor) -> Tensor:
            return jvp(lambda q: f({**f.params, name: q}, *xs), (p,), (v,))[1]

        return vmap(push)(mat)

    def param_jac_t_mat_prod_sum(self, call: ModuleCall, name: str, mat: Tensor) -> Tensor:
        """``[K, N, *out] -> [K, *p]``: one batched reverse-mode product per column."""
        f = self._function(call)
        xs = f.followed_inputs()
        _, pull = vjp(lambda q: f({**f.params, name: q}, *xs), f.params[name])
        return vmap(pull)(mat)[0]

    def param_residual_mat_prod(
        self,
        call: ModuleCall,
        name: str,
        grad_output: Tensor,
        mat: Tensor,
        curvature: str = "hessian",
    ) -> Tensor:
        """``[K, *p] -> [K, *p]``: Hessian-vector products of ``<f(x, p), dz>`` in ``p``; for
        PCH the dense residual (within the memory budget) with modified eigenvalues."""
        if curvature == "hessian":
            return vmap(self._param_hvp(call, name, grad_output))(mat)
        key = ("generic_param_residual", name, curvature)
        if key not in call.cache:
            p = self._function(call).params[name]
            P = p.numel()
            check_dense_budget(call, (2 * P, P), p.dtype, "The residual of a parameter", "")
            basis = torch.eye(P, dtype=p.dtype, device=p.device).reshape(P, *p.shape)
            R = vmap(self._param_hvp(call, name, grad_output))(basis).reshape(P, P)
            values, vectors = torch.linalg.eigh((R + R.T) / 2)
            values = modify_eigenvalues(values, curvature)
            call.cache[key] = (vectors * values) @ vectors.T
        R = call.cache[key]
        return (mat.reshape(mat.shape[0], -1) @ R).reshape(mat.shape)

    def _param_hvp(self, call: ModuleCall, name: str, grad_output: Tensor) -> Callable:
        f = self._function(call)
        xs = f.followed_inputs()
        dz = grad_output.detach()
        gradient = grad(lambda q: (f({**f.params, name: q}, *xs) * dz).sum())
        p = f.params[name]
        return lambda v: jvp(gradient, (p,), (v,))[1]

    def param_residual_diag(
        self, call: ModuleCall, name: str, grad_output: Tensor, curvature: str
    ) -> Tensor:
        """The diagonal of ``d2 <f(x, p), dz> / dp2`` from Hessian-vector products with the
        unit vectors, in chunks within ``MemoryPolicy.chunk_bytes``."""
        if curvature != "hessian":
            raise NotImplementedError(
                f"{describe(call.module)}: the diagonal of the parameters' own residual is "
                f"exact only for the Hessian, not curvature={curvature!r}"
            )
        p = self._function(call).params[name]
        P = p.numel()
        chunk = max(1, policy_of(call).chunk_bytes // max(P * p.dtype.itemsize, 1))
        out = []
        for start in range(0, P, chunk):
            basis = torch.zeros(min(chunk, P - start), P, dtype=p.dtype, device=p.device)
            basis[:, start : start + basis.shape[0]].fill_diagonal_(1)
            products = self.param_residual_mat_prod(
                call, name, grad_output, basis.reshape(-1, *p.shape)
            )
            out.append(products.reshape(-1, P)[:, start : start + basis.shape[0]].diagonal())
        return torch.cat(out).reshape(p.shape)


def _itemsize(f: CallFunction) -> int:
    x = f.followed_inputs()
    return x[0].dtype.itemsize if x else 8
