"""What each of the 2 processes of ``tests/test_distributed.py`` runs, and how they start.

:func:`launch` spawns the workers on the ``gloo`` backend over loopback
(``127.0.0.1``, a free port); each worker saves what it computed to
``<outdir>/rank<r>.pt`` and the test process compares those files with
single-process references. The model, the data and the cases are defined here
once, for the workers and for the references.
"""

from __future__ import annotations

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
    HMP,
    KFLR,
    KFRA,
    BatchGrad,
    BatchL2,
    DiagGGNExact,
    DiagHessian,
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
TRAIN_STEPS = 4

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
    exts += [GGNMP(), HMP()]
    return exts + [SumGradSquared()] if with_sum_grad_squared else exts


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
            for field in KRONECKER_FIELDS:
                entry[field] = tuple(f.clone() for f in getattr(p, field))
            for field in PRODUCT_FIELDS:  # a collective: both ranks, same V, same order
                entry[field] = getattr(p, field)(V)
            out[pname] = entry
        results[name] = out
    return results


def make_optimizer(cls_name: str, params, distributed: bool, **kwargs):
    import hbpkit.optim as optim
    import hbpkit.optim.distributed as doptim

    cls = getattr(doptim, f"Distributed{cls_name}") if distributed else getattr(optim, cls_name)
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


WORKERS = {"quantities": quantities_worker, "training": training_worker}


# ------------------------------------------------------------------------------ launching
def _entry(rank: int, world: int, port: int, outdir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {name: WORKERS[name](rank, world) for name in names}
        torch.save(results, Path(outdir) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears down gloo while another still talks to it
    finally:
        dist.destroy_process_group()


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
    return [torch.load(Path(outdir) / f"rank{r}.pt") for r in range(world)]
