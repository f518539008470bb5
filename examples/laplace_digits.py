"""Laplace approximations on sklearn's digits with three curvature backends of laplace-torch.

An MLP and a small CNN are trained briefly on 8x8 digits; then laplace-torch fits
Laplace approximations (``kron`` and ``diag`` Hessian structures, all weights and last
layer) with hbpkit's backend (``hbpkit.integrations.laplace.HbpkitGGN``), laplace's
BackPACK backend (``BackPackGGN``) and its curvlinops backend (``CurvlinopsGGN``), the
prior precision optimised by the marginal likelihood. Printed per setting: test NLL,
accuracy, expected calibration error (ECE, 15 bins) of the probit GLM predictive, and
the median time of ``la.fit`` over interleaved repeats (the backends take turns). A
reliability diagram of the MAP network and hbpkit's Laplace goes to the PNG named by
``--png``.

laplace's curvlinops backend has no ``diag`` of its own: laplace falls back to dense
``torch.func`` Jacobians of all weights (``GGNInterface.diag``), 100 to 1000 times slower
here (16 s for the MLP, 128 s for the CNN, measured once); that cell is left out unless
``--curvlinops-diag`` is given, to keep the run under a minute.

    python3 examples/laplace_digits.py --png build/laplace_digits.png

Needs laplace-torch (``pip install hbpkit[laplace]``); imported through
``examples/_laplace_env.py`` (this project's environment has a CUDA-built torchvision
next to a CPU torch and no opt_einsum).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _laplace_env import import_laplace  # noqa: E402

BINS = 15


def load_digits_split(seed: int = 0):
    """``(X_train, y_train, X_test, y_test)``: sklearn's digits scaled to ``[0, 1]``,
    ``[N, 1, 8, 8]``, a fixed 80 / 20 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return X[perm[:cut]], y[perm[:cut]], X[perm[cut:]], y[perm[cut:]]


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
            nn.Linear(64, 10),
        )  # fmt: skip
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10),
    )  # fmt: skip


def train(model: nn.Module, X: torch.Tensor, y: torch.Tensor, steps: int) -> nn.Module:
    """A brief full-batch Adam run (a MAP estimate with a little weight decay)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model.eval()


def metrics(probs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Test NLL, accuracy and ECE (``BINS`` equal-width confidence bins)."""
    conf, pred = probs.max(1)
    correct = (pred == y).float()
    nll = -probs.gather(1, y[:, None]).clamp_min(1e-12).log().mean()
    ece = 0.0
    edges = torch.linspace(0, 1, BINS + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.float().mean() * (conf[inside].mean() - correct[inside].mean()).abs()
    return {"nll": float(nll), "acc": float(correct.mean()), "ece": float(ece)}


def reliability(probs: torch.Tensor, y: torch.Tensor) -> tuple[list[float], list[float]]:
    """Mean confidence and accuracy of each non-empty bin."""
    conf, pred = probs.max(1)
    correct = (pred == y).float()
    edges = torch.linspace(0, 1, BINS + 1)
    c, a = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            c.append(float(conf[inside].mean()))
            a.append(float(correct[inside].mean()))
    return c, a


def backends() -> dict[str, type]:
    from laplace.curvature import BackPackGGN, CurvlinopsGGN

    from hbpkit.integrations.laplace import HbpkitGGN

    return {"hbpkit": HbpkitGGN, "backpack": BackPackGGN, "curvlinops": CurvlinopsGGN}


def fit_once(laplace, model, loader, structure, subset, backend):
    """``(la, seconds of la.fit)`` on a fresh copy of the trained model."""
    la = laplace.Laplace(
        copy.deepcopy(model),
        "classification",
        subset_of_weights=subset,
        hessian_structure=structure,
        backend=backend,
    )
    start = time.perf_counter()
    la.fit(loader)
    return la, time.perf_counter() - start


def main(
    repeats: int = 3,
    models: tuple[str, ...] = ("mlp", "cnn"),
    steps: int = 150,
    batch_size: int = 256,
    png: str | None = None,
    curvlinops_diag: bool = False,
) -> dict:
    """Fit every setting with every backend ``repeats`` times (interleaved), print the
    table and return ``{(model, subset, structure, backend): row}`` plus the MAP rows."""
    laplace = import_laplace()
    torch.set_num_threads(1)
    X, y, X_test, y_test = load_digits_split()
    loader = DataLoader(TensorDataset(X, y), batch_size=batch_size)
    results: dict = {}
    curves: dict = {}
    for name in models:
        model = train(make_model(name), X, y, steps)
        with torch.no_grad():
            map_probs = torch.softmax(model(X_test), 1)
        results[(name, "MAP")] = metrics(map_probs, y_test)
        curves[(name, "MAP")] = reliability(map_probs, y_test)
        for subset in ("all", "last_layer"):
            for structure in ("kron", "diag"):
                chosen = dict(backends())
                if structure == "diag" and subset == "all" and not curvlinops_diag:
                    del chosen["curvlinops"]  # laplace's torch.func fallback (docstring)
                times: dict[str, list[float]] = {b: [] for b in chosen}
                fitted = {}
                for r in range(repeats):  # the backends take turns, order reversed every
                    order = list(chosen.items())  # other repeat (no one always goes first)
                    for label, backend in order if r % 2 == 0 else order[::-1]:
                        la, seconds = fit_once(laplace, model, loader, structure, subset, backend)
                        times[label].append(seconds)
                        fitted[label] = la
                for label, la in fitted.items():
                    la.optimize_prior_precision(method="marglik", pred_type="glm")
                    probs = la(X_test, pred_type="glm", link_approx="probit").detach()
                    row = metrics(probs, y_test)
                    row["fit_ms"] = 1e3 * statistics.median(times[label])
                    row["prior"] = float(la.prior_precision.mean())
                    results[(name, subset, structure, label)] = row
                    if label == "hbpkit":
                        curves[(name, subset, structure)] = reliability(probs, y_test)
    print_table(results)
    if png is not None:
        plot(curves, png)
    return results


def print_table(results: dict) -> None:
    print(f"{'model':5} {'weights':10} {'H':5} {'backend':10} {'NLL':>7} {'acc':>6} "
          f"{'ECE':>6} {'fit ms':>8} {'prior':>7}")  # fmt: skip
    for key, r in results.items():
        if key[1] == "MAP":
            print(f"{key[0]:5} {'MAP':10} {'':5} {'':10} {r['nll']:7.4f} {r['acc']:6.3f} "
                  f"{r['ece']:6.4f}")  # fmt: skip
            continue
        name, subset, structure, label = key
        print(f"{name:5} {subset:10} {structure:5} {label:10} {r['nll']:7.4f} {r['acc']:6.3f} "
              f"{r['ece']:6.4f} {r['fit_ms']:8.1f} {r['prior']:7.3f}")  # fmt: skip


def plot(curves: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({k[0] for k in curves}, key=["mlp", "cnn"].index)
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        for key, (conf, acc) in curves.items():
            if key[0] != name:
                continue
            label = "MAP" if key[1] == "MAP" else f"Laplace {key[2]}, {key[1]} (hbpkit)"
            ax.plot(conf, acc, "o-", ms=3, label=label)
        ax.set(title=f"digits, {name}", xlabel="confidence", ylabel="accuracy")
        ax.legend(fontsize=7)
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", default=None, help="where to write the reliability diagram")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--curvlinops-diag", action="store_true", help="fit that cell too")
    args = parser.parse_args()
    main(repeats=args.repeats, png=args.png, curvlinops_diag=args.curvlinops_diag)
