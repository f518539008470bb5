"""Brute-force references for models that branch (residual blocks, sums), autograd only.

Nothing here imports hbpkit's computations (only the plain ``hbpkit.branching`` modules
the models are built of). The model is any ``nn.Module``; forward hooks keep the
output ``z`` of every layer with parameters and the input/output of every
elementwise activation, and every curvature is formed from dense Jacobians
through the forward graph:

``C = J_out^T H_loss J_out + sum_k J_k^T diag(m(phi_k''(x_k) * dL/dz_k)) J_k``

w.r.t. any intermediate tensors (parameters, layer outputs), with ``J_k = dx_k/d.``
the Jacobian of the k-th activation's input (all paths summed by autograd) and
``m`` from :data:`reference.MODIFY`. ``m = id`` is the exact Hessian (checked
against double backward in :func:`check_reference`), ``m = 0`` the GGN.

Normalization layers that are nonlinear per sample (``LayerNorm``, ``GroupNorm``)
contribute ``J_k^T m(R_k) J_k`` with the dense ``R_k = d2 <z_k(x), dL/dz_k> / dx2``
(all samples at once, by double backward) and ``m`` applied to its eigenvalues
(for a diagonal ``R`` that is the elementwise ``m`` above).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import reference as ref
import torch
from torch import Tensor, nn

PARAMETRIC = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
ELEMENTWISE = (nn.Tanh, nn.Sigmoid, nn.GELU, nn.ReLU, nn.Softplus, nn.ELU, nn.SiLU)
DENSE_NONLINEAR = (nn.LayerNorm, nn.GroupNorm)


@dataclass
class Trace:
    """One forward pass of a plain model with what the references need."""

    out: Tensor
    loss: Tensor
    params: list[nn.Parameter]
    layer_outputs: dict[nn.Module, Tensor] = field(default_factory=dict)
    activations: list[tuple[nn.Module, Tensor, Tensor]] = field(default_factory=list)


def trace(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Trace:
    layer_outputs, activations, handles = {}, [], []
    for m in model.modules():
        if isinstance(m, PARAMETRIC):
            handles.append(m.register_forward_hook(lambda m, i, o: layer_outputs.__setitem__(m, o)))
        elif isinstance(m, ELEMENTWISE + DENSE_NONLINEAR):
            handles.append(
                m.register_forward_hook(lambda m, i, o: activations.append((m, i[0], o)))
            )
    try:
        out = model(X)
    finally:
        for h in handles:
            h.remove()
    params = [p for p in model.parameters() if p.requires_grad]
    return Trace(out, loss_fn(out, y), params, layer_outputs, activations)


def curvature(t: Trace, loss_fn: nn.Module, y: Tensor, wrt: list[Tensor], kind: str) -> Tensor:
    """``[W, W]`` (``W`` entries of ``wrt``): the modified curvature above, ``kind`` in MODIFY."""
    return curvature_blocks(t, loss_fn, y, wrt, (kind,))[kind][0]


def curvature_blocks(
    t: Trace, loss_fn: nn.Module, y: Tensor, wrt: list[Tensor], kinds: tuple[str, ...]
) -> dict[str, list[Tensor]]:
    """``{kind: [C_i]}``: the diagonal blocks of the curvature w.r.t. each of ``wrt``.

    One dense Jacobian per activation for all of ``wrt`` together (``[W, W]`` with
    ``W`` the entries of all of them), so keep ``wrt`` small.
    """
    J = ref.jacobian(t.out, wrt)
    base = J.T @ ref.loss_hessian_wrt_output(loss_fn, t.out, y) @ J
    full = dict.fromkeys(kinds, base)
    if set(kinds) != {"ggn"}:
        for layer, x, z in t.activations:
            (dL_dz,) = ref._grad(t.loss, [z], retain_graph=True)
            if isinstance(layer, DENSE_NONLINEAR):
                R = _dense_residual(layer, x, dL_dz)
                Jk = ref.jacobian(x, wrt)
                lam, Q = torch.linalg.eigh(R)
                for kind in kinds:
                    full[kind] = full[kind] + Jk.T @ (Q * ref.MODIFY[kind](lam)) @ Q.T @ Jk
                continue
            r = (ref.elementwise_second_derivative(layer, x) * dL_dz).reshape(-1)
            if not r.any():
                continue
            Jk = ref.jacobian(x, wrt)
            for kind in kinds:
                full[kind] = full[kind] + Jk.T @ (ref.MODIFY[kind](r)[:, None] * Jk)
    sizes = [w.numel() for w in wrt]
    out = {}
    for kind in kinds:
        blocks, start = [], 0
        for size in sizes:
            blocks.append(full[kind][start : start + size, start : start + size])
            start += size
        out[kind] = blocks
    return out


def _dense_residual(layer: nn.Module, x: Tensor, dL_dz: Tensor) -> Tensor:
    """``[X, X]``: ``d2 <layer(x), dL/dz> / dx2`` over all entries of ``x``, by autograd."""
    g = dL_dz.detach()

    def contracted(x_: Tensor) -> Tensor:
        return (layer(x_) * g).sum()

    x = x.detach()
    return torch.autograd.functional.hessian(contracted, x).reshape(x.numel(), x.numel())


def output_factor(M: Tensor, z: Tensor, layer: nn.Module) -> Tensor:
    """K-FAC-expand ``G = sum_n sum_pos M_n[:, pos, :, pos]`` from the curvature ``M`` w.r.t. ``z``.

    ``M``: ``[N*F, N*F]`` block diagonal over samples; positions are the spatial
    entries of a convolution output ``[N, C, *S]`` or the middle dims of a Linear
    output ``[N, *T, D]``.
    """
    N, F = z.shape[0], z[0].numel()
    blocks = [M[n * F : (n + 1) * F, n * F : (n + 1) * F] for n in range(N)]
    if isinstance(layer, nn.Linear):
        D = z.shape[-1]
        P = F // D
        return sum(torch.einsum("tctd->cd", b.reshape(P, D, P, D)) for b in blocks)
    C = z.shape[1]
    P = F // C
    return sum(torch.einsum("cpdp->cd", b.reshape(C, P, C, P)) for b in blocks)


def check_reference(t: Trace, loss_fn: nn.Module, y: Tensor, count: int = 4) -> None:
    """The modified curvature with ``m = id`` is the autograd Hessian (a check of the helper).

    On the ``count`` smallest parameters (double backward is slow for large ones).
    """
    params = sorted(t.params, key=lambda p: p.numel())[:count]
    blocks = curvature_blocks(t, loss_fn, y, params, ("hessian",))["hessian"]
    for p, block in zip(params, blocks):
        torch.testing.assert_close(block, ref.hessian(t.loss, [p]), rtol=1e-8, atol=1e-10)
