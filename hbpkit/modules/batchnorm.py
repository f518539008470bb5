"""Rules of ``BatchNorm1d/2d/3d``: running statistics (eval) and batch statistics (train).

**Eval mode** (running statistics ``mu``, ``var``): an affine map per channel,
``z = c * x + b`` with ``c = gamma / sqrt(var + eps)``: a diagonal Jacobian, no residual.

**Train mode** (batch statistics, or no running statistics): per channel, the
``M = N * prod(spatial)`` entries of the whole batch form one group, normalized like one
group of a ``LayerNorm`` (``hbpkit/modules/normalization.py``): with ``s = sqrt(var_B +
eps)`` and ``xh = (x - mu_B) / s``, ``z = gamma * xh + beta`` and

* ``dxh/dx = (I - 1 1^T / M - xh xh^T / M) / s`` (symmetric, ``[M, M]`` per channel), so
  every output depends on every sample's input. ``jac_t_mat_prod`` / ``jac_mat_prod`` take
  ``[K, N, *in]`` as ``K`` vectors over the whole batch: the batch Jacobian, which is what
  the curvature-matrix products (GGNMP, HMP, PCHMP) apply;
* ``J^T`` of a per-sample sqrt-factor column ``S[v, n]`` (a vector on sample ``n``) is a
  vector over every sample: :meth:`BatchNormRules.jac_t_factor` returns a
  :class:`~hbpkit.curvature.factors.CoupledFactor` ``[V N, N, *in]``; with ``g = gamma
  S[v, n]``, ``a = sum(g) / M``, ``b = sum(g * xh_n) / M`` (per channel), its part on sample
  ``m`` is ``(delta_{mn} g - a - xh_m b) / s``. A coupled factor stays coupled (``J^T`` of
  each column);
* the residual ``R = sum_{n,k} d2z_{n,k}/dx2 dz_{n,k}`` (eq. 7) is the ``LayerNorm`` group
  residual per channel, ``[M, M]`` over the batch, ``g = gamma * dz``, ``u = g - mean(g)``,
  ``a = mean(g * xh)``: ``R = (-u xh^T - xh u^T + 3 a xh xh^T - a M I + a 1 1^T) / (M s^2)``;
  applied without forming it (HMP), eigendecomposed for PCH and for sqrt factors (one
  coupled column per channel and eigenvector, DiagHessian).

``gamma`` and ``beta`` enter linearly as in eval mode (``J_gamma v = v * xh``), ``xh``
from the batch statistics. The running statistics are updated by PyTorch's forward pass
only; the rules read the recorded input and never call the module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from einops import einsum
from torch import Tensor, nn

from hbpkit.core.calls import ModuleCall, describe
from hbpkit.curvature.factors import (
    CoupledFactor,
    Factor,
    SqrtFactor,
    modify_eigenvalues,
)
from hbpkit.curvature.memory import check_dense_budget
from hbpkit.modules.normalization import AffineParamRules


class BatchNormCapture(NamedTuple):
    """What the forward pass used: batch statistics or (a copy of) the running ones."""

    batch_statistics: bool
    mean: Tensor | None
    var: Tensor | None


#: why a batch-averaged extension refuses a train-mode BatchNorm
TRAIN_MODE_REASON = (
    "in train mode (or without running statistics) it normalizes with the statistics of "
    "the batch, so every sample's output depends on every sample's input"
)

#: what to do where the coupled curvature does not fit the memory budget
COUPLED_ADVICE = (
    "in train mode it normalizes with the batch statistics, so below it every gradient "
    "and curvature column spans the whole batch (N times the columns of per-sample "
    "ones); call model.eval() to use the running statistics, use a smaller batch"
)


class BatchNormRules(AffineParamRules):
    """``nn.BatchNorm1d/2d/3d``: eval mode ``z = c * x + b`` per channel (diagonal Jacobian),
    train mode the batch map of the module docstring."""

    diagonal_jacobian = True  # eval mode; train mode overrides jac_t_factor
    support_note = (
        "eval mode: affine per channel; train mode: exact through the batch statistics "
        "(coupled columns, docs/user-guide.md), KFRA refused; Kronecker: one dense factor "
        "for gamma / beta"
    )

    def capture(self, module: nn.Module, inputs: tuple, output: Tensor) -> BatchNormCapture:
        batch = module.training or module.running_mean is None or module.running_var is None
        if batch:
            return BatchNormCapture(True, None, None)
        return BatchNormCapture(False, module.running_mean.clone(), module.running_var.clone())

    def validate(self, call: ModuleCall) -> None:
        x = call.inputs[0]
        if x.dim() < 2:
            raise NotImplementedError(
                f"{describe(call.module)} needs an input [N, C, *], got shape {tuple(x.shape)}"
            )

    def couples_samples(self, call: ModuleCall) -> bool:
        """Whether ``call`` normalized with the batch statistics (train mode)."""
        return call.captured.batch_statistics

    # statistics -----------------------------------------------------------------------
    def _reduce_dims(self, call: ModuleCall, t: Tensor) -> list[int]:
        """The dimensions of ``[*, N, C, *spatial]`` a channel's statistics reduce over."""
        lead = t.dim() - len(call.output_shape)
        return [lead] + list(range(lead + 2, t.dim()))

    def _batch_statistics(self, call: ModuleCall) -> tuple[Tensor, Tensor]:
        x = call.input
        dims = self._reduce_dims(call, x)
        return x.mean(dims), x.var(dims, unbiased=False)

    def _mean_var(self, call: ModuleCall) -> tuple[Tensor, Tensor]:
        cap = call.captured
        if not cap.batch_statistics:
            return cap.mean, cap.var
        if "bn_batch_stats" not in call.cache:
            call.cache["bn_batch_stats"] = self._batch_statistics(call)
        return call.cache["bn_batch_stats"]

    def _channel(self, call: ModuleCall, c: Tensor) -> Tensor:
        """``[C] -> [C, 1, ...]`` against ``[N, C, *spatial]``."""
        return c.reshape(-1, *([1] * (len(call.output_shape) - 2)))

    def xh(self, call: ModuleCall) -> Tensor:
        if "bn_xh" not in call.cache:
            mean, var = self._mean_var(call)
            inv = self._channel(call, (var + call.module.eps).rsqrt())
            call.cache["bn_xh"] = (call.input - self._channel(call, mean)) * inv
        return call.cache["bn_xh"]

    def _std(self, call: ModuleCall) -> Tensor:
        """``s = sqrt(var + eps)`` as ``[C, 1, ...]``."""
        return self._channel(call, (self._mean_var(call)[1] + call.module.eps).sqrt())

    def _gamma(self, call: ModuleCall) -> Tensor | None:
        w = call.module.weight
        return None if w is None else self._channel(call, w.detach())

    def _group_size(self, call: ModuleCall) -> int:
        """``M = N * prod(spatial)``: the entries of one channel over the batch."""
        shape = call.output_shape
        return shape[0] * math.prod(shape[2:])

    # eval mode ------------------------------------------------------------------------
    def _scale(self, call: ModuleCall) -> Tensor:
        """``c = gamma / sqrt(var + eps)`` as ``[C, 1, ...]`` (eval mode)."""
        module = call.module
        c = (call.captured.var + module.eps).rsqrt()
        if module.weight is not None:
            c = c * module.weight.detach()
        return self._channel(call, c)

    # input derivatives ----------------------------------------------------------------
    def _normalization_jac(self, call: ModuleCall, m: Tensor) -> Tensor:
        """``dxh/dx m`` for ``K`` vectors over the batch ``[K, N, *in]`` (symmetric)."""
        xh = self.xh(call)
        dims = self._reduce_dims(call, m)
        proj = (m * xh).mean(dims, keepdim=True)
        return (m - m.mean(dims, keepdim=True) - xh * proj) / self._std(call)

    def jac_t_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """Eval: ``c * m`` per sample; train: ``J^T`` of the batch map on ``[K, N, *out]``."""
        if not self.couples_samples(call):
            return mat * self._scale(call)
        gamma = self._gamma(call)
        return self._normalization_jac(call, mat if gamma is None else mat * gamma)

    def jac_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """Eval: ``c * m`` per sample; train: ``J`` of the batch map on ``[K, N, *in]``."""
        if not self.couples_samples(call):
            return mat * self._scale(call)
        out = self._normalization_jac(call, mat)
        gamma = self._gamma(call)
        return out if gamma is None else out * gamma

    def jac_t_factor(self, call: ModuleCall, factor: Factor) -> Factor:
        """Eval: per sample. Train: a :class:`CoupledFactor` (module docstring)."""
        if not self.couples_samples(call):
            return super().jac_t_factor(call, factor)
        if isinstance(factor, CoupledFactor):
            return CoupledFactor(self.jac_t_mat_prod(call, factor.S), factor.sign)
        if not isinstance(factor, SqrtFactor):
            factor = factor.dense() if hasattr(factor, "dense") else factor.to_dense(call)
        S = factor.S  # [V, N, C, *spatial], column (v, n) on sample n
        gamma = self._gamma(call)
        g = S if gamma is None else S * gamma
        xh, s, M = self.xh(call), self._std(call), self._group_size(call)
        a = _spatial_sum(g) / M  # [V, N, C, 1...]
        b = _spatial_sum(g * xh) / M
        out = -(a.unsqueeze(2) + xh * b.unsqueeze(2))  # [V, N (column), N (sample), C, ...]
        index = torch.arange(S.shape[1], device=S.device)
        out[:, index, index] += g
        V, N = S.shape[:2]
        sign = factor.sign
        if sign is not None:  # column (v, n): the sign of S[v, n], the same on every sample
            sign = sign.reshape(V * N, 1).expand(V * N, N)
        return CoupledFactor((out / s).reshape(V * N, *S.shape[1:]), sign)

    def ea_jac_t_mat_jac_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``mean_n diag[c] H diag[c] = H * c c^T`` (eval mode; train mode has no per-sample
        Jacobian to average: refused before the pass, ``engine/plan.py``)."""
        if self.couples_samples(call):
            raise _no_batch_average(call)
        c = self._scale(call).expand(call.output_shape[1:]).reshape(-1)
        return mat * torch.outer(c, c)

    # the residual of eq. 7 (train mode) -------------------------------------------------
    def _groups(self, call: ModuleCall, t: Tensor) -> Tensor:
        """``[*, N, C, *spatial] -> [*, C, M]``: each channel's entries over the batch."""
        lead = t.dim() - len(call.output_shape)
        return t.transpose(lead, lead + 1).reshape(*t.shape[:lead], t.shape[lead + 1], -1)

    def _ungroup(self, call: ModuleCall, t: Tensor) -> Tensor:
        """``[*, C, M] -> [*, N, C, *spatial]``."""
        shape = call.output_shape
        lead = t.shape[:-2]
        out = t.reshape(*lead, shape[1], shape[0], *shape[2:])
        return out.transpose(len(lead), len(lead) + 1)

    def _residual_parts(self, call: ModuleCall, grad_output: Tensor) -> tuple[Tensor, ...]:
        """Per channel ``[C, M]`` / ``[C, 1]``: ``xh``, ``u = g - mean(g)``, ``a = mean(g xh)``
        and ``M s^2``, with ``g = gamma * dz``."""
        gamma = self._gamma(call)
        g = self._groups(call, grad_output if gamma is None else grad_output * gamma)
        xh = self._groups(call, self.xh(call))
        s2 = (self._mean_var(call)[1] + call.module.eps).unsqueeze(-1)
        u = g - g.mean(-1, keepdim=True)
        a = (g * xh).mean(-1, keepdim=True)
        return xh, u, a, xh.shape[-1] * s2

    def residual_matrices(self, call: ModuleCall, grad_output: Tensor) -> Tensor:
        """The residual per channel over the batch, ``[C, M, M]`` (module docstring)."""
        key = ("bn_residual",)
        if key not in call.cache:
            xh, u, a, scale = self._residual_parts(call, grad_output)
            M = xh.shape[-1]
            outer = einsum(u, xh, "c i, c j -> c i j")
            R = -outer - outer.mT + 3 * a[..., None] * einsum(xh, xh, "c i, c j -> c i j")
            eye = torch.eye(M, dtype=xh.dtype, device=xh.device)
            call.cache[key] = (R + a[..., None] * (1 - M * eye)) / scale[..., None]
        return call.cache[key]

    def _eigen(self, call: ModuleCall, grad_output: Tensor, curvature: str):
        key = ("bn_residual_eigh",)
        if key not in call.cache:
            call.cache[key] = torch.linalg.eigh(self.residual_matrices(call, grad_output))
        values, vectors = call.cache[key]
        return modify_eigenvalues(values, curvature), vectors

    def residual_diag(self, call: ModuleCall, grad_output: Tensor) -> Tensor | None:
        if not self.couples_samples(call):
            return None
        raise NotImplementedError(
            f"the second derivative of {describe(call.module)} in train mode couples the "
            "samples; the messages call residual_factor / residual_mat_prod"
        )

    def residual_factor(
        self, call: ModuleCall, grad_output: Tensor, curvature: str
    ) -> Factor | None:
        """Train mode: ``sum_k sign(l_k) (sqrt|l_k| q_k)(...)^T`` per channel, one coupled
        column per channel and eigenvector, ``[C M, N, *in]``; eval mode: none."""
        if curvature == "ggn" or not self.couples_samples(call):
            return None
        values, vectors = self._eigen(call, grad_output, curvature)
        C, M = values.shape
        cols = vectors * values.abs().sqrt()[:, None, :]  # [C, M (entry), M (eigenvector)]
        eye = torch.eye(C, dtype=cols.dtype, device=cols.device)
        grouped = einsum(cols, eye, "c i k, c d -> c k d i").reshape(C * M, C, M)
        S = self._ungroup(call, grouped)
        sign = torch.sign(values).reshape(C * M, 1).expand(C * M, call.output_shape[0])
        return CoupledFactor(S, None if bool((sign >= 0).all()) else sign)

    def residual_sum(self, call: ModuleCall, grad_output: Tensor, curvature: str) -> Tensor | None:
        """Eval mode: none. Train mode: refused before the pass (batch-averaged)."""
        if curvature == "ggn" or not self.couples_samples(call):
            return None
        raise _no_batch_average(call)

    def residual_mat_prod(
        self, call: ModuleCall, grad_output: Tensor, curvature: str
    ) -> Callable[[Tensor], Tensor] | None:
        """Train mode: ``m [K, N, *in] -> R m`` over the batch; eval mode: ``None``."""
        if curvature == "ggn" or not self.couples_samples(call):
            return None
        if curvature == "hessian":
            return _BatchResidualProduct(self, call, *self._residual_parts(call, grad_output))
        values, vectors = self._eigen(call, grad_output, curvature)
        if not bool(values.any()):
            return None
        R = einsum(vectors * values[:, None, :], vectors, "c i k, c j k -> c i j")
        return _DenseBatchResidualProduct(self, call, R)

    def check_residual_budget(self, call: ModuleCall, messages: list) -> None:
        """Train mode: the dense residual ``[C, M, M]`` (sqrt factors, PCH products) and its
        coupled columns ``[C M, N, *in]`` (sqrt factors)."""
        if not self.couples_samples(call):
            return
        x = call.inputs[0]
        C, M = x.shape[1], self._group_size(call)
        for key in messages:
            curvature = getattr(key, "curvature", "ggn")
            if curvature == "ggn" or (curvature == "hessian" and not _sqrt(key)):
                continue
            advice = f"{describe(call.module)}: {COUPLED_ADVICE}"
            check_dense_budget(call, (C, M, M), x.dtype, "The batch residual of eq. 7", advice)
            if _sqrt(key):
                check_dense_budget(call, (C * M, *x.shape), x.dtype, "Its coupled columns", advice)


def _no_batch_average(call: ModuleCall) -> NotImplementedError:
    """Batch-averaged curvature through batch statistics (refused before the pass too)."""
    return NotImplementedError(
        f"{describe(call.module)} {TRAIN_MODE_REASON}: batch-averaged curvature (KFRA, HBP "
        "with backprop='batch-average') has no per-sample Jacobian to average through it"
    )


def _spatial_sum(t: Tensor) -> Tensor:
    """``[V, N, C, *spatial]`` summed over ``spatial`` (kept as size 1)."""
    return t.sum(tuple(range(3, t.dim())), keepdim=True) if t.dim() > 3 else t


def _sqrt(message: object) -> bool:
    """Whether ``message`` carries sqrt factors (it has a loss-Hessian option and is not
    batch-averaged)."""
    return hasattr(message, "loss_hessian") and not getattr(message, "batch_averaged", False)


class _BatchResidualProduct:
    """``m -> R m`` over the batch, per channel, without forming ``R`` (the Hessian's)."""

    __slots__ = ("rules", "call", "xh", "u", "a", "scale")

    def __init__(self, rules: BatchNormRules, call: ModuleCall, xh, u, a, scale) -> None:
        self.rules, self.call = rules, call
        self.xh, self.u, self.a, self.scale = xh, u, a, scale

    def __call__(self, mat: Tensor) -> Tensor:
        m = self.rules._groups(self.call, mat)  # [K, C, M]
        xh, u, a = self.xh, self.u, self.a
        M = xh.shape[-1]
        xm, um = (xh * m).sum(-1, keepdim=True), (u * m).sum(-1, keepdim=True)
        out = -u * xm - xh * um + 3 * a * xh * xm - a * M * m + a * m.sum(-1, keepdim=True)
        return self.rules._ungroup(self.call, out / self.scale)

    __mul__ = __call__  # ``residual * m``, as code written for residual tensors applies it


class _DenseBatchResidualProduct:
    """``m -> R m`` with the dense modified residual ``R`` ``[C, M, M]`` (PCH)."""

    __slots__ = ("rules", "call", "R")

    def __init__(self, rules: BatchNormRules, call: ModuleCall, R: Tensor) -> None:
        self.rules, self.call, self.R = rules, call, R

    def __call__(self, mat: Tensor) -> Tensor:
        m = self.rules._groups(self.call, mat)
        return self.rules._ungroup(self.call, einsum(self.R, m, "c i j, k c j -> k c i"))

    __mul__ = __call__


#: the batch normalization layers and their rules
BATCHNORM: dict[type, BatchNormRules] = {
    cls: BatchNormRules() for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
}
