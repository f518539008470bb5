"""Rules of :class:`hbpkit.branching.Sum`, ``z = x_1 + ... + x_k`` (supplement B.3).

The Jacobian w.r.t. every input is the identity and the module is linear, so
eq. (7) gives ``Hx_i = Hz`` for each input: the sum passes its output curvature
unchanged to every branch. The branches meet again where a tensor feeds several
consumers (the input of a residual block); the messages are merged there (see
``hbpkit/extensions/messages.py``), which gives the skip connection's
``Hx = (I + Dy)^T Hz (I + Dy) + sum_k Hy_k dz_k`` of B.3.
"""

from __future__ import annotations

from torch import Tensor

from hbpkit.core.calls import ModuleCall
from hbpkit.curvature.factors import Factor
from hbpkit.modules.base import ModuleRules


class SumRules(ModuleRules):
    """``z = sum_i x_i`` over inputs of one shape ``[N, *features]``: identity Jacobians.

    ``multi_input``: curvature is backpropagated to every input (the framework
    applies the rules to the sum of the inputs' tangents; valid because every
    input enters with the same Jacobian).
    """

    multi_input = True
    diagonal_jacobian = True

    def validate(self, call: ModuleCall) -> None:
        shapes = [
            tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__ for x in call.inputs
        ]
        if len(set(shapes)) != 1 or not isinstance(call.inputs[0], Tensor):
            raise NotImplementedError(
                f"{type(call.module).__name__} adds inputs of different shapes or types {shapes}; "
                "hbpkit needs tensors of one shape [N, *features] (no broadcasting)"
            )
        if call.inputs[0].dim() < 1:
            raise NotImplementedError(f"{type(call.module).__name__} needs batched inputs [N, *]")

    def jac_t_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        return mat

    def jac_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        return mat

    def jac_t_factor(self, call: ModuleCall, factor: Factor) -> Factor:
        return factor

    def ea_jac_t_mat_jac_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        return mat
