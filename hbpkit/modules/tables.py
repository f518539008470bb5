"""The dispatch tables: which derivative rules serve which module type, built here, once.

Every built-in module type hbpkit has rules for is listed in this file; nothing else
registers rules at import time. Users add their own types with :func:`register`
(``examples/custom_module.py``). A lookup walks the module's method resolution
order, so a subclass of ``nn.Linear`` is served by the ``nn.Linear`` rules.
"""

from __future__ import annotations

from torch import nn

from hbpkit.branching import Sum
from hbpkit.core.dispatch import DispatchTable
from hbpkit.modules.activations import ACTIVATIONS, IdentityRules
from hbpkit.modules.base import LossRules, ModuleRules
from hbpkit.modules.batch_reshape import RESHAPING
from hbpkit.modules.batchnorm import BATCHNORM
from hbpkit.modules.conv import CONVOLUTIONS
from hbpkit.modules.embedding import EmbeddingRules
from hbpkit.modules.generic import GenericRules
from hbpkit.modules.generic.recorded import RecordedGraphRules
from hbpkit.modules.linear import LinearRules
from hbpkit.modules.losses import BCEWithLogitsLossRules, CrossEntropyLossRules, MSELossRules
from hbpkit.modules.normalization import NORMALIZATION
from hbpkit.modules.padding import PADDING
from hbpkit.modules.pooling import POOLING
from hbpkit.modules.recurrent import RECURRENT
from hbpkit.modules.reshape import DropoutRules, FlattenRules
from hbpkit.modules.sum import SumRules
from hbpkit.regions import LinearRegion, RecordedOps, Region, SelectionRegion

LINEAR = LinearRules()

#: every module type without rules of its own: exact through autograd (modules/generic.py)
GENERIC = GenericRules()
#: parameter-free modules linear in their input whose every output entry copies an input entry
SELECTIONS = GenericRules(linear_in_input=True, structure="selection")

#: rules of every module with parameters (per-sample gradients need only these)
PARAMETRIC: dict[type, ModuleRules] = {nn.Linear: LINEAR, **CONVOLUTIONS}
PARAMETRIC.update(NORMALIZATION)
PARAMETRIC.update(BATCHNORM)
PARAMETRIC[nn.Embedding] = EmbeddingRules()
PARAMETRIC.update(RECURRENT)  # nn.LSTM, nn.GRU, nn.RNN (modules/recurrent.py)

#: rules of every module curvature can be backpropagated through
BACKPROPAGATABLE: dict[type, ModuleRules | LossRules] = {
    **PARAMETRIC,
    **ACTIVATIONS,
    **POOLING,
    **PADDING,
    nn.Identity: IdentityRules(),
    nn.Flatten: FlattenRules(),
    nn.Unflatten: FlattenRules(),
    nn.Dropout: DropoutRules(),
    nn.Dropout1d: DropoutRules(),
    nn.Dropout2d: DropoutRules(),
    nn.Dropout3d: DropoutRules(),
    nn.MSELoss: MSELossRules(),
    nn.CrossEntropyLoss: CrossEntropyLossRules(),
    nn.BCEWithLogitsLoss: BCEWithLogitsLossRules(),
    Sum: SumRules(),
    Region: GENERIC,
    LinearRegion: GenericRules(linear_in_input=True),
    SelectionRegion: SELECTIONS,
    RecordedOps: RecordedGraphRules(),
    nn.PixelShuffle: SELECTIONS,
    nn.PixelUnshuffle: SELECTIONS,
    nn.ChannelShuffle: SELECTIONS,
    nn.Upsample: GenericRules(linear_in_input=True),  # nearest: a selection; others mix
    nn.UpsamplingNearest2d: SELECTIONS,
    nn.UpsamplingBilinear2d: GenericRules(linear_in_input=True),
    **RESHAPING,
}


FIRST_ORDER = DispatchTable("first-order", PARAMETRIC, fallback=GENERIC)
"""Rules for per-sample gradients (BatchGrad, BatchL2, SumGradSquared, Variance)."""

SECOND_ORDER = DispatchTable("second-order", BACKPROPAGATABLE, fallback=GENERIC)
"""Rules that backpropagate curvature (diagonals, Kronecker factors, HBP, products)."""

FAMILIES = {"first_order": FIRST_ORDER, "second_order": SECOND_ORDER}


def register(module_type: type, rules: object, families: tuple[str, ...] | None = None) -> None:
    """Teach hbpkit a module type: ``rules`` implements its derivatives.

    ``rules`` is an instance of a subclass of :class:`hbpkit.modules.ModuleRules`
    (or :class:`hbpkit.modules.LossRules` for a loss). ``families`` picks the
    extension families (``"first_order"``, ``"second_order"``); default all.
    See ``examples/custom_module.py``.
    """
    names = tuple(FAMILIES) if families is None else families
    for name in names:
        if name not in FAMILIES:
            raise ValueError(f"unknown extension family {name!r}; choose from {sorted(FAMILIES)}")
        FAMILIES[name].register(module_type, rules)


def is_registered(module: nn.Module) -> bool:
    """Whether any family has rules for ``module``'s type (the generic path aside)."""
    return any(table.lookup(module, fallback=False) is not None for table in FAMILIES.values())
