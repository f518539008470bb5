"""Kronecker factors of grouped and depthwise convolutions (float64).

Convention (``hbpkit/modules/conv/kronecker.py``): a weight with ``g = groups > 1`` gets
``[G [g, C_out/g, C_out/g], A [g, S, S]]``, block-diagonal over the groups, each group's
factors those of the ungrouped convolution of its channel slices; the bias keeps the full
``[G]``. Checked against

* the twin (``conv_twins.py``): ``g`` ungrouped convolutions on the channel slices, in one
  network with the same output; its layers' factors are the groups' (KFLR, KFRA, KFAC with
  the same draws, both ``kfac_approx``), and an optimizer step on the grouped layer is the
  step on the twin's layers;
* the exact GGN (autograd) where the approximation is exact: batch size 1 and one output
  position, each group's diagonal block (the blocks between groups are dropped, and are not
  zero there); with MSE on the layer's output (block-diagonal over the groups), the whole
  block for any batch size;
* dense algebra for :class:`KroneckerFactors` with groups.
"""

from __future__ import annotations

import copy

import pytest
import reference as ref
import torch
from conv_twins import slice_twin, twin_layers
from torch import nn
from twins import run_extended

import hbpkit.extensions as exts
from hbpkit import KroneckerFactors, backprop, extend
from hbpkit.optim import FOOF, ISAAC, KroneckerPreconditioner, SubsampledNaturalGradient

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-11)

GROUPED = {
    "2d_g2_stride": (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1, stride=2), (4, 5, 5)),
    "1d_depthwise_x2_dilation": (lambda: nn.Conv1d(3, 6, 3, groups=3, dilation=2), (3, 9)),
    "2d_depthwise_circular_nobias": (
        lambda: nn.Conv2d(3, 3, 3, groups=3, padding=1, padding_mode="circular", bias=False),
        (3, 4, 4),
    ),
    "2d_same_reflect_g2": (
        lambda: nn.Conv2d(2, 4, (2, 3), groups=2, padding="same", padding_mode="reflect"),
        (2, 4, 5),
    ),
    "3d_g2": (lambda: nn.Conv3d(4, 2, 2, groups=2, padding=(1, 0, 0)), (4, 3, 3, 2)),
    "3d_depthwise": (lambda: nn.Conv3d(2, 2, (1, 2, 2), groups=2, stride=(1, 2, 1)), (2, 2, 4, 3)),
}


def close(actual, expected, what: str = "") -> None:
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def _conv(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    factory, shape = GROUPED[name]
    return factory().to(DT), shape


def _head(conv: nn.Module, shape: tuple[int, ...], classes: int = 3) -> nn.Module:
    with torch.no_grad():
        features = conv(torch.zeros(1, *shape, dtype=DT)).numel()
    return nn.Sequential(nn.Sigmoid(), nn.Flatten(), nn.Linear(features, classes, dtype=DT))


def _data(shape, n=3, classes=3, seed=1):
    torch.manual_seed(seed)
    return torch.randn(n, *shape, dtype=DT), torch.randint(0, classes, (n,))


def _block(G: torch.Tensor, i: int, g: int) -> torch.Tensor:
    m = G.shape[0] // g
    return G[i * m : (i + 1) * m, i * m : (i + 1) * m]


def _extensions(approx: str):
    return [
        (exts.KFLR(kfac_approx=approx), "kflr"),
        (exts.KFRA(kfac_approx=approx), "kfra"),
        (exts.KFAC(mc_samples=3, kfac_approx=approx), "kfac"),
    ]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", sorted(GROUPED))
def test_grouped_factors_are_the_twins(name, approx):
    """Each group's ``[G_i, A_i]`` are the factors of the ungrouped twin layer ``i``; the
    bias's diagonal blocks are the twin biases' ``G_i``; the head's factors agree."""
    conv, shape = _conv(name)
    g = conv.groups
    head = _head(conv, shape)
    grouped = nn.Sequential(conv, *copy.deepcopy(head))
    twin = nn.Sequential(slice_twin(conv, shape), *copy.deepcopy(head))
    X, y = _data(shape)
    with torch.no_grad():
        close(twin(X), grouped(X), "the twin computes the same function")
    loss_fn = nn.CrossEntropyLoss()
    for ext, field in _extensions(approx):
        torch.manual_seed(7)  # KFAC: the same draws for both (same outputs, same seed)
        ours = run_extended(grouped, loss_fn, X, y, ext)
        torch.manual_seed(7)
        theirs = run_extended(twin, loss_fn, X, y, ext)
        factors = getattr(ours[0].weight, field)
        assert isinstance(factors, KroneckerFactors) and factors.groups == g
        assert factors[0].shape == (g, conv.out_channels // g, conv.out_channels // g)
        S = conv.weight[0].numel()
        assert factors[1].shape == (g, S, S)
        for i, layer in enumerate(twin_layers(theirs[0])):
            G_i, A_i = getattr(layer.weight, field)
            close(factors[0][i], G_i, f"{name} {field} G group {i}")
            close(factors[1][i], A_i, f"{name} {field} A group {i}")
            if conv.bias is not None:
                (G_bias,) = getattr(ours[0].bias, field)
                assert G_bias.shape == (conv.out_channels,) * 2
                close(_block(G_bias, i, g), getattr(layer.bias, field)[0], f"{name} {field} bias")
        for p, q in zip(ours[-1].parameters(), theirs[-1].parameters()):
            for a, b in zip(getattr(p, field), getattr(q, field)):
                close(a, b, f"{name} {field} head")


def _exact_ggn_block(model: nn.Module, loss_fn, X, y, param) -> torch.Tensor:
    out = model(X)
    return ref.ggn(out, loss_fn, y, [param])


P1_CASES = {  # one output position (P = 1)
    "2d_g2": (lambda: nn.Conv2d(4, 6, (3, 2), groups=2), (4, 3, 2)),
    "1d_depthwise_x2": (lambda: nn.Conv1d(2, 4, 3, groups=2, padding=1), (2, 1)),
    "3d_g3": (lambda: nn.Conv3d(3, 6, (1, 2, 2), groups=3), (3, 1, 2, 2)),
}


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", sorted(P1_CASES))
def test_kflr_kfra_exact_group_blocks_batch_one(name, approx):
    """Batch size 1 and ``P = 1``: ``G_i kron A_i`` is the exact GGN's diagonal block of group
    ``i`` (KFLR and KFRA), the bias factor the exact bias block; the dropped blocks between
    groups are not zero (so the whole block is not exact there)."""
    torch.manual_seed(0)
    factory, shape = P1_CASES[name]
    conv = factory().to(DT)
    with torch.no_grad():
        assert conv(torch.zeros(1, *shape, dtype=DT)).shape[2:].numel() == 1
    model = nn.Sequential(conv, *_head(conv, shape, classes=4))
    X, y = _data(shape, n=1, classes=4)
    loss_fn = nn.CrossEntropyLoss()
    exact_w = _exact_ggn_block(model, loss_fn, X, y, model[0].weight)
    exact_b = _exact_ggn_block(model, loss_fn, X, y, model[0].bias)
    g = conv.groups
    n = conv.weight.numel() // g
    for ext, field in _extensions(approx)[:2]:
        ext_model = run_extended(model, loss_fn, X, y, ext)
        factors = getattr(ext_model[0].weight, field)
        for i in range(g):
            block = exact_w[i * n : (i + 1) * n, i * n : (i + 1) * n]
            close(torch.kron(factors[0][i], factors[1][i]), block, f"{name} {field} group {i}")
        close(getattr(ext_model[0].bias, field)[0], exact_b, f"{name} {field} bias")
        off = exact_w - factors.to_dense()
        assert off.abs().max() > 1e-6, "the blocks between groups are not zero here"


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", sorted(P1_CASES))
def test_kflr_exact_with_mse_on_the_output(name, approx):
    """MSE on the layer's output, ``P = 1``, any batch size: the output curvature is the same
    for every sample and block-diagonal over the groups, so ``to_dense()`` is the exact
    GGN block (KFLR and KFRA)."""
    torch.manual_seed(0)
    factory, shape = P1_CASES[name]
    conv = factory().to(DT)
    model = nn.Sequential(conv, nn.Flatten())
    X = torch.randn(4, *shape, dtype=DT)
    with torch.no_grad():
        y = torch.randn_like(model(X))
    loss_fn = nn.MSELoss()
    exact = _exact_ggn_block(model, loss_fn, X, y, model[0].weight)
    for ext, field in _extensions(approx)[:2]:
        ext_model = run_extended(model, loss_fn, X, y, ext)
        close(getattr(ext_model[0].weight, field).to_dense(), exact, f"{name} {field} (MSE)")


@pytest.mark.parametrize("mode", ["factored", "heuristic", "correct"])
def test_optimizer_step_is_the_twins(mode):
    """``KroneckerPreconditioner`` on a grouped layer moves each group as the twin's layer."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, groups=2, padding=1, bias=False).to(DT)
    shape = (4, 4, 4)
    start = conv.weight.detach().clone()
    head = _head(conv, shape)
    grouped = extend(nn.Sequential(conv, *copy.deepcopy(head)))
    twin = extend(nn.Sequential(slice_twin(copy.deepcopy(conv), shape), *copy.deepcopy(head)))
    X, y = _data(shape)
    for model in (grouped, twin):
        opt = KroneckerPreconditioner(
            model.parameters(), curvature="kflr", lr=0.5, damping=1e-2, damping_mode=mode
        )
        for _ in range(2):  # the second step uses the moving averages
            opt.zero_grad()
            with backprop(*opt.extensions):
                extend(nn.CrossEntropyLoss())(model(X), y).backward()
            opt.step()
    layers = twin_layers(twin[0])
    for i, layer in enumerate(layers):
        close(grouped[0].weight[3 * i : 3 * (i + 1)], layer.weight, f"{mode}: group {i}")
    assert not torch.equal(grouped[0].weight, start), "the step moved the weight"
    close(grouped[-1].weight, twin[-1].weight, f"{mode}: head")


def _spd(*shape: int) -> torch.Tensor:
    M = torch.randn(*shape, dtype=DT)
    return M @ M.mT + 0.1 * torch.eye(shape[-1], dtype=DT)


def test_grouped_kronecker_factors_match_dense():
    """``to_dense`` is ``block_diag_i(kron(G_i, A_i))``; ``mv`` and ``solve`` agree with it."""
    torch.manual_seed(0)
    shape = torch.Size([6, 2, 3])  # g = 3 groups of [2, 6]
    G, A = _spd(3, 2, 2), _spd(3, 6, 6)
    kron = KroneckerFactors([G, A], shape)
    dense = torch.block_diag(*(torch.kron(G[i], A[i]) for i in range(3)))
    close(kron.to_dense(), dense, "to_dense")
    v = torch.randn(2, *shape, dtype=DT)
    close(kron.mv(v), (v.reshape(2, -1) @ dense.T).reshape(v.shape), "mv")
    system = dense + 0.3 * torch.eye(shape.numel(), dtype=DT)
    expected = torch.linalg.solve(system, v.reshape(2, -1).T).T.reshape(v.shape)
    close(kron.solve(v, 0.3), expected, "solve")
    assert kron.groups == 3
    import pickle

    again = pickle.loads(pickle.dumps(kron))
    assert again.groups == 3 and again.param_shape == shape and not again.transposed
    with pytest.raises(ValueError, match="do not match parameter shape"):
        KroneckerFactors([G, A[:2]], shape)
    with pytest.raises(ValueError, match="square factors"):
        KroneckerFactors([G, A[0]], shape)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_hessian_factors_through_local_and_diagonal_factors_are_the_twins(bias):
    """``HBP("hessian", "exact", "sqrt")`` behind ``conv -> tanh -> conv -> tanh``: the residuals
    reach the first (grouped) layer as diagonal and local factors; its groups' factors are still
    the twin's (with and without a bias: the grouped ``G`` is then formed per group)."""
    torch.manual_seed(0)
    shape = (4, 5, 5)
    conv = nn.Conv2d(4, 4, 3, groups=4, padding=1, bias=bias).to(DT)
    rest = nn.Sequential(
        nn.Tanh(),
        nn.Conv2d(4, 6, 3, groups=2, stride=2).to(DT),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(24, 3, dtype=DT),
    )
    grouped = nn.Sequential(conv, *copy.deepcopy(rest))
    twin = nn.Sequential(slice_twin(conv, shape), *copy.deepcopy(rest))
    X, y = _data(shape)
    loss_fn = nn.CrossEntropyLoss()
    for approx in ("expand", "reduce"):
        ext = exts.HBP("hessian", "exact", "sqrt", kfac_approx=approx)
        ours = run_extended(grouped, loss_fn, X, y, ext)
        theirs = run_extended(twin, loss_fn, X, y, ext)
        G, A = ours[0].weight.hbp
        for i, layer in enumerate(twin_layers(theirs[0])):
            G_i, A_i = layer.weight.hbp
            close(G[i], G_i, f"hessian G group {i} ({approx})")
            close(A[i], A_i, f"hessian A group {i} ({approx})")
            if bias:
                close(_block(ours[0].bias.hbp[0], i, 4), layer.bias.hbp[0], f"bias {i}")
        second, second_twin = ours[2].weight.hbp, theirs[2].weight.hbp
        for a, b in zip(second, second_twin):
            close(a, b, f"the second grouped layer ({approx})")


def test_factorwise_reduction_keeps_the_layout(monkeypatch):
    """``KroneckerFactorwise`` (the distributed reduction of ``p.kflr``) sums grouped and
    transposed factors factor by factor and keeps their layout (two equal ranks, simulated)."""
    import hbpkit.collectives as collectives

    monkeypatch.setattr(collectives.dist, "all_reduce", lambda t, group=None: t.mul_(2))
    torch.manual_seed(0)
    grouped = KroneckerFactors([_spd(3, 2, 2), _spd(3, 6, 6)], torch.Size([6, 2, 3]))
    transposed = KroneckerFactors([_spd(2, 2), _spd(4, 4)], torch.Size([2, 2, 2]), True)
    weights = collectives.ShardWeights(loss=0.5, samples=0.25, world_size=2, sizes=None)
    reduced = collectives.all_reduce_kronecker([grouped, transposed], weights)
    for before, after in zip((grouped, transposed), reduced):
        assert isinstance(after, KroneckerFactors)
        assert (after.groups, after.transposed) == (before.groups, before.transposed)
        close(after[0], 2 * 0.5 * before[0], "G = sum_r w_r G_r")
        close(after[1], 2 * 0.25 * before[1], "A = sum_r a_r A_r")


def test_kfra_from_position_blocks_equals_dense(monkeypatch):
    """KFRA (expand) with a budget that forces position blocks at the grouped layers' outputs
    gives the dense path's factors (and does use the blocks)."""
    from hbpkit.curvature.blocks import PositionBlocks
    from hbpkit.curvature.memory import MemoryPolicy

    used = []
    original = PositionBlocks.sum_blocks

    def spy(self):
        used.append(self.blocks.shape)
        return original(self)

    monkeypatch.setattr(PositionBlocks, "sum_blocks", spy)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2, padding=1),
        nn.Sigmoid(),
        nn.Conv2d(4, 4, 3, groups=4, padding=1, bias=False),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(400, 3),
    ).to(DT)
    X, y = _data((2, 10, 10))
    loss_fn = nn.CrossEntropyLoss()
    runs = []
    for budget in (2**40, 1_000_000):
        memory = MemoryPolicy(max_dense_bytes=budget)
        runs.append(run_extended(net, loss_fn, X, y, exts.KFRA(), memory=memory))
        assert bool(used) == (budget < 2**40), "only the small budget uses position blocks"
    dense, blocks = runs
    for k in (0, 2):
        for p, q in zip(dense[k].parameters(), blocks[k].parameters()):
            assert len(p.kfra) == len(q.kfra)
            for a, b in zip(p.kfra, q.kfra):
                close(b, a, f"layer {k}: blocks vs dense")


ROOT_USERS = {
    "KroneckerRoots": lambda params: ("kronecker_roots", exts.KroneckerRoots("exact")),
    "InputCovariance": lambda params: ("input_covariance", exts.InputCovariance()),
    "EmpiricalKFAC": lambda params: ("kfac_empirical", exts.EmpiricalKFAC()),
    "ISAAC": lambda params: ("kronecker_roots", *ISAAC(params).extensions),
    "FOOF": lambda params: ("input_covariance", *FOOF(params).extensions),
    "NaturalGradient": lambda params: (
        "kronecker_roots",
        *SubsampledNaturalGradient(params).extensions,
    ),
}
REFUSING_LAYERS = {
    "grouped": lambda: nn.Conv1d(4, 4, 2, groups=2),
    "transposed": lambda: nn.ConvTranspose1d(4, 4, 2, groups=2),
}
#: the factors alone come per group; the roots (rows) do not
GROUPED_OK = ("InputCovariance", "EmpiricalKFAC", "FOOF")


@pytest.mark.parametrize(
    "layer_id, user",
    [
        (layer, user)
        for layer in REFUSING_LAYERS
        for user in ROOT_USERS
        if not (layer == "grouped" and user in GROUPED_OK)
    ],
)
def test_root_extensions_refuse_before_writing(layer_id, user):
    """The roots (and the optimizers built on them) have no per-group or transposed layout yet:
    refused before the backward pass, naming the layer, nothing written (grouped layers get
    ``InputCovariance`` and ``EmpiricalKFAC``, and so ``FOOF``, per group)."""
    torch.manual_seed(0)
    conv = REFUSING_LAYERS[layer_id]().to(DT)
    X, y = torch.randn(2, 4, 4, dtype=DT), torch.tensor([0, 2])
    features = conv(X[:1]).numel()
    model = extend(nn.Sequential(conv, nn.Flatten(), nn.Linear(features, 3, dtype=DT)))
    field, *extensions = ROOT_USERS[user](list(model.parameters()))
    name = type(model[0]).__name__
    with pytest.raises(NotImplementedError, match=f"{name}|groups=2"):
        with backprop(*extensions):
            extend(nn.CrossEntropyLoss())(model(X), y).backward()
    assert not any(hasattr(p, field) for p in model.parameters())


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_input_covariance_and_empirical_kfac_are_the_twins(approx):
    """``InputCovariance`` and ``EmpiricalKFAC`` of a grouped layer: per group the twin's
    (the empirical ``G`` from the gradients of the true labels); ``kfac_empirical``'s ``A`` is
    ``input_covariance``."""
    conv, shape = _conv("2d_g2_stride")
    head = _head(conv, shape)
    grouped = nn.Sequential(conv, *copy.deepcopy(head))
    twin = nn.Sequential(slice_twin(conv, shape), *copy.deepcopy(head))
    X, y = _data(shape)
    loss_fn = nn.CrossEntropyLoss()
    extensions = [exts.InputCovariance(kfac_approx=approx), exts.EmpiricalKFAC(kfac_approx=approx)]
    ours = run_extended(grouped, loss_fn, X, y, *extensions)
    theirs = run_extended(twin, loss_fn, X, y, *extensions)
    cov, (G, A) = ours[0].weight.input_covariance, ours[0].weight.kfac_empirical
    assert cov.shape == A.shape == (2, 18, 18) and G.shape == (2, 3, 3)
    close(A, cov, "EmpiricalKFAC's A is InputCovariance")
    for i, layer in enumerate(twin_layers(theirs[0])):
        close(cov[i], layer.weight.input_covariance, f"input covariance group {i}")
        G_i, A_i = layer.weight.kfac_empirical
        close(G[i], G_i, f"empirical G group {i}")
        close(A[i], A_i, f"empirical A group {i}")
        G_bias = ours[0].bias.kfac_empirical[0]
        close(_block(G_bias, i, 2), layer.bias.kfac_empirical[0], f"empirical bias {i}")


def test_foof_step_is_the_twins():
    """``FOOF`` on a grouped layer moves each group as the twin's layer (two steps)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, groups=2, padding=1).to(DT)
    shape = (4, 4, 4)
    start = conv.weight.detach().clone()
    head = _head(conv, shape)
    grouped = extend(nn.Sequential(conv, *copy.deepcopy(head)))
    twin = extend(nn.Sequential(slice_twin(copy.deepcopy(conv), shape), *copy.deepcopy(head)))
    X, y = _data(shape)
    for model in (grouped, twin):
        opt = FOOF(model.parameters(), lr=0.3, damping=0.5, ema=0.5)
        for _ in range(2):
            opt.zero_grad()
            with backprop(*opt.extensions):
                extend(nn.CrossEntropyLoss())(model(X), y).backward()
            opt.step()
    for i, layer in enumerate(twin_layers(twin[0])):
        close(grouped[0].weight[3 * i : 3 * (i + 1)], layer.weight, f"FOOF weight group {i}")
        close(grouped[0].bias[3 * i : 3 * (i + 1)], layer.bias, f"FOOF bias group {i}")
    assert not torch.equal(grouped[0].weight, start), "the step moved the weight"


@pytest.mark.parametrize("mode", ["factored", "heuristic", "correct"])
def test_optimizer_layout_of_one_factor_over_several_dims(mode):
    """A one-factor block over a parameter of several dimensions (``LayerNorm((2, 3))``'s
    ``[6, 6]``) is preconditioned as one ``[6, 1]`` matrix, not per first dimension: the
    ``"correct"`` step is ``KroneckerFactors.solve``."""
    torch.manual_seed(0)
    model = extend(
        nn.Sequential(
            nn.Linear(6, 6), nn.Unflatten(1, (2, 3)), nn.LayerNorm((2, 3)), nn.Flatten()
        ).to(DT)
    )
    X, y = torch.randn(4, 6, dtype=DT), torch.tensor([0, 1, 2, 5])
    weight = model[2].weight
    opt = KroneckerPreconditioner([weight], "kflr", lr=1.0, damping=0.1, damping_mode=mode)
    with backprop(*opt.extensions):
        extend(nn.CrossEntropyLoss())(model(X), y).backward()
    before, grad, factors = weight.detach().clone(), weight.grad.clone(), weight.kflr
    assert len(factors) == 1 and factors[0].shape == (6, 6)
    opt.step()
    if mode == "correct":
        close(weight.detach(), before - factors.solve(grad, 0.1), "correct step")
    else:
        assert weight.shape == before.shape and not torch.equal(weight.detach(), before)
