"""The paper's architectures (table S.2) run every extension end to end at a small batch.

Where a dense residual factor or batch-averaged matrix behind a convolution would
exceed the memory budget, hbpkit uses structured forms instead: residual factors
of DiagHessian are local (``hbpkit/curvature/local.py``), KFRA carries exact
position blocks (``test_position_blocks.py``). Every extension runs on all three.
"""

from __future__ import annotations

import pytest
import torch
from quantities import SAVEFIELDS
from torch import nn

import hbpkit.extensions as exts
from hbpkit import backprop, extend
from hbpkit.architectures import c3d3, cnn, fcnn

PARAMETERS = {fcnn: 3_846_810, cnn: 1_099_226, c3d3: 895_210}  # table S.2
EXTENSIONS = [cls for cls in SAVEFIELDS if cls is not exts.HBP]  # HBP: its own test below
#: exact residuals through every convolution: tens of GFLOP per sample on c3d3
SLOW = {(cnn, exts.DiagHessian), (c3d3, exts.DiagHessian)}
CASES = [
    pytest.param(
        arch,
        ext,
        id=f"{arch.__name__}-{ext.__name__}",
        marks=[pytest.mark.slow] * ((arch, ext) in SLOW),
    )
    for arch in PARAMETERS
    for ext in EXTENSIONS
]


@pytest.mark.parametrize("arch", list(PARAMETERS), ids=lambda a: a.__name__)
def test_parameter_count(arch):
    assert sum(p.numel() for p in arch().parameters()) == PARAMETERS[arch]


@pytest.mark.parametrize("arch, ext", CASES)
def test_every_extension_end_to_end(arch, ext):
    torch.manual_seed(0)
    model, loss_fn = extend(arch()), extend(nn.CrossEntropyLoss())
    X, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    loss = loss_fn(model(X), y)
    extension = ext()
    with backprop(extension):
        loss.backward()
    shapes = {"grad_batch": lambda p: (2, *p.shape), "batch_l2": lambda p: (2,)}
    for p in model.parameters():
        value = getattr(p, extension.savefield)
        if isinstance(value, tuple):  # Kronecker factors: [out, out] and [in, in]
            assert value.param_shape == p.shape
            assert value[0].shape == (p.shape[0], p.shape[0])
            assert all(torch.isfinite(f).all() for f in value)
        else:
            assert value.shape == shapes.get(extension.savefield, lambda p: p.shape)(p)
            assert torch.isfinite(value).all()


def test_hbp_hessian_on_fcnn_matches_shapes():
    torch.manual_seed(0)
    model, loss_fn = extend(fcnn()), extend(nn.CrossEntropyLoss())
    loss = loss_fn(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 3]))
    with backprop(exts.HBP("pch-abs", "average", "batch-average")):
        loss.backward()
    G, A = model[1].weight.hbp
    assert G.shape == (1024, 1024) and A.shape == (3072, 3072)
    assert torch.linalg.eigvalsh(G.double()).min() > -1e-6 * G.abs().max()  # PCH is PSD
