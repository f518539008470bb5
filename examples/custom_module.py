"""Teach hbpkit a module of your own with ``hbpkit.register``.

Two user modules:

* ``Cube``, an elementwise activation ``x**3``: ``ElementwiseRules()`` gets its
  first and second derivatives from autograd, one line;
* ``Scale``, a learnable per-feature scale ``z = w * x``: a small rules class with
  its Jacobian products (eq. 7) and its parameter derivatives.

The script checks the diagonal of the Hessian and of the GGN against
autograd and prints the largest errors. Run: ``python examples/custom_module.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import hbpkit
from hbpkit import backprop, extend
from hbpkit.core.calls import ModuleCall
from hbpkit.curvature.factors import DiagonalFactor, Factor
from hbpkit.extensions import DiagGGNExact, DiagHessian
from hbpkit.modules import ElementwiseRules, ModuleRules


class Cube(nn.Module):
    """``z = x**3``, elementwise."""

    def forward(self, x: Tensor) -> Tensor:
        return x**3


class Scale(nn.Module):
    """``z = w * x`` with a learnable ``w`` of shape ``[D]``."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features) + 0.1 * torch.randn(features))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


class ScaleRules(ModuleRules):
    """Derivatives of ``z = w * x``: ``Dz(x) = diag(w)``, ``Dz(w) = diag(x)``, no residual."""

    diagonal_jacobian = True  # a diagonal factor stays diagonal

    def param_names(self, module: Scale) -> list[str]:
        return ["weight"]

    def jac_t_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:  # [V, N, D]
        return mat * call.module.weight.detach()

    jac_mat_prod = jac_t_mat_prod

    def ea_jac_t_mat_jac_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:  # [D, D]
        w = call.module.weight.detach()
        return mat * torch.outer(w, w)

    def batch_grad(self, call: ModuleCall, name: str, grad_output: Tensor) -> Tensor:
        return grad_output * call.input  # [N, D]

    def param_diag(self, call: ModuleCall, name: str, factors: list[Factor]) -> Tensor:
        # (Dz(w)^T s)^2 = (s * x)^2, summed over the factor's columns and the samples
        total = 0
        for f in factors:
            sq = f.signed_square() if isinstance(f, DiagonalFactor) else f.signed_square().sum(0)
            total = total + (sq * call.input.square()).sum(0)
        return total


hbpkit.register(Cube, ElementwiseRules())
hbpkit.register(Scale, ScaleRules())


def main() -> float:
    """Run the check; returns the largest error of ``diag_h`` against autograd."""
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 3), Cube(), Scale(3), nn.Tanh(), nn.Linear(3, 2)))
    model = model.double()
    loss_fn = extend(nn.MSELoss())
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)

    loss = loss_fn(model(X), y)
    with backprop(DiagHessian(), DiagGGNExact()):
        loss.backward()

    params = list(model.parameters())
    flat = torch.cat([p.detach().flatten() for p in params])

    def loss_of(theta: Tensor) -> Tensor:
        offset, values = 0, []
        for p in params:
            values.append(theta[offset : offset + p.numel()].reshape(p.shape))
            offset += p.numel()
        W1, b1, w, W2, b2 = values
        out = torch.tanh(((X @ W1.T + b1) ** 3) * w) @ W2.T + b2
        return nn.functional.mse_loss(out, y)

    hessian = torch.autograd.functional.hessian(loss_of, flat)
    diag_h = torch.cat([p.diag_h.flatten() for p in params])
    error = (diag_h - torch.diagonal(hessian)).abs().max().item()
    print(f"hbpkit DiagHessian vs autograd, max |error|: {error:.2e}")
    print("Scale.weight diag_h        ", model[2].weight.diag_h)
    print("Scale.weight diag_ggn_exact", model[2].weight.diag_ggn_exact)
    return error


if __name__ == "__main__":
    main()
