"""How time and peak memory of every extension grow with batch size and width: hbpkit vs BackPACK.

The FCNN of table S.2a (:func:`hbpkit.architectures.fcnn`) on random CIFAR-10-shaped
inputs ``[N, 3, 32, 32]``, 10 classes, ``CrossEntropyLoss``, float32; the extensions and
the combination ``KFAC + DiagGGNExact + BatchGrad`` of ``benchmarks/architectures.py``.
Two sweeps:

(a) batch size ``N`` (``--batches``, default 32 64 128 256 512) at the table's widths;
(b) width: every hidden width ``1024, 512, ..., 16`` scaled by a factor (``--widths``,
    default 0.25 0.5 1 2) at batch ``--width-batch`` (128).

    python benchmarks/scaling.py                 # both sweeps, 5 repeats, 2 threads
    python benchmarks/scaling.py --repeats 3 --batches 32 128 512
    python benchmarks/scaling.py --quick         # smoke test: tiny sizes, 1 repeat

Every measurement runs in a fresh child process with the workers of
``benchmarks/architectures.py`` (imported, not copied; only the model they build is
replaced by the scaled FCNN), so the method is the same:

* **Memory**: one child per (configuration, library, extension) and one per configuration
  for the plain model; peak resident set size above the built model and data (MB =
  10^6 bytes), under an address-space limit (``--mem-limit``) and ``--timeout``. Cases
  that the shapes say need more than ``--heavy-gb`` run alone, the others ``--jobs``
  side by side.
* **Time**: one child per configuration runs the plain forward + backward and every case
  that passed the memory phase, libraries interleaved within each repeat (odd repeats in
  reverse order), one warm-up; reported is the median over ``--repeats`` divided by the
  median plain forward + backward of the same child.

A case that fails, runs out of memory or exceeds the time limit becomes a table entry, it
never stops the run. Output: ``DIR/scaling.md`` (two tables, rows extensions, columns the
batch sizes / widths, cells ``time ratio / peak MB`` for hbpkit and BackPACK), the fitted
growth exponents, and ``DIR/scaling.json``; ``DIR`` defaults to ``benchmarks/results``.

Exponents: least-squares slope of ``log(y)`` against ``log(N)`` over the batch sweep (and
against the width factor over the width sweep), for ``y`` the median time of the case and
its peak memory. Peak memory includes terms that do not grow with ``N`` (parameter
gradients, the extension's own parameter-shaped results), which pull the slope below 1;
a slope above 1, over the whole sweep or between its two largest batches, means memory
grows faster than linear in ``N`` and is flagged.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # hbpkit, uninstalled
import architectures as bench  # noqa: E402  (benchmarks/architectures.py)

LIBS = bench.LIBS
# no products here (GGNMP, GGN)
NAMES = [name for name in bench.EXTENSIONS if name not in ("none", "GGNMP", "GGN")]
TABLE_HIDDEN = (1024, 512, 256, 128, 64, 32, 16)
SUPERLINEAR = 1.1  # memory slopes above this are flagged


def hidden_widths(factor: float) -> list[int]:
    return [max(1, round(h * factor)) for h in TABLE_HIDDEN]


def num_params(factor: float) -> int:
    widths = [3072, *hidden_widths(factor), bench.NUM_CLASSES]
    return sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))


# --------------------------------------------------------------------------------------
# worker side: the workers of architectures.py, building the scaled FCNN
# --------------------------------------------------------------------------------------


def build_scaled(args):
    """Replaces ``architectures.build_model`` in a worker: the FCNN at ``args.width``."""
    from hbpkit.architectures import fcnn

    return fcnn(hidden=hidden_widths(args.width))


def run_as_worker(args) -> None:
    bench.build_model = build_scaled  # ``setup`` looks ``build_model`` up at call time
    if args.worker == "memory":
        bench.worker_memory(args)
    else:
        bench.worker_time(args)


# --------------------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------------------


def worker_command(args, mode: str, config: tuple[int, float], **extra) -> list[str]:
    batch, width = config
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode]
    cmd += ["--batch", str(batch), "--width", repr(width), "--repeats", str(args.repeats)]
    cmd += ["--threads", str(args.threads), "--seed", str(args.seed)]
    cmd += ["--timeout", str(args.timeout), "--mem-limit", str(args.mem_limit)]
    for key, value in extra.items():
        cmd += [f"--{key}", value]
    return cmd


def estimate_gb(config: tuple[int, float], ext: str | None) -> float:
    """Rough size of a case: ``N x params`` floats per per-sample-gradient result, and for
    DiagHessian ``N x D^2`` floats (``D`` the summed hidden widths: the residual factors
    backpropagated per sample)."""
    batch, factor = config
    names = [hb for hb, _, _ in bench.EXTENSIONS.get(ext or "none", [])]
    floats = names.count("BatchGrad") * batch * num_params(factor)
    floats += names.count("DiagHessian") * batch * sum(hidden_widths(factor)) ** 2
    return floats * 4 / 1e9


def memory_phase(args, configs) -> dict:
    """(config, lib, ext) -> record of the memory phase (lib "plain", ext None: plain)."""
    todo = [(c, "plain", None) for c in configs]
    todo += [(c, lib, ext) for c in configs for ext in args.extensions for lib in LIBS]

    def one(key):
        config, lib, ext = key
        cmd = worker_command(args, "memory", config, lib=lib, ext=ext or "none")
        start = time.perf_counter()
        records, problem = bench.run_worker(cmd, args.timeout)
        record = records[-1] if records else {"status": "failed", "reason": problem or "no output"}
        if problem and not records:
            record["reason"] = problem
        print(
            f"  memory N={config[0]:<4d} w={config[1]:<5g} {lib:8s} {ext or 'plain':28s} "
            f"{record['status']:7s} {record.get('reason', '')} "
            f"({time.perf_counter() - start:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
        return key, record

    light = [k for k in todo if estimate_gb(k[0], k[2]) <= args.heavy_gb]
    heavy = [k for k in todo if estimate_gb(k[0], k[2]) > args.heavy_gb]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = dict(pool.map(one, light))
    results.update(one(key) for key in heavy)  # alone: two of them could exhaust the RAM
    return results


def time_phase(args, config, memory) -> dict:
    """(lib, ext) -> {"times": [...], "slow": bool} or {"status", "reason"}, one config."""
    jobs = [
        (lib, ext)
        for ext in args.extensions
        for lib in LIBS
        if memory[config, lib, ext]["status"] == "ok"
    ]
    cmd = worker_command(args, "time", config, cases=json.dumps(jobs))
    start = time.perf_counter()
    records, problem = bench.run_worker(cmd, 2 * args.timeout * (args.repeats + 1))
    print(
        f"  time   N={config[0]:<4d} w={config[1]:<5g} {len(jobs)} cases x {args.repeats} "
        f"repeats ({time.perf_counter() - start:.1f} s){' ' + problem if problem else ''}",
        file=sys.stderr,
        flush=True,
    )
    results = bench.collect_times(records, jobs, problem)
    return results


# --------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------


def case_numbers(config, lib, ext, memory, timing) -> dict:
    """seconds (median), ratio, peak_mb, or status + reason, of one case."""
    mem = memory[config, lib, ext]
    if mem["status"] != "ok":
        return {"status": mem["status"], "reason": mem["reason"]}
    out = {"peak_mb": mem["peak_mb"]}
    res = timing[config]
    t = res.get((lib, ext), {"status": "failed", "reason": "not timed"})
    plain = res["plain", None].get("times")
    if "status" in t:
        out.update(status=t["status"], reason=t["reason"])
    elif plain:
        out["seconds"] = statistics.median(t["times"])
        out["ratio"] = out["seconds"] / statistics.median(plain)
        out["runs"] = len(t["times"])
    else:
        out.update(status="failed", reason="plain baseline not timed")
    out.setdefault("status", "ok")
    return out


def slope(xs, ys) -> float | None:
    """Least-squares slope of log(y) against log(x); None for fewer than two points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y is not None and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def marginal_exponent(xs, ys, min_step_mb: float = 5.0) -> float | None:
    """Exponent of the part of ``y`` that grows with ``x``, free of constant terms: for
    ``y = a + b x^e`` the increments per unit of ``x`` between neighbouring sizes grow like
    ``x^(e-1)``, so ``e = 1 + slope(log increment per unit, log midpoint)``. Only steps that
    add at least ``min_step_mb`` count (smaller ones are measurement noise); None if fewer
    than two do."""
    pts = [
        (math.sqrt(x0 * x1), (y1 - y0) / (x1 - x0))
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:]))
        if y0 is not None and y1 is not None and y1 - y0 >= min_step_mb
    ]
    if len(pts) < 2:
        return None
    s = slope([p[0] for p in pts], [p[1] for p in pts])
    return None if s is None else 1 + s


def growth(args, numbers) -> dict:
    """(lib, ext) -> exponents of time and memory in N (whole sweep, last doubling) and width."""
    out = {}
    batch_cfgs = [(n, 1.0) for n in args.batches]
    width_cfgs = [(args.width_batch, w) for w in args.widths]
    for lib in ("plain", *LIBS):
        for ext in [None] if lib == "plain" else args.extensions:
            row = {}
            for key, cfgs, xs in (
                ("N", batch_cfgs, args.batches),
                ("width", width_cfgs, args.widths),
            ):
                got = [numbers[c, lib, ext] for c in cfgs]
                secs = [g.get("seconds") for g in got]
                mems = [g.get("peak_mb") for g in got]
                row[f"time_{key}"] = slope(xs, secs)
                row[f"mem_{key}"] = slope(xs, mems)
                row[f"mem_{key}_last"] = slope(xs[-2:], mems[-2:]) if len(xs) > 2 else None
                row[f"mem_{key}_part"] = marginal_exponent(xs, mems)
            mem_n = [row["mem_N"], row["mem_N_last"], row["mem_N_part"]]
            row["superlinear_memory"] = any(s is not None and s > SUPERLINEAR for s in mem_n)
            out[lib, ext] = row
    return out


def fmt_cell(n: dict, repeats: int) -> str:
    if n["status"] != "ok":
        reason = n["reason"] if len(n["reason"]) <= 40 else n["reason"][:37] + "..."
        mem = f" / {n['peak_mb']:.0f}" if "peak_mb" in n else ""
        return f"{n['status']}: {reason}{mem}"
    slow = "¹" if n.get("runs") == 1 and repeats > 1 else ""
    return f"{bench.fmt_ratio(n['ratio'])}{slow} / {n['peak_mb']:.0f}"


def fmt_exp(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(args, title, cfgs, headers, numbers) -> list[str]:
    lines = [
        f"## {title}",
        "",
        "| extension | " + " | ".join(headers) + " |",
        "|---|" + "---|" * len(headers),
    ]
    plain = [numbers[c, "plain", None] for c in cfgs]
    cells = [f"1 / {p['peak_mb']:.0f}" if p.get("peak_mb") is not None else "-" for p in plain]
    lines.append("| plain forward + backward | " + " | ".join(cells) + " |")
    for ext in args.extensions:
        for lib in LIBS:
            cells = [fmt_cell(numbers[c, lib, ext], args.repeats) for c in cfgs]
            lines.append(f"| {ext} ({lib}) | " + " | ".join(cells) + " |")
    return lines + [""]


def build_report(args, numbers, exps, elapsed, shared: bool) -> str:
    import torch

    import hbpkit

    try:
        from importlib.metadata import version

        bp_version = version("backpack-for-pytorch")
    except Exception:  # noqa: BLE001
        bp_version = "?"
    lines = [
        "# Scaling of the extensions with batch size and width: hbpkit vs BackPACK (FCNN)",
        "",
        "Generated by `python benchmarks/scaling.py"
        + (" --quick" if args.quick else "")
        + f" --repeats {args.repeats}`.",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}; {elapsed / 60:.0f} min",
        f"- machine: {bench.machine()}; load average at the end "
        + ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        (
            "- **shared machine**: other work ran on the same cores during the measurement, "
            "so absolute times are not reported and the ratios carry noise (plain and "
            "extension runs are interleaved, which cancels slow drifts, not bursts)"
            if shared
            else "- idle machine at the start; plain and extension runs are interleaved (this "
            "cancels slow drifts, not bursts: single outliers survive a median of 2)"
        ),
        f"- torch {torch.__version__}, hbpkit {hbpkit.__version__}, BackPACK {bp_version}, "
        f"python {platform.python_version()}",
        f"- FCNN of table S.2a (hidden widths {', '.join(map(str, TABLE_HIDDEN))}, scaled "
        f"for the width sweep), {args.threads} thread(s), float32, CrossEntropyLoss, random "
        f"[N, 3, 32, 32] inputs; median of {args.repeats} interleaved repeats after one "
        "warm-up; memory: peak RSS above the built model and data, one fresh process per "
        f"case (limits: {args.mem_limit:g} GB address space, {args.timeout:g} s)",
        "- cell: **time ratio / peak MB**; time ratio = forward + backward with the "
        "extension / plain forward + backward (same process, same batch); peak MB includes "
        "the plain backward's own peak (row 'plain')"
        + (
            "; ¹: a single run (its warm-up used up its share of the time limit)"
            if args.repeats > 1
            else ""
        ),
        "",
    ]
    lines += table(
        args,
        f"(a) batch size N, table widths ({num_params(1.0) / 1e6:.2f} M parameters)",
        [(n, 1.0) for n in args.batches],
        [f"N = {n}" for n in args.batches],
        numbers,
    )
    lines += table(
        args,
        f"(b) width factor, batch {args.width_batch}",
        [(args.width_batch, w) for w in args.widths],
        [f"x{w:g} ({num_params(w) / 1e6:.2g} M)" for w in args.widths],
        numbers,
    )
    lo, hi = min(args.batches), max(args.batches)
    lines += [
        f"## Growth exponents (log-log slopes; N from {lo} to {hi}, width factor "
        f"{min(args.widths):g} to {max(args.widths):g})",
        "",
        "time = median seconds of the case; memory = its peak MB; 'last' = the slope between "
        "the two largest batches; 'growing part' = the exponent of the N-dependent part of "
        "the memory, from the increments between neighbouring batches (constant terms such as "
        "parameter-shaped buffers drop out; '-' where fewer than two steps add 5 MB or "
        f"more). Memory exponents above {SUPERLINEAR} are flagged (faster than linear in N).",
        "",
        "| extension | library | time ~ N^a | memory ~ N^b | b, last doubling "
        "| growing part ~ N^e | time ~ w^c | memory ~ w^d | flag |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (lib, ext), row in exps.items():
        lines.append(
            f"| {ext or 'plain forward + backward'} | {lib} | {fmt_exp(row['time_N'])} "
            f"| {fmt_exp(row['mem_N'])} | {fmt_exp(row['mem_N_last'])} "
            f"| {fmt_exp(row['mem_N_part'])} "
            f"| {fmt_exp(row['time_width'])} | {fmt_exp(row['mem_width'])} "
            f"| {'super-linear memory' if row['superlinear_memory'] else ''} |"
        )
    return "\n".join(lines) + "\n"


def summary(args, exps) -> str:
    lo, hi = min(args.batches), max(args.batches)
    out = [f"growth in N ({lo}..{hi}): exponents of time and peak memory, hbpkit | BackPACK"]
    plain = exps["plain", None]
    out.append(
        f"  {'plain forward + backward':30s} time N^{fmt_exp(plain['time_N'])}  "
        f"memory N^{fmt_exp(plain['mem_N'])}"
    )
    flagged = []
    for ext in args.extensions:
        parts = []
        for lib in LIBS:
            row = exps[lib, ext]
            parts.append(
                f"time N^{fmt_exp(row['time_N'])} memory N^{fmt_exp(row['mem_N'])} "
                f"(last {fmt_exp(row['mem_N_last'])}, growing part "
                f"{fmt_exp(row['mem_N_part'])})"
            )
            if row["superlinear_memory"]:
                flagged.append(f"{ext} ({lib})")
        out.append(f"  {ext:30s} " + " | ".join(parts))
    if flagged:
        out.append("memory grows faster than linear in N: " + ", ".join(flagged))
    else:
        out.append("no extension's memory grows faster than linear in N")
    return "\n".join(out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring for how time and memory are measured.",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--widths", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--width-batch", type=int, default=128, help="batch of the width sweep")
    parser.add_argument("--extensions", nargs="+", choices=NAMES, default=NAMES, help="rows to run")
    bench.add_run_arguments(parser, timeout=120.0)
    parser.add_argument(
        "--heavy-gb",
        type=float,
        default=2.0,
        help="memory cases estimated above this run alone",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: batches 4 8, widths 0.25 1 at batch 8, 1 repeat, 20 s timeout",
    )
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.quick:
        args.batches, args.widths, args.width_batch = [4, 8], [0.25, 1.0], 8
        args.repeats, args.timeout = 1, 20.0
        args.threads = args.threads or 1
    args.threads = args.threads or 2
    args.batches = sorted(set(args.batches))
    args.widths = sorted(set(args.widths))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return run_as_worker(args)
    start = time.perf_counter()
    configs = [(n, 1.0) for n in args.batches]
    configs += [(args.width_batch, w) for w in args.widths if (args.width_batch, w) not in configs]
    load = os.getloadavg()[0]
    shared = load + args.threads > (os.cpu_count() or 1) + 1  # another busy core
    if shared:
        print(
            f"warning: load average {load:.1f} on {os.cpu_count()} CPUs: other processes "
            "compete for the cores and the timings are noisy",
            file=sys.stderr,
        )
    print(
        f"{len(configs)} configurations; phase 1 (memory, up to {args.jobs} side by side):",
        file=sys.stderr,
        flush=True,
    )
    memory = memory_phase(args, configs)
    print("phase 2 (time, one process per configuration):", file=sys.stderr, flush=True)
    timing = {config: time_phase(args, config, memory) for config in configs}
    numbers = {
        (config, lib, ext): case_numbers(config, lib, ext, memory, timing)
        for config in configs
        for lib, ext in [("plain", None)] + [(lib, e) for e in args.extensions for lib in LIBS]
    }
    exps = growth(args, numbers)
    report = build_report(args, numbers, exps, time.perf_counter() - start, shared)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.md").write_text(report)
    raw = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "shared_machine": shared,
        "cases": [
            {"batch": c[0], "width": c[1], "lib": lib, "ext": ext, **rec}
            for (c, lib, ext), rec in numbers.items()
        ],
        "exponents": [{"lib": lib, "ext": ext, **row} for (lib, ext), row in exps.items()],
    }
    (args.out / "scaling.json").write_text(json.dumps(raw, indent=1) + "\n")
    print(report)
    print(summary(args, exps))
    print(
        f"\nwrote {args.out / 'scaling.md'}, scaling.json ({time.perf_counter() - start:.0f} s)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
