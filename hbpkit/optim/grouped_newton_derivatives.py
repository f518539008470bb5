"""Derivatives of the loss summarised by a partition: ``g_bar``, ``H_bar`` and ``diag D^(3)``.

GroupedNewton paper, section 3 and appendix A: for a direction ``u`` (parameter-shaped,
detached) and a partition ``I_{S:P}`` of the parameters,

* ``g_bar = D^(1)(u) = I_{S:P} U g``, ``g_bar[s] = sum_{p in s} u_p dL/dtheta_p``   (eq. 9)
* ``H_bar = D^(2)(u) = I_{S:P} U H U I_{P:S}``, ``H_bar[s, t] = u_s^T H_st u_t``     (eq. 9, 27)
* ``d3[s] = D^(3)(u)_sss = sum_{p, q, r in s} T_pqr u_p u_q u_r``                  (eq. 15)

with ``U = Diag(u)``. Each is one more backward pass through the previous one
("derivation + contraction", eq. 16, algorithms 2 and 3): row ``s`` of ``H_bar`` is
``I_{S:P} U grad_theta(g_bar[s])`` (one double backward per subset), and ``d3[s]`` is
``u_s^T grad_{theta_s}(H_bar[s, s])`` (one triple backward per subset), so the cost is
``2 S`` backward passes of increasing order and no tensor larger than ``P``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from hbpkit.optim.grouped_newton_partition import Partition


class Summary(NamedTuple):
    """The summarised derivatives at one point, in the parameters' dtype."""

    loss: Tensor  # [] the loss value (detached)
    g_bar: Tensor  # [S]
    H_bar: Tensor  # [S, S], symmetric
    d3: Tensor  # [S], the diagonal of D^(3)(u); zeros if not asked for


def _grad(output: Tensor, inputs: Sequence[Tensor], create_graph: bool) -> list[Tensor | None]:
    """``d output / d inputs`` (``None`` where ``output`` does not depend on an input)."""
    if output.grad_fn is None:
        return [None] * len(inputs)
    return list(
        torch.autograd.grad(
            output, inputs, create_graph=create_graph, retain_graph=True, allow_unused=True
        )
    )


def _contract(grads: Sequence[Tensor | None], u: Sequence[Tensor]) -> list[Tensor | None]:
    return [None if g is None else g * v for g, v in zip(grads, u)]


def summarise(
    loss: Tensor,
    params: Sequence[Tensor],
    u: Sequence[Tensor],
    partition: Partition,
    third_order: bool = True,
) -> Summary:
    """``g_bar``, ``H_bar`` and (if ``third_order``) ``diag D^(3)`` of ``loss`` along ``u``.

    Args:
        loss: a scalar with its autograd graph to ``params`` (no backward pass run on it).
        params: the parameter tensors ``(T^1, ...)``.
        u: the direction, one detached tensor per parameter, same shapes.
        partition: ``I_{S:P}`` for ``params``.
        third_order: also compute ``d3`` (one triple backward per subset).
    """
    if loss.dim() != 0:
        raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError(
            "the loss does not require grad: GroupedNewton differentiates it up to three "
            "times, so the closure must run the forward pass with gradients enabled"
        )
    S = partition.size
    zero_row = torch.zeros(S, dtype=loss.dtype, device=loss.device)
    grads = _grad(loss, params, create_graph=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    g_bar = partition.reduce(_contract(grads, u))  # D^(1), eq. 9
    rows, d3 = [], []
    for s in range(S):
        # row s of H_bar: derive g_bar[s] once more and contract with u (eq. 16)
        row = _grad(g_bar[s], params, create_graph=third_order)
        if all(r is None for r in row):
            rows.append(zero_row)
            d3.append(zero_row[0])
            continue
        h_row = partition.reduce(_contract(row, u))
        rows.append(h_row.detach())
        if not third_order:
            d3.append(zero_row[0])
            continue
        # d3[s]: derive H_bar[s, s] along the tensors of subset s only, contract with u_s
        members = partition.members(s)
        third = _grad(h_row[s], [params[i] for i in members], create_graph=False)
        u_restricted = partition.restrict(u, s)
        u_s = [u_restricted[i] for i in members]
        terms = [(t * v).sum() for t, v in zip(third, u_s) if t is not None]
        d3.append(torch.stack(terms).sum().detach() if terms else zero_row[0])
    H_bar = torch.stack(rows)
    H_bar = 0.5 * (H_bar + H_bar.T)  # symmetric up to rounding; make it exactly so
    return Summary(loss.detach(), g_bar.detach(), H_bar, torch.stack(d3))
