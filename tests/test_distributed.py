"""hbpkit under ``torch.distributed``: reduced quantities and the distributed optimizers.

Two processes on the ``gloo`` backend (loopback only) run the cases of
``tests/distributed_workers.py`` once per test session (one spawn, a few
seconds); the tests compare what they computed with brute-force full-batch
definitions (``tests/reference.py``: autograd Hessians, per-sample loops, the
Kronecker recursions written out) and with single-process training runs, in
float64. Error paths and the single-rank identities run in this process, in a
process group of one.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import hbpkit.extensions as extensions
from hbpkit import backprop, extend
from hbpkit.extensions import (
    GGNMP,
    KFLR,
    EmpiricalKFAC,
    Extension,
    InputCovariance,
    KroneckerRoots,
    SumGradSquared,
    Variance,
)

pytestmark = pytest.mark.skipif(
    not dist.is_available(), reason="torch.distributed is not available in this PyTorch build"
)

if dist.is_available():
    import hbpkit.distributed as distributed
    from hbpkit.collectives import Reduction
    from hbpkit.distributed import (
        AllReducedProduct,
        all_reduce_quantities,
        parameters_in_sync,
        shard_weights,
    )
    from hbpkit.optim import KroneckerPreconditioner, NewtonCG
    from hbpkit.optim.distributed import (
        DistributedKroneckerPreconditioner,
        DistributedNewtonCG,
        assign_to_ranks,
    )
    from hbpkit.optim.kronecker import DAMPING_MODES
    from hbpkit.optim.newton_cg import joint_directions

try:  # tests/ as a package or as a plain directory on sys.path
    from . import distributed_workers as workers
    from . import reference as ref
except ImportError:
    import distributed_workers as workers
    import reference as ref

DT = workers.DT
RTOL, ATOL = 1e-10, 1e-12


# ------------------------------------------------------------------------------ references
@functools.cache
def full_batch_reference(reduction: str) -> dict[str, dict[str, object]]:
    """Every quantity of the worker cases, by definition, on the full batch."""
    model = workers.make_model()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    X, y = workers.make_data()
    params = list(model.parameters())
    names = [name for name, _ in model.named_parameters()]
    out = model(X)
    loss = loss_fn(out, y)
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    per_sample = ref.per_sample_grads_loop(model, loss_fn, X, y, params)
    ggn_blocks = ref.blocks(ref.ggn(out, loss_fn, y, params), params)
    hess_blocks = ref.blocks(ref.hessian(loss, params), params)
    kflr = ref.kron_factors_sqrt(model, loss_fn, X, y)
    kfra = ref.kron_factors_batch_average(model, loss_fn, X, y)
    N = X.shape[0]
    result = {}
    for i, (name, p) in enumerate(zip(names, params)):
        gb = per_sample[i]
        sgs = gb.square().sum(0)
        V = workers.product_inputs(model)[i]
        Vf = V.reshape(V.shape[0], -1)
        result[name] = {
            "grad": grads[i],
            "grad_batch": gb,
            "batch_l2": gb.flatten(1).square().sum(1),
            "sum_grad_squared": sgs,
            "variance": sgs / N - (gb.sum(0) / N).square(),
            "diag_ggn_exact": ggn_blocks[i].diagonal().reshape(p.shape),
            "diag_h": hess_blocks[i].diagonal().reshape(p.shape),
            "ggnmp": (Vf @ ggn_blocks[i].T).reshape(V.shape),
            "hmp": (Vf @ hess_blocks[i].T).reshape(V.shape),
            "kflr": kflr[p],
            "kfra": kfra[p],
        }
    return result


def shard_kfra(reduction: str, sizes: tuple[int, ...]) -> dict[str, tuple]:
    """``sum_r w_r G_r``, ``sum_r a_r A_r`` of each shard's own KFRA factors (by definition)."""
    X, y = workers.make_data()
    N = X.shape[0]
    combined: dict[str, list] = {}
    for rank, n in enumerate(sizes):
        model = workers.make_model()
        idx = workers.shard(sizes, rank)
        factors = ref.kron_factors_batch_average(
            model, nn.CrossEntropyLoss(reduction=reduction), X[idx], y[idx]
        )
        w = n / N if reduction == "mean" else 1.0
        for name, p in model.named_parameters():
            scaled = [factors[p][0] * w] + [A * (n / N) for A in factors[p][1:]]
            if name not in combined:
                combined[name] = scaled
            else:
                combined[name] = [c + s for c, s in zip(combined[name], scaled)]
    return {name: tuple(f) for name, f in combined.items()}


@functools.cache
def one_process_roots(case: str) -> dict[str, dict[str, object]]:
    """The roots' quantities of one process on the full batch (same extensions, hbpkit)."""
    if case in REDUCTION:  # the MLP of the quantity cases
        model, (X, y) = workers.make_model(), workers.make_data()
        loss_fn = nn.CrossEntropyLoss(reduction=REDUCTION[case])
        exts = [EmpiricalKFAC(), InputCovariance(), KroneckerRoots("exact")]
    else:  # a sequence model of ROOT_CASES
        model, (X, y) = workers.make_sequence_model(), workers.make_sequence_data()
        loss_fn = nn.CrossEntropyLoss()
        exts = workers.root_extensions(next(c for c in workers.ROOT_CASES if c[0] == case))
    loss = extend(loss_fn)(model(X), y)
    with backprop(*exts):
        loss.backward()
    return {
        name: {field: workers.saved(field, getattr(p, field)) for field in workers.ROOT_FIELDS}
        for name, p in model.named_parameters()
    }


def assert_same_roots(got: dict, expected: dict, where: str) -> None:
    for field in workers.ROOT_FIELDS:
        assert len(got[field]) == len(expected[field]), f"{where}.{field}"
        for g, e in zip(got[field], expected[field]):
            if e is None or isinstance(e, int):
                assert g == e, f"{where}.{field}"
            else:
                torch.testing.assert_close(g, e, rtol=RTOL, atol=ATOL, msg=f"{where}.{field}")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What the two processes computed (one spawn for the whole module)."""
    outdir = tmp_path_factory.mktemp("distributed")
    return workers.launch(["quantities", "training", "roots"], str(outdir))


# ------------------------------------------------------------------------------ two processes
CASES = [case[0] for case in workers.QUANTITY_CASES]
REDUCTION = {case[0]: case[2] for case in workers.QUANTITY_CASES}
SIZES = {case[0]: case[3] for case in workers.QUANTITY_CASES}
EXACT_FIELDS = ("grad",) + workers.TENSOR_FIELDS + workers.PRODUCT_FIELDS


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_reduced_quantities_equal_the_full_batch_definitions(ranks, case):
    expected = full_batch_reference(REDUCTION[case])
    for rank in ranks:
        for name, got in rank["quantities"][case].items():
            for field in EXACT_FIELDS:
                if field == "sum_grad_squared" and field not in got:
                    continue  # the grad="local" cases recombine variance without it
                torch.testing.assert_close(
                    got[field], expected[name][field], rtol=RTOL, atol=ATOL, msg=f"{name}.{field}"
                )
            for g, e in zip(got["kflr"], expected[name]["kflr"]):
                torch.testing.assert_close(g, e, rtol=RTOL, atol=ATOL, msg=f"{name}.kflr")
    assert "sum_grad_squared" in ranks[0]["quantities"]["ddp_mean"]["0.weight"]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_reduced_roots_equal_one_process_on_the_full_batch(ranks, case):
    """``kfac_empirical``, ``input_covariance``, ``kronecker_roots``: DDP, shards of 3 and 5."""
    expected = one_process_roots(case)
    grads = full_batch_reference(REDUCTION[case])
    for rank in ranks:
        for name, got in rank["quantities"][case].items():
            assert_same_roots(got, expected[name], name)
            # and the reduced roots multiply out to the reduced factors and the gradient
            a, g, g_bar, _ = got["kronecker_roots"]
            G, *A = got["kflr"]
            torch.testing.assert_close(g_bar.T @ g_bar, G, rtol=RTOL, atol=ATOL)
            grad = grads[name]["grad"]
            if a is None:
                torch.testing.assert_close(g.sum(0), grad, rtol=RTOL, atol=ATOL)
                continue
            torch.testing.assert_close(a.T @ a / a.shape[0], A[0], rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(got["input_covariance"], A[0], rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(g.T @ a, grad, rtol=RTOL, atol=ATOL)


ROOT_CASES = [case[0] for case in workers.ROOT_CASES]


@pytest.mark.slow
@pytest.mark.parametrize("case", ROOT_CASES)
def test_reduced_roots_of_positions_equal_one_process_on_the_full_batch(ranks, case):
    """A Linear shared over ``T = 2`` positions: rows ``(n, t)`` and ``(v, n, t)`` stack."""
    expected = one_process_roots(case)
    for rank in ranks:
        for name, got in rank["roots"][case].items():
            assert_same_roots(got, expected[name], name)
    assert expected["0.weight"]["kronecker_roots"][3] == (workers.T if "expand" in case else 1)


@pytest.mark.slow
def test_roots_of_different_positions_per_rank_raise(ranks):
    for rank in ranks:
        message = rank["roots"]["unequal_positions"]
        assert message is not None, "the reduction stacked rows of different layouts"
        assert "[2, 3] rows per sample" in message and "kfac_approx='reduce'" in message


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_reduced_kfra_is_exact_for_the_input_factor_and_the_last_layer_only(ranks, case):
    """KFRA's ``G`` averages the shards' recursions: exact at the output layer only."""
    expected = full_batch_reference(REDUCTION[case])
    shard_combination = shard_kfra(REDUCTION[case], SIZES[case])
    last = {"4.weight", "4.bias"}
    for name, got in ranks[0]["quantities"][case].items():
        G, *A = got["kfra"]
        for a, a_full in zip(A, expected[name]["kfra"][1:]):
            torch.testing.assert_close(a, a_full, rtol=RTOL, atol=ATOL)  # A: always exact
        # what the reduction does, by definition: the weighted sum of the shards' G
        torch.testing.assert_close(G, shard_combination[name][0], rtol=RTOL, atol=ATOL)
        G_full = expected[name]["kfra"][0]
        if name in last:
            torch.testing.assert_close(G, G_full, rtol=RTOL, atol=ATOL)
        else:  # the approximation is visible: cross terms between shards are missing
            assert (G - G_full).norm() > 1e-6 * G_full.norm()  # far above rounding (1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_reduced_quantities_are_identical_on_all_ranks(ranks, case):
    first, second = (r["quantities"][case] for r in ranks)
    for name in first:
        for field, value in first[name].items():
            other = second[name][field]
            if isinstance(value, tuple):  # factors, or roots (a or g_bar None, positions)
                same = [
                    torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                    for a, b in zip(value, other)
                ]
                assert len(value) == len(other) and all(same), f"{name}.{field}"
            else:
                assert torch.equal(value, other), f"{name}.{field}"


TRAIN_CASES = {case[0]: case for case in workers.TRAIN_CASES}


def test_training_cases_cover_every_option():
    """Every damping mode of the Kronecker preconditioner, and NewtonCG's options, run."""
    modes, newton_options = set(), set()
    for _, cls_name, kwargs in workers.TRAIN_CASES:
        options = [kwargs] + kwargs.get("param_groups", [])
        if cls_name == "KroneckerPreconditioner":
            modes |= {o.get("damping_mode", "factored") for o in options}
        else:
            newton_options |= {key for o in options for key in o} | {kwargs["curvature"]}
    assert modes == set(DAMPING_MODES)
    parameters = inspect.signature(NewtonCG).parameters
    assert set(parameters) - {"params"} <= newton_options
    assert {"ggn", "hessian", "pch-abs", "pch-clip", "kflr", "empirical"} <= newton_options


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_parameters_stay_identical_across_ranks(ranks, case):
    (traj0, in_sync), (traj1, _) = (r["training"][case] for r in ranks)
    assert in_sync == [True] * workers.TRAIN_STEPS
    for step0, step1 in zip(traj0, traj1):
        assert all(torch.equal(a, b) for a, b in zip(step0, step1))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_matches_the_single_process_full_batch_run(ranks, case):
    X, y = workers.make_data()
    single, _ = workers.train(TRAIN_CASES[case], X, y, distributed=False)
    distributed, _ = ranks[0]["training"][case]
    start = [p.detach() for p in workers.make_model().parameters()]
    for step, (got, expected) in enumerate(zip(distributed, single)):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11, msg=f"step {step}")
    # the runs moved: the comparison is not between two copies of the initialisation
    assert all((e - p0).abs().max() > 1e-3 for e, p0 in zip(single[-1], start))


# ------------------------------------------------------------------------------ one process
def test_calls_without_a_process_group_say_what_to_do():
    assert not dist.is_initialized(), "an earlier test left a default process group behind"
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(RuntimeError, match="init_process_group"):
        all_reduce_quantities([p])
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedNewtonCG([p])


@pytest.fixture
def group_of_one():
    """A ``gloo`` process group with this process as its only rank."""
    assert not dist.is_initialized(), "an earlier test left a default process group behind"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _backward(*extensions, reduction="mean", n=5):
    model, (X, y) = workers.make_model(), workers.make_data(n)
    loss = extend(nn.CrossEntropyLoss(reduction=reduction))(model(X), y)
    with backprop(*extensions):
        loss.backward()
    return model


def test_bad_options_raise_before_anything_is_written(group_of_one):
    model = _backward(KFLR(), Variance())
    p = model[0].weight
    kflr, variance = p.kflr, p.variance
    with pytest.raises(ValueError, match="reduction='avg'"):
        all_reduce_quantities(model.parameters(), reduction="avg")
    with pytest.raises(ValueError, match="grad='none'"):
        all_reduce_quantities(model.parameters(), grad="none")
    with pytest.raises(ValueError, match="savefield 'diag_foo'"):
        all_reduce_quantities(model.parameters(), savefields=["diag_foo"])
    with pytest.raises(ValueError, match="batch_size"):
        all_reduce_quantities(model.parameters(), batch_size=-1)
    with pytest.raises(ValueError, match="needs batch_size"):
        all_reduce_quantities(model.parameters())
    # under DDP the shard's gradient is gone: variance needs SumGradSquared
    with pytest.raises(ValueError, match="SumGradSquared"):
        all_reduce_quantities(model.parameters(), batch_size=5)
    assert p.kflr is kflr and p.variance is variance  # nothing half-reduced
    with pytest.raises(ValueError, match="reduction='max'"):
        DistributedKroneckerPreconditioner(model.parameters(), reduction="max")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_rank_reduces_to_itself(group_of_one, reduction):
    model = _backward(KFLR(), Variance(), SumGradSquared(), GGNMP(), reduction=reduction)
    before = {p: (p.kflr, p.variance.clone(), p.grad.clone(), p.ggnmp) for p in model.parameters()}
    all_reduce_quantities(model.parameters(), reduction=reduction, batch_size=5, grad="local")
    for p, (kflr, variance, grad, ggnmp) in before.items():
        assert all(torch.equal(a, b) for a, b in zip(p.kflr, kflr))
        torch.testing.assert_close(p.variance, variance, rtol=1e-12, atol=1e-15)
        assert torch.equal(p.grad, grad)
        V = torch.randn(2, *p.shape, dtype=DT)
        assert isinstance(p.ggnmp, AllReducedProduct)
        assert torch.equal(p.ggnmp(V), ggnmp(V))
    assert parameters_in_sync(model.parameters())
    weights = shard_weights(reduction, 5)
    assert (weights.loss, weights.samples, weights.total) == (1.0, 1.0, 5)


def test_newton_cg_refuses_products_reduced_twice(group_of_one):
    model = _backward(GGNMP())
    all_reduce_quantities(model.parameters())
    opt = DistributedNewtonCG(model.parameters(), curvature="ggn")
    with pytest.raises(ValueError, match="already all-reduced"):
        opt.step()
    DistributedNewtonCG(model.parameters(), curvature="ggn", reduction=None).step()


def test_every_extension_says_how_it_is_reduced():
    registered = set(extensions.EXTENSIONS)
    public = {
        obj
        for obj in vars(extensions).values()
        if isinstance(obj, type) and issubclass(obj, Extension) and obj is not Extension
    }
    assert public <= registered, f"not in EXTENSIONS: {public - registered}"
    for cls in extensions.EXTENSIONS:
        assert isinstance(cls.reduction, Reduction), cls
        assert distributed.reduction_of(cls.savefield) is cls.reduction
    assert set(distributed.SAVEFIELDS) == {cls.savefield for cls in registered}


def test_unknown_or_unreducible_savefields_raise(group_of_one, monkeypatch):
    model = _backward(KFLR())
    p = model[0].weight
    kflr = p.kflr
    with pytest.raises(ValueError, match=r"savefield 'diag_foo'.*EXTENSIONS"):
        all_reduce_quantities(model.parameters(), savefields=["kflr", "diag_foo"])

    class Unreducible(Extension):
        savefield = "unreducible"

    monkeypatch.setitem(distributed.OWNERS, "unreducible", Unreducible)
    with pytest.raises(ValueError, match=r"'unreducible' \(Unreducible\) has no rule"):
        all_reduce_quantities(model.parameters(), savefields=["unreducible"])
    p.unreducible = torch.zeros(1)  # found among the present quantities: not skipped
    monkeypatch.setattr(distributed, "SAVEFIELDS", distributed.SAVEFIELDS + ("unreducible",))
    with pytest.raises(ValueError, match="'unreducible'"):
        all_reduce_quantities(model.parameters())
    assert p.kflr is kflr  # nothing half-reduced


def test_wrappers_take_every_option_of_their_parents():
    for wrapper, parent in (
        (DistributedKroneckerPreconditioner, KroneckerPreconditioner),
        (DistributedNewtonCG, NewtonCG),
    ):
        own = inspect.signature(parent).parameters
        wrapped = inspect.signature(wrapper).parameters
        assert list(wrapped)[: len(own)] == list(own)
        assert list(wrapped)[len(own) :] == ["reduction", "group"]


@pytest.mark.parametrize("damping_mode", list(DAMPING_MODES))
def test_kronecker_preconditioner_on_one_rank_is_the_plain_one(group_of_one, damping_mode):
    kwargs = dict(curvature="kflr", lr=0.3, damping=1e-2, update_every=2, momentum=0.5)
    kwargs["damping_mode"] = damping_mode
    models = []
    for cls in (KroneckerPreconditioner, DistributedKroneckerPreconditioner):
        model = workers.make_model()
        X, y = workers.make_data()
        opt = cls(model.parameters(), **kwargs)
        for _ in range(3):
            opt.zero_grad()
            with backprop(*opt.extensions):
                extend(nn.CrossEntropyLoss())(model(X), y).backward()
            opt.step()
        models.append(model)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_inversions_are_balanced_by_cost():
    costs = [8.0, 7.0, 6.0, 5.0, 4.0, 1.0]
    owners = assign_to_ranks(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    best = min(
        max(sum(c for c, o in zip(costs, a) if o == r) for r in range(2))
        for a in itertools.product(range(2), repeat=len(costs))
    )
    assert max(loads) <= 4 / 3 * best  # LPT's guarantee (Graham 1969)
    assert set(owners) == {0, 1}
    assert assign_to_ranks(costs, 1) == [0] * len(costs)
    assert assign_to_ranks([], 3) == []


@pytest.mark.parametrize("block_split", [1, 3])
def test_joint_cg_equals_the_per_parameter_solves(block_split):
    """One batched CG over zero-padded rows gives each block's own solve (and diagnostics)."""
    g = torch.Generator().manual_seed(3)
    shapes, blocks, calls = [(3, 4), (4,), (2, 2, 2)], [], []
    for i, shape in enumerate(shapes):
        p = nn.Parameter(torch.zeros(shape, dtype=DT))
        p.grad = torch.randn(shape, dtype=DT, generator=g)
        n = p.numel()
        M = torch.randn(n, n, dtype=DT, generator=g)
        C = M @ M.T / n + 0.05 * torch.eye(n, dtype=DT)

        def product(V, C=C, i=i):
            calls.append(i)
            return (V.reshape(V.shape[0], -1) @ C.T).reshape(V.shape)

        blocks.append((p, product))
    group = dict(damping=0.1, cg_maxiter=6, cg_tol=1e-3, cg_atol=0.0, block_split=block_split)
    directions, info = joint_directions(blocks, group, combine=lambda products: products)
    assert calls == [0, 1, 2] * int(info.iterations.max())  # every product once per iteration
    start = 0
    for (p, product), d in zip(blocks, directions):
        expected, expected_info = NewtonCG._direction(product, p, group)
        torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-14)
        k = len(expected_info.iterations)
        assert torch.equal(info.iterations[start : start + k], expected_info.iterations)
        assert torch.equal(info.converged[start : start + k], expected_info.converged)
        start += k


# ------------------------------------------------------------------------------ the example
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="threads are read from /proc")
def test_destroy_process_group_joins_the_gloo_threads(ranks):
    """Nothing keeps the group alive past ``destroy_process_group`` (DDP's lazy imports did),
    so no gloo worker thread runs into interpreter shutdown (where it aborted the process)."""
    for rank in ranks:
        threads = rank["threads_after_destroy"]
        assert threads is not None, "the worker could not list its threads"
        assert not [t for t in threads if "gloo" in t], threads


@pytest.mark.slow
def test_distributed_digits_example_under_torchrun(tmp_path):
    """``torchrun --nproc_per_node=2`` trains the digits model; the ranks stay in sync."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(root / "examples" / "distributed_digits.py"), "--epochs", "3"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stderr[:3000]
    assert "parameters identical on all 2 ranks: True" in lines, done.stdout
    accuracy = float(next(line for line in lines if line.startswith("test accuracy")).split()[-2])
    assert accuracy > 80.0, done.stdout
