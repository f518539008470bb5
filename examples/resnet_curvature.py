"""Curvature of a small ResNet written the ordinary way (``out += identity``), on 8x8 digits.

Runs offline on scikit-learn's digits in a few seconds:

1. ``hbpkit.convert`` rewrites the ``+`` of the residual blocks and ``torch.flatten``
   into modules (``hbpkit.branching.Sum``, ``nn.Flatten``) with ``torch.fx``;
2. one backward pass computes KFAC, KFLR, the exact GGN diagonal and exact GGN
   products for every parameter, through the skip connections (supplement B.3);
3. the GGN diagonal of the smallest parameter is checked against autograd (float64),
   and against the exact GGN products applied to unit vectors.

    python examples/resnet_curvature.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import hbpkit
from hbpkit import backprop, extend
from hbpkit.extensions import GGNMP, KFAC, KFLR, DiagGGNExact


class BasicBlock(nn.Module):
    """``relu(conv(tanh(conv(x))) + shortcut(x))``, as in torchvision (BatchNorm left out)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = None if stride == 1 else nn.Conv2d(c_in, c_out, 1, stride=stride)

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.conv2(torch.tanh(self.conv1(x)))
        out += identity
        return F.relu(out)


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(torch.relu(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def load_data(n: int = 256):
    digits = load_digits()
    X = torch.tensor(digits.data[:n] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return X, torch.tensor(digits.target[:n], dtype=torch.long)


def check_against_autograd(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Max error of ``diag_ggn_exact`` (and GGN products) of the smallest parameter, float64."""
    model = model.double()
    X = X[:16].double()
    loss_fn = extend(nn.CrossEntropyLoss())
    with backprop(DiagGGNExact(), GGNMP()):
        loss_fn(model(X), y[:16]).backward()
    p = min(model.parameters(), key=lambda q: q.numel())
    params = dict(model.named_parameters())
    name = next(k for k, v in params.items() if v is p)

    def output(q):
        return torch.func.functional_call(model, {**params, name: q}, (X,))

    out = output(p).detach()
    J = torch.autograd.functional.jacobian(output, p.detach(), vectorize=True)
    J = J.reshape(out.numel(), -1)
    H = torch.autograd.functional.hessian(lambda o: loss_fn(o, y[:16]), out, vectorize=True)
    H = H.reshape(out.numel(), -1)
    ggn = J.T @ H @ J
    from_products = p.ggnmp(torch.eye(p.numel(), dtype=p.dtype).reshape(-1, *p.shape))
    errors = [
        (p.diag_ggn_exact.reshape(-1) - ggn.diagonal()).abs().max(),
        (from_products.reshape(p.numel(), -1) - ggn).abs().max(),
    ]
    return max(e.item() for e in errors)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return extend(hbpkit.convert(ResNet()))


def main() -> dict[str, object]:
    X, y = load_data()
    model = make_model()
    print("converted forward:\n" + model.code.strip() + "\n")

    loss_fn = extend(nn.CrossEntropyLoss())
    with backprop(KFAC(), KFLR(), DiagGGNExact()):
        loss_fn(model(X), y).backward()
    print(f"{'parameter':<24}{'shape':<18}{'tr KFLR':>10}{'tr KFAC':>10}{'sum diag GGN':>14}")
    for name, p in model.named_parameters():
        tr = [torch.prod(torch.stack([f.trace() for f in k])).item() for k in (p.kflr, p.kfac)]
        shape = str(tuple(p.shape))
        print(f"{name:<24}{shape:<18}{tr[0]:>10.4f}{tr[1]:>10.4f}{p.diag_ggn_exact.sum():>14.4f}")

    error = check_against_autograd(make_model(), X, y)
    print(f"\nGGN diagonal and GGN products vs autograd (float64): max error {error:.1e}")
    return {"error": error, "kflr": {n: p.kflr for n, p in model.named_parameters()}}


if __name__ == "__main__":
    main()
