"""Attention modules of a traced model replaced by their twins' code (:mod:`hbpkit.attention`).

``torch.fx`` treats every ``torch.nn`` module as a leaf: ``nn.MultiheadAttention`` and
``nn.TransformerEncoderLayer`` are single ``call_module`` nodes, which the generic path
differentiates as a whole (exact, but per-sample ``vmap`` and no Kronecker factors).
:func:`inline_twins` replaces each such node by the traced graph of a twin that computes the
same function with the same parameter objects: the projections become ``nn.Linear`` calls
(rules, Kronecker factors), the attention functional code that :func:`hbpkit.convert` then
cuts into a parameter-free region.

A call is replaced where its twin computes exactly what the module does:

* ``nn.MultiheadAttention``: self-attention (the same tensor as query, key and value) with
  the packed ``in_proj_weight`` (``kdim = vdim = embed_dim``), any ``attn_mask``,
  ``key_padding_mask``, ``is_causal``, ``need_weights``, ``average_attn_weights``,
  ``add_bias_kv``, ``add_zero_attn``, ``batch_first`` and dropout;
* ``nn.TransformerEncoderLayer``: always (its attention is self-attention), masks included.

Other calls are kept as the whole module on the generic path: cross-attention (slices of one
packed weight cannot be the weights of separate ``nn.Linear`` modules), separate
``q/k/v_proj_weight``, options given as traced values rather than constants.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

from torch import fx, nn

from hbpkit.attention import EncoderLayerTwin, SelfAttentionTwin


class _TwinTracer(fx.Tracer):
    """Traces into the twins; every other module (``nn.Linear``, ``nn.LayerNorm``, the
    attention dropout) is a leaf, called as in the model."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not isinstance(m, (SelfAttentionTwin, EncoderLayerTwin))


def inline_twins(gm: fx.GraphModule) -> None:
    """Replace every replaceable attention call of ``gm`` by its twin's graph, in place.

    The twins are added to ``gm`` as submodules ``hbpkit_twin_<i>`` (they hold the model's
    own submodules and parameters); the original modules stay where they are, uncalled.
    """
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        made = _twin(gm.get_submodule(node.target), node)
        if made is None:
            continue
        twin, inputs = made
        name = f"hbpkit_twin_{count + 1}"
        graph = _TwinTracer().trace(twin)
        if not _replace(gm, node, name, graph, inputs):
            continue
        gm.add_submodule(name, twin)
        count += 1
    if count:
        gm.graph.lint()


def _bind(module: nn.Module, node: fx.Node) -> dict[str, Any] | None:
    """The call's arguments by name, defaults filled in; ``None`` if they do not bind."""
    try:
        bound = inspect.signature(module.forward).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _constant(value: Any) -> bool:
    return not isinstance(value, fx.Node)


def _tensor_or_none(value: Any) -> bool:
    return value is None or isinstance(value, fx.Node)


def _twin(module: nn.Module, node: fx.Node) -> tuple[nn.Module, tuple] | None:
    """The twin of the call ``node`` of ``module`` and the twin's inputs, or ``None``."""
    if type(module) is nn.MultiheadAttention:
        a = _bind(module, node)
        if a is None or not module._qkv_same_embed_dim:
            return None
        x = a["query"]
        if not isinstance(x, fx.Node) or a["key"] is not x or a["value"] is not x:
            return None  # cross-attention: the generic path, as a whole
        options = ("need_weights", "average_attn_weights", "is_causal")
        if not all(_constant(a[k]) for k in options):
            return None
        masks = (a["attn_mask"], a["key_padding_mask"])
        if not all(_tensor_or_none(m) for m in masks) or (a["is_causal"] and masks[0] is None):
            return None  # the module refuses is_causal without a mask: let it say so
        twin = SelfAttentionTwin(
            module,
            need_weights=bool(a["need_weights"]),
            average_attn_weights=bool(a["average_attn_weights"]),
            is_causal=bool(a["is_causal"]),
            has_attn_mask=masks[0] is not None,
            has_key_padding_mask=masks[1] is not None,
        )
        return twin, (x, *masks)
    if type(module) is nn.TransformerEncoderLayer:
        a = _bind(module, node)
        if a is None or not module.self_attn._qkv_same_embed_dim:
            return None
        masks = (a["src_mask"], a["src_key_padding_mask"])
        if not isinstance(a["src"], fx.Node) or not _constant(a["is_causal"]):
            return None
        if not all(_tensor_or_none(m) for m in masks) or (a["is_causal"] and masks[0] is None):
            return None
        twin = EncoderLayerTwin(
            module,
            has_mask=masks[0] is not None,
            has_key_padding_mask=masks[1] is not None,
            is_causal=bool(a["is_causal"]),
        )
        return twin, (a["src"], *masks)
    return None


def _replace(gm: fx.GraphModule, node: fx.Node, name: str, graph: fx.Graph, inputs: tuple) -> bool:
    """Copy ``graph`` (the twin's, targets under ``name``) before ``node`` and let ``node``'s
    users use its output; ``False`` (nothing changed) where a user needs what the twin does
    not return as a node (a ``None`` output in use, the output tuple as a whole)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    (output,) = [n for n in graph.nodes if n.op == "output"]
    result = output.args[0]
    if isinstance(result, tuple):
        uses = {}
        for user in node.users:
            index = user.args[1] if user.target is operator.getitem else None
            if user.op != "call_function" or not isinstance(index, int):
                return False
            if user.users and not isinstance(result[index], fx.Node):
                return False
            uses[user] = index
    env: dict[fx.Node, Any] = dict(zip(placeholders, inputs))
    with gm.graph.inserting_before(node):
        for n in graph.nodes:
            if n.op in ("placeholder", "output"):
                continue
            args = fx.map_arg(n.args, env.__getitem__)
            kwargs = fx.map_arg(n.kwargs, env.__getitem__)
            target = f"{name}.{n.target}" if n.op in ("call_module", "get_attr") else n.target
            new = gm.graph.create_node(n.op, target, args, kwargs)
            new.meta = dict(n.meta)
            new.meta["stack_trace"] = node.meta.get("stack_trace")
            env[n] = new
    if isinstance(result, tuple):
        for user, index in uses.items():
            value = fx.map_arg(result[index], env.__getitem__)
            if user.users:
                user.replace_all_uses_with(value)
            gm.graph.erase_node(user)
    else:
        node.replace_all_uses_with(fx.map_arg(result, env.__getitem__))
    gm.graph.erase_node(node)
    return True
