"""A next-token loss through ``MergeBatch`` (``logits.view(-1, C)``), against autograd (float64).

The model ends in logits ``[N, T, C]``; ``MergeBatch`` gives ``[N T, C]`` to the loss, whose
``ignore_index`` is hit by some targets and which has class weights. The model's samples are
the ``N`` sequences: every quantity is checked against its definition per sequence, on a
plain copy of the model without ``MergeBatch`` (the loss then reshapes inside the reference;
the ``"ce-dense"`` case has no merge: the same loss on K-dimensional logits ``[N, C, T]``):

* ``grad_batch[n]``: the gradient of the loss through sequence ``n`` only (the outputs of
  the other sequences detached);
* the GGN ``J^T H J`` and the Hessian of the parameters, with ``H`` the dense loss Hessian
  w.r.t. all logits (not assumed block-diagonal);
* Kronecker factors from the per-sequence Jacobians of the logits w.r.t. each layer output
  and the per-sequence blocks of ``H`` (Eschenhagen et al. 2023, ``expand`` / ``reduce``).
"""

from __future__ import annotations

import copy

import pytest
import reference as ref
import torch
from quantities import close, rel_err
from torch import nn

from hbpkit import backprop, extend
from hbpkit.extensions import (
    GGNMP,
    HMP,
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
from hbpkit.reshaping import MergeBatch

DT = torch.float64
N, T, D, H, C = 3, 4, 3, 5, 4


def _ce_targets():
    y = torch.randint(0, C, (N, T))
    y[0, 1] = y[2, 3] = y[1, 0] = -1  # ignored
    return y.reshape(-1)


class TokenCase:
    """``Linear -> Tanh -> Linear`` on ``[N, T, D]``, then ``tail`` and the loss on ``[N T, C]``.

    ``kind``: ``"ce"`` (MergeBatch right before a weighted CE with ``ignore_index=-1``),
    ``"mse-tanh"`` (MergeBatch, then ``Tanh``: its residual reaches MergeBatch as a
    diagonal factor, then MSE) or ``"ce-dense"`` (no MergeBatch: ``Conv1d`` layers on
    ``[N, D, T]`` and the same CE on the K-dimensional logits ``[N, C, T]``).
    """

    def __init__(self, kind: str, reduction: str = "mean", seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.kind = kind
        self.body = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C)).double()
        self.X = torch.randn(N, T, D, dtype=DT)
        if kind == "ce-dense":
            self.body = nn.Sequential(nn.Conv1d(D, H, 1), nn.Tanh(), nn.Conv1d(H, C, 1)).double()
            self.X = self.X.transpose(1, 2).contiguous()
            weight = torch.rand(C, dtype=DT) + 0.5
            self.loss_fn = nn.CrossEntropyLoss(weight=weight, ignore_index=-1, reduction=reduction)
            self.y = _ce_targets().reshape(N, T)
            self.model = extend(copy.deepcopy(self.body))
            self.lf = extend(copy.deepcopy(self.loss_fn))
            self.tail = []
            return
        if kind == "ce":
            weight = torch.rand(C, dtype=DT) + 0.5
            self.loss_fn = nn.CrossEntropyLoss(weight=weight, ignore_index=-1, reduction=reduction)
            self.y = _ce_targets()
            self.tail: list[nn.Module] = []
        else:
            self.loss_fn = nn.MSELoss(reduction=reduction)
            self.y = torch.randn(N * T, C, dtype=DT)
            self.tail = [nn.Tanh()]
        self.model = extend(nn.Sequential(*copy.deepcopy(self.body), MergeBatch(), *self.tail))
        self.lf = extend(copy.deepcopy(self.loss_fn))

    # hbpkit
    def run(self, *extensions) -> None:
        loss = self.lf(self.model(self.X), self.y)
        with backprop(*extensions):
            loss.backward()

    def params(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    # references on the plain body: logits [N, T, C] -> loss
    def network_output(self, logits: torch.Tensor) -> torch.Tensor:
        """The tail (after the merge) on the logits: the network output ``[N T, C]``."""
        if self.kind == "ce-dense":
            return logits
        z = logits.reshape(-1, C)
        for m in self.tail:
            z = m(z)
        return z

    def loss_of_logits(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.network_output(logits), y)

    def plain_params(self) -> list[torch.Tensor]:
        return list(self.body.parameters())

    def grad_batch(self) -> list[torch.Tensor]:
        """Per sequence: the gradient of the loss with only sequence ``n``'s logits attached."""
        qs = self.plain_params()
        per = []
        for n in range(N):
            out = self.body(self.X)
            mask = torch.zeros(N, 1, 1, dtype=DT)
            mask[n] = 1
            logits = mask * out + (1 - mask) * out.detach()
            per.append(torch.autograd.grad(self.loss_of_logits(logits, self.y), qs))
        return [torch.stack([g[i] for g in per]) for i in range(len(qs))]

    def matrices(self) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Gradient, Hessian and GGN ``[P, P]`` of all parameters."""
        qs = self.plain_params()
        out = self.body(self.X)
        loss = self.loss_of_logits(out, self.y)
        grad = list(torch.autograd.grad(loss, qs, retain_graph=True))
        GGN = ref.ggn(self.network_output(out), self.loss_fn, self.y, qs)
        return grad, ref.hessian(loss, qs), GGN

    def kron_reference(self, approx: str) -> list[torch.Tensor]:
        """``kron(G, A)`` per weight and ``G`` per bias (both Linear layers)."""
        lin1, act, lin2 = self.body
        z1 = lin1(self.X)
        a1 = act(z1)
        out = lin2(a1)
        Hfull = ref.loss_hessian_wrt_output(self.loss_of_logits, out, self.y)
        Hfull = Hfull.reshape(N, T * C, N, T * C)
        result = []
        for x, z in ((self.X, z1), (a1, out)):
            J = ref.jacobian(out, [z]).reshape(N, T * C, N, T, z.shape[-1])
            if approx == "expand":
                G = sum(
                    J[n, :, n, t].T @ Hfull[n, :, n] @ J[n, :, n, t]
                    for n in range(N)
                    for t in range(T)
                )
                xf = x.detach().reshape(N * T, -1)
                A = xf.T @ xf / (N * T)
            else:
                G = sum(J[n, :, n].sum(1).T @ Hfull[n, :, n] @ J[n, :, n].sum(1) for n in range(N))
                xbar = x.detach().mean(1)
                A = xbar.T @ xbar / N
            result += [torch.kron(G, A), G]
        return result


def _kron(p, field):
    factors = getattr(p, field)
    return torch.kron(factors[0], factors[1]) if len(factors) == 2 else factors[0]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["ce", "mse-tanh", "ce-dense"])
def test_first_order_and_diagonals_per_sequence(kind, reduction):
    """Per-sequence gradients and statistics, GGN and Hessian diagonals: their definitions."""
    case = TokenCase(kind, reduction)
    case.run(BatchGrad(), BatchL2(), SumGradSquared(), Variance(), DiagGGNExact(), DiagHessian())
    grad, Hmat, GGN = case.matrices()
    gb = case.grad_batch()
    qs = case.plain_params()
    Hb, Gb = ref.blocks(Hmat, qs), ref.blocks(GGN, qs)
    for i, p in enumerate(case.params()):
        close(gb[i].sum(0), grad[i], "reference: the sequences' gradients sum to the gradient")
        close(p.grad, grad[i], "grad")
        close(p.grad_batch, gb[i], "grad_batch")
        close(p.batch_l2, gb[i].flatten(1).square().sum(1), "batch_l2")
        sgs = gb[i].square().sum(0)
        close(p.sum_grad_squared, sgs, "sum_grad_squared")
        close(p.variance, sgs / N - (grad[i] / N) ** 2, "variance")
        close(p.diag_ggn_exact, Gb[i].diagonal().reshape(p.shape), "diag_ggn_exact")
        close(p.diag_h, Hb[i].diagonal().reshape(p.shape), "diag_h")


@pytest.mark.parametrize("kind", ["ce", "mse-tanh", "ce-dense"])
def test_products_per_sequence(kind):
    """GGNMP and HMP through MergeBatch: the dense GGN and Hessian blocks times ``V``."""
    case = TokenCase(kind)
    case.run(GGNMP(), HMP())
    _, Hmat, GGN = case.matrices()
    qs = case.plain_params()
    torch.manual_seed(3)
    for p, Hb, Gb in zip(case.params(), ref.blocks(Hmat, qs), ref.blocks(GGN, qs)):
        V = torch.randn(2, *p.shape, dtype=DT)
        flat = V.reshape(2, -1)
        close(p.ggnmp(V), (flat @ Gb.T).reshape(V.shape), "ggnmp")
        close(p.hmp(V), (flat @ Hb.T).reshape(V.shape), "hmp")


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kflr_per_sequence(approx):
    """KFLR through MergeBatch: the per-sequence definition (Eschenhagen et al. 2023)."""
    case = TokenCase("ce")
    case.run(KFLR(kfac_approx=approx))
    for p, expected in zip(case.params(), case.kron_reference(approx)):
        close(_kron(p, "kflr"), expected, f"kflr {approx}")


def test_kfac_expand_equals_token_samples():
    """KFAC ``expand`` through MergeBatch (one merged column per draw) is the same number as
    KFAC of the twin model that treats the ``N T`` tokens as samples (same draws): the
    sampled columns are merged, yet ``G`` reads only the diagonal token blocks."""
    case = TokenCase("ce")
    twin = extend(copy.deepcopy(case.body))
    lf = extend(copy.deepcopy(case.loss_fn))
    torch.manual_seed(7)
    case.run(KFAC(mc_samples=2))
    loss = lf(twin(case.X.reshape(N * T, D)), case.y)
    torch.manual_seed(7)
    with backprop(KFAC(mc_samples=2)):
        loss.backward()
    for p, q in zip(case.params(), twin.parameters()):
        for a, b in zip(p.kfac, q.kfac):
            close(a, b, "kfac")


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_mean_converges_to_kflr(approx):
    """The merged Monte-Carlo columns are unbiased: KFAC with many draws tends to KFLR."""
    case = TokenCase("ce")
    torch.manual_seed(0)
    case.run(KFLR(kfac_approx=approx), KFAC(mc_samples=20_000, kfac_approx=approx))
    for p in case.params():
        assert rel_err(p.kfac[0], p.kflr[0]) < 0.05, rel_err(p.kfac[0], p.kflr[0])
        if len(p.kfac) == 2:
            close(p.kfac[1], p.kflr[1], "A does not depend on the sampling")


@pytest.mark.parametrize("kind", ["ce", "mse-tanh", "ce-dense"])
def test_diag_ggn_mc_converges_to_exact(kind):
    case = TokenCase(kind)
    torch.manual_seed(0)
    case.run(DiagGGNExact(), DiagGGNMC(mc_samples=20_000))
    for p in case.params():
        assert rel_err(p.diag_ggn_mc, p.diag_ggn_exact) < 0.05


def test_kfra_through_merge_batch_is_refused():
    """Batch-averaged curvature cannot be split back into tokens: refused before the pass."""
    case = TokenCase("ce")
    with pytest.raises(NotImplementedError, match="MergeBatch"):
        case.run(KFRA())
    assert not any(hasattr(p, "kfra") for p in case.params())
