"""Batch-averaged curvature in position blocks (``curvature/blocks.py``), float64.

Rule level: every ``ea_blocks`` equals the position blocks of the dense
``mean_n J_n^T H J_n`` (itself checked against autograd Jacobians by the rule contract,
``tests/modules/test_rule_contract.py``, and ``test_conv.py``). End to end: with a memory
budget that forces the structured path, ``KFRA`` / ``HBP(..., "batch-average")`` give the
same Kronecker factors as the dense path, and what blocks cannot give exactly is
refused before anything is written.
"""

from __future__ import annotations

import pytest
import torch
from records import record
from torch import nn

from hbpkit import backprop, extend
from hbpkit.architectures import sigmoid_conv_block
from hbpkit.curvature.blocks import PositionBlocks
from hbpkit.curvature.memory import MemoryPolicy
from hbpkit.extensions import HBP, KFRA
from hbpkit.modules.tables import SECOND_ORDER

DT = torch.float64
N = 3


def _record(module: nn.Module, x: torch.Tensor):
    extend(module)
    x = x.clone().requires_grad_(True)
    out = module(x)
    return SECOND_ORDER.lookup(module), record(out), out


def _dense_blocks(rules, call, H: torch.Tensor) -> torch.Tensor:
    dense = rules.ea_jac_t_mat_jac_prod(call, H)
    return PositionBlocks.from_dense(dense, tuple(call.inputs[0].shape[2:])).blocks


def _block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """The dense ``[C P, C P]`` matrix (row-major ``[C, P]``) with these position blocks."""
    P, C, _ = blocks.shape
    dense = torch.zeros(C, P, C, P, dtype=blocks.dtype)
    for p in range(P):
        dense[:, p, :, p] = blocks[p]
    return dense.reshape(C * P, C * P)


CONVS = {
    "conv1d": (lambda: nn.Conv1d(2, 3, 3), (N, 2, 7)),
    "conv1d-stride-dilation": (
        lambda: nn.Conv1d(2, 3, 3, stride=2, dilation=2, padding=2),
        (N, 2, 9),
    ),
    "conv2d-pad": (lambda: nn.Conv2d(2, 3, 3, padding=1), (N, 2, 5, 4)),
    "conv2d-stride": (lambda: nn.Conv2d(2, 2, (2, 3), stride=(2, 1), padding=(1, 0)), (N, 2, 5, 6)),
    "conv2d-groups": (lambda: nn.Conv2d(4, 2, 3, groups=2, padding=1, bias=False), (N, 4, 4, 4)),
    "conv2d-same-even": (lambda: nn.Conv2d(2, 3, 2, padding="same"), (N, 2, 4, 5)),
    "conv3d": (lambda: nn.Conv3d(1, 2, 2, stride=(1, 2, 1), padding=(0, 1, 1)), (N, 1, 3, 4, 3)),
}

POOLS = {
    "maxpool2d-overlap": (lambda: nn.MaxPool2d(3, 2), (N, 2, 7, 7)),
    "maxpool2d-stride1": (lambda: nn.MaxPool2d(2, 1), (N, 2, 4, 5)),
    "maxpool2d-pad-dilation": (lambda: nn.MaxPool2d(3, 1, padding=1, dilation=2), (N, 2, 5, 6)),
    "maxpool2d-ceil": (lambda: nn.MaxPool2d(2, 2, ceil_mode=True), (N, 3, 5, 5)),
    "maxpool1d": (lambda: nn.MaxPool1d(3, 2, padding=1), (N, 2, 8)),
    "maxpool3d": (lambda: nn.MaxPool3d(2, 1), (N, 1, 3, 3, 4)),
    "maxpool2d-ties": (lambda: nn.MaxPool2d(2, 1), (N, 2, 4, 4)),
}


@pytest.mark.parametrize("name", list(CONVS) + list(POOLS))
def test_blocks_from_dense(name):
    """Convolution / max-pool: exact blocks of ``mean_n J_n^T H J_n`` for a dense ``H``."""
    torch.manual_seed(0)
    factory, shape = {**CONVS, **POOLS}[name]
    x = torch.randint(0, 2, shape) if name.endswith("ties") else torch.randn(shape)
    rules, call, out = _record(factory().double(), x.to(DT))
    rules.check_blocks(call, from_blocks=False)
    d_out = out[0].numel()
    H = torch.randn(d_out, d_out, dtype=DT)
    torch.testing.assert_close(
        rules.ea_blocks(call, H).blocks, _dense_blocks(rules, call, H), rtol=1e-12, atol=1e-12
    )


BLOCK_KEEPERS = {
    "sigmoid": (nn.Sigmoid, (N, 2, 3, 4)),
    "tanh-1d": (nn.Tanh, (N, 3, 5)),
    "identity": (nn.Identity, (N, 2, 3)),
    "zeropad2d": (lambda: nn.ZeroPad2d((0, 1, 2, 0)), (N, 2, 3, 4)),
    "constantpad1d-crop": (lambda: nn.ConstantPad1d((-1, 2), 0.5), (N, 2, 6)),
}


@pytest.mark.parametrize("name", BLOCK_KEEPERS)
def test_blocks_kept(name):
    """Elementwise modules and constant paddings: exact from dense ``H`` and from blocks."""
    torch.manual_seed(0)
    factory, shape = BLOCK_KEEPERS[name]
    rules, call, out = _record(factory().double(), torch.randn(shape, dtype=DT))
    rules.check_blocks(call, from_blocks=True)
    C, P = out.shape[1], out[0, 0].numel()
    blocks = torch.randn(P, C, C, dtype=DT)
    given = PositionBlocks(blocks, tuple(out.shape[2:]))
    H = _block_diagonal(blocks)
    expected = _dense_blocks(rules, call, H)
    torch.testing.assert_close(rules.ea_blocks(call, given).blocks, expected)
    H_full = torch.randn(C * P, C * P, dtype=DT)
    torch.testing.assert_close(
        rules.ea_blocks(call, H_full).blocks, _dense_blocks(rules, call, H_full)
    )


# ------------------------------------------------------------------------- end to end
def _pool_transition_net() -> tuple[nn.Sequential, tuple[int, ...], int]:
    """c3d3 in miniature: blocks from the max-pool to the first convolution.

    Dense needs (float64): the last conv ~0.25 MB, the max-pool ~1.05 MB.
    """
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.Sigmoid(),
        nn.ZeroPad2d((0, 1, 0, 1)),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(100, 5),
    )
    return net, (1, 12, 12), 300_000


def _conv_transition_net() -> tuple[nn.Sequential, tuple[int, ...], int]:
    """The table S.2b CNN in miniature: blocks from the second convolution on.

    Dense needs (float64): the max-pool ~0.7 MB, the second conv ~2.8 MB.
    """
    net = nn.Sequential(
        *sigmoid_conv_block(2, 3),
        nn.Flatten(),
        nn.Linear(75, 4),
    )
    return net, (2, 10, 10), 1_000_000


NETS = {"pool-transition": _pool_transition_net, "conv-transition": _conv_transition_net}
EXTENSIONS = {
    "KFRA": KFRA,
    "HBP-hessian": lambda: HBP("hessian", "average", "batch-average"),
    "HBP-pch-abs-sampled": lambda: HBP("pch-abs", "sampled", "batch-average"),
}


def _factors(net_factory, extension, budget_bytes, monkeypatch, seed=0):
    torch.manual_seed(seed)
    net, shape, _ = net_factory()
    model = extend(net.double())
    loss_fn = extend(nn.CrossEntropyLoss())
    X = torch.randn(4, *shape, dtype=DT)
    y = torch.randint(0, model[-1].out_features, (4,))
    loss = loss_fn(model(X), y)
    torch.manual_seed(seed + 1)  # the same MC draw in both runs
    with backprop(extension, memory=MemoryPolicy(max_dense_bytes=budget_bytes)):
        loss.backward()
    return [tuple(getattr(p, extension.savefield)) for p in model.parameters()]


@pytest.mark.parametrize("ext_name", EXTENSIONS)
@pytest.mark.parametrize("net_name", NETS)
def test_structured_equals_dense(net_name, ext_name, monkeypatch):
    """Forced position blocks give the dense path's expand factors (and do use blocks)."""
    net_factory = NETS[net_name]
    budget_bytes = net_factory()[2]
    used = []
    original = PositionBlocks.sum_blocks

    def spy(self):
        used.append(self.blocks.shape)
        return original(self)

    monkeypatch.setattr(PositionBlocks, "sum_blocks", spy)
    dense = _factors(net_factory, EXTENSIONS[ext_name](), 2**40, monkeypatch)
    assert not used
    structured = _factors(net_factory, EXTENSIONS[ext_name](), budget_bytes, monkeypatch)
    assert used, "the budget did not force position blocks"
    for a, b in zip(structured, dense):
        for fa, fb in zip(a, b):
            torch.testing.assert_close(fa, fb, rtol=1e-10, atol=1e-12)


def test_refusals_before_writing():
    """Blocks that cannot stay exact are refused up front, nothing written."""
    net, shape, budget_bytes = _pool_transition_net()
    model = extend(net.double())
    loss_fn = extend(nn.CrossEntropyLoss())
    X, y = torch.randn(2, *shape, dtype=DT), torch.tensor([0, 1])
    # reduce needs all position blocks
    memory = MemoryPolicy(max_dense_bytes=budget_bytes)
    with pytest.raises(NotImplementedError, match="kfac_approx='expand'"):
        with backprop(KFRA(kfac_approx="reduce"), memory=memory):
            loss_fn(model(X), y).backward()
    # with no budget at all the last convolution switches to blocks, and the max-pool
    # in front of it cannot take blocks exactly
    with pytest.raises(NotImplementedError, match="MaxPool2d.*position blocks"):
        with backprop(KFRA(), memory=MemoryPolicy(max_dense_bytes=0)):
            loss_fn(model(X), y).backward()
    assert not any(hasattr(p, "kfra") for p in model.parameters())
