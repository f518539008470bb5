"""Quantities through batch statistics (a ``BatchNorm`` in train mode): coupled columns.

With batch statistics every output of the ``BatchNorm`` depends on every sample's input,
so below it (towards the input) the derivatives of one sample's loss term, or one
column of a curvature factor, live on every sample (``hbpkit/modules/batchnorm.py``):

* first-order extensions: ``grad_batch[n] = d l_n / d p = sum_m J_{p,m}^T G[n, m]`` with
  ``G[n, m] = d l_n / d x_m`` ``[N, N, *features]``, the ``N`` coupled gradient columns.
  Above every coupling module ``G[n, m] = delta_{nm} dL/dx_n`` (every module acts per
  sample), so they start there, from the gradient the module receives
  (:class:`CoupledGradients`); ``sum_n G[n] = dL/dx``, so ``grad_batch`` sums to ``.grad``;
* sqrt factors: a :class:`~hbpkit.curvature.factors.CoupledFactor` ``[C, N, *features]``;
  a parameter's diagonal sums each column over the samples before squaring,
  ``diag = sum_c sign_c (sum_m J_{p,m}^T S[c, m])**2`` (:func:`coupled_diag`), the
  mechanism of tied parameters (sum the uses' columns before squaring).

Both are checked against the memory budget before the pass (``engine/plan.py``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from hbpkit.core.calls import ModuleCall, describe
from hbpkit.core.graph import PerInput, per_input
from hbpkit.curvature.factors import CoupledFactor, SqrtFactor
from hbpkit.curvature.memory import policy_of


def couples_samples(rules: Any, call: ModuleCall) -> bool:
    """Whether ``call`` mixes the samples of the batch (``rules.couples_samples``)."""
    check = getattr(rules, "couples_samples", None)
    return check is not None and bool(check(call))


class Grads(NamedTuple):
    """The gradient columns at a tensor: ``coupled`` ``[N, N, *features]`` (the sum of the
    branches that passed a coupling module, ``None``: none did) and whether some branch is
    still per sample (``lazy``: its columns are ``delta_{nm}`` times its gradient)."""

    coupled: Tensor | None
    lazy: bool


#: the message above every coupling module: per sample
LAZY = Grads(None, True)


def resolve(value: Grads | None, grad_output: Tensor) -> Tensor | None:
    """``G`` ``[N, N, *features]`` at a call's output from the message and the total gradient
    ``grad_output`` ``[N, *features]`` there, ``None`` where it is per sample.

    The per-sample branches carry the part of the gradient the coupled ones do not.
    """
    if value is None or value.coupled is None:
        return None
    G = value.coupled
    if value.lazy:
        rest = grad_output - G.sum(0)
        index = torch.arange(G.shape[0], device=G.device)
        G = G.clone()
        G[index, index] += rest
    return G


class CoupledGradients:
    """The message of the first-order extensions in a pass through a coupling module:
    :class:`Grads`, on the interface of ``hbpkit.extensions.messages`` (``initial``,
    ``propagate``, ``merge``, ``for_params``, ``for_dag``)."""

    def initial(self, rules: Any, call: ModuleCall, weight: float = 1.0) -> Grads:
        return LAZY

    def propagate(
        self, rules: Any, call: ModuleCall, grad_output: Tensor, value: Grads | None
    ) -> Grads | PerInput:
        G = resolve(value, grad_output)
        if per_input(rules, call):
            slots = rules.input_slots(call)
            if G is None:
                return PerInput(slots, [LAZY] * len(slots))
            return PerInput(slots, [Grads(g, False) for g in rules.jac_t_mat_prod_inputs(call, G)])
        if G is None:
            if not couples_samples(rules, call):
                return LAZY
            columns = rules.jac_t_factor(call, SqrtFactor(grad_output.unsqueeze(0)))
            return Grads(columns.S, False)  # column n: sample n's loss term
        return Grads(rules.jac_t_mat_prod(call, G), False)

    def merge(self, values: list[Grads], call: ModuleCall) -> Grads:
        coupled = [v.coupled for v in values if v.coupled is not None]
        return Grads(sum(coupled) if coupled else None, any(v.lazy for v in values))

    def for_params(self, value: Grads, call: ModuleCall) -> Grads:
        return value

    def for_dag(self) -> CoupledGradients:
        return self

    def __repr__(self) -> str:
        return "CoupledGradients()"


#: the one instance the pass keys the first-order message by
GRADIENT_COLUMNS = CoupledGradients()


def keep_coupled(before: Any, after: Any, call: ModuleCall) -> Any:
    """``after`` (factors by origin, or :class:`PerInput` of them) with every factor that was
    coupled in ``before`` coupled again: rules that rebuild a :class:`SqrtFactor` from
    ``J^T S`` keep its columns but not its type."""
    if not isinstance(before, dict):
        return after
    if isinstance(after, PerInput):
        for slot, factors in after.by_slot.items():
            after.by_slot[slot] = keep_coupled(before, factors, call)
        return after
    out = dict(after)
    for origin, f in before.items():
        g = out.get(origin)
        if not isinstance(f, CoupledFactor) or g is None or isinstance(g, CoupledFactor):
            continue
        if not isinstance(g, SqrtFactor) or g.S.shape[0] != f.S.shape[0]:
            raise RuntimeError(
                f"{describe(call.module)} changed the columns of curvature coupled by a "
                f"BatchNorm in train mode ({type(g).__name__}); call model.eval() there"
            )
        out[origin] = CoupledFactor(g.S, g.sign)
    return out


def _column_chunks(rules: Any, call: ModuleCall, name: str, f: CoupledFactor):
    """``(i, sum_m J_{p,m}^T S[c, m] for c in i : i + step)``, ``[step, *param.shape]``, in
    chunks of columns of at most ``MemoryPolicy.chunk_bytes``."""
    per_column = max(call.param(name).numel(), f.S[0].numel()) * f.S.element_size()
    step = max(1, policy_of(call).chunk_bytes // max(per_column, 1))
    for i in range(0, f.S.shape[0], step):
        yield i, rules.param_jac_t_mat_prod_sum(call, name, f.S[i : i + step])


def coupled_columns(rules: Any, call: ModuleCall, name: str, f: CoupledFactor) -> Tensor:
    """``sum_m J_{p,m}^T S[c, m]`` for every column ``c``, ``[C, *param.shape]``."""
    return torch.cat([q for _, q in _column_chunks(rules, call, name, f)])


def coupled_diag(rules: Any, call: ModuleCall, name: str, f: CoupledFactor) -> Tensor:
    """``sum_c sign_c (sum_m J_{p,m}^T S[c, m])**2``, ``param.shape``, chunked over columns."""
    signs = f.column_signs()
    diag = 0
    for i, q in _column_chunks(rules, call, name, f):
        q = q.square()
        if signs is not None:
            q = q * signs[i : i + q.shape[0]].reshape(-1, *([1] * (q.dim() - 1)))
        diag = diag + q.sum(0)
    return diag
