"""Figure 4 of the HBP paper on digits: block splitting in Newton-CG with PCH-abs on a deep FCNN.

A deep, narrow sigmoid FCNN in the spirit of table S.2a, scaled to 8x8 digits
(``64-64-32-32-16-16-10``, a sigmoid after every hidden layer, Xavier weights, zero
biases; supplement section E), trained with batches of 500 of the 1347 training images by

* SGD with momentum (``lr=0.1, momentum=0.9``, section E);
* Newton-CG on the positive-curvature Hessian PCH-abs as in the paper's FCNN experiment:
  ``NewtonCG(curvature="hbp", extension=HBP("pch-abs", "average", "batch-average"))``,
  i.e. Kronecker-factored blocks from the batch-averaged backpropagation (approximation
  (9)), ``lr=0.1, cg_maxiter=50, cg_tol=0.1`` (section E) and ``damping=1e-4``, with every
  parameter block split into ``1``, ``4`` or ``16`` sub-blocks (``block_split``);
* the same with ``block_split=1`` and section E's ``damping=0.02``: on digits the
  curvature blocks are far smaller than on CIFAR-10, that damping swamps them, CG stops
  after one or two iterations, and the step is plain gradient descent with rate
  ``lr / damping = 5``, which stays on the plateau. ``damping=1e-4`` lets the curvature act.

Writes ``fcnn_block_splitting.png`` / ``.csv`` to ``--out`` and prints a table::

    python examples/reproduce_fcnn_block_splitting.py            # about a minute
    python examples/reproduce_fcnn_block_splitting.py --quick    # smoke run, seconds
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _reproduction import Run, argument_parser, load_data, save_runs, train  # noqa: E402

from hbpkit.extensions import HBP  # noqa: E402
from hbpkit.optim import NewtonCG  # noqa: E402

WIDTHS = (64, 64, 32, 32, 16, 16)
SPLITS = (1, 4, 16)
LR, DAMPING, CG_MAXITER, CG_TOL = 0.1, 1e-4, 50, 0.1
PAPER_DAMPING = 0.02  # section E; on digits it leaves the net on the plateau (shown too)
SGD_LR, SGD_MOMENTUM = 0.1, 0.9


def make_model(num_classes: int = 10) -> nn.Sequential:
    """``64-64-32-32-16-16-10`` with sigmoids, Xavier-uniform weights, zero biases."""
    layers: list[nn.Module] = []
    for w_in, w_out in zip(WIDTHS[:-1], WIDTHS[1:]):
        layers += [nn.Linear(w_in, w_out), nn.Sigmoid()]
    layers.append(nn.Linear(WIDTHS[-1], num_classes))
    model = nn.Sequential(*layers)
    for module in model:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def methods() -> list[tuple[str, str, object]]:
    """``(name, hyperparameters, params -> optimizer)`` for every curve."""
    out = [
        (
            "SGD",
            f"lr={SGD_LR}, momentum={SGD_MOMENTUM}",
            lambda ps: torch.optim.SGD(ps, lr=SGD_LR, momentum=SGD_MOMENTUM),
        )
    ]
    for split, damping in [(s, DAMPING) for s in SPLITS] + [(1, PAPER_DAMPING)]:

        def make(ps, split=split, damping=damping):
            return NewtonCG(
                ps,
                curvature="hbp",
                extension=HBP("pch-abs", "average", "batch-average"),
                lr=LR,
                damping=damping,
                cg_maxiter=CG_MAXITER,
                cg_tol=CG_TOL,
                block_split=split,
            )

        name = f"PCH-abs, split={split}" + (", sec. E" if damping == PAPER_DAMPING else "")
        out.append((name, f"lr={LR}, damping={damping:g}", make))
    return out


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argument_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=None, help="default 100 (quick: 2)")
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args(argv)
    epochs = args.epochs or (2 if args.quick else 100)
    seeds = args.seeds or (1 if args.quick else 3)
    torch.set_num_threads(1)  # tiny ops: one thread beats two on a shared machine
    data = load_data(image=False, subset=300 if args.quick else None)
    batch_size = 100 if args.quick else args.batch_size
    print(
        f"digits: {len(data.X_tr)} train / {len(data.X_te)} test, batch {batch_size}, "
        f"{epochs} epochs, {seeds} seed(s)"
    )

    runs = []
    for name, hyper, opt_fn in methods():
        for seed in range(seeds):
            run = train(name, hyper, make_model, opt_fn, data, epochs, batch_size, seed)
            runs.append(run)
            print(f"  {name:<18} seed {seed}: loss {run.train_loss[-1]:.4f}, {run.seconds:.1f} s")

    save_runs(
        runs,
        args.out,
        "fcnn_block_splitting",
        f"Sigmoid FCNN {'-'.join(map(str, WIDTHS))}-10 on digits, batch {batch_size}: "
        "Newton-CG (PCH-abs, batch-averaged HBP) with block splitting vs SGD",
    )
    print(f"\nwrote {args.out / 'fcnn_block_splitting.csv'} and .png")
    return runs


if __name__ == "__main__":
    main()
