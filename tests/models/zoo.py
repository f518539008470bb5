"""The model zoo: small float64 builders of the model families users bring, as they write them.

Every builder returns a :class:`ZooCase`: a plain (not extended) float64 model, its loss
module, a ``criterion(loss_fn, output, target)`` that applies the loss the way the user's
training loop does (e.g. ``loss_fn(logits.view(-1, V), y.view(-1))`` for the GPT block),
and seeded random data with class targets. Sizes are chosen so that a float64 forward and
backward takes well under a second at batch 3-4.

Models whose forward is random (``Dropout`` with ``p > 0`` in train mode) are built in
``eval()`` mode or with ``dropout=0``: the references of :mod:`brute_force` need a
deterministic forward. The torchvision families are also built in train mode
(``*-train``: ``BatchNorm`` normalizes with the statistics of the batch, so every sample's
output depends on every sample's input; their references go through the whole batch,
:class:`brute_force.BatchBruteForce`).

Families (``MODELS``):

* ``resnet18``: torchvision's ``resnet18`` (eval), ``[N, 3, 32, 32]``;
* ``resnet-1111``: torchvision's ``ResNet(BasicBlock, [1, 1, 1, 1])`` (eval), ``[N, 3, 16, 16]``
  (torchvision's ``BasicBlock`` supports no width other than 64, so this is the small one);
* ``resnet18-train``, ``resnet-1111-train``, ``mobilenet-v3-small-train``: the same in
  train mode;
* ``mobilenet-v3-small``: torchvision's ``mobilenet_v3_small(width_mult=0.25)`` (eval),
  ``[N, 3, 32, 32]``;
* ``vit``: patch embedding by ``Conv2d``, a cls token and a positional embedding as bare
  ``nn.Parameter``s, two ``nn.TransformerEncoderLayer(batch_first=True)``, cls pooling;
* ``gpt``: token ``nn.Embedding``, bare ``nn.Parameter`` positional embedding, one block
  with causal ``F.scaled_dot_product_attention``, ``LayerNorm``, GELU MLP and residuals,
  next-token ``CrossEntropyLoss`` over ``logits.view(-1, V)``;
* ``lstm``, ``gru``: ``batch_first=True``, last time step ``out[:, -1]`` into a ``Linear``;
* ``unet-upsample``, ``unet-convtranspose``: one down / up level, ``torch.cat`` skip,
  per-pixel ``CrossEntropyLoss``;
* ``dwsep-pixelshuffle``: depthwise-separable convolutions and ``nn.PixelShuffle``
  (sub-pixel upsampling), per-pixel ``CrossEntropyLoss`` at the upsampled resolution.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision_shim import import_torchvision

DT = torch.float64


def ce(loss_fn: nn.Module, output: Tensor, target: Tensor) -> Tensor:
    """``loss_fn(output, target)``: the usual call."""
    return loss_fn(output, target)


def ce_tokens(loss_fn: nn.Module, logits: Tensor, target: Tensor) -> Tensor:
    """Next-token loss as GPT training loops write it: ``[N, T, V]`` logits, ``[N, T]`` targets."""
    return loss_fn(logits.view(-1, logits.size(-1)), target.view(-1))


@dataclasses.dataclass
class ZooCase:
    """A plain float64 model with its loss and seeded data.

    ``criterion(loss_fn, model(X), y)`` is the loss as the user computes it; it is a
    mean (or sum) over samples, so the loss of sample ``n`` alone,
    ``criterion(loss_fn, model(X[n:n+1]), y[n:n+1])``, divided by ``N`` for ``mean``, is
    the ``n``-th term of the batch loss (:func:`brute_force.loss_terms` checks this).
    """

    name: str
    model: nn.Module
    loss_fn: nn.Module
    criterion: Callable[[nn.Module, Tensor, Tensor], Tensor]
    X: Tensor
    y: Tensor

    @property
    def batch_size(self) -> int:
        return self.X.shape[0]

    def loss(self, model: nn.Module | None = None, loss_fn: nn.Module | None = None) -> Tensor:
        """The batch loss of ``model`` (default: the plain one) on the case's data."""
        model = self.model if model is None else model
        return self.criterion(self.loss_fn if loss_fn is None else loss_fn, model(self.X), self.y)


# --------------------------------------------------------------------------- torchvision
def resnet18(num_classes: int = 5) -> nn.Module:
    return import_torchvision().models.resnet18(num_classes=num_classes).eval()


def resnet_1111(num_classes: int = 5) -> nn.Module:
    tv = import_torchvision()
    from torchvision.models.resnet import BasicBlock, ResNet

    assert tv.models.ResNet is ResNet
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes).eval()


def mobilenet_v3_small(num_classes: int = 5) -> nn.Module:
    tv = import_torchvision()
    return tv.models.mobilenet_v3_small(num_classes=num_classes, width_mult=0.25).eval()


# --------------------------------------------------------------------------- transformers
class ViT(nn.Module):
    """A vision transformer: ``[N, C, H, W]`` -> ``[N, classes]`` (cls pooling)."""

    def __init__(
        self,
        image: int = 8,
        patch: int = 4,
        channels: int = 3,
        dim: int = 8,
        heads: int = 2,
        layers: int = 2,
        classes: int = 5,
    ) -> None:
        super().__init__()
        tokens = (image // patch) ** 2
        self.patch = nn.Conv2d(channels, dim, patch, stride=patch)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim,
                heads,
                2 * dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x[:, 0]))


class GPTBlock(nn.Module):
    """Pre-norm decoder block: causal self-attention and a GELU MLP, both residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        N, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
        q, k, v = (t.view(N, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(N, T, D))
        return x + self.fc2(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Token ids ``[N, T]`` -> next-token logits ``[N, T, V]``."""

    def __init__(self, vocab: int = 11, context: int = 6, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, context, dim))
        self.block = GPTBlock(dim, heads)
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos[:, : idx.size(1)]
        return self.head(self.ln_f(self.block(x)))


# --------------------------------------------------------------------------- recurrent
class RNNClassifier(nn.Module):
    """``[N, T, D]`` -> ``[N, classes]`` from the last time step of an LSTM or GRU."""

    def __init__(self, cell: type[nn.Module], d_in: int = 3, hidden: int = 5, classes: int = 4):
        super().__init__()
        self.rnn = cell(d_in, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


# --------------------------------------------------------------------------- dense prediction
class UNet(nn.Module):
    """One down and one up level with a ``torch.cat`` skip: ``[N, C, H, W]`` -> ``[N, K, H, W]``.

    ``up="upsample"``: ``nn.Upsample(scale_factor=2)`` then a 3x3 convolution;
    ``up="convtranspose"``: ``nn.ConvTranspose2d(kernel 2, stride 2)``.
    """

    def __init__(self, up: str, channels: int = 2, width: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1))
        self.act = nn.ReLU()
        if up == "upsample":
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(2 * width, width, 3, padding=1),
            )
        elif up == "convtranspose":
            self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        else:
            raise ValueError(up)
        self.dec = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.Tanh())
        self.out = nn.Conv2d(width, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        skip = self.enc(x)
        h = self.up(self.act(self.down(skip)))
        return self.out(self.dec(torch.cat([h, skip], dim=1)))


class DepthwiseSeparablePixelShuffle(nn.Module):
    """Depthwise-separable convolutions, then sub-pixel upsampling by ``nn.PixelShuffle(2)``:
    ``[N, C, H, W]`` -> ``[N, K, 2H, 2W]``."""

    def __init__(self, channels: int = 2, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1, groups=width),  # depthwise
            nn.Conv2d(width, width, 1),  # pointwise
            nn.SiLU(),
            nn.Conv2d(width, 4 * classes, 1),
            nn.PixelShuffle(2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


# --------------------------------------------------------------------------- registry
@dataclasses.dataclass(frozen=True)
class Family:
    """How to build one zoo model: the network, the shape of one input, the targets."""

    build: Callable[[], nn.Module]
    x_shape: tuple[int, ...]
    classes: int
    kind: str = "image"  # "image" | "tokens" (integer inputs, next-token targets) | "dense"
    criterion: Callable[[nn.Module, Tensor, Tensor], Tensor] = ce
    slow: bool = False  # heavy in float64: references and hbpkit take seconds per case
    train: bool = False  # BatchNorm with batch statistics (the model in train mode)


MODELS: dict[str, Family] = {
    "resnet18": Family(resnet18, (3, 32, 32), 5, slow=True),
    "resnet-1111": Family(resnet_1111, (3, 16, 16), 5, slow=True),
    "mobilenet-v3-small": Family(mobilenet_v3_small, (3, 32, 32), 5),
    "resnet18-train": Family(resnet18, (3, 32, 32), 5, slow=True, train=True),
    "resnet-1111-train": Family(resnet_1111, (3, 16, 16), 5, slow=True, train=True),
    "mobilenet-v3-small-train": Family(mobilenet_v3_small, (3, 64, 64), 5, train=True),
    "vit": Family(ViT, (3, 8, 8), 5),
    "gpt": Family(GPT, (6,), 11, kind="tokens", criterion=ce_tokens),
    "lstm": Family(lambda: RNNClassifier(nn.LSTM), (4, 3), 4),
    "gru": Family(lambda: RNNClassifier(nn.GRU), (4, 3), 4),
    "unet-upsample": Family(lambda: UNet("upsample"), (2, 4, 4), 3, kind="dense"),
    "unet-convtranspose": Family(lambda: UNet("convtranspose"), (2, 4, 4), 3, kind="dense"),
    "dwsep-pixelshuffle": Family(DepthwiseSeparablePixelShuffle, (2, 3, 3), 3, kind="dense"),
}


def build(name: str, batch: int = 3, seed: int = 0, reduction: str = "mean") -> ZooCase:
    """The zoo model ``name`` in float64 with seeded random data of ``batch`` samples.

    Inputs are standard normal (token ids uniform in the vocabulary); targets are class
    indices: one per sample (``image``), one per token (``tokens``, the next-token
    targets), one per output pixel (``dense``).
    """
    family = MODELS[name]
    torch.manual_seed(seed)
    model = family.build().to(DT)
    if family.train:  # batch statistics; dropout off (random: no reference)
        model.train()
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
    if family.kind == "tokens":
        X = torch.randint(0, family.classes, (batch, *family.x_shape))
        y = torch.randint(0, family.classes, (batch, *family.x_shape))
    else:
        X = torch.randn(batch, *family.x_shape, dtype=DT)
        if family.kind == "dense":
            with torch.no_grad():
                spatial = model(X).shape[2:]
            y = torch.randint(0, family.classes, (batch, *spatial))
        else:
            y = torch.randint(0, family.classes, (batch,))
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    return ZooCase(name, model, loss_fn, family.criterion, X, y)
