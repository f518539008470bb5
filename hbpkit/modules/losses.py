"""Rules of the losses: ``MSELoss`` (eq. S.12), ``CrossEntropyLoss`` (section C.2),
``BCEWithLogitsLoss``.

``scale`` is the reduction factor (``1/N`` for a mean over ``N`` samples,
``1/numel`` for the element-wise mean of MSE and BCE, ``1`` for a sum). With
``l_n`` the per-sample loss, every quantity refers to ``L = scale * sum_n l_n``.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from hbpkit.core.calls import ModuleCall
from hbpkit.modules.base import LossRules


def _scale(call: ModuleCall, per_element: bool) -> float:
    x = call.inputs[0]
    if call.module.reduction == "sum":
        return 1.0
    return 1.0 / (x.numel() if per_element else x.shape[0])


def _identity_factor(x: Tensor, value: float) -> Tensor:
    """``S = sqrt(value) I`` per sample: ``[D, N, *features]``."""
    N, D = x.shape[0], x[0].numel()
    eye = torch.eye(D, dtype=x.dtype, device=x.device) * math.sqrt(value)
    S = eye.unsqueeze(1).expand(D, N, D)
    return S.reshape(D, N, *x.shape[1:])


def _diag_factor(diag: Tensor) -> Tensor:
    """``S`` ``[D, N, *features]`` with ``S S^T = diag[diag_n]`` per sample.

    ``diag``: ``[N, *features]``.
    """
    N, D = diag.shape[0], diag[0].numel()
    S = torch.diag_embed(diag.reshape(N, D).sqrt())  # [N, D, D]
    return rearrange(S, "n f v -> v n f").reshape(D, N, *diag.shape[1:])


class MSELossRules(LossRules):
    """``L = scale * sum (x - y)^2``: ``d2L/dx_n dx_n = 2 scale I`` (eq. S.12)."""

    def sqrt_hessian(self, call: ModuleCall) -> Tensor:
        return _identity_factor(call.input, 2 * _scale(call, per_element=True))

    def sqrt_hessian_sampled(self, call: ModuleCall, mc_samples: int) -> Tensor:
        # E[g g^T] = 2 I for g = sqrt(2) eps, eps ~ N(0, I): the Fisher of a Gaussian likelihood
        x = call.input
        noise = torch.randn(mc_samples, *x.shape, dtype=x.dtype, device=x.device)
        return noise * math.sqrt(2 * _scale(call, per_element=True) / mc_samples)

    def sum_hessian(self, call: ModuleCall) -> Tensor:
        x = call.input
        D = x[0].numel()
        value = 2 * _scale(call, per_element=True) * x.shape[0]
        return torch.eye(D, dtype=x.dtype, device=x.device) * value

    def hessian_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        return mat * (2 * _scale(call, per_element=True))


class CrossEntropyLossRules(LossRules):
    """``l_n = -sum_k y_k log softmax(x_n)_k``: ``d2l/dx dx = (sum_k y_k)(diag p - p p^T)`` (C.2).

    Targets are class indices ``[N]`` or class probabilities ``[N, C]``.
    """

    def validate(self, call: ModuleCall) -> None:
        super().validate(call)
        module, x = call.module, call.inputs[0]
        if module.weight is not None:
            raise NotImplementedError("CrossEntropyLoss with class weights is not supported")
        if module.ignore_index != -100:
            raise NotImplementedError("CrossEntropyLoss with ignore_index is not supported")
        if x.dim() != 2:
            raise NotImplementedError(
                f"CrossEntropyLoss needs logits [N, C], got shape {tuple(x.shape)}"
            )

    def _probs_and_mass(self, call: ModuleCall) -> tuple[Tensor, Tensor]:
        """Softmax probabilities ``[N, C]`` and the target mass ``sum_k y_k`` ``[N]``.

        Label smoothing ``eps`` replaces the target by ``(1 - eps) y + eps / C``: the mass
        becomes ``(1 - eps) sum_k y_k + eps`` (1 for class indices), and the Hessian, which
        depends on the target only through its mass, keeps its form (C.2).
        """
        x, target = call.input, call.inputs[1]
        p = torch.softmax(x, dim=1)
        if target.dtype.is_floating_point:
            eps = call.module.label_smoothing
            mass = (1 - eps) * target.detach().sum(1) + eps
        else:
            mass = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        return p, mass * _scale(call, per_element=False)

    def sqrt_hessian(self, call: ModuleCall) -> Tensor:
        """``S`` ``[C - 1, N, C]`` with ``S_n S_n^T = mass_n (diag p_n - p_n p_n^T)`` (C.2).

        ``R = diag(sqrt p) - p sqrt(p)^T`` (``C`` columns) satisfies ``R R^T = diag p -
        p p^T`` because ``sum_k p_k = 1``, and ``R sqrt(p) = 0``: the Hessian has rank
        ``C - 1``. The Householder reflection ``Q = I - 2 u u^T / u^T u`` with ``u =
        sqrt(p) + e_k`` (``k`` the most likely class, so ``u^T u >= 2``) maps ``sqrt(p)`` to
        ``-e_k``, so column ``k`` of ``R Q`` is zero and the other ``C - 1`` columns are a
        factor of the same Hessian: every extension backpropagates one column fewer.
        """
        p, mass = self._probs_and_mass(call)
        N, C = p.shape
        sqrt_p = p.sqrt()
        R = torch.diag_embed(sqrt_p) - p.unsqueeze(2) * sqrt_p.unsqueeze(1)  # [N, C(feature), C(v)]
        R = R * mass.sqrt()[:, None, None]
        if C == 1:  # p = 1: the Hessian is 0, keep one (zero) column
            return rearrange(R, "n c v -> v n c")
        k = p.argmax(1)  # [N]
        u = sqrt_p.clone()
        u[torch.arange(N, device=p.device), k] += 1.0
        # R Q = R - 2 (R u) u^T / u^T u, and R u = R e_k (as R sqrt(p) = 0)
        R_u = R.gather(2, k[:, None, None].expand(N, C, 1))  # [N, C, 1]
        S = R - (2.0 / (u * u).sum(1))[:, None, None] * R_u * u.unsqueeze(1)
        keep = torch.ones(N, C, dtype=torch.bool, device=p.device)
        keep[torch.arange(N, device=p.device), k] = False
        S = S.transpose(1, 2)[keep].reshape(N, C - 1, C)  # drop the zero column k
        return rearrange(S, "n v c -> v n c")

    def sqrt_hessian_sampled(self, call: ModuleCall, mc_samples: int) -> Tensor:
        # g = p - onehot(y~), y~ ~ Categorical(p): E[g g^T] = diag p - p p^T
        p, mass = self._probs_and_mass(call)
        classes = torch.multinomial(p, mc_samples, replacement=True).T  # [M, N]
        onehot = nn.functional.one_hot(classes, p.shape[1]).to(p.dtype)
        return (p - onehot) * (mass / mc_samples).sqrt()[None, :, None]

    def sum_hessian(self, call: ModuleCall) -> Tensor:
        p, mass = self._probs_and_mass(call)
        pw = p * mass[:, None]
        return torch.diag(pw.sum(0)) - pw.T @ p

    def hessian_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``mass_n (diag p_n - p_n p_n^T) m``: ``[K, N, C] -> [K, N, C]``."""
        if "ce_probs" not in call.cache:  # refilled lazily after the pass (products)
            call.cache["ce_probs"] = self._probs_and_mass(call)
        p, mass = call.cache["ce_probs"]
        pm = p * mat
        return (pm - p * pm.sum(-1, keepdim=True)) * mass[:, None]


class BCEWithLogitsLossRules(LossRules):
    """``l = -[y log s(x) + (1-y) log(1-s(x))]``: ``d2l/dx dx = diag[s(x)(1-s(x))]``."""

    def validate(self, call: ModuleCall) -> None:
        super().validate(call)
        module = call.module
        if module.weight is not None or module.pos_weight is not None:
            raise NotImplementedError(
                "BCEWithLogitsLoss with weight or pos_weight is not supported"
            )

    def _curvature(self, call: ModuleCall) -> tuple[Tensor, float]:
        s = torch.sigmoid(call.input)
        return s, _scale(call, per_element=True)

    def sqrt_hessian(self, call: ModuleCall) -> Tensor:
        s, scale = self._curvature(call)
        return _diag_factor(s * (1 - s) * scale)

    def sqrt_hessian_sampled(self, call: ModuleCall, mc_samples: int) -> Tensor:
        # g = s - y~, y~ ~ Bernoulli(s): E[g^2] = s(1-s), independent entries
        s, scale = self._curvature(call)
        draws = torch.bernoulli(s.expand(mc_samples, *s.shape))
        return (s - draws) * math.sqrt(scale / mc_samples)

    def sum_hessian(self, call: ModuleCall) -> Tensor:
        s, scale = self._curvature(call)
        return torch.diag((s * (1 - s)).flatten(1).sum(0) * scale)

    def hessian_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        if "bce_hessian" not in call.cache:
            s, scale = self._curvature(call)
            call.cache["bce_hessian"] = s * (1 - s) * scale
        return mat * call.cache["bce_hessian"]
