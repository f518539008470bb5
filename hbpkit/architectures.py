"""The paper's architectures (supplement, table S.2), ready for examples and benchmarks."""

from __future__ import annotations

from torch import nn


def fcnn(in_features: int = 3072, num_classes: int = 10, xavier: bool = True) -> nn.Sequential:
    """Table S.2a: the FCNN of Chen et al. (2018) with sigmoids (3 846 810 parameters).

    ``Flatten, Linear(in, 1024), Sigmoid, 1024 -> 512 -> 256 -> 128 -> 64 -> 32 -> 16 ->
    num_classes`` with a sigmoid after every hidden layer. Weights are Xavier-initialised
    and biases zero (supplement section E) unless ``xavier=False``.
    """
    widths = [in_features, 1024, 512, 256, 128, 64, 32, 16]
    layers: list[nn.Module] = [nn.Flatten()]
    for w_in, w_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(w_in, w_out), nn.Sigmoid()]
    layers.append(nn.Linear(widths[-1], num_classes))
    model = nn.Sequential(*layers)
    if xavier:
        for module in model:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
    return model
