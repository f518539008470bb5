"""Traceable twins of ``torch.nn``'s attention modules: the same function, the same parameters.

:func:`hbpkit.convert` replaces a call of ``nn.MultiheadAttention`` (self-attention),
``nn.TransformerEncoderLayer``, ``nn.TransformerEncoder`` and ``nn.TransformerDecoderLayer``
by the inlined graph of its twin (``hbpkit/engine/attention.py``). In the twin the
projections are ordinary modules with rules (Kronecker factors included) and the attention
itself is functional code, which ``convert`` turns into a parameter-free region (the
generic path, ``hbpkit/modules/generic.py``).

Shapes: ``N`` samples, ``T`` tokens (queries), ``S`` keys, ``E`` embedding, ``H`` heads,
``d = E / H``. Internally every tensor is batch-first, ``[N, T, E]``.

Multi-head self-attention (Vaswani et al., 2017), with ``x`` ``[N, T, E]``:

``[q, k, v] = x W_in^T + b_in`` (one ``nn.Linear(E, 3E)`` whose ``weight`` / ``bias`` ARE the
module's ``in_proj_weight`` / ``in_proj_bias``), per head ``h``
``o_h = softmax(q_h k_h^T / sqrt(d) + M) v_h``, and ``out = [o_1 ... o_H] W_out^T + b_out``
(the module's own ``out_proj``). ``M`` is the additive mask (``attn_mask``,
``key_padding_mask``, ``-inf`` where a boolean mask is ``True``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from hbpkit.branching import Sum

#: the functions ``nn.TransformerEncoderLayer`` stores as ``activation``, as modules
ACTIVATIONS = {F.relu: nn.ReLU, F.gelu: nn.GELU}


class AttentionDropout(nn.Dropout):
    """``nn.Dropout(p)`` on the attention weights ``[N, H, T, S]``, active exactly when the
    attention module ``owner`` is in train mode (it follows ``owner.train()`` / ``eval()``)."""

    def __init__(self, owner: nn.MultiheadAttention) -> None:
        super().__init__(owner.dropout)
        object.__setattr__(self, "_owner", owner)  # not a child: its parameters stay its own

    @property
    def training(self) -> bool:  # type: ignore[override]
        return self._owner.training

    @training.setter
    def training(self, mode: bool) -> None:  # set by nn.Module.__init__ / train(): follow owner
        pass


@fx.wrap
def attention_mask(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    num_heads: int,
    pad: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """The additive mask ``M`` of the attention logits, broadcastable to ``[N, H, T, S]``.

    ``attn_mask``: ``[T, S]`` or ``[N * H, T, S]``, boolean (``True``: masked) or additive;
    ``key_padding_mask`` ``[N, S]``; ``pad``: key columns appended after the masks were
    made (``add_bias_kv``, ``add_zero_attn``), never masked; ``dtype``: the queries'. As
    ``F.multi_head_attention_forward`` merges them. The masks are not differentiated.
    """
    kpm = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=dtype,
    )
    mask = F._canonical_mask(
        mask=attn_mask,
        mask_name="attn_mask",
        other_type=None,
        other_name="",
        target_type=dtype,
        check_other=False,
    )
    if mask is not None:
        if mask.dim() == 2:
            mask = mask.reshape(1, 1, *mask.shape)
        elif mask.dim() == 3 and mask.shape[0] % num_heads == 0:
            mask = mask.reshape(-1, num_heads, *mask.shape[1:])  # [N, H, T, S]
        else:
            raise NotImplementedError(
                f"attn_mask of shape {tuple(mask.shape)}: hbpkit needs [T, S] or "
                f"[N * num_heads, T, S] with num_heads = {num_heads}"
            )
        mask = F.pad(mask, (0, pad))
    if kpm is not None:
        kpm = F.pad(kpm, (0, pad))
        kpm = kpm.reshape(kpm.shape[0], 1, 1, kpm.shape[1])
        mask = kpm if mask is None else mask + kpm
    return mask


class SelfAttentionTwin(nn.Module):
    """``nn.MultiheadAttention`` for self-attention (``query is key is value``) with one
    packed input projection, as traceable code.

    ``forward(x, attn_mask, key_padding_mask) -> (out, weights)``, the module's outputs:
    ``out`` in its layout (``[N, T, E]`` if ``batch_first`` else ``[T, N, E]``),
    ``weights`` ``[N, T, S]`` (averaged over heads) or ``[N, H, T, S]`` where ``need_weights``,
    else ``None``. The options of the call are fixed when the twin is made.

    Attention through ``F.scaled_dot_product_attention`` as the module computes it, or in
    explicit form (``softmax`` then ``@ v``) where the weights are returned or dropout is
    applied to them (an :class:`AttentionDropout` module between the two).
    """

    def __init__(
        self,
        mha: nn.MultiheadAttention,
        need_weights: bool = False,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        has_attn_mask: bool = False,
        has_key_padding_mask: bool = False,
    ) -> None:
        super().__init__()
        if not mha._qkv_same_embed_dim:
            raise ValueError("the twin needs the packed in_proj_weight (kdim = vdim = embed_dim)")
        E = mha.embed_dim
        self.in_proj = nn.Linear(E, 3 * E, bias=mha.in_proj_bias is not None)
        self.in_proj.weight = mha.in_proj_weight  # the same Parameter objects
        self.in_proj.bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        # in a child: a module with parameters of its own is recorded as a whole by extend()
        self.kv_bias = (
            None if mha.bias_k is None else nn.ParameterDict({"k": mha.bias_k, "v": mha.bias_v})
        )
        self.dropout = AttentionDropout(mha) if mha.dropout > 0 else None
        self.num_heads, self.embed_dim = mha.num_heads, E
        self.batch_first, self.add_zero_attn = mha.batch_first, mha.add_zero_attn
        self.need_weights, self.average_attn_weights = need_weights, average_attn_weights
        self.has_attn_mask, self.has_key_padding_mask = has_attn_mask, has_key_padding_mask
        if is_causal and not has_attn_mask:
            raise ValueError("is_causal needs attn_mask (as nn.MultiheadAttention)")
        # the module's own choice: the causal hint replaces the mask only without a padding
        # mask and without weights (F.multi_head_attention_forward)
        self.causal = is_causal and not has_key_padding_mask and not need_weights

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        if not self.batch_first:
            x = x.transpose(0, 1)
        q, k, v = self.in_proj(x).chunk(3, dim=-1)  # [N, T, E] each
        pad = 0
        if self.kv_bias is not None:
            k = torch.cat([k, self.kv_bias["k"].expand_as(k[:, :1])], dim=1)
            v = torch.cat([v, self.kv_bias["v"].expand_as(v[:, :1])], dim=1)
            pad += 1
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        if self.add_zero_attn:  # [N, H, S, d]
            k = torch.cat([k, torch.zeros_like(k[:, :, :1])], dim=2)
            v = torch.cat([v, torch.zeros_like(v[:, :, :1])], dim=2)
            pad += 1
        mask = None
        if (self.has_attn_mask and not self.causal) or self.has_key_padding_mask:
            mask = attention_mask(
                attn_mask if self.has_attn_mask and not self.causal else None,
                key_padding_mask if self.has_key_padding_mask else None,
                self.num_heads,
                pad,
                x.dtype,
            )
        weights = None
        if self.need_weights or self.dropout is not None:
            d = self.embed_dim // self.num_heads
            logits = (q * math.sqrt(1.0 / d)) @ k.transpose(-2, -1)
            if mask is not None:
                logits = logits + mask
            elif self.has_attn_mask:  # causal hint and dropout: the mask as given
                logits = logits + attention_mask(attn_mask, None, self.num_heads, pad, x.dtype)
            weights = torch.softmax(logits, dim=-1)
            if self.dropout is not None:
                weights = self.dropout(weights)
            o = weights @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        out = self.out_proj(o.transpose(1, 2).flatten(2))  # [N, T, E]
        if not self.batch_first:
            out = out.transpose(0, 1)
        if self.need_weights and self.average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights if self.need_weights else None


class EncoderLayerTwin(nn.Module):
    """``nn.TransformerEncoderLayer`` as traceable code (its slow path, eq. of Vaswani et
    al., 2017, with pre-norm where ``norm_first``), the layer's own submodules and a
    :class:`SelfAttentionTwin` for ``self_attn``; the residual additions are
    :class:`hbpkit.branching.Sum` modules, an ``F.relu`` / ``F.gelu`` activation the module.

    ``forward(src, src_mask, src_key_padding_mask) -> [N, T, E]`` (or ``[T, N, E]``).
    """

    def __init__(
        self,
        layer: nn.TransformerEncoderLayer,
        has_mask: bool = False,
        has_key_padding_mask: bool = False,
        is_causal: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = SelfAttentionTwin(
            layer.self_attn,
            is_causal=is_causal,
            has_attn_mask=has_mask,
            has_key_padding_mask=has_key_padding_mask,
        )
        self.linear1, self.linear2 = layer.linear1, layer.linear2
        self.norm1, self.norm2 = layer.norm1, layer.norm2
        self.dropout, self.dropout1, self.dropout2 = layer.dropout, layer.dropout1, layer.dropout2
        # the layer's activation as a module with rules where it is F.relu / F.gelu
        self.activation = ACTIVATIONS.get(layer.activation, lambda: layer.activation)()
        self.residual1, self.residual2 = Sum(), Sum()  # the two ``x + block(x)``
        self.norm_first = layer.norm_first

    def _sa_block(self, x: Tensor, mask: Tensor | None, kpm: Tensor | None) -> Tensor:
        return self.dropout1(self.self_attn(x, mask, kpm)[0])

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        x = src
        if self.norm_first:
            x = self.residual1(x, self._sa_block(self.norm1(x), src_mask, src_key_padding_mask))
            return self.residual2(x, self._ff_block(self.norm2(x)))
        x = self.norm1(self.residual1(x, self._sa_block(x, src_mask, src_key_padding_mask)))
        return self.norm2(self.residual2(x, self._ff_block(x)))


class EncoderTwin(nn.Module):
    """``nn.TransformerEncoder``: its layers' :class:`EncoderLayerTwin` s, then its ``norm``.

    ``forward(src, mask, src_key_padding_mask)``. The module's ``is_causal=None`` (the mask
    is examined) is the mask itself here: the same function. The nested-tensor fast path
    (eval mode without gradients, with a padding mask) returns zeros at padded positions;
    the twin computes the layers' ordinary path, as the module does with gradients.
    """

    def __init__(
        self,
        encoder: nn.TransformerEncoder,
        has_mask: bool = False,
        has_key_padding_mask: bool = False,
        is_causal: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayerTwin(layer, has_mask, has_key_padding_mask, is_causal)
            for layer in encoder.layers
        )
        self.norm = encoder.norm

    def forward(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        x = src
        for layer in self.layers:
            x = layer(x, mask, src_key_padding_mask)
        return x if self.norm is None else self.norm(x)


class DecoderLayerTwin(nn.Module):
    """``nn.TransformerDecoderLayer`` as traceable code: a :class:`SelfAttentionTwin` for
    ``self_attn``, the layer's own ``multihead_attn`` for the cross-attention (a call of the
    whole module: its packed weight serves queries and keys of different tensors), its
    other submodules, :class:`hbpkit.branching.Sum` for the three residual additions.

    ``forward(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
    memory_key_padding_mask) -> [N, T, E]`` (or ``[T, N, E]``).
    """

    def __init__(
        self,
        layer: nn.TransformerDecoderLayer,
        masks: tuple[bool, bool, bool, bool] = (False, False, False, False),
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> None:
        super().__init__()
        self.masks = masks  # which of the four masks are given
        self.self_attn = SelfAttentionTwin(
            layer.self_attn,
            is_causal=tgt_is_causal,
            has_attn_mask=masks[0],
            has_key_padding_mask=masks[2],
        )
        self.multihead_attn, self.memory_is_causal = layer.multihead_attn, memory_is_causal
        self.linear1, self.linear2 = layer.linear1, layer.linear2
        self.norm1, self.norm2, self.norm3 = layer.norm1, layer.norm2, layer.norm3
        self.dropout, self.dropout1 = layer.dropout, layer.dropout1
        self.dropout2, self.dropout3 = layer.dropout2, layer.dropout3
        self.activation = ACTIVATIONS.get(layer.activation, lambda: layer.activation)()
        self.residual1, self.residual2, self.residual3 = Sum(), Sum(), Sum()
        self.norm_first = layer.norm_first

    def _sa_block(self, x: Tensor, mask: Tensor | None, kpm: Tensor | None) -> Tensor:
        return self.dropout1(self.self_attn(x, mask, kpm)[0])

    def _mha_block(
        self, x: Tensor, memory: Tensor, mask: Tensor | None, kpm: Tensor | None
    ) -> Tensor:
        out = self.multihead_attn(
            x,
            memory,
            memory,
            attn_mask=mask,
            key_padding_mask=kpm,
            is_causal=self.memory_is_causal,
            need_weights=False,
        )[0]
        return self.dropout2(out)

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        given = (tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask)
        tgt_mask, memory_mask, tgt_kpm, memory_kpm = (
            m if has else None for m, has in zip(given, self.masks)
        )
        x = tgt
        if self.norm_first:
            x = self.residual1(x, self._sa_block(self.norm1(x), tgt_mask, tgt_kpm))
            x = self.residual2(x, self._mha_block(self.norm2(x), memory, memory_mask, memory_kpm))
            return self.residual3(x, self._ff_block(self.norm3(x)))
        x = self.norm1(self.residual1(x, self._sa_block(x, tgt_mask, tgt_kpm)))
        x = self.norm2(self.residual2(x, self._mha_block(x, memory, memory_mask, memory_kpm)))
        return self.norm3(self.residual3(x, self._ff_block(x)))
