"""Rules of pooling layers: index selections and fixed linear maps (supplement D.2).

Shapes follow :mod:`hbpkit.modules.base`: the module maps ``x`` ``[N, *in]`` to
``z`` ``[N, *out]``, matrices of ``V`` vectors are ``[V, N, *in]`` / ``[V, N, *out]``,
``D_in`` / ``D_out`` count the features of one sample. The pooled (spatial) axes
are the last ``d`` of a ``d``-dimensional layer; the axes before them (channels,
or nothing for an input without batch axis in PyTorch's sense) are kept.

Two kinds of maps, both linear in the input (Hessian ``0`` a.e., no residual in eq. 7):

* **Selections** (``MaxPool``, ``AdaptiveMaxPool``; the paddings of
  :mod:`hbpkit.modules.padding`): every output entry copies one input entry,
  ``z = Pi x`` with ``Pi`` one-hot per row, so ``Hx = Pi^T Hz Pi`` (D.2). For max
  pooling ``Pi_n`` depends on the sample (the argmax of each window). A diagonal
  curvature stays diagonal: ``Pi^T diag(d) Pi = diag(Pi^T d)`` (two outputs never
  share a row, even where windows overlap), so :class:`DiagonalFactor` inputs are
  backpropagated without densifying.
* **Fixed linear maps** (``AvgPool``, ``AdaptiveAvgPool``): weighted sums of
  selections (D.2), the same ``J`` for every sample: ``jac`` is the pooling itself,
  ``jac_t`` its adjoint (autograd's vector-Jacobian product of the map, which is
  the same at every point). They mix features, so a diagonal factor is densified.

Batch-averaged backpropagation (approximation (9), ``KFRA``) and densified
diagonal factors allocate dense ``[D_in, D_in]`` / ``[D_out, N, *in]`` tensors: both
are refused with :class:`DenseBudgetError` *before* allocating when they would
exceed :data:`hbpkit.modules.budget.MAX_DENSE_BYTES`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hbpkit.calls import ModuleCall
from hbpkit.modules.base import DiagonalFactor, Factor, ModuleRules, SqrtFactor
from hbpkit.modules.budget import DIAGONAL_ADVICE, EA_ADVICE, check_dense_budget
from hbpkit.modules.local_factor import ConvTransposeStep, LocalStep, SelectStep, jac_t_local


def _features(call: ModuleCall) -> tuple[torch.Size, torch.Size]:
    """``(*in, *out)`` feature shapes of one sample."""
    return call.inputs[0].shape[1:], call.output_shape[1:]


class _LinearMapRules(ModuleRules):
    """A map ``z_n = Pi_n x_n`` that is linear in ``x_n`` (shared by pooling and padding).

    Subclasses implement :meth:`_jac_t` / :meth:`_jac` on ``[B, *out]`` / ``[B, *in]``
    batches; :meth:`ea_jac_t_mat_jac_prod` and :meth:`jac_t_factor` build on them.
    """

    linear_in_input = True
    #: every row of ``Pi_n`` is one-hot or zero: ``Pi^T diag(d) Pi = diag(Pi^T d)``
    selection: bool = False

    def validate(self, call: ModuleCall) -> None:
        x = call.inputs[0]
        if not isinstance(x, Tensor) or x.dim() <= self._mapped_dims(call.module):
            raise NotImplementedError(
                f"{call.module} maps all axes of its input of shape {tuple(x.shape)}, the batch "
                "axis included; hbpkit needs a batched input [N, *features]"
            )

    def _mapped_dims(self, module: nn.Module) -> int:
        """How many trailing axes the map acts on."""
        raise NotImplementedError

    def _jac_t(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[B, *out] -> [B, *in]``, rows ``J^T m_b``.

        Maps that depend on the sample get ``B = V * N`` rows ordered like ``[V, N]``
        (row ``b`` belongs to sample ``b % N``); fixed maps accept any ``B``.
        """
        raise NotImplementedError

    def _jac(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[B, *in] -> [B, *out]``."""
        raise NotImplementedError

    def jac_t_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[V, N, *out] -> [V, N, *in]``: ``Pi_n^T m_{v,n}``."""
        V, N = mat.shape[:2]
        return self._jac_t(call, mat.flatten(0, 1)).reshape(V, N, *_features(call)[0])

    def jac_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[V, N, *in] -> [V, N, *out]``: ``Pi_n m_{v,n}``."""
        V, N = mat.shape[:2]
        return self._jac(call, mat.flatten(0, 1)).reshape(V, N, *_features(call)[1])

    # D.2: Hx = Pi^T Hz Pi; a selection keeps diagonals diagonal
    def jac_t_factor(self, call: ModuleCall, factor: Factor) -> Factor:
        """``S -> Pi^T S``; a :class:`DiagonalFactor` stays diagonal for selections."""
        local = jac_t_local(self, call, factor)
        if local is not None:
            return local
        if isinstance(factor, DiagonalFactor):
            if self.selection:
                d = self.jac_t_mat_prod(call, factor.signed_square().unsqueeze(0)).squeeze(0)
                return DiagonalFactor.from_values(d)
            self._check_diagonal_budget(call, factor.s.shape[0], factor.s.dtype)
            factor = factor.dense()
        return SqrtFactor(self.jac_t_mat_prod(call, factor.S), factor.sign)

    def _check_ea_budget(self, call: ModuleCall, dtype: torch.dtype) -> None:
        features_in, features_out = _features(call)
        d_in, d_out = features_in.numel(), features_out.numel()
        check_dense_budget(
            call,
            (d_in, max(d_in, d_out)),
            dtype,
            "Batch-averaged curvature backpropagation",
            EA_ADVICE,
        )

    def _check_diagonal_budget(self, call: ModuleCall, N: int, dtype: torch.dtype) -> None:
        features_in, features_out = _features(call)
        d_out = features_out.numel()
        check_dense_budget(
            call,
            (d_out, N, max(features_in.numel(), d_out)),
            dtype,
            "Backpropagating a diagonal curvature factor (densified)",
            DIAGONAL_ADVICE,
        )

    @property
    def keeps_diagonal(self) -> bool:
        return self.selection or self.diagonal_jacobian

    def check_budget(self, call: ModuleCall, batch_averaged: bool, diagonal_factors: bool) -> None:
        dtype = call.inputs[0].dtype
        if batch_averaged:
            self._check_ea_budget(call, dtype)
        if diagonal_factors and not self.keeps_diagonal:
            self._check_diagonal_budget(call, call.inputs[0].shape[0], dtype)

    # same J for every sample: mean_n J^T H J = J^T H J, as (J^T (J^T H)^T)^T
    def ea_jac_t_mat_jac_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[D_out, D_out] -> [D_in, D_in]``: ``J^T mat J`` (approximation (9))."""
        self._check_ea_budget(call, mat.dtype)
        features_in, features_out = _features(call)
        d_in, d_out = features_in.numel(), features_out.numel()
        mat_jac = self._jac_t(call, mat.reshape(d_out, *features_out)).reshape(d_out, d_in)
        result = self._jac_t(call, mat_jac.T.reshape(d_in, *features_out)).reshape(d_in, d_in)
        return result.T


class _AutogradLinearMapRules(_LinearMapRules):
    """A map that is the same for every sample: ``jac`` = the module, ``jac_t`` = its adjoint.

    The adjoint is autograd's vector-Jacobian product of the module's forward at
    ``x = 0`` (the map is linear, so every point gives the same ``J^T``).
    """

    def _jac(self, call: ModuleCall, mat: Tensor) -> Tensor:
        return type(call.module).forward(call.module, mat)

    def _jac_t(self, call: ModuleCall, mat: Tensor) -> Tensor:
        features_in = _features(call)[0]
        with torch.enable_grad():
            x = mat.new_zeros(mat.shape[0], *features_in, requires_grad=True)
            out = type(call.module).forward(call.module, x)
            (result,) = torch.autograd.grad(out, x, mat)
        return result


class AvgPoolRules(_AutogradLinearMapRules):
    """``AvgPool1d/2d/3d`` and ``AdaptiveAvgPool1d/2d/3d`` over the last ``d`` axes.

    ``z = A x`` with ``A`` a fixed averaging matrix (every option: padding,
    ``ceil_mode``, ``count_include_pad``, ``divisor_override``, adaptive windows);
    ``Hx = A^T Hz A`` (D.2, "average-pooling ... treated analogously").
    """

    def __init__(self, d: int) -> None:
        self.d = d

    def _mapped_dims(self, module: nn.Module) -> int:
        return self.d

    # local columns: a depthwise convolution with the kernel 1 / prod(k) (D.2)
    def supports_local(self, call: ModuleCall) -> bool:
        m = call.module
        return (
            call.inputs[0].dim() == self.d + 2
            and not isinstance(
                m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
            )
            and not m.ceil_mode
            and getattr(m, "divisor_override", None) is None
            and (m.count_include_pad or not any(_tuple(m.padding, self.d)))
        )

    def local_step(self, call: ModuleCall) -> LocalStep:
        m, x = call.module, call.inputs[0]
        k = _tuple(m.kernel_size, self.d)
        weight = x.new_full((x.shape[1], 1, *k), 1.0 / math.prod(k))
        stride = _tuple(m.stride if m.stride is not None else m.kernel_size, self.d)
        return ConvTransposeStep(
            weight, stride, (1,) * self.d, x.shape[1], _tuple(m.padding, self.d), x.shape[2:]
        )


def _tuple(value, d: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * d


class MaxPoolRules(_LinearMapRules):
    """``MaxPool1d/2d/3d`` and ``AdaptiveMaxPool1d/2d/3d`` over the last ``d`` axes.

    ``z_n = Pi_n x_n`` selects the argmax of every window (D.2: ``Hx = Pi_n^T Hz Pi_n``).
    The indices are recomputed from the recorded input (``return_indices=True``, the
    same kernel as the forward pass, ties included) and cached per call as
    ``[N, C, P_out]`` flat positions into the ``P_in`` pooled positions of each of
    the ``C`` leading feature rows. ``jac_t`` scatter-adds, ``jac`` gathers.
    """

    selection = True

    def __init__(self, d: int) -> None:
        self.d = d

    def _mapped_dims(self, module: nn.Module) -> int:
        return self.d

    def _indices(self, call: ModuleCall) -> Tensor:
        """``[N, C, P_out]`` argmax positions, ``C`` the product of the unpooled feature axes."""
        if "maxpool_idx" not in call.cache:
            module, x = call.module, call.input
            if isinstance(
                module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
            ):
                pool = getattr(F, f"adaptive_max_pool{self.d}d")
                _, idx = pool(x, module.output_size, return_indices=True)
            else:
                pool = getattr(F, f"max_pool{self.d}d")
                _, idx = pool(
                    x,
                    module.kernel_size,
                    module.stride,
                    module.padding,
                    module.dilation,
                    ceil_mode=module.ceil_mode,
                    return_indices=True,
                )
            call.cache["maxpool_idx"] = idx.reshape(x.shape[0], -1, idx.shape[-self.d :].numel())
        return call.cache["maxpool_idx"]

    # local columns: every patch entry moves to its sample's argmax
    def supports_local(self, call: ModuleCall) -> bool:
        adaptive = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
        return call.inputs[0].dim() == self.d + 2 and not isinstance(call.module, adaptive)

    def local_step(self, call: ModuleCall) -> LocalStep:
        m, d = call.module, self.d
        index = self._indices(call).reshape(call.output_shape)
        stride = m.stride if m.stride is not None else m.kernel_size
        return SelectStep(
            index,
            _tuple(m.kernel_size, d),
            _tuple(stride, d),
            _tuple(m.padding, d),
            _tuple(m.dilation, d),
            call.inputs[0].shape[2:],
        )

    def _rows(self, call: ModuleCall) -> tuple[int, int]:
        """``(C, P_in)``: unpooled rows and pooled positions of one sample's input."""
        shape = call.inputs[0].shape
        p_in = shape[-self.d :].numel()
        return shape[1:].numel() // p_in, p_in

    def _jac_t(self, call: ModuleCall, mat: Tensor) -> Tensor:
        idx = self._indices(call)
        N, (C, p_in) = idx.shape[0], self._rows(call)
        mat = mat.reshape(-1, N, C, idx.shape[-1])
        out = mat.new_zeros(mat.shape[0], N, C, p_in)
        out.scatter_add_(3, idx.expand_as(mat), mat)
        return out.reshape(-1, *_features(call)[0])

    def _jac(self, call: ModuleCall, mat: Tensor) -> Tensor:
        idx = self._indices(call)
        N, (C, p_in) = idx.shape[0], self._rows(call)
        mat = mat.reshape(-1, N, C, p_in)
        out = mat.gather(3, idx.expand(mat.shape[0], -1, -1, -1))
        return out.reshape(-1, *_features(call)[1])

    # mean_n Pi_n^T H Pi_n: entry (a, b) of H is added at (pi_n(a), pi_n(b))
    def ea_jac_t_mat_jac_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[D_out, D_out] -> [D_in, D_in]``: ``mean_n Pi_n^T mat Pi_n`` by index additions."""
        self._check_ea_budget(call, mat.dtype)
        idx = self._indices(call)
        N, (C, p_in) = idx.shape[0], self._rows(call)
        d_in = C * p_in
        offsets = torch.arange(C, device=idx.device).unsqueeze(1) * p_in
        positions = (idx + offsets).reshape(N, -1)  # [N, D_out] flat input feature of each output
        result = mat.new_zeros(d_in * d_in)
        flat = mat.reshape(-1)
        for n in range(N):
            pos = positions[n]
            result.index_add_(0, (pos.unsqueeze(1) * d_in + pos).reshape(-1), flat)
        return result.reshape(d_in, d_in) / N


#: pooling module types and their rules
POOLING: dict[type, ModuleRules] = {
    **{cls: MaxPoolRules(d) for d, cls in enumerate((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), 1)},
    **{
        cls: MaxPoolRules(d)
        for d, cls in enumerate(
            (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d), 1
        )
    },
    **{cls: AvgPoolRules(d) for d, cls in enumerate((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), 1)},
    **{
        cls: AvgPoolRules(d)
        for d, cls in enumerate(
            (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d), 1
        )
    },
}
