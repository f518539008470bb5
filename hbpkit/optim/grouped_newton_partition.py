"""Partitions of the parameters into ``S`` subsets for :class:`~hbpkit.optim.GroupedNewton`.

A partition is the matrix ``I_{S:P}`` of the GroupedNewton paper (section 4.1):
``(I_{S:P})_{sp} = 1`` if scalar parameter ``p`` belongs to subset ``s``. It is
stored per parameter tensor, either as one subset id for the whole tensor (the
tensor-wise partitions: canonical, trivial, weights-biases, blocks-k, explicit
lists of tensors) or as a ``LongTensor`` shaped like the parameter with one
subset id per scalar (the discrete partition, ``S = P``).

Named partitions (paper, appendix K), for parameters in the order given:

* ``"canonical"``: every tensor its own subset (each weight and each bias), ``S = #tensors``;
* ``"trivial"``: one subset, ``S = 1`` (with ``damping_int=0``: Cauchy's steepest descent);
* ``"weights-biases"``: all tensors with ``ndim >= 2`` in one subset, all others in a second;
* ``"blocks-k"`` (e.g. ``"blocks-2"``): the weight tensors (``ndim >= 2``) are cut into
  ``k`` consecutive chunks and so are the biases (``ndim < 2``), ``S = 2k`` (fewer if
  there are fewer tensors). The paper keeps VGG's final layer apart (its ``+2``); pass
  explicit subsets for that;
* ``"discrete"``: every scalar its own subset, ``S = P`` (with ``damping_int=0``: Newton's
  method); meant for tiny models and tests.

An explicit partition is a list of lists of parameter tensors, each tensor in exactly
one list.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

NAMED_PARTITIONS = ("canonical", "trivial", "weights-biases", "blocks-k", "discrete")


class Partition:
    """``I_{S:P}`` for a list of parameter tensors.

    Args:
        params: the parameter tensors, in order.
        subset_of: for each tensor, its subset id (``int``) or a ``LongTensor`` shaped like
            it with one subset id per scalar.
        labels: a name per subset (``S`` of them), for printing.
    """

    def __init__(
        self, params: Sequence[Tensor], subset_of: Sequence[int | Tensor], labels: Sequence[str]
    ) -> None:
        if len(subset_of) != len(params):
            raise ValueError(f"{len(subset_of)} subset ids for {len(params)} parameter tensors")
        self.size = len(labels)
        self.labels = list(labels)
        self.subset_of = list(subset_of)
        used = set()
        for p, s in zip(params, self.subset_of):
            if isinstance(s, Tensor):
                if s.shape != p.shape or s.dtype != torch.long:
                    raise ValueError("a per-scalar subset index must be a LongTensor shaped like p")
                used.update(s.unique().tolist())
            else:
                used.add(s)
        if used != set(range(self.size)):
            raise ValueError(f"subset ids {sorted(used)} do not cover 0..{self.size - 1} exactly")

    def reduce(self, tensors: Sequence[Tensor | None]) -> Tensor:
        """``I_{S:P} v``: the sum of each subset's entries of ``v`` (given per tensor), ``[S]``.

        ``None`` entries count as zeros. Differentiable (used with graphs for ``H_bar``).
        """
        present = [t for t in tensors if t is not None]
        if not present:
            raise ValueError("reduce() needs at least one tensor")
        zero = present[0].new_zeros(())
        per_subset: list[list[Tensor]] = [[] for _ in range(self.size)]
        scattered = []
        for t, s in zip(tensors, self.subset_of):
            if t is None:
                continue
            if isinstance(s, Tensor):
                scattered.append(t.new_zeros(self.size).index_add(0, s.flatten(), t.flatten()))
            else:
                per_subset[s].append(t.sum())
        out = torch.stack([sum(terms, zero) for terms in per_subset])
        return out + sum(scattered) if scattered else out

    def expand(self, eta: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
        """``I_{P:S} eta`` per tensor: each scalar gets its subset's entry of ``eta [S]``."""
        out = []
        for p, s in zip(like, self.subset_of):
            if isinstance(s, Tensor):
                out.append(eta.to(p)[s.to(p.device)])
            else:
                out.append(eta[s].to(p).expand(p.shape))
        return out

    def members(self, s: int) -> list[int]:
        """Indices of the tensors that hold scalars of subset ``s``."""
        out = []
        for i, sub in enumerate(self.subset_of):
            if bool((sub == s).any()) if isinstance(sub, Tensor) else sub == s:
                out.append(i)
        return out

    def restrict(self, tensors: Sequence[Tensor], s: int) -> list[Tensor]:
        """``v`` with every entry outside subset ``s`` set to zero (per tensor)."""
        out = []
        for t, sub in zip(tensors, self.subset_of):
            if isinstance(sub, Tensor):
                out.append(t * (sub == s).to(t))
            else:
                out.append(t if sub == s else torch.zeros_like(t))
        return out


def _chunks(indices: list[int], k: int) -> list[list[int]]:
    """``indices`` cut into ``min(k, len)`` consecutive chunks of sizes differing by <= 1."""
    k = min(k, len(indices))
    return [list(c) for c in torch.arange(len(indices)).tensor_split(k)] if k else []


def build_partition(
    params: Sequence[Tensor], partition: str | Sequence[Sequence[Tensor]]
) -> Partition:
    """The :class:`Partition` named by ``partition`` (see the module docstring) for ``params``."""
    shapes = [tuple(p.shape) for p in params]
    if isinstance(partition, str):
        if partition == "canonical":
            labels = [f"tensor {i} {list(shape)}" for i, shape in enumerate(shapes)]
            return Partition(params, list(range(len(params))), labels)
        if partition == "trivial":
            return Partition(params, [0] * len(params), ["all parameters"])
        if partition == "discrete":
            subset_of, start = [], 0
            for p in params:
                subset_of.append(
                    torch.arange(start, start + p.numel(), device=p.device).reshape(p.shape)
                )
                start += p.numel()
            return Partition(params, subset_of, [f"scalar {j}" for j in range(start)])
        blocks = re.fullmatch(r"blocks-([0-9]+)", partition)
        if partition == "weights-biases" or blocks:
            k = int(blocks.group(1)) if blocks else 1
            if k < 1:
                raise ValueError(f"partition={partition!r}: k must be a positive integer")
            subset_of: list[int] = [0] * len(params)
            labels: list[str] = []
            for kind, is_kind in (
                ("weights", lambda p: p.ndim >= 2),
                ("biases", lambda p: p.ndim < 2),
            ):
                idx = [i for i, p in enumerate(params) if is_kind(p)]
                chunks = _chunks(idx, k)
                for j, chunk in enumerate(chunks):
                    for pos in chunk:
                        subset_of[idx[pos]] = len(labels)
                    labels.append(kind if blocks is None else f"{kind} block {j}")
            return Partition(params, subset_of, labels)
        raise ValueError(
            f"partition={partition!r} is not one of {NAMED_PARTITIONS} (blocks-k with an integer "
            "k, e.g. 'blocks-2') nor a list of lists of parameters"
        )
    groups = [list(g) for g in partition]
    ids = {id(p): i for i, p in enumerate(params)}
    subset_of_: list[int | None] = [None] * len(params)
    for s, group in enumerate(groups):
        if not group:
            raise ValueError(f"partition subset {s} is empty")
        for p in group:
            i = ids.get(id(p))
            if i is None:
                raise ValueError(
                    f"partition subset {s} holds a tensor of shape {tuple(p.shape)} that is not "
                    "among the optimizer's parameters"
                )
            if subset_of_[i] is not None:
                raise ValueError(f"parameter {i} (shape {shapes[i]}) is in two partition subsets")
            subset_of_[i] = s
    missing = [i for i, s in enumerate(subset_of_) if s is None]
    if missing:
        raise ValueError(
            f"parameters {missing} (shapes {[shapes[i] for i in missing]}) are in no "
            "partition subset"
        )
    return Partition(params, subset_of_, [f"subset {s}" for s in range(len(groups))])
