"""Cost of each extension relative to a plain forward + backward pass: hbpkit vs BackPACK.

Model: the FCNN of the HBP supplement, table S.2a (3,846,810 parameters)::

    Flatten, Linear(3072, 1024), Sigmoid, Linear(1024, 512), Sigmoid, Linear(512, 256),
    Sigmoid, Linear(256, 128), Sigmoid, Linear(128, 64), Sigmoid, Linear(64, 32), Sigmoid,
    Linear(32, 16), Sigmoid, Linear(16, 10)

with ``CrossEntropyLoss``, float32, random CIFAR-10-shaped inputs ``[N, 3, 32, 32]``
(default ``N = 128``). Both libraries get a deep copy of the same weights. One timed
run is ``forward + loss + backward`` inside the library's context manager with one
extension; the baseline is the same on an un-extended copy of the model (plain PyTorch).
Runs are interleaved (every repeat times the baseline and every extension in both
libraries in turn) and the median over repeats is reported, as a ratio to the median
baseline. A library failing on an extension is reported as ``failed: <reason>``.

    python benchmarks/fcnn_overhead.py --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import time
import warnings

import backpack.extensions as bpext
import torch
from backpack import backpack as bp_backpack
from backpack import extend as bp_extend
from torch import nn

import hbpkit.extensions as hx
from hbpkit import backprop as hb_backprop
from hbpkit import extend as hb_extend

# name -> (hbpkit factory, BackPACK factory, savefield)
EXTENSIONS = {
    "BatchGrad": (hx.BatchGrad, bpext.BatchGrad, "grad_batch"),
    "BatchL2": (hx.BatchL2, bpext.BatchL2Grad, "batch_l2"),
    "SumGradSquared": (hx.SumGradSquared, bpext.SumGradSquared, "sum_grad_squared"),
    "Variance": (hx.Variance, bpext.Variance, "variance"),
    "DiagGGNExact": (hx.DiagGGNExact, bpext.DiagGGNExact, "diag_ggn_exact"),
    "DiagGGNMC": (hx.DiagGGNMC, bpext.DiagGGNMC, "diag_ggn_mc"),
    "DiagHessian": (hx.DiagHessian, bpext.DiagHessian, "diag_h"),
    "KFAC": (hx.KFAC, bpext.KFAC, "kfac"),
    "KFLR": (hx.KFLR, bpext.KFLR, "kflr"),
    "KFRA": (hx.KFRA, bpext.KFRA, "kfra"),
}
SAVEFIELDS = [v[2] for v in EXTENSIONS.values()]


def fcnn() -> nn.Sequential:
    """Table S.2a of the HBP supplement."""
    widths = [3072, 1024, 512, 256, 128, 64, 32, 16, 10]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(widths) - 2:
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def clear(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None
        for field in SAVEFIELDS:
            if hasattr(p, field):
                delattr(p, field)


def timed(model, loss_fn, X, y, context) -> float:
    """Seconds for forward + loss + backward inside ``context`` (None: plain)."""
    clear(model)
    gc.collect()
    start = time.perf_counter()
    loss = loss_fn(model(X), y)
    if context is None:
        loss.backward()
    else:
        with context:
            loss.backward()
    elapsed = time.perf_counter() - start
    clear(model)
    return elapsed


def short(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    msg = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return msg if len(msg) <= 90 else msg[:87] + "..."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        choices=list(EXTENSIONS),
        help="time only these extensions",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", module="backpack")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    base = fcnn()
    X = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    models = {
        "plain": (copy.deepcopy(base), nn.CrossEntropyLoss()),
        "hbpkit": (hb_extend(copy.deepcopy(base)), hb_extend(nn.CrossEntropyLoss())),
        "BackPACK": (bp_extend(copy.deepcopy(base)), bp_extend(nn.CrossEntropyLoss())),
    }
    contexts = {"hbpkit": hb_backprop, "BackPACK": bp_backpack}
    names = args.only or list(EXTENSIONS)

    # rows: ("plain", None) baseline, (lib, None) extended model without extension, (lib, ext)
    jobs = [("plain", None)] + [(lib, None) for lib in contexts]
    jobs += [(lib, name) for name in names for lib in contexts]
    times: dict[tuple, list[float]] = {job: [] for job in jobs}
    failed: dict[tuple, str] = {}

    def run(job):
        lib, name = job
        model, loss_fn = models[lib]
        if name is None:
            return timed(model, loss_fn, X, y, None)
        factory = EXTENSIONS[name][0 if lib == "hbpkit" else 1]
        return timed(model, loss_fn, X, y, contexts[lib](factory()))

    print(
        f"FCNN of table S.2a, batch {args.batch}, float32, {args.threads} thread(s), "
        f"median of {args.repeats} interleaved repeats (after one warm-up run each)\n",
        flush=True,
    )
    load_before = os.getloadavg()[0]
    if load_before + args.threads > (os.cpu_count() or 1) + 0.5:
        print(
            f"warning: load average {load_before:.1f} on {os.cpu_count()} CPUs before starting; "
            "other processes compete for the cores and the timings are noisy"
            + (
                " (OpenMP waits inflate them badly with several threads: try --threads 1)"
                if args.threads > 1
                else ""
            )
            + "\n",
            flush=True,
        )
    for repeat in range(-1, args.repeats):  # -1: warm-up, not recorded
        for job in jobs:
            if job in failed:
                continue
            try:
                t = run(job)
            except Exception as exc:  # noqa: BLE001 - any failure is a table entry
                failed[job] = short(exc)
                clear(models[job[0]][0])
                gc.collect()
                continue
            if repeat >= 0:
                times[job].append(t)

    baseline = statistics.median(times[("plain", None)])
    spread = max(times[("plain", None)]) / min(times[("plain", None)])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"plain forward + backward: {1e3 * baseline:.1f} ms (median; max/min {spread:.2f}); "
        f"load average {load} on {os.cpu_count()} CPUs\n"
    )

    def ratio(job) -> tuple[str, float | None]:
        if job in failed:
            return f"failed: {failed[job]}", None
        r = statistics.median(times[job]) / baseline
        return f"{r:.2f}", r

    print("| extension | hbpkit ratio | BackPACK ratio | hbpkit / BackPACK |")
    print("|---|---|---|---|")
    rows = [("(extended, no extension)", None)] + [(n, n) for n in names]
    for label, name in rows:
        hb_text, hb = ratio(("hbpkit", name))
        bp_text, bp = ratio(("BackPACK", name))
        rel = f"{hb / bp:.2f}" if hb is not None and bp is not None else "-"
        print(f"| {label} | {hb_text} | {bp_text} | {rel} |")


if __name__ == "__main__":
    main()
