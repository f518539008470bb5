"""Models, data and checks shared by the tests of the quantities (float64).

Every expected value is computed independently by :mod:`reference` (only
``torch.autograd``), on a plain, non-extended copy of the model with the same
parameters, except where the forward pass is random (``Dropout`` in train
mode): there the reference is computed through the very graph hbpkit used.

Tolerances are ``rtol=1e-8, atol=1e-10`` (:data:`TOL`) everywhere except for the
Monte-Carlo convergence checks, which compare relative Frobenius errors.
"""

from __future__ import annotations

import copy

import pytest
import reference as ref
import torch
from torch import nn

import hbpkit.extensions as exts
from hbpkit import backprop, extend

DT = torch.float64
TOL = {"rtol": 1e-8, "atol": 1e-10}

SAVEFIELDS = {
    exts.BatchGrad: "grad_batch",
    exts.BatchL2: "batch_l2",
    exts.SumGradSquared: "sum_grad_squared",
    exts.Variance: "variance",
    exts.DiagGGNExact: "diag_ggn_exact",
    exts.DiagGGNMC: "diag_ggn_mc",
    exts.DiagHessian: "diag_h",
    exts.KFAC: "kfac",
    exts.KFLR: "kflr",
    exts.KFRA: "kfra",
    exts.HBP: "hbp",
}


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


#: one factory per extension that writes a savefield (HBP: the Hessian, batch-averaged)
ALL_EXTENSIONS = (
    *(cls for cls in SAVEFIELDS if cls is not exts.HBP),
    lambda: exts.HBP("hessian", "average", "batch-average"),
)
FIRST_AND_DIAG = (
    exts.BatchGrad,
    exts.BatchL2,
    exts.SumGradSquared,
    exts.Variance,
    exts.DiagGGNExact,
    exts.DiagHessian,
)


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


def kron(factors) -> torch.Tensor:
    """``kron(G, A)`` of two Kronecker factors, or the one factor of a bias."""
    if len(factors) == 1:
        return factors[0]
    return torch.kron(factors[0].contiguous(), factors[1].contiguous())  # (see KroneckerFactors)


def kron_param_names(case: Case):
    return [(p, q, n) for (p, q), (n, _) in zip(case.params(), case.plain.named_parameters())]


def check_factor_shapes(p, factors):
    assert isinstance(factors, tuple)
    if p.dim() == 2:
        assert len(factors) == 2
        assert factors[0].shape == (p.shape[0],) * 2 and factors[1].shape == (p.shape[1],) * 2
    else:
        assert len(factors) == 1 and factors[0].shape == (p.numel(),) * 2


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def assert_nothing_attached(model):
    for name, p in model.named_parameters():
        present = [f for f in SAVEFIELDS.values() if hasattr(p, f)]
        assert not present, f"{name} has {present}"


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
