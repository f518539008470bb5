"""Base classes of the derivative rules: what a module type must provide.

Shapes: ``N`` is the batch size, ``V`` the number of vectors processed at once
(columns of a symmetric factorisation), ``*in`` / ``*out`` the feature shapes of
the module's input ``x`` and output ``z``. A *sqrt factor* ``S`` of shape
``[V, N, *out]`` with signs ``sign`` (``[V, N]`` or ``None`` for all ``+1``)
represents the per-sample output curvature ``sum_v sign[v, n] S[v, n] S[v, n]^T``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from hbpkit.core.calls import ModuleCall
from hbpkit.curvature.factors import (
    DiagonalFactor,
    DiagonalResidual,
    Factor,
    Jacobian,
    SqrtFactor,
    modify_eigenvalues,
)
from hbpkit.modules.structure import StructuredForms


def output_factor_from_average(H: Tensor, approx: str) -> Tensor:
    """``G`` of a weight shared over positions, from the averaged ``H`` ``[o, p, o', p']``.

    ``"expand"``: ``sum_p H[:, p, :, p]`` (the diagonal position blocks);
    ``"reduce"``: ``sum_{p, p'} H[:, p, :, p']`` (all blocks).
    """
    if approx == "reduce":
        return H.sum((1, 3))
    return torch.diagonal(H, dim1=1, dim2=3).sum(-1)


def position_gram(S: Tensor, S_signed: Tensor, approx: str) -> Tensor:
    """``G`` ``[D, D]`` of a weight shared over positions, from one sqrt factor's columns
    ``S`` and their signed copy, both ``[V, N, T, D]`` (S.8c, S.11).

    ``"expand"``: ``sum_{v,n,t} sign s s^T``; ``"reduce"``: ``sum_{v,n} sign (sum_t s)(sum_t s)^T``.
    """
    if approx == "reduce":
        S, S_signed = S.sum(2), S_signed.sum(2)
    return torch.einsum("ro,rp->op", S_signed.flatten(0, -2), S.flatten(0, -2))


def output_factor_from_sqrt(
    factors: list[Factor], columns: Callable[[Tensor], Tensor], approx: str
) -> Tensor:
    """``G`` ``[D, D]``: :func:`position_gram` summed over the (densified) sqrt factors;
    ``columns`` maps a factor's ``[V, N, *out]`` to the ``[V, N, T, D]`` it pairs."""
    G = 0
    for f in factors:
        f = f.dense()
        G = G + position_gram(columns(f.S), columns(f.signed()), approx)
    return G


class ModuleRules(StructuredForms):
    """Derivative rules of one module type (HBP, eq. 7 of the paper).

    A module ``z = f(x, theta)`` needs, for curvature backpropagation:

    * :meth:`jac_t_mat_prod`: ``[V, N, *out] -> [V, N, *in]``, ``(Dz(x))^T M`` per sample;
    * :meth:`jac_mat_prod`: ``[V, N, *in] -> [V, N, *out]``;
    * :meth:`residual_diag`: the second-order term ``sum_k Hz_k(x) dz_k`` of eq. (7),
      for elementwise modules the diagonal ``phi''(x) * dz`` (eq. S.9), ``[N, *in]``;
    * :meth:`ea_jac_t_mat_jac_prod`: ``mean_n Dz_n(x)^T H Dz_n(x)`` for a dense ``[D_out, D_out]``;

    and, if it has parameters, the per-parameter rules (per-sample gradients,
    diagonal blocks, Kronecker factors). Subclasses override what applies. How the
    module meets hbpkit's structured representations (local factors, position blocks)
    and the memory budget is in :class:`~hbpkit.modules.structure.StructuredForms`.
    """

    #: whether ``Hz(x)`` vanishes (no residual term in eq. 7)
    linear_in_input: bool = True
    #: whether ``Dz(x)`` is diagonal (elementwise modules, reshapes): diagonal factors stay so
    diagonal_jacobian: bool = False
    #: whether ``z`` is linear in every parameter (no parameter residual ``sum_k d2z_k/dp2 dz_k``)
    linear_in_params: bool = True
    #: a short remark for the support table (docs/supported-modules.md)
    support_note: str = ""
    #: the position of the output factor ``G`` (the one that carries the loss's curvature)
    #: among the Kronecker factors (``[G, A]``; an embedding's ``[A, G]``)
    kron_output_factor: int = 0

    def param_names(self, module: nn.Module) -> list[str]:
        """Names of the module's parameters that these rules handle."""
        return []

    def validate(self, call: ModuleCall) -> None:
        """Raise ``NotImplementedError`` for options or shapes the rules do not cover."""

    def capture(self, module: nn.Module, inputs: tuple, output: Tensor) -> object:
        """Keep what the forward pass knows and the backward pass needs (default nothing)."""
        return None

    # input derivatives ---------------------------------------------------------------
    def jac_t_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[V, N, *out] -> [V, N, *in]``."""
        raise self._missing("jac_t_mat_prod")

    def jac_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[V, N, *in] -> [V, N, *out]``."""
        raise self._missing("jac_mat_prod")

    def jac_mat_prod_channel(
        self, call: ModuleCall, mat: Tensor, channel: int
    ) -> tuple[Tensor, int | None]:
        """``J m`` for a tangent zero outside input ``channel`` (dim 1 of ``x``), given as
        ``m`` ``[V, N, 1, *in]`` (the forward form's tangents, extensions/forward_diagonal.py):
        ``(J m [V, N, 1, *out], c)`` where the product stays in output channel ``c``, else
        ``(J m [V, N, *out], None)``. Default: :meth:`jac_mat_prod` of the widened tangent."""
        return self.jac_mat_prod(call, widen_channel(mat, channel, call.inputs[0].shape[1])), None

    def param_channel_block(self, call: ModuleCall, name: str) -> int | None:
        """How many consecutive entries of parameter ``name`` (flattened) share the one
        output channel (dim 1 of ``z``) their tangent ``J_p e_i`` lies in, or ``None``
        where tangents spread over channels (default)."""
        return None

    def jac_t_factor(self, call: ModuleCall, factor: Factor) -> Factor:
        """Backpropagate a sqrt factor: ``S -> Dz(x)^T S`` (eq. 7 without residual)."""
        from hbpkit.curvature.local import jac_t_local  # it builds on this file

        local = jac_t_local(self, call, factor)
        if local is not None:
            return local
        return factor.jac_t(self.transposed_jacobian(call))

    def transposed_jacobian(self, call: ModuleCall) -> Jacobian:
        """``J^T`` of ``call`` with its structure, for :meth:`jac_t_factor` (see
        :class:`~hbpkit.curvature.factors.Jacobian`): elementwise where
        ``diagonal_jacobian``, else general."""
        structure = "elementwise" if self.diagonal_jacobian else "general"
        return Jacobian(partial(self.jac_t_mat_prod, call), structure)

    def residual_diag(self, call: ModuleCall, grad_output: Tensor) -> Tensor | None:
        """Diagonal of the residual ``sum_k Hz_k(x) dz_k`` per sample, ``[N, *in]``."""
        if self.linear_in_input:
            return None
        raise self._missing("residual_diag")

    def ea_jac_t_mat_jac_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[D_out, D_out] -> [D_in, D_in]``: ``mean_n J_n^T mat J_n`` (approximation (9))."""
        raise self._missing("ea_jac_t_mat_jac_prod")

    # the residual of eq. (7) as the three messages use it, modified by the curvature option.
    # The defaults build on residual_diag (elementwise modules); modules whose second
    # derivative is not diagonal (LayerNorm, GroupNorm) override all three.
    def _modified_residual_diag(
        self, call: ModuleCall, grad_output: Tensor, curvature: str
    ) -> Tensor | None:
        if curvature == "ggn" or self.linear_in_input:
            return None
        key = ("residual_diag_raw",)
        if key not in call.cache:
            call.cache[key] = self.residual_diag(call, grad_output)
        raw = call.cache[key]
        return None if raw is None else modify_eigenvalues(raw, curvature)

    def residual_factor(
        self, call: ModuleCall, grad_output: Tensor, curvature: str
    ) -> Factor | None:
        """Per-sample residual ``m(R_n)`` as a signed sqrt factor (``SqrtMessage``), or ``None``.

        ``R_n = sum_k Hz_k(x_n) dz_{n,k}`` (eq. 7), ``m`` the curvature option applied to
        its eigenvalues (:func:`modify_eigenvalues`); ``None`` when it is dropped.
        """
        r = self._modified_residual_diag(call, grad_output, curvature)
        return None if r is None else DiagonalFactor.from_values(r)

    def residual_sum(self, call: ModuleCall, grad_output: Tensor, curvature: str) -> Tensor | None:
        """``sum_n m(R_n)``, ``[D_in, D_in]`` (``AverageMessage``, approx. (9)), or ``None``."""
        r = self._modified_residual_diag(call, grad_output, curvature)
        return None if r is None else torch.diag(r.flatten(1).sum(0))

    def residual_mat_prod(
        self, call: ModuleCall, grad_output: Tensor, curvature: str
    ) -> Callable[[Tensor], Tensor] | None:
        """``M [K, N, *in] -> [K, N, *in]``, ``m(R_n) M[k, n]`` per sample (``ProductMessage``).

        ``None`` when the modified residual vanishes (the link is then the GGN's); on the
        CPU also where all its entries are zero, while on other devices that would read the
        device back in every module's hook (adding ``0 * m`` changes no product).
        """
        r = self._modified_residual_diag(call, grad_output, curvature)
        if r is None or (r.device.type == "cpu" and not bool(r.any())):
            return None
        return DiagonalResidual(r)

    # parameter derivatives ------------------------------------------------------------
    def batch_grad(self, call: ModuleCall, name: str, grad_output: Tensor) -> Tensor:
        """Per-sample gradients ``[N, *param.shape]`` from ``grad_output`` ``[N, *out]``."""
        raise self._missing("batch_grad")

    def batch_l2(self, call: ModuleCall, name: str, grad_output: Tensor) -> Tensor:
        """Squared norms of the per-sample gradients, ``[N]`` (default: from :meth:`batch_grad`)."""
        return self.cached_batch_grad(call, name, grad_output).flatten(1).square().sum(1)

    def sum_grad_squared(self, call: ModuleCall, name: str, grad_output: Tensor) -> Tensor:
        """``sum_n grad_n**2``, ``param.shape`` (default: from :meth:`batch_grad`)."""
        return self.cached_batch_grad(call, name, grad_output).square().sum(0)

    def summed_grad(self, call: ModuleCall, name: str, grad_output: Tensor) -> Tensor:
        """``sum_n grad_n`` (the gradient), ``param.shape`` (default: from :meth:`batch_grad`)."""
        return self.cached_batch_grad(call, name, grad_output).sum(0)

    def cached_batch_grad(self, call: ModuleCall, name: str, grad_output: Tensor) -> Tensor:
        """:meth:`batch_grad`, computed once per call and parameter."""
        key = ("batch_grad", name)
        if key not in call.cache:
            call.cache[key] = self.batch_grad(call, name, grad_output)
        return call.cache[key]

    def param_diag(self, call: ModuleCall, name: str, factors: list[Factor]) -> Tensor:
        """``diag(sum_n sum_v sign (J_p^T S)(J_p^T S)^T)``, shape ``param.shape``."""
        raise self._missing("param_diag")

    def param_diag_cost(self, call: ModuleCall, factors: list[Factor]) -> int | None:
        """Multiply-adds of :meth:`param_diag` for all parameters from ``factors`` (an
        estimate against which the forward form is weighed, extensions/forward_diagonal.py);
        ``None``: unknown, the column form is kept."""
        return None

    def param_jac_t_columns(self, call: ModuleCall, name: str, factor: Factor) -> SqrtFactor:
        """``J_{p,n}^T S[v, n]`` per column and sample, ``[V, N, *param.shape]`` with the
        factor's signs: what one use of a tied parameter contributes to its diagonals (the
        uses' columns are summed before squaring)."""
        raise self._missing("param_jac_t_columns")

    def kron_from_sqrt(
        self, call: ModuleCall, name: str, factors: list[Factor], approx: str
    ) -> list[Tensor]:
        """Kronecker factors of the parameter block from per-sample sqrt factors."""
        raise self._missing("kron_from_sqrt")

    def kron_from_average(
        self, call: ModuleCall, name: str, mat: Tensor, approx: str
    ) -> list[Tensor]:
        """Kronecker factors from a batch-averaged ``[D_out, D_out]`` (or its position blocks)."""
        raise self._missing("kron_from_average")

    # parameter Jacobian products (exact curvature-matrix products, GGNMP / HMP / PCHMP) -----
    def param_jac_mat_prod(self, call: ModuleCall, name: str, mat: Tensor) -> Tensor:
        """``[K, *param.shape] -> [K, N, *out]``: ``J_{p,n} v_k`` for every sample ``n``.

        The same ``v_k`` for every sample (a direction in parameter space).
        """
        raise self._missing("param_jac_mat_prod")

    def param_jac_t_mat_prod_sum(self, call: ModuleCall, name: str, mat: Tensor) -> Tensor:
        """``[K, N, *out] -> [K, *param.shape]``: ``sum_n J_{p,n}^T m_{k,n}``."""
        raise self._missing("param_jac_t_mat_prod_sum")

    def param_residual_mat_prod(
        self,
        call: ModuleCall,
        name: str,
        grad_output: Tensor,
        mat: Tensor,
        curvature: str = "hessian",
    ) -> Tensor:
        """``[K, *param.shape] -> [K, *param.shape]``: ``m(R_p) v`` with the parameter's own
        second-order term of eq. (7), ``R_p = sum_n sum_k (d2z_{n,k}/dp2) dz_{n,k}``, its
        eigenvalues modified by the curvature option (:func:`modify_eigenvalues`).

        Needed only by modules with ``linear_in_params = False`` (Linear and convolutions
        are linear in their parameters).
        """
        raise self._missing("param_residual_mat_prod")

    def param_residual_diag(
        self, call: ModuleCall, name: str, grad_output: Tensor, curvature: str
    ) -> Tensor:
        """``param.shape``: the diagonal of ``sum_n sum_k (d2z_{n,k}/dp2) dz_{n,k}`` (the
        parameter's own second-order term of eq. (7)), for ``curvature="hessian"``;
        needed only by modules with ``linear_in_params = False``."""
        raise self._missing("param_residual_diag")

    def implements(self, what: str) -> bool:
        """Whether the rule ``what`` is overridden (not the base class's missing error)."""
        return getattr(type(self), what) is not getattr(ModuleRules, what)

    def _missing(self, what: str) -> NotImplementedError:
        return NotImplementedError(f"{type(self).__name__} does not implement {what}")


class UnsupportedRules(ModuleRules):
    """A module type hbpkit knows and refuses, with the reason (e.g. ``nn.MultiheadAttention``).

    Registered so that every extension fails before the backward pass with ``reason``
    instead of a generic "not supported" message.
    """

    def __init__(self, reason: str, support_note: str = "") -> None:
        self.reason = reason
        self.support_note = support_note

    def param_names(self, module: nn.Module) -> list[str]:
        return [name for name, p in module.named_parameters(recurse=False) if p is not None]

    def validate(self, call: ModuleCall) -> None:
        raise NotImplementedError(f"{type(call.module).__name__} is not supported: {self.reason}")


class LossRules:
    """Derivative rules of a loss ``L = reduce_n l(x_n, y_n)`` (section C of the supplement).

    All quantities include the reduction (``mean`` or ``sum``) so that they are
    derivatives of the loss exactly as the module returns it.
    """

    def validate(self, call: ModuleCall) -> None:
        """Raise ``NotImplementedError`` for unsupported options (weights, smoothing, ...)."""
        reduction = call.module.reduction
        if reduction not in ("mean", "sum"):
            raise NotImplementedError(
                f"{type(call.module).__name__}(reduction={reduction!r}) is not supported: "
                "use 'mean' or 'sum'"
            )

    def capture(self, module: nn.Module, inputs: tuple, output: Tensor) -> object:
        return None

    def sqrt_hessian(self, call: ModuleCall) -> Tensor:
        """Exact symmetric factor ``S`` ``[V, N, *in]`` with ``sum_v S S^T = d2L/dx_n dx_n``."""
        raise NotImplementedError

    def sqrt_hessian_sampled(self, call: ModuleCall, mc_samples: int) -> Tensor:
        """Monte-Carlo factor ``[mc_samples, N, *in]``, unbiased for the per-sample Hessian."""
        raise NotImplementedError

    def sum_hessian(self, call: ModuleCall) -> Tensor:
        """``sum_n d2L/dx_n dx_n``, shape ``[D, D]`` with ``D`` = features of ``x``."""
        raise NotImplementedError

    def hessian_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[K, N, *in] -> [K, N, *in]``: ``(d2L/dx_n dx_n) m_{k,n}`` per sample ``n``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement hessian_mat_prod")


#: rule methods whose ``ModuleRules`` default is built on another rule method, which is
#: then enough to implement: the three forms of the residual of eq. 7 on its elementwise
#: diagonal ``residual_diag`` (S.9), the per-sample gradient statistics on ``batch_grad``
DEFAULTS_BUILT_ON: dict[str, str] = {
    "residual_factor": "residual_diag",
    "residual_sum": "residual_diag",
    "residual_mat_prod": "residual_diag",
    "batch_l2": "batch_grad",
    "sum_grad_squared": "batch_grad",
    "summed_grad": "batch_grad",
}


def widen_channel(mat: Tensor, channel: int, channels: int) -> Tensor:
    """``[V, N, 1, *f] -> [V, N, channels, *f]``: the tangent in ``channel``, zero elsewhere."""
    out = mat.new_zeros(*mat.shape[:2], channels, *mat.shape[3:])
    out[:, :, channel : channel + 1] = mat
    return out


def rules_implement(rules: object, name: str) -> bool:
    """Whether ``rules`` implements the rule method ``name``.

    For :class:`ModuleRules` / :class:`LossRules` methods: overridden in ``type(rules)``
    (``ModuleRules.implements``), or, where the default builds on another method
    (:data:`DEFAULTS_BUILT_ON`), that one overridden; other names (rules of a
    family of their own, e.g. the Kronecker roots' ``output_rows``): present on ``rules``.
    ``rules=None`` (no rules registered) implements nothing.
    """
    if rules is None:
        return False
    base = LossRules if isinstance(rules, LossRules) else ModuleRules
    if not hasattr(base, name):
        return hasattr(rules, name)
    if getattr(type(rules), name) is not getattr(base, name):
        return True
    built_on = DEFAULTS_BUILT_ON.get(name)
    return built_on is not None and rules_implement(rules, built_on)
