"""The extension base class: a savefield, a dispatch table, a per-parameter rule, and the
rule methods it needs (checked before a backward pass, listed in the docs' rule matrix)."""

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
    the full batch's. What the extension needs of the rules (:meth:`required_rules`,
    :meth:`required_loss_rules`) is checked before the backward pass computes anything.
    """

    savefield: str = ""
    table: DispatchTable
    message: Any = None
    #: how the savefield combines across processes (``hbpkit.collectives.Reduction``), read
    #: by ``hbpkit.distributed.all_reduce_quantities``; ``None``: no combination is known
    reduction: Any = None

    #: whether a parameter used by several calls (tied weights) gets its quantity from the
    #: contributions of its uses (:meth:`tied_contribution`, :meth:`combine_tied`)
    combines_tied_uses: bool = False

    def tied_contribution(
        self, rules: Any, call: ModuleCall, name: str, grad_output: Tensor, factors: Any = None
    ) -> Any:
        """What one use of a tied parameter contributes (see :attr:`combines_tied_uses`);
        ``factors``: the message at the call's output, by origin (sqrt factors)."""
        raise NotImplementedError

    def required_tied_rules(self, rules: Any) -> list[str]:
        """The rule methods :meth:`tied_contribution` calls on ``rules``."""
        return []

    def combine_tied(self, contributions: list[Any]) -> Any:
        """The quantity of a tied parameter from the contributions of all its uses."""
        raise NotImplementedError

    def tied_refusal(self, uses: list[tuple[Any, str]]) -> str | None:
        """Why the uses of one tied parameter, ``[(rules, name)]``, cannot be combined by
        this extension (checked before the pass), or ``None``."""
        return None

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

    def check(self, call: ModuleCall, rules: Any) -> None:
        """Refuse, before the pass, what this extension cannot compute for ``call`` with
        ``rules`` beyond a missing rule method (:meth:`required_rules`); default nothing."""

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

    # what the extension needs of the rules --------------------------------------------
    def required_param_rules(self, rules: Any) -> list[str]:
        """The rule methods :meth:`param_quantity` calls on ``rules``.

        ``rules``: the entry of :attr:`table` for a module with trainable parameters
        (its flags ``linear_in_input`` / ``linear_in_params`` may decide). Default: none
        (an extension that does not say is not checked before the pass).
        """
        return []

    def required_message_rules(self, rules: Any, branching: bool = False) -> list[str]:
        """The rule methods that carry :attr:`message` through a module towards its input.

        ``rules``: the module's curvature rules (``call.rules``); ``branching``: whether
        the pass runs through a branching graph (residual blocks, sums). Needed from every
        module between the loss and the first module with trainable parameters (that
        module excluded); none without a message.
        """
        return [] if self.message is None else self.message.required_rules(rules, branching)

    def required_loss_rules(self) -> list[str]:
        """The :class:`LossRules` methods that start :attr:`message` at the loss (none without)."""
        return [] if self.message is None else self.message.required_loss_rules()

    def required_rules(
        self, rules: Any, params: bool = True, messages: bool = True, branching: bool = False
    ) -> list[str]:
        """The rule methods this extension calls on a module's ``rules``, in order, once each.

        ``params``: the module has trainable parameters (:meth:`required_param_rules`);
        ``messages``: the message passes through it to its input
        (:meth:`required_message_rules`). A method in the result that ``rules`` does not
        implement (:func:`rules_implement`) is refused before the backward pass.
        """
        needed = self.required_param_rules(rules) if params else []
        if messages:
            needed += self.required_message_rules(rules, branching)
        return list(dict.fromkeys(needed))

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
