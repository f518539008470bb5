"""Curvature of a small vision transformer written the ordinary way, on 8x8 digits.

Runs offline on scikit-learn's digits in a few seconds. Each image is a sequence of 8
row tokens; a class token and a positional embedding are bare ``nn.Parameter`` s, and
the encoder is ``nn.TransformerEncoderLayer`` (attention, LayerNorm, GELU MLP):

1. ``hbpkit.convert`` traces the model: the attention's projections become ``nn.Linear``
   layers (the same parameters), the head split, attention and merge and the bare
   parameters become regions of functional code;
2. one backward pass computes per-sample gradients, the exact GGN diagonal and exact
   GGN products for every parameter: the regions go the generic path (autograd);
3. a second pass computes KFAC for every ``nn.Linear`` layer, with the bare parameters
   (which have no Kronecker structure) frozen;
4. the GGN diagonal of the class token is checked against the GGN products applied to
   unit vectors (two independent computations of one quantity).

    python examples/transformer_curvature.py
"""

from __future__ import annotations

import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import hbpkit
from hbpkit import backprop, extend
from hbpkit.extensions import GGNMP, KFAC, BatchGrad, DiagGGNExact

D, HEADS = 16, 2


class DigitsTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, D)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, D))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 9, D))
        self.encoder = nn.TransformerEncoderLayer(
            D, HEADS, 2 * D, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, 10)

    def forward(self, x):  # x: [N, 8, 8], eight row tokens
        h = self.embed(x)
        h = torch.cat([self.cls.expand_as(h[:, :1]), h], dim=1) + self.pos
        return self.head(self.norm(self.encoder(h)[:, 0]))


def main(batch: int = 64, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    digits = load_digits()
    X = torch.tensor(digits.data[:batch], dtype=torch.float64).reshape(batch, 8, 8) / 16
    y = torch.tensor(digits.target[:batch])
    model = extend(hbpkit.convert(DigitsTransformer().double()))
    loss_fn = extend(nn.CrossEntropyLoss())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]

    start = time.perf_counter()
    with backprop(BatchGrad(), DiagGGNExact(), GGNMP()):
        loss_fn(model(X), y).backward()
    seconds = time.perf_counter() - start

    cls = next(p for name, p in model.named_parameters() if name.endswith("cls"))
    unit = torch.eye(cls.numel(), dtype=cls.dtype).reshape(-1, *cls.shape)
    from_products = (cls.ggnmp(unit).reshape(cls.numel(), -1).diagonal()).reshape(cls.shape)
    error = (cls.diag_ggn_exact - from_products).abs().max().item()

    bare = [p for name, p in model.named_parameters() if name.endswith(("cls", "pos"))]
    for p in bare:  # no Kronecker structure: KFAC is for the Linear layers
        p.requires_grad_(False)
    with backprop(KFAC()):
        loss_fn(model(X), y).backward()
    for p in bare:
        p.requires_grad_(True)

    print(f"digits transformer, batch {batch}: {len(linears)} Linear layers after convert")
    print(f"per-sample gradients + GGN diagonal + GGN products: {seconds:.2f} s")
    print(f"class token: GGN diagonal vs. GGN products on unit vectors, max error {error:.1e}")
    for m in linears:
        G, A = m.weight.kfac
        print(f"  KFAC of a Linear {tuple(m.weight.shape)}: G {tuple(G.shape)}, A {tuple(A.shape)}")
    return {
        "error": error,
        "kfac": [m.weight.kfac for m in linears],
        "grad_batch_sums_to_grad": max(
            (p.grad_batch.sum(0) - p.grad).abs().max().item() for p in bare
        ),
    }


if __name__ == "__main__":
    main()
