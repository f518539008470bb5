"""``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` on the generic path (``hbpkit/modules/recurrent.py``).

References (float64, on a plain copy of the model that runs the modules' own fused forward,
only ``torch.autograd``): per-sample gradients from one backward per sample, the Hessian
and the GGN from :mod:`reference` (dense), the product blocks from
``torch.autograd.functional.hessian`` and dense per-sample Jacobians, the PCH block of a
parameter in front of a (frozen) recurrent module from that module's per-sample input
residual ``d2 <f(u_n), dz_n> / du_n^2`` with modified eigenvalues. Tolerances ``rtol=1e-8,
atol=1e-10`` (:data:`quantities.TOL`).
"""

from __future__ import annotations

import copy

import pytest
import reference as ref
import torch
from quantities import DT, Case, assert_nothing_attached, close, first_and_diag_against_plain
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_leaves

from hbpkit import backprop, convert, extend
from hbpkit.extensions import (
    GGNMP,
    HBP,
    HMP,
    KFAC,
    KFLR,
    KFRA,
    PCHMP,
    BatchGrad,
    DiagGGNExact,
    DiagGGNMC,
    SumGradSquared,
)
from hbpkit.modules.recurrent import recurrence

T, C, H, N = 3, 2, 3, 3  # time steps, input features, hidden units, samples

RNNS = {
    "lstm": lambda: nn.LSTM(C, H, batch_first=True),
    "gru": lambda: nn.GRU(C, H, batch_first=True),
    "rnn-tanh": lambda: nn.RNN(C, H, batch_first=True),
    "rnn-relu": lambda: nn.RNN(C, H, nonlinearity="relu", batch_first=True),
    "lstm-2-bi": lambda: nn.LSTM(C, H, num_layers=2, bidirectional=True, batch_first=True),
    "gru-2-bi": lambda: nn.GRU(C, H, num_layers=2, bidirectional=True, batch_first=True),
    "rnn-2-bi": lambda: nn.RNN(C, H, num_layers=2, bidirectional=True, batch_first=True),
    "lstm-proj": lambda: nn.LSTM(C, H, proj_size=2, batch_first=True),
    "lstm-2-bi-proj": lambda: nn.LSTM(
        C, H, num_layers=2, bidirectional=True, proj_size=2, batch_first=True
    ),
    "gru-no-bias": lambda: nn.GRU(C, H, bias=False, batch_first=True),
}


def _width(rnn: nn.Module) -> int:
    proj = getattr(rnn, "proj_size", 0)
    return (2 if rnn.bidirectional else 1) * (proj if proj > 0 else rnn.hidden_size)


class Classifier(nn.Module):
    """``[front Linear ->] rnn -> out[:, -1] (or out.flatten(1)) -> Linear``; ``hx``: an
    initial state computed from the input (no gradient)."""

    def __init__(self, rnn: nn.Module, head: str = "last", front: bool = False, hx=False):
        super().__init__()
        self.front = nn.Linear(C, C) if front else None
        self.rnn = rnn
        width = _width(rnn)
        self.fc = nn.Linear(width if head == "last" else T * width, 3)
        self.head = head
        self.hx = hx

    def forward(self, x):
        if self.front is not None:
            x = self.front(x)
        if self.hx:
            out, _ = self.rnn(x, initial_state(self.rnn, x))
        else:
            out, _ = self.rnn(x)
        return self.fc(out[:, -1] if self.head == "last" else out.flatten(1))


def initial_state(rnn: nn.Module, x: torch.Tensor):
    """A state ``[L * D, N, *]`` that depends on each sample (its first features, squashed)."""
    LD = rnn.num_layers * (2 if rnn.bidirectional else 1)
    proj = getattr(rnn, "proj_size", 0)
    P = proj if proj > 0 else rnn.hidden_size
    base = torch.tanh(x.detach()[:, :, 0]).unsqueeze(0)  # [1, N, T]
    h = base[..., :P].expand(LD, -1, -1).contiguous()
    if isinstance(rnn, nn.LSTM):
        c = (0.5 * base[..., : rnn.hidden_size]).expand(LD, -1, -1).contiguous()
        return h, c
    return h


def case(name: str, head: str = "last", front: bool = False, hx: bool = False, n: int = N):
    return Case(lambda: convert(Classifier(RNNS[name](), head, front, hx)), "ce", "mean", (n, T, C))


# --------------------------------------------------------------------------- the recurrence
FORWARD = {
    **RNNS,
    "lstm-T-first": lambda: nn.LSTM(C, H, num_layers=2, bidirectional=True, proj_size=2),
    "gru-T-first": lambda: nn.GRU(C, H, num_layers=2, bidirectional=True),
    "rnn-relu-T-first-no-bias": lambda: nn.RNN(C, H, nonlinearity="relu", bias=False),
}


@pytest.mark.parametrize("hx", [False, True], ids=["no-hx", "hx"])
@pytest.mark.parametrize("name", FORWARD)
def test_recurrence_equals_the_module(name, hx):
    """Every returned tensor (output, final states) to float64 round-off, with and without
    an initial state, eval mode (dropout between layers off)."""
    torch.manual_seed(0)
    rnn = FORWARD[name]().to(DT)
    if rnn.num_layers > 1:
        rnn.dropout = 0.5
        rnn.eval()
    x = torch.randn(N, T, C, dtype=DT)
    state = initial_state(rnn, x) if hx else None
    if not rnn.batch_first:
        x = x.transpose(0, 1)
    args = [x, state] if hx else [x]
    expected, actual = rnn(*args), recurrence(rnn, {}, args)
    assert type(actual) is type(expected) and len(actual) == 2
    for a, e in zip(tree_leaves(actual), tree_leaves(expected)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-14)


def test_recurrence_uses_the_given_parameters():
    torch.manual_seed(0)
    rnn = nn.LSTM(C, H, batch_first=True, proj_size=2).to(DT)
    twin = copy.deepcopy(rnn)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(N, T, C, dtype=DT)
    params = {k: v.detach() for k, v in twin.named_parameters()}
    for a, e in zip(tree_leaves(recurrence(rnn, params, [x])), tree_leaves(twin(x))):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- quantities
@pytest.mark.parametrize("name", RNNS)
def test_first_order_and_diagonals(name):
    """grad, BatchGrad, BatchL2, SumGradSquared, Variance, DiagGGNExact, DiagHessian of every
    parameter (recurrent and Linear) against per-sample backward passes and dense blocks."""
    first_and_diag_against_plain(case(name))


@pytest.mark.parametrize("name", ["lstm", "gru-2-bi", "rnn-tanh", "lstm-2-bi-proj"])
def test_through_the_recurrence_to_a_front_layer(name):
    """A Linear in front: its curvature passes through the recurrent module (its input
    Jacobian and its dense per-sample residual)."""
    first_and_diag_against_plain(case(name, front=True))


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn-relu"])
def test_all_steps_flattened(name):
    """``fc(out.flatten(1))``: every time step's output reaches the loss."""
    first_and_diag_against_plain(case(name, head="flatten"))


@pytest.mark.parametrize("name", ["lstm-2-bi-proj", "gru", "rnn-2-bi"])
def test_initial_state_given(name):
    """``rnn(x, hx)`` with an ``hx`` that depends on the sample (no gradient)."""
    first_and_diag_against_plain(case(name, hx=True))


# --------------------------------------------------------------------------- products
def _hessian_block(model, loss_fn, X, y, name):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of(p):
        return loss_fn(functional_call(model, {**params, name: p}, (X,)), y)

    p = params[name]
    return torch.autograd.functional.hessian(loss_of, p).reshape(p.numel(), p.numel())


def _ggn_block(model, loss_fn, X, y, name):
    p = dict(model.named_parameters())[name]
    out = model(X)
    O = out[0].numel()
    J = ref.jacobian(out, [p]).reshape(N, O, -1)  # per-sample Jacobians
    H_n = ref.output_hessian_blocks(loss_fn, out, y)
    return sum(J[n].T @ H_n[n] @ J[n] for n in range(N))


@pytest.mark.parametrize("name", ["lstm", "gru-2-bi", "rnn-relu", "lstm-2-bi-proj"])
def test_ggnmp_and_hmp_blocks(name):
    """GGNMP and HMP of every parameter block (recurrent weights included) times random V."""
    c = case(name, front=True)
    c.run(GGNMP(), HMP())
    torch.manual_seed(1)
    for (p, _), (pname, _) in zip(c.params(), c.plain.named_parameters()):
        V = torch.randn(2, *p.shape, dtype=DT)
        for field, block in (("ggnmp", _ggn_block), ("hmp", _hessian_block)):
            B = block(c.plain, c.lf_plain, c.X, c.y, pname)
            expected = (V.reshape(2, -1) @ B).reshape(V.shape)
            close(getattr(p, field)(V), expected, f"{field} {name} {pname}")


def _modified_front_blocks(c: Case, curvature: str) -> dict[str, torch.Tensor]:
    """PCH blocks of the front Linear (frozen recurrent module, linear head): the GGN block
    plus ``sum_n J_n^T m(R_n) J_n``, ``R_n`` the recurrent module's input residual."""
    model, loss_fn, X, y = c.plain, c.lf_plain, c.X, c.y
    front, rnn = model.front, model.rnn
    u = front(X)  # [N, T, C]: the recurrent module's input
    z = rnn(u)[0]
    (dz,) = torch.autograd.grad(loss_fn(model.fc(z[:, -1]), y), [z])  # dL/dz [N, T, D * P]
    blocks = {}
    params = dict(front.named_parameters())
    for pname, p in params.items():
        ggn = _ggn_block(model, loss_fn, X, y, f"front.{pname}")
        block = ggn
        J = ref.jacobian(u, [p]).reshape(N, T * C, -1)  # per-sample d u_n / d p
        for n in range(N):
            R = torch.autograd.functional.hessian(
                lambda v, n=n: (rnn(v.unsqueeze(0))[0][0] * dz[n]).sum(), u[n].detach()
            ).reshape(T * C, T * C)
            values, vectors = torch.linalg.eigh(R)
            values = ref.MODIFY[curvature](values)
            block = block + J[n].T @ (vectors * values) @ vectors.T @ J[n]
        assert (block - ggn).abs().max() > 1e-4, "the residual term is negligible here"
        blocks[f"front.{pname}"] = block
    return blocks


@pytest.mark.parametrize("modify", ["abs", "clip"])
@pytest.mark.parametrize("name", ["lstm", "gru-2-bi"])
def test_pchmp_through_a_frozen_recurrent_module(name, modify):
    """PCHMP modifies the eigenvalues of the recurrent module's dense per-sample residual."""
    c = case(name, front=True)
    for model in (c.plain, c.model):
        model.rnn.requires_grad_(False)
    c.run(PCHMP(modify))
    blocks = _modified_front_blocks(c, f"pch-{modify}")
    torch.manual_seed(1)
    for pname, p in c.model.front.named_parameters():
        V = torch.randn(2, *p.shape, dtype=DT)
        B = blocks[f"front.{pname}"]
        close(p.pchmp(V), (V.reshape(2, -1) @ B).reshape(V.shape), f"pchmp {name} {pname}")
    assert not hasattr(c.model.rnn.weight_ih_l0, "pchmp")


@pytest.mark.parametrize("ext", [KFLR, KFRA])
def test_kronecker_factors_through_a_frozen_recurrent_module_at_batch_size_one(ext):
    """KFLR and KFRA pass through the recurrent module (its Jacobian; KFRA: the generic
    ``ea_jac_t_mat_jac_prod``): at N = 1 the front layer's ``G (x) A`` is its GGN block."""
    front = nn.Sequential(nn.Flatten(), nn.Linear(T * C, T * C), nn.Unflatten(1, (T, C)))

    class Front(nn.Module):
        def __init__(self):
            super().__init__()
            self.front, self.rnn, self.fc = front, nn.GRU(C, H, batch_first=True), nn.Linear(H, 3)

        def forward(self, x):
            out, _ = self.rnn(self.front(x))
            return self.fc(out[:, -1])

    c = Case(lambda: convert(Front()), "ce", "mean", (1, T, C))
    for model in (c.plain, c.model):
        model.rnn.requires_grad_(False)
    c.run(ext())
    field = {KFLR: "kflr", KFRA: "kfra"}[ext]
    for (p, q), (pname, _) in zip(c.params(), c.plain.named_parameters()):
        out = c.plain(c.X)
        J = ref.jacobian(out, [q])
        B = J.T @ ref.loss_hessian_wrt_output(c.lf_plain, out, c.y) @ J
        factors = getattr(p, field)
        approx = torch.kron(factors[0], factors[1]) if len(factors) == 2 else factors[0]
        close(approx, B, f"{field} {pname}")


def test_diag_ggn_mc_converges_to_exact():
    c = case("lstm-2-bi", front=True)
    torch.manual_seed(0)
    c.run(DiagGGNExact(), DiagGGNMC(mc_samples=10_000))
    for (p, _), (pname, _) in zip(c.params(), c.plain.named_parameters()):
        exact = p.diag_ggn_exact.norm()
        if exact == 0:  # e.g. the reverse direction's W_hh under out[:, -1]: one step from 0
            assert p.diag_ggn_mc.norm() == 0, pname
            continue
        err = ((p.diag_ggn_mc - p.diag_ggn_exact).norm() / exact).item()
        assert err < 0.05, (pname, err)


# --------------------------------------------------------------------------- refusals
def _refused(c: Case, ext, *words: str) -> str:
    with pytest.raises(NotImplementedError) as info:
        c.run(ext)
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert_nothing_attached(c.model)
    return message


@pytest.mark.parametrize(
    "make", [KFAC, KFLR, KFRA, lambda: HBP("hessian", "average", "batch-average")]
)
def test_kronecker_factors_are_refused_naming_the_module(make):
    ext = make()
    _refused(case("lstm"), ext, "LSTM 'rnn'", type(ext).__name__)


@pytest.mark.parametrize("modify", ["abs", "clip"])
def test_pchmp_of_recurrent_weights_is_refused_or_exact(modify):
    """PCH of a block nonlinear in its parameter modifies the eigenvalues of its own residual
    ``R_p = H_p - G_p`` (the head is linear, so the output curvature is the GGN's): either
    refused before anything is written, or ``G_p + m(R_p)`` times ``V``."""
    c = case("gru")
    try:
        c.run(PCHMP(modify))
    except NotImplementedError as error:
        assert "GRU" in str(error) and "PCH" in str(error), str(error)
        assert_nothing_attached(c.model)
        return
    torch.manual_seed(1)
    for (p, _), (pname, _) in zip(c.params(), c.plain.named_parameters()):
        G = _ggn_block(c.plain, c.lf_plain, c.X, c.y, pname)
        values, vectors = torch.linalg.eigh(
            _hessian_block(c.plain, c.lf_plain, c.X, c.y, pname) - G
        )
        B = G + (vectors * ref.MODIFY[f"pch-{modify}"](values)) @ vectors.T
        V = torch.randn(2, *p.shape, dtype=DT)
        close(p.pchmp(V), (V.reshape(2, -1) @ B).reshape(V.shape), f"pchmp {pname}")


@pytest.mark.parametrize("ext", [BatchGrad, DiagGGNExact])
def test_batch_first_false_is_refused_naming_the_option(ext):
    class TimeFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.LSTM(C, H), nn.Linear(H, 3)

        def forward(self, x):
            out, _ = self.rnn(x.transpose(0, 1))
            return self.fc(out[-1])

    c = Case(lambda: convert(TimeFirst()), "ce", "mean", (N, T, C))
    _refused(c, ext(), "LSTM 'rnn'", "batch_first=False")


@pytest.mark.parametrize("ext", [SumGradSquared, DiagGGNExact])
def test_dropout_between_layers_in_training_mode_is_refused(ext):
    def build():
        rnn = nn.GRU(C, H, num_layers=2, dropout=0.5, batch_first=True)
        return convert(Classifier(rnn))

    c = Case(build, "ce", "mean", (N, T, C))
    _refused(c, ext(), "GRU 'rnn'", "dropout=0.5", "eval()")


def test_dropout_in_eval_mode_is_exact():
    def build():
        rnn = nn.LSTM(C, H, num_layers=2, dropout=0.5, batch_first=True)
        return convert(Classifier(rnn)).eval()

    first_and_diag_against_plain(Case(build, "ce", "mean", (N, T, C)))


def test_initial_state_with_gradients_is_refused():
    class Learned(nn.Module):
        def __init__(self):
            super().__init__()
            self.h0 = nn.Linear(C, H)
            self.rnn, self.fc = nn.GRU(C, H, batch_first=True), nn.Linear(H, 3)

        def forward(self, x):
            h0 = self.h0(x[:, 0]).unsqueeze(0)
            out, _ = self.rnn(x, h0)
            return self.fc(out[:, -1])

    _refused(Case(lambda: convert(Learned()), "ce", "mean", (N, T, C)), BatchGrad(), "hx")


def test_initial_state_passed_as_keyword_is_exact():
    """``rnn(x, hx=...)``: the keyword is recorded and replayed (first order, diagonals)."""

    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.RNN(C, H, batch_first=True), nn.Linear(H, 3)

        def forward(self, x):
            out, _ = self.rnn(x, hx=initial_state(self.rnn, x))
            return self.fc(out[:, -1])

    first_and_diag_against_plain(Case(lambda: convert(Keyword()), "ce", "mean", (N, T, C)))


def test_final_state_towards_the_loss_is_refused():
    """``h_n`` is not the recorded output: curvature through it is refused, not dropped."""

    class LastState(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.LSTM(C, H, batch_first=True), nn.Linear(H, 3)

        def forward(self, x):
            _, (h, _) = self.rnn(x)
            return self.fc(h[-1])

    c = Case(lambda: convert(LastState()), "ce", "mean", (N, T, C))
    with pytest.raises(NotImplementedError):
        c.run(DiagGGNExact())
    assert_nothing_attached(c.model)


def test_extended_model_forward_is_unchanged():
    c = case("lstm-2-bi-proj", front=True)
    with torch.no_grad():
        close(c.model(c.X), c.plain(c.X), "forward")


def test_float32_long_sequence_passes_the_replay_check():
    """In float32 over 40 steps the fused kernel and the written-out recurrence differ by
    round-off only: no false refusal, per-sample gradients to float32 accuracy."""
    torch.manual_seed(0)
    plain = convert(Classifier(nn.LSTM(C, H, num_layers=2, bidirectional=True, batch_first=True)))
    model = extend(copy.deepcopy(plain))
    X, y = torch.randn(4, 40, C), torch.tensor([0, 1, 2, 0])
    loss_fn = nn.CrossEntropyLoss()
    with backprop(BatchGrad()):
        extend(nn.CrossEntropyLoss())(model(X), y).backward()
    expected = ref.per_sample_grads_loop(plain, loss_fn, X, y, list(plain.parameters()))
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad_batch, g, rtol=1e-4, atol=1e-6)
