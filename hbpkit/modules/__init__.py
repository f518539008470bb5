"""Derivative rules, one file per family of modules.

Each rules object implements the Jacobian products, residuals and parameter
derivatives of one module type (see :class:`ModuleRules`); the extension
families map module types to these objects (``hbpkit/extensions``).
"""

from torch import nn

from hbpkit.modules.activations import ACTIVATIONS, ElementwiseRules, IdentityRules
from hbpkit.modules.base import DiagonalFactor, LossRules, ModuleRules, SqrtFactor, UnsupportedRules
from hbpkit.modules.conv import CONVOLUTIONS
from hbpkit.modules.embedding import EmbeddingRules
from hbpkit.modules.linear import LinearRules
from hbpkit.modules.losses import BCEWithLogitsLossRules, CrossEntropyLossRules, MSELossRules
from hbpkit.modules.normalization import NORMALIZATION
from hbpkit.modules.padding import PADDING
from hbpkit.modules.pooling import POOLING
from hbpkit.modules.reshape import DropoutRules, FlattenRules
from hbpkit.modules.sum import SumRules
from hbpkit.nn import Sum

LINEAR = LinearRules()

ATTENTION_REASON = (
    "attention multiplies two linear maps of its input (queries and keys) inside a softmax "
    "over positions, and hbpkit has no rules for it yet; the supported-modules page of the "
    "docs (docs/supported-modules.md) lists what is supported"
)

#: rules of every module with parameters (per-sample gradients need only these)
PARAMETRIC: dict[type, ModuleRules] = {nn.Linear: LINEAR, **CONVOLUTIONS}
PARAMETRIC.update(NORMALIZATION)
PARAMETRIC[nn.Embedding] = EmbeddingRules()
PARAMETRIC[nn.MultiheadAttention] = UnsupportedRules(
    ATTENTION_REASON, "refused before the backward pass: attention has no rules yet"
)

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
}

__all__ = [
    "ACTIVATIONS",
    "DiagonalFactor",
    "BACKPROPAGATABLE",
    "PARAMETRIC",
    "ElementwiseRules",
    "IdentityRules",
    "LinearRules",
    "LossRules",
    "ModuleRules",
    "SqrtFactor",
    "SumRules",
]
