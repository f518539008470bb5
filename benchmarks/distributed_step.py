"""Time one optimizer step of the digits model on 1 and on 2 processes (torch.distributed, gloo).

    python benchmarks/distributed_step.py                  # 30 timed steps per case, 1 thread each
    python benchmarks/distributed_step.py --repeats 10 --hidden 256

The model is the digits demo's sigmoid MLP ``64-hidden-10``; the global batch is
the whole training split (1,344 images, 672 per process with 2). Each case runs in
fresh processes (spawned here, loopback ``gloo``, 1 thread each); "1 (plain)" is
the ordinary optimizer without DDP, the baseline. Per iteration it
times, on every rank, ``opt.step()`` alone (the reductions, inversions or CG
solves) and the whole iteration (forward, backward with the extensions, step);
the reported value is the median over the timed iterations of the slowest rank.
``KroneckerPreconditioner`` recomputes its inverses every step
(``update_every=1``), so the spread inversions are in every timed step.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hbpkit import backprop, extend
from hbpkit.optim import KroneckerPreconditioner, NewtonCG
from hbpkit.optim.distributed import DistributedKroneckerPreconditioner, DistributedNewtonCG

KRONECKER = dict(curvature="kflr", lr=0.1, damping=1e-2, update_every=1, momentum=0.5)
NEWTON = dict(curvature="ggn", lr=0.1, damping=1e-2, cg_maxiter=10, cg_tol=0.0)
# name -> (plain optimizer, distributed optimizer, keyword arguments)
OPTIMIZERS = {
    "KroneckerPreconditioner (kflr)": (
        KroneckerPreconditioner,
        DistributedKroneckerPreconditioner,
        KRONECKER,
    ),
    "NewtonCG (ggn, 10 CG iterations)": (NewtonCG, DistributedNewtonCG, NEWTON),
}


def _worker(rank: int, world: int, port: int, name: str, plain: bool, args, outdir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    digits = load_digits()
    X = torch.tensor(digits.data[:1344] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[:1344], dtype=torch.long)
    share = len(X) // world
    X, y = X[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
    torch.manual_seed(0)
    model = extend(
        nn.Sequential(nn.Linear(64, args.hidden), nn.Sigmoid(), nn.Linear(args.hidden, 10))
    )
    net = model if plain else DistributedDataParallel(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    plain_cls, distributed_cls, kwargs = OPTIMIZERS[name]
    opt = (plain_cls if plain else distributed_cls)(model.parameters(), **kwargs)
    steps, iterations = [], []
    for i in range(args.warmup + args.repeats):
        dist.barrier()
        start = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn(net(X), y)
        with backprop(*opt.extensions):
            loss.backward()
        before_step = time.perf_counter()
        opt.step()
        end = time.perf_counter()
        if i >= args.warmup:
            steps.append(end - before_step)
            iterations.append(end - start)
    # the slowest rank sets the pace
    times = torch.tensor([steps, iterations], dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    if rank == 0:
        torch.save(times, Path(outdir) / "times.pt")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(name: str, world: int, plain: bool, args) -> tuple[float, float]:
    """Median seconds of ``opt.step()`` and of a whole iteration on ``world`` processes."""
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_worker, args=(world, _free_port(), name, plain, args, outdir), nprocs=world)
        steps, iterations = torch.load(Path(outdir) / "times.pt")
    return statistics.median(steps.tolist()), statistics.median(iterations.tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=32)
    args = parser.parse_args()
    print(f"digits MLP 64-{args.hidden}-10, global batch 1344, medians of {args.repeats} steps\n")
    print(f"{'optimizer':<34} {'processes':>9} {'opt.step() ms':>14} {'iteration ms':>13}")
    for name in OPTIMIZERS:
        for world, plain in ((1, True), (1, False), (2, False)):
            step, iteration = measure(name, world, plain, args)
            label = f"{world} (plain)" if plain else str(world)
            print(f"{name:<34} {label:>9} {1e3 * step:>14.2f} {1e3 * iteration:>13.2f}")


if __name__ == "__main__":
    main()
