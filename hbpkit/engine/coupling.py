"""The plan's checks for modules that couple the samples (``BatchNorm`` in train mode).

Below such a module (towards the input) first-order extensions carry ``N`` gradient
columns per sample and sqrt factors ``N`` times their columns, each over the whole batch
(``hbpkit/extensions/coupled.py``). Before anything is computed the plan
(``engine/plan.py``) refuses here what is not defined through batch statistics
(batch-averaged messages), rules that cannot sum a parameter's derivative over the
samples, and coupled tensors above the memory budget, naming the module.
"""

from __future__ import annotations

from typing import Any

from hbpkit.core.calls import NODE_KEY, ModuleCall, describe
from hbpkit.core.graph import CallGraph
from hbpkit.curvature.memory import check_dense_budget
from hbpkit.extensions.coupled import couples_samples
from hbpkit.modules.base import LossRules, rules_implement
from hbpkit.modules.batchnorm import COUPLED_ADVICE, TRAIN_MODE_REASON

EVAL_ADVICE = "call model.eval() to use the running statistics (every extension supported)"


def couples(call: ModuleCall) -> bool:
    """Whether ``call``'s curvature rules mix the samples (train-mode BatchNorm)."""
    return couples_samples(call.rules, call)


def below(graph: CallGraph, coupling: list[ModuleCall]) -> set[int]:
    """``id`` of every call towards the input from a call in ``coupling`` (exclusive)."""
    seen: set[int] = set()
    stack = [p for c in coupling for p in graph.parents[id(c)]]
    while stack:
        call = stack.pop()
        if id(call) in seen:
            continue
        seen.add(id(call))
        stack.extend(graph.parents[id(call)])
    return seen


def refuse_unlinked_coupling(calls: list[ModuleCall], graph: CallGraph) -> None:
    """A train-mode BatchNorm that first-order extensions reach outside the graph of linked
    modules, with trainable parameters towards its input: its coupled gradient columns
    could not reach them (per-sample gradients would be silently those of eval mode)."""
    for call in calls:
        if call in graph or call.released or isinstance(call.rules, LossRules):
            continue
        x = call.inputs[0] if call.inputs else None
        if couples(call) and x is not None and x.grad_fn is not None and _trainable_below(x):
            raise NotImplementedError(
                f"{describe(call.module)} normalizes with the batch statistics and has "
                "trainable parameters before it, but is not linked to the loss through "
                "extended modules: per-sample gradients through it need the modules linked "
                "tensor to tensor (hbpkit.convert(model)); or " + EVAL_ADVICE
            )


def _trainable_below(x: Any) -> bool:
    stack, seen, keep = [x.grad_fn], set(), []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        keep.append(node)
        variable = getattr(node, "variable", None)
        if node.metadata.get(NODE_KEY) is not None or getattr(variable, "requires_grad", False):
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


def check_coupling(plan: Any) -> None:
    """Refuse up front what the coupled columns below ``plan.coupling`` cannot give."""
    bn = plan.coupling[0]
    for ext in plan.second_order:
        if ext.message.batch_averaged:
            raise NotImplementedError(
                f"{describe(bn.module)} {TRAIN_MODE_REASON}; {ext!r} backpropagates one "
                "batch-averaged matrix (mean_n J_n^T H J_n, approximation 9), which has no "
                "per-sample Jacobian to average there: use a per-sample extension (KFLR, "
                "KFAC, DiagGGNExact), products (GGNMP), or " + EVAL_ADVICE
            )
    _check_param_rules(plan)
    _check_budget(plan)


def _check_param_rules(plan: Any) -> None:
    """Parameters below a coupling module sum their derivatives over the samples
    (``param_jac_t_mat_prod_sum``) for per-sample gradients and diagonals."""
    for call in plan.graph.order:
        if id(call) not in plan.below_coupling:
            continue
        for ext, rules in plan.rules(call):
            if rules is None or not _sums_columns(ext, rules):
                continue
            names = [n for n in rules.param_names(call.module) if _trains(call.module, n)]
            if names and not rules_implement(rules, "param_jac_t_mat_prod_sum"):
                raise NotImplementedError(
                    f"{describe(call.module)} lies before {describe(plan.coupling[0].module)}, "
                    f"which normalizes with the batch statistics; {ext!r} sums its parameter "
                    f"derivatives over the samples there, with param_jac_t_mat_prod_sum, "
                    f"which {type(rules).__name__} does not implement; " + EVAL_ADVICE
                )


def _sums_columns(ext: Any, rules: Any) -> bool:
    """First-order extensions and diagonals sum coupled columns over the samples."""
    return not ext.needs_backprop or "param_diag" in ext.required_param_rules(rules)


def _trains(module: Any, name: str) -> bool:
    for part in name.split("."):
        module = getattr(module, part, None)
    return module is not None and getattr(module, "requires_grad", False)


def _check_budget(plan: Any) -> None:
    """The coupled tensors every call below a coupling module forms at its input: the
    ``N`` gradient columns ``[N, N, *in]`` (first order) and the coupled sqrt-factor
    columns ``[C, N, *in]``, ``C`` counted from the loss (the loss Hessian's columns,
    times ``N`` at each first coupling module, plus residual columns of eq. 7)."""
    coupling = {id(c) for c in plan.coupling}
    sqrt = [e.message for e in plan.second_order if hasattr(e.message, "loss_hessian")]
    residuals = any(m.residual_factors for m in sqrt)
    arriving: dict[int, tuple[int, int]] = {}  # per-sample and coupled columns
    via: dict[int, ModuleCall] = {}  # the coupling call above each call (for the message)
    for call in plan.graph.order:
        if call.released:
            continue
        if call in plan.roots:
            send = (_loss_columns(call, sqrt), 0)
        else:
            per_sample, coupled = arriving.get(id(call), (0, 0))
            x = call.inputs[0]
            N, numel = x.shape[0], x[0].numel()
            if id(call) in coupling:
                coupled, per_sample = coupled + per_sample * N, 0
                if residuals:
                    coupled += N * numel
            elif residuals and not call.rules.linear_in_input:
                per_sample += numel
            if id(call) in coupling:
                via[id(call)] = call
            if id(call) in via:
                advice = f"{describe(via[id(call)].module)}: {COUPLED_ADVICE}"
                if plan.coupled_first_order:
                    what = "The per-sample gradient columns"
                    check_dense_budget(call, (N, *x.shape), x.dtype, what, advice)
                if coupled:
                    what = "The coupled curvature columns"
                    check_dense_budget(call, (coupled, *x.shape), x.dtype, what, advice)
            send = (per_sample, coupled)
        for parent in plan.graph.parents[id(call)]:
            old = arriving.get(id(parent), (0, 0))
            arriving[id(parent)] = (max(old[0], send[0]), max(old[1], send[1]))
            if id(call) in via:
                via.setdefault(id(parent), via[id(call)])


def _loss_columns(root: ModuleCall, messages: list) -> int:
    """Columns of the loss's sqrt factor: its per-sample input size (exact) or twice the
    draws (sampled, signed at most), the largest over ``messages``."""
    x = root.inputs[0]
    out = 0
    for m in messages:
        out = max(out, x[0].numel() if m.loss_hessian == "exact" else 2 * m.mc_samples)
    return out
