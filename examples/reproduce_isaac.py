"""ISAAC's figure 1 and table 2 (Petersen et al.): the ``lambda_g x lambda_a`` grid and step times.

A 5-layer ReLU MLP (4 hidden layers of ``width`` units, Kaiming-He initialisation),
batch 60, plain SGD on ``zeta`` (eq. 17, ``ISAAC(lambda_g, lambda_a)``),
on ``zeta*`` (``lambda_g = None``, eq. 21) and on the gradient. Every cell of the grid
``lambda_g, lambda_a in {1e-6, 1e-4, ..., 1e6}`` plus the ``zeta*`` column is trained
for ``--epochs`` epochs over ``--seeds`` seeds; as in the paper each sector (``zeta``,
``zeta*``, gradient) has one learning rate, chosen from ``--lrs`` by the sector's best
final loss with seed 0 (the other seeds then use it). Then the median time per step (forward,
backward, step; one thread) of SGD, ``zeta*``, ``zeta`` and K-FAC
(``KroneckerPreconditioner``, inverses every step) at batch sizes 8, 32, 60, below the
widths 100 and 400.

Writes ``isaac_grid.png`` (heat maps of the final training loss, one per width),
``isaac_grid.csv`` (every run) and ``isaac_timing.csv`` to ``--out`` and prints tables::

    python examples/reproduce_isaac.py           # digits, width 100, a few minutes
    python examples/reproduce_isaac.py --widths 100 400   # both widths of the paper
    python examples/reproduce_isaac.py --full    # Fashion-MNIST (10,000 images), longer
    python examples/reproduce_isaac.py --quick   # smoke run, seconds
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _reproduction import (  # noqa: E402
    Run,
    argument_parser,
    load_data,
    load_fashion_data,
    seconds_per_step,
    train_or_diverge,
    write_rows,
)

from hbpkit import extend  # noqa: E402
from hbpkit.optim import ISAAC, KroneckerPreconditioner  # noqa: E402

GRID = (1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4, 1e6)


def make_model(inputs: int, width: int, layers: int = 5, classes: int = 10) -> nn.Sequential:
    """``layers`` Linear layers, ReLU between them, Kaiming-He initialisation, zero biases."""
    sizes = [inputs] + [width] * (layers - 1)
    modules: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        modules += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*modules, nn.Linear(sizes[-1], classes))
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


def sector(lambda_g: float | None, lambda_a: float | None) -> str:
    if lambda_a is None:
        return "gradient"
    return "zeta*" if lambda_g is None else "zeta"


def optimizer(lambda_g, lambda_a, lr):
    if lambda_a is None:
        return lambda params: torch.optim.SGD(params, lr=lr)
    return lambda params: ISAAC(params, lr=lr, lambda_a=lambda_a, lambda_g=lambda_g)


def cells_of(grid) -> list[tuple[float | None, float | None]]:
    """``zeta`` cells, the ``zeta*`` column (``lambda_g = None``) and the gradient."""
    return [(g, a) for g in (*grid, None) for a in grid] + [(None, None)]


def run_cells(data, width, jobs, epochs, seed) -> list[tuple[Run, dict]]:
    """Train every ``(lambda_g, lambda_a, lr)`` of ``jobs`` once with ``seed``."""
    inputs = data.X_tr.shape[1]
    out = []
    for lambda_g, lambda_a, lr in jobs:
        run = train_or_diverge(
            sector(lambda_g, lambda_a),
            f"lambda_g={lambda_g} lambda_a={lambda_a} lr={lr}",
            lambda: make_model(inputs, width),
            optimizer(lambda_g, lambda_a, lr),
            data,
            epochs,
            60,
            seed,
        )
        info = dict(width=width, lambda_g=lambda_g, lambda_a=lambda_a, lr=lr, seed=seed)
        out.append((run, info))
    return out


def best_lr(results, name: str) -> float:
    """The learning rate of sector ``name`` whose best cell has the lowest mean final loss."""
    by = {}
    for run, info in results:
        if run.method == name:
            key = (info["lr"], info["lambda_g"], info["lambda_a"])
            by.setdefault(key, []).append(run.final_loss)
    best = min(by, key=lambda k: sum(by[k]) / len(by[k]))
    return best[0]


def cell_losses(results, width, lrs_by_sector) -> dict:
    """``(lambda_g, lambda_a) -> mean final loss`` at each sector's learning rate."""
    cells: dict = {}
    for run, info in results:
        if info["width"] != width or info["lr"] != lrs_by_sector[run.method]:
            continue
        cells.setdefault((info["lambda_g"], info["lambda_a"]), []).append(run.final_loss)
    return {k: sum(v) / len(v) for k, v in cells.items()}


def grids_from_csv(path: Path) -> tuple[dict, dict]:
    """``(grids, lrs)`` as :func:`main` computes them, from an ``isaac_grid.csv``."""

    def value(text: str) -> float | None:
        return None if text in ("None", "") else float(text)

    with open(path) as f:
        rows = list(csv.DictReader(f))
    grids, lrs = {}, {}
    for width in sorted({int(r["width"]) for r in rows}):
        mine = [r for r in rows if int(r["width"]) == width]
        for r in mine:
            r["cell"] = (value(r["lambda_g"]), value(r["lambda_a"]))
            loss = float(r["final_train_loss"])
            r["loss"] = loss if math.isfinite(loss) else math.inf
        chosen = {}
        for name in ("zeta", "zeta*", "gradient"):
            first = [r for r in mine if sector(*r["cell"]) == name and r["seed"] == "0"]
            chosen[name] = float(min(first, key=lambda r: r["loss"])["lr"])
        cells: dict = {}
        for r in mine:
            if float(r["lr"]) == chosen[sector(*r["cell"])]:
                cells.setdefault(r["cell"], []).append(r["loss"])
        grids[width] = {k: sum(v) / len(v) for k, v in cells.items()}
        lrs[width] = dict(chosen, seeds=len({r["seed"] for r in mine}))
    return grids, lrs


def plot_grids(grids: dict, grid, path: Path, title: str, lrs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(grids), figsize=(max(6.6, 5.2 * len(grids)), 4.6), squeeze=False
    )
    for ax, (width, cells) in zip(axes[0], grids.items()):
        cols = (*grid, None)  # lambda_g, then the zeta* column
        M = torch.full((len(grid), len(cols)), math.nan)
        for j, lambda_g in enumerate(cols):
            for i, lambda_a in enumerate(grid):
                loss = cells.get((lambda_g, lambda_a), math.nan)
                M[i, j] = math.log10(loss) if math.isfinite(loss) and loss > 0 else math.nan
        im = ax.imshow(M.numpy(), origin="lower", cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(cols)), [f"{math.log10(g):.0f}" for g in grid] + ["inf"])
        ax.set_yticks(range(len(grid)), [f"{math.log10(a):.0f}" for a in grid])
        ax.set_xlabel("log10 lambda_g  (inf: zeta*)")
        ax.set_ylabel("log10 lambda_a")
        grad = cells.get((None, None), math.nan)
        lr = lrs[width]
        seeds = f"{lr['seeds']} seed(s); " if "seeds" in lr else ""
        ax.set_title(
            f"width {width}; {seeds}gradient: {grad:.3g}\nlr: zeta {lr['zeta']}, "
            f"zeta* {lr['zeta*']}, gradient {lr['gradient']}",
            fontsize=8,
        )
        for i in range(M.shape[0]):
            for j in range(M.shape[1]):
                diverged = math.isnan(M[i, j])
                text = "div" if diverged else f"{M[i, j]:.1f}"
                color = "k" if diverged else "w"
                ax.text(j, i, text, ha="center", va="center", fontsize=6, color=color)
        fig.colorbar(im, ax=ax, label="log10 final training loss")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timing(inputs, widths, batches, steps) -> list[dict]:
    """Median seconds per step of SGD, zeta*, zeta and K-FAC, interleaved per batch size."""
    rows = []
    for width in widths:
        for batch in batches:
            torch.manual_seed(0)
            X, y = torch.randn(batch, inputs), torch.randint(10, (batch,))
            makers = {
                "SGD": lambda p: torch.optim.SGD(p, lr=1e-3),
                "zeta*": lambda p: ISAAC(p, lr=1e-3, lambda_a=1.0),
                "zeta": lambda p: ISAAC(p, lr=1e-3, lambda_a=1.0, lambda_g=1.0),
                "K-FAC": lambda p: KroneckerPreconditioner(p, "kfac", lr=1e-3, damping=1e-2),
            }
            times: dict[str, list[float]] = {name: [] for name in makers}
            for _ in range(5):  # interleave; the fastest round's median (least disturbed)
                for name, make in makers.items():
                    model = extend(make_model(inputs, width))
                    times[name].append(
                        seconds_per_step(model, make(model.parameters()), X, y, steps)
                    )
            row = dict(width=width, batch=batch)
            row.update({name: min(t) for name, t in times.items()})
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argument_parser(__doc__, seeds=2, quick="tiny smoke run on digits", full=True)
    parser.add_argument("--epochs", type=int, default=None, help="default 6 (quick: 1)")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="default 0.1 0.3 1")
    parser.add_argument("--widths", type=int, nargs="+", default=None, help="default 100")
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw isaac_grid.png from --out's CSV"
    )
    args = parser.parse_args(argv)
    epochs = args.epochs or (1 if args.quick else 6)
    seeds = args.seeds or (1 if args.quick else 2)
    lrs = args.lrs or ((0.1,) if args.quick else (0.1, 0.3, 1.0))
    grid = (1e-2, 1.0, 1e2) if args.quick else GRID
    widths = args.widths or ((16,) if args.quick else (100,))
    if args.plot_only:
        grids, lrs_by_width = grids_from_csv(args.out / "isaac_grid.csv")
        title = (
            "ISAAC figure 1: 5-layer ReLU MLP, batch 60, SGD, mean over seeds\n"
            "one learning rate per sector; 'div': diverged"
        )
        plot_grids(grids, GRID, args.out / "isaac_grid.png", title, lrs_by_width)
        return []
    timing_widths = widths if args.quick else (100, 400)
    if args.full:
        data, name = load_fashion_data(10_000, 2_000), "Fashion-MNIST (10,000 training images)"
    else:
        data, name = load_data(subset=240 if args.quick else None), "digits"
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # stable timings on a shared machine
    results, grids, lrs_by_width = [], {}, {}
    for width in widths:
        # seed 0 over every learning rate picks each sector's rate; more seeds use it
        jobs = [(g, a, lr) for g, a in cells_of(grid) for lr in lrs]
        part = run_cells(data, width, jobs, epochs, 0)
        lrs_by_sector = {s: best_lr(part, s) for s in ("zeta", "zeta*", "gradient")}
        jobs = [(g, a, lrs_by_sector[sector(g, a)]) for g, a in cells_of(grid)]
        for seed in range(1, seeds):
            part += run_cells(data, width, jobs, epochs, seed)
        results += part
        grids[width] = cell_losses(part, width, lrs_by_sector)
        lrs_by_width[width] = lrs_by_sector
        cells = grids[width]
        best_zeta = min(v for (g, a), v in cells.items() if g is not None)
        best_star = min(v for (g, a), v in cells.items() if g is None and a is not None)
        print(
            f"width {width} on {name}, {epochs} epochs, {seeds} seed(s), lr per sector "
            f"{lrs_by_sector}: best zeta {best_zeta:.4f}, best zeta* {best_star:.4f}, "
            f"gradient {cells[(None, None)]:.4f}"
        )
    keys = ["width", "lambda_g", "lambda_a", "lr", "seed"]
    write_rows(
        args.out / "isaac_grid.csv",
        [*keys, "final_train_loss", "final_test_acc", "seconds"],
        (
            [*(info[k] for k in keys), f"{run.train_loss[-1]:.6g}", f"{run.test_acc[-1]:.6g}"]
            + [f"{run.seconds:.3f}"]
            for run, info in results
        ),
    )
    title = (
        f"ISAAC figure 1 on {name}: 5-layer ReLU MLP, batch 60, SGD\n{epochs} epochs, "
        f"mean of {seeds} seed(s), one learning rate per sector; 'div': diverged"
    )
    plot_grids(grids, grid, args.out / "isaac_grid.png", title, lrs_by_width)
    rows = timing(
        data.X_tr.shape[1],
        timing_widths,
        (8,) if args.quick else (8, 32, 60),
        3 if args.quick else 15,
    )
    with open(args.out / "isaac_timing.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(
        f"\n{'width':>5} {'batch':>5} {'SGD ms':>8} {'zeta* / SGD':>12} {'zeta / SGD':>11} "
        f"{'K-FAC / SGD':>12}"
    )
    for r in rows:
        print(
            f"{r['width']:>5} {r['batch']:>5} {1e3 * r['SGD']:>8.2f} "
            f"{r['zeta*'] / r['SGD']:>12.2f} {r['zeta'] / r['SGD']:>11.2f} "
            f"{r['K-FAC'] / r['SGD']:>12.2f}"
        )
    return [run for run, _ in results]


if __name__ == "__main__":
    main()
