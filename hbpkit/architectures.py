"""The paper's architectures (supplement, table S.2), ready for examples and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def fcnn(
    in_features: int = 3072,
    num_classes: int = 10,
    xavier: bool = True,
    *,
    hidden: Sequence[int] = (1024, 512, 256, 128, 64, 32, 16),
) -> nn.Sequential:
    """Table S.2a: the FCNN of Chen et al. (2018) with sigmoids (3 846 810 parameters).

    ``Flatten, Linear(in, 1024), Sigmoid, 1024 -> 512 -> 256 -> 128 -> 64 -> 32 -> 16 ->
    num_classes`` with a sigmoid after every hidden layer. Weights are Xavier-initialised
    and biases zero (supplement section E) unless ``xavier=False``. ``hidden`` replaces the
    hidden widths (default: the table's), e.g. to scale the network for benchmarks.
    """
    model = nn.Sequential(*sigmoid_classifier([in_features, *hidden], num_classes))
    if xavier:
        for module in model:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
    return model


def cnn(in_channels: int = 3, num_classes: int = 10) -> nn.Sequential:
    """Table S.2b: the CNN of figure 5 with sigmoids (1 099 226 parameters on 3x32x32 inputs).

    Two blocks ``Conv2d(3x3, padding 1), Sigmoid, Conv2d, Sigmoid, MaxPool2d(2, 2)`` with
    16 and 32 channels, then ``Flatten, Linear(2048, 512), Sigmoid, Linear(512, 64),
    Sigmoid, Linear(64, num_classes)``. PyTorch's default initialisation (section E).
    """
    return nn.Sequential(
        *sigmoid_conv_block(in_channels, 16),
        *sigmoid_conv_block(16, 32),
        *sigmoid_classifier([2048, 512, 64], num_classes),
    )


def c3d3(in_channels: int = 3, num_classes: int = 10) -> nn.Sequential:
    """Table S.2c: DeepOBS c3d3 with sigmoids instead of ReLUs (895 210 parameters).

    ``Conv2d(3, 64, 5), Sigmoid, ZeroPad2d(0, 1, 0, 1), MaxPool2d(3, 2), Conv2d(64, 96, 3),
    Sigmoid, ZeroPad2d(0, 1, 0, 1), MaxPool2d(3, 2), ZeroPad2d(1, 1, 1, 1), Conv2d(96, 128, 3),
    Sigmoid, ZeroPad2d(0, 1, 0, 1), MaxPool2d(3, 2), Flatten, Linear(1152, 512), Sigmoid,
    Linear(512, 256), Sigmoid, Linear(256, num_classes)`` on 3x32x32 inputs.
    """
    return nn.Sequential(
        *_c3d3_block(in_channels, 64, 5),
        *_c3d3_block(64, 96, 3),
        nn.ZeroPad2d((1, 1, 1, 1)),
        *_c3d3_block(96, 128, 3),
        *sigmoid_classifier([1152, 512, 256], num_classes),
    )


def sigmoid_classifier(widths: Sequence[int], num_classes: int) -> list[nn.Module]:
    """``Flatten, Linear(widths[0], widths[1]), Sigmoid, ..., Linear(widths[-1], num_classes)``:
    the fully-connected part of every table S.2 network (a sigmoid after each hidden layer)."""
    layers: list[nn.Module] = [nn.Flatten()]
    for w_in, w_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(w_in, w_out), nn.Sigmoid()]
    layers.append(nn.Linear(widths[-1], num_classes))
    return layers


def sigmoid_conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    """One block of table S.2b: ``Conv2d(in, out, 3, padding=1), Sigmoid, Conv2d(out, out, 3,
    padding=1), Sigmoid, MaxPool2d(2, 2)`` (``[N, in, H, W] -> [N, out, H/2, W/2]``)."""
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.Sigmoid(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.Sigmoid(),
        nn.MaxPool2d(2, 2),
    ]


def _c3d3_block(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    """One block of table S.2c: ``Conv2d(in, out, k), Sigmoid, ZeroPad2d(0, 1, 0, 1),
    MaxPool2d(3, 2)``."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size),
        nn.Sigmoid(),
        nn.ZeroPad2d((0, 1, 0, 1)),
        nn.MaxPool2d(3, 2),
    ]
