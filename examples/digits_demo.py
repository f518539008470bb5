"""hbpkit in one page: curvature from one backward pass, then a Kronecker-preconditioned step.

Runs offline on scikit-learn's 8x8 digits (1,797 images, 10 classes) in a few seconds:

1. one backward pass with ``backprop(KFLR(), DiagGGNExact(), BatchL2())`` on a sigmoid MLP,
   and a short summary of what landed on each parameter;
2. 30 full-batch steps of ``p -= lr * (G kron A + damping I)^{-1} grad`` (KFLR, through
   ``p.kflr.solve``) against 30 steps of plain gradient descent, with the loss curves side
   by side and the accuracy on a held-out split.

    python examples/digits_demo.py
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from hbpkit import backprop, extend
from hbpkit.extensions import KFLR, BatchL2, DiagGGNExact

STEPS = 30
KFLR_LR, KFLR_DAMPING = 0.5, 0.05
SGD_LRS = (0.5, 1.0, 2.0, 5.0, 10.0)  # plain gradient descent gets its best rate from these


def load_data(seed: int = 0):
    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float32)  # pixels 0..16 -> [0, 1]
    y = torch.tensor(digits.target, dtype=torch.long)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)
    return X_tr, X_te, y_tr, y_te


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return extend(nn.Sequential(nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 10)))


def summarize(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> None:
    """One backward pass, three extensions; print what each parameter carries."""
    loss_fn = extend(nn.CrossEntropyLoss())
    loss = loss_fn(model(X), y)
    with backprop(KFLR(), DiagGGNExact(), BatchL2()):
        loss.backward()

    print(f"One backward pass on {len(X)} training images, loss {loss.item():.4f}.")
    print("tr(KFLR) = tr(G) tr(A) approximates tr(GGN) = sum(diag_ggn_exact).\n")
    header = (
        f"{'parameter':<10} {'shape':<9} {'kflr factors':<18} {'tr(KFLR)':>9} "
        f"{'tr(GGN)':>9} {'max diag':>9} {'batch_l2 mean':>13} {'max':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, p in model.named_parameters():
        factors = p.kflr
        trace_kflr = 1.0
        for f in factors:
            trace_kflr *= f.trace().item()
        shapes = " x ".join("x".join(map(str, f.shape)) for f in factors)
        print(
            f"{name:<10} {'x'.join(map(str, p.shape)):<9} {shapes:<18} {trace_kflr:>9.4f} "
            f"{p.diag_ggn_exact.sum().item():>9.4f} {p.diag_ggn_exact.max().item():>9.2e} "
            f"{p.batch_l2.mean().item():>13.2e} {p.batch_l2.max().item():>8.2e}"
        )
    print(f"\n(batch_l2 has one entry per sample: shape {tuple(model[0].weight.batch_l2.shape)}.)")
    model.zero_grad()


def train(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, method: str, lr: float
) -> list[float]:
    """Full-batch steps; ``method`` is ``"sgd"`` or ``"kflr"``. Returns the loss per step."""
    loss_fn = extend(nn.CrossEntropyLoss())
    losses = []
    for _ in range(STEPS):
        model.zero_grad()
        loss = loss_fn(model(X), y)
        if method == "kflr":
            with backprop(KFLR()):
                loss.backward()
        else:
            loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            for p in model.parameters():
                step = p.kflr.solve(p.grad, KFLR_DAMPING) if method == "kflr" else p.grad
                p.sub_(lr * step)
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    out = model(X)
    return nn.functional.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def main() -> dict[str, tuple[float, float]]:
    """Run the demo; returns ``{"gd" | "kflr": (final train loss, test accuracy)}``."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    X_tr, X_te, y_tr, y_te = load_data()
    print(f"digits: {len(X_tr)} training / {len(X_te)} test images of 8x8 pixels, 10 classes\n")

    summarize(make_model(), X_tr, y_tr)

    # plain gradient descent, best rate of a small sweep (same seed, same step count)
    sgd_runs = {}
    for lr in SGD_LRS:
        model = make_model()
        sgd_runs[lr] = (train(model, X_tr, y_tr, "sgd", lr), model)
    sgd_lr = min(sgd_runs, key=lambda lr: sgd_runs[lr][0][-1])
    sgd_losses, sgd_model = sgd_runs[sgd_lr]

    kflr_model = make_model()
    kflr_losses = train(kflr_model, X_tr, y_tr, "kflr", KFLR_LR)

    print(f"\n{STEPS} full-batch steps from the same initialisation.")
    print("Training loss (before each step):")
    col_sgd = f"GD, lr={sgd_lr:g}"
    col_kflr = f"KFLR, lr={KFLR_LR:g}, damping={KFLR_DAMPING:g}"
    print(f"{'step':>4}  {col_sgd:>12}  {col_kflr:>26}")
    for step in list(range(0, STEPS, 3)) + [STEPS - 1]:
        print(f"{step:>4}  {sgd_losses[step]:>12.4f}  {kflr_losses[step]:>26.4f}")

    title = f"after {STEPS} steps"
    print(f"\n{title:<28} {'train loss':>10} {'test loss':>10} {'test accuracy':>14}")
    results = {}
    for key, label, model in (("gd", col_sgd, sgd_model), ("kflr", col_kflr, kflr_model)):
        tr_loss, _ = evaluate(model, X_tr, y_tr)
        te_loss, te_acc = evaluate(model, X_te, y_te)
        print(f"{label:<28} {tr_loss:>10.4f} {te_loss:>10.4f} {100 * te_acc:>12.1f} %")
        results[key] = (tr_loss, te_acc)
    print(f"\n(GD's rate is the best of {SGD_LRS} by final training loss.)")
    return results


if __name__ == "__main__":
    main()
