"""Fresh pages and time per extension with and without the pass's workspace (issue 17, item 1).

On the table S.2 nets (``fcnn``, ``cnn``, ``c3d3``, batch 128, float32, CrossEntropyLoss),
one process times, interleaved over ``--repeats`` (after one warm-up), a plain forward +
backward and, per extension, hbpkit with ``MemoryPolicy(workspace_bytes=2**30)`` ("after":
the workspace of reused buffers, ``hbpkit/curvature/workspace.py``) and with the default
``MemoryPolicy()`` ("before", no workspace: every large temporary is fresh memory from the
default allocator). Each configuration has its own deep copy of the model and
its own loss module, so their workspaces are separate. Printed per case: the median time,
its ratio to the plain pass, and the median minor page faults of one pass
(``resource.getrusage(RUSAGE_SELF).ru_minflt``, 4 KiB each), with the default glibc
allocator. ``--reuse-freed-memory`` runs the same in a child process with glibc keeping
freed memory (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, as
``architectures.py --reuse-freed-memory``): the "reuse" numbers the workspace aims at.

    python benchmarks/workspace.py          # 3 nets x KFAC, KFLR, DiagGGNExact, BatchGrad
    python benchmarks/workspace.py --arch c3d3 --extensions KFLR --repeats 9
    python benchmarks/workspace.py --reuse-freed-memory
    python benchmarks/workspace.py --peak --threads 1   # peak memory instead of time

``--peak`` runs every (net, extension, with or without the workspace) in a fresh child
process, as ``architectures.py`` measures memory: the peak resident set size of one pass
above the built model and data (``ru_maxrss - VmRSS``, MB), and the minor page faults
of that first pass and of the second, median over ``--repeats`` children.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from functools import partial

import torch
from torch import nn

import hbpkit.extensions as hx
from hbpkit import architectures, backprop, extend
from hbpkit.curvature.memory import MemoryPolicy

#: glibc tunables that keep freed memory for reuse (as in ``architectures.py``)
REUSE_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**34)}
WORKSPACE = MemoryPolicy(workspace_bytes=2**30)
FIELDS = ("kfac", "kflr", "diag_ggn_exact", "grad_batch", "diag_ggn_mc")


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(run, repeats: int, cases: dict) -> dict:
    """{name: (times, faults)} over interleaved repeats (odd repeats backwards)."""
    out = {name: ([], []) for name in cases}
    for r in range(repeats + 1):
        order = list(cases.items())
        for name, case in order if r % 2 else order[::-1]:
            gc.collect()
            f0, t0 = faults(), time.perf_counter()
            run(case)
            t1, f1 = time.perf_counter(), faults()
            if r:
                out[name][0].append(t1 - t0)
                out[name][1].append(f1 - f0)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["fcnn", "cnn", "c3d3"])
    parser.add_argument(
        "--extensions", nargs="+", default=["KFAC", "KFLR", "DiagGGNExact", "BatchGrad"]
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--reuse-freed-memory",
        action="store_true",
        help="also run everything in a child process with glibc keeping freed memory",
    )
    parser.add_argument(
        "--peak", action="store_true", help="peak memory per case (fresh processes)"
    )
    parser.add_argument("--peak-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_worker:
        return peak_worker(*args.peak_worker, batch=args.batch, threads=args.threads)
    if args.peak:
        return peak_table(args)
    if args.reuse_freed_memory:
        child = [
            a for a in (argv if argv is not None else sys.argv[1:]) if a != "--reuse-freed-memory"
        ]
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = repo + os.pathsep + os.environ.get("PYTHONPATH", "")
        env = dict(os.environ, **REUSE_FREED_MEMORY, PYTHONPATH=path)
        print(
            "glibc keeps freed memory (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ 2^34):",
            flush=True,
        )
        subprocess.run([sys.executable, os.path.abspath(__file__), *child], env=env, check=True)
        print("\ndefault allocator:")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    print("| net | extension | before: ms (ratio) | after: ms (ratio) | faults before | after |")
    print("|---|---|---|---|---|---|")
    for arch in args.arch:
        torch.manual_seed(0)
        base = getattr(architectures, arch)()
        X = torch.randn(args.batch, 3, 32, 32)
        y = torch.randint(0, 10, (args.batch,))
        cases: dict = {"plain": (copy.deepcopy(base), nn.CrossEntropyLoss(), None, None)}
        for ext in args.extensions:
            for label, policy in (("before", None), ("after", WORKSPACE)):
                model, loss = extend(copy.deepcopy(base)), extend(nn.CrossEntropyLoss())
                cases[ext, label] = (model, loss, getattr(hx, ext), policy)

        res = measure(partial(run, X=X, y=y), args.repeats, cases)
        plain = statistics.median(res["plain"][0])
        for ext in args.extensions:
            cells = []
            for label in ("before", "after"):
                t = statistics.median(res[ext, label][0])
                cells.append(f"{1e3 * t:.0f} ({t / plain:.2f})")
            f_before, f_after = (statistics.median(res[ext, lab][1]) for lab in ("before", "after"))
            print(
                f"| {arch} | {ext} | {cells[0]} | {cells[1]} | {f_before:.0f} | {f_after:.0f} |",
                flush=True,
            )
        plain_faults = statistics.median(res["plain"][1])
        print(f"| {arch} | plain | {1e3 * plain:.0f} ms | | {plain_faults:.0f} | |", flush=True)


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def peak_worker(arch: str, ext: str, label: str, batch: int, threads: int) -> None:
    """One case in this fresh process: peak RSS above the built model (MB) of the first
    pass, and the minor faults of the first and the second pass, as one JSON line."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.manual_seed(0)
    model, loss = extend(getattr(architectures, arch)()), extend(nn.CrossEntropyLoss())
    X, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    case = (model, loss, getattr(hx, ext), WORKSPACE if label == "after" else None)
    gc.collect()
    before = rss_kib()
    counts = []
    for _ in range(2):
        f0 = faults()
        run(case, X, y)
        counts.append(faults() - f0)
        if len(counts) == 1:
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / 1e6
    print(json.dumps({"peak_mb": peak, "faults": counts}))


def peak_table(args) -> None:
    """``--peak``: a fresh child per case and repeat, medians per case."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print("| net | extension | peak MB without → with workspace | faults 1st pass | 2nd pass |")
    print("|---|---|---|---|---|")
    for arch in args.arch:
        for ext in args.extensions:
            cells = {}
            for label in ("before", "after"):
                runs = []
                for _ in range(args.repeats):
                    cmd = [sys.executable, os.path.abspath(__file__), "--peak-worker", arch, ext]
                    cmd += [label, "--batch", str(args.batch), "--threads", str(args.threads)]
                    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                cells[label] = (
                    statistics.median(r["peak_mb"] for r in runs),
                    statistics.median(r["faults"][0] for r in runs),
                    statistics.median(r["faults"][1] for r in runs),
                )
            (p0, a0, b0), (p1, a1, b1) = cells["before"], cells["after"]
            pairs = " | ".join(f"{u:.0f} → {v:.0f}" for u, v in ((p0, p1), (a0, a1), (b0, b1)))
            print(f"| {arch} | {ext} | {pairs} |", flush=True)


def run(case, X, y) -> None:
    """One forward + backward of ``case`` (its results of the last run dropped first)."""
    model, loss_fn, ext, policy = case
    for p in model.parameters():
        p.grad = None
        for field in FIELDS:
            if hasattr(p, field):
                delattr(p, field)
    loss = loss_fn(model(X), y)
    if ext is None:
        loss.backward()
        return
    with backprop(ext(), memory=policy):
        loss.backward()


if __name__ == "__main__":
    main()
