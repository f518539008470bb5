"""Rules of modules that only move or mask entries: ``Flatten``, ``Dropout``.

Both have Jacobians that are permutations or diagonal masks, so their Hessian
vanishes and HBP reduces to ``Hx = J^T Hz J`` (eq. 7 without residual).
"""

from __future__ import annotations

from torch import Tensor, nn

from hbpkit.core.calls import ModuleCall
from hbpkit.modules.base import ModuleRules


class FlattenRules(ModuleRules):
    """``nn.Flatten`` (and ``nn.Unflatten``): a reshape of the features, ``vec`` is unchanged."""

    diagonal_jacobian = True

    def validate(self, call: ModuleCall) -> None:
        module = call.module
        if isinstance(module, nn.Flatten):
            start = module.start_dim % call.inputs[0].dim()
            if start == 0:
                raise NotImplementedError(
                    f"{module} flattens the batch dimension; use start_dim >= 1"
                )
        elif (
            isinstance(module, nn.Unflatten)
            and isinstance(module.dim, int)
            and module.dim % (call.inputs[0].dim()) == 0
        ):
            raise NotImplementedError(f"{module} reshapes the batch dimension")

    def jac_t_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        return mat.reshape(*mat.shape[:2], *call.inputs[0].shape[1:])

    def jac_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        return mat.reshape(*mat.shape[:2], *call.output_shape[1:])

    def ea_jac_t_mat_jac_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        return mat


class DropoutRules(ModuleRules):
    """``nn.Dropout``, ``nn.Dropout1d/2d/3d``: ``z = x * m``, ``m`` the forward pass's scaled mask.

    In eval mode ``m = 1``. In train mode ``m`` (``0`` or ``1/(1-p)``, broadcast over
    features for the channel-wise variants) is read from the autograd node of the
    output, which saved it for its own backward pass.
    """

    diagonal_jacobian = True

    def capture(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        if not module.training or module.p == 0:
            return None
        node = output.grad_fn
        for attr in ("_saved_other", "_saved_result1"):
            mask = getattr(node, attr, None)
            if mask is not None:
                scale = getattr(node, "_saved_scale", 1.0) if attr == "_saved_result1" else 1.0
                return mask.to(output.dtype) * scale
        raise NotImplementedError(
            f"cannot read the dropout mask of {module} from autograd node {type(node).__name__}; "
            "call model.eval() or remove the dropout layer"
        )

    def _mask(self, call: ModuleCall) -> Tensor | None:
        call._check_alive()
        return call.captured

    def jac_t_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        mask = self._mask(call)
        return mat if mask is None else mat * mask

    jac_mat_prod = jac_t_mat_prod

    def ea_jac_t_mat_jac_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        mask = self._mask(call)
        if mask is None:
            return mat
        N = call.inputs[0].shape[0]
        m = mask.expand(call.inputs[0].shape).reshape(N, -1)
        return mat * (m.T @ m) / N
