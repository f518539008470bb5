"""The FOOF paper's comparison (Benzing 2022, figures 1A, 3A, 4): K-FAC, its dampings, FOOF.

An MLP with 3 hidden ReLU layers of ``width`` units and no biases (appendix D.4), batch
100, trained by

* SGD (momentum 0 or 0.9) and Adam;
* K-FAC (``KroneckerPreconditioner(curvature="kfac")``, moving averages 0.95, inverses
  every step) with heuristic damping (eq. 4) and with correct damping (eq. 3);
* the exact subsampled natural gradient (``SubsampledNaturalGradient``, Monte-Carlo
  Fisher of the mini-batch, ``b x b`` Woodbury solve over all layers);
* FOOF (eq. 6, moving average 0.95) with ``T = 1`` and ``T = 100``; ``T = 100`` reuses
  the hyperparameters of ``T = 1`` (appendix D.2).

Every setting of a method's small grid is trained once (seed 0, ``--epochs`` epochs);
the best final training loss wins and is trained with the other ``--seeds`` seeds.
K-FAC, the natural gradient and FOOF use heavy-ball momentum 0.9; SGD's momentum is
part of its grid. Then the time per step of each tuned method (forward, backward, step;
one thread, 5 interleaved rounds, the fastest round's median) on one batch. Writes
``foof_optimizers.png`` / ``.csv`` (final runs), ``foof_grid.csv`` and ``foof_timing.csv``
to ``--out``; prints tables::

    python examples/reproduce_foof.py           # digits, width 100, a few minutes
    python examples/reproduce_foof.py --full    # Fashion-MNIST (10,000 images), width 256
    python examples/reproduce_foof.py --quick   # smoke run, seconds
"""

from __future__ import annotations

import itertools
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
    load_fashion_data,
    save_runs,
    seconds_per_step,
    table,
    train_or_diverge,
    write_rows,
)

from hbpkit import extend  # noqa: E402
from hbpkit.optim import FOOF, KroneckerPreconditioner, SubsampledNaturalGradient  # noqa: E402

MOMENTUM = 0.9  # heavy ball for K-FAC, the natural gradient and FOOF


def make_model(inputs: int, width: int, classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inputs, width, bias=False),
        nn.ReLU(),
        nn.Linear(width, width, bias=False),
        nn.ReLU(),
        nn.Linear(width, width, bias=False),
        nn.ReLU(),
        nn.Linear(width, classes, bias=False),
    )


def kfac(mode: str, lr: float, damping: float):
    return lambda p: KroneckerPreconditioner(
        p, "kfac", lr=lr, damping=damping, ema=0.95, damping_mode=mode, momentum=MOMENTUM
    )


def methods(quick: bool) -> dict[str, list[tuple[str, Callable]]]:
    """``method -> [(hyperparameters, optimizer factory)]``, the grids."""
    lrs = (0.01,) if quick else (0.003, 0.01, 0.03, 0.1, 0.3)
    dampings = (1e-2,) if quick else (1e-3, 1e-2, 1e-1)
    grid = {
        "SGD": [
            (f"lr={lr} momentum={m}", lambda p, lr=lr, m=m: torch.optim.SGD(p, lr=lr, momentum=m))
            for lr, m in itertools.product((0.1,) if quick else (0.03, 0.1, 0.3), (0.0, 0.9))
        ],
        "Adam": [
            (f"lr={lr}", lambda p, lr=lr: torch.optim.Adam(p, lr=lr))
            for lr in ((3e-3,) if quick else (1e-3, 3e-3, 1e-2))
        ],
        "natural gradient": [
            (
                f"lr={lr} damping={d}",
                lambda p, lr=lr, d=d: SubsampledNaturalGradient(
                    p, lr=lr, damping=d, momentum=MOMENTUM
                ),
            )
            for lr, d in itertools.product(lrs, (0.1,) if quick else (1e-2, 1e-1, 1.0))
        ],
        "FOOF T=1": [
            (
                f"lr={lr} damping={d}",
                lambda p, lr=lr, d=d: FOOF(p, lr=lr, damping=d, momentum=MOMENTUM),
            )
            for lr, d in itertools.product(lrs, (10.0,) if quick else (1.0, 10.0, 100.0))
        ],
    }
    for mode in ("heuristic", "correct"):
        grid[f"K-FAC {mode}"] = [
            (f"lr={lr} damping={d}", kfac(mode, lr, d))
            for lr, d in itertools.product(lrs, dampings)
        ]
    return grid


def foof_t100(hyper: str) -> Callable:
    values = dict(item.split("=") for item in hyper.split())
    lr, damping = float(values["lr"]), float(values["damping"])
    return lambda p: FOOF(p, lr=lr, damping=damping, update_every=100, momentum=MOMENTUM)


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argument_parser(__doc__, quick="tiny smoke run on digits", full=True)
    parser.add_argument("--epochs", type=int, default=None, help="default 20 (quick: 1)")
    args = parser.parse_args(argv)
    epochs = args.epochs or (1 if args.quick else 20 if not args.full else 5)
    seeds = args.seeds or (1 if args.quick else 3)
    torch.set_num_threads(1)  # stable timings on a shared machine
    if args.full:
        data, name, width = load_fashion_data(10_000, 2_000), "Fashion-MNIST (10,000)", 256
    else:
        data, name, width = load_data(subset=200 if args.quick else None), "digits", 100
    inputs = data.X_tr.shape[1]
    model_fn = lambda: make_model(inputs, width)  # noqa: E731
    args.out.mkdir(parents=True, exist_ok=True)
    grid_runs, best, winners = [], {}, []
    for method, settings in methods(args.quick).items():
        tried = [
            train_or_diverge(method, hyper, model_fn, make, data, epochs, 100, 0)
            for hyper, make in settings
        ]
        grid_runs += tried
        winner = min(tried, key=lambda r: r.final_loss)
        best[method] = (winner.hyper, dict(settings)[winner.hyper])
        winners.append(winner)
    best["FOOF T=100"] = (best["FOOF T=1"][0], foof_t100(best["FOOF T=1"][0]))
    write_rows(
        args.out / "foof_grid.csv",
        ["method", "hyperparameters", "epochs", "final_train_loss"],
        ([r.method, r.hyper, epochs, f"{r.train_loss[-1]:.6g}"] for r in grid_runs),
    )
    runs = []
    for method, (hyper, make) in best.items():
        first = [w for w in winners if w.method == method]
        more = range(1, seeds) if first else range(seeds)
        runs += first + [
            train_or_diverge(method, hyper, model_fn, make, data, epochs, 100, s) for s in more
        ]
    title = f"FOOF paper on {name}: MLP 3x{width} ReLU, no biases, batch 100"
    save_runs(runs, args.out, "foof_optimizers", title, show=False)
    print(f"{name}, width {width}, {epochs} epochs, {seeds} seed(s), grid on seed 0")
    print(table(runs))
    # time per step of the tuned methods on one batch of 100: 5 interleaved rounds, the
    # fastest round's median (the least disturbed by other processes)
    torch.manual_seed(0)
    X, y = data.X_tr[:100], data.y_tr[:100]
    times: dict[str, list[float]] = {m: [] for m in best}
    for _ in range(5):
        for method, (_, make) in best.items():
            model = extend(model_fn())
            times[method].append(seconds_per_step(model, make(model.parameters()), X, y, 10))
    per_step = {m: min(t) for m, t in times.items()}
    write_rows(
        args.out / "foof_timing.csv",
        ["method", "width", "batch", "seconds_per_step", "ratio_to_sgd"],
        ([m, width, 100, f"{s:.6g}", f"{s / per_step['SGD']:.3f}"] for m, s in per_step.items()),
    )
    print(f"\n{'method':<20} {'ms/step':>8} {'/ SGD':>6}")
    for m, s in per_step.items():
        print(f"{m:<20} {1e3 * s:>8.2f} {s / per_step['SGD']:>6.2f}")
    return runs


if __name__ == "__main__":
    main()
