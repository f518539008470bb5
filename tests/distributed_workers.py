"""What each of the 2 processes of ``tests/test_distributed.py`` runs, and how they start.

:func:`launch` spawns the workers on the ``gloo`` backend over loopback
(``127.0.0.1``, a free port); each worker saves what it computed to
``<outdir>/rank<r>.pt`` and the test process compares those files with
single-process references. The model, the data and the cases are defined here
once, for the workers and for the references.
"""

from __future__ import annotations

import gc
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hbpkit import backprop, extend
from hbpkit.extensions import (
    GGNMP,
    HBP,
    HMP,
    KFLR,
    KFRA,
    BatchGrad,
    BatchL2,
    DiagGGNExact,
    DiagHessian,
    EmpiricalKFAC,
    InputCovariance,
    KroneckerRoots,
    SumGradSquared,
    Variance,
)

DT = torch.float64
N = 8  # full batch

# (name, DDP?, loss reduction, shard sizes, grad option, extensions)
QUANTITY_CASES = [
    ("ddp_mean", True, "mean", (4, 4), "ddp", True),
    ("local_mean", False, "mean", (3, 5), "local", False),
    ("local_sum", False, "sum", (3, 5), "local", False),
]
PRODUCT_FIELDS = ("ggnmp", "hmp")
TENSOR_FIELDS = (
    "grad_batch",
    "batch_l2",
    "sum_grad_squared",
    "variance",
    "diag_ggn_exact",
    "diag_h",
)
KRONECKER_FIELDS = ("kflr", "kfra")
#: the quantities reduced by rows (roots) or as sample averages; compared with one
#: process running the same extensions on the full batch
ROOT_FIELDS = ("kfac_empirical", "input_covariance", "kronecker_roots")
TRAIN_STEPS = 4

# the roots of a model with T = 2 positions per sample (a Linear over [N, T, D]), on shards
# (3, 5): (name, KroneckerRoots kwargs, kfac_approx of InputCovariance / EmpiricalKFAC)
T = 2
ROOT_CASES = [
    ("exact_expand", dict(loss_hessian="exact"), "expand"),
    ("empirical_expand_bias", dict(loss_hessian="empirical", bias_column=True), "expand"),
    ("exact_reduce", dict(loss_hessian="exact", kfac_approx="reduce"), "reduce"),
    ("none_expand", dict(loss_hessian=None), "expand"),
]
ROOT_SIZES = (3, 5)

# optimizer configurations for the training runs: (name, class name, kwargs)
TRAIN_CASES = [
    (
        "kronecker_kflr",
        "KroneckerPreconditioner",
        dict(curvature="kflr", lr=0.5, damping=1e-2, update_every=2, momentum=0.5, ema=0.9),
    ),
    (
        "newton_ggn",
        "NewtonCG",
        dict(curvature="ggn", lr=0.5, damping=0.1, cg_maxiter=8, cg_tol=1e-3, block_split=2),
    ),
    ("newton_pch", "NewtonCG", dict(curvature="pch-abs", lr=0.5, damping=0.1, cg_maxiter=8)),
    ("newton_kflr", "NewtonCG", dict(curvature="kflr", lr=0.5, damping=0.1, cg_maxiter=8)),
    # every damping_mode of KroneckerPreconditioner (DAMPING_MODES), the inversions spread
    (
        "kronecker_heuristic",
        "KroneckerPreconditioner",
        dict(curvature="kflr", lr=0.5, damping=1e-2, damping_mode="heuristic", momentum=0.5),
    ),
    (
        "kronecker_correct",
        "KroneckerPreconditioner",
        dict(curvature="kflr", lr=0.5, damping=1e-2, damping_mode="correct", ema=0.5),
    ),
    (
        "kronecker_empirical_groups",
        "KroneckerPreconditioner",
        dict(
            curvature="empirical",
            lr=0.3,
            damping=1e-2,
            update_every=2,
            param_groups=[dict(damping_mode="correct"), dict(damping_mode="heuristic", lr=0.5)],
        ),
    ),
    # NewtonCG's other options: curvatures, cg_atol, block_split, extension, groups
    (
        "newton_hessian_atol",
        "NewtonCG",
        dict(curvature="hessian", lr=0.5, damping=0.5, cg_maxiter=8, cg_atol=1e-4),
    ),
    (
        "newton_pch_clip_groups",
        "NewtonCG",
        dict(
            curvature="pch-clip",
            lr=0.5,
            damping=0.1,
            param_groups=[dict(block_split=3, cg_tol=1e-2), dict(cg_maxiter=4, damping=0.2)],
        ),
    ),
    (
        "newton_empirical",
        "NewtonCG",
        dict(curvature="empirical", lr=0.5, damping=0.1, cg_maxiter=8, block_split=2),
    ),
    (
        "newton_hbp_extension",
        "NewtonCG",
        dict(curvature="hbp", lr=0.5, damping=0.1, extension=HBP("pch-abs", "exact", "sqrt")),
    ),
]


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(5, 6), nn.Sigmoid(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)]
    return extend(nn.Sequential(*layers).to(DT))


def make_data(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, dtype=DT, generator=g), torch.randint(3, (n,), generator=g)


def product_inputs(model: nn.Module) -> list[torch.Tensor]:
    """The ``V [2, *p.shape]`` every rank (and the reference) multiplies with."""
    g = torch.Generator().manual_seed(2)
    return [torch.randn(2, *p.shape, dtype=DT, generator=g) for p in model.parameters()]


def shard(sizes: tuple[int, ...], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def extensions(with_sum_grad_squared: bool) -> list:
    exts = [BatchGrad(), BatchL2(), Variance(), DiagGGNExact(), DiagHessian(), KFLR(), KFRA()]
    exts += [GGNMP(), HMP(), EmpiricalKFAC(), InputCovariance(), KroneckerRoots("exact")]
    return exts + [SumGradSquared()] if with_sum_grad_squared else exts


def root_extensions(case: tuple) -> list:
    _, roots_kwargs, approx = case
    return [KroneckerRoots(**roots_kwargs), InputCovariance(approx), EmpiricalKFAC(approx)]


def make_sequence_model() -> nn.Sequential:
    """A Linear over ``T`` positions (weight sharing), then one over the flattened sequence."""
    torch.manual_seed(0)
    layers = [nn.Linear(5, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * T, 3)]
    return extend(nn.Sequential(*layers).to(DT))


def make_sequence_data(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randn(n, T, 5, dtype=DT, generator=g), torch.randint(3, (n,), generator=g)


def saved(field: str, value):
    """A copy of ``p.<field>`` that ``torch.save`` keeps (roots: a tuple with ``None``)."""
    if field == "kronecker_roots":
        return tuple(None if t is None else t.clone() for t in value[:3]) + (value.positions,)
    if isinstance(value, tuple):
        return tuple(f.clone() for f in value)
    return value.clone()


# ------------------------------------------------------------------------------ workers
def quantities_worker(rank: int, world: int) -> dict:
    """Every case of :data:`QUANTITY_CASES`: the reduced quantities of this rank."""
    from torch.nn.parallel import DistributedDataParallel

    from hbpkit.distributed import all_reduce_quantities

    X, y = make_data()
    results = {}
    for name, use_ddp, reduction, sizes, grad, with_sgs in QUANTITY_CASES:
        model = make_model()
        net = DistributedDataParallel(model) if use_ddp else model
        loss_fn = extend(nn.CrossEntropyLoss(reduction=reduction))
        idx = shard(sizes, rank)
        loss = loss_fn(net(X[idx]), y[idx])
        with backprop(*extensions(with_sgs)):
            loss.backward()
        all_reduce_quantities(
            model.parameters(), reduction=reduction, batch_size=sizes[rank], grad=grad
        )
        out = {}
        for (pname, p), V in zip(model.named_parameters(), product_inputs(model)):
            entry = {"grad": p.grad.clone()}
            for field in TENSOR_FIELDS:
                if hasattr(p, field):
                    entry[field] = getattr(p, field).clone()
            for field in KRONECKER_FIELDS + ROOT_FIELDS:
                entry[field] = saved(field, getattr(p, field))
            for field in PRODUCT_FIELDS:  # a collective: both ranks, same V, same order
                entry[field] = getattr(p, field)(V)
            out[pname] = entry
        results[name] = out
    return results


def roots_worker(rank: int, world: int) -> dict:
    """Every case of :data:`ROOT_CASES` on this rank's shard, and the unequal-positions error."""
    from hbpkit.distributed import all_reduce_quantities

    X, y = make_sequence_data()
    idx = shard(ROOT_SIZES, rank)
    results = {}
    for case in ROOT_CASES:
        model = make_sequence_model()
        loss = extend(nn.CrossEntropyLoss())(model(X[idx]), y[idx])
        with backprop(*root_extensions(case)):
            loss.backward()
        all_reduce_quantities(model.parameters(), batch_size=ROOT_SIZES[rank], grad="local")
        results[case[0]] = {
            name: {field: saved(field, getattr(p, field)) for field in ROOT_FIELDS}
            for name, p in model.named_parameters()
        }
    # positions differ by rank (T = 2 + rank): the roots' rows do not stack
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT))
    Xr = torch.randn(2, 2 + rank, 5, dtype=DT)
    loss = extend(nn.MSELoss())(model(Xr), torch.zeros(2, 2 + rank, 3, dtype=DT))
    with backprop(KroneckerRoots("exact")):
        loss.backward()
    try:
        all_reduce_quantities(model.parameters(), batch_size=2)
        results["unequal_positions"] = None
    except ValueError as error:
        results["unequal_positions"] = str(error)
    return results


def make_optimizer(cls_name: str, params, distributed: bool, **kwargs):
    """``param_groups=[opts_0, opts_1]`` in ``kwargs``: the first layer's parameters, then the
    rest, as two groups with these overrides."""
    import hbpkit.optim as optim
    import hbpkit.optim.distributed as doptim

    cls = getattr(doptim, f"Distributed{cls_name}") if distributed else getattr(optim, cls_name)
    kwargs = dict(kwargs)
    overrides = kwargs.pop("param_groups", None)
    if overrides is not None:
        params = list(params)
        params = [dict(params=params[:2], **overrides[0]), dict(params=params[2:], **overrides[1])]
    return cls(params, **kwargs)


def train(
    case: tuple, X: torch.Tensor, y: torch.Tensor, distributed: bool
) -> tuple[list[list[torch.Tensor]], list[bool]]:
    """:data:`TRAIN_STEPS` steps; the parameters after each, and whether the ranks agree."""
    from torch.nn.parallel import DistributedDataParallel

    from hbpkit.distributed import parameters_in_sync

    _, cls_name, kwargs = case
    model = make_model()
    net = DistributedDataParallel(model) if distributed else model
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = make_optimizer(cls_name, model.parameters(), distributed, **kwargs)
    trajectory, in_sync = [], []
    for _ in range(TRAIN_STEPS):
        opt.zero_grad()
        loss = loss_fn(net(X), y)
        with backprop(*opt.extensions):
            loss.backward()
        opt.step()
        trajectory.append([p.detach().clone() for p in model.parameters()])
        if distributed:
            in_sync.append(parameters_in_sync(model.parameters()))
    return trajectory, in_sync


def training_worker(rank: int, world: int) -> dict:
    """Every case of :data:`TRAIN_CASES` on this rank's half of the batch, under DDP."""
    X, y = make_data()
    idx = shard((N // world,) * world, rank)
    return {case[0]: train(case, X[idx], y[idx], distributed=True) for case in TRAIN_CASES}


WORKERS = {"quantities": quantities_worker, "training": training_worker, "roots": roots_worker}


# ------------------------------------------------------------------------------ launching
def thread_names() -> list[str] | None:
    """The names of this process's threads (Linux), ``None`` where ``/proc`` has none."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    return sorted((task / "comm").read_text().strip() for task in tasks.iterdir())


def _entry(rank: int, world: int, port: int, outdir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {name: WORKERS[name](rank, world) for name in names}
        torch.save(results, Path(outdir) / f"rank{rank}.pt")
        del results
        gc.collect()  # the DDP wrappers and their hooks, should a reference cycle keep them
        dist.barrier()  # no rank tears down gloo while another still talks to it
    finally:
        dist.destroy_process_group()
    # the group had no other owner: its destructor has joined gloo's threads
    torch.save(thread_names(), Path(outdir) / f"rank{rank}.threads")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(names: list[str], outdir: str, world: int = 2, timeout: float = 240.0) -> list[dict]:
    """Run the workers ``names`` on ``world`` processes; their results, by rank."""
    ctx = mp.start_processes(
        _entry,
        args=(world, free_port(), outdir, names),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                if process.is_alive():
                    process.terminate()
            raise TimeoutError(f"distributed workers {names} did not finish in {timeout} s")
    results = [torch.load(Path(outdir) / f"rank{r}.pt") for r in range(world)]
    for r, result in enumerate(results):
        result["threads_after_destroy"] = torch.load(Path(outdir) / f"rank{r}.threads")
    return results
