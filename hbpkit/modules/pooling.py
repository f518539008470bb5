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
exceed the ``max_dense_bytes`` of the pass's ``MemoryPolicy``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn

from hbpkit.core.calls import ModuleCall, describe
from hbpkit.curvature import workspace
from hbpkit.curvature.blocks import PositionBlocks
from hbpkit.curvature.factors import Jacobian
from hbpkit.curvature.local import ConvTransposeStep, LocalStep, SelectStep
from hbpkit.curvature.memory import DIAGONAL_ADVICE, EA_ADVICE, check_dense_budget, policy_of
from hbpkit.modules.base import ModuleRules


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
                f"{describe(call.module)} maps all axes of its input of shape "
                f"{tuple(x.shape)}, the batch axis included; hbpkit needs a batched input "
                "[N, *features]"
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
    def transposed_jacobian(self, call: ModuleCall) -> Jacobian:
        """``Pi^T``: a :class:`DiagonalFactor` stays diagonal for selections."""
        structure = "selection" if self.selection else "general"
        check = partial(self._check_diagonal_budget, call)
        return Jacobian(partial(self.jac_t_mat_prod, call), structure, check)

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

    def capture(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        """The argmax indices autograd saved in the forward pass, ``None`` where it saved
        none of the output's shape (``MaxPool1d`` squeezes a 2d pool): then
        :meth:`_indices` recomputes them."""
        idx = getattr(output.grad_fn, "_saved_result1", None)  # MaxPool{2,3}DWithIndicesBackward0
        if isinstance(idx, Tensor) and idx.shape == output.shape and idx.dtype == torch.int64:
            return idx
        return None

    def _indices(self, call: ModuleCall) -> Tensor:
        """``[N, C, P_out]`` argmax positions, ``C`` the product of the unpooled feature axes."""
        if "maxpool_idx" not in call.cache:
            module, x = call.module, call.input
            if isinstance(call.captured, Tensor):
                idx = call.captured
            elif isinstance(
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
        out = workspace.empty((mat.shape[0], N, C, p_in), mat).zero_()  # reused where it can
        out.scatter_add_(3, idx.expand_as(mat), mat)
        return out.reshape(-1, *_features(call)[0])

    def _jac(self, call: ModuleCall, mat: Tensor) -> Tensor:
        idx = self._indices(call)
        N, (C, p_in) = idx.shape[0], self._rows(call)
        mat = mat.reshape(-1, N, C, p_in)
        out = mat.gather(3, idx.expand(mat.shape[0], -1, -1, -1))
        return out.reshape(-1, *_features(call)[1])

    # mean_n Pi_n^T H Pi_n, sorted by the window entries t, t' that the argmaxes pick
    def ea_jac_t_mat_jac_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[D_out, D_out] -> [D_in, D_in]``: ``mean_n Pi_n^T mat Pi_n`` (D.2, approximation (9)).

        With ``m^t_n`` ``[D_out]`` the indicator that output ``(c, q)`` picks entry ``t`` of
        its window, ``Pi_n = sum_t S_t diag(m^t_n)`` for the fixed placements ``S_t``, so
        ``mean_n Pi_n^T H Pi_n = sum_{t, t'} S_t (H * mean_n m^t_n m^t'_n^T) S_t'^T``: one
        ``[D_out, N] @ [N, D_out]`` product per pair of window entries, placed by strided
        views (no per-sample scatter). Windows with many entries (``K^2`` pairs) go
        sample by sample instead.
        """
        self._check_ea_budget(call, mat.dtype)
        module = call.module
        if isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
            return self._ea_by_samples(call, mat)
        idx = self._indices(call)  # [N, C, P_out]
        N, C, P_out = idx.shape
        window = self._window_positions(call)  # [P_out, K]
        picks = (idx.unsqueeze(-1) == window).to(mat.dtype)  # [N, C, P_out, K]
        masks = rearrange(picks, "n c q k -> k n (c q)")
        axes = self._axes(call)
        ins, outs = [a[0] for a in axes], [a[1] for a in axes]
        H = mat.reshape(C, *outs, C, *outs)
        result = mat.new_zeros(C, *ins, C, *ins)
        # window entries no argmax picks add nothing; skipped where that costs no device read
        K = window.shape[1]
        used = [t for t in range(K) if mat.device.type != "cpu" or bool(masks[t].any())]
        if len(used) ** 2 * (N + 3) > policy_of(call).scatter_cost * N:
            return self._ea_by_samples(call, mat)
        places = [self._placement(axes, t) for t in range(window.shape[1])]
        for t in used:
            q_t, x_t = places[t]
            for t2 in used:
                q_t2, x_t2 = places[t2]
                M = (masks[t].T @ masks[t2]).reshape(H.shape) / N
                picked = (H * M)[(slice(None), *q_t, slice(None), *q_t2)]
                result[(slice(None), *x_t, slice(None), *x_t2)] += picked
        D_in = C * math.prod(ins)
        return result.reshape(D_in, D_in)

    def _placement(self, axes, t: int) -> tuple[list[slice], list[slice]]:
        """Per pooled axis, the outputs ``q`` whose window entry ``t`` is inside the input
        and the input positions ``q * stride - padding + t_axis * dilation`` they pick."""
        q_slices, x_slices = [], []
        for n_in, n_out, k, s, pad, dil in reversed(axes):
            t, t_axis = divmod(t, k)
            offset = t_axis * dil - pad  # input position of q = 0
            q_lo = 0
            while q_lo * s + offset < 0:
                q_lo += 1
            q_hi = n_out
            while q_hi > q_lo and (q_hi - 1) * s + offset >= n_in:
                q_hi -= 1
            q_slices.append(slice(q_lo, q_hi))
            start = q_lo * s + offset
            x_slices.append(
                slice(start, start + (q_hi - q_lo - 1) * s + 1 if q_hi > q_lo else start, s)
            )
        return q_slices[::-1], x_slices[::-1]

    def _ea_by_samples(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``mean_n Pi_n^T mat Pi_n`` by index additions, one sample at a time."""
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

    # position blocks of mean_n Pi_n^T H Pi_n (curvature/blocks.py)
    def check_blocks(self, call: ModuleCall, from_blocks: bool) -> None:
        """Exact from a dense ``H`` for ``MaxPool1d/2d/3d`` on ``[N, C, *spatial]``."""
        module = call.module
        adaptive = isinstance(
            module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
        )
        if from_blocks or adaptive or call.inputs[0].dim() != self.d + 2:
            super().check_blocks(call, from_blocks)

    def ea_blocks(self, call: ModuleCall, mat: Tensor | PositionBlocks) -> PositionBlocks:
        """Position blocks ``[P_in, C, C]`` of ``mean_n Pi_n^T H Pi_n`` for a dense ``H`` (D.2).

        ``B_p[c, c'] = mean_n sum_{q, q'} [pi_n(c, q) = p] [pi_n(c', q') = p] H[(c, q), (c', q')]``:
        only pairs of windows ``q, q' = q + delta`` that overlap contribute. With
        ``p`` the ``t``-th entry of window ``q`` and the ``t'``-th of ``q'``, the sample
        average is a product of one-hot argmax tables, ``[C, N] @ [N, C]`` per
        ``(q, delta, t)``, which multiplies the gathered ``C x C`` block of ``H``.
        """
        idx = self._indices(call)  # [N, C, P_out]
        N, C, P_out = idx.shape
        q, q2, t, t2, p = self._overlaps(call)
        window = self._window_positions(call)  # [P_out, K] flat input position, -1 outside
        onehot = (idx.unsqueeze(-1) == window).to(mat.dtype)  # [N, C, P_out, K]
        H = mat.reshape(C, P_out, C, P_out)
        P_in = math.prod(call.inputs[0].shape[2:])
        blocks = mat.new_zeros(P_in, C, C)
        chunk = max(1, 2**27 // (max(N, C) * C * mat.element_size()))
        for start in range(0, len(q), chunk):
            sl = slice(start, start + chunk)
            first = onehot[:, :, q[sl], t[sl]]  # [N, C, M]
            second = onehot[:, :, q2[sl], t2[sl]]
            pair = einsum(first, second, "n c m, n e m -> m c e")
            blocks.index_add_(0, p[sl], H[:, q[sl], :, q2[sl]] * pair)  # H[...]: [M, C, C]
        return PositionBlocks(blocks / N, tuple(call.inputs[0].shape[2:]))

    def _axes(self, call: ModuleCall) -> list[tuple[int, int, int, int, int, int]]:
        """Per pooled axis ``(in, out, kernel, stride, padding, dilation)``."""
        m = call.module

        def per_axis(v):
            return tuple(v) if isinstance(v, (tuple, list)) else (v,) * self.d

        ins, outs = call.inputs[0].shape[-self.d :], call.output_shape[-self.d :]
        return list(
            zip(
                ins,
                outs,
                per_axis(m.kernel_size),
                per_axis(m.stride if m.stride is not None else m.kernel_size),
                per_axis(m.padding),
                per_axis(m.dilation),
            )
        )

    def _window_positions(self, call: ModuleCall) -> Tensor:
        """``[P_out, K]``: flat input position of entry ``t`` of window ``q`` (``-1`` outside)."""
        pos, inside = torch.zeros((), dtype=torch.long), torch.ones((), dtype=torch.bool)
        axes = self._axes(call)
        d = len(axes)
        for i, (n_in, n_out, k, s, pad, dil) in enumerate(axes):
            x = torch.arange(n_out).unsqueeze(1) * s - pad + torch.arange(k).unsqueeze(0) * dil
            view = [1] * (2 * d)
            view[i], view[d + i] = n_out, k
            pos = pos * n_in + x.reshape(view)
            inside = inside & ((x >= 0) & (x < n_in)).reshape(view)
        P_out, K = math.prod(a[1] for a in axes), math.prod(a[2] for a in axes)
        pos = torch.where(inside, pos, -1).reshape(P_out, K)
        return pos.to(call.inputs[0].device)

    def _overlaps(self, call: ModuleCall) -> tuple[Tensor, ...]:
        """``(q, q', t, t', p)`` over all pairs of windows sharing input position ``p``.

        ``p`` is entry ``t`` of window ``q`` and entry ``t'`` of window ``q'`` (flat indices).
        """
        axes = self._axes(call)
        per_axis = []
        for n_in, n_out, k, s, pad, dil in axes:
            q = torch.arange(n_out).reshape(-1, 1, 1)
            q2 = torch.arange(n_out).reshape(1, -1, 1)
            t = torch.arange(k).reshape(1, 1, -1)
            x = q * s - pad + t * dil  # the input position
            num = x - (q2 * s - pad)
            t2 = torch.div(num, dil, rounding_mode="floor")
            ok = (num % dil == 0) & (t2 >= 0) & (t2 < k) & (x >= 0) & (x < n_in)
            q, q2, t = (a.expand_as(ok)[ok] for a in (q, q2, t))
            per_axis.append((q, q2, t, t2[ok], x.expand_as(ok)[ok]))
        # combine the axes: every combination of per-axis overlaps, row-major flat indices
        combo = [torch.zeros(1, dtype=torch.long) for _ in range(5)]
        for (n_in, n_out, k, *_), parts in zip(axes, per_axis):
            sizes = (n_out, n_out, k, k, n_in)
            combo = [
                (c.unsqueeze(1) * size + a.unsqueeze(0)).flatten()
                for c, a, size in zip(combo, parts, sizes)
            ]
        device = call.inputs[0].device
        return tuple(c.to(device) for c in combo)


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
