"""Shared pieces of the reproduction scripts: command line, data, training loop, CSV, plot,
table.

Not an example on its own; the ``reproduce_*.py`` scripts import it.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from hbpkit import backprop, extend

#: where the scripts write their CSV files and figures (``--out``)
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "results"


def argument_parser(
    doc: str, *, seeds: int = 3, quick: str = "tiny smoke run", full: bool = False
) -> argparse.ArgumentParser:
    """The options every script takes: ``--out``, ``--quick``, ``--seeds`` (default ``seeds``,
    1 with ``--quick``) and, with ``full``, ``--full`` (Fashion-MNIST, 10,000 images)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--quick", action="store_true", help=quick)
    if full:
        parser.add_argument("--full", action="store_true", help="Fashion-MNIST (10,000 images)")
    parser.add_argument("--seeds", type=int, default=None, help=f"default {seeds} (quick: 1)")
    return parser


def backward(loss: torch.Tensor, extensions: tuple) -> None:
    """``loss.backward()``, inside ``backprop(*extensions)`` where there are any."""
    if extensions:
        with backprop(*extensions):
            loss.backward()
    else:
        loss.backward()


@dataclass
class Data:
    X_tr: torch.Tensor
    y_tr: torch.Tensor
    X_te: torch.Tensor
    y_te: torch.Tensor


def load_data(image: bool = False, subset: int | None = None) -> Data:
    """Digits, pixels scaled to [0, 1], a fixed stratified 75/25 split (1347 / 450 images).

    ``image=True`` gives ``[N, 1, 8, 8]`` inputs, else ``[N, 64]``. ``subset`` keeps the
    first ``subset`` images of each split (for smoke runs).
    """
    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    if image:
        X_tr, X_te = X_tr.reshape(-1, 1, 8, 8), X_te.reshape(-1, 1, 8, 8)
    if subset is not None:
        X_tr, y_tr, X_te, y_te = X_tr[:subset], y_tr[:subset], X_te[:subset], y_te[:subset]
    return Data(X_tr, y_tr, X_te, y_te)


@dataclass
class Run:
    """One training run: per-epoch curves (entry 0 is before training)."""

    method: str
    hyper: str
    seed: int
    train_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        loss = self.train_loss[-1]
        return loss if math.isfinite(loss) else math.inf


@torch.no_grad()
def evaluate(model: nn.Module, data: Data) -> tuple[float, float]:
    """Training loss (full training set) and test accuracy."""
    loss = nn.functional.cross_entropy(model(data.X_tr), data.y_tr).item()
    acc = (model(data.X_te).argmax(1) == data.y_te).float().mean().item()
    return loss, acc


def train(
    method: str,
    hyper: str,
    model_fn: Callable[[], nn.Module],
    opt_fn: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    data: Data,
    epochs: int,
    batch_size: int,
    seed: int,
) -> Run:
    """Train with mini-batches of ``batch_size`` (reshuffled each epoch, last one smaller).

    If the optimizer has ``.extensions`` (the hbpkit optimizers), every backward pass runs
    inside ``backprop(*opt.extensions)``. A run whose loss becomes non-finite stops; its
    remaining epochs are recorded as NaN.
    """
    torch.manual_seed(seed)
    model = extend(model_fn())
    opt = opt_fn(list(model.parameters()))
    extensions = tuple(getattr(opt, "extensions", ()))
    loss_fn = extend(nn.CrossEntropyLoss())
    run = Run(method, hyper, seed)
    loss, acc = evaluate(model, data)
    run.train_loss.append(loss)
    run.test_acc.append(acc)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    n = len(data.X_tr)
    for _ in range(epochs):
        if math.isfinite(run.train_loss[-1]):
            for idx in torch.randperm(n, generator=generator).split(batch_size):
                opt.zero_grad()
                batch_loss = loss_fn(model(data.X_tr[idx]), data.y_tr[idx])
                if not torch.isfinite(batch_loss):
                    break
                backward(batch_loss, extensions)
                opt.step()
            loss, acc = evaluate(model, data)
        else:
            loss, acc = math.nan, math.nan
        run.train_loss.append(loss if math.isfinite(loss) else math.nan)
        run.test_acc.append(acc if math.isfinite(loss) else math.nan)
    run.seconds = time.perf_counter() - start
    return run


def write_csv(runs: list[Run], path: Path) -> None:
    """One row per (method, seed, epoch)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "hyperparameters", "seed", "epoch", "train_loss", "test_acc"])
        for run in runs:
            for epoch, (loss, acc) in enumerate(zip(run.train_loss, run.test_acc)):
                row = [run.method, run.hyper, run.seed, epoch, f"{loss:.6g}", f"{acc:.6g}"]
                writer.writerow(row)


def write_rows(path: Path, header: list[str], rows) -> None:
    """A CSV file: ``header``, then ``rows``."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def save_runs(runs: list[Run], out: Path, stem: str, title: str, show: bool = True) -> None:
    """``out/<stem>.csv`` (:func:`write_csv`) and ``out/<stem>.png`` (:func:`plot`); then,
    with ``show``, a blank line and the :func:`table` of the runs."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(runs, out / f"{stem}.csv")
    plot(runs, out / f"{stem}.png", title)
    if show:
        print()
        print(table(runs))


def group(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by method, in order of first appearance."""
    out: dict[str, list[Run]] = {}
    for run in runs:
        out.setdefault(run.method, []).append(run)
    return out


def plot(runs: list[Run], path: Path, title: str) -> None:
    """Training loss (log scale) and test accuracy vs epoch: mean over seeds, min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (method, group_runs) in enumerate(group(runs).items()):
        color = f"C{i}"
        label = f"{method} ({group_runs[0].hyper})" if group_runs[0].hyper else method
        for ax, key in ((ax_loss, "train_loss"), (ax_acc, "test_acc")):
            curves = torch.tensor([getattr(r, key) for r in group_runs], dtype=torch.float64)
            epochs = torch.arange(curves.shape[1])
            mean = curves.mean(0)
            ax.plot(epochs, mean, color=color, label=label, lw=1.6)
            if len(group_runs) > 1:
                ax.fill_between(epochs, curves.amin(0), curves.amax(0), color=color, alpha=0.2)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (full training set)")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_ylim(0, 1)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    n_seeds = max(len(g) for g in group(runs).values())
    ax_acc.legend(fontsize=7.5, loc="lower right")
    fig.suptitle(f"{title}\nmean over {n_seeds} seed(s), band: min-max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(runs: list[Run]) -> str:
    """Method, hyperparameters, final training loss and test accuracy (mean +- std), time."""
    lines = [
        f"{'method':<22} {'hyperparameters':<30} {'train loss':>17} {'test acc %':>13} "
        f"{'s/run':>6}",
    ]
    lines.append("-" * len(lines[0]))
    for method, group_runs in group(runs).items():
        loss = torch.tensor([r.train_loss[-1] for r in group_runs], dtype=torch.float64)
        acc = 100 * torch.tensor([r.test_acc[-1] for r in group_runs], dtype=torch.float64)
        secs = sum(r.seconds for r in group_runs) / len(group_runs)
        std_l = loss.std().item() if len(loss) > 1 else 0.0
        std_a = acc.std().item() if len(acc) > 1 else 0.0
        lines.append(
            f"{method:<22} {group_runs[0].hyper:<30} {loss.mean().item():>8.4f} +- {std_l:<6.4f}"
            f" {acc.mean().item():>6.1f} +- {std_a:<4.1f} {secs:>6.1f}"
        )
    return "\n".join(lines)


def load_fashion_data(train_subset: int | None = None, test_subset: int | None = None) -> Data:
    """Fashion-MNIST ``[N, 784]`` in [0, 1] from Debian's package (first images of each split).

    Exits with the message of :class:`FashionMNISTMissingError` (how to install the
    package) if it is not installed: nothing is downloaded.
    """
    from _fashion_mnist import FashionMNISTMissingError, load_fashion_mnist

    try:
        X_tr, y_tr = load_fashion_mnist("train")
        X_te, y_te = load_fashion_mnist("test")
    except FashionMNISTMissingError as error:
        raise SystemExit(str(error)) from None
    return Data(X_tr[:train_subset], y_tr[:train_subset], X_te[:test_subset], y_te[:test_subset])


def seconds_per_step(
    model: nn.Module, opt: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor, steps: int
) -> float:
    """Median wall-clock seconds of ``steps`` training steps (forward, backward, step) on
    one batch, after two warm-up steps; the backward pass runs inside
    ``backprop(*opt.extensions)`` when the optimizer has them. The learning rate of every
    parameter group is set to 0 (the same work, without diverging on the repeated batch)."""
    for group in opt.param_groups:
        group["lr"] = 0.0
    extensions = tuple(getattr(opt, "extensions", ()))
    loss_fn = extend(nn.CrossEntropyLoss())
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        backward(loss, extensions)
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def train_or_diverge(method: str, hyper: str, *args, **kwargs) -> Run:
    """:func:`train`, but a run whose curvature computation fails on non-finite values
    (e.g. sampling from NaN probabilities after a divergent step) or on a singular damped
    factor is recorded as diverged (NaN from its first epoch on) instead of stopping the
    script."""
    try:
        return train(method, hyper, *args, **kwargs)
    except RuntimeError as error:
        message = str(error).lower()
        singular = isinstance(error, torch.linalg.LinAlgError)
        if not singular and "nan" not in message and "inf" not in message:
            raise
        epochs = args[3] if len(args) > 3 else kwargs["epochs"]
        run = Run(method, hyper, args[5] if len(args) > 5 else kwargs["seed"])
        run.train_loss = [math.nan] * (epochs + 1)
        run.test_acc = [math.nan] * (epochs + 1)
        return run
