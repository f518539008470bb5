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
from torch.func import jvp, vjp, vmap

from hbpkit.core.calls import ModuleCall, describe
from hbpkit.curvature.factors import Factor, Jacobian, SqrtFactor
from hbpkit.curvature.memory import DIAGONAL_ADVICE, check_dense_budget
from hbpkit.modules.base import ModuleRules
from hbpkit.modules.generic.function import (
    GENERIC_ADVICE,
    STRUCTURES,
    CallFunction,
    call_module,
    followed_slots,
)
from hbpkit.modules.generic.parameters import GenericParameters
from hbpkit.modules.generic.residual import GenericResiduals


class InputProducts:
    """Transposed-Jacobian products of a call with several inputs, built on the rules'
    ``jac_t_mat_prod_inputs(call, M) -> [J_i^T M for every followed input]``, their
    ``input_slots``, ``per_input`` and ``structure``: the generic path, and the
    functional operations an extended model computes between modules (``recorded.py``)."""

    def jac_t_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        self._single_input(call, "jac_t_mat_prod")
        return self.jac_t_mat_prod_inputs(call, mat)[0]

    def _single_input(self, call: ModuleCall, what: str) -> None:
        if self.per_input(call):
            raise NotImplementedError(
                f"{describe(call.module)} has {len(self.input_slots(call))} inputs that require "
                f"gradients; {what} of {type(self).__name__} needs one (this extension cannot "
                "backpropagate through it)"
            )

    def transposed_jacobian(self, call: ModuleCall) -> Jacobian:
        return self.input_jacobians(call)[0]

    def input_jacobians(self, call: ModuleCall) -> list[Jacobian]:
        """One transposed Jacobian per followed input, with the rules' structure."""
        slots = self.input_slots(call)

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


class GenericRules(GenericParameters, GenericResiduals, InputProducts, ModuleRules):
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

    def jac_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        self._single_input(call, "jac_mat_prod")
        return self.jac_mat_prod_inputs(call, [mat])
