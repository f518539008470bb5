"""``hbpkit.convert(model)``: an ordinary model's functional code as modules.

hbpkit sees modules, not functional operations. A model is traced symbolically
with ``torch.fx`` and rewritten:

* where a module with rules exists, the operation becomes that module (the fast path):
  ``a + b`` of two module outputs (a ResNet's ``out += identity``) ->
  :class:`hbpkit.branching.Sum`; ``torch.flatten(x, s, e)`` (``s >= 1``) and
  ``x.view(x.size(0), -1)`` -> ``nn.Flatten``; ``torch.relu / sigmoid / tanh``,
  ``F.relu / gelu / silu / ...`` (elementwise, default options) -> the ``nn`` module;
* every other operation joins a *region* of connected functional code between modules
  (reshapes, attention, ``torch.cat``, bare parameters), which becomes one
  :class:`hbpkit.regions.Region` module, differentiated exactly by the generic path
  (``hbpkit/engine/partition.py``, ``hbpkit/modules/generic.py``).

The rewrites apply where their arguments are module outputs (tensors of the
model's batch layout, ``[N, *features]``); inside a region the code is left as is.
Shape queries (``x.size(0)``, ``x.shape``) and arithmetic on them are kept.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.loss import _Loss

from hbpkit.branching import Sum
from hbpkit.engine.attention import inline_twins
from hbpkit.engine.partition import Partition, attribute_of, is_shape_query
from hbpkit.modules.tables import is_registered
from hbpkit.reshaping import MergeBatch, ReducedLoss

ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
FLATTEN_FUNCTIONS = (torch.flatten,)
ELEMENTWISE_FUNCTIONS: dict[Callable | str, type[nn.Module]] = {
    torch.relu: nn.ReLU,
    F.relu: nn.ReLU,
    "relu": nn.ReLU,
    torch.sigmoid: nn.Sigmoid,
    F.sigmoid: nn.Sigmoid,
    "sigmoid": nn.Sigmoid,
    torch.tanh: nn.Tanh,
    F.tanh: nn.Tanh,
    "tanh": nn.Tanh,
    F.gelu: nn.GELU,
    F.silu: nn.SiLU,
    F.elu: nn.ELU,
    F.softplus: nn.Softplus,
}


class _Tracer(fx.Tracer):
    """Keeps modules hbpkit has rules for (e.g. :class:`hbpkit.branching.Sum`) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_registered(m) or super().is_leaf_module(m, module_qualified_name)


def convert(model: nn.Module) -> fx.GraphModule:
    """``model`` traced with ``torch.fx``, functional ops rewritten into modules.

    Returns a ``torch.fx.GraphModule`` that computes the same function and
    shares ``model``'s submodules and parameters; ``extend()`` it as usual.
    Raises ``NotImplementedError`` naming the operation for what cannot be
    rewritten, and for models ``torch.fx`` cannot trace (data-dependent control flow).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() expects a torch.nn.Module, got {type(model).__name__}")
    try:
        tracer = _Tracer()
        tracer.record_stack_traces = True  # for error messages that point at the source line
        graph = tracer.trace(model)
    except Exception as error:  # fx raises several types (TraceError, TypeError, ...)
        raise NotImplementedError(
            f"hbpkit.convert could not trace {type(model).__name__} with torch.fx: {error}"
        ) from error
    gm = fx.GraphModule(model, graph, type(model).__name__)
    inline_twins(gm)  # attention modules as their twins' code (hbpkit/attention.py)
    counter = 0
    rewritten: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        replacement = _module_for(node, rewritten)
        if replacement is None:
            continue
        module, args = replacement
        counter += 1
        name = f"hbpkit_{type(module).__name__.lower()}_{counter}"
        gm.add_submodule(name, module)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, args)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        rewritten.add(new)
    attributes = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    Partition(gm).replace()
    gm.graph.eliminate_dead_code()
    _drop_moved_attributes(gm, attributes)
    gm.graph.lint()
    gm.recompile()
    return gm


def _drop_moved_attributes(gm: fx.GraphModule, before: set[str]) -> None:
    """Forget the tensors the traced model held for functional code that now live in
    regions only (the same objects, ``before``: the ``get_attr`` targets before the
    partition): a module with parameters of its own is differentiated as a whole. Only
    ``gm`` and the plain containers ``torch.fx`` created for nested targets lose them."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for target in before - used:
        owner_path, _, leaf = target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        plain = type(owner) is nn.Module and not any(
            c == owner_path or c.startswith(owner_path + ".") for c in called if owner_path
        )
        if owner is gm or plain:
            delattr(owner, leaf)


def _module_for(node: fx.Node, rewritten: set[fx.Node]) -> tuple[nn.Module, tuple] | None:
    """The module with rules replacing ``node`` and its arguments, or ``None`` (``node`` is
    left to a region). Only operations on module outputs (or the model's inputs) are
    rewritten: those are in the model's batch layout."""
    if node.op not in ("call_function", "call_method"):
        return None
    target, args, kwargs = node.target, node.args, node.kwargs
    loss = _loss_module(node)
    if loss is not None:  # the input must be the model's; the target is data
        if args and isinstance(args[0], fx.Node) and _module_output(args[0], rewritten):
            return loss, (args[0], args[1] if len(args) > 1 else kwargs["target"])
        return None
    reduced = _reduced_loss(node)
    if reduced is not None:
        return reduced
    if _merges_batch(node) and all(_is_loss(u) for u in node.users):
        if _module_output(args[0], rewritten):  # view(-1, C) is flatten(0, 1) for 3 dims only
            return MergeBatch(None if _is_flatten(node) else 3), (args[0],)
    tensors = [a for a in node.all_input_nodes if not is_shape_query(a)]
    if not tensors or not all(_module_output(a, rewritten) for a in tensors):
        return None
    if _is_add(node):
        if len(args) == 2 and all(isinstance(a, fx.Node) for a in args) and not kwargs:
            return Sum(), tuple(args)
        return None
    if _is_flatten(node):
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        if isinstance(start, int) and start >= 1 and isinstance(end, int):
            return nn.Flatten(start, end), (args[0],)
        return None
    if node.op == "call_method" and target in ("view", "reshape") and _flattens_batch(node):
        return nn.Flatten(), (args[0],)
    key = target if node.op == "call_function" else str(target)
    module_type = ELEMENTWISE_FUNCTIONS.get(key) if _hashable(key) else None
    if module_type is not None and len(args) == 1 and set(kwargs) <= {"inplace"}:
        return module_type(), (args[0],)
    return None


#: functional losses and their modules (the keyword arguments carry over)
LOSS_FUNCTIONS: dict[Callable, type[nn.Module]] = {
    F.cross_entropy: nn.CrossEntropyLoss,
    F.mse_loss: nn.MSELoss,
    F.binary_cross_entropy_with_logits: nn.BCEWithLogitsLoss,
}


def _loss_module(node: fx.Node) -> nn.Module | None:
    """``F.cross_entropy(x, y, **options)`` as ``nn.CrossEntropyLoss(**options)`` (options
    constant, class weights a tensor of the model), else ``None``."""
    if node.op != "call_function" or not _hashable(node.target):
        return None
    module_type = LOSS_FUNCTIONS.get(node.target)
    if module_type is None or len(node.args) > 2:
        return None
    options = {}
    for key, value in node.kwargs.items():
        if key in ("input", "target"):
            continue
        if isinstance(value, fx.Node):
            if value.op != "get_attr":
                return None
            value = attribute_of(node.graph.owning_module, value.target)
        options[key] = value
    try:
        return module_type(**options)
    except TypeError:  # an option the module does not take
        return None


def _reduced_loss(node: fx.Node) -> tuple[nn.Module, tuple] | None:
    """``loss_fn(x, y).sum()`` / ``.mean()`` of an unreduced loss module (``reduction="none"``,
    ``F.cross_entropy(..., reduction="none")`` rewritten before) as ``ReducedLoss``; also
    ``(loss_fn(x, y) * w).sum()`` with weights ``w`` that are data (an input, a buffer, a
    number), not computed from parameters."""
    is_method = node.op == "call_method" and node.target in ("sum", "mean")
    is_function = node.op == "call_function" and node.target in (torch.sum, torch.mean)
    if not (is_method or is_function) or len(node.args) != 1 or node.kwargs:
        return None
    source, weight = _weighted(node.args[0])
    if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
        return None
    loss = source.graph.owning_module.get_submodule(source.target)
    if not isinstance(loss, _Loss) or loss.reduction != "none" or len(source.args) != 2:
        return None
    reduce = "sum" if node.target in ("sum", torch.sum) else "mean"
    args = tuple(source.args) if weight is None else (*source.args, weight)
    return ReducedLoss(copy.deepcopy(loss), reduce), args  # (its own module)


def _weighted(node: object) -> tuple[object, object]:
    """``(per, w)`` for ``per * w`` / ``w * per`` / ``per.mul(w)`` with ``w`` data and ``per``
    used only there, else ``(node, None)``."""
    if not isinstance(node, fx.Node) or len(node.users) != 1 or len(node.args) != 2:
        return node, None
    is_mul = (node.op == "call_function" and node.target in (operator.mul, torch.mul)) or (
        node.op == "call_method" and node.target == "mul"
    )
    if not is_mul or node.kwargs:
        return node, None
    a, b = node.args
    for per, weight in ((a, b), (b, a)):
        if isinstance(per, fx.Node) and per.op == "call_module" and _is_data(weight):
            return per, weight
    return node, None


def _is_data(value: object) -> bool:
    """Whether ``value`` is a number, or a tensor computed from the model's inputs and
    buffers only (no module call, no parameter): a loss weight without gradient."""
    if isinstance(value, (int, float)):
        return True
    if not isinstance(value, fx.Node) or value.op == "call_module":
        return False
    if value.op == "get_attr":
        return not isinstance(attribute_of(value.graph.owning_module, value.target), nn.Parameter)
    return all(_is_data(a) for a in value.all_input_nodes)


def _is_loss(node: fx.Node) -> bool:
    """Whether ``node`` computes a loss (a functional loss, or a loss module)."""
    if node.op == "call_module":
        return isinstance(node.graph.owning_module.get_submodule(node.target), _Loss)
    return _loss_module(node) is not None


def _merges_batch(node: fx.Node) -> bool:
    """``x.flatten(0, 1)``, ``x.view(-1, C)`` / ``x.reshape(-1, x.size(-1))``: the batch
    and the next dimension merged (a sequence model's tokens into the loss's samples)."""
    args = node.args
    if _is_flatten(node):
        start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 0 and end == 1
    if node.op == "call_method" and node.target in ("view", "reshape"):
        shape = args[1:] if len(args) != 2 or not isinstance(args[1], (tuple, list)) else args[1]
        return len(shape) == 2 and shape[0] == -1
    return False


def _module_output(node: fx.Node, rewritten: set[fx.Node]) -> bool:
    """Whether ``node`` is a tensor in the model's batch layout ``[N, *features]``: it
    depends on the model's inputs (not only on parameters, buffers or sizes) and is no
    size. (Operations that move the batch dimension are rare between modules; a region
    whose boundary is not batch-first is refused before a backward pass.)"""
    if node.op == "placeholder" or node in rewritten:
        return True
    if is_shape_query(node) or node.op == "get_attr":
        return False
    return any(_module_output(a, rewritten) for a in node.all_input_nodes)


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in ADD_FUNCTIONS
    return node.target in ("add", "add_", "__add__", "__iadd__")


def _is_flatten(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in FLATTEN_FUNCTIONS
    return node.target == "flatten"


def _flattens_batch(node: fx.Node) -> bool:
    """``x.view(x.size(0), -1)`` (or ``x.shape[0]``): keep the batch dim, flatten the rest."""
    args = node.args
    if len(args) == 2 and isinstance(args[1], (tuple, list)):
        args = (args[0], *args[1])
    if len(args) != 3 or args[2] != -1 or not isinstance(args[1], fx.Node):
        return False
    size = args[1]
    x = args[0]
    if size.op == "call_method" and size.target == "size":
        return size.args[0] is x and size.args[1:] == (0,)
    if size.op == "call_function" and size.target is operator.getitem and size.args[1] == 0:
        shape = size.args[0]
        return (
            isinstance(shape, fx.Node)
            and shape.op == "call_function"
            and shape.target is getattr
            and shape.args == (x, "shape")
        )
    return False


def _hashable(key: object) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True
