"""Overwriting consumed factors (``hbpkit/curvature/workspace.py``, ownership rule), float64.

A rule may write ``J^T S`` into ``S`` only where the running call alone holds ``S``
(:func:`workspace.exclusive_factors`). Unit checks of every holder that must keep a factor
intact (a second message, a cache, a name, a view, a shared storage, an expanded tensor,
a graph, a mark), of the in-order compaction of an owned crop, and end to end: a factor
sent to two parents (parallel branches, a residual block's shortcut) and a module used
twice give DiagGGNExact / KFLR equal to the exact GGN, and the chain does overwrite.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from torch import nn

from hbpkit import backprop, extend
from hbpkit.branching import Parallel, Residual
from hbpkit.curvature import workspace
from hbpkit.curvature.factors import SqrtFactor
from hbpkit.extensions import KFLR, DiagGGNExact
from hbpkit.modules.losses import mark_independent_rows

DT = torch.float64


def _messages(S: torch.Tensor) -> dict:
    return {"key": {"origin": SqrtFactor(S)}}


def test_a_factor_held_by_its_message_alone_is_owned():
    messages = _messages(torch.randn(2, 3, 4, dtype=DT))
    (owned,) = workspace.exclusive_factors(messages)
    assert owned is messages["key"]["origin"].S


def test_a_crop_whose_base_only_it_holds_is_owned():
    messages = _messages(torch.randn(2, 3, 5, 5, dtype=DT)[..., :4, :4])
    assert len(workspace.exclusive_factors(messages)) == 1


@pytest.mark.parametrize(
    "holder",
    ["name", "cache", "view", "base", "second dict", "second factor", "expanded", "graph", "mark"],
)
def test_a_factor_held_elsewhere_is_not_owned(holder):
    S = torch.randn(2, 3, 4, dtype=DT)
    if holder == "expanded":
        S = torch.randn(1, 3, 4, dtype=DT).expand(2, 3, 4)
    elif holder == "graph":
        S.requires_grad_(True)
    elif holder == "mark":
        mark_independent_rows(S)
    messages = _messages(S)
    keep = None
    if holder == "cache":
        keep = {"cached": S}
    elif holder == "view":
        keep = S.view(6, 4)
    elif holder == "base":
        keep = torch.randn(24, dtype=DT)
        messages = _messages(keep.view(2, 3, 4))
    elif holder == "second dict":  # one message sent to two parents
        keep = {"other parent": messages["key"]}
    elif holder == "second factor":  # S passed on unchanged by another consumer
        keep = SqrtFactor(S)
    if holder not in ("name", "expanded", "graph", "mark"):
        del S
    assert workspace.exclusive_factors(messages) == []
    del keep


def test_may_overwrite_only_inside_owning():
    S = torch.randn(2, 3, dtype=DT)
    assert not workspace.may_overwrite(S)
    with workspace.owning([S]):
        assert workspace.may_overwrite(S) and not workspace.may_overwrite(S.clone())
    assert not workspace.may_overwrite(S)


@pytest.mark.parametrize("shape", [(2, 3, 4, 6, 6), (3, 2, 1, 550, 550)], ids=["one", "chunks"])
def test_compacted_writes_the_crop_contiguously_into_its_own_storage(shape):
    torch.manual_seed(0)
    base = torch.randn(*shape, dtype=DT)
    crop = base[..., :-1, :-1]
    d = torch.randn(shape[1], *crop.shape[2:], dtype=DT)
    expected = crop * d

    def apply(rows, samples, out):
        return torch.mul(rows, d[samples], out=out)

    out = workspace.compacted(crop, apply)
    assert out.is_contiguous() and out.data_ptr() == base.data_ptr()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def _models():
    torch.manual_seed(0)
    shared = nn.Sigmoid()
    return {
        # one factor sent to two elementwise parents
        "parallel": nn.Sequential(
            nn.Linear(5, 6),
            Parallel(nn.Sigmoid(), nn.Sequential(nn.Tanh(), nn.Linear(6, 6)), nn.Sigmoid()),
            nn.Sigmoid(),
            nn.Linear(6, 3),
        ),
        # the shortcut sends the factor on unchanged while the branch's sigmoid consumes it
        "residual": nn.Sequential(
            nn.Linear(5, 6),
            nn.Sigmoid(),
            Residual(nn.Sequential(nn.Sigmoid(), nn.Linear(6, 6))),
            Residual(nn.Sigmoid()),
            nn.Linear(6, 3),
        ),
        # one module called twice
        "used twice": nn.Sequential(
            nn.Linear(5, 6), shared, nn.Linear(6, 6), shared, nn.Linear(6, 3)
        ),
        # a padding's crop of a max-pool's factor, compacted by the sigmoid before it
        "crop": nn.Sequential(
            nn.Conv2d(2, 3, 3),
            nn.Sigmoid(),
            nn.ZeroPad2d((0, 1, 0, 1)),
            nn.MaxPool2d(3, 2),
            nn.Flatten(),
            nn.Linear(12, 3),
        ),
    }


def _run(model, X, y, monkeypatch, owned: bool) -> tuple[list, list[bool]]:
    """DiagGGNExact and KFLR in one pass, whether rules may overwrite factors, and what
    ``may_overwrite`` answered."""
    answers = []
    may_overwrite = workspace.may_overwrite

    def record(t):
        answers.append(may_overwrite(t))
        return answers[-1]

    with monkeypatch.context() as patch:
        patch.setattr(workspace, "may_overwrite", record)
        if not owned:
            patch.setattr(workspace, "exclusive_factors", lambda messages: [])
        m, lf = extend(model), extend(nn.CrossEntropyLoss())
        with backprop(DiagGGNExact(), KFLR()):
            lf(m(X), y).backward()
    results = [[p.diag_ggn_exact.clone(), *[f.clone() for f in p.kflr]] for p in m.parameters()]
    for p in m.parameters():
        del p.diag_ggn_exact, p.kflr
    return results, answers


@pytest.mark.parametrize("name", ["parallel", "residual", "used twice", "crop"])
def test_results_equal_the_exact_ggn_and_those_without_overwriting(name, monkeypatch):
    model = _models()[name].to(DT)
    X = torch.randn(4, 2, 6, 6, dtype=DT) if name == "crop" else torch.randn(4, 5, dtype=DT)
    y = torch.randint(0, 3, (4,))
    params = list(model.parameters())
    G = ref.ggn(model(X), nn.CrossEntropyLoss(), y, params)
    results, answers = _run(model, X, y, monkeypatch, owned=True)
    diag = torch.cat([r[0].flatten() for r in results])
    torch.testing.assert_close(diag, G.diagonal(), rtol=1e-10, atol=1e-12)
    without, _ = _run(model, X, y, monkeypatch, owned=False)
    for a, b in zip(results, without):
        for x, z in zip(a, b):
            torch.testing.assert_close(x, z, rtol=0, atol=0)
    assert any(answers)  # the chain parts do overwrite
    if name == "parallel":
        assert not all(answers)  # the factor sent to the branches is not


def test_compacted_refuses_rows_that_interleave():
    base = torch.randn(40, dtype=DT)
    mat = base.as_strided((1, 2, 2, 2), (16, 4, 5, 1))  # row 0 reaches into row 1
    assert workspace.compacted(mat, lambda rows, samples, out: out.copy_(rows)) is None
    permuted = torch.randn(2, 3, 4, 5, dtype=DT).permute(0, 2, 1, 3)  # [V, N, C, H], N inner
    assert workspace.compacted(permuted, lambda rows, samples, out: out.copy_(rows)) is None
