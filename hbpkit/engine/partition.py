"""Cut a traced model's functional code into regions (:mod:`hbpkit.regions`).

After :func:`hbpkit.convert` has rewritten what has a module of its own (``+`` into
:class:`~hbpkit.branching.Sum`, ``torch.relu`` into ``nn.ReLU``), every remaining
operation on tensors is an *op node*: function and method calls, tensor attributes
(``x.T``), the model's own tensors (``get_attr``: bare parameters, buffers), modules
without rules (``nn.MultiheadAttention`` as a whole, with the indexing of its tuple
output) and modules applied to constants only (``self.pos(torch.arange(T))``).
Connected op nodes form a region; each output of a region (an op node used outside it) becomes one
:class:`~hbpkit.regions.Region` module computing it from the region's inputs (module
outputs, the model's inputs). Shape arithmetic (``x.size(0)``, ``D // heads``) is not
an op: it stays in the model, and a region that uses a size computes it itself from the
tensor it queries (a per-sample replay then sees the sample's sizes).
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from hbpkit.modules.tables import is_registered
from hbpkit.regions import LinearRegion, Region, SelectionRegion

SHAPE_METHODS = ("size", "dim", "numel", "stride", "element_size", "nelement")
SHAPE_ATTRIBUTES = ("shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "layout")

#: ops whose every output entry is a copy of one input entry (or zero)
SELECTION_METHODS = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "contiguous",
    "squeeze", "unsqueeze", "expand", "expand_as", "repeat", "narrow", "select", "flip",
    "roll", "movedim", "moveaxis", "unbind", "split", "chunk", "view_as", "reshape_as",
    "swapaxes", "swapdims", "clone", "__getitem__", "tensor_split", "repeat_interleave",
}  # fmt: skip
SELECTION_FUNCTIONS: set[Callable] = {
    torch.cat, torch.concat, torch.concatenate, torch.stack, torch.flatten, torch.reshape,
    torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.split, torch.chunk,
    torch.narrow, torch.flip, torch.roll, torch.movedim, torch.unbind, torch.t, torch.hstack,
    torch.vstack, torch.tensor_split, operator.getitem, torch.repeat_interleave, torch.clone,
}  # fmt: skip
SELECTION_ATTRIBUTES = ("T", "mT", "H", "mH", "real")
#: ops linear in their tensor arguments jointly
LINEAR_METHODS = {"sum", "mean", "neg", "__neg__", "sub", "add", "__add__", "__sub__", "__radd__",
                  "__rsub__", "cumsum", "diff", "trace", "diagonal", "tril", "triu"}  # fmt: skip
LINEAR_FUNCTIONS: set[Callable] = {
    torch.sum, torch.mean, torch.neg, operator.neg, operator.sub, operator.add, torch.add,
    torch.sub, torch.cumsum, torch.diagonal, torch.tril, torch.triu, F.avg_pool1d,
    F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.interpolate, F.pixel_shuffle, F.pixel_unshuffle, operator.iadd,
    operator.isub,
}  # fmt: skip
#: ops linear in each tensor argument (products): linear if at most one depends on the input
BILINEAR_METHODS = {"mul", "__mul__", "__rmul__", "div", "__truediv__", "matmul", "__matmul__",
                    "bmm", "mm", "mv"}  # fmt: skip
BILINEAR_FUNCTIONS: set[Callable] = {
    operator.mul, operator.truediv, operator.matmul, torch.mul, torch.div, torch.matmul,
    torch.bmm, torch.mm, torch.einsum, F.linear, F.conv1d, F.conv2d, F.conv3d, operator.imul,
    operator.itruediv,
}  # fmt: skip


def is_shape_query(node: fx.Node) -> bool:
    """``x.size()``, ``x.shape``, ``x.dim()``, an entry of them, arithmetic on them."""
    if node.op == "call_method" and node.target in SHAPE_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in SHAPE_ATTRIBUTES
    if node.op == "call_function" and node.target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and is_shape_query(node.args[0])
    if node.op == "call_function" and getattr(node.target, "__module__", "") in (
        "_operator",
        "builtins",
        "math",
    ):
        inputs = node.all_input_nodes
        return bool(inputs) and all(is_shape_query(a) for a in inputs)
    return False


def is_tuple_selection(node: fx.Node) -> bool:
    """``out[i]`` of a module that returns a tuple (an LSTM's ``(output, (h, c))``): plain
    Python indexing, the module's output tensors themselves."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    source, index = node.args
    if not isinstance(index, int) or not isinstance(source, fx.Node):
        return False
    return (
        source.op == "call_module"
        and all(u.op == "call_function" and u.target is operator.getitem for u in source.users)
        or is_tuple_selection(source)
    )


class Partition:
    """The op nodes of ``gm`` (a traced, rewritten model), grouped into regions."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.batched = self._batched()
        self.ops: set[fx.Node] = set()
        for n in self.nodes:
            if self._is_op(n):
                self.ops.add(n)
        self.regions = self._connected(self.ops)

    def _batched(self) -> set[fx.Node]:
        """Nodes whose value depends on the model's inputs (placeholders)."""
        batched: set[fx.Node] = set()
        for n in self.nodes:
            if n.op == "placeholder" or any(a in batched for a in n.all_input_nodes):
                batched.add(n)
        return batched

    def _is_op(self, node: fx.Node) -> bool:
        if node.op in ("placeholder", "output"):
            return False
        if node.op == "get_attr":
            return isinstance(attribute_of(self.gm, node.target), Tensor) and bool(node.users)
        if node.op == "call_module":  # a module without rules, or applied to constants,
            module = self.gm.get_submodule(node.target)  # joins the functional code around it
            return node not in self.batched or not is_registered(module)
        if is_shape_query(node):  # sizes are values: the region's output is queried
            return False
        return not is_tuple_selection(node)

    def _connected(self, ops: set[fx.Node]) -> list[list[fx.Node]]:
        """Connected components of op nodes (through op-node arguments), in graph order."""
        parent = {n: n for n in ops}

        def find(n: fx.Node) -> fx.Node:
            while parent[n] is not n:
                parent[n] = parent[parent[n]]
                n = parent[n]
            return n

        for n in ops:
            for a in n.all_input_nodes:
                if a in ops:
                    parent[find(a)] = find(n)
        groups: dict[fx.Node, list[fx.Node]] = {}
        for n in self.nodes:
            if n in ops:
                groups.setdefault(find(n), []).append(n)
        return list(groups.values())

    def replace(self) -> list[Region]:
        """Replace every region output by a :class:`Region` module; returns the modules."""
        made = []
        for members in self.regions:
            inside = set(members)
            outputs = [n for n in members if _used_outside(n, inside)]
            for out in outputs:
                made.append(self._replace_output(out, inside))
        for n in reversed(self.nodes):
            if n in self.ops and not n.users:
                self.gm.graph.erase_node(n)
        return made

    def _replace_output(self, out: fx.Node, inside: set[fx.Node]) -> Region:
        needed, stack = set(), [out]
        while stack:  # the region's nodes ``out`` depends on, with the sizes they query
            n = stack.pop()
            if n in needed:
                continue
            needed.add(n)
            stack.extend(a for a in n.all_input_nodes if a in inside or is_shape_query(a))
        # a size of a tensor the region computes with is computed in the region, so that a
        # per-sample replay sees the sample's (``x.shape[0]`` is 1); other sizes are values
        used = {a for n in needed if not is_shape_query(n) for a in n.all_input_nodes}
        for n in [n for n in needed if is_shape_query(n)]:
            if not _queries(n, used | (needed & inside)):
                needed.discard(n)
        needed = {n for n in needed if not is_shape_query(n) or _feeds(n, needed)}
        position = {n: i for i, n in enumerate(self.gm.graph.nodes)}  # (regions made so far)
        members = sorted(needed, key=position.__getitem__)
        inputs = sorted(  # tensors first (the call's input ``x``), then other values
            {a for n in members for a in n.all_input_nodes if a not in needed},
            key=lambda a: (is_shape_query(a), position[a]),
        )
        graph, env, attributes = fx.Graph(), {}, {}
        for i, a in enumerate(inputs):
            env[a] = graph.placeholder(f"input_{i}")
        for n in members:
            if n.op in ("get_attr", "call_module"):
                flat = n.target.replace(".", "_")
                attributes[flat] = attribute_of(self.gm, n.target)
                args = fx.map_arg(n.args, env.__getitem__)
                kwargs = fx.map_arg(n.kwargs, env.__getitem__)
                if n.op == "get_attr":
                    env[n] = graph.get_attr(flat)
                else:
                    env[n] = graph.call_module(flat, args, kwargs)
                continue
            env[n] = graph.node_copy(n, env.__getitem__)
        graph.output(env[out])
        kind = _kind(members, {a for a in inputs if a in self.batched})
        region = kind(fx.GraphModule(attributes, graph, kind.__name__), _source(members))
        region.batched_inputs = tuple(a in self.batched for a in inputs)
        batched = any(region.batched_inputs)
        name = f"hbpkit_region_{len([m for m in self.gm.modules() if isinstance(m, Region)])}"
        self.gm.add_submodule(name, region)
        with self.gm.graph.inserting_before(out):
            node = self.gm.graph.call_module(name, tuple(inputs))
        out.replace_all_uses_with(node, delete_user_cb=lambda user: user not in inside)
        if batched:
            self.batched.add(node)
        return region


def _used_outside(node: fx.Node, inside: set[fx.Node]) -> bool:
    """Whether ``node``'s value is used outside the region ``inside`` other than through
    sizes the region's own nodes query (those the region computes itself)."""
    for user in node.users:
        if user in inside:
            continue
        if not is_shape_query(user) or _used_outside(user, inside):
            return True
    return False


def _queries(size: fx.Node, tensors: set[fx.Node]) -> bool:
    """Whether the size ``size`` is of one of ``tensors`` (through a chain of sizes)."""
    for a in size.all_input_nodes:
        if a in tensors or (is_shape_query(a) and _queries(a, tensors)):
            return True
    return False


def _feeds(size: fx.Node, needed: set[fx.Node]) -> bool:
    """Whether ``size`` is used by a node in ``needed`` (it stays in the region)."""
    return any(u in needed for u in size.users)


def attribute_of(gm: nn.Module, target: str) -> object:
    """``gm``'s attribute at the dotted ``target`` (a parameter, buffer or module)."""
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _kind(members: list[fx.Node], inputs: set[fx.Node]) -> type[Region]:
    """The most specific region type all of ``members`` allow (see :mod:`hbpkit.regions`)."""
    depends = set(inputs)  # nodes that depend on a tensor input of the region
    selection, linear = True, True
    for n in members:
        if any(a in depends for a in n.all_input_nodes):
            depends.add(n)
        if n.op == "get_attr" or is_shape_query(n):
            continue
        if n.op == "call_module":
            selection = linear = False
            continue
        if n.op == "call_function" and n.target is getattr:
            selection &= n.args[1] in SELECTION_ATTRIBUTES
            continue
        if _listed(n, SELECTION_METHODS, SELECTION_FUNCTIONS):
            continue
        selection = False
        if _listed(n, LINEAR_METHODS, LINEAR_FUNCTIONS):
            continue
        if (
            _listed(n, BILINEAR_METHODS, BILINEAR_FUNCTIONS)
            and sum(a in depends for a in n.all_input_nodes) <= 1
        ):
            continue
        linear = False
    if selection:
        return SelectionRegion
    return LinearRegion if linear else Region


def _listed(node: fx.Node, methods: set[str], functions: set[Callable]) -> bool:
    if node.op == "call_method":
        return node.target in methods
    try:
        return node.target in functions
    except TypeError:  # an unhashable target
        return False


def _source(members: list[fx.Node]) -> str:
    for n in members:
        frames = [
            line.strip()
            for line in (n.stack_trace or "").splitlines()
            if line.strip().startswith('File "') and "/torch/" not in line
        ]
        if frames:
            path, _, rest = frames[-1][len('File "') :].partition('", line ')
            return f"{path.rsplit('/', 1)[-1]}:{rest.split(',')[0]}"
    return ""
