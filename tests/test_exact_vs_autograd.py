"""hbpkit's quantities against brute-force autograd definitions (float64).

Every expected value is computed independently by :mod:`reference` (only
``torch.autograd``), on a plain, non-extended copy of the model with the same
parameters, except where the forward pass is random (``Dropout`` in train
mode): there the reference is computed through the very graph hbpkit used.

Tolerances are ``rtol=1e-8, atol=1e-10`` everywhere except for the Monte-Carlo
convergence checks, which compare relative Frobenius errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hbpkit import backprop, extend
from hbpkit.extensions import (
    HBP,
    KFAC,
    KFLR,
    KFRA,
    BatchGrad,
    BatchL2,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    SumGradSquared,
    Variance,
)

try:  # tests/ as a package or as a plain directory on sys.path
    from . import reference as ref
except ImportError:
    import reference as ref

DT = torch.float64
TOL = {"rtol": 1e-8, "atol": 1e-10}

SAVEFIELDS = {
    BatchGrad: "grad_batch",
    BatchL2: "batch_l2",
    SumGradSquared: "sum_grad_squared",
    Variance: "variance",
    DiagGGNExact: "diag_ggn_exact",
    DiagGGNMC: "diag_ggn_mc",
    DiagHessian: "diag_h",
    KFAC: "kfac",
    KFLR: "kflr",
    KFRA: "kfra",
    HBP: "hbp",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: intra-op threads only add overhead (and spin for long
    when the machine is busy). Restored when the module is done."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def close(actual, expected, what=""):
    """``assert_close`` with the shared tolerance (also checks dtype and shape)."""
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------- models and data
ACTIVATIONS = {
    "Sigmoid": nn.Sigmoid,
    "Tanh": nn.Tanh,
    "ReLU": nn.ReLU,
    "LeakyReLU": lambda: nn.LeakyReLU(0.1),
    "ELU": nn.ELU,
    "SELU": nn.SELU,
    "CELU": nn.CELU,
    "Softplus": nn.Softplus,
    "LogSigmoid": nn.LogSigmoid,
    "SiLU": nn.SiLU,
    "GELU": nn.GELU,
    "GELU-tanh": lambda: nn.GELU(approximate="tanh"),
    "Hardtanh": nn.Hardtanh,
    "Hardswish": nn.Hardswish,
    "Mish": nn.Mish,
    "Softsign": nn.Softsign,
    "Tanhshrink": nn.Tanhshrink,
}

# Activations hbpkit raises NotImplementedError for. Each one is an expected
# failure with strict=True: when support lands, the test XPASSes and fails, so
# that this set is updated.
UNSUPPORTED_ACTIVATIONS: set[str] = set()


def activation_params(names=None):
    out = []
    for name in names or ACTIVATIONS:
        marks = ()
        if name in UNSUPPORTED_ACTIVATIONS:
            marks = pytest.mark.xfail(
                raises=NotImplementedError, strict=True, reason=f"hbpkit has no rules for {name}"
            )
        out.append(pytest.param(name, marks=marks, id=name))
    return out


LOSSES = ["mse", "ce", "ce-prob", "ce-mass", "bce"]
"""``ce-prob``: probability targets; ``ce-mass``: soft targets that do not sum to one
(PyTorch allows them; the loss Hessian is then ``(sum_k y_k)(diag p - p p^T)``)."""


def make_loss(name: str, reduction: str, out_shape: tuple[int, ...]):
    """A plain loss module and a matching target for network outputs of ``out_shape``."""
    N, C = out_shape[0], out_shape[-1]
    if name == "mse":
        return nn.MSELoss(reduction=reduction), torch.randn(out_shape, dtype=DT)
    if name == "ce":
        return nn.CrossEntropyLoss(reduction=reduction), torch.randint(0, C, (N,))
    if name == "ce-prob":
        return nn.CrossEntropyLoss(reduction=reduction), torch.randn(N, C, dtype=DT).softmax(1)
    if name == "ce-mass":
        return nn.CrossEntropyLoss(reduction=reduction), 2 * torch.rand(N, C, dtype=DT)
    if name == "bce":
        return nn.BCEWithLogitsLoss(reduction=reduction), torch.rand(out_shape, dtype=DT)
    raise ValueError(name)


def mlp(act: str, d_in: int = 5, width: int = 4, out: int = 3) -> nn.Sequential:
    """Two hidden layers, so that curvature passes through an activation twice."""
    f = ACTIVATIONS[act]
    return nn.Sequential(
        nn.Linear(d_in, width), f(), nn.Linear(width, width), f(), nn.Linear(width, out)
    )


class Case:
    """A plain model + loss (for references) and extended deep copies (for hbpkit)."""

    def __init__(self, build, loss: str, reduction: str, x_shape, seed: int = 0):
        torch.manual_seed(seed)
        self.plain = build().double()
        self.X = 1.5 * torch.randn(x_shape, dtype=DT)
        with torch.no_grad():
            out_shape = tuple(self.plain(self.X).shape)
        self.lf_plain, self.y = make_loss(loss, reduction, out_shape)
        self.model = extend(copy.deepcopy(self.plain))
        self.lf = extend(copy.deepcopy(self.lf_plain))

    @property
    def batch_size(self) -> int:
        return self.X.shape[0]

    def params(self):
        """Pairs (hbpkit parameter, plain parameter) with requires_grad."""
        return [
            (p, q)
            for p, q in zip(self.model.parameters(), self.plain.parameters())
            if q.requires_grad
        ]

    def plain_params(self):
        return [q for _, q in self.params()]

    def run(self, *extensions, retain_graph: bool = False):
        """hbpkit's forward and backward pass; returns (output, loss)."""
        out = self.model(self.X)
        loss = self.lf(out, self.y)
        with backprop(*extensions):
            loss.backward(retain_graph=retain_graph)
        return out, loss


FIRST_AND_DIAG = (BatchGrad, BatchL2, SumGradSquared, Variance, DiagGGNExact, DiagHessian)


def check_first_and_diag(pairs, N, grad, grad_batch, H, GGN):
    """Compare the six quantities of ``FIRST_AND_DIAG`` with their definitions.

    ``pairs``: (hbpkit parameter, name); ``grad``, ``grad_batch`` lists aligned
    with ``pairs``; ``H``, ``GGN``: ``[P, P]`` matrices over all parameters.
    """
    params = [p for p, _ in pairs]
    H_blocks, G_blocks = ref.blocks(H, params), ref.blocks(GGN, params)
    for (p, name), g, gb, Hb, Gb in zip(pairs, grad, grad_batch, H_blocks, G_blocks):
        close(p.grad, g, f"{name}.grad")
        close(p.grad_batch, gb, f"{name}.grad_batch")
        close(gb.sum(0), g, f"{name} reference: grad_batch sums to grad")
        close(p.batch_l2, (gb**2).flatten(1).sum(1), f"{name}.batch_l2")
        sgs = (gb**2).sum(0)
        close(p.sum_grad_squared, sgs, f"{name}.sum_grad_squared")
        close(p.variance, sgs / N - (g / N) ** 2, f"{name}.variance")
        close(p.diag_ggn_exact, Gb.diagonal().reshape(p.shape), f"{name}.diag_ggn_exact")
        close(p.diag_h, Hb.diagonal().reshape(p.shape), f"{name}.diag_h")


def first_and_diag_against_plain(case: Case):
    """Run all of ``FIRST_AND_DIAG`` in one backward and check them on the plain copy."""
    case.run(*(e() for e in FIRST_AND_DIAG))
    qs = case.plain_params()
    out = case.plain(case.X)
    loss = case.lf_plain(out, case.y)
    grad = list(torch.autograd.grad(loss, qs, retain_graph=True))
    H = ref.hessian(loss, qs)
    GGN = ref.ggn(out, case.lf_plain, case.y, qs)
    gb = ref.per_sample_grads_loop(case.plain, case.lf_plain, case.X, case.y, qs)
    names = [n for n, q in case.plain.named_parameters() if q.requires_grad]
    pairs = list(zip([p for p, _ in case.params()], names))
    check_first_and_diag(pairs, case.batch_size, grad, gb, H, GGN)


# --------------------------------------------------------------------------- the reference itself
@pytest.mark.parametrize("loss", LOSSES)
def test_reference_is_consistent(loss):
    """The brute-force helpers agree with each other (guards the reference, not hbpkit)."""
    case = Case(lambda: mlp("Tanh"), loss, "mean", (3, 5))
    qs = case.plain_params()
    out = case.plain(case.X)
    H = ref.hessian(case.lf_plain(out, case.y), qs)
    GGN = ref.ggn(out, case.lf_plain, case.y, qs)
    for curvature, expected in (("hessian", H), ("ggn", GGN)):
        M = ref.modified_hessian(case.plain, case.lf_plain, case.X, case.y, qs, curvature)
        for a, b in zip(ref.blocks(M, qs), ref.blocks(expected, qs)):
            close(a, b, curvature)
    assert (H - GGN).abs().max() > 1e-4  # the residual is not trivially zero here
    loop = ref.per_sample_grads_loop(case.plain, case.lf_plain, case.X, case.y, qs)
    graph = ref.per_sample_grads_from_graph(out, case.lf_plain, case.y, qs)
    for a, b in zip(loop, graph):
        close(a, b, "per-sample gradients")
    # batch size 1: the Kronecker definitions reproduce the exact blocks
    one = Case(lambda: mlp("Tanh"), loss, "mean", (1, 5))
    qs = one.plain_params()
    H1 = ref.blocks(ref.hessian(one.lf_plain(one.plain(one.X), one.y), qs), qs)
    G1 = ref.blocks(ref.ggn(one.plain(one.X), one.lf_plain, one.y, qs), qs)
    sqrt = ref.kron_factors_sqrt(one.plain, one.lf_plain, one.X, one.y)
    avg = ref.kron_factors_batch_average(one.plain, one.lf_plain, one.X, one.y, "hessian")
    for q, h, g in zip(qs, H1, G1):
        close(_kron(sqrt[q]), g, "sqrt factors at N=1 == GGN")
        close(_kron(avg[q]), h, "batch-average (hessian) at N=1 == Hessian")
    # per-sample (sqrt) definitions at N=3: ggn == KFLR's, hessian == autograd w.r.t. z
    xs = ref.forward_trace(case.plain, case.X)
    H_z = ref.hessian(case.lf_plain(xs[-1], case.y), [xs[3]])  # output of the 2nd Linear
    M_z = ref.modified_hessian_wrt(xs, case.plain, case.lf_plain, case.y, 2, "hessian")
    close(M_z, H_z, "hessian w.r.t. a layer output")
    kflr = ref.kron_factors_sqrt(case.plain, case.lf_plain, case.X, case.y)
    ggn_sqrt = ref.kron_factors_sqrt_curvature(case.plain, case.lf_plain, case.X, case.y, "ggn")
    for q in case.plain_params():
        for a, b in zip(kflr[q], ggn_sqrt[q]):
            close(a, b, "two KFLR definitions")


def _kron(factors) -> torch.Tensor:
    return torch.kron(factors[0], factors[1]) if len(factors) == 2 else factors[0]


# ------------------------------------------------------------------- first order + diagonals
@pytest.mark.parametrize("N", [1, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", activation_params())
def test_first_order_and_diagonals_mlp(act, loss, reduction, N):
    """grad, grad_batch, batch_l2, sum_grad_squared, variance, diag_ggn_exact, diag_h."""
    first_and_diag_against_plain(Case(lambda: mlp(act), loss, reduction, (N, 5)))


STRUCTURES = {
    "identity": lambda: nn.Sequential(
        nn.Linear(5, 4), nn.Identity(), nn.Tanh(), nn.Identity(), nn.Linear(4, 3)
    ),
    "dropout-eval": lambda: nn.Sequential(
        nn.Linear(5, 4), nn.Sigmoid(), nn.Dropout(0.5), nn.Linear(4, 3)
    ).eval(),
    "relu-inplace": lambda: nn.Sequential(
        nn.Linear(5, 4),
        nn.ReLU(inplace=True),
        nn.Linear(4, 4),
        nn.ReLU(inplace=True),
        nn.Linear(4, 3),
    ),
    "deep-linear": lambda: nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)),
    "no-bias": lambda: nn.Sequential(nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)),
}
SEQ_STRUCTURES = {
    "linear-3d-flatten": lambda: nn.Sequential(
        nn.Linear(4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6, 3)
    ),
}


@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("structure", list(STRUCTURES) + list(SEQ_STRUCTURES))
def test_first_order_and_diagonals_structures(structure, loss, reduction, N):
    build = {**STRUCTURES, **SEQ_STRUCTURES}[structure]
    x_shape = (N, 2, 4) if structure in SEQ_STRUCTURES else (N, 5)
    first_and_diag_against_plain(Case(build, loss, reduction, x_shape))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_dropout_train_mode_uses_the_forward_mask(loss, reduction):
    """Dropout in train mode: the references go through the very graph hbpkit used."""
    case = Case(
        lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 3)),
        loss,
        reduction,
        (4, 5),
    )
    case.model.train()
    torch.manual_seed(123)
    out, loss_value = case.run(*(e() for e in FIRST_AND_DIAG), retain_graph=True)
    with torch.no_grad():
        assert not torch.allclose(out, case.model.eval()(case.X)), "dropout did nothing"
    ps = [p for p, _ in case.params()]
    grad = list(torch.autograd.grad(loss_value, ps, retain_graph=True))
    H = ref.hessian(loss_value, ps)
    GGN = ref.ggn(out, case.lf_plain, case.y, ps)
    gb = ref.per_sample_grads_from_graph(out, case.lf_plain, case.y, ps)
    names = [n for n, _ in case.model.named_parameters()]
    check_first_and_diag(list(zip(ps, names)), case.batch_size, grad, gb, H, GGN)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_dropout_train_mode_kronecker(loss):
    """KFLR and KFRA through Dropout in train mode, references from the same forward trace."""
    case = Case(
        lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 3)),
        loss,
        "mean",
        (4, 5),
    )
    case.model.train()
    torch.manual_seed(123)
    xs = ref.forward_trace(case.model, case.X)  # calls each (extended) layer once
    assert (xs[3] == 0).any(), "dropout did nothing"
    with backprop(KFLR(), KFRA()):
        case.lf(xs[-1], case.y).backward(retain_graph=True)
    args = (case.model, case.lf_plain, case.X, case.y)
    kflr = ref.kron_factors_sqrt(*args, xs=xs)
    kfra = ref.kron_factors_batch_average(*args, "ggn", xs=xs)
    for name, p in case.model.named_parameters():
        for field, expected in (("kflr", kflr), ("kfra", kfra)):
            for i, (a, b) in enumerate(zip(getattr(p, field), expected[p])):
                close(a, b, f"{name}.{field}[{i}]")


def test_each_extension_alone_equals_all_together():
    """One backward with six extensions == six backward passes with one each."""
    case = Case(lambda: mlp("Softplus"), "ce", "mean", (3, 5))
    case.run(*(e() for e in FIRST_AND_DIAG))
    together = {
        (i, e): getattr(p, SAVEFIELDS[e]).clone()
        for i, (p, _) in enumerate(case.params())
        for e in FIRST_AND_DIAG
    }
    for e in FIRST_AND_DIAG:
        fresh = Case(lambda: mlp("Softplus"), "ce", "mean", (3, 5))
        fresh.run(e())
        for i, (p, _) in enumerate(fresh.params()):
            close(getattr(p, SAVEFIELDS[e]), together[(i, e)], f"{e.__name__} alone")
            others = [f for f in SAVEFIELDS.values() if f != SAVEFIELDS[e]]
            assert not any(hasattr(p, f) for f in others)


# --------------------------------------------------------------------------- Kronecker factors
def kron_param_names(case: Case):
    return [(p, q, n) for (p, q), (n, _) in zip(case.params(), case.plain.named_parameters())]


def check_factor_shapes(p, factors):
    assert isinstance(factors, tuple)
    if p.dim() == 2:
        assert len(factors) == 2
        assert factors[0].shape == (p.shape[0],) * 2 and factors[1].shape == (p.shape[1],) * 2
    else:
        assert len(factors) == 1 and factors[0].shape == (p.numel(),) * 2


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", activation_params())
def test_kflr_kfra_batch_one_equal_ggn_block(act, loss, reduction):
    """docs/user-guide.md, Exactness: KFLR, KFRA at N = 1 (no weight sharing) == exact GGN block."""
    case = Case(lambda: mlp(act), loss, reduction, (1, 5))
    case.run(KFLR(), KFRA())
    qs = case.plain_params()
    G_blocks = ref.blocks(ref.ggn(case.plain(case.X), case.lf_plain, case.y, qs), qs)
    for (p, _, name), Gb in zip(kron_param_names(case), G_blocks):
        for field in ("kflr", "kfra"):
            check_factor_shapes(p, getattr(p, field))
            close(getattr(p, field).to_dense(), Gb, f"{name}.{field}")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(
    "act", activation_params(["Sigmoid", "Tanh", "ReLU", "ELU", "GELU", "Mish"])
)
def test_kflr_any_batch_equals_definition(act, loss, reduction):
    """KFLR for N=4: G = sum_n J_n^T H_n J_n (per-sample backprop), A = 1/N sum_n x x^T."""
    case = Case(lambda: mlp(act), loss, reduction, (4, 5))
    case.run(KFLR())
    expected = ref.kron_factors_sqrt(case.plain, case.lf_plain, case.X, case.y)
    for p, q, name in kron_param_names(case):
        assert len(p.kflr) == len(expected[q])
        for i, (a, b) in enumerate(zip(p.kflr, expected[q])):
            close(a, b, f"{name}.kflr[{i}]")


@pytest.mark.parametrize("curvature", ["ggn", "hessian", "pch-abs", "pch-clip"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", activation_params(["Sigmoid", "Tanh", "ReLU", "Softplus"]))
def test_batch_average_any_batch_equals_definition(act, loss, curvature):
    """KFRA, HBP(curvature, "average", "batch-average") at N=4 == the recursion of approx. (9)."""
    case = Case(lambda: mlp(act), loss, "mean", (4, 5))
    field = "kfra" if curvature == "ggn" else "hbp"
    ext = KFRA() if curvature == "ggn" else HBP(curvature, "average", "batch-average")
    case.run(ext)
    expected = ref.kron_factors_batch_average(case.plain, case.lf_plain, case.X, case.y, curvature)
    for p, q, name in kron_param_names(case):
        got = getattr(p, field)
        check_factor_shapes(p, got)
        for i, (a, b) in enumerate(zip(got, expected[q])):
            close(a, b, f"{name}.{field}[{i}]")


@pytest.mark.parametrize("curvature", ["hessian", "pch-abs", "pch-clip"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", activation_params(["Sigmoid", "Tanh", "ELU", "Softsign"]))
def test_hbp_sqrt_any_batch_equals_definition(act, loss, curvature):
    """HBP(curvature, "exact", "sqrt") at N=4: G = sum_n of sample n's (modified) Hessian
    w.r.t. the layer output, A = 1/N sum_n x_n x_n^T."""
    case = Case(lambda: mlp(act), loss, "mean", (4, 5))
    case.run(HBP(curvature, "exact", "sqrt"))
    expected = ref.kron_factors_sqrt_curvature(case.plain, case.lf_plain, case.X, case.y, curvature)
    for p, q, name in kron_param_names(case):
        check_factor_shapes(p, p.hbp)
        for i, (a, b) in enumerate(zip(p.hbp, expected[q])):
            close(a, b, f"{name}.hbp[{i}]")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("curvature", ["ggn", "hessian", "pch-abs", "pch-clip"])
@pytest.mark.parametrize(
    "strategy", [("exact", "sqrt"), ("average", "batch-average")], ids="-".join
)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", activation_params(["Sigmoid", "Tanh", "ELU", "Softsign"]))
def test_hbp_batch_one_equals_modified_hessian(act, loss, strategy, curvature, reduction):
    """HBP at batch size 1 == exact Hessian (``hessian``), GGN (``ggn``), or the Hessian
    with every activation residual replaced by |r| (``pch-abs``) / max(r, 0) (``pch-clip``)."""
    case = Case(lambda: mlp(act), loss, reduction, (1, 5))
    case.run(HBP(curvature, *strategy))
    qs = case.plain_params()
    M = ref.modified_hessian(case.plain, case.lf_plain, case.X, case.y, qs, curvature)
    M = ref.blocks(M, qs)
    if curvature == "hessian":  # the reference against plain autograd
        H = ref.hessian(case.lf_plain(case.plain(case.X), case.y), qs)
        for a, b in zip(M, ref.blocks(H, qs)):
            close(a, b, "reference")
    for (p, _, name), Mb in zip(kron_param_names(case), M):
        check_factor_shapes(p, p.hbp)
        close(p.hbp.to_dense(), Mb, f"{name}.hbp")
        if curvature == "pch-abs":
            assert torch.linalg.eigvalsh(p.hbp.to_dense()).min() > -1e-10, "pch-abs not PSD"


@pytest.mark.parametrize("loss", LOSSES)
def test_relu_net_all_curvatures_coincide_at_batch_one(loss):
    """ReLU has zero residual: GGN == Hessian == PCH blocks (and == autograd's Hessian)."""
    results = {}
    for curvature in ("ggn", "hessian", "pch-abs", "pch-clip"):
        case = Case(lambda: mlp("ReLU"), loss, "mean", (1, 5))
        case.run(HBP(curvature, "exact", "sqrt"))
        results[curvature] = [p.hbp.to_dense() for p, _ in case.params()]
    qs = case.plain_params()
    H = ref.blocks(ref.hessian(case.lf_plain(case.plain(case.X), case.y), qs), qs)
    G = ref.blocks(ref.ggn(case.plain(case.X), case.lf_plain, case.y, qs), qs)
    for i, (h, g) in enumerate(zip(H, G)):
        close(h, g, "reference: ReLU Hessian == GGN")
        for curvature, blocks in results.items():
            close(blocks[i], h, f"param {i} {curvature}")


def test_hessian_residual_matters():
    """Guard: for the smooth nets above, hessian and pch blocks genuinely differ from the GGN."""
    case = Case(lambda: mlp("Tanh"), "ce", "sum", (1, 5))
    qs = case.plain_params()
    H = ref.modified_hessian(case.plain, case.lf_plain, case.X, case.y, qs, "hessian")
    for curvature in ("ggn", "pch-abs", "pch-clip"):
        M = ref.modified_hessian(case.plain, case.lf_plain, case.X, case.y, qs, curvature)
        assert (M[:20, :20] - H[:20, :20]).abs().max() > 1e-4, curvature  # first weight block


@pytest.mark.parametrize("N", [1, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("identity", [False, True])
def test_deep_linear_mse_kflr_kfra_exact_any_batch(identity, reduction, N):
    """Deep linear net + MSE: the loss Hessian (2/(N D) I or 2 I) and the Jacobians B of the
    later layers do not depend on the sample, so the GGN block of every layer (hidden ones
    included) is sum_n B^T H_n B kron x_n x_n^T = [sum_n B^T H_n B] kron [1/N sum_n x_n x_n^T]
    = kron(G, A) for KFLR; KFRA backpropagates the same matrix. Exact for any N."""
    layers = [nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)]
    if identity:
        layers.insert(1, nn.Identity())
    case = Case(lambda: nn.Sequential(*layers), "mse", reduction, (N, 5))
    case.run(KFLR(), KFRA())
    qs = case.plain_params()
    G_blocks = ref.blocks(ref.ggn(case.plain(case.X), case.lf_plain, case.y, qs), qs)
    for (p, _, name), Gb in zip(kron_param_names(case), G_blocks):
        close(p.kflr.to_dense(), Gb, f"{name}.kflr")
        close(p.kfra.to_dense(), Gb, f"{name}.kfra")


def test_deep_nonlinear_kflr_batch_four_is_not_exact():
    """Guard: the exactness above is not a property of every network (sanity of the test)."""
    case = Case(lambda: mlp("Tanh"), "ce", "mean", (4, 5))
    case.run(KFLR())
    qs = case.plain_params()
    Gb = ref.blocks(ref.ggn(case.plain(case.X), case.lf_plain, case.y, qs), qs)
    p = next(iter(case.model.parameters()))
    assert (p.kflr.to_dense() - Gb[0]).abs().max() > 1e-6


@pytest.mark.parametrize("ext_cls", [KFLR, KFRA, KFAC])
def test_hbp_aliases(ext_cls):
    """KFLR == HBP(ggn, exact, sqrt), KFRA == HBP(ggn, average, batch-average),
    KFAC == HBP(ggn, sampled, sqrt) under the same seed."""
    options = {
        KFLR: ("ggn", "exact", "sqrt"),
        KFRA: ("ggn", "average", "batch-average"),
        KFAC: ("ggn", "sampled", "sqrt"),
    }[ext_cls]
    kwargs = {"mc_samples": 3} if ext_cls is KFAC else {}
    a = Case(lambda: mlp("Sigmoid"), "ce", "mean", (3, 5))
    b = Case(lambda: mlp("Sigmoid"), "ce", "mean", (3, 5))
    torch.manual_seed(7)
    a.run(ext_cls(**kwargs))
    torch.manual_seed(7)
    b.run(HBP(*options, **kwargs))
    for (p, _), (q, _) in zip(a.params(), b.params()):
        for i, (x, y) in enumerate(zip(getattr(p, SAVEFIELDS[ext_cls]), q.hbp)):
            close(x, y, f"factor {i}")


# --------------------------------------------------------------------------- weight sharing
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("loss", LOSSES)
def test_linear_on_3d_inputs_kflr_equals_definition(loss, approx):
    """Linear on [N, T, D] (then Flatten): kron(G, A) of KFLR with kfac_approx=expand|reduce."""
    case = Case(SEQ_STRUCTURES["linear-3d-flatten"], loss, "mean", (3, 2, 4))
    case.run(KFLR(kfac_approx=approx))
    expected = ref.kron_factors_weight_sharing(case.plain, case.lf_plain, case.X, case.y, approx)
    for p, q, name in kron_param_names(case):
        close(p.kflr.to_dense(), expected[q], f"{name}.kflr ({approx})")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_on_3d_deep_linear_mse_expand_is_exact(reduction):
    """Deep linear layers applied per position, MSE on [N, T, C]: every position is an
    independent sample with a constant loss Hessian, so K-FAC-expand is the exact GGN block."""
    case = Case(
        lambda: nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), "mse", reduction, (3, 2, 4)
    )
    case.run(KFLR(kfac_approx="expand"))
    qs = case.plain_params()
    G_blocks = ref.blocks(ref.ggn(case.plain(case.X), case.lf_plain, case.y, qs), qs)
    defs = ref.kron_factors_weight_sharing(case.plain, case.lf_plain, case.X, case.y, "expand")
    for (p, q, name), Gb in zip(kron_param_names(case), G_blocks):
        close(defs[q], Gb, f"reference {name}")
        close(p.kflr.to_dense(), Gb, f"{name}.kflr")


# --------------------------------------------------------------------------- Monte Carlo
def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("loss", LOSSES)
def test_kfac_mc_mean_converges_to_kflr(loss):
    case = Case(lambda: mlp("Tanh"), loss, "mean", (4, 5))
    torch.manual_seed(0)
    case.run(KFLR(), KFAC(mc_samples=10_000))
    for p, _, name in kron_param_names(case):
        assert rel_err(p.kfac[0], p.kflr[0]) < 0.05, (name, rel_err(p.kfac[0], p.kflr[0]))
        if p.dim() == 2:
            close(p.kfac[1], p.kflr[1], f"{name}: A does not depend on the sampling")


@pytest.mark.parametrize("loss", LOSSES)
def test_sampled_batch_average_converges_to_kfra(loss):
    """HBP("ggn", "sampled", "batch-average"): the sampled loss Hessian averages to KFRA's."""
    case = Case(lambda: mlp("Tanh"), loss, "mean", (4, 5))
    torch.manual_seed(0)
    case.run(KFRA(), HBP("ggn", "sampled", "batch-average", mc_samples=10_000))
    for p, _, name in kron_param_names(case):
        assert rel_err(p.hbp[0], p.kfra[0]) < 0.05, (name, rel_err(p.hbp[0], p.kfra[0]))
        if p.dim() == 2:
            close(p.hbp[1], p.kfra[1], f"{name}: A does not depend on the sampling")


@pytest.mark.parametrize("loss", LOSSES)
def test_diag_ggn_mc_converges_to_exact(loss):
    case = Case(lambda: mlp("Tanh"), loss, "mean", (4, 5))
    torch.manual_seed(0)
    case.run(DiagGGNExact(), DiagGGNMC(mc_samples=10_000))
    for p, _, name in kron_param_names(case):
        assert rel_err(p.diag_ggn_mc, p.diag_ggn_exact) < 0.05, name


@pytest.mark.parametrize("ext_cls", [KFAC, DiagGGNMC])
def test_mc_is_random_and_seeded(ext_cls):
    """One draw is not the exact value; the same seed reproduces it, another seed does not."""
    field = SAVEFIELDS[ext_cls]
    draws = []
    for seed in (1, 1, 2):
        case = Case(lambda: mlp("Tanh"), "ce", "mean", (4, 5))
        torch.manual_seed(seed)
        case.run(ext_cls(mc_samples=1))
        v = getattr(next(iter(case.model.parameters())), field)
        draws.append(v[0] if isinstance(v, tuple) else v)
    close(draws[0], draws[1], "same seed")
    assert (draws[0] - draws[2]).abs().max() > 1e-6


# --------------------------------------------------------------------------- Kronecker helpers
@pytest.mark.parametrize(
    "field_ext",
    [("kflr", KFLR), ("kfra", KFRA), ("hbp", lambda: HBP("hessian", "average", "batch-average"))],
    ids=["kflr", "kfra", "hbp-hessian"],
)
def test_kronecker_helpers(field_ext):
    """to_dense == kron(G, A) (G for a bias), mv == to_dense @ v, solve == linalg.solve
    with damping; the hessian factors can be indefinite."""
    field, ext_cls = field_ext
    case = Case(lambda: mlp("Sigmoid"), "ce", "sum", (3, 5))
    case.run(ext_cls())
    for p, _, name in kron_param_names(case):
        factors = getattr(p, field)
        dense = factors.to_dense()
        assert dense.shape == (p.numel(), p.numel())
        close(dense, _kron(tuple(factors)), f"{name}.to_dense")
        v = torch.randn_like(p)
        mv = factors.mv(v)
        assert mv.shape == p.shape
        close(mv, (dense @ v.flatten()).reshape(p.shape), f"{name}.mv")
        for damping in (1e-3, 1.0):
            x = factors.solve(v, damping)
            assert x.shape == p.shape
            I = torch.eye(p.numel(), dtype=DT)
            expected = torch.linalg.solve(dense + damping * I, v.flatten()).reshape(p.shape)
            close(x, expected, f"{name}.solve({damping})")
        # documented: a leading batch dimension is allowed
        V = torch.randn(2, *p.shape, dtype=DT)
        close(factors.mv(V), torch.stack([factors.mv(v) for v in V]), f"{name}.mv batched")
        close(
            factors.solve(V, 0.1),
            torch.stack([factors.solve(v, 0.1) for v in V]),
            f"{name}.solve batched",
        )


# --------------------------------------------------------------------------- error paths
ALL_EXTENSIONS = [
    BatchGrad,
    BatchL2,
    SumGradSquared,
    Variance,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    KFAC,
    KFLR,
    KFRA,
    lambda: HBP("hessian", "average", "batch-average"),
]
SECOND_ORDER = ALL_EXTENSIONS[4:]
FIRST_ORDER = ALL_EXTENSIONS[:4]


def _ext_id(e):
    return "HBP" if not isinstance(e, type) else e.__name__


def assert_nothing_attached(model):
    for name, p in model.named_parameters():
        present = [f for f in SAVEFIELDS.values() if hasattr(p, f)]
        assert not present, f"{name} has {present}"


class Cube(nn.Module):
    """A parameter-free module hbpkit has no rules for."""

    def forward(self, x):
        return x**3


class Scale(nn.Module):
    """A module with a parameter of its own that hbpkit has no rules for."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        return x * self.scale


UNSUPPORTED = {"Softmax": lambda: nn.Softmax(dim=1), "Cube": Cube, "Scale": Scale}


def unsupported_in_the_middle(name):
    return lambda: nn.Sequential(nn.Linear(5, 4), UNSUPPORTED[name](), nn.Linear(4, 3))


def softmax_in_the_middle():
    return unsupported_in_the_middle("Softmax")()


def check_names(err, module_name, ext):
    msg = str(err)
    assert module_name in msg and type(ext).__name__ in msg, msg


@pytest.mark.parametrize("module", list(UNSUPPORTED))
@pytest.mark.parametrize("ext", SECOND_ORDER, ids=_ext_id)
def test_unsupported_module_raises_before_writing(ext, module):
    ext = ext()
    case = Case(unsupported_in_the_middle(module), "ce", "mean", (3, 5))
    with pytest.raises(NotImplementedError) as info:
        case.run(ext)
    check_names(info.value, module, ext)
    assert_nothing_attached(case.model)


@pytest.mark.parametrize("ext", FIRST_ORDER, ids=_ext_id)
def test_unsupported_module_with_parameters_first_order_raises(ext):
    """Scale's own parameter needs per-sample rules: no silent gap in the results."""
    ext = ext()
    case = Case(unsupported_in_the_middle("Scale"), "ce", "mean", (3, 5))
    with pytest.raises(NotImplementedError) as info:
        case.run(ext)
    check_names(info.value, "Scale", ext)
    assert_nothing_attached(case.model)


@pytest.mark.parametrize("module", ["Softmax", "Cube"])
@pytest.mark.parametrize("ext", FIRST_ORDER, ids=_ext_id)
def test_parameter_free_unsupported_first_order_raises_or_is_correct(ext, module):
    """First-order quantities need no rules for parameter-free modules: either a clean
    NotImplementedError (as for second order) or the autograd value."""
    ext = ext()
    case = Case(unsupported_in_the_middle(module), "ce", "mean", (3, 5))
    try:
        case.run(ext)
    except NotImplementedError as err:
        check_names(err, module, ext)
        assert_nothing_attached(case.model)
        return
    qs = case.plain_params()
    gb = ref.per_sample_grads_loop(case.plain, case.lf_plain, case.X, case.y, qs)
    for (p, _), g in zip(case.params(), gb):
        expected = {
            "grad_batch": g,
            "batch_l2": (g**2).flatten(1).sum(1),
            "sum_grad_squared": (g**2).sum(0),
            "variance": (g**2).sum(0) / 3 - (g.sum(0) / 3) ** 2,
        }[SAVEFIELDS[type(ext)]]
        close(getattr(p, SAVEFIELDS[type(ext)]), expected, f"through {module}")


class LastStepLSTM(nn.Module):
    """An LSTM (unsupported) reduced to its last hidden state ``[N, 3]``."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 3, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0][:, -1]


@pytest.mark.parametrize("ext", ALL_EXTENSIONS, ids=_ext_id)
def test_unsupported_lstm_raises_before_writing(ext):
    """LSTM -> Tanh -> Linear: the error names the LSTM and the extension."""
    ext = ext()
    case = Case(
        lambda: nn.Sequential(LastStepLSTM(), nn.Tanh(), nn.Linear(3, 3)), "ce", "mean", (3, 2, 4)
    )
    with pytest.raises(NotImplementedError) as info:
        case.run(ext)
    check_names(info.value, "LSTM", ext)
    assert_nothing_attached(case.model)


@pytest.mark.parametrize("ext", ALL_EXTENSIONS, ids=_ext_id)
def test_lstm_parameters_are_not_silently_skipped(ext):
    """LSTM -> Linear: the LSTM's parameters require grad and feed the loss, so either the
    whole backward raises NotImplementedError (nothing written) or every one of them gets
    its quantity (docs/design.md, Principles: no half-written results)."""
    ext = ext()
    case = Case(lambda: nn.Sequential(LastStepLSTM(), nn.Linear(3, 3)), "ce", "mean", (3, 2, 4))
    field = SAVEFIELDS[type(ext)]
    try:
        case.run(ext)
    except NotImplementedError:  # the message is checked in the test above
        assert_nothing_attached(case.model)
        return
    missing = [n for n, p in case.model.named_parameters() if not hasattr(p, field)]
    assert not missing, f"no error, but no {field} on {missing}"


def test_model_not_extended_raises():
    """Extended loss, plain model: the network is invisible to hbpkit."""
    case = Case(lambda: mlp("Tanh"), "ce", "mean", (3, 5))
    loss = case.lf(case.plain(case.X), case.y)
    with pytest.raises((RuntimeError, ValueError, NotImplementedError)) as info:
        with backprop(KFLR()):
            loss.backward()
    assert str(info.value)
    assert_nothing_attached(case.plain)


def test_loss_not_extended_raises():
    """Extended model, plain loss: no loss Hessian to start from."""
    case = Case(lambda: mlp("Tanh"), "ce", "mean", (3, 5))
    loss = case.lf_plain(case.model(case.X), case.y)
    with pytest.raises((RuntimeError, ValueError, NotImplementedError)) as info:
        with backprop(KFLR()):
            loss.backward()
    assert str(info.value)
    assert_nothing_attached(case.model)


def test_nothing_extended_raises_or_computes_nothing():
    """Neither model nor loss extended: an error, or at least no (wrong) quantity."""
    case = Case(lambda: mlp("Tanh"), "ce", "mean", (3, 5))
    loss = case.lf_plain(case.plain(case.X), case.y)
    try:
        with backprop(KFLR()):
            loss.backward()
    except (RuntimeError, ValueError, NotImplementedError) as err:
        assert str(err)
    assert_nothing_attached(case.plain)


@pytest.mark.parametrize(
    "make",
    [
        lambda: HBP(curvature="foo"),
        lambda: HBP("ggn", "foo", "sqrt"),
        lambda: HBP("ggn", "exact", "foo"),
        lambda: HBP("ggn", "average", "sqrt"),
        lambda: HBP("ggn", "exact", "batch-average"),
        lambda: HBP("ggn", "sampled", "sqrt", mc_samples=0),
        lambda: KFAC(mc_samples=0),
        lambda: KFAC(mc_samples=-1),
        lambda: DiagGGNMC(mc_samples=0),
        lambda: KFLR(kfac_approx="foo"),
    ],
    ids=[
        "curvature",
        "loss_hessian",
        "backprop",
        "average-sqrt",
        "exact-batch-average",
        "hbp-mc0",
        "kfac-mc0",
        "kfac-mc-neg",
        "diagggnmc-mc0",
        "kfac_approx",
    ],
)
def test_bad_options_raise_value_error(make):
    with pytest.raises(ValueError) as info:
        make()
    assert str(info.value)


@pytest.mark.parametrize(
    "make_loss_fn",
    [
        lambda: nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=DT)),
        lambda: nn.CrossEntropyLoss(ignore_index=0),
        lambda: nn.CrossEntropyLoss(label_smoothing=0.1),
    ],
    ids=["weight", "ignore_index", "label_smoothing"],
)
def test_unsupported_loss_options_raise(make_loss_fn):
    torch.manual_seed(0)
    model = extend(mlp("Tanh").double())
    X, y = torch.randn(4, 5, dtype=DT), torch.tensor([0, 1, 2, 0])
    with pytest.raises(NotImplementedError):
        lf = extend(make_loss_fn())
        with backprop(DiagGGNExact()):
            lf(model(X), y).backward()
    assert_nothing_attached(model)


@pytest.mark.parametrize("option", ["weight", "pos_weight"])
def test_bce_weights_raise_or_are_correct(option):
    """Not in the contract: either NotImplementedError or the right diag_ggn_exact."""
    w = torch.tensor([1.0, 2.0, 0.5], dtype=DT)
    case = Case(lambda: mlp("Tanh"), "bce", "mean", (3, 5))
    case.lf_plain = nn.BCEWithLogitsLoss(**{option: w})
    try:
        case.lf = extend(copy.deepcopy(case.lf_plain))
        case.run(DiagGGNExact())
    except NotImplementedError:
        assert_nothing_attached(case.model)
        return
    qs = case.plain_params()
    G = ref.blocks(ref.ggn(case.plain(case.X), case.lf_plain, case.y, qs), qs)
    for (p, _), Gb in zip(case.params(), G):
        close(p.diag_ggn_exact, Gb.diagonal().reshape(p.shape), option)


def test_frozen_parameter_gets_nothing():
    case = Case(lambda: mlp("Tanh"), "mse", "mean", (3, 5))
    case.model[0].weight.requires_grad_(False)
    case.plain[0].weight.requires_grad_(False)
    exts = [e() for e in ALL_EXTENSIONS]
    case.run(*exts)
    assert not any(hasattr(case.model[0].weight, f) for f in SAVEFIELDS.values())
    qs = case.plain_params()
    G = ref.blocks(ref.ggn(case.plain(case.X), case.lf_plain, case.y, qs), qs)
    for (p, _), Gb in zip(case.params(), G):
        close(
            p.diag_ggn_exact, Gb.diagonal().reshape(p.shape), "diag_ggn_exact with a frozen layer"
        )


def test_context_exits_cleanly_after_exception():
    case = Case(lambda: mlp("Tanh"), "mse", "mean", (3, 5))
    with pytest.raises(KeyError):
        with backprop(KFLR(), BatchGrad()):
            raise KeyError("inside")
    # a later plain backward computes nothing extra
    case.lf(case.model(case.X), case.y).backward()
    assert_nothing_attached(case.model)
    # an exception raised by hbpkit during backward does not leave a context behind either
    bad = Case(softmax_in_the_middle, "ce", "mean", (3, 5))
    with pytest.raises(NotImplementedError):
        bad.run(KFLR())
    case.lf(case.model(case.X), case.y).backward()
    assert_nothing_attached(case.model)
    # and a new context still works
    case.run(KFLR())
    assert all(hasattr(p, "kflr") for p in case.model.parameters())


def test_nested_contexts():
    """The innermost context is the active one (as in BackPACK); leaving it restores the outer."""
    case = Case(lambda: mlp("Tanh"), "mse", "mean", (3, 5))
    with backprop(BatchGrad()):
        with backprop(KFLR()):
            case.lf(case.model(case.X), case.y).backward()
        for p in case.model.parameters():
            assert hasattr(p, "kflr") and not hasattr(p, "grad_batch")
        case.lf(case.model(case.X), case.y).backward()
    qs = case.plain_params()
    gb = ref.per_sample_grads_loop(case.plain, case.lf_plain, case.X, case.y, qs)
    for (p, _), g in zip(case.params(), gb):
        close(p.grad_batch, g, "outer context after the inner one closed")
    for p in case.model.parameters():
        del p.grad_batch, p.kflr
    case.lf(case.model(case.X), case.y).backward()
    assert_nothing_attached(case.model)


def _hook_count(model):
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {}))
        for m in model.modules()
    )


def test_extend_is_idempotent():
    case = Case(lambda: mlp("Tanh"), "ce", "mean", (3, 5))
    n_hooks = _hook_count(case.model)
    assert extend(case.model) is case.model
    assert extend(case.lf) is case.lf
    assert _hook_count(case.model) == n_hooks
    first_and_diag_against_plain(case)
    # and again, after one more extend
    extend(case.model)
    for p in case.model.parameters():
        p.grad = None
    first_and_diag_against_plain(case)


def test_no_active_extension_attaches_nothing():
    case = Case(lambda: mlp("Tanh"), "ce", "mean", (3, 5))
    case.lf(case.model(case.X), case.y).backward()
    assert_nothing_attached(case.model)
    loss = case.lf_plain(case.plain(case.X), case.y)
    for (p, _), g in zip(case.params(), torch.autograd.grad(loss, case.plain_params())):
        close(p.grad, g, "plain backward through an extended model")
