"""``hbpkit.convert(model)``: rewrite an ordinary model's functional ops into modules.

hbpkit sees modules, not functional operations. A model written with ``+`` in
``forward`` (a ResNet's ``out += identity``), ``torch.flatten(x, 1)`` or
``torch.relu(x)`` is traced symbolically with ``torch.fx`` and rewritten:

* ``a + b``, ``a += b``, ``torch.add(a, b)``, ``a.add(b)`` of two tensors ->
  :class:`hbpkit.branching.Sum`;
* ``torch.flatten(x, s, e)``, ``x.flatten(s, e)`` -> ``nn.Flatten(s, e)``;
  ``x.view(x.size(0), -1)``, ``x.reshape(x.size(0), -1)`` -> ``nn.Flatten()``;
* ``torch.relu / sigmoid / tanh``, ``F.relu / gelu / silu / ...`` (elementwise,
  default options) -> the corresponding ``nn`` module.

Shape queries (``x.size(0)``, ``x.shape``) are kept. Any other operation on
tensors (a matmul of attention, a scaling ``2 * x``, an add of a constant)
raises ``NotImplementedError`` naming the operation and where it is used.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from hbpkit.branching import Sum
from hbpkit.modules.tables import is_registered

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
SHAPE_METHODS = ("size", "dim")


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
    counter, refused = [0], []
    for node in list(gm.graph.nodes):
        replacement = _module_for(node)
        if isinstance(replacement, str):
            refused.append(_describe(node, replacement))
            continue
        if replacement is None:
            continue
        module, args = replacement
        counter[0] += 1
        name = f"hbpkit_{type(module).__name__.lower()}_{counter[0]}"
        gm.add_submodule(name, module)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, args)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    if refused:
        raise NotImplementedError(
            f"hbpkit.convert cannot rewrite {'; '.join(refused)}. hbpkit backpropagates "
            "curvature through modules only (attention's matmuls, scalings and other tensor ops "
            "have no rules yet): write such an operation as a module and hbpkit.register(...) "
            "its rules"
        )
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def _module_for(node: fx.Node) -> tuple[nn.Module, tuple] | str | None:
    """The module replacing ``node`` and its arguments, ``None`` to keep it, or why not."""
    if node.op not in ("call_function", "call_method"):
        return None
    target, args, kwargs = node.target, node.args, node.kwargs
    if node.op == "call_function" and target is getattr:
        return None  # an attribute (x.shape, x.T): what uses it is checked
    if node.op == "call_method" and target in SHAPE_METHODS:
        return None
    if node.op == "call_function" and target is operator.getitem and _is_shape(args[0]):
        return None
    if _is_add(node):
        if len(args) == 2 and all(isinstance(a, fx.Node) for a in args) and not kwargs:
            if not (_is_shape(args[0]) or _is_shape(args[1])):
                return Sum(), tuple(args)
        return "an addition of something other than two tensors (a constant, alpha=)"
    if _is_flatten(node):
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        return nn.Flatten(start, end), (args[0],)
    if node.op == "call_method" and target in ("view", "reshape") and _flattens_batch(node):
        return nn.Flatten(), (args[0],)
    key = target if node.op == "call_function" else str(target)
    module_type = ELEMENTWISE_FUNCTIONS.get(key) if _hashable(key) else None
    if module_type is not None and len(args) == 1 and set(kwargs) <= {"inplace"}:
        return module_type(), (args[0],)
    return "an operation hbpkit has no module for"


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


def _is_shape(arg: object) -> bool:
    """Whether ``arg`` is a shape query (``x.size()``, ``x.shape``, an entry of them)."""
    if not isinstance(arg, fx.Node):
        return False
    if arg.op == "call_method" and arg.target in SHAPE_METHODS:
        return True
    if arg.op == "call_function" and arg.target is getattr and arg.args[1] == "shape":
        return True
    return arg.op == "call_function" and arg.target is operator.getitem and _is_shape(arg.args[0])


def _hashable(key: object) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True


def _describe(node: fx.Node, why: str) -> str:
    name = getattr(node.target, "__name__", str(node.target))
    where = _source_line(node.stack_trace) or f"node {node.name}"
    return f"`{name}` ({node.op} at {where}: {why})"


def _source_line(stack_trace: str | None) -> str | None:
    """``file:line`` of the innermost frame outside torch in an fx stack trace."""
    frames = [
        line.strip()
        for line in (stack_trace or "").splitlines()
        if line.strip().startswith('File "') and "/torch/" not in line
    ]
    if not frames:
        return None
    path, _, rest = frames[-1][len('File "') :].partition('", line ')
    return f"{path}:{rest.split(',')[0]}"
