"""GroupedNewton (Wolinski, section 5.2 MLP) on a tanh MLP vs SGD and Adam, and its invariance.

The paper's MLP setup, scaled down: a tanh MLP ``D-200-100-10`` (PyTorch's default
initialisation), cross-entropy, gradient batches of ``B_g = 100``, trained by

* **GroupedNewton** with the paper's fixed hyperparameters, not tuned here: step size
  ``lambda_1 = 0.1`` and internal damping ``lambda_int = 10`` (table 3, MLP), ``mu_g = 0.9``,
  ``mu_eta = 0.5``, ``tau = 10``, Newton batches of ``B = 1000`` drawn independently of the
  gradient batches, and ``ReduceLROnPlateau(patience=5, factor=0.5)`` on the epoch's mean
  training loss (table 2); canonical partition (``S = 6``);
* **GroupedNewton, rescaled**: the same on a layer-wise rescaled parameterisation of the same
  network, every tensor stored as ``T~ = T / a`` and used as ``a * T~`` with
  ``a = 1 / sqrt(fan_in)`` for weights (the NTK parameterisation) and ``a = 0.1`` for biases.
  The paper's invariance claim (appendix E) says it gives the same losses;
* **SGD** and **Adam**, each with the best learning rate of a small grid (by final training
  loss), and SGD with that rate on the rescaled network (not invariant: for contrast).

Writes ``grouped_newton_<data>.png`` / ``.csv`` to ``--out`` and prints a table with the
measured time per step relative to SGD::

    python examples/reproduce_grouped_newton.py                  # Fashion-MNIST, ~45 min
    python examples/reproduce_grouped_newton.py --data digits    # CI-sized, 4-8 min
    python examples/reproduce_grouped_newton.py --quick          # smoke run, seconds

Fashion-MNIST is read from Debian's ``dataset-fashion-mnist`` package (``sudo apt install
dataset-fashion-mnist``); nothing is downloaded. Its documented size (``--train-subset``
10,000 images, 5 epochs) keeps it under an hour on 2 heavily shared cores (a GroupedNewton
run took 6 minutes there: one learning-rate update, 6 double and 6 triple backward passes
on 1000 images, takes about 2.4 s); ``--seeds 1`` divides that by three.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fashion_mnist import FashionMNISTMissingError, load_fashion_mnist  # noqa: E402
from _reproduction import (  # noqa: E402
    Data,
    Run,
    argument_parser,
    evaluate,
    load_data,
    save_runs,
)

from hbpkit.optim import GroupedNewton  # noqa: E402

HIDDEN = (200, 100)
GN_HYPER = dict(
    lr=0.1, damping_int=10.0, momentum=0.9, lr_momentum=0.5, update_every=10
)  # tables 2 and 3
NEWTON_BATCH, GRAD_BATCH = 1000, 100
SGD_LRS = (0.03, 0.1, 0.3, 1.0)
ADAM_LRS = (3e-4, 1e-3, 3e-3, 1e-2)
BIAS_SCALE = 0.1


class RescaledMLP(nn.Module):
    """The same function as ``base`` with every tensor stored as ``T / a`` and used as ``a T~``."""

    def __init__(self, base: nn.Sequential) -> None:
        super().__init__()
        self.linears = [m for m in base if isinstance(m, nn.Linear)]
        self.scales: list[float] = []
        raw = []
        for lin in self.linears:
            for name, a in (("weight", lin.in_features**-0.5), ("bias", BIAS_SCALE)):
                raw.append(nn.Parameter(getattr(lin, name).detach() / a))
                self.scales.append(a)
        self.raw = nn.ParameterList(raw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(len(self.linears)):
            W = self.scales[2 * i] * self.raw[2 * i]
            b = self.scales[2 * i + 1] * self.raw[2 * i + 1]
            x = nn.functional.linear(x, W, b)
            if i < len(self.linears) - 1:
                x = torch.tanh(x)
        return x


def make_model(in_dim: int, seed: int, rescaled: bool, dtype: torch.dtype) -> nn.Module:
    """``in_dim-200-100-10`` tanh MLP, PyTorch's default initialisation drawn from ``seed``."""
    torch.manual_seed(seed)
    sizes = (in_dim, *HIDDEN, 10)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    model = nn.Sequential(*layers).to(dtype)
    return RescaledMLP(model) if rescaled else model


def train(
    method: str,
    hyper: str,
    opt_fn: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    data: Data,
    epochs: int,
    seed: int,
    rescaled: bool,
) -> tuple[Run, int, list[float] | None]:
    """Train; returns the run, the number of steps and GroupedNewton's final learning rates.

    Every method sees the same gradient batches for a given seed.
    """
    model = make_model(data.X_tr.shape[1], seed, rescaled, data.X_tr.dtype)
    opt = opt_fn(list(model.parameters()))
    scheduler = None
    if isinstance(opt, GroupedNewton):
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=5)
    loss_fn = nn.CrossEntropyLoss()
    run = Run(method, hyper, seed)
    loss, acc = evaluate(model, data)
    run.train_loss.append(loss)
    run.test_acc.append(acc)
    batches = torch.Generator().manual_seed(seed)
    newton = torch.Generator().manual_seed(10_000 + seed)  # D_newt, independent of D_g
    n, steps = len(data.X_tr), 0
    start = time.perf_counter()
    for _ in range(epochs):
        if not math.isfinite(run.train_loss[-1]):
            run.train_loss.append(math.nan)
            run.test_acc.append(math.nan)
            continue
        epoch_losses = []
        for idx in torch.randperm(n, generator=batches).split(GRAD_BATCH):
            opt.zero_grad()
            batch_loss = loss_fn(model(data.X_tr[idx]), data.y_tr[idx])
            if not torch.isfinite(batch_loss):
                break
            batch_loss.backward()
            epoch_losses.append(batch_loss.item())
            if isinstance(opt, GroupedNewton):
                nidx = torch.randint(n, (min(NEWTON_BATCH, n),), generator=newton)

                def closure(nidx=nidx):
                    return loss_fn(model(data.X_tr[nidx]), data.y_tr[nidx])

                opt.step(closure)
            else:
                opt.step()
            steps += 1
        if scheduler is not None and epoch_losses:
            scheduler.step(sum(epoch_losses) / len(epoch_losses))
        loss, acc = evaluate(model, data)
        run.train_loss.append(loss if math.isfinite(loss) else math.nan)
        run.test_acc.append(acc if math.isfinite(loss) else math.nan)
    run.seconds = time.perf_counter() - start
    rates = getattr(opt, "learning_rates", None)
    return run, steps, None if rates is None else rates.tolist()


def load(name: str, quick: bool, train_subset: int | None, dtype: torch.dtype) -> Data:
    if name == "digits":
        data = load_data(image=False, subset=300 if quick else train_subset)
    else:
        X_tr, y_tr = load_fashion_mnist("train")
        X_te, y_te = load_fashion_mnist("test")
        if train_subset is not None:
            X_tr, y_tr = X_tr[:train_subset], y_tr[:train_subset]
        data = Data(X_tr, y_tr, X_te, y_te)
    return Data(data.X_tr.to(dtype), data.y_tr, data.X_te.to(dtype), data.y_te)


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argument_parser(__doc__, quick="tiny smoke run on digits")
    parser.add_argument("--data", choices=("fashion-mnist", "digits"), default="fashion-mnist")
    parser.add_argument(
        "--epochs", type=int, default=None, help="Fashion-MNIST 5, digits 40, quick 2"
    )
    parser.add_argument("--train-subset", type=int, default=None, help="Fashion-MNIST: 10000")
    args = parser.parse_args(argv)
    data_name = "digits" if args.quick else args.data
    epochs = args.epochs or (2 if args.quick else 40 if data_name == "digits" else 5)
    seeds = args.seeds or (1 if args.quick else 3)
    subset = args.train_subset
    if subset is None and data_name == "fashion-mnist":
        subset = 10_000
    torch.set_num_threads(1 if data_name == "digits" else 2)
    # float64 on digits: the invariance comparison is then limited by the method, not rounding
    dtype = torch.float64 if data_name == "digits" else torch.float32
    try:
        data = load(data_name, args.quick, subset, dtype)
    except FashionMNISTMissingError as error:
        raise SystemExit(f"{error}\n(or: python {Path(__file__).name} --data digits)") from None
    print(
        f"{data_name}: {len(data.X_tr)} train / {len(data.X_te)} test, gradient batch "
        f"{GRAD_BATCH}, Newton batch {NEWTON_BATCH}, {epochs} epochs, {seeds} seed(s), {dtype}"
    )

    gn_hyper = f"lambda_1={GN_HYPER['lr']:g}, lambda_int={GN_HYPER['damping_int']:g}"
    runs: list[Run] = []
    per_step: dict[str, float] = {}

    def run_all(name, hyper, opt_fn, rescaled=False):
        out = []
        total_s = total_steps = 0
        for seed in range(seeds):
            run, steps, rates = train(name, hyper, opt_fn, data, epochs, seed, rescaled)
            out.append(run)
            total_s, total_steps = total_s + run.seconds, total_steps + steps
            line = f"  {name:<26} seed {seed}: loss {run.train_loss[-1]:.4f}, {run.seconds:.1f} s"
            if rates is not None:  # per subset: W1 b1 W2 b2 W3 b3
                line += ", final rates eta~ " + " ".join(f"{r:.3g}" for r in rates)
            print(line)
        per_step[name] = total_s / max(total_steps, 1)
        return out

    def best(candidates):  # the grid point with the lowest mean final training loss
        return min(candidates, key=lambda rs: sum(r.final_loss for r in rs) / len(rs))

    runs += run_all("GroupedNewton", gn_hyper, lambda ps: GroupedNewton(ps, **GN_HYPER))
    runs += run_all(
        "GroupedNewton, rescaled",
        gn_hyper,
        lambda ps: GroupedNewton(ps, **GN_HYPER),
        rescaled=True,
    )
    sgd_lrs = SGD_LRS[1:2] if args.quick else SGD_LRS
    sgd_grid = [
        run_all(f"SGD lr={lr:g}", f"lr={lr:g}", lambda ps, lr=lr: torch.optim.SGD(ps, lr=lr))
        for lr in sgd_lrs
    ]
    sgd_best = best(sgd_grid)
    sgd_lr = float(sgd_best[0].hyper.split("=")[1])
    adam_lrs = ADAM_LRS[2:3] if args.quick else ADAM_LRS
    adam_grid = [
        run_all(f"Adam lr={lr:g}", f"lr={lr:g}", lambda ps, lr=lr: torch.optim.Adam(ps, lr=lr))
        for lr in adam_lrs
    ]
    adam_best = best(adam_grid)
    for r in sgd_best:
        r.method = "SGD (best of grid)"
    for r in adam_best:
        r.method = "Adam (best of grid)"
    sgd_time = per_step.pop(f"SGD lr={sgd_lr:g}")
    per_step["SGD (best of grid)"] = sgd_time
    per_step["Adam (best of grid)"] = per_step.pop(f"Adam lr={adam_best[0].hyper.split('=')[1]}")
    runs += sgd_best + adam_best
    runs += run_all(
        "SGD, rescaled",
        f"lr={sgd_lr:g}",
        lambda ps: torch.optim.SGD(ps, lr=sgd_lr),
        rescaled=True,
    )

    stem = f"grouped_newton_{data_name.replace('-', '_')}"
    save_runs(
        runs,
        args.out,
        stem,
        f"tanh MLP {'-'.join(map(str, (data.X_tr.shape[1], *HIDDEN, 10)))} on {data_name}: "
        "GroupedNewton (paper's hyperparameters) vs SGD and Adam (best of a grid)",
    )
    print("\nseconds per step (gradient step + amortised learning-rate update) / SGD's:")
    for name, seconds in per_step.items():
        if not name.startswith(("SGD lr", "Adam lr")):
            print(f"  {name:<26} {1e3 * seconds:8.2f} ms  x{seconds / sgd_time:5.1f}")
    by_method = {
        m: [r for r in runs if r.method == m] for m in dict.fromkeys(r.method for r in runs)
    }
    for base, other in (
        ("GroupedNewton", "GroupedNewton, rescaled"),
        ("SGD (best of grid)", "SGD, rescaled"),
    ):
        diffs = [
            max(abs(a - b) / abs(a) for a, b in zip(ra.train_loss, rb.train_loss))
            for ra, rb in zip(by_method[base], by_method[other])
        ]
        print(f"max relative loss difference, {other} vs {base}: {max(diffs):.2e}")
    print(f"\nwrote {args.out / stem}.csv and .png")
    return runs


if __name__ == "__main__":
    main()
