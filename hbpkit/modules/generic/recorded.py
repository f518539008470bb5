"""Rules for functional operations seen only in the autograd graph (``extend()`` alone).

A model extended without :func:`hbpkit.convert` may compute between its modules:
``self.fc2(torch.relu(self.fc1(x)) * 2)``, ``self.head(a(x) * b(x))``. The hooks record
the modules, not the operations; the backward pass inserts one virtual call per such
piece (:mod:`hbpkit.engine.recorded_ops`) whose "module" is a
:class:`~hbpkit.regions.RecordedOps`. There is no Python function to replay: its
transposed Jacobian products come from the recorded autograd graph itself, one
``torch.autograd.grad`` from the piece's output to its producers' outputs, batched over
the ``V`` columns (``is_grads_batched``), while the outer backward pass still holds the
graph (``retain_graph``).

What the graph gives: ``J^T M`` for sqrt factors, per input (eq. 7 without the
residual), so first-order quantities, the GGN diagonals, KFAC and KFLR hold exactly.
What it does not: forward products after the pass (the graph is gone) and the residual
of eq. 7 (curvature ``"hessian"``), which the plan refuses, naming ``hbpkit.convert``.

The one assumption, checked before the pass: the piece acts on each sample on its own.
A probe column on the first sample must come back on the first sample only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from hbpkit.core.calls import ModuleCall, describe, replaying
from hbpkit.curvature.memory import DIAGONAL_ADVICE, check_dense_budget
from hbpkit.modules.base import ModuleRules
from hbpkit.modules.generic.rules import InputProducts

CONVERT_ADVICE = "hbpkit.convert(model) turns it into modules with every extension"


class RecordedGraph(NamedTuple):
    """What a virtual call of recorded operations differentiates.

    Attributes:
        output: the tensor the operations computed (the consumer's input), ``[N, *out]``.
        edges: per input, the autograd edge of the producing call's output.
    """

    output: Tensor
    edges: tuple[GradientEdge, ...]


class RecordedGraphRules(InputProducts, ModuleRules):
    """``J_i^T M`` of recorded functional operations, from their autograd graph."""

    multi_input = True
    linear_in_input = False  # unknown: the residual of eq. 7 is refused
    structure = "general"
    support_note = "functional code between modules with extend() alone: J^T products only"

    def per_input(self, call: ModuleCall) -> bool:
        return len(call.parents) > 1

    def input_slots(self, call: ModuleCall) -> tuple[int, ...]:
        return tuple(range(len(call.parents)))

    def validate(self, call: ModuleCall) -> None:
        """Refuse operations that couple the samples or move the batch dimension."""
        graph: RecordedGraph = call.captured
        N = graph.output.shape[0] if graph.output.dim() else 0
        shapes = [tuple(p.output_shape) for p in call.parents]
        if N == 0 or any(not s or s[0] != N for s in shapes):
            raise NotImplementedError(
                f"{describe(call.module)} maps outputs of shapes {shapes} to a tensor of shape "
                f"{tuple(graph.output.shape)}; hbpkit needs the batch dimension first and every "
                f"sample processed on its own: {CONVERT_ADVICE}"
            )
        if N == 1:
            return
        probe = torch.zeros_like(graph.output)
        generator = torch.Generator(device=probe.device).manual_seed(0)
        probe[0] = torch.rand(probe.shape[1:], generator=generator, device=probe.device) + 1
        with torch.enable_grad(), replaying():  # the calls' hooks stay quiet
            grads = torch.autograd.grad(
                graph.output, graph.edges, probe, retain_graph=True, allow_unused=True
            )
        if any(g is not None and g[1:].abs().amax() > 0 for g in grads):
            raise NotImplementedError(
                f"{describe(call.module)} couples the samples of a batch (the gradient of one "
                "sample's output reaches other samples' inputs); hbpkit needs every sample "
                "processed on its own"
            )

    def check_budget(self, call: ModuleCall, batch_averaged: bool, diagonal_factors: bool) -> None:
        """A diagonal factor made dense: ``[D_out, N, *in]`` per input."""
        if not diagonal_factors:
            return
        shape = call.output_shape
        for parent in call.parents:
            check_dense_budget(
                call,
                (shape[1:].numel(), *parent.output_shape),
                call.captured.output.dtype,
                "A dense factor",
                DIAGONAL_ADVICE,
            )

    def jac_t_mat_prod_inputs(self, call: ModuleCall, mat: Tensor) -> tuple[Tensor, ...]:
        """``[V, N, *out] -> ([V, N, *in_i], ...)``: one batched vector-Jacobian product
        through the recorded graph (an input the output does not depend on gets zeros)."""
        graph: RecordedGraph = call.captured
        with torch.enable_grad(), replaying():  # the calls' hooks stay quiet
            grads = torch.autograd.grad(
                graph.output,
                graph.edges,
                mat,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        return tuple(
            g if g is not None else mat.new_zeros(mat.shape[0], *p.output_shape)
            for g, p in zip(grads, call.parents)
        )

    def residual_factor_inputs(
        self, call: ModuleCall, grad_output: Tensor, curvature: str
    ) -> list | None:
        """``None`` for the GGN; other curvatures need ``residual_factor``, which these
        rules lack, so the plan refuses them before the pass."""
        if curvature != "ggn":
            raise NotImplementedError(
                f"{describe(call.module)}: the residual of eq. 7 needs a function to replay; "
                f"{CONVERT_ADVICE}"
            )
        return None
