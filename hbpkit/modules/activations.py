"""Rules of elementwise activations ``z = phi(x)`` (eq. S.9).

``Dz(x) = diag[phi'(x)]`` and the residual of eq. (7) is ``diag[phi''(x) * dz]``.
The common activations have closed-form derivatives; every other elementwise
activation gets exact ``phi'`` and ``phi''`` from autograd on the detached
input (``phi`` acts elementwise, so ``d/dx_i sum_j phi(x_j) = phi'(x_i)``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from einops import einsum
from torch import Tensor, nn

from hbpkit.core.calls import ModuleCall
from hbpkit.curvature import workspace
from hbpkit.curvature.blocks import PositionBlocks
from hbpkit.curvature.local import LocalStep, ScaleStep, ShiftStep
from hbpkit.curvature.memory import policy_of
from hbpkit.modules.base import ModuleRules

Derivatives = Callable[[nn.Module, Tensor, bool], tuple[Tensor, Tensor | None]]


def _sigmoid(module: nn.Module, x: Tensor, second: bool) -> tuple[Tensor, Tensor | None]:
    s = torch.sigmoid(x)
    d1 = (1 - s).mul_(s)
    return d1, d1 * (1 - 2 * s) if second else None


def _tanh(module: nn.Module, x: Tensor, second: bool) -> tuple[Tensor, Tensor | None]:
    t = torch.tanh(x)
    d1 = 1 - t.square()
    return d1, -2 * t * d1 if second else None


def _sigmoid_of_output(s: Tensor, second: bool) -> tuple[Tensor, Tensor | None]:
    d1 = (1 - s).mul_(s)
    return d1, d1 * (1 - 2 * s) if second else None


def _tanh_of_output(t: Tensor, second: bool) -> tuple[Tensor, Tensor | None]:
    d1 = 1 - t.square()
    return d1, -2 * t * d1 if second else None


def _relu(module: nn.Module, x: Tensor, second: bool) -> tuple[Tensor, None]:
    return (x > 0).to(x.dtype), None


def _autograd(module: nn.Module, x: Tensor, second: bool) -> tuple[Tensor, Tensor | None]:
    """``phi'`` and (if ``second``) ``phi''`` of an elementwise module by nested autograd."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        out = type(module).forward(module, leaf)
        (d1,) = torch.autograd.grad(out.sum(), leaf, create_graph=second)
        d2 = None
        if second and d1.requires_grad:
            (d2,) = torch.autograd.grad(d1.sum(), leaf, allow_unused=True)
    if second and d2 is None:
        d2 = torch.zeros_like(x)
    return d1.detach(), d2


class ElementwiseRules(ModuleRules):
    """Rules of ``z = phi(x)`` applied elementwise (eq. S.9).

    Args:
        derivatives: ``(module, x, second) -> (phi'(x), phi''(x) or None)``; default
            autograd. ``phi''`` is needed only if ``second``.
        piecewise_linear: ``phi'' = 0`` almost everywhere (no residual term).
        of_output: ``(z, second) -> (phi'(x), phi''(x) or None)`` from the output
            ``z = phi(x)`` (sigmoid, tanh): the forward pass's output is kept (autograd keeps
            it too) and ``phi`` is not evaluated again.
        output_backward: ``(M, z) -> phi'(x) * M`` in one kernel from the output
            (``aten.sigmoid_backward``), used while ``phi'`` itself is not needed.
    """

    def __init__(
        self,
        derivatives: Derivatives = _autograd,
        piecewise_linear: bool = False,
        of_output: Callable[[Tensor, bool], tuple[Tensor, Tensor | None]] | None = None,
        output_backward: Callable[..., Tensor] | None = None,
    ):
        self._derivatives = derivatives
        self._of_output = of_output
        self._output_backward = output_backward
        self.linear_in_input = piecewise_linear
        self.diagonal_jacobian = True

    def capture(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        """The output ``z = phi(x)`` where the derivatives follow from it (no copy)."""
        return output.detach() if self._of_output is not None else None

    def _output(self, call: ModuleCall) -> Tensor | None:
        z = call.captured
        return z if isinstance(z, Tensor) and z.shape == call.inputs[0].shape else None

    def _d(self, call: ModuleCall, second: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(phi'(x), phi''(x))``; ``phi''`` only if ``second`` (the residual needs it,
        the Jacobian does not) and the activation is not piecewise linear."""
        second = second and not self.linear_in_input
        cached = call.cache.get("phi")
        if cached is None or (second and cached[1] is None):
            z = self._output(call) if self._of_output is not None else None
            if z is not None:
                call.cache["phi"] = self._of_output(z, second)
            else:
                call.cache["phi"] = self._derivatives(call.module, call.input, second)
        return call.cache["phi"]

    def jac_t_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        """``[V, N, *in] -> [V, N, *in]``: ``phi'(x) * M`` (S.9), written into ``M`` where the
        pass owns it (a consumed factor no one else holds, ``workspace.may_overwrite``), else
        into a workspace buffer; one kernel from the output where ``phi'`` is not needed
        otherwise."""
        z = None
        if self._output_backward is not None and "phi" not in call.cache:
            z = self._output(call)
        ref = self._d(call)[0] if z is None else z
        if mat.shape[1:] != ref.shape or mat.dtype != ref.dtype:
            return mat * self._d(call)[0]
        if workspace.may_overwrite(mat) and not mat.is_contiguous():  # a crop: compacted
            apply = partial(self._apply, ref, z is not None)
            out = workspace.compacted(mat, apply, policy_of(call).buffer_bytes)
            if out is not None:
                return out
        out = mat if workspace.may_overwrite(mat) else workspace.empty(mat.shape, mat)
        return self._apply(ref, z is not None, mat, slice(None), out)

    def _apply(
        self, ref: Tensor, of_output: bool, mat: Tensor, samples: slice, out: Tensor
    ) -> Tensor:
        """``phi' * mat`` into ``out`` for the ``samples`` of ``ref`` (``phi'``, or the output
        ``z`` if ``of_output``) that ``mat`` ``[V, n, *in]`` or ``[n, *in]`` holds."""
        if of_output:
            return self._output_backward(mat, ref[samples], grad_input=out)
        return torch.mul(mat, ref[samples], out=out)

    jac_mat_prod = jac_t_mat_prod

    def jac_mat_prod_channel(
        self, call: ModuleCall, mat: Tensor, channel: int
    ) -> tuple[Tensor, int | None]:
        """``phi'(x) * m`` on the tangent's one channel (S.9): it stays there."""
        return mat * self._d(call)[0][:, channel : channel + 1], channel

    # local columns (feature maps [N, C, *spatial]): multiply by phi' on every patch
    def supports_local(self, call: ModuleCall) -> bool:
        return call.inputs[0].dim() >= 3

    def local_step(self, call: ModuleCall) -> LocalStep:
        return ScaleStep(self._d(call)[0])

    # residual of eq. S.9: diag[phi''(x) * dz]
    def residual_diag(self, call: ModuleCall, grad_output: Tensor) -> Tensor | None:
        if self.linear_in_input:
            return None
        return self._d(call, second=True)[1] * grad_output

    # mean_n diag[phi'_n] H diag[phi'_n] = H * mean_n phi'_n phi'_n^T
    def ea_jac_t_mat_jac_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        d1 = self._d(call)[0].flatten(1)
        return mat * (d1.T @ d1) / d1.shape[0]

    def check_blocks(self, call: ModuleCall, from_blocks: bool) -> None:
        """Exact for any input: ``J_n`` is diagonal, so position blocks stay position blocks."""

    # the same per position p: B'_p = B_p * mean_n d_{n,:,p} d_{n,:,p}^T
    def ea_blocks(self, call: ModuleCall, mat: Tensor | PositionBlocks) -> PositionBlocks:
        """Position blocks ``[P, C, C]`` of ``mean_n diag(phi'_n) H diag(phi'_n)``."""
        if not isinstance(mat, PositionBlocks):
            spatial = tuple(call.input.shape[2:])
            mat = PositionBlocks.from_dense(mat, spatial)
        d1 = self._d(call)[0]
        d1 = d1.reshape(d1.shape[0], mat.channels, -1)  # [N, C, P]
        outer = einsum(d1, d1, "n c p, n e p -> p c e") / d1.shape[0]
        return PositionBlocks(mat.blocks * outer, mat.spatial)


class IdentityRules(ModuleRules):
    """Rules of ``nn.Identity`` (and anything that returns its input unchanged)."""

    diagonal_jacobian = True

    def jac_t_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        return mat

    jac_mat_prod = jac_t_mat_prod

    def supports_local(self, call: ModuleCall) -> bool:
        return call.inputs[0].dim() >= 3

    def local_step(self, call: ModuleCall) -> LocalStep:
        size = tuple(call.inputs[0].shape[2:])
        return ShiftStep((0,) * len(size), size)

    def ea_jac_t_mat_jac_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        return mat

    def check_blocks(self, call: ModuleCall, from_blocks: bool) -> None:
        """Exact for any input (``J = I``)."""

    def ea_blocks(self, call: ModuleCall, mat: Tensor | PositionBlocks) -> PositionBlocks:
        if isinstance(mat, PositionBlocks):
            return mat
        return PositionBlocks.from_dense(mat, tuple(call.input.shape[2:]))


SIGMOID = ElementwiseRules(
    _sigmoid,
    of_output=_sigmoid_of_output,
    output_backward=torch.ops.aten.sigmoid_backward.grad_input,
)
TANH = ElementwiseRules(
    _tanh, of_output=_tanh_of_output, output_backward=torch.ops.aten.tanh_backward.grad_input
)
RELU = ElementwiseRules(_relu, piecewise_linear=True)
SMOOTH = ElementwiseRules()
PIECEWISE_LINEAR = ElementwiseRules(piecewise_linear=True)

#: every elementwise activation of ``torch.nn`` and its rules
ACTIVATIONS: dict[type, ModuleRules] = {
    nn.Sigmoid: SIGMOID,
    nn.Tanh: TANH,
    nn.ReLU: RELU,
    **{
        cls: PIECEWISE_LINEAR
        for cls in (
            nn.ReLU6,
            nn.LeakyReLU,
            nn.Hardtanh,
            nn.Threshold,
            nn.Hardshrink,
            nn.Softshrink,
            nn.Hardsigmoid,
        )
    },
    **{
        cls: SMOOTH
        for cls in (
            nn.ELU,
            nn.SELU,
            nn.CELU,
            nn.Softplus,
            nn.LogSigmoid,
            nn.SiLU,
            nn.GELU,
            nn.Mish,
            nn.Softsign,
            nn.Tanhshrink,
            nn.Hardswish,
        )
    },
}
