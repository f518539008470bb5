"""Attention modules of a traced model replaced by their twins' code (:mod:`hbpkit.attention`).

``torch.fx`` treats every ``torch.nn`` module as a leaf: ``nn.MultiheadAttention`` and
the transformer layers are single ``call_module`` nodes, which the generic path
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
* ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` (of such layers): always
  (their attention is self-attention), masks included;
* ``nn.TransformerDecoderLayer``: its self-attention as above; its cross-attention stays a
  call of its ``multihead_attn``, served as a whole by the generic path.

Other calls are kept as the whole module on the generic path: cross-attention (slices of one
packed weight cannot be the weights of separate ``nn.Linear`` modules), separate
``q/k/v_proj_weight``, options given as traced values rather than constants.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

from torch import fx, nn

from hbpkit.attention import DecoderLayerTwin, EncoderLayerTwin, EncoderTwin, SelfAttentionTwin

TWINS = (SelfAttentionTwin, EncoderLayerTwin, EncoderTwin, DecoderLayerTwin)


class _TwinTracer(fx.Tracer):
    """Traces into the twins (and their ``nn.ModuleList``); every other module
    (``nn.Linear``, ``nn.LayerNorm``, the attention dropout) is a leaf, called as in the model."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not isinstance(m, (*TWINS, nn.ModuleList))


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
        name = f"hbpkit_twin_{count + 1}"
        if made is not None and _replace(gm, node, name, made[1], _TwinTracer().trace(made[0])):
            gm.add_submodule(name, made[0])
            count += 1
    for node in gm.graph.nodes:  # calls kept whole, the twins' cross-attention included
        if node.op == "call_module" and type(gm.get_submodule(node.target)) in TWIN_MAKERS:
            _positional(gm.get_submodule(node.target), node)
    gm.graph.lint()


def _positional(module: nn.Module, node: fx.Node) -> None:
    """Pass every argument of a call kept whole positionally: a forward hook sees the
    positional inputs only, and the generic path replays the call from them (masks given
    by keyword would be lost)."""
    a = _bind(module, node)
    if a is not None:
        node.args, node.kwargs = tuple(a.values()), {}


def _bind(module: nn.Module, node: fx.Node) -> dict[str, Any] | None:
    """The call's arguments by name, defaults filled in; ``None`` if they do not bind."""
    try:
        bound = inspect.signature(module.forward).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _twin(module: nn.Module, node: fx.Node) -> tuple[nn.Module, tuple] | None:
    """The twin of the call ``node`` of ``module`` and the twin's inputs, or ``None``."""
    make = TWIN_MAKERS.get(type(module))  # exact types: a subclass may compute otherwise
    a = None if make is None else _bind(module, node)
    return None if a is None else make(module, node, a)


def _masks(a: dict[str, Any], mask: str, padding: str, causal: str) -> tuple | None:
    """The call's two masks (traced tensors or ``None``) and its causal hint (a constant),
    ``None`` where the twin cannot take them (the module refuses the hint without a mask)."""
    masks = (a[mask], a[padding])
    if not all(m is None or isinstance(m, fx.Node) for m in masks) or _traced(a[causal]):
        return None
    if a[causal] and masks[0] is None:
        return None
    return (*masks, bool(a[causal]))


def _traced(value: Any) -> bool:
    return isinstance(value, fx.Node)


def _attention_twin(mha: nn.MultiheadAttention, node: fx.Node, a: dict) -> tuple | None:
    x = a["query"]
    if not mha._qkv_same_embed_dim or not _traced(x) or a["key"] is not x or a["value"] is not x:
        return None  # cross-attention, separate q/k/v weights: the generic path, as a whole
    masks = _masks(a, "attn_mask", "key_padding_mask", "is_causal")
    if masks is None or _traced(a["need_weights"]) or _traced(a["average_attn_weights"]):
        return None
    weights_used = any(
        u.op == "call_function" and u.target is operator.getitem and u.args[1] == 1 and u.users
        for u in node.users
    )
    twin = SelfAttentionTwin(
        mha,
        need_weights=bool(a["need_weights"]) and weights_used,  # else as the module's output
        average_attn_weights=bool(a["average_attn_weights"]),
        is_causal=masks[2],
        has_attn_mask=masks[0] is not None,
        has_key_padding_mask=masks[1] is not None,
    )
    return twin, (x, *masks[:2])


def _encoder_layer_twin(layer: nn.TransformerEncoderLayer, node: fx.Node, a: dict):
    masks = _masks(a, "src_mask", "src_key_padding_mask", "is_causal")
    if masks is None or not _traced(a["src"]) or not layer.self_attn._qkv_same_embed_dim:
        return None
    twin = EncoderLayerTwin(layer, masks[0] is not None, masks[1] is not None, masks[2])
    return twin, (a["src"], *masks[:2])


def _encoder_twin(encoder: nn.TransformerEncoder, node: fx.Node, a: dict):
    masks = _masks(a, "mask", "src_key_padding_mask", "is_causal")
    layers = list(encoder.layers)
    if masks is None or not _traced(a["src"]):
        return None
    if not all(type(m) is nn.TransformerEncoderLayer for m in layers):
        return None
    if not all(m.self_attn._qkv_same_embed_dim for m in layers):
        return None
    twin = EncoderTwin(encoder, masks[0] is not None, masks[1] is not None, masks[2])
    return twin, (a["src"], *masks[:2])


def _decoder_layer_twin(layer: nn.TransformerDecoderLayer, node: fx.Node, a: dict):
    names = ("tgt_mask", "memory_mask", "tgt_key_padding_mask", "memory_key_padding_mask")
    tgt = _masks(a, "tgt_mask", "tgt_key_padding_mask", "tgt_is_causal")
    memory = _masks(a, "memory_mask", "memory_key_padding_mask", "memory_is_causal")
    if tgt is None or memory is None or not _traced(a["tgt"]) or not _traced(a["memory"]):
        return None
    if not layer.self_attn._qkv_same_embed_dim:
        return None
    masks = tuple(a[n] for n in names)
    twin = DecoderLayerTwin(layer, tuple(m is not None for m in masks), tgt[2], memory[2])
    return twin, (a["tgt"], a["memory"], *masks)


TWIN_MAKERS = {
    nn.MultiheadAttention: _attention_twin,
    nn.TransformerEncoderLayer: _encoder_layer_twin,
    nn.TransformerEncoder: _encoder_twin,
    nn.TransformerDecoderLayer: _decoder_layer_twin,
}


def _replace(gm: fx.GraphModule, node: fx.Node, name: str, inputs: tuple, graph: fx.Graph) -> bool:
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
