"""The extension base class: a savefield, a dispatch table and a per-parameter rule."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from hbpkit.core.calls import ModuleCall
from hbpkit.core.dispatch import DispatchTable


class Extension:
    """A quantity computed per parameter during ``backward()`` inside ``backprop(...)``.

    Subclasses set :attr:`savefield` (the parameter attribute that receives the
    result), :attr:`table` (which module types they support), if they
    backpropagate curvature, :attr:`message` (see ``messages.py``), and
    :attr:`reduction`, how the result of shards on several processes combines into
    the full batch's.
    """

    savefield: str = ""
    table: DispatchTable
    message: Any = None
    #: how the savefield combines across processes (``hbpkit.collectives.Reduction``), read
    #: by ``hbpkit.distributed.all_reduce_quantities``; ``None``: no combination is known
    reduction: Any = None

    @property
    def accepts_position_blocks(self) -> bool:
        """Whether the parameter quantity can be formed from position blocks.

        Batch-averaged curvature over a large feature map arrives as its exact
        position-diagonal blocks (``hbpkit.curvature.blocks``); an extension that needs
        the dense matrix says so here, and the pass refuses it up front.
        """
        return True

    @property
    def needs_backprop(self) -> bool:
        """Whether the extension backpropagates curvature from the loss."""
        return self.message is not None

    def param_quantity(
        self,
        rules: Any,
        call: ModuleCall,
        name: str,
        param: nn.Parameter,
        grad_output: Tensor,
        message: Any,
    ) -> Any:
        """The quantity for parameter ``name`` of ``call.module``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_mc_samples(mc_samples: int) -> int:
    """``mc_samples`` as a positive int, or ``ValueError``."""
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
    return mc_samples


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else ``ValueError`` naming the option."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")
    return value
