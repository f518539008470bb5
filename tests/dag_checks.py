"""Checks of every extension on a branching graph against :mod:`dag_reference` (float64).

Shared by ``test_branching.py`` (hand-built residual models) and ``engine/test_fx.py``
(models converted by ``hbpkit.convert``). Tolerances ``rtol=1e-8, atol=1e-10``.
"""

from __future__ import annotations

import dag_reference as dag
import reference as ref
import torch
from torch import nn

import hbpkit.extensions as exts
from hbpkit import backprop, extend

DT = torch.float64
TOL = {"rtol": 1e-8, "atol": 1e-10}
MAX_ERR: dict[str, float] = {}


def close(actual, expected, what):
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    MAX_ERR[what] = max(MAX_ERR.get(what, 0.0), err)
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


EXTENSIONS = [
    exts.BatchGrad(),
    exts.BatchL2(),
    exts.SumGradSquared(),
    exts.Variance(),
    exts.DiagGGNExact(),
    exts.DiagHessian(),
    exts.DiagGGNMC(mc_samples=2),
    exts.KFLR(),
    exts.KFAC(),
    exts.KFRA(),  # exact only at N = 1 (test below); here: it runs, shapes
    exts.HBP("hessian", "exact", "sqrt"),
    exts.GGNMP(),
    exts.HMP(),
    exts.PCHMP("abs"),
]


def randomize_norms(model: nn.Module) -> nn.Module:
    """Random affine parameters and running statistics for the normalization layers,
    BatchNorm in eval mode (its train mode is tested in ``test_normalization.py``)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.eval()
    return model


def layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, dag.PARAMETRIC)]


def check_every_extension(plain: nn.Module, model: nn.Module, X, y, name: str) -> None:
    """All of :data:`EXTENSIONS` in one backward pass of ``model`` against autograd on ``plain``.

    ``plain``: a non-extended copy of ``model`` (same parameters); cross-entropy loss.
    """
    N = X.shape[0]
    loss_fn = nn.CrossEntropyLoss()
    with backprop(*EXTENSIONS):
        extend(loss_fn)(model(X), y).backward()

    t = dag.trace(plain, loss_fn, X, y)
    dag.check_reference(t, loss_fn, y)
    grads = ref.per_sample_grads_loop(plain, loss_fn, X, y, t.params)
    V = {p: torch.randn(2, *p.shape, dtype=DT) for p in t.params}
    blocks = dag.curvature_blocks(t, loss_fn, y, t.params, ("ggn", "hessian", "pch-abs"))
    for i, (p, q, g) in enumerate(zip(t.params, model.parameters(), grads)):
        P = p.numel()
        ggn, hess, pch = blocks["ggn"][i], blocks["hessian"][i], blocks["pch-abs"][i]
        close(q.grad_batch, g, "grad_batch")
        close(q.batch_l2, g.flatten(1).square().sum(1), "batch_l2")
        close(q.sum_grad_squared, g.square().sum(0), "sum_grad_squared")
        close(q.variance, g.square().sum(0) / N - (g.sum(0) / N).square(), "variance")
        close(q.diag_ggn_exact, ggn.diagonal().reshape(p.shape), "diag_ggn_exact")
        close(q.diag_h, hess.diagonal().reshape(p.shape), "diag_h")
        assert q.diag_ggn_mc.shape == p.shape
        v = V[p].reshape(2, P)
        close(q.ggnmp(V[p]).reshape(2, P), v @ ggn, "ggnmp")
        close(q.hmp(V[p]).reshape(2, P), v @ hess, "hmp")
        close(q.pchmp(V[p]).reshape(2, P), v @ pch, "pchmp")

    plain_layers = layers(plain)
    zs = [t.layer_outputs[layer] for layer in plain_layers]
    at_z = dag.curvature_blocks(t, loss_fn, y, zs, ("ggn", "hessian"))
    for i, (layer, q_layer) in enumerate(zip(plain_layers, layers(model))):
        z = zs[i]
        for kind, field in (("ggn", "kflr"), ("hessian", "hbp")):
            G = dag.output_factor(at_z[kind][i], z, layer)
            close(getattr(q_layer.weight, field)[0], G, f"{field} G ({name})")
            close(getattr(q_layer.bias, field)[0], G, f"{field} bias G ({name})")
        assert q_layer.weight.kfac[0].shape == q_layer.weight.kfra[0].shape == G.shape
