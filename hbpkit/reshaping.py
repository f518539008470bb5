"""Modules for losses as users write them: :class:`MergeBatch`, :class:`ReducedLoss`.

hbpkit sees modules, not functional operations. A GPT's next-token loss

    F.cross_entropy(logits.view(-1, C), targets.view(-1))

merges the batch dimension with the token dimension; written with these modules it is

    loss_fn = ReducedLoss(nn.CrossEntropyLoss(reduction="none"), reduce="mean")
    loss = loss_fn(MergeBatch()(logits), targets.view(-1))   # or nn.CrossEntropyLoss()

and ``(loss_fn_none(x, y) * w).sum()`` is ``ReducedLoss(loss_fn_none, "sum")(x, y, w)``.
``hbpkit.convert`` rewrites these patterns. The rules: ``hbpkit/modules/batch_reshape.py``
and ``hbpkit/modules/losses.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MergeBatch(nn.Module):
    """``[N, T, *f] -> [N T, *f]``: merge the batch dimension with the next one.

    The model's samples stay the ``N`` sequences: the rules backpropagate every
    per-sample quantity (per-sample gradients, GGN and Hessian diagonals, Kronecker
    factors, curvature products) of the sequences, exactly. Put it directly in front of
    the loss: modules with parameters behind it see the ``N T`` tokens as samples.

    Args:
        dims: the number of dimensions the input must have (``hbpkit.convert`` rewrites
            ``x.view(-1, C)`` into ``MergeBatch(dims=3)``: the same only for ``[N, T, C]``),
            or ``None`` for any ``[N, T, *f]``.
    """

    def __init__(self, dims: int | None = None) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or (self.dims is not None and x.dim() != self.dims):
            need = "[N, T, *f]" if self.dims is None else f"{self.dims} dimensions [N, T, C]"
            raise ValueError(
                f"MergeBatch needs an input of {need}, got shape {tuple(x.shape)} (where "
                "hbpkit.convert rewrote x.view(-1, C): write x.flatten(0, 1) for sequences)"
            )
        return x.flatten(0, 1)


class ReducedLoss(nn.Module):
    """``L = reduce_i(w_i l_i)`` over the entries of ``loss(input, target)``, an unreduced loss.

    Args:
        loss: a loss module with ``reduction="none"`` (``nn.MSELoss``,
            ``nn.CrossEntropyLoss``, ``nn.BCEWithLogitsLoss``).
        reduce: ``"sum"`` or ``"mean"`` (divides by the number of entries of the
            unreduced loss, whatever the weights).

    ``forward(input, target, weight=None)``: ``weight`` (positional, so that the
    rules see it) is a number, ``[N]`` (one per sample) or of the unreduced loss's shape;
    it may be negative (the curvature is then signed) and must not require grad.
    """

    def __init__(self, loss: nn.Module, reduce: str = "sum") -> None:
        super().__init__()
        if getattr(loss, "reduction", None) != "none":
            raise ValueError(
                "ReducedLoss needs a loss with reduction='none', got "
                f"{type(loss).__name__}(reduction={getattr(loss, 'reduction', None)!r})"
            )
        if reduce not in ("sum", "mean"):
            raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
        self.loss = loss
        self.reduce = reduce

    def forward(
        self, input: Tensor, target: Tensor, weight: Tensor | float | None = None
    ) -> Tensor:
        per = self.loss(input, target)
        if weight is not None:
            if isinstance(weight, Tensor) and weight.requires_grad:
                raise ValueError(
                    "ReducedLoss: the loss weight requires grad; its curvature is not the loss's "
                    "(pass weight.detach() if it is data)"
                )
            weight = torch.as_tensor(weight, dtype=per.dtype, device=per.device)
            if weight.dim() == 1 and per.dim() > 1 and weight.shape[0] == per.shape[0]:
                weight = weight.reshape(-1, *([1] * (per.dim() - 1)))
            per = per * weight
        return per.sum() if self.reduce == "sum" else per.mean()

    def extra_repr(self) -> str:
        return f"reduce={self.reduce!r}"
