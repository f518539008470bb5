"""Time and peak memory of every extension on the paper's architectures: hbpkit vs its peers.

Architectures: ``fcnn``, ``cnn``, ``c3d3`` of the HBP supplement, table S.2
(:mod:`hbpkit.architectures`), on random CIFAR-10-shaped inputs ``[B, 3, 32, 32]``, 10
classes, ``CrossEntropyLoss``, float32. Every extension of BackPACK 1.7.1 (BatchGrad,
BatchL2, SumGradSquared, Variance, DiagGGNExact, DiagGGNMC, DiagHessian, KFAC, KFLR,
KFRA), the combination ``KFAC + DiagGGNExact + BatchGrad`` in one backward pass, and the
extended model with no extension active. One case is ``forward + loss + backward`` of an
(architecture, library, extension); the libraries are a plain (not extended) model,
hbpkit, BackPACK and curvlinops, each on a deep copy of the same seeded weights. GGNMP is
the backward pass plus one product ``p.ggnmp(V)`` per parameter (``PRODUCTS`` columns), a
block of the GGN per parameter; the GGN row is the full product with its cross blocks,
``hbpkit.operators.GGNOperator @ V`` against curvlinops' ``GGNLinearOperator @ V`` (BackPACK
has none).
curvlinops has no extensions: its rows are what it computes in place of one
(:data:`CURVLINOPS`: K-FAC factors with ``fisher_type="mc"`` for KFAC and ``"type-2"`` for
KFLR, products with the full GGN, and its randomized diagonal estimators, ``xdiag`` and
``hutchinson_diag``, where they are its only way to a diagonal); "-" where it has none.

    python benchmarks/architectures.py                      # everything, batch 128
    python benchmarks/architectures.py --arch fcnn --repeats 3
    python benchmarks/architectures.py --quick              # smoke test, about a minute

``--quick`` is batch 8, 1 repeat, fcnn and cnn, 10 s per case and 1 thread (unless
``--threads`` is given): it checks that the tool runs; its numbers mean little.

How it measures (two phases, every measurement in a fresh child process of this script,
started with ``sys.executable`` and the hidden ``--worker`` flag):

1. **Memory.** One child per (architecture, library, extension), plus one per architecture
   for the plain model. It builds the model and the data, reads its resident set size
   (``VmRSS``), runs the case once and reports ``ru_maxrss - VmRSS`` (peak resident set
   size above the built model and data, in MB = 10^6 bytes). Peaks are process-wide, so
   isolation is what makes them attributable; these children may run side by side
   (``--jobs``), which does not change a process's own RSS. Each child runs under an
   address-space limit (``RLIMIT_AS``, ``--mem-limit``, default 12 GB), so a case that
   asks for tens of GB fails at once, and a wall-clock limit (``--timeout``). A failure
   (exception, out of memory, timeout, crash) becomes ``failed: <reason>`` in the table;
   hbpkit's up-front :class:`~hbpkit.curvature.memory.DenseBudgetError` becomes
   ``refused: <size>``.
2. **Time.** One child per architecture holds the plain, the hbpkit and the BackPACK
   model and, in every repeat, runs the plain baseline and every case that passed phase 1,
   one after the other (libraries interleaved within each repeat, as in
   ``benchmarks/fcnn_overhead.py``; odd repeats run the list backwards, so no case owns a
   position): drifts of a shared machine hit all cases alike. One warm-up repeat is not
   recorded; reported are the median over ``--repeats`` and the
   ratio to the median plain forward + backward of the same child. A case whose warm-up
   alone exceeds ``--timeout / (repeats + 1)`` keeps that single run ("1 run" in the
   table) and is not repeated. Results stream back line by line, so a child killed at its
   limit still leaves the repeats it finished. Timing runs one case at a time, never in
   parallel with anything this script starts.

``--reuse-freed-memory`` starts every child (plain, hbpkit and BackPACK alike) with the
glibc tunables ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` at 2^34: freed
tensors stay in the heap and are reused, where by default every tensor above 32 MB is
fresh memory from the kernel, and touching it the first time (a page fault per 4 KiB)
costs about as much as the arithmetic of the curvature extensions on a virtual machine.

The command also prints a cost model per extension: the floating-point work the
extension cannot avoid (extra backward passes of vectors, Gram products, per-sample
products), counted from the layer shapes, relative to the plain forward + backward flops,
as a floor ratio ``1 + extra / plain`` next to the measured ratios (see
:func:`extra_flops`).

Output: ``DIR/benchmark.md`` (tables, printed to stdout too), ``DIR/benchmark.png`` (one
panel per architecture, ratios on a log axis, hbpkit next to its peers, failures marked)
and ``DIR/benchmark.json`` (raw numbers); ``DIR`` defaults to ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ARCHS = ("fcnn", "cnn", "c3d3")
LIBS = ("hbpkit", "BackPACK")  # the libraries with extensions (also benchmarks/scaling.py)
PEERS = (*LIBS, "curvlinops")  # the columns of this script's tables
NUM_CLASSES = 10
COMBO = "KFAC+DiagGGNExact+BatchGrad"
PRODUCTS = 3  # columns of one GGN product (GGNMP: ``p.ggnmp(V)``; curvlinops: ``op @ V``)
XDIAG_PRODUCTS = 10  # GGN products of curvlinops' xdiag estimate of the diagonal

# name -> [(hbpkit class, BackPACK class, savefield), ...]; "none": extended, no extension
EXTENSIONS: dict[str, list[tuple[str, str, str]]] = {
    "none": [],
    "BatchGrad": [("BatchGrad", "BatchGrad", "grad_batch")],
    "BatchL2": [("BatchL2", "BatchL2Grad", "batch_l2")],
    "SumGradSquared": [("SumGradSquared", "SumGradSquared", "sum_grad_squared")],
    "Variance": [("Variance", "Variance", "variance")],
    "DiagGGNExact": [("DiagGGNExact", "DiagGGNExact", "diag_ggn_exact")],
    "DiagGGNMC": [("DiagGGNMC", "DiagGGNMC", "diag_ggn_mc")],
    "DiagHessian": [("DiagHessian", "DiagHessian", "diag_h")],
    "KFAC": [("KFAC", "KFAC", "kfac")],
    "KFLR": [("KFLR", "KFLR", "kflr")],
    "KFRA": [("KFRA", "KFRA", "kfra")],
    "GGNMP": [("GGNMP", "GGNMP", "ggnmp")],
    "GGN": [],  # the full GGN product: hbpkit.operators.GGNOperator, no extension
    COMBO: [
        ("KFAC", "KFAC", "kfac"),
        ("DiagGGNExact", "DiagGGNExact", "diag_ggn_exact"),
        ("BatchGrad", "BatchGrad", "grad_batch"),
    ],
}
SAVEFIELDS = sorted({field for specs in EXTENSIONS.values() for _, _, field in specs})
LABELS = {"none": "(extended, no extension)", "GGN": "GGN product (full, cross blocks)"}
#: rows hbpkit runs through an operator, not an extension (BackPACK has no counterpart)
OPERATOR_ROWS = ("GGN",)
#: what curvlinops 3.0.1 computes in place of an extension (the rows it has no counterpart
#: for are "-"): its K-FAC factors (``KFACLinearOperator(...).compute_kronecker_factors()``,
#: Linear and Conv2d layers, without the gradient hbpkit and BackPACK also return), GGN
#: products (``GGNLinearOperator @ V``), and, since it has no exact diagonal other than
#: one product per parameter, the randomized estimates of the GGN's diagonal
CURVLINOPS = {
    "KFAC": "KFACLinearOperator, fisher_type='mc'",
    "KFLR": "KFACLinearOperator, fisher_type='type-2'",
    "DiagGGNExact": f"xdiag(GGNLinearOperator, {XDIAG_PRODUCTS}) (estimate)",
    "DiagGGNMC": "hutchinson_diag(GGNLinearOperator, 1) (estimate)",
    "GGNMP": f"GGNLinearOperator @ V, {PRODUCTS} columns (the full GGN: it has no blocks)",
    "GGN": f"GGNLinearOperator @ V, {PRODUCTS} columns",
}

PREFIX = "BENCH "  # marks the JSON lines a worker writes to stdout
#: glibc tunables that keep freed memory in the heap for reuse (``--reuse-freed-memory``)
REUSE_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**34)}


def runs(lib: str, ext: str | None) -> bool:
    """Whether ``lib`` has a counterpart of ``ext`` (curvlinops: :data:`CURVLINOPS`; BackPACK
    not for :data:`OPERATOR_ROWS`)."""
    if lib == "BackPACK":
        return ext not in OPERATOR_ROWS
    return lib != "curvlinops" or ext in CURVLINOPS


# --------------------------------------------------------------------------------------
# worker side (the child processes)
# --------------------------------------------------------------------------------------


def rss_kib() -> int:
    """Current resident set size (KiB) of this process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def emit(**record) -> None:
    print(PREFIX + json.dumps(record), flush=True)


def describe(exc: BaseException) -> tuple[str, str]:
    """(status, short reason) of a failed case."""
    try:
        from hbpkit.curvature.memory import DenseBudgetError
    except ImportError:  # pragma: no cover - hbpkit always importable here
        DenseBudgetError = ()  # noqa: N806
    msg = " ".join(str(exc).split())
    if DenseBudgetError and isinstance(exc, DenseBudgetError):
        size = re.search(r"\(([0-9.e+-]+ GB)\)", msg)
        return "refused", (size.group(1) if size else "dense budget") + " dense tensor"
    wanted = re.search(r"allocate (\d+) bytes", msg)
    if wanted or isinstance(exc, MemoryError) or "can't allocate memory" in msg:
        size = f", asked for {int(wanted.group(1)) / 1e9:.3g} GB" if wanted else ""
        return "failed", f"out of memory{size}"
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return "failed", text if len(text) <= 80 else text[:77] + "..."


def clear_results(model: Any, fields: tuple[str, ...] = ()) -> None:
    """Drop the gradients and the results ``fields`` (default: :data:`SAVEFIELDS`) from
    ``model``'s parameters (``("grad",)``: the gradients only, as ``zero_grad()`` does)."""
    for p in model.parameters():
        p.grad = None
        for field in fields or SAVEFIELDS:
            if field != "grad" and hasattr(p, field):
                delattr(p, field)


class Case:
    """One (library, extension) on its own deep copy of the model: ``run()`` times it."""

    def __init__(self, lib: str, ext: str | None, base, X, y) -> None:
        import copy

        from torch import nn

        self.lib, self.ext, self.X, self.y = lib, ext, X, y
        model, loss_fn = copy.deepcopy(base), nn.CrossEntropyLoss()
        self.context = None
        self.vectors = None
        if ext in ("GGNMP", "GGN"):
            import torch

            gen = torch.Generator().manual_seed(0)
            self.vectors = [
                torch.randn(PRODUCTS, *p.shape, generator=gen) for p in base.parameters()
            ]
        if lib == "hbpkit":
            import hbpkit.extensions as hx
            from hbpkit import backprop, extend

            if ext not in OPERATOR_ROWS:
                model, loss_fn = extend(model), extend(loss_fn)
            classes = [getattr(hx, hb) for hb, _, _ in EXTENSIONS[ext]]
            if classes:
                self.context = lambda: backprop(*[c() for c in classes])
        elif lib == "BackPACK":
            import backpack.extensions as bpe
            from backpack import backpack, extend

            model, loss_fn = extend(model), extend(loss_fn)
            classes = [getattr(bpe, bp) for _, bp, _ in EXTENSIONS[ext]]
            if classes:
                self.context = lambda: backpack(*[c() for c in classes])
        elif lib == "curvlinops" and ext not in CURVLINOPS:
            raise ValueError(f"curvlinops has no counterpart of {ext}")
        self.model, self.loss_fn = model, loss_fn

    #: whether a run starts with the previous run's results still attached, as in a
    #: training loop where each step's pass replaces them (``--clear-results``: no)
    keep_results = False

    def clear(self) -> None:
        clear_results(self.model, ("grad",) if self.keep_results else ())

    def run(self) -> float:
        """Seconds for forward + loss + backward (inside the extension's context)."""
        import gc

        self.clear()
        gc.collect()
        start = time.perf_counter()
        if self.lib == "curvlinops":
            self.run_curvlinops()
        elif self.ext in OPERATOR_ROWS:
            self.run_operator()
        else:
            loss = self.loss_fn(self.model(self.X), self.y)
            if self.context is None:
                loss.backward()
            else:
                with self.context():
                    loss.backward()
            if self.vectors is not None:  # GGNMP: one product per parameter
                for p, V in zip(self.model.parameters(), self.vectors):
                    p.ggnmp(V)
        elapsed = time.perf_counter() - start
        self.clear()
        return elapsed

    def run_operator(self) -> None:
        """hbpkit's full GGN product (``hbpkit.operators.GGNOperator @ V``)."""
        import torch

        from hbpkit.operators import GGNOperator

        op = GGNOperator(self.model, self.loss_fn, (self.X, self.y))
        op @ torch.cat([v.flatten(1) for v in self.vectors], 1).T  # [P, PRODUCTS]

    def run_curvlinops(self) -> None:
        """curvlinops' counterpart of the extension (:data:`CURVLINOPS`)."""
        import curvlinops
        import torch
        from torch import nn

        data = [(self.X, self.y)]
        if self.ext in ("KFAC", "KFLR"):
            layers = [m for m in self.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
            params = [p for m in layers for p in m.parameters() if p.requires_grad]
            fisher = "mc" if self.ext == "KFAC" else "type-2"
            op = curvlinops.KFACLinearOperator(
                self.model, self.loss_fn, params, data, check_deterministic=False,
                fisher_type=fisher,
            )  # fmt: skip
            op.compute_kronecker_factors()
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        op = curvlinops.GGNLinearOperator(
            self.model, self.loss_fn, params, data, check_deterministic=False
        )
        if self.ext in ("GGNMP", "GGN"):
            op @ torch.cat([v.flatten(1) for v in self.vectors], 1).T  # [P, PRODUCTS]
        elif self.ext == "DiagGGNExact":
            curvlinops.xdiag(op, XDIAG_PRODUCTS)
        else:  # DiagGGNMC
            curvlinops.hutchinson_diag(op, 1)


def build_model(args):
    """The network of ``--arch`` (``benchmarks/scaling.py`` replaces this in its workers)."""
    from hbpkit import architectures

    return getattr(architectures, args.arch[0])()


def setup(args):
    """Limit the address space, then build the seeded model and data."""
    limit = int(args.mem_limit * 1e9)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import warnings

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="backpack")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.manual_seed(args.seed)
    base = build_model(args)
    X = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, NUM_CLASSES, (args.batch,))
    return base, X, y


def worker_memory(args) -> None:
    """Phase 1: run one case once; report its peak RSS above the built model and data."""

    base, X, y = setup(args)
    try:
        case = Case(args.lib, None if args.lib == "plain" else args.ext, base, X, y)
        del base
    except Exception as exc:  # noqa: BLE001 - any failure is a table entry
        status, reason = describe(exc)
        emit(status=status, reason=reason)
        return
    emit_peak(case.run, describe)


def emit_peak(run: Any, describe_failure: Any) -> None:
    """Run ``run()`` once in this (fresh) process and emit its peak RSS in MB above what the
    process held before (``floor_mb``: peaks below the process's earlier maximum are not
    seen), with ``seconds`` where ``run`` returns them; a failure is emitted as its
    ``describe_failure(exc)``."""
    import gc

    gc.collect()
    before, maxrss_before = rss_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        seconds = run()
    except Exception as exc:  # noqa: BLE001 - any failure is a table entry
        status, reason = describe_failure(exc)
        emit(status=status, reason=reason)
        return
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    extra = {"seconds": seconds} if isinstance(seconds, float) else {}
    emit(
        status="ok",
        peak_mb=(peak - before) * 1024 / 1e6,
        floor_mb=max(0, maxrss_before - before) * 1024 / 1e6,
        **extra,
    )


def worker_time(args) -> None:
    """Phase 2: interleave the plain baseline and the given cases over the repeats."""
    base, X, y = setup(args)
    jobs = [("plain", None)] + [tuple(job) for job in json.loads(args.cases)]
    cases = {}
    for lib, ext in jobs:
        try:
            cases[lib, ext] = Case(lib, ext, base, X, y)
            cases[lib, ext].keep_results = not args.clear_results
        except Exception as exc:  # noqa: BLE001
            status, reason = describe(exc)
            emit(lib=lib, ext=ext, status=status, reason=reason)
    slow_after = args.timeout / (args.repeats + 1)
    done: set = set()
    for repeat in range(-1, args.repeats):  # -1: warm-up, not recorded
        order = list(cases.items())
        for job, case in order if repeat % 2 == 0 else order[::-1]:  # no fixed position
            if job in done:
                continue
            try:
                seconds = case.run()
            except Exception as exc:  # noqa: BLE001
                status, reason = describe(exc)
                emit(lib=job[0], ext=job[1], status=status, reason=reason)
                case.clear()
                done.add(job)
                continue
            if repeat >= 0:
                emit(lib=job[0], ext=job[1], repeat=repeat, seconds=seconds)
            elif seconds > slow_after and job[0] != "plain":
                emit(lib=job[0], ext=job[1], repeat=0, seconds=seconds, slow=True)
                done.add(job)


# --------------------------------------------------------------------------------------
# cost model (computed in the parent from the layer shapes)
# --------------------------------------------------------------------------------------


def layer_shapes(arch: str) -> list[dict]:
    """Per-sample shapes of the leaf modules of ``arch``, in forward order."""
    import torch
    from torch import nn

    from hbpkit import architectures

    model = getattr(architectures, arch)()
    layers: list[dict] = []

    def hook(module, inputs, output):
        entry = {"D_in": inputs[0][0].numel(), "D_out": output[0].numel(), "kind": "other"}
        if isinstance(module, nn.Linear):
            O = module.out_features
            entry.update(kind="param", K=module.in_features, O=O, P=output[0].numel() // O)
        elif isinstance(module, nn.modules.conv._ConvNd):
            O = module.out_channels
            K = module.in_channels // module.groups * math.prod(module.kernel_size)
            entry.update(kind="param", K=K, O=O, P=output[0].numel() // O)
        elif isinstance(module, (nn.Sigmoid, nn.Tanh, nn.ReLU)):
            entry["kind"] = "act"
        layers.append(entry)

    for module in model.modules():
        if not list(module.children()):
            module.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    seen_param = False
    for entry in layers:  # vectors are backpropagated only down to the first parameter
        entry["needs_in"] = seen_param
        seen_param = seen_param or entry["kind"] == "param"
    return layers


def plain_flops(layers: list[dict], N: int) -> float:
    """GEMM flops of forward + backward: per weight layer, 2NPKO for the forward product,
    the same for the weight gradient and again for the input gradient (not for the first
    layer, whose input needs no gradient). Biases and elementwise work are left out."""
    total = 0.0
    for L in layers:
        if L["kind"] == "param":
            total += 2 * N * L["P"] * L["K"] * L["O"] * (3 if L["needs_in"] else 2)
    return total


def extra_flops(ext: str, layers: list[dict], N: int, C: int = NUM_CLASSES) -> tuple[float, str]:
    """Flops an extension adds to forward + backward that no implementation can avoid.

    Per weight layer with fan-in ``K`` (``C_in k_h k_w`` for a convolution), ``O`` outputs
    (channels) and ``P`` positions per sample (1 for ``Linear`` on ``[N, D]``), one
    backward product costs ``W = 2 N P K O`` flops; ``V`` extra vectors per sample
    backpropagated from the loss cost ``V * W`` per layer whose input needs a gradient.
    A symmetric Gram product ``X^T X`` of ``X`` ``[M, d]`` costs ``M d^2`` (half of a GEMM).

    * BatchGrad: per-sample weight gradients, ``N K O`` outer products (``P = 1``) or
      ``W`` (one GEMM over positions per sample, the same flops as the weight gradient).
    * BatchL2: squared norms; ``2 N (K + O)`` for ``P = 1`` (``|g|^2 |x|^2``), otherwise
      the cheaper of per-sample gradients and the position Gram trick ``2 N P^2 (K + O)``.
    * SumGradSquared, Variance: ``(g^2)^T (x^2)``, one GEMM ``2 N K O`` for ``P = 1``,
      else per-sample gradients ``W`` plus their squares ``N K O``.
    * DiagGGNExact (``V = C - 1`` columns of the cross-entropy Hessian's square root,
      whose rank is ``C - 1``), DiagGGNMC
      (``V = 1`` sample): ``V`` backward passes, plus for ``P = 1`` ``N V O`` to reduce the
      squared columns and ``2 N K O`` for the GEMM with ``x^2``; otherwise ``V W`` for
      per-(sample, column) gradients and ``N V K O`` to square and sum them.
    * DiagHessian: at least DiagGGNExact (the residual terms of the activations add more
      columns, dense behind a convolution), so a lower bound.
    * KFAC (``V = 1``), KFLR (``V = C - 1``): ``V`` backward passes plus the Gram products of
      the factors, ``G``: ``N P V O^2``, ``A``: ``N P K^2`` (K-FAC-expand).
    * KFRA: one dense ``[D, D]`` matrix instead of per-sample vectors. Start: the summed
      loss Hessian, ``N C^2``. Through a weight layer: ``J^T H J`` costs ``D_out + D_in``
      one-sample backward products, ``(D_out + D_in) 2 P K O``; through an elementwise
      activation: the Gram of its derivatives ``N D^2``; plus ``A``: ``N P K^2``.
    * the combination: the sum of its three parts (only the unfold could be shared).
    * GGNMP (``PRODUCTS`` columns): per column a Jacobian product ``J v`` and a transposed one
      ``J^T u``, at least one plain forward + backward; a lower bound.
    """
    total, what = 0.0, ""
    weights = [L for L in layers if L["kind"] == "param"]

    def backward(V):  # V vectors per sample through every layer whose input needs a grad
        return sum(V * 2 * N * L["P"] * L["K"] * L["O"] for L in weights if L["needs_in"])

    if ext == COMBO:
        parts = [extra_flops(name, layers, N, C) for name in ("KFAC", "DiagGGNExact", "BatchGrad")]
        return sum(p[0] for p in parts), "sum of KFAC, DiagGGNExact, BatchGrad"
    if ext == "none":
        return 0.0, "nothing"
    if ext in ("GGNMP", "GGN"):  # a lower bound (GGNMP: the blocks repeat the layers above)
        return PRODUCTS * plain_flops(layers, N), f"{PRODUCTS} x (J v and J^T u), one pass each"
    for L in weights:
        K, O, P = L["K"], L["O"], L["P"]
        W = 2 * N * P * K * O
        if ext == "BatchGrad":
            total += N * K * O if P == 1 else W
            what = "per-sample weight gradients (writing N x params floats bounds it)"
        elif ext == "BatchL2":
            total += 2 * N * (K + O) if P == 1 else min(W + N * K * O, 2 * N * P * P * (K + O))
            what = "per-sample gradient norms"
        elif ext in ("SumGradSquared", "Variance"):
            total += 2 * N * K * O if P == 1 else W + N * K * O
            what = "(g^2)^T (x^2) / per-sample gradients squared"
        elif ext in ("DiagGGNExact", "DiagGGNMC", "DiagHessian"):
            V = 1 if ext == "DiagGGNMC" else C - 1
            total += N * V * O + 2 * N * K * O if P == 1 else V * W + N * V * K * O
            what = f"{V} backward pass(es), squared Jacobian columns"
            if ext == "DiagHessian":
                what = "at least DiagGGNExact (residuals add columns)"
        elif ext in ("KFAC", "KFLR"):
            V = 1 if ext == "KFAC" else C - 1
            total += N * P * V * O * O + N * P * K * K
            what = f"{V} backward pass(es), Gram products of G and A"
        elif ext == "KFRA":
            if L["needs_in"]:
                total += (L["D_out"] + L["D_in"]) * 2 * P * K * O
            total += N * P * K * K
            what = "dense [D, D] backprop, activation Grams, A"
        else:
            raise ValueError(ext)
    if ext in ("DiagGGNExact", "DiagGGNMC", "DiagHessian", "KFAC", "KFLR"):
        total += backward(1 if ext in ("DiagGGNMC", "KFAC") else C - 1)
    if ext == "KFRA":
        first = next(i for i, L in enumerate(layers) if L["kind"] == "param")
        total += N * C * C + sum(N * L["D_in"] ** 2 for L in layers[first:] if L["kind"] == "act")
    return total, what


# --------------------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------------------


def worker_command(args, mode: str, arch: str, **extra) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--arch", arch]
    if args.reuse_freed_memory:
        cmd.append("--reuse-freed-memory")
    if args.clear_results:
        cmd.append("--clear-results")
    cmd += ["--batch", str(args.batch), "--repeats", str(args.repeats)]
    cmd += ["--threads", str(args.threads), "--seed", str(args.seed)]
    cmd += ["--timeout", str(args.timeout), "--mem-limit", str(args.mem_limit)]
    for key, value in extra.items():
        cmd += [f"--{key}", value]
    return cmd


def run_worker(cmd: list[str], timeout: float) -> tuple[list[dict], str | None]:
    """The JSON records a worker wrote, and why it ended early (None: it finished)."""
    env = dict(os.environ, OMP_NUM_THREADS=cmd[cmd.index("--threads") + 1])
    if "--reuse-freed-memory" in cmd:  # read by glibc when the child starts
        env.update(REUSE_FREED_MEMORY)
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    problem = None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        out, err = proc.stdout, proc.stderr
        if proc.returncode < 0:
            problem = f"killed by signal {-proc.returncode}"
        elif proc.returncode > 0:
            last = [line for line in err.strip().splitlines() if line.strip()]
            problem = f"exit {proc.returncode}" + (f": {last[-1][:70]}" if last else "")
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        problem = f"timeout (> {timeout:.0f} s)"
    lines = [line for line in out.splitlines() if line.startswith(PREFIX)]
    records = [json.loads(line[len(PREFIX) :]) for line in lines]
    return records, problem


def memory_phase(args, archs, names) -> dict:
    """(arch, lib, ext) -> record of phase 1 (ext None for the plain model)."""
    todo = [(arch, "plain", None) for arch in archs]
    todo += [(arch, lib, ext) for arch in archs for ext in names for lib in PEERS if runs(lib, ext)]

    def one(key):
        arch, lib, ext = key
        cmd = worker_command(args, "memory", arch, lib=lib, ext=ext or "none")
        start = time.perf_counter()
        records, problem = run_worker(cmd, args.timeout)
        record = records[-1] if records else {"status": "failed", "reason": problem or "no output"}
        if problem and not records:
            record["reason"] = problem
        label = LABELS.get(ext, ext) if ext else "plain"
        print(
            f"  memory {arch:5s} {lib:8s} {label:28s} {record['status']:7s} "
            f"{record.get('reason', '')} ({time.perf_counter() - start:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
        return key, record

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        return dict(pool.map(one, todo))


def collect_times(records: list[dict], jobs: list, problem: str | None) -> dict:
    """(lib, ext) -> {"times": [...], "slow": bool} or {"status", "reason"} from a time worker."""
    results: dict = {("plain", None): {"times": []}}
    results.update({job: {"times": []} for job in jobs})
    for r in records:
        job = (r["lib"], r["ext"])
        if "status" in r:
            results[job] = {"status": r["status"], "reason": r["reason"]}
        else:
            results[job]["times"].append(r["seconds"])
            results[job]["slow"] = r.get("slow", False)
    for job, res in results.items():
        if "status" not in res and not res["times"]:
            results[job] = {"status": "failed", "reason": problem or "no timing"}
    return results


def time_phase(args, arch, names, memory) -> dict:
    """(lib, ext) -> {"times": [...], "slow": bool} or {"status", "reason"} for one arch."""
    jobs = [
        (lib, ext)
        for ext in names
        for lib in PEERS
        if runs(lib, ext) and memory[arch, lib, ext]["status"] == "ok"
    ]
    cmd = worker_command(args, "time", arch, cases=json.dumps(jobs))
    start = time.perf_counter()
    limit = 2 * args.timeout * (args.repeats + 1)
    records, problem = run_worker(cmd, limit)
    print(
        f"  time   {arch:5s} {len(jobs)} cases x {args.repeats} repeats "
        f"({time.perf_counter() - start:.1f} s){' ' + problem if problem else ''}",
        file=sys.stderr,
        flush=True,
    )
    results = collect_times(records, jobs, problem)
    results["problem"] = problem
    return results


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}"


def fmt_ratio(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def build_report(args, archs, names, memory, timing) -> tuple[str, dict]:
    """The Markdown report and the numbers behind the chart."""
    import torch

    import hbpkit

    try:
        from importlib.metadata import version

        bp_version = version("backpack-for-pytorch")
    except Exception:  # noqa: BLE001
        bp_version = "?"
    lines = [
        "# hbpkit, BackPACK and curvlinops on the architectures of table S.2",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- machine: {machine()}; load average at the end "
        + ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        f"- torch {torch.__version__}, hbpkit {hbpkit.__version__}, BackPACK {bp_version}, "
        f"python {platform.python_version()}",
        f"- batch {args.batch}, {args.threads} thread(s), float32, CrossEntropyLoss, "
        f"random [B, 3, 32, 32] inputs; median of {args.repeats} interleaved repeats after "
        "one warm-up; "
        + (
            "glibc keeps freed memory for reuse (MALLOC_MMAP_THRESHOLD_ and "
            "MALLOC_TRIM_THRESHOLD_ 2^34, in plain, hbpkit and BackPACK alike); "
            if args.reuse_freed_memory
            else "default glibc allocator (large tensors are fresh pages); "
        )
        + "memory: peak RSS above the built model and data, one fresh process "
        f"per case (limits: {args.mem_limit:g} GB address space, {args.timeout:g} s)",
        "- time ratio: forward + backward with the extension / plain forward + backward "
        "(same process); "
        + (
            "every result dropped before each timed run; "
            if args.clear_results
            else "each timed run replaces the previous run's results, as a training step "
            "does (gradients set to None before it); "
        )
        + "peak MB includes the plain backward's own peak",
        "",
    ]
    chart: dict = {}
    cost_rows: list[str] = []
    for arch in archs:
        res = timing[arch]
        plain_t = (
            statistics.median(res["plain", None]["times"])
            if res["plain", None].get("times")
            else float("nan")
        )
        plain_mem = memory[arch, "plain", None]
        plain_mb = f"{plain_mem['peak_mb']:.0f} MB" if plain_mem["status"] == "ok" else "?"
        lines += [
            f"## {arch}",
            "",
            f"plain forward + backward: {1e3 * plain_t:.1f} ms (median), peak {plain_mb}"
            + (f"; time phase: {res['problem']}" if res.get("problem") else ""),
            "",
            "| extension | hbpkit time ratio | BackPACK time ratio | curvlinops time ratio "
            "| hbpkit/BackPACK | hbpkit/curvlinops | hbpkit peak MB | BackPACK peak MB "
            "| curvlinops peak MB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        layers = layer_shapes(arch)
        base_flops = plain_flops(layers, args.batch)
        chart[arch] = []
        cost_rows += [
            f"### cost model, {arch} (plain forward + backward: {base_flops / 1e9:.3g} GFLOP)",
            "",
            "| extension | extra GFLOP | floor ratio | hbpkit ratio (x floor) "
            "| BackPACK ratio (x floor) | curvlinops ratio (x floor) | counted |",
            "|---|---|---|---|---|---|---|",
        ]
        for ext in names:
            ratios, cells, mems = {}, {}, {}
            for lib in PEERS:
                if not runs(lib, ext):
                    cells[lib], mems[lib], ratios[lib] = "-", "-", None
                    continue
                mem = memory[arch, lib, ext]
                if mem["status"] != "ok":
                    cells[lib] = f"{mem['status']}: {mem['reason']}"
                    mems[lib] = "-"
                    ratios[lib] = None
                    continue
                mems[lib] = f"{mem['peak_mb']:.0f}"
                t = res.get((lib, ext), {"status": "failed", "reason": "not timed"})
                if "status" in t:
                    cells[lib] = f"{t['status']}: {t['reason']}"
                    ratios[lib] = None
                else:
                    ratios[lib] = statistics.median(t["times"]) / plain_t
                    cells[lib] = fmt_ratio(ratios[lib]) + (" (1 run)" if t.get("slow") else "")
            hb, bp, cl = ratios["hbpkit"], ratios["BackPACK"], ratios["curvlinops"]
            rel = f"{hb / bp:.2f}" if hb is not None and bp is not None else "-"
            rel_cl = f"{hb / cl:.2f}" if hb is not None and cl is not None else "-"
            label = LABELS.get(ext, ext)
            lines.append(
                f"| {label} | {cells['hbpkit']} | {cells['BackPACK']} | {cells['curvlinops']} "
                f"| {rel} | {rel_cl} | {mems['hbpkit']} | {mems['BackPACK']} "
                f"| {mems['curvlinops']} |"
            )
            chart[arch].append((label, ratios, cells))
            extra, what = extra_flops(ext, layers, args.batch)
            floor = 1 + extra / base_flops
            bound = "≥ " if ext == "DiagHessian" else ""

            def vs(r, floor=floor):
                return "-" if r is None else f"{fmt_ratio(r)} ({r / floor:.2g})"

            cost_rows.append(
                f"| {label} | {bound}{extra / 1e9:.3g} | {bound}{fmt_ratio(floor)} | {vs(hb)} "
                f"| {vs(bp)} | {vs(cl)} | {what} |"
            )
        lines.append("")
        cost_rows.append("")
    lines += [
        "curvlinops "
        + _curvlinops_version()
        + " computes, in place of an extension: "
        + "; ".join(f"{ext}: `{what}`" for ext, what in CURVLINOPS.items())
        + " (its K-FAC computes the factors of Linear and Conv2d layers only, without the "
        "gradient hbpkit and BackPACK return too; the diagonal estimates are not exact).",
        "",
        "## Cost model",
        "",
        "Floor ratio = 1 + (flops the extension cannot avoid) / (plain forward + backward "
        "GEMM flops), from the layer shapes (`extra_flops` in `benchmarks/architectures.py`); "
        "in parentheses: measured ratio / floor. Flops are not time (GEMM efficiency, "
        "memory traffic), so this is a guide, not a bound.",
        "",
    ] + cost_rows
    return "\n".join(lines), chart


def _curvlinops_version() -> str:
    try:
        from importlib.metadata import version

        return version("curvlinops-for-pytorch")
    except Exception:  # noqa: BLE001
        return "?"


def minor_label(v: float) -> str:
    """Label the minor log ticks 2 and 5 of every decade only."""
    lead = v / 10 ** math.floor(math.log10(v)) if v > 0 else 0
    return f"{v:g}" if round(lead, 6) in (2, 5) else ""


def plot(chart: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    archs = list(chart)
    fig, axes = plt.subplots(len(archs), 1, figsize=(12, 3.6 * len(archs)), squeeze=False)
    colors = {"hbpkit": "tab:blue", "BackPACK": "tab:orange", "curvlinops": "tab:green"}
    for ax, arch in zip(axes[:, 0], archs):
        rows = chart[arch]
        ok = [r for _, ratios, _ in rows for r in ratios.values() if r is not None]
        bottom = min([0.8] + [0.8 * r for r in ok])
        for i, (_label, ratios, cells) in enumerate(rows):
            for j, lib in enumerate(PEERS):
                if cells[lib] == "-":  # no counterpart in this library
                    continue
                x = i + (j - 1) * 0.28
                r = ratios[lib]
                if r is not None:
                    ax.bar(x, r - bottom, 0.26, bottom=bottom, color=colors[lib])
                    ax.text(x, r, f"{r:.2g}", ha="center", va="bottom", fontsize=7)
                else:
                    mark = "R" if cells[lib].startswith("refused") else "X"
                    ax.plot(x, bottom * 1.15, marker="x", color=colors[lib], markersize=9)
                    ax.text(
                        x,
                        bottom * 1.3,
                        mark,
                        ha="center",
                        va="bottom",
                        fontsize=8,
                        color=colors[lib],
                    )
        ax.set_yscale("log")
        ax.set_ylim(bottom=bottom)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(rows)))
        ticks = [label.replace("+", "+\n").replace(", ", ",\n") for label, _, _ in rows]
        ax.set_xticklabels(ticks, fontsize=7)
        ax.set_ylabel("time / plain fwd+bwd")
        ax.set_title(f"{arch}   (x: failed, R: refused by hbpkit's dense budget)", fontsize=9)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: minor_label(v)))
        ax.tick_params(axis="y", which="minor", labelsize=6)
        handles = [Patch(color=colors[lib], label=lib) for lib in PEERS]
        ax.legend(handles=handles, fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_run_arguments(parser: argparse.ArgumentParser, timeout: float) -> None:
    """Options of a measurement run shared with ``benchmarks/scaling.py``, and the hidden
    ones its parent passes to the worker processes."""
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default 2; "
        "--quick: 1, since spinning OpenMP threads on a busy machine crawl)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per case")
    parser.add_argument("--mem-limit", type=float, default=12.0, help="GB address space")
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="memory-phase workers run side by side (RSS is per process; timing always runs alone)",
    )
    parser.add_argument(
        "--clear-results",
        action="store_true",
        help="drop every result before a timed run (default: keep the previous run's, as "
        "in a training loop where each pass replaces them)",
    )
    parser.add_argument("--worker", choices=["memory", "time"], help=argparse.SUPPRESS)
    parser.add_argument("--lib", help=argparse.SUPPRESS)
    parser.add_argument("--ext", help=argparse.SUPPRESS)
    parser.add_argument("--cases", help=argparse.SUPPRESS)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring for how time and memory are measured.",
    )
    parser.add_argument("--arch", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--extensions",
        nargs="+",
        choices=list(EXTENSIONS),
        default=list(EXTENSIONS),
        help="rows to run ('none': extended model, no extension)",
    )
    add_run_arguments(parser, timeout=300.0)
    parser.add_argument(
        "--reuse-freed-memory",
        action="store_true",
        help="run every case with glibc keeping freed memory for reuse "
        "(MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_): no page faults on large tensors",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: batch 8, 1 repeat, fcnn and cnn, 10 s timeout",
    )
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.quick:
        args.batch, args.repeats, args.timeout = 8, 1, 10.0
        args.threads = args.threads or 1
        if args.arch == list(ARCHS):
            args.arch = ["fcnn", "cnn"]
    args.threads = args.threads or 2
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker == "memory":
        return worker_memory(args)
    if args.worker == "time":
        return worker_time(args)

    archs, names = args.arch, args.extensions
    start = time.perf_counter()
    load = os.getloadavg()[0]
    if load + args.threads > (os.cpu_count() or 1) + 0.5:
        print(
            f"warning: load average {load:.1f} on {os.cpu_count()} CPUs: other processes "
            "compete for the cores and the timings are noisy",
            file=sys.stderr,
        )
    print(f"phase 1 (memory, {args.jobs} side by side):", file=sys.stderr, flush=True)
    memory = memory_phase(args, archs, names)
    print("phase 2 (time, one process per architecture):", file=sys.stderr, flush=True)
    timing = {arch: time_phase(args, arch, names, memory) for arch in archs}
    report, chart = build_report(args, archs, names, memory, timing)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark.md").write_text(report + "\n")
    title = f"time / plain forward+backward, batch {args.batch}, {args.threads} thread(s)"
    if args.reuse_freed_memory:
        title += ", freed memory reused (glibc tunables)"
    plot(chart, args.out / "benchmark.png", title)
    raw = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "memory": [{"arch": a, "lib": lib, "ext": e, **rec} for (a, lib, e), rec in memory.items()],
        "time": [
            {"arch": a, "lib": job[0], "ext": job[1], **rec}
            for a, res in timing.items()
            for job, rec in res.items()
            if job != "problem"
        ],
    }
    (args.out / "benchmark.json").write_text(json.dumps(raw, indent=1) + "\n")
    print(report)
    print(
        f"\nwrote {args.out / 'benchmark.md'}, benchmark.png, benchmark.json "
        f"({time.perf_counter() - start:.0f} s)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
