"""Time and peak memory of curvature extensions on the models users bring: hbpkit, BackPACK,
curvlinops.

Models (float32, random seeded data, ``CrossEntropyLoss``; builders from
``tests/models/zoo.py``):

* ``resnet18``: torchvision's ResNet-18 (eval mode), ``[B, 3, 32, 32]``, 10 classes;
* ``vit``: the zoo's ViT (``nn.TransformerEncoderLayer``), ``[B, 3, 32, 32]``, patch 4,
  width 64, 4 heads, 4 layers, 10 classes;
* ``gpt``: the zoo's GPT block (causal ``F.scaled_dot_product_attention``), vocabulary 128,
  context 32, width 64, 4 heads, next-token loss over ``logits.view(-1, V)``.

Cases: the plain model's forward + backward (the baseline); hbpkit (``hbpkit.convert``,
``extend``, one backward inside ``backprop``) and BackPACK (``extend(...,
use_converter=True)``) with ``BatchGrad``, ``DiagGGNExact``, ``KFAC``, ``KFLR`` and
``GGNMP`` (then one call ``p.ggnmp(V)`` per parameter, ``V`` of :data:`PRODUCTS` random
columns); curvlinops ``KFACLinearOperator`` with ``fisher_type="mc"`` and ``"type-2"``
(Linear and Conv2d parameters: what it supports; construction and
``compute_kronecker_factors()``) and
``GGNLinearOperator`` (all parameters; one product with :data:`PRODUCTS` columns, attention on
the math kernel of ``F.scaled_dot_product_attention``: the fused CPU kernel has no
forward-mode derivative, which curvlinops' products use).

How it measures (helpers of ``benchmarks/architectures.py``):

* **Time**, in this process: every case is built once, then each repeat runs the plain
  baseline and every case one after the other, odd repeats in reverse order (no case owns
  a position), after one unrecorded warm-up. Reported: the median over ``--repeats`` and
  its ratio to the median plain forward + backward. A case whose warm-up exceeds
  ``--timeout / (repeats + 1)`` keeps that one run ("(1 run)").
* **Peak memory**, one fresh child process per case (this script with ``--worker``), run
  before the timing while this process is small (a child starts with its parent's
  ``ru_maxrss``; peaks below it show as ``<= floor``): peak resident set size above the
  built model and data (``ru_maxrss - VmRSS`` in MB), which includes the plain backward's
  own peak. Skipped with ``--no-memory``.

A case hbpkit refuses (``NotImplementedError`` of ``convert`` or of the checks before the
backward pass) is printed as ``refused: <reason>``; errors of BackPACK and curvlinops as
``failed: <reason>``.

    python benchmarks/models.py                     # all models, default sizes
    python benchmarks/models.py --model gpt --repeats 3
    python benchmarks/models.py --quick             # smoke test: tiny sizes, one repeat
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests" / "models"), str(ROOT)]

import torch  # noqa: E402
from architectures import (  # noqa: E402
    clear_results,
    describe,
    emit,
    emit_peak,
    fmt_ratio,
    machine,
    run_worker,
)
from torch import nn  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

MODELS = ("resnet18", "vit", "gpt")
PRODUCTS = 3
HBPKIT_EXTS = ("BatchGrad", "DiagGGNExact", "KFAC", "KFLR", "GGNMP")
BACKPACK_EXTS = ("BatchGrad", "DiagGGNExact", "KFAC", "KFLR", "GGNMP")
CURVLINOPS_EXTS = ("KFAC-mc", "KFAC-type2", "GGN-products")
CASES = (
    [("plain", "-")]
    + [("hbpkit", e) for e in HBPKIT_EXTS]
    + [("BackPACK", e) for e in BACKPACK_EXTS]
    + [("curvlinops", e) for e in CURVLINOPS_EXTS]
)
SAVEFIELDS = ("grad_batch", "diag_ggn_exact", "kfac", "kflr", "ggnmp")


# --------------------------------------------------------------------------- problems
def build_problem(name: str, batch: int, quick: bool):
    """``(model, X, y, criterion)`` in float32, seeded."""
    import zoo

    torch.manual_seed(0)
    if name == "resnet18":
        model = zoo.resnet18(num_classes=10)
        size = 16 if quick else 32
        X, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
        return model, X, y, zoo.ce
    if name == "vit":
        dims = (8, 4, 3, 8, 2, 1, 10) if quick else (32, 4, 3, 64, 4, 4, 10)
        model = zoo.ViT(*dims)
        X, y = torch.randn(batch, 3, dims[0], dims[0]), torch.randint(0, 10, (batch,))
        return model, X, y, zoo.ce
    if name == "gpt":
        vocab, context, dim, heads = (11, 6, 8, 2) if quick else (128, 32, 64, 4)
        model = zoo.GPT(vocab, context, dim, heads)
        X = torch.randint(0, vocab, (batch, context))
        y = torch.randint(0, vocab, (batch, context))
        return model, X, y, zoo.ce_tokens
    raise ValueError(name)


class TokenLogits(nn.Module):
    """``[N, T, V]`` logits as ``[N, V, T]``: the layout ``CrossEntropyLoss`` (and curvlinops,
    which feeds the model output to it) expects for sequences."""

    def __init__(self, gpt: nn.Module) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, x):
        return self.gpt(x).transpose(1, 2)


class RefusedError(Exception):
    """hbpkit refused the case (``NotImplementedError`` before its backward pass)."""


# --------------------------------------------------------------------------- the cases
class Case:
    """One (library, extension) on its own deep copy of the model; ``run()`` times it."""

    def __init__(self, lib: str, ext: str, base, X, y, criterion: Callable) -> None:
        self.lib, self.ext, self.X, self.y, self.criterion = lib, ext, X, y, criterion
        self.model = copy.deepcopy(base)
        self.loss_fn = nn.CrossEntropyLoss()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.context = None
        self.run_case: Callable[[], None] = self._backward
        if lib == "hbpkit":
            import hbpkit
            import hbpkit.extensions as hx

            try:
                self.net = hbpkit.extend(hbpkit.convert(self.model))
            except NotImplementedError as exc:
                raise RefusedError(str(exc)) from exc
            self.loss_fn = hbpkit.extend(self.loss_fn)
            cls = getattr(hx, ext)
            self.context = lambda: hbpkit.backprop(cls())
        elif lib == "BackPACK":
            import backpack
            import backpack.extensions as bpe

            self.net = backpack.extend(self.model, use_converter=True)
            self.params = [p for p in self.net.parameters() if p.requires_grad]
            self.loss_fn = backpack.extend(self.loss_fn)
            cls = getattr(bpe, ext)
            self.context = lambda: backpack.backpack(cls())
        elif lib == "curvlinops":
            self.net = self.model
            self.run_case = self._curvlinops
        else:
            self.net = self.model
        gen = torch.Generator().manual_seed(0)
        self.vectors = [torch.randn(PRODUCTS, *p.shape, generator=gen) for p in self.params]

    def clear(self) -> None:
        clear_results(self.net, SAVEFIELDS)

    def _backward(self) -> None:
        loss = self.criterion(self.loss_fn, self.net(self.X), self.y)
        if self.context is None:
            loss.backward()
            return
        try:
            with self.context():
                loss.backward()
        except NotImplementedError as exc:
            if self.lib == "hbpkit":
                raise RefusedError(str(exc)) from exc
            raise
        if self.ext == "GGNMP":  # one call per parameter, PRODUCTS columns
            for p, V in zip(self.params, self.vectors):
                p.ggnmp(V)

    def _curvlinops(self) -> None:
        from curvlinops import GGNLinearOperator, KFACLinearOperator

        model = self.model
        if self.criterion.__name__ == "ce_tokens":  # CrossEntropyLoss wants [N, V, T]
            model = TokenLogits(self.model)
        data = [(self.X, self.y)]
        if self.ext.startswith("KFAC"):
            layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
            params = [p for m in layers for p in m.parameters() if p.requires_grad]
            fisher = "mc" if self.ext == "KFAC-mc" else "type-2"
            op = KFACLinearOperator(
                model, self.loss_fn, params, data, check_deterministic=False, fisher_type=fisher
            )
            op.compute_kronecker_factors()
        else:
            op = GGNLinearOperator(
                model, self.loss_fn, self.params, data, check_deterministic=False
            )
            V = torch.cat([v.flatten(1) for v in self.vectors], 1).T  # [P, PRODUCTS]
            # forward-mode AD: the fused CPU attention kernel has none, the math kernel has
            with sdpa_kernel([SDPBackend.MATH]):
                op @ V

    def run(self) -> float:
        self.clear()
        gc.collect()
        start = time.perf_counter()
        self.run_case()
        elapsed = time.perf_counter() - start
        self.clear()
        return elapsed


def make_case(lib: str, ext: str, base, X, y, criterion):
    """``(case, None)`` or ``(None, (status, reason))``."""
    try:
        return Case(lib, ext, base, X, y, criterion), None
    except RefusedError as exc:
        return None, ("refused", short(str(exc)))
    except Exception as exc:  # noqa: BLE001 - any failure is a table entry
        return None, describe(exc)


def short(text: str, n: int = 90) -> str:
    """One line of at most ``n`` characters, without the source locations hbpkit names."""
    text = re.sub(r" \((call_\w+|placeholder|get_attr) at [^)]*\)", "", " ".join(text.split()))
    return text if len(text) <= n else text[: n - 3] + "..."


def failure(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, RefusedError):
        return "refused", short(str(exc))
    return describe(exc)


# --------------------------------------------------------------------------- phases
def setup(args, name: str):
    import warnings

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    return build_problem(name, args.batch or default_batch(name, args.quick), args.quick)


def default_batch(name: str, quick: bool) -> int:
    return 2 if quick else {"resnet18": 32, "vit": 32, "gpt": 16}[name]


def time_model(args, name: str) -> dict:
    """(lib, ext) -> {"times": [...]} or {"status", "reason"}, all cases in this process."""
    base, X, y, criterion = setup(args, name)
    results: dict = {}
    cases = {}
    for lib, ext in CASES:
        case, problem = make_case(lib, ext, base, X, y, criterion)
        if problem:
            results[lib, ext] = {"status": problem[0], "reason": problem[1]}
        else:
            cases[lib, ext] = case
            results[lib, ext] = {"times": []}
    for repeat in range(-1, args.repeats):  # -1: warm-up, not recorded
        order = list(cases.items())
        for job, case in order if repeat % 2 == 0 else order[::-1]:
            if "status" in results[job] or results[job].get("slow"):
                continue
            try:
                seconds = case.run()
            except Exception as exc:  # noqa: BLE001
                status, reason = failure(exc)
                results[job] = {"status": status, "reason": reason}
                case.clear()
                continue
            if repeat >= 0:
                results[job]["times"].append(seconds)
            elif seconds > args.timeout / (args.repeats + 1) and job[0] != "plain":
                results[job] = {"times": [seconds], "slow": True}  # kept as its only run
        print(f"  {name}: repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    return results


def worker_memory(args) -> None:
    """One case once in this (fresh) process: its peak RSS above the built model and data."""
    base, X, y, criterion = setup(args, args.model[0])
    case, problem = make_case(args.lib, args.ext, base, X, y, criterion)
    if problem:
        emit(status=problem[0], reason=problem[1])
        return
    del base
    emit_peak(case.run, failure)


def memory_model(args, name: str) -> dict:
    out = {}
    for lib, ext in CASES:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", name]
        cmd += ["--lib", lib, "--ext", ext, "--threads", str(args.threads)]
        cmd += ["--repeats", "1"] + (["--quick"] if args.quick else [])
        cmd += ["--batch", str(args.batch)] if args.batch else []
        records, problem = run_worker(cmd, args.timeout)
        out[lib, ext] = records[-1] if records else {"status": "failed", "reason": problem}
    return out


# --------------------------------------------------------------------------- report
def report(args, timing: dict, memory: dict) -> str:
    lines = [
        "# Curvature on users' models: hbpkit, BackPACK, curvlinops",
        "",
        f"- machine: {machine()}; torch {torch.__version__}, python "
        f"{platform.python_version()}, {args.threads} thread(s), float32",
        f"- median of {args.repeats} interleaved repeats after one warm-up; ratio: time / "
        "plain forward + backward in the same process; peak MB: peak RSS above the built "
        "model and data, one fresh process per case"
        + (" (memory not measured: --no-memory)" if args.no_memory else ""),
        "",
    ]
    for name in timing:
        res = timing[name]
        plain = res["plain", "-"].get("times") or [float("nan")]
        plain_t = statistics.median(plain)
        batch = args.batch or default_batch(name, args.quick)
        lines += [
            f"## {name} (batch {batch})",
            "",
            f"plain forward + backward: {1e3 * plain_t:.1f} ms",
            "",
            "| library | extension | time ratio | ms | peak MB |",
            "|---|---|---|---|---|",
        ]
        for lib, ext in CASES:
            r = res[lib, ext]
            mem = memory.get(name, {}).get((lib, ext), {})
            peak = "-"
            if mem.get("status") == "ok":
                below = mem["peak_mb"] <= mem.get("floor_mb", 0)
                peak = f"<= {mem['floor_mb']:.0f}" if below else f"{mem['peak_mb']:.0f}"
            if "status" in r:
                lines.append(f"| {lib} | {ext} | {r['status']}: {r['reason']} | - | {peak} |")
                continue
            t = statistics.median(r["times"])
            ratio = fmt_ratio(t / plain_t) + (" (1 run)" if r.get("slow") else "")
            lines.append(f"| {lib} | {ext} | {ratio} | {1e3 * t:.1f} | {peak} |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batch", type=int, default=None, help="default: 32 (gpt: 16)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds per memory case; a case whose warm-up takes more than "
        "timeout / (repeats + 1) is timed once",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory phase")
    parser.add_argument("--out", type=Path, default=None, help="write the table and raw JSON")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lib", help=argparse.SUPPRESS)
    parser.add_argument("--ext", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick and not args.worker:
        args.repeats = 1
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker_memory(args)
    timing, memory = {}, {}
    for name in [] if args.no_memory else args.model:  # first, while this process is small:
        print(f"{name}: memory", file=sys.stderr, flush=True)  # children inherit ru_maxrss
        memory[name] = memory_model(args, name)
    for name in args.model:
        print(f"{name}: timing", file=sys.stderr, flush=True)
        timing[name] = time_model(args, name)
    text = report(args, timing, memory)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "models.md").write_text(text + "\n")
        raw = {
            name: [
                {
                    "lib": lib,
                    "ext": ext,
                    **timing[name][lib, ext],
                    **{
                        f"memory_{k}": v
                        for k, v in memory.get(name, {}).get((lib, ext), {}).items()
                    },
                }
                for lib, ext in CASES
            ]
            for name in timing
        }
        (args.out / "models.json").write_text(json.dumps(raw, indent=1) + "\n")


if __name__ == "__main__":
    main()
