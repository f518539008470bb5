"""Issue 17, items 3 and 5: the convolution input factor ``A`` and DiagHessian through
convolutions, old formula vs new, on the layers of the table S.2 CNN and c3d3.

    python3 benchmarks/conv_factors.py A                      # A of every conv layer, batch 128
    python3 benchmarks/conv_factors.py diag-hessian --batch 8 # DiagHessian, cnn and c3d3

``A``: the expand input factor of each convolution, from the patch Gram of the unfolded
input (the formula used before: unfold, then one weight-gradient convolution or a batched
product) and from the autocorrelation of the input (``hbpkit/modules/conv/autocorrelation.py``),
interleaved (the order alternates between repeats), medians of ``--repeats`` runs, wall
clock and process CPU time (the CPU time is the steadier one on a shared machine), with
the multiply-adds of both and the spread ``(max - min) / median`` of the wall times.

``diag-hessian``: one backward pass of ``DiagHessian`` per case, each in a fresh process
(peak memory: ``ru_maxrss`` above the resident size after building the model and data;
minor page faults of the pass, ``ru_minflt``),
for every source tree of ``--roots`` (e.g. a checkout of the code before and this one:
``--roots /tmp/old .``) and memory policy of ``--policies`` (``MemoryPolicy`` keyword
dicts), cases interleaved over ``--repeats`` rounds; ``check`` sums ``|diag_h|`` (the same
for every root and policy up to round-off).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if "worker" not in sys.argv[1:2]:
    sys.path.insert(0, str(ROOT))
else:  # a worker imports hbpkit from the source tree it is given (old vs new)
    sys.path.insert(0, sys.argv[sys.argv.index("--root") + 1])


#: (name, C_in, padded input side, kernel) of the convolutions of table S.2b and S.2c
LAYERS = [
    ("cnn conv1", 3, 34, 3),
    ("cnn conv2", 16, 34, 3),
    ("cnn conv3", 16, 18, 3),
    ("cnn conv4", 32, 18, 3),
    ("c3d3 conv1", 3, 32, 5),
    ("c3d3 conv2", 64, 14, 3),
    ("c3d3 conv3", 96, 8, 3),
]


def old_input_factor(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """The formula before issue 17: ``[[x]]``, then its Gram (``ConvKronecker`` at 65ff09c^)."""
    # imported here: a diag-hessian worker may import hbpkit from an older source tree
    from hbpkit.modules.conv.geometry import _CONV_WEIGHT, _flat_windows, _windows
    from hbpkit.modules.conv.kronecker import grouped_input_factor

    u = _flat_windows(_windows(x, conv), 2)
    N, S, P = u.shape
    if 2 * S >= P:
        out = x.shape[2] - conv.kernel_size[0] + 1
        A = _CONV_WEIGHT[2](x, [S, *conv.weight.shape[1:]], u.reshape(N, S, out, out))
        return A.reshape(S, S) / (N * P)
    return grouped_input_factor(u, 1, "expand")


def new_input_factor(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    from hbpkit.modules.conv.autocorrelation import patch_gram

    A = patch_gram(x, conv.kernel_size, conv.stride, conv.dilation, 1)[0]
    out = x.shape[2] - conv.kernel_size[0] + 1
    return A / (x.shape[0] * out * out)


def macs(N: int, C: int, L: int, k: int) -> tuple[float, float]:
    """Multiply-adds of the patch Gram and of the autocorrelation (base + edge Grams)."""
    out, S = L - k + 1, C * k * k
    gram = N * out * out * S * S
    auto = N * out * out * (C * k) ** 2 * k + 2 * N * out * (C * k * (k - 1)) ** 2
    return gram, auto


def bench_input_factor(args) -> None:
    torch.set_num_threads(args.threads)
    print(f"A (expand) of the conv layers, batch {args.batch}, {args.threads} thread(s)")
    print(
        "| layer | old ms (cpu) | new ms (cpu) | new/old wall | new/old cpu | MAC old | "
        "MAC new | spread old / new |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, C, L, k in LAYERS:
        torch.manual_seed(0)
        x = torch.randn(args.batch, C, L, L)
        conv = torch.nn.Conv2d(C, 8, k)
        err = (
            (old_input_factor(x, conv) - new_input_factor(x, conv)).abs().max()
            / old_input_factor(x, conv).abs().max()
        ).item()
        wall = {"old": [], "new": []}
        cpu = {"old": [], "new": []}
        for r in range(args.repeats):
            order = [("old", old_input_factor), ("new", new_input_factor)]
            for key, f in order if r % 2 else reversed(order):
                t, c = time.perf_counter(), time.process_time()
                f(x, conv)
                wall[key].append(time.perf_counter() - t)
                cpu[key].append(time.process_time() - c)
        med = {key: statistics.median(v) for key, v in wall.items()}
        medc = {key: statistics.median(v) for key, v in cpu.items()}
        spread = {key: (max(v) - min(v)) / statistics.median(v) for key, v in wall.items()}
        gram, auto = macs(args.batch, C, L, k)
        print(
            f"| {name} | {med['old'] * 1e3:.1f} ({medc['old'] * 1e3:.1f}) | "
            f"{med['new'] * 1e3:.1f} ({medc['new'] * 1e3:.1f}) | {med['new'] / med['old']:.2f} | "
            f"{medc['new'] / medc['old']:.2f} | {gram / 1e9:.3f} G | {auto / 1e9:.3f} G | "
            f"{spread['old']:.2f} / {spread['new']:.2f} |  (rel. diff {err:.1e})"
        )


def worker_diag_hessian(args) -> None:
    from hbpkit import backprop, extend
    from hbpkit.architectures import c3d3, cnn
    from hbpkit.curvature.memory import MemoryPolicy
    from hbpkit.extensions import DiagHessian

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = extend({"cnn": cnn, "c3d3": c3d3}[args.arch]())
    loss_fn = extend(torch.nn.CrossEntropyLoss())
    X, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    policy = MemoryPolicy(**json.loads(args.policy))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t, c = time.perf_counter(), time.process_time()
    loss = loss_fn(model(X), y)
    with backprop(DiagHessian(), memory=policy):
        loss.backward()
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    total = sum(p.diag_h.double().abs().sum().item() for p in model.parameters())
    print(
        json.dumps(
            dict(
                wall=wall,
                cpu=cpu,
                peak_mb=(peak - min(base, rss)) * 1024 / 1e6,
                faults=faults,
                check=total,
            )
        )
    )


def bench_diag_hessian(args) -> None:
    results: dict = {}
    for r in range(args.repeats):
        cases = [(a, p, root) for a in args.archs for p in args.policies for root in args.roots]
        for arch, policy, root in cases if r % 2 == 0 else reversed(cases):
            cmd = [
                sys.executable,
                __file__,
                "worker",
                "--root",
                str(Path(root).resolve()),
                "--arch",
                arch,
                "--policy",
                policy,
                "--batch",
                str(args.batch),
                "--threads",
                str(args.threads),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rec = json.loads(out.strip().splitlines()[-1])
            results.setdefault((arch, policy, root), []).append(rec)
            print(arch, policy, root, rec, flush=True)
    print(f"DiagHessian, batch {args.batch}, {args.threads} thread(s), medians of {args.repeats}")
    print("| net | policy | root | wall s | cpu s | peak MB | minor faults |")
    print("|---|---|---|---|---|---|---|")
    keys = ("wall", "cpu", "peak_mb", "faults")
    for (arch, policy, root), recs in results.items():
        med = {k: statistics.median(r[k] for r in recs) for k in keys}
        print(
            f"| {arch} | {policy} | {root} | {med['wall']:.1f} | {med['cpu']:.1f} | "
            f"{med['peak_mb']:.0f} | {med['faults']:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["A", "diag-hessian", "worker"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--archs", nargs="+", default=["cnn", "c3d3"])
    parser.add_argument("--policies", nargs="+", default=["{}"])
    parser.add_argument("--arch", default="cnn")
    parser.add_argument("--policy", default="{}")
    parser.add_argument("--roots", nargs="+", default=[str(ROOT)])
    parser.add_argument("--root", default=str(ROOT))
    args = parser.parse_args()
    {"A": bench_input_factor, "diag-hessian": bench_diag_hessian, "worker": worker_diag_hessian}[
        args.what
    ](args)


if __name__ == "__main__":
    main()
