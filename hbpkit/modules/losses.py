"""Rules of the losses: ``MSELoss`` (eq. S.12), ``CrossEntropyLoss`` (section C.2),
``BCEWithLogitsLoss``, on any ``[N, *]`` input, and :class:`hbpkit.reshaping.ReducedLoss`.

Every loss here is a weighted sum of *terms*, ``L = sum_i c_i l_i(x)``, over the entries
``i`` of the unreduced loss (``reduction="none"``): one per element for MSE and BCE, one
per position ``(n, d_1, ...)`` for cross-entropy. ``c_i`` is the reduction (``1/numel``
for an element-wise mean, ``1 / sum_i w_{y_i}`` for cross-entropy's weighted mean over
non-ignored targets, ``1`` for a sum), times the weights of :class:`ReducedLossRules`.
A term depends on one sample's input only, so the Hessian of ``L`` w.r.t. the input is
block-diagonal over samples (and, per sample, over the positions of cross-entropy): the
rules factorise each term's Hessian on its own.

Negative ``c_i`` (weights of a :class:`~hbpkit.reshaping.ReducedLoss`) give signed
factors, :class:`~hbpkit.curvature.factors.SqrtFactor` with ``sign``
(``signed_sqrt_hessian``, ``signed_sqrt_hessian_sampled``); ``sqrt_hessian`` and
``sqrt_hessian_sampled`` return the unsigned ``S`` and refuse signed curvature.

Monte-Carlo factors are marked (:func:`mark_independent_rows`): their rows (samples
``n``) are independent draws with mean zero, which a batch-merging reshape may exploit
(``hbpkit/modules/batch_reshape.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from hbpkit.core.calls import ModuleCall
from hbpkit.curvature.factors import DiagonalFactor, SqrtFactor
from hbpkit.curvature.memory import check_dense_budget
from hbpkit.modules.base import LossRules

#: attribute of a Monte-Carlo factor tensor ``[M, N, *]``: rows ``n`` independent, mean zero
INDEPENDENT_ROWS = "_hbpkit_independent_rows"


DENSE_CE_ADVICE = (
    "Its (C - 1) P columns are zero except at one position each; a Monte-Carlo extension "
    "(KFAC, DiagGGNMC) needs mc_samples columns, the products (GGNMP, HMP) none"
)


def mark_independent_rows(S: Tensor) -> Tensor:
    """Mark ``S`` ``[M, N, *]`` as a Monte-Carlo factor whose rows ``S[:, n]`` are
    independent across ``n`` with ``E[S[m, n]] = 0``; returns ``S``."""
    setattr(S, INDEPENDENT_ROWS, True)
    return S


def keep_marks(source: Tensor, S: Tensor) -> Tensor:
    """``S`` (computed from ``source``, e.g. scaled) marked as ``source`` is."""
    return mark_independent_rows(S) if has_independent_rows(source) else S


def has_independent_rows(S: Tensor) -> bool:
    """Whether ``S`` was marked by :func:`mark_independent_rows` (a new tensor is not)."""
    return getattr(S, INDEPENDENT_ROWS, False) is True


class Terms(NamedTuple):
    """The terms ``L = sum_i c_i l_i(x)`` of a loss call.

    Attributes:
        module: the loss module whose options define ``l_i`` (the inner loss of a
            ``ReducedLoss``).
        x: the input, detached, ``[N, *]``.
        target: the target, detached.
        coeff: ``c_i``, a number or a tensor broadcastable to the unreduced loss.
        call: the loss call (its memory policy bounds the dense factors), or ``None``.
        nonnegative: whether a tensor ``coeff`` is ``>= 0`` by construction (a mean's
            ``1 / count``), so its sign need not be read back from the device.
    """

    module: nn.Module
    x: Tensor
    target: Tensor
    coeff: Tensor | float
    call: ModuleCall | None = None
    nonnegative: bool = False


def _reduction_coeff(call: ModuleCall) -> float:
    """``1/numel`` for an element-wise ``mean``, ``1`` for ``sum``."""
    return 1.0 if call.module.reduction == "sum" else 1.0 / call.inputs[0].numel()


def _scale(call: ModuleCall, per_element: bool) -> float:
    """The loss's reduction factor ``c`` as one number: ``1/numel`` or ``1`` per element
    (MSE, BCE); for cross-entropy the coefficient of its unweighted terms
    (:meth:`CrossEntropyLossRules.terms`: ``1 / sum_i w_{y_i}`` over non-ignored targets)."""
    if per_element:
        return _reduction_coeff(call)
    return float(CrossEntropyLossRules().terms(call).coeff)


def _unsigned(factor: SqrtFactor, what: str) -> Tensor:
    if factor.sign is not None:
        raise NotImplementedError(
            f"the loss has negative term weights, so its {what} is a signed factor: the "
            "extensions that start from unsigned sqrt factors cannot take it (products, "
            "GGNMP / HMP, and the batch-summed sum_hessian (KFRA) can)"
        )
    return factor.S


def signed_sampled(draws: Tensor, h: Tensor, maybe_negative: bool = True) -> SqrtFactor:
    """Monte-Carlo factor of ``diag`` / block curvature scaled by ``h`` (signed allowed).

    ``draws`` ``[M, N, *]``: draws with ``E[sum_m d d^T] = M * (unit curvature)``;
    ``h``: the non-negative or signed scale per entry, broadcastable to ``draws[0]``.
    With negative entries the columns are split into a positive and a negative half
    (``2M`` columns, signs ``+1`` / ``-1``), each scaled by ``sqrt(|h| / M)``.
    ``maybe_negative=False``: ``h >= 0`` by construction (:meth:`TermRules.maybe_negative`),
    so ``h`` is not read back from its device to check.
    """
    M = draws.shape[0]
    if not maybe_negative or not bool((h < 0).any()):
        return SqrtFactor(mark_independent_rows(draws * (h / M).sqrt()))
    pos, neg = (h.clamp(min=0) / M).sqrt(), ((-h).clamp(min=0) / M).sqrt()
    S = torch.cat([draws * pos, draws * neg])
    N = draws.shape[1]
    sign = torch.ones(2 * M, N, dtype=draws.dtype, device=draws.device)
    sign[M:] = -1
    return SqrtFactor(mark_independent_rows(S), sign)


class TermRules(LossRules):
    """Loss rules built on :class:`Terms`: subclasses give the curvature of the terms.

    Subclasses implement :meth:`terms_factor` (exact, signed), :meth:`terms_sampled`,
    :meth:`terms_sum_hessian` and :meth:`terms_product`; :meth:`terms` reads the call.
    """

    def terms(self, call: ModuleCall) -> Terms:
        """The terms of ``call`` with the module's own reduction."""
        return Terms(call.module, call.input, call.inputs[1].detach(), _reduction_coeff(call))

    def maybe_negative(self, terms: Terms) -> bool:
        """Whether the terms' curvature scale may be negative: only with a tensor or negative
        coefficient or a tensor option of the module (``weight``, ``pos_weight``). Decided from
        the structure, so the usual case reads nothing back from the device."""
        coeff = terms.coeff
        if isinstance(coeff, (int, float)):
            negative_coeff = coeff < 0
        else:
            negative_coeff = not terms.nonnegative
        return negative_coeff or any(
            getattr(terms.module, a, None) is not None for a in ("weight", "pos_weight")
        )

    def validate_options(self, module: nn.Module, x: Tensor, target: Tensor) -> None:
        """Refuse options or shapes of ``module`` the rules do not cover (default: none)."""

    def validate(self, call: ModuleCall) -> None:
        super().validate(call)
        self.validate_options(call.module, call.inputs[0], call.inputs[1])

    # the curvature of terms
    def terms_factor(self, terms: Terms) -> SqrtFactor:
        raise NotImplementedError

    def terms_factor_columns(self, terms: Terms) -> SqrtFactor:
        """An exact signed factor in BackPACK 1.7.1's column layout (``SqrtGGNExact``);
        default :meth:`terms_factor` (the same columns, e.g. ``sqrt(2c) I`` for MSE)."""
        return self.terms_factor(terms)

    def terms_sampled(self, terms: Terms, mc_samples: int) -> SqrtFactor:
        raise NotImplementedError

    def terms_sum_hessian(self, terms: Terms) -> Tensor:
        raise NotImplementedError

    def terms_product(self, terms: Terms) -> Callable[[Tensor], Tensor]:
        raise NotImplementedError

    def _terms(self, call: ModuleCall) -> Terms:
        return self.terms(call)._replace(call=call)

    # the LossRules protocol
    def signed_sqrt_hessian(self, call: ModuleCall) -> SqrtFactor:
        """Exact signed factor ``[V, N, *in]``: ``sum_v sign S S^T = d2L/dx_n dx_n``."""
        return self.terms_factor(self._terms(call))

    def signed_sqrt_hessian_columns(self, call: ModuleCall) -> SqrtFactor:
        """Exact signed factor in BackPACK's column layout (:meth:`terms_factor_columns`)."""
        return self.terms_factor_columns(self._terms(call))

    def signed_sqrt_hessian_sampled(self, call: ModuleCall, mc_samples: int) -> SqrtFactor:
        """Monte-Carlo signed factor, unbiased for ``d2L/dx_n dx_n``."""
        return self.terms_sampled(self._terms(call), mc_samples)

    def sqrt_hessian(self, call: ModuleCall) -> Tensor:
        return _unsigned(self.signed_sqrt_hessian(call), "exact loss Hessian factor")

    def sqrt_hessian_sampled(self, call: ModuleCall, mc_samples: int) -> Tensor:
        factor = self.signed_sqrt_hessian_sampled(call, mc_samples)
        return _unsigned(factor, "sampled loss Hessian factor")

    def sum_hessian(self, call: ModuleCall) -> Tensor:
        return self.terms_sum_hessian(self._terms(call))

    def hessian_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[K, N, *in] -> [K, N, *in]``: ``(d2L/dx_n dx_n) m_{k,n}`` per sample ``n``."""
        key = ("loss_product", type(self))
        if key not in call.cache:  # refilled lazily after the pass (products)
            call.cache[key] = self.terms_product(self._terms(call))
        return call.cache[key](mat)


class ElementwiseRules(TermRules):
    """Losses with one term per input element and a diagonal Hessian ``h`` ``[N, *]``."""

    def hessian_diag(self, terms: Terms) -> Tensor:
        """``d2L/dx dx`` element by element, ``[N, *]`` (signed where ``c_i`` is)."""
        raise NotImplementedError

    def draws(self, terms: Terms, mc_samples: int) -> Tensor:
        """``[M, N, *]`` draws ``g`` with mean zero, independent entries, ``E[g^2] = u``, where
        ``h = u * (the rest)``; :meth:`draw_scale` is ``h / u``."""
        raise NotImplementedError

    def draw_scale(self, terms: Terms) -> Tensor:
        raise NotImplementedError

    def terms_factor(self, terms: Terms) -> SqrtFactor:
        return DiagonalFactor.from_values(self.hessian_diag(terms)).dense()

    def terms_sampled(self, terms: Terms, mc_samples: int) -> SqrtFactor:
        return signed_sampled(
            self.draws(terms, mc_samples), self.draw_scale(terms), self.maybe_negative(terms)
        )

    def terms_sum_hessian(self, terms: Terms) -> Tensor:
        return torch.diag(self.hessian_diag(terms).flatten(1).sum(0))

    def terms_product(self, terms: Terms) -> Callable[[Tensor], Tensor]:
        h = self.hessian_diag(terms)
        return h.mul


def _broadcast(coeff: Tensor | float, like: Tensor) -> Tensor:
    """``coeff`` as a tensor of ``like``'s shape (a ``[N]`` tensor broadcasts per sample)."""
    c = torch.as_tensor(coeff, dtype=like.dtype, device=like.device)
    if c.dim() == 1 and like.dim() > 1 and c.shape[0] == like.shape[0]:
        c = c.reshape(-1, *([1] * (like.dim() - 1)))
    return c.expand(like.shape)


class MSELossRules(ElementwiseRules):
    """``L = sum_i c_i (x_i - y_i)^2``: ``d2L/dx dx = diag(2 c)`` (eq. S.12), on ``[N, *]``."""

    support_note = "any input [N, *]"

    def hessian_diag(self, terms: Terms) -> Tensor:
        return 2 * _broadcast(terms.coeff, terms.x)

    def draws(self, terms: Terms, mc_samples: int) -> Tensor:
        # E[g g^T] = I for g ~ N(0, I): the Fisher of a Gaussian likelihood, times 2c
        x = terms.x
        return torch.randn(mc_samples, *x.shape, dtype=x.dtype, device=x.device)

    def draw_scale(self, terms: Terms) -> Tensor:
        return self.hessian_diag(terms)


class BCEWithLogitsLossRules(ElementwiseRules):
    """``l = -w [q y log s(x) + (1-y) log(1-s(x))]`` (``q`` = ``pos_weight``), on ``[N, *]``.

    ``dl/dx = w (s (q y + 1 - y) - q y)``, so ``d2l/dx dx = w (q y + 1 - y) s (1 - s)``:
    diagonal, with the Bernoulli Fisher ``s (1 - s)`` scaled per element.
    """

    support_note = "any input [N, *]; weight and pos_weight supported"

    def validate_options(self, module: nn.Module, x: Tensor, target: Tensor) -> None:
        if x.dim() < 1:
            raise NotImplementedError("BCEWithLogitsLoss needs a batched input [N, *]")

    def _scale(self, terms: Terms) -> Tensor:
        """``c w (q y + 1 - y)`` per element (everything but ``s (1 - s)``)."""
        module, x, y = terms.module, terms.x, terms.target
        scale = _broadcast(terms.coeff, x)
        if module.weight is not None:
            scale = scale * module.weight.detach()
        if module.pos_weight is not None:
            scale = scale * (module.pos_weight.detach() * y + 1 - y)
        return scale

    def hessian_diag(self, terms: Terms) -> Tensor:
        s = torch.sigmoid(terms.x)
        return s * (1 - s) * self._scale(terms)

    def draws(self, terms: Terms, mc_samples: int) -> Tensor:
        # g = s - y~, y~ ~ Bernoulli(s): mean zero, E[g^2] = s(1-s), independent entries
        s = torch.sigmoid(terms.x)
        return s - torch.bernoulli(s.expand(mc_samples, *s.shape))

    def draw_scale(self, terms: Terms) -> Tensor:
        return self._scale(terms)


class CrossEntropyLossRules(TermRules):
    """Cross-entropy on logits ``[N, C, d_1, ...]`` (PyTorch's K-dimensional form; ``[N, C]``
    for ``K = 0``), position ``q = (d_1, ...)`` of ``P = prod(d)``.

    The term of position ``(n, q)`` is ``-sum_k a_k log softmax(x_{n,:,q})_k`` with
    ``a = (1 - eps) w_y e_y + (eps / C) w`` for a class index ``y`` (``0`` where ``y ==
    ignore_index``), ``a = w * ((1 - eps) y + eps / C)`` for class probabilities ``y``
    (``w`` the class weights, 1 without; ``eps`` the label smoothing). Its Hessian is
    ``m (diag p - p p^T)`` with the mass ``m = c sum_k a_k`` (C.2): it depends on the
    target only through ``m``. ``c``: ``1 / sum_{n,q} w_{y_{n,q}}`` over non-ignored targets
    for a ``mean`` with class indices (PyTorch's weighted mean), ``1 / (N P)`` with
    probabilities, ``1`` for ``sum``.

    Per sample the Hessian is block-diagonal over the ``P`` positions, each block of rank
    ``C - 1``, so an exact factor needs ``(C - 1) P`` columns (the rank): column
    ``(v, q)`` is zero except at position ``q`` (:meth:`terms_factor`).
    """

    support_note = "logits [N, C, *d]; ignore_index, weight, label_smoothing supported"

    def validate_options(self, module: nn.Module, x: Tensor, target: Tensor) -> None:
        if x.dim() < 2:
            raise NotImplementedError(
                f"CrossEntropyLoss needs batched logits [N, C, *d], got shape {tuple(x.shape)}"
            )
        expected = (x.shape[0], *x.shape[2:])
        if target.dtype.is_floating_point:
            expected = tuple(x.shape)
        if tuple(target.shape) != expected:
            raise NotImplementedError(
                f"CrossEntropyLoss on logits {tuple(x.shape)} needs targets of shape "
                f"{expected}, got {tuple(target.shape)}"
            )

    def terms(self, call: ModuleCall) -> Terms:
        module, x, target = call.module, call.input, call.inputs[1].detach()
        if module.reduction == "sum":
            return Terms(module, x, target, 1.0)
        if target.dtype.is_floating_point:
            return Terms(module, x, target, 1.0 / (x.numel() // x.shape[1]))
        valid = (target != module.ignore_index).to(x.dtype)
        if module.weight is not None:
            w = module.weight.detach().to(x.dtype)
            valid = valid * w[torch.where(valid > 0, target, 0)]
        return Terms(module, x, target, 1.0 / valid.sum(), nonnegative=module.weight is None)

    def maybe_negative(self, terms: Terms) -> bool:
        """Whether the mass may be negative: also with soft (floating-point) targets."""
        return terms.target.dtype.is_floating_point or super().maybe_negative(terms)

    def probs_and_mass(self, terms: Terms) -> tuple[Tensor, Tensor]:
        """Softmax ``p`` ``[N, C, P]`` and the signed mass ``m`` ``[N, P]`` (see the class)."""
        module, x, target = terms.module, terms.x, terms.target
        N, C = x.shape[:2]
        p = torch.softmax(x, dim=1).reshape(N, C, -1)
        eps = module.label_smoothing
        w = None if module.weight is None else module.weight.detach().to(x.dtype)
        if target.dtype.is_floating_point:
            y = (1 - eps) * target.reshape(N, C, -1).to(x.dtype) + eps / C
            mass = (y if w is None else y * w[:, None]).sum(1)
        else:
            t = target.reshape(N, -1)
            valid = (t != module.ignore_index).to(x.dtype)
            w_y = valid if w is None else valid * w[torch.where(valid > 0, t, 0)]
            if eps == 0:
                mass = w_y
            else:
                w_sum = float(C) if w is None else w.sum()
                mass = (1 - eps) * w_y + (eps / C) * w_sum * valid
        coeff = _broadcast(terms.coeff, mass.reshape(N, *x.shape[2:])).reshape(N, -1)
        return p, mass * coeff

    def terms_factor(self, terms: Terms) -> SqrtFactor:
        """``S`` ``[(C-1) P, N, C, *d]`` (signs ``[(C-1) P, N]`` where the mass is negative).

        Per position, ``R = diag(sqrt p) - p sqrt(p)^T`` (``C`` columns) satisfies ``R R^T =
        diag p - p p^T`` because ``sum_k p_k = 1``, and ``R sqrt(p) = 0``: the block has rank
        ``C - 1``. The Householder reflection ``Q = I - 2 u u^T / u^T u`` with ``u =
        sqrt(p) + e_k`` (``k`` the most likely class, so ``u^T u >= 2``) maps ``sqrt(p)`` to
        ``-e_k``, so column ``k`` of ``R Q`` is zero and the other ``C - 1`` columns are a
        factor of the same block. Column ``(v, q)`` of ``S`` is that factor's column ``v``
        at position ``q``, scaled by ``sqrt|m_{n,q}|``, and zero at the other positions.
        """
        return self._factor(terms, rotate=True)

    def terms_factor_columns(self, terms: Terms) -> SqrtFactor:
        """``S`` ``[C P, N, C, *d]``: per position BackPACK 1.7.1's ``R = diag(sqrt p) - p
        sqrt(p)^T`` itself (column ``v`` is ``sqrt(p_v) (e_v - p)``), without the reflection
        of :meth:`terms_factor`, scaled by ``sqrt|m|``; one zero-sum column more per position."""
        return self._factor(terms, rotate=False)

    def _factor(self, terms: Terms, rotate: bool) -> SqrtFactor:
        x = terms.x
        p, mass = self.probs_and_mass(terms)
        N, C, P = p.shape
        if P > 1:
            check_dense_budget(
                terms.call,
                ((max(C - 1, 1) if rotate else C) * P, *x.shape),
                x.dtype,
                f"The exact factor of the cross-entropy over {P} positions",
                DENSE_CE_ADVICE,
            )
        rows = p[:, :, 0] if P == 1 else rearrange(p, "n c q -> (n q) c")
        R = _softmax_root(rows, rotate, mass.abs().sqrt().reshape(-1, 1))  # [(n q), C, V]
        V = R.shape[2]
        if P == 1:
            S = R.permute(2, 0, 1).reshape(V, N, *x.shape[1:])
        else:  # column (v, q) lives at position q only
            R = rearrange(R, "(n q) c v -> v q n c", n=N)
            S = torch.einsum("vqnc,qr->vqncr", R, torch.eye(P, dtype=x.dtype, device=x.device))
            S = S.reshape(V * P, N, *x.shape[1:])
        negative = mass < 0
        if not self.maybe_negative(terms) or not bool(negative.any()):
            return SqrtFactor(S)
        sign = 1.0 - 2.0 * negative.to(x.dtype)  # [N, P]
        sign = rearrange(sign, "n q -> q n").unsqueeze(0).expand(V, P, N).reshape(V * P, N)
        return SqrtFactor(S, sign)

    def terms_sampled(self, terms: Terms, mc_samples: int) -> SqrtFactor:
        """``g = p - onehot(y~)``, ``y~ ~ Categorical(p)`` drawn independently per position:
        ``E[g g^T] = diag p - p p^T`` (C.2), ``[M, N, C, *d]``.

        One column holds the draws of all ``P`` positions of a sample. It is unbiased for
        the block-diagonal Hessian: the cross term of positions ``q != r`` is
        ``E[g_q g_r^T] = E[g_q] E[g_r]^T = 0``, the draws being independent with
        ``E[g_q] = p_q - p_q = 0``.
        """
        x = terms.x
        p, mass = self.probs_and_mass(terms)
        N, C, P = p.shape
        rows = rearrange(p, "n c q -> (n q) c")
        classes = torch.multinomial(rows, mc_samples, replacement=True).T  # [M, (n q)]
        onehot = nn.functional.one_hot(classes, C).to(p.dtype)
        g = rearrange(rows - onehot, "m (n q) c -> m n c q", n=N)
        sampled = signed_sampled(g, mass[:, None, :], self.maybe_negative(terms))
        return _reshape_factor(sampled, x.shape)

    def terms_sum_hessian(self, terms: Terms) -> Tensor:
        """``sum_n`` of the per-sample Hessians, ``[C P, C P]`` in ``x[n].flatten()`` order,
        block-diagonal over positions."""
        p, mass = self.probs_and_mass(terms)
        N, C, P = p.shape
        pm = p * mass[:, None, :]  # [N, C, P]
        blocks = torch.diag_embed(pm.sum(0).T) - torch.einsum("ncq,ndq->qcd", pm, p)
        if P == 1:
            return blocks[0]
        dense = torch.diag_embed(rearrange(blocks, "q c d -> c d q"))  # [C, C, P, P]
        return rearrange(dense, "c d q r -> (c q) (d r)")

    def terms_product(self, terms: Terms) -> Callable[[Tensor], Tensor]:
        """``[K, N, C, *d] -> [K, N, C, *d]``: ``m (p * v - p (p . v))`` per position."""
        p, mass = self.probs_and_mass(terms)

        def product(mat: Tensor) -> Tensor:
            v = mat.reshape(*mat.shape[:3], -1)
            pv = p * v
            return ((pv - p * pv.sum(2, keepdim=True)) * mass[:, None, :]).reshape(mat.shape)

        return product


def _softmax_root(p: Tensor, rotate: bool = True, scale: Tensor | None = None) -> Tensor:
    """``[B, C] -> [B, C, max(C - 1, 1)]``: a factor of ``diag p - p p^T`` per row (see
    :meth:`CrossEntropyLossRules.terms_factor`), times ``scale`` ``[B, 1]`` if given;
    ``rotate=False``: ``R`` itself, ``[B, C, C]``.

    With ``k`` the most likely class, ``s = sqrt(p)`` and ``a = s_k / (1 + s_k)``, column
    ``v != k`` of ``R Q`` is ``s_v (e_v - a e_k - (1 - a) p)``: ``R e_v = s_v (e_v - p)``,
    ``R u = R e_k = s_k (e_k - p)``, ``u_v = s_v`` and ``u^T u = 2 + 2 s_k``. It is built
    from that formula, one outer product and two scatters, for the ``C - 1`` kept columns.
    """
    B, C = p.shape
    sqrt_p = p.sqrt()
    if C == 1 or not rotate:  # p = 1: the Hessian is 0, keep one (zero) column
        R = torch.diag_embed(sqrt_p) - p.unsqueeze(2) * sqrt_p.unsqueeze(1)
        return R if scale is None else R * scale.unsqueeze(2)
    k = p.argmax(1, keepdim=True)  # [B, 1]
    j = torch.arange(C - 1, device=p.device)
    kept = j + (j >= k)  # [B, C - 1]: the classes v != k, in order
    s_k = sqrt_p.gather(1, k)
    a = s_k / (1 + s_k)  # [B, 1]
    s_v = sqrt_p.gather(1, kept)
    if scale is not None:  # every column is linear in s_v
        s_v = s_v * scale
    S = (p * (a - 1)).unsqueeze(2) * s_v.unsqueeze(1)  # -(1 - a) p s_v, [B, C, C - 1]
    S.scatter_add_(1, kept.unsqueeze(1), s_v.unsqueeze(1))  # + s_v at feature v
    S.scatter_add_(1, k.unsqueeze(2).expand(B, 1, C - 1), (-a * s_v).unsqueeze(1))  # - a s_v at k
    return S


def _reshape_factor(f: SqrtFactor, shape: torch.Size) -> SqrtFactor:
    """A factor ``[V, N, ...]`` with its sample features reshaped to ``shape[1:]``."""
    S = f.S.reshape(f.S.shape[0], *shape)
    if has_independent_rows(f.S):
        mark_independent_rows(S)
    return SqrtFactor(S, f.sign)


def _inner_rules() -> dict[type, TermRules]:
    return {
        nn.MSELoss: MSELossRules(),
        nn.CrossEntropyLoss: CrossEntropyLossRules(),
        nn.BCEWithLogitsLoss: BCEWithLogitsLossRules(),
    }


class ReducedLossRules(TermRules):
    """:class:`hbpkit.reshaping.ReducedLoss`: ``L = sum_i c_i w_i l_i`` over the terms of an
    inner loss with ``reduction="none"`` (``c_i = 1`` for ``reduce="sum"``, ``1/numel`` of
    the unreduced loss for ``"mean"``), ``w`` the forward pass's weights (``[N]``, one per
    sample, or the unreduced loss's shape; ``None``: 1).

    The Hessian of each term is the inner loss's, scaled by ``c_i w_i``: every rule of the
    inner loss applies with these coefficients. Negative weights give signed factors.
    """

    support_note = "a reduction='none' loss (MSE, CE, BCE) summed or averaged, with weights"

    def __init__(self) -> None:
        self.inner = _inner_rules()

    def _inner(self, module: nn.Module) -> TermRules:
        for cls in type(module).__mro__:
            if cls in self.inner:
                return self.inner[cls]
        raise NotImplementedError(
            f"ReducedLoss around {type(module).__name__} is not supported: the inner loss must "
            f"be one of {', '.join(c.__name__ for c in self.inner)}"
        )

    def validate(self, call: ModuleCall) -> None:
        module = call.module
        inner = module.loss
        rules = self._inner(inner)
        if inner.reduction != "none":
            raise NotImplementedError(
                f"ReducedLoss needs its inner loss with reduction='none', got {inner.reduction!r}"
            )
        if module.reduce not in ("sum", "mean"):
            raise NotImplementedError(f"ReducedLoss(reduce={module.reduce!r}) is not supported")
        rules.validate_options(inner, call.inputs[0], call.inputs[1])

    def terms(self, call: ModuleCall) -> Terms:
        module, x, target = call.module, call.input, call.inputs[1].detach()
        weight = call.inputs[2] if len(call.inputs) > 2 else None
        coeff: Tensor | float = 1.0
        if weight is not None:
            coeff = torch.as_tensor(weight).detach().to(x.dtype)
        if module.reduce == "mean":
            coeff = coeff / _unreduced_numel(module.loss, x)
        return Terms(module.loss, x, target, coeff)

    def terms_factor(self, terms: Terms) -> SqrtFactor:
        return self._inner(terms.module).terms_factor(terms)

    def terms_factor_columns(self, terms: Terms) -> SqrtFactor:
        return self._inner(terms.module).terms_factor_columns(terms)

    def terms_sampled(self, terms: Terms, mc_samples: int) -> SqrtFactor:
        return self._inner(terms.module).terms_sampled(terms, mc_samples)

    def terms_sum_hessian(self, terms: Terms) -> Tensor:
        return self._inner(terms.module).terms_sum_hessian(terms)

    def terms_product(self, terms: Terms) -> Callable[[Tensor], Tensor]:
        return self._inner(terms.module).terms_product(terms)


def _unreduced_numel(loss: nn.Module, x: Tensor) -> int:
    """Entries of ``loss(x, y)`` with ``reduction="none"``: one per position for
    cross-entropy (``N prod(d)``), one per element otherwise."""
    if isinstance(loss, nn.CrossEntropyLoss):
        return x.numel() // x.shape[1]
    return x.numel()
