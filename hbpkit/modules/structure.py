"""What a module's rules say about structured forms of curvature and the memory budget.

Not the module's maths (that is :class:`~hbpkit.modules.base.ModuleRules`), but how that
maths meets the representations of :mod:`hbpkit.curvature`: whether diagonal factors stay
diagonal, whether local factors (``curvature/local.py``) pass through as local steps,
whether batch-averaged curvature can travel as exact position blocks
(``curvature/blocks.py``), and which dense tensors the module would form (checked against
the pass's :class:`~hbpkit.curvature.memory.MemoryPolicy` before anything is computed).
The pass's plan (``engine/plan.py``) asks these questions once per call.
"""

from __future__ import annotations

from torch import Tensor

from hbpkit.core.calls import ModuleCall, describe
from hbpkit.curvature.blocks import PositionBlocks
from hbpkit.curvature.memory import RAISE_BUDGET, DenseBudgetError


class StructuredForms:
    """The defaults: no structured forms, nothing to densify. ``ModuleRules`` inherits them."""

    #: whether :meth:`kron_from_average` takes position blocks (``kfac_approx="expand"``)
    kron_from_blocks: bool = False
    #: ``call.cache`` keys that only parameter quantities read: dropped before the
    #: curvature is backpropagated, so they and the backpropagated factors are not
    #: alive together (e.g. a convolution's unfolded input)
    param_only_cache: tuple[str, ...] = ()

    @property
    def keeps_diagonal(self) -> bool:
        """Whether :meth:`jac_t_factor` keeps a :class:`DiagonalFactor` diagonal."""
        return self.diagonal_jacobian

    def check_budget(self, call: ModuleCall, batch_averaged: bool, diagonal_factors: bool) -> None:
        """Refuse before the backward pass if this module would densify too much.

        Called for every module curvature is backpropagated through, with whether a
        batch-averaged matrix and whether diagonal residual factors arrive at its
        output; raises :class:`~hbpkit.curvature.memory.DenseBudgetError`. Default: nothing
        to densify.
        """

    def check_residual_budget(self, call: ModuleCall, messages: list) -> None:
        """Refuse before the pass a residual (eq. 7) this module would form densely for
        ``messages`` (the pass's messages); default: nothing dense."""

    def supports_local(self, call: ModuleCall) -> bool:
        """Whether :meth:`local_step` backpropagates local factors through ``call``.

        Rules that do (convolutions, pooling, padding, elementwise modules) may
        receive a :class:`~hbpkit.curvature.local.LocalFactor` in
        :meth:`jac_t_factor`, :meth:`param_diag` and :meth:`kron_from_sqrt`; all other
        rules only ever see dense or diagonal factors.
        """
        return False

    def local_step(self, call: ModuleCall):
        """``J^T`` on local columns, a :class:`~hbpkit.curvature.local.LocalStep`."""
        raise self._missing("local_step")

    # batch-averaged position blocks (curvature/blocks.py) ----------------------------
    def ea_needs_blocks(self, call: ModuleCall) -> bool:
        """Whether batch-averaged backpropagation through ``call`` switches to position blocks.

        True where the dense ``mean_n J_n^T H J_n`` would exceed the memory budget and
        the module can give its exact position blocks instead; the budget error otherwise.
        """
        try:
            self.check_budget(call, True, False)
        except DenseBudgetError as dense_error:
            if not self.implements("ea_blocks"):
                raise
            try:
                self.check_blocks(call, from_blocks=False)
            except NotImplementedError:
                raise dense_error from None
            return True
        return False

    def check_blocks(self, call: ModuleCall, from_blocks: bool) -> None:
        """Raise :class:`DenseBudgetError` unless :meth:`ea_blocks` is exact for ``call``.

        ``from_blocks``: whether the output curvature arrives as position blocks
        (else dense).
        """
        arrives = "position blocks" if from_blocks else "a dense matrix"
        raise DenseBudgetError(
            f"{describe(call.module)} cannot backpropagate batch-averaged curvature that "
            f"arrives as {arrives} exactly in position blocks (the dense form exceeds the "
            "memory budget, "
            "MemoryPolicy.max_dense_bytes); use a per-sample extension (KFLR, KFAC) "
            f"or raise the budget with {RAISE_BUDGET}"
        )

    def ea_blocks(self, call: ModuleCall, mat: Tensor | PositionBlocks) -> PositionBlocks:
        """The position blocks of ``mean_n J_n^T mat J_n`` (``mat`` dense or blocks), exact."""
        raise self._missing("ea_blocks")
