"""The generic path: exact rules from autograd for a module or function without its own.

A module hbpkit has no rules for (an ``nn.LSTM``, ``nn.Upsample``, a user's module) and
every functional operation :func:`hbpkit.convert` wraps (a ``view``, a ``cat``, the
attention of ``F.scaled_dot_product_attention``) is served by :class:`GenericRules`:
its derivatives come from ``torch.func`` on the call's saved inputs, batched over the
``V`` columns of a factor (``vmap``), never by a loop over samples.

Shapes: ``N`` samples, ``*out`` the output's features, ``*in_i`` those of the ``i``-th
followed input (a tensor input that requires gradients), ``V`` / ``K`` columns.

The one assumption (as for every module hbpkit knows): the call acts on each sample on
its own, ``z_n = f(x_n, theta)``. Then the transposed Jacobian of the whole batch is
block-diagonal over samples and one batched vector-Jacobian product gives every
sample's ``J_n^T S[v, n]`` (eq. 7 without the residual). Per-sample parameter
gradients need the per-sample function ``f(x_n, theta)`` under ``vmap``. The residual
of eq. 7, ``R_n = sum_k d2z_k/dx_n dx_n dz_k``, is the Hessian of ``<f(x), dz>`` w.r.t.
the inputs (block-diagonal over samples as well): Hessian-vector products for the
exact products, its per-sample dense form (inside the memory budget) where a factor or
its eigenvalues are needed. A module with several followed inputs (``cat``, a product
of two tensors, attention) sends each input its own message (``per_input``), and its
residual couples them (the cross terms ``d2z/dx_i dx_j``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from hbpkit.core.calls import ModuleCall, describe, replaying
from hbpkit.curvature.factors import (
    Factor,
    Jacobian,
    SqrtFactor,
    modify_eigenvalues,
)
from hbpkit.curvature.memory import DIAGONAL_ADVICE, check_dense_budget, policy_of
from hbpkit.modules.base import ModuleRules

STRUCTURES = ("general", "selection")


def MATH_ATTENTION():  # noqa: N802 (a context manager factory)
    """Attention through its composite (matmul, softmax) form when a call is replayed: the
    fused CPU kernels have no forward-mode derivative."""
    return sdpa_kernel(SDPBackend.MATH)


GENERIC_ADVICE = (
    "The module has no rules of its own (the generic autograd path forms this tensor); "
    "register rules for it with hbpkit.register(...), use a GGN extension or products"
)


class CallFunction:
    """The function one call computed, ready for ``torch.func``, built once per call.

    ``self(params, *xs)`` recomputes the call's output ``[N, *out]`` from the followed
    inputs ``xs`` (the tensor inputs that required gradients) and a dict of parameters
    (those not given are the module's own); :meth:`per_sample` is the same function of
    one sample, for ``vmap``. The call's keyword arguments are replayed as recorded
    (tensors among them with the batch dimension are sliced per sample as well).
    """

    def __init__(self, call: ModuleCall, rules: GenericRules) -> None:
        self.module = call.module
        self.n_args = len(call.inputs)
        self.kw_names = tuple(call.kwargs)
        everything = (*call.inputs, *call.kwargs.values())
        self.inputs = tuple(t.detach() if isinstance(t, Tensor) else t for t in everything)
        self.followed = followed_slots(call)
        self.output_index = call.output_index
        self.N = call.output_shape[0]
        self.batched = tuple(  # a tensor with N rows is per sample (see batched_inputs)
            isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == self.N for t in everything
        )
        known = getattr(call.module, "batched_inputs", None)  # a region knows which are
        if known is not None and len(known) == self.n_args:
            self.batched = (
                tuple(a and b for a, b in zip(known, self.batched)) + self.batched[self.n_args :]
            )
        self.params = {name: p.detach() for name, p in rules.trainable_params(call.module)}
        self.function = rules.function(call.module)

    def _run(self, params: dict[str, Tensor], values: list[Any]) -> Tensor:
        args, kwargs = values[: self.n_args], dict(zip(self.kw_names, values[self.n_args :]))
        with replaying(), MATH_ATTENTION():
            out = self.function(self.module, params, args, kwargs)
        return out if self.output_index is None else out[self.output_index]

    def __call__(self, params: dict[str, Tensor], *xs: Tensor) -> Tensor:
        values = list(self.inputs)
        for slot, x in zip(self.followed, xs):
            values[slot] = x
        return self._run(params, values)

    def per_sample(self, params: dict[str, Tensor], *values: Any) -> Tensor:
        """``f(x_n, theta)`` for one sample; ``values``: every input, sliced where batched."""
        values = [v.unsqueeze(0) if b else v for v, b in zip(values, self.batched)]
        return self._run(params, values).squeeze(0)

    def in_dims(self) -> tuple[int | None, ...]:
        return tuple(0 if b else None for b in self.batched)

    def followed_inputs(self) -> tuple[Tensor, ...]:
        return tuple(self.inputs[i] for i in self.followed)


def call_module(
    module: nn.Module, params: dict[str, Tensor], args: list[Any], kwargs: dict[str, Any]
) -> Any:
    """``module(*args, **kwargs)`` with ``params`` in place of the module's own tensors."""
    return functional_call(module, params, tuple(args), kwargs)


def followed_slots(call: ModuleCall) -> tuple[int, ...]:
    """The inputs of ``call`` curvature is backpropagated to: tensors that required gradients
    when the call was recorded."""
    return call.grad_slots


class GenericRules(ModuleRules):
    """Rules for any module or function, from ``torch.func`` (the generic path).

    Args:
        linear_in_input: the function is linear in its inputs (its residual vanishes:
            ``view``, ``cat``, ``nn.Upsample``); else the residual is formed.
        structure: ``"selection"`` where every output entry is a copy of one input entry
            or zero (reshapes, indexing, concatenation, constant padding), so diagonal
            factors stay diagonal (D.2); else ``"general"``.
        linear_in_params: the output is linear in every parameter.
    """

    multi_input = True
    support_note = "generic path: exact, from autograd (torch.func), no Kronecker factors"

    def __init__(
        self,
        linear_in_input: bool = False,
        structure: str = "general",
        linear_in_params: bool = False,
    ) -> None:
        if structure not in STRUCTURES:
            raise ValueError(f"structure={structure!r} is not one of {STRUCTURES}")
        self.linear_in_input = linear_in_input
        self.structure = structure
        self.linear_in_params = linear_in_params

    @property
    def keeps_diagonal(self) -> bool:
        return self.structure == "selection"

    def function(self, module: nn.Module) -> Callable[[nn.Module, dict, list, dict], Any]:
        """``(module, params, args, kwargs) -> output`` as ``torch.func`` differentiates it."""
        return call_module

    def param_names(self, module: nn.Module) -> list[str]:
        """Every parameter of the module, its children's included (dotted names)."""
        return [name for name, _ in module.named_parameters()]

    def trainable_params(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def per_input(self, call: ModuleCall) -> bool:
        """Whether the call has several followed inputs, each with its own message."""
        return len(followed_slots(call)) > 1

    def input_slots(self, call: ModuleCall) -> tuple[int, ...]:
        """The positions in ``call.inputs`` of the followed inputs, in the order of
        the ``*_inputs`` methods' lists."""
        return followed_slots(call)

    def validate(self, call: ModuleCall) -> None:
        N = call.output_shape[0] if len(call.output_shape) else None
        for slot in followed_slots(call):
            x = call.inputs[slot]
            if N is None or x.dim() == 0 or x.shape[0] != N:
                raise NotImplementedError(
                    f"{describe(call.module)} (generic path) maps an input of shape "
                    f"{tuple(x.shape)} to an output of shape {tuple(call.output_shape)}; hbpkit "
                    "needs the batch dimension first in both ([N, *features]) and every "
                    "sample processed on its own"
                )
        for key, value in call.kwargs.items():
            if isinstance(value, Tensor) and value.requires_grad:
                raise NotImplementedError(
                    f"{describe(call.module)} (generic path) takes {key}= by keyword, a tensor "
                    "that depends on the network; hbpkit backpropagates curvature through "
                    "positional inputs: pass it positionally"
                )
        for name, sub in call.module.named_modules():
            if sub.training and isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0:
                raise NotImplementedError(
                    f"{describe(call.module)} (generic path) contains an active dropout layer "
                    f"'{name}': its mask cannot be replayed; call eval() on it, or move the "
                    "dropout out of the module"
                )
            if sub.training and isinstance(sub, nn.modules.batchnorm._BatchNorm):
                raise NotImplementedError(
                    f"{describe(call.module)} (generic path) contains '{name}', a batch norm in "
                    "training mode, which couples the samples; call eval() on it"
                )

    # the memory budget, checked before the pass (engine/plan.py) -------------------------
    def check_budget(self, call: ModuleCall, batch_averaged: bool, diagonal_factors: bool) -> None:
        """A diagonal factor made dense, or the per-sample columns of a batch-averaged
        matrix: ``[D_out, N, *in]`` each (``ea_jac_t_mat_jac_prod``)."""
        if not ((diagonal_factors and not self.keeps_diagonal) or batch_averaged):
            return
        shape = call.output_shape
        for slot in followed_slots(call):
            x = call.inputs[slot]
            what = "Batch-averaged backpropagation" if batch_averaged else "A dense factor"
            check_dense_budget(call, (shape[1:].numel(), *x.shape), x.dtype, what, DIAGONAL_ADVICE)

    def check_residual_budget(self, call: ModuleCall, messages: list) -> None:
        """The per-sample dense residual ``[N, D, D]`` (and its ``D`` columns), which sqrt
        factors, batch averages and PCH products need; Hessian products use
        Hessian-vector products instead."""
        dense = [
            m
            for m in messages
            if getattr(m, "curvature", "ggn") != "ggn"
            and (m.residual_factors or m.batch_averaged or m.curvature != "hessian")
        ]
        if not dense:
            return
        xs = [call.inputs[i] for i in followed_slots(call)]
        if not xs:
            return
        D = sum(x[0].numel() for x in xs)
        check_dense_budget(
            call,
            (2 * D, xs[0].shape[0], D),
            xs[0].dtype,
            "The per-sample residual (eq. 7)",
            GENERIC_ADVICE,
        )

    def _function(self, call: ModuleCall) -> CallFunction:
        key = ("generic_function",)
        if key not in call.cache:
            call._check_alive()
            call.cache[key] = CallFunction(call, self)
        return call.cache[key]

    # input derivatives ----------------------------------------------------------------------
    def _input_vjp(self, call: ModuleCall) -> Callable:
        key = ("generic_input_vjp",)
        if key not in call.cache:
            f = self._function(call)
            _, call.cache[key] = vjp(lambda *xs: f(f.params, *xs), *f.followed_inputs())
        return call.cache[key]

    def jac_t_mat_prod_inputs(self, call: ModuleCall, mat: Tensor) -> tuple[Tensor, ...]:
        """``[V, N, *out] -> ([V, N, *in_i], ...)``: ``J_i^T M`` for every followed input."""
        return vmap(self._input_vjp(call))(mat)

    def jac_mat_prod_inputs(self, call: ModuleCall, mats: list[Tensor | None]) -> Tensor:
        """``([V, N, *in_i] or None, ...) -> [V, N, *out]``: ``sum_i J_i M_i`` (None: zero)."""
        f = self._function(call)
        xs = f.followed_inputs()
        V = next(m.shape[0] for m in mats if m is not None)
        mats = [m if m is not None else x.new_zeros(V, *x.shape) for m, x in zip(mats, xs)]

        def push(*tangents: Tensor) -> Tensor:
            return jvp(lambda *ys: f(f.params, *ys), xs, tangents)[1]

        return vmap(push)(*mats)

    def jac_t_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        self._single_input(call, "jac_t_mat_prod")
        return self.jac_t_mat_prod_inputs(call, mat)[0]

    def jac_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        self._single_input(call, "jac_mat_prod")
        return self.jac_mat_prod_inputs(call, [mat])

    def _single_input(self, call: ModuleCall, what: str) -> None:
        if self.per_input(call):
            raise NotImplementedError(
                f"{describe(call.module)} has {len(followed_slots(call))} inputs that require "
                f"gradients; {what} of the generic path needs one (this extension cannot "
                "backpropagate through it)"
            )

    def transposed_jacobian(self, call: ModuleCall) -> Jacobian:
        return self.input_jacobians(call)[0]

    def input_jacobians(self, call: ModuleCall) -> list[Jacobian]:
        """One transposed Jacobian per followed input, with the rules' structure."""
        slots = followed_slots(call)

        def densify(N: int, dtype: torch.dtype) -> None:
            check_dense_budget(
                call,
                (call.output_shape[1:].numel(), N, *call.output_shape[1:]),
                dtype,
                "Densifying a diagonal curvature factor",
                DIAGONAL_ADVICE,
            )

        return [
            Jacobian(lambda m, i=i: self.jac_t_mat_prod_inputs(call, m)[i], self.structure, densify)
            for i in range(len(slots))
        ]

    def jac_t_factor(self, call: ModuleCall, factor: Factor) -> Factor:
        self._single_input(call, "jac_t_factor")
        return factor.jac_t(self.transposed_jacobian(call))

    def jac_t_factor_inputs(self, call: ModuleCall, factor: Factor) -> list[Factor]:
        """``[J_i^T S for every followed input]``, the columns (and signs) of ``S`` kept."""
        if isinstance(factor, SqrtFactor):  # one batched product for all inputs
            return [SqrtFactor(S, factor.sign) for S in self.jac_t_mat_prod_inputs(call, factor.S)]
        return [factor.jac_t(jac) for jac in self.input_jacobians(call)]

    # the residual of eq. 7 -----------------------------------------------------------------
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

    # parameter derivatives -----------------------------------------------------------------
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


def _itemsize(f: CallFunction) -> int:
    x = f.followed_inputs()
    return x[0].dtype.itemsize if x else 8
