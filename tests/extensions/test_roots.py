"""``KroneckerRoots``, ``InputCovariance``, ``EmpiricalKFAC``: roots multiplied out == factors.

The roots must give exactly ``p.kflr`` / ``p.kfac`` (same backward pass, so the same
Monte-Carlo draw), ``g^T a == p.grad`` for ``"expand"``, and the empirical output factor
must equal its definition ``c sum_n (dl_n/dz_n)(dl_n/dz_n)^T`` from autograd.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hbpkit import backprop, extend
from hbpkit.extensions import KFAC, KFLR, EmpiricalKFAC, InputCovariance, KroneckerRoots

DT = torch.float64


def _model(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        X = torch.randn(7, 6)
    elif kind == "linear-positions":  # Linear on [N, T, D]: weight shared over T = 4
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3))
        X = torch.randn(7, 4, 6)
    else:
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(3 * 16, 3)
        )
        X = torch.randn(7, 2, 4, 4)
    return extend(model.to(DT)), X.to(DT), torch.randint(3, (7,))


@pytest.mark.parametrize("kind", ["linear", "linear-positions", "conv"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_roots_multiply_out_to_kflr_and_kfac(kind, approx):
    model, X, y = _model(kind)
    loss_fn = extend(nn.CrossEntropyLoss())
    for loss_hessian, ext, field in (("exact", KFLR, "kflr"), ("sampled", KFAC, "kfac")):
        torch.manual_seed(1)
        roots_ext = KroneckerRoots(loss_hessian, mc_samples=2, kfac_approx=approx)
        other = ext(kfac_approx=approx) if ext is KFLR else ext(2, kfac_approx=approx)
        with backprop(roots_ext, other, InputCovariance(approx)):
            loss_fn(model(X), y).backward()
        for p in model.parameters():
            roots, factors = p.kronecker_roots, getattr(p, field)
            torch.testing.assert_close(roots.output_factor(), factors[0], rtol=1e-12, atol=1e-14)
            if p.dim() == 1:
                assert roots.a is None
                assert torch.equal(p.input_covariance, torch.ones(1, 1, dtype=DT))
                continue
            torch.testing.assert_close(roots.input_factor(), factors[1], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(p.input_covariance, factors[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["linear", "linear-positions", "conv"])
def test_expand_rows_give_the_gradient(kind):
    model, X, y = _model(kind)
    with backprop(KroneckerRoots(None)):
        extend(nn.CrossEntropyLoss())(model(X), y).backward()
    for p in model.parameters():
        r = p.kronecker_roots
        assert r.g_bar is None and r.g.shape[0] == X.shape[0] * r.positions
        expected = r.g.sum(0) if r.a is None else (r.g.T @ r.a).reshape(p.shape)
        torch.testing.assert_close(expected, p.grad, rtol=1e-12, atol=1e-14)


def test_bias_column_folds_the_bias_into_the_weight():
    model, X, y = _model("linear")
    with backprop(KroneckerRoots(None, bias_column=True)):
        extend(nn.CrossEntropyLoss())(model(X), y).backward()
    layer = model[0]
    r = layer.weight.kronecker_roots
    joint = r.g.T @ r.a  # [m, n + 1]: the gradient of [W, b]
    torch.testing.assert_close(joint, torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1))


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum")])
def test_empirical_output_factor_matches_per_sample_gradients(loss_fn):
    model, X, y = _model("linear")
    target = y if isinstance(loss_fn, nn.CrossEntropyLoss) else torch.randn(7, 3, dtype=DT)
    loss_fn = extend(loss_fn)
    outputs = {}
    model[0].register_forward_hook(lambda m, i, o: outputs.__setitem__("z", o))
    with backprop(EmpiricalKFAC(), KroneckerRoots("empirical"), KFLR()):
        out = model(X)
        loss_fn(out, target).backward(retain_graph=True)
    # reference: c sum_n e_n e_n^T, e_n = d l_n / d z_n by autograd (l_n unreduced)
    unreduced = type(loss_fn)(reduction="none")(out, target).reshape(7, -1).sum(1)
    c = 1.0 / 7 if loss_fn.reduction == "mean" else 1.0
    for layer, z in ((model[2], out), (model[0], outputs["z"])):
        e = torch.stack(
            [torch.autograd.grad(unreduced[n], z, retain_graph=True)[0][n] for n in range(7)]
        )
        G_ref = c * e.T @ e
        torch.testing.assert_close(layer.weight.kfac_empirical[0], G_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.bias.kfac_empirical[0], G_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.weight.kfac_empirical[1], layer.weight.kflr[1])
        torch.testing.assert_close(layer.weight.kronecker_roots.output_factor(), G_ref)


def test_roots_refuse_unsupported_modules_and_options_before_writing():
    model = extend(
        nn.Sequential(
            nn.Linear(4, 2 * 9),
            nn.Unflatten(1, (2, 3, 3)),
            nn.ConvTranspose2d(2, 1, 2),
            nn.Flatten(),
        ).to(DT)
    )
    X, y = torch.randn(3, 4, dtype=DT), torch.randint(16, (3,))
    with pytest.raises(NotImplementedError, match="ConvTranspose2d"):
        with backprop(KroneckerRoots("exact")):
            extend(nn.CrossEntropyLoss())(model(X), y).backward()
    assert all(not hasattr(p, "kronecker_roots") for p in model.parameters())
    grouped = extend(nn.Sequential(nn.Conv1d(2, 2, 2, groups=2), nn.Flatten()).to(DT))
    with pytest.raises(NotImplementedError, match="groups=2"):
        with backprop(KroneckerRoots(None)):
            grouped(torch.randn(3, 2, 4, dtype=DT)).sum().backward()
    with pytest.raises(ValueError, match="loss_hessian"):
        KroneckerRoots("average")
    with pytest.raises(ValueError, match="kfac_approx"):
        InputCovariance("mean")
