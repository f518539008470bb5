"""Train the digits model with hbpkit's curvature on several processes (torch.distributed).

    torchrun --standalone --nproc_per_node=2 examples/distributed_digits.py
    torchrun --standalone --nproc_per_node=2 examples/distributed_digits.py --optimizer newton-cg
    torchrun --standalone --nproc_per_node=2 examples/distributed_digits.py --fashion-mnist

Each rank wraps the same sigmoid MLP in ``DistributedDataParallel`` (``gloo``
backend, CPU), takes its share of every mini-batch, runs one backward pass inside
``backprop(*opt.extensions)`` and calls ``opt.step()``: the distributed optimizer
all-reduces the curvature (and spreads the Kronecker inversions over the ranks),
so every rank takes the step one process would take on the whole mini-batch.
Rank 0 prints the training loss and the test accuracy per epoch, and at the end
whether the parameters are bit-for-bit identical on all ranks.

Data: scikit-learn's 8x8 digits (default, a few seconds), or Fashion-MNIST from
Debian's ``dataset-fashion-mnist`` (``--fashion-mnist``, 28x28, 60,000 images;
nothing is downloaded). Without ``torchrun`` the script runs as one process.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hbpkit import backprop, extend
from hbpkit.distributed import parameters_in_sync
from hbpkit.optim.distributed import DistributedKroneckerPreconditioner, DistributedNewtonCG

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fashion_mnist import FashionMNISTMissingError, load_fashion_mnist  # noqa: E402


def load_data(fashion_mnist: bool):
    """``(X_train, X_test, y_train, y_test)``, float32 pixels in ``[0, 1]``."""
    if fashion_mnist:
        X_tr, y_tr = load_fashion_mnist("train")
        X_te, y_te = load_fashion_mnist("test")
        return X_tr, X_te, y_tr, y_te
    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    return train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)


def make_model(inputs: int, hidden: int = 32, seed: int = 0) -> nn.Module:
    """The digits demo's sigmoid MLP; the same initialisation on every rank."""
    torch.manual_seed(seed)
    return extend(nn.Sequential(nn.Linear(inputs, hidden), nn.Sigmoid(), nn.Linear(hidden, 10)))


def make_optimizer(name: str, params):
    if name == "kfac":
        return DistributedKroneckerPreconditioner(
            params, curvature="kflr", lr=0.5, damping=1e-2, update_every=5, momentum=0.5, ema=0.9
        )
    if name == "newton-cg":
        return DistributedNewtonCG(
            params, curvature="ggn", lr=0.2, damping=1e-2, cg_maxiter=10, cg_tol=1e-2
        )
    raise ValueError(f"--optimizer {name!r}: choose 'kfac' or 'newton-cg'")


def init_process_group() -> None:
    """``gloo`` from torchrun's environment; a group of one without torchrun."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    else:
        print("(not launched by torchrun: running as 1 process)")
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def train(args: argparse.Namespace, rank: int, world: int) -> dict[str, float]:
    """Train on this rank's share of every mini-batch; the last epoch's loss and accuracy.

    Everything that holds the process group (the DDP wrapper, its gradient hooks) lives
    in this function's scope, so it is gone when :func:`main` destroys the group.
    """
    try:
        X_tr, X_te, y_tr, y_te = load_data(args.fashion_mnist)
    except FashionMNISTMissingError as error:
        if rank == 0:
            print(f"{error}\n(apt install dataset-fashion-mnist)")
        return {}
    share = args.batch_size // world  # every rank gets the same number of samples
    if share < 1:
        raise ValueError(f"--batch-size {args.batch_size} is smaller than {world} processes")
    model = make_model(X_tr.shape[1])
    net = DistributedDataParallel(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = make_optimizer(args.optimizer, model.parameters())
    if rank == 0:
        print(
            f"{world} process(es), {args.optimizer}, {len(X_tr)} training images, "
            f"mini-batches of {share * world} ({share} per process)"
        )
    generator = torch.Generator().manual_seed(0)  # the same shuffle on every rank
    results: dict[str, float] = {}
    for epoch in range(args.epochs):
        order = torch.randperm(len(X_tr), generator=generator)
        batches = order[: len(order) // (share * world) * share * world].view(-1, world, share)
        losses = []
        for batch in batches:
            idx = batch[rank]
            opt.zero_grad()
            loss = loss_fn(net(X_tr[idx]), y_tr[idx])
            with backprop(*opt.extensions):
                loss.backward()
            opt.step()
            losses.append(loss.detach())
        mean_loss = torch.stack(losses).mean()
        dist.all_reduce(mean_loss)
        with torch.no_grad():
            accuracy = (model(X_te).argmax(1) == y_te).double().mean().item()
        results = {"train_loss": mean_loss.item() / world, "test_accuracy": accuracy}
        if rank == 0:
            print(
                f"epoch {epoch + 1:>3}  train loss {results['train_loss']:.4f}  "
                f"test accuracy {100 * accuracy:.1f} %"
            )
    in_sync = parameters_in_sync(model.parameters())
    if rank == 0:
        print(f"test accuracy {100 * results['test_accuracy']:.2f} %")
        print(f"parameters identical on all {world} ranks: {in_sync}")
    return results


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", default="kfac", choices=("kfac", "newton-cg"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256, help="global mini-batch size")
    parser.add_argument("--fashion-mnist", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    # hbpkit is imported before the process group exists (see hbpkit/collectives.py: a
    # module imported after it would keep the group, and gloo's threads, alive to exit)
    init_process_group()
    results = train(args, dist.get_rank(), dist.get_world_size())
    gc.collect()  # the DDP wrapper and its hooks, should a reference cycle keep them
    dist.barrier()  # no rank tears down gloo while another still talks to it
    # the last reference to the group: its destructor joins gloo's worker threads here,
    # while the interpreter is whole, not at exit
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
