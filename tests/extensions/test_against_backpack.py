"""hbpkit against BackPACK 1.7.1, number for number.

Every test builds one small float64 model, deep-copies its state into an
hbpkit-extended and a BackPACK-extended twin, runs one backward pass on the same
data with the corresponding extension in each library and compares what lands
on the parameters.

What BackPACK 1.7.1 supports was found by trying (and confirmed in its source):

* first-order extensions (``BatchGrad``, ``BatchL2Grad``, ``SumGradSquared``,
  ``Variance``): every model and loss used here;
* ``DiagGGNExact`` / ``DiagGGNMC``: every model and loss used here;
* ``DiagHessian``: no ``nn.Identity``;
* ``KFAC`` / ``KFLR`` (and ``HBP`` with ``SQRT`` backprop): only ``ReLU``,
  ``Sigmoid``, ``Tanh`` among the activations (no ``ELU``, ``LeakyReLU``,
  ``SELU``);
* ``KFRA`` (and ``HBP`` with ``BATCH_AVERAGE`` backprop): as ``KFLR``, and
  neither ``nn.Identity`` (its ``ScaleModule`` derivatives lack
  ``ea_jac_t_mat_jac_prod``) nor ``BCEWithLogitsLoss`` (no ``sum_hessian``).

Correspondence of the batch-averaged HBP options, read from
``backpack/extensions/secondorder/hbp/{hbpbase,linear,losses}.py`` and
``backpack/core/derivatives/elementwise.py``: BackPACK starts from the loss
Hessian summed over samples (``LossHessianStrategy.SUM``, i.e. hbpkit's
``loss_hessian="average"``), maps ``H -> 1/N sum_n J_n^T H J_n`` through every
module (``ea_jac_t_mat_jac_prod``) and, for elementwise activations, adds the
residual ``sum_n phi''(x_n) * dL/dz_n`` (``hessian_diagonal(...).sum(0)``)
modified by the curvature type (dropped for ``"ggn"``, kept for
``"hessian"``, ``abs`` / ``clamp(min=0)`` of the *summed* residual for the
PCH variants). Linear weight blocks are ``[H_z, 1/N sum_n x_n x_n^T]``, bias
blocks ``[H_z]``. That is the batch-average recursion of approximation (9), so
``HBP(c, "average", "batch-average")`` is compared with BackPACK's
``HBP(c, SUM, BATCH_AVERAGE, BOTEV_MARTENS)`` (``KFRA`` for ``c="ggn"``).

The Monte-Carlo quantities (``KFAC``, ``DiagGGNMC``) use different random
streams in the two libraries: their deterministic parts (the input factor
``A``, shapes) are compared exactly, and large-sample averages statistically.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass

import backpack.extensions as bpext
import pytest
import torch
from backpack import backpack as bp_backpack
from backpack import extend as bp_extend
from backpack.extensions.secondorder import hbp as bp_hbp
from torch import nn

from hbpkit import backprop, extend
from hbpkit import extensions as hx

pytestmark = [
    # BackPACK's full backward hooks make torch warn when the input needs no
    # gradient; BackPACK also warns about modules an extension skips.
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have an extension for Module:UserWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:backpack.*"),
]

# Acceptance target is agreement to 1e-6; float64 gives far more.
RTOL = 1e-8
ATOL = 1e-10

N = 4  # batch size of the main grid
IN_SHAPE = (2, 3)  # inputs [N, 2, 3], flattened to 6 features


# --------------------------------------------------------------------------
# models, losses, extensions
# --------------------------------------------------------------------------
def _m_sigmoid(c):
    return [nn.Flatten(), nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, c)]


def _m_tanh_relu(c):
    return [nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, c)]


def _m_dropout_eval(c):
    return [
        nn.Flatten(),
        nn.Linear(6, 5),
        nn.Sigmoid(),
        nn.Dropout(p=0.5),  # the model is put in eval mode: identity map
        nn.Linear(5, 4),
        nn.Tanh(),
        nn.Linear(4, c),
    ]


def _m_nobias(c):
    return [nn.Flatten(), nn.Linear(6, 5, bias=False), nn.Sigmoid(), nn.Linear(5, c)]


def _m_identity(c):
    return [nn.Flatten(), nn.Linear(6, 5), nn.Sigmoid(), nn.Identity(), nn.Linear(5, c)]


def _m_elu_leaky_selu(c):
    return [
        nn.Flatten(),
        nn.Linear(6, 5),
        nn.ELU(),
        nn.Linear(5, 4),
        nn.LeakyReLU(0.1),
        nn.Linear(4, 4),
        nn.SELU(),
        nn.Linear(4, c),
    ]


MODELS: dict[str, Callable[[int], list]] = {
    "sigmoid": _m_sigmoid,
    "tanh-relu": _m_tanh_relu,
    "dropout-eval": _m_dropout_eval,
    "nobias": _m_nobias,
    "identity": _m_identity,
    "elu-leakyrelu-selu": _m_elu_leaky_selu,
}

LOSSES = ["mse-mean", "mse-sum", "ce-mean", "ce-sum", "bce-mean", "bce-sum"]


def make_problem(model_id: str, loss_id: str, n: int = N, seed: int = 0):
    """A float64 model (eval mode), data, and a factory for the loss module."""
    kind, reduction = loss_id.split("-")
    c = 1 if kind == "bce" else 3
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(*MODELS[model_id](c)).to(torch.float64).eval()
    X = torch.randn(n, *IN_SHAPE, generator=g, dtype=torch.float64)
    if kind == "mse":
        y = torch.randn(n, c, generator=g, dtype=torch.float64)
        make_loss = lambda: nn.MSELoss(reduction=reduction)  # noqa: E731
    elif kind == "ce":
        y = torch.randint(0, c, (n,), generator=g)
        make_loss = lambda: nn.CrossEntropyLoss(reduction=reduction)  # noqa: E731
    else:
        y = torch.randint(0, 2, (n, 1), generator=g).to(torch.float64)
        make_loss = lambda: nn.BCEWithLogitsLoss(reduction=reduction)  # noqa: E731
    return model, X, y, make_loss


@dataclass
class Ext:
    """One quantity: the hbpkit extension, its BackPACK counterpart, where each saves."""

    hb: Callable
    bp: Callable
    hb_field: str
    bp_field: str
    kron: bool = False
    bp_lacks_modules: tuple = ()
    bp_lacks_losses: tuple = ()
    notes: str = ""


_KRON_MODULES_MISSING = (nn.ELU, nn.LeakyReLU, nn.SELU)
_BA_MODULES_MISSING = _KRON_MODULES_MISSING + (nn.Identity,)
_BA_LOSSES_MISSING = ("bce",)


def _bp_hbp(curv):
    return lambda: bp_hbp.HBP(
        curv_type=curv,
        loss_hessian_strategy=bp_hbp.LossHessianStrategy.SUM,
        backprop_strategy=bp_hbp.BackpropStrategy.BATCH_AVERAGE,
        ea_strategy=bp_hbp.ExpectationApproximation.BOTEV_MARTENS,
    )


EXTS: dict[str, Ext] = {
    "grad_batch": Ext(hx.BatchGrad, bpext.BatchGrad, "grad_batch", "grad_batch"),
    "batch_l2": Ext(hx.BatchL2, bpext.BatchL2Grad, "batch_l2", "batch_l2"),
    "sum_grad_squared": Ext(
        hx.SumGradSquared, bpext.SumGradSquared, "sum_grad_squared", "sum_grad_squared"
    ),
    "variance": Ext(hx.Variance, bpext.Variance, "variance", "variance"),
    "diag_ggn_exact": Ext(hx.DiagGGNExact, bpext.DiagGGNExact, "diag_ggn_exact", "diag_ggn_exact"),
    "diag_h": Ext(
        hx.DiagHessian, bpext.DiagHessian, "diag_h", "diag_h", bp_lacks_modules=(nn.Identity,)
    ),
    "kflr": Ext(
        hx.KFLR, bpext.KFLR, "kflr", "kflr", kron=True, bp_lacks_modules=_KRON_MODULES_MISSING
    ),
    "kfra": Ext(
        hx.KFRA,
        bpext.KFRA,
        "kfra",
        "kfra",
        kron=True,
        bp_lacks_modules=_BA_MODULES_MISSING,
        bp_lacks_losses=_BA_LOSSES_MISSING,
    ),
    "hbp-ggn-exact-sqrt=kflr": Ext(
        lambda: hx.HBP(curvature="ggn", loss_hessian="exact", backprop="sqrt"),
        bpext.KFLR,
        "hbp",
        "kflr",
        kron=True,
        bp_lacks_modules=_KRON_MODULES_MISSING,
    ),
    "hbp-ggn-average-batchavg=kfra": Ext(
        lambda: hx.HBP(curvature="ggn", loss_hessian="average", backprop="batch-average"),
        bpext.KFRA,
        "hbp",
        "kfra",
        kron=True,
        bp_lacks_modules=_BA_MODULES_MISSING,
        bp_lacks_losses=_BA_LOSSES_MISSING,
    ),
    "hbp-hessian-average-batchavg": Ext(
        lambda: hx.HBP(curvature="hessian", loss_hessian="average", backprop="batch-average"),
        _bp_hbp("hessian"),
        "hbp",
        "hbp",
        kron=True,
        bp_lacks_modules=_BA_MODULES_MISSING,
        bp_lacks_losses=_BA_LOSSES_MISSING,
    ),
}

# The PCH variants: BackPACK modifies the batch-summed residual, hbpkit each
# sample's residual. They are compared on their own (see the test_pch_* tests).
PCH_EXTS: dict[str, Ext] = {
    f"hbp-{c}-average-batchavg": Ext(
        (lambda c=c: hx.HBP(curvature=c, loss_hessian="average", backprop="batch-average")),
        _bp_hbp(c),
        "hbp",
        "hbp",
        kron=True,
        bp_lacks_modules=_BA_MODULES_MISSING,
        bp_lacks_losses=_BA_LOSSES_MISSING,
    )
    for c in ("pch-abs", "pch-clip")
}


def backpack_supports(ext: Ext, model_id: str, loss_id: str) -> bool:
    """Whether BackPACK 1.7.1 computes ``ext`` on this model and loss (see module docstring)."""
    modules = nn.Sequential(*MODELS[model_id](3)).modules()
    if any(isinstance(m, ext.bp_lacks_modules) for m in modules):
        return False
    return loss_id.split("-")[0] not in ext.bp_lacks_losses


def _grid(exts, models=MODELS, losses=LOSSES):
    return [
        pytest.param(m, l, e, id=f"{e}-{m}-{l}")
        for e in exts
        for m in models
        for l in losses
        if backpack_supports(exts[e], m, l)
    ]


# --------------------------------------------------------------------------
# running both libraries
# --------------------------------------------------------------------------
def run_hbpkit(model, X, y, make_loss, *exts):
    m = extend(copy.deepcopy(model))
    lossfunc = extend(make_loss())
    loss = lossfunc(m(X), y)
    with backprop(*exts):
        loss.backward()
    return m, loss.detach()


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def run_backpack(model, X, y, make_loss, *exts):
    m = bp_extend(copy.deepcopy(model))
    lossfunc = bp_extend(make_loss())
    loss = lossfunc(m(X), y)
    # BackPACK 1.7.1's MSELoss.sum_hessian builds ``2 * eye(D)`` without a
    # dtype, which breaks KFRA in float64 unless the default dtype matches.
    with default_dtype(X.dtype), bp_backpack(*exts):
        loss.backward()
    return m, loss.detach()


def _max_err(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def assert_tensor_close(actual, expected, what):
    assert isinstance(actual, torch.Tensor), f"{what}: expected a tensor, got {type(actual)}"
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert torch.allclose(actual, expected, rtol=RTOL, atol=ATOL), (
        f"{what}: max abs err {_max_err(actual, expected):.3e}, "
        f"max |expected| {expected.abs().max().item():.3e}"
    )


def assert_kron_close(actual, expected, what):
    assert isinstance(actual, tuple), (
        f"{what}: Kronecker result should be a tuple, got {type(actual)}"
    )
    assert len(actual) == len(expected), (
        f"{what}: {len(actual)} factors, BackPACK has {len(expected)}"
    )
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_tensor_close(a, e, f"{what}[factor {i}]")
    dense_expected = expected[0].contiguous()  # torch.kron fails on some strides (BackPACK's
    for f in expected[1:]:  # factors from torch.einsum contracted by opt_einsum)
        dense_expected = torch.kron(dense_expected, f.contiguous())
    assert_tensor_close(actual.to_dense(), dense_expected, f"{what}.to_dense()")


def compare_models(m_hb, m_bp, hb_field, bp_field, kron, label=""):
    params = list(zip(m_hb.named_parameters(), m_bp.named_parameters()))
    assert params
    for (name, p_hb), (_, p_bp) in params:
        what = f"{label}{name}.{hb_field}"
        if not p_bp.requires_grad:
            assert p_hb.grad is None and not hasattr(p_hb, hb_field), (
                f"frozen {name} got {hb_field}"
            )
            continue
        # hbpkit must leave the ordinary gradient alone
        assert_tensor_close(p_hb.grad, p_bp.grad, f"{name}.grad")
        assert hasattr(p_bp, bp_field), f"BackPACK wrote no {bp_field} on {name}"
        assert hasattr(p_hb, hb_field), f"hbpkit wrote no {hb_field} on {name}"
        expected = getattr(p_bp, bp_field)
        actual = getattr(p_hb, hb_field)
        if kron:
            assert_kron_close(actual, expected, what)
        else:
            assert_tensor_close(actual, expected, what)


# --------------------------------------------------------------------------
# exact quantities
# --------------------------------------------------------------------------
@pytest.mark.parametrize("model_id, loss_id, ext_id", _grid(EXTS))
def test_against_backpack(model_id, loss_id, ext_id):
    ext = EXTS[ext_id]
    model, X, y, make_loss = make_problem(model_id, loss_id)
    m_bp, loss_bp = run_backpack(model, X, y, make_loss, ext.bp())
    m_hb, loss_hb = run_hbpkit(model, X, y, make_loss, ext.hb())
    assert_tensor_close(loss_hb, loss_bp, "loss")
    compare_models(m_hb, m_bp, ext.hb_field, ext.bp_field, ext.kron)


@pytest.fixture
def backpack_pch_per_sample(monkeypatch):
    """Make BackPACK modify each sample's residual before summing over the batch.

    Stock BackPACK 1.7.1 (``HBPBaseModule.second_order_module_effects`` followed by
    ``Curvature.modify_residual``) applies ``abs`` / ``clamp(min=0)`` to
    ``sum_n phi''(x_n) dL/dz_n``; hbpkit (``extensions/messages.py``) modifies each
    sample's ``phi''(x_n) dL/dz_n`` and then sums. The two agree at N = 1. For N > 1
    the reference is BackPACK with this one line changed; BackPACK's own
    modification afterwards is a no-op on the (non-negative) per-sample sum.
    """

    def use(curvature):
        from backpack.extensions.curvature import Curvature
        from backpack.extensions.secondorder.hbp.hbpbase import HBPBaseModule

        def effects(self, module, g_inp, g_out):
            if self.derivatives.hessian_is_zero(module):
                return None
            per_sample = self.derivatives.hessian_diagonal(module, g_inp, g_out)
            return Curvature.modify_residual(per_sample, curvature).sum(0)

        monkeypatch.setattr(HBPBaseModule, "second_order_module_effects", effects)

    return use


PCH_CASES = [
    pytest.param("sigmoid", "ce-mean", id="sigmoid-ce-mean"),
    pytest.param("dropout-eval", "mse-sum", id="dropout-eval-mse-sum"),
    pytest.param("tanh-relu", "ce-sum", id="tanh-relu-ce-sum"),
]


@pytest.mark.parametrize("model_id, loss_id", PCH_CASES)
@pytest.mark.parametrize("ext_id", list(PCH_EXTS))
def test_pch_batch_size_one_against_backpack(ext_id, model_id, loss_id):
    """PCH-abs / PCH-clip, batch-averaged backprop, N = 1: stock BackPACK."""
    ext = PCH_EXTS[ext_id]
    model, X, y, make_loss = make_problem(model_id, loss_id, n=1)
    m_bp, _ = run_backpack(model, X, y, make_loss, ext.bp())
    m_hb, _ = run_hbpkit(model, X, y, make_loss, ext.hb())
    compare_models(m_hb, m_bp, ext.hb_field, ext.bp_field, ext.kron)


@pytest.mark.parametrize("model_id, loss_id", PCH_CASES)
@pytest.mark.parametrize("ext_id", list(PCH_EXTS))
def test_pch_per_sample_residual_against_patched_backpack(
    ext_id, model_id, loss_id, backpack_pch_per_sample
):
    """PCH-abs / PCH-clip, N = 4: BackPACK modifying per-sample residuals (fixture)."""
    ext = PCH_EXTS[ext_id]
    backpack_pch_per_sample(ext_id.split("-average")[0][len("hbp-") :])
    model, X, y, make_loss = make_problem(model_id, loss_id)
    m_bp, _ = run_backpack(model, X, y, make_loss, ext.bp())
    m_hb, _ = run_hbpkit(model, X, y, make_loss, ext.hb())
    compare_models(m_hb, m_bp, ext.hb_field, ext.bp_field, ext.kron)


@pytest.mark.parametrize(
    "model_id, loss_id",
    [
        pytest.param("sigmoid", "ce-mean", id="sigmoid-ce-mean"),
        pytest.param("dropout-eval", "mse-sum", id="dropout-eval-mse-sum"),
    ],
)
def test_several_extensions_in_one_backward(model_id, loss_id):
    """Six quantities at once in each library, one backward pass."""
    ids = ["grad_batch", "batch_l2", "variance", "diag_ggn_exact", "diag_h", "kflr", "kfra"]
    model, X, y, make_loss = make_problem(model_id, loss_id)
    m_bp, _ = run_backpack(model, X, y, make_loss, *[EXTS[i].bp() for i in ids])
    m_hb, _ = run_hbpkit(model, X, y, make_loss, *[EXTS[i].hb() for i in ids])
    for i in ids:
        e = EXTS[i]
        compare_models(m_hb, m_bp, e.hb_field, e.bp_field, e.kron, label=f"[{i}] ")


@pytest.mark.parametrize("ext_id", ["diag_ggn_exact", "kflr", "grad_batch"])
def test_frozen_parameter_gets_nothing(ext_id):
    ext = EXTS[ext_id]
    model, X, y, make_loss = make_problem("sigmoid", "ce-mean")
    model[1].bias.requires_grad_(False)
    m_bp, _ = run_backpack(model, X, y, make_loss, ext.bp())
    m_hb, _ = run_hbpkit(model, X, y, make_loss, ext.hb())
    assert not hasattr(m_bp[1].bias, ext.bp_field)
    assert not hasattr(m_hb[1].bias, ext.hb_field), (
        "a parameter with requires_grad=False got a quantity"
    )
    compare_models(m_hb, m_bp, ext.hb_field, ext.bp_field, ext.kron)


# --------------------------------------------------------------------------
# sampled quantities
# --------------------------------------------------------------------------
SAMPLED_CASES = [
    pytest.param("sigmoid", "ce-mean", id="sigmoid-ce-mean"),
    pytest.param("tanh-relu", "mse-sum", id="tanh-relu-mse-sum"),
    pytest.param("sigmoid", "bce-mean", id="sigmoid-bce-mean"),
]


@pytest.mark.parametrize("model_id, loss_id", SAMPLED_CASES)
def test_kfac_deterministic_parts(model_id, loss_id):
    """KFAC's input factor A is deterministic: exact; G: shape, symmetry."""
    model, X, y, make_loss = make_problem(model_id, loss_id)
    m_bp, _ = run_backpack(model, X, y, make_loss, bpext.KFAC())
    m_hb, _ = run_hbpkit(model, X, y, make_loss, hx.KFAC())
    for (name, p_hb), (_, p_bp) in zip(m_hb.named_parameters(), m_bp.named_parameters()):
        assert_tensor_close(p_hb.grad, p_bp.grad, f"{name}.grad")
        a, e = p_hb.kfac, p_bp.kfac
        assert isinstance(a, tuple) and len(a) == len(e), (
            f"{name}.kfac: {len(a)} factors vs {len(e)}"
        )
        assert a[0].shape == e[0].shape, (
            f"{name}.kfac G shape {tuple(a[0].shape)} != {tuple(e[0].shape)}"
        )
        assert_tensor_close(a[0], a[0].T, f"{name}.kfac G symmetry")
        if len(e) == 2:
            assert_tensor_close(a[1], e[1], f"{name}.kfac A")


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


MC_SAMPLES = 20_000
MC_RTOL = 0.05  # relative Frobenius error; MC error at this M is < 1 %


@pytest.mark.parametrize("model_id, loss_id", SAMPLED_CASES)
def test_kfac_many_samples_against_backpack(model_id, loss_id):
    """Large-sample KFAC: hbpkit, BackPACK and BackPACK's KFLR agree statistically."""
    model, X, y, make_loss = make_problem(model_id, loss_id)
    torch.manual_seed(1)
    m_bp, _ = run_backpack(model, X, y, make_loss, bpext.KFAC(mc_samples=MC_SAMPLES), bpext.KFLR())
    torch.manual_seed(2)
    m_hb, _ = run_hbpkit(model, X, y, make_loss, hx.KFAC(mc_samples=MC_SAMPLES))
    for (name, p_hb), (_, p_bp) in zip(m_hb.named_parameters(), m_bp.named_parameters()):
        G_hb, G_bp, G_exact = p_hb.kfac[0], p_bp.kfac[0], p_bp.kflr[0]
        assert _rel_err(G_bp, G_exact) < MC_RTOL, (
            "BackPACK's own KFAC is off: test is miscalibrated"
        )
        assert _rel_err(G_hb, G_bp) < 2 * MC_RTOL, (
            f"{name}: kfac G vs BackPACK kfac G rel err {_rel_err(G_hb, G_bp):.3e}"
        )
        assert _rel_err(G_hb, G_exact) < MC_RTOL, (
            f"{name}: kfac G vs BackPACK kflr G rel err {_rel_err(G_hb, G_exact):.3e}"
        )


@pytest.mark.parametrize("model_id, loss_id", SAMPLED_CASES)
def test_diag_ggn_mc_many_samples_against_backpack(model_id, loss_id):
    model, X, y, make_loss = make_problem(model_id, loss_id)
    torch.manual_seed(1)
    m_bp, _ = run_backpack(
        model, X, y, make_loss, bpext.DiagGGNMC(mc_samples=MC_SAMPLES), bpext.DiagGGNExact()
    )
    torch.manual_seed(2)
    m_hb, _ = run_hbpkit(model, X, y, make_loss, hx.DiagGGNMC(mc_samples=MC_SAMPLES))
    for (name, p_hb), (_, p_bp) in zip(m_hb.named_parameters(), m_bp.named_parameters()):
        d_hb, d_bp, d_exact = p_hb.diag_ggn_mc, p_bp.diag_ggn_mc, p_bp.diag_ggn_exact
        assert d_hb.shape == d_bp.shape
        assert _rel_err(d_bp, d_exact) < MC_RTOL, (
            "BackPACK's own DiagGGNMC is off: test is miscalibrated"
        )
        assert _rel_err(d_hb, d_bp) < 2 * MC_RTOL, (
            f"{name}: diag_ggn_mc rel err vs BackPACK {_rel_err(d_hb, d_bp):.3e}"
        )
        assert _rel_err(d_hb, d_exact) < MC_RTOL, (
            f"{name}: diag_ggn_mc rel err vs exact {_rel_err(d_hb, d_exact):.3e}"
        )
