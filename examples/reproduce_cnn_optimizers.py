"""Figure 5 of the HBP paper on digits: SGD, Adam, K-FAC and Newton-CG on a sigmoid CNN.

A small sigmoid CNN in the spirit of table S.2b for 1x8x8 inputs (``Conv2d(1, 16, 3, p=1),
Sigmoid, Conv2d(16, 16, 3, p=1), Sigmoid, MaxPool2d(2), Flatten, Linear(256, 64), Sigmoid,
Linear(64, 10)``, PyTorch's default initialisation as section E), trained on the 1347
training images of digits by

* SGD (momentum 0.9) and Adam, batch 100, learning rate from a small grid;
* the Kronecker optimizer ``KroneckerPreconditioner(curvature="kfac")``, batch 500,
  learning rate from a small grid (damping 1e-3, inverses every step);
* ``NewtonCG`` with the exact block products of the GGN, PCH-abs, PCH-clip and the
  Hessian, batch 500, ``cg_maxiter=200, cg_tol=0.1`` (section E), over section E's grid
  ``lr in {0.05, 0.1, 0.2}`` x ``damping in {1e-4, 1e-3, 1e-2}``.

Like section E, every grid point is trained once (seed 0, ``--grid-epochs`` epochs); the
setting with the smallest final training loss (non-finite losses count as diverged) is
then trained for ``--epochs`` epochs over ``--seeds`` seeds. Writes
``cnn_optimizers.png`` / ``.csv`` (final runs) and ``cnn_optimizers_grid.csv`` (the grid)
to ``--out`` and prints a table::

    python examples/reproduce_cnn_optimizers.py            # about 3 minutes
    python examples/reproduce_cnn_optimizers.py --quick    # smoke run, seconds
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _reproduction import (  # noqa: E402
    Run,
    argument_parser,
    load_data,
    save_runs,
    train,
    write_rows,
)

from hbpkit.optim import KroneckerPreconditioner, NewtonCG  # noqa: E402

CG_MAXITER, CG_TOL = 200, 0.1
NEWTON_LRS = (0.05, 0.1, 0.2)
NEWTON_DAMPINGS = (1e-4, 1e-3, 1e-2)


def make_model(num_classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.Sigmoid(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 64),
        nn.Sigmoid(),
        nn.Linear(64, num_classes),
    )


Grid = list[tuple[str, Callable]]


def grids() -> dict[str, tuple[int, Grid]]:
    """``method -> (batch size, [(hyperparameters, params -> optimizer), ...])``."""
    out: dict[str, tuple[int, Grid]] = {
        "SGD": (
            100,
            [
                (f"lr={lr:g}, momentum=0.9", lambda ps, lr=lr: torch.optim.SGD(ps, lr, 0.9))
                for lr in (0.01, 0.1, 1.0)
            ],
        ),
        "Adam": (
            100,
            [
                (f"lr={lr:g}", lambda ps, lr=lr: torch.optim.Adam(ps, lr))
                for lr in (1e-3, 1e-2, 1e-1)
            ],
        ),
        "KFAC": (
            500,
            [
                (
                    f"lr={lr:g}, damping=1e-3",
                    lambda ps, lr=lr: KroneckerPreconditioner(
                        ps, curvature="kfac", lr=lr, damping=1e-3
                    ),
                )
                for lr in (0.01, 0.1, 1.0)
            ],
        ),
    }
    for name, curvature in (
        ("Newton-CG GGN", "ggn"),
        ("Newton-CG PCH-abs", "pch-abs"),
        ("Newton-CG PCH-clip", "pch-clip"),
        ("Newton-CG Hessian", "hessian"),
    ):
        grid = []
        for lr in NEWTON_LRS:
            for damping in NEWTON_DAMPINGS:

                def make(ps, curvature=curvature, lr=lr, damping=damping):
                    return NewtonCG(
                        ps,
                        curvature=curvature,
                        lr=lr,
                        damping=damping,
                        cg_maxiter=CG_MAXITER,
                        cg_tol=CG_TOL,
                    )

                grid.append((f"lr={lr:g}, damping={damping:g}", make))
        out[name] = (500, grid)
    return out


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argument_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=None, help="final runs; default 30")
    parser.add_argument("--grid-epochs", type=int, default=None, help="grid runs; default 10")
    args = parser.parse_args(argv)
    epochs = args.epochs or (1 if args.quick else 30)
    grid_epochs = args.grid_epochs or (1 if args.quick else 10)
    seeds = args.seeds or (1 if args.quick else 3)
    torch.set_num_threads(1)  # tiny ops: one thread beats two on a shared machine
    data = load_data(image=True, subset=200 if args.quick else None)
    print(
        f"digits: {len(data.X_tr)} train / {len(data.X_te)} test; grid {grid_epochs} epochs "
        f"(seed 0), final {epochs} epochs x {seeds} seed(s)"
    )

    grid_rows, runs = [], []
    for method, (batch_size, grid) in grids().items():
        if args.quick:
            batch_size, grid = 100, grid[:1]
        best = None
        for hyper, opt_fn in grid:
            run = train(method, hyper, make_model, opt_fn, data, grid_epochs, batch_size, 0)
            grid_rows.append((method, hyper, batch_size, run.train_loss[-1], run.test_acc[-1]))
            if best is None or run.final_loss < best[2].final_loss:
                best = (hyper, opt_fn, run)
        hyper, opt_fn, _ = best
        hyper_b = f"B={batch_size}, {hyper}"
        for seed in range(seeds):
            run = train(method, hyper_b, make_model, opt_fn, data, epochs, batch_size, seed)
            runs.append(run)
        final = [r.train_loss[-1] for r in runs[-seeds:]]
        print(f"  {method:<19} best of {len(grid)}: {hyper:<24} final losses {final}")

    args.out.mkdir(parents=True, exist_ok=True)
    write_rows(
        args.out / "cnn_optimizers_grid.csv",
        ["method", "hyperparameters", "batch_size", "train_loss", "test_acc"],
        ((m, h, b, f"{loss:.6g}", f"{acc:.6g}") for m, h, b, loss, acc in grid_rows),
    )
    title = "Sigmoid CNN (2 conv + 2 linear) on digits: best setting of each method's grid"
    save_runs(runs, args.out, "cnn_optimizers", title)
    print(f"\nwrote {args.out}/cnn_optimizers.csv, cnn_optimizers_grid.csv and .png")
    return runs


if __name__ == "__main__":
    main()
