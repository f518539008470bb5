"""Convolution rules that bound their temporaries by chunks (issue 17), float64.

``jac_t_mat_prod`` fills a large result in chunks of columns (``COLUMN_CHUNK_BYTES``) and
the input factor ``A`` sums the patch Gram over chunks of samples (``PATCH_CHUNK_BYTES``):
with the chunks forced down to one column / one sample, the results equal those of one call.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hbpkit import backprop, extend
from hbpkit.curvature import workspace
from hbpkit.extensions import KFLR, DiagGGNExact
from hbpkit.modules.conv import ConvRules, base, kronecker

DT = torch.float64


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Sigmoid(),
        nn.Conv2d(3, 4, (3, 2), padding=1, stride=(2, 1)),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 9, 3),
    ).to(DT)


def _results(model, X, y) -> list[torch.Tensor]:
    m, loss_fn = extend(model), extend(nn.CrossEntropyLoss())
    with backprop(KFLR(), DiagGGNExact()):
        loss_fn(m(X), y).backward()
    out = []
    for p in m.parameters():
        out += [p.diag_ggn_exact.clone(), *[f.clone() for f in p.kflr]]
        del p.diag_ggn_exact, p.kflr
    return out


def test_chunked_convolution_rules_equal_one_call(monkeypatch):
    model = _model()
    X, y = torch.randn(5, 2, 8, 8, dtype=DT), torch.randint(0, 3, (5,))
    whole = _results(model, X, y)
    calls = []
    jac_t = ConvRules._jac_t

    def counted(self, call, mat):
        calls.append(mat.shape[0])
        return jac_t(self, call, mat)

    monkeypatch.setattr(workspace, "MIN_BYTES", 0)  # chunk every product
    monkeypatch.setattr(base, "COLUMN_CHUNK_BYTES", 1)  # one column per call
    monkeypatch.setattr(kronecker, "PATCH_CHUNK_BYTES", 1)  # one sample per patch Gram
    monkeypatch.setattr(ConvRules, "_jac_t", counted)
    chunked = _results(model, X, y)
    assert calls and all(n == X.shape[0] for n in calls)  # one column of 5 samples each
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("V", [1, 3])
def test_jac_t_mat_prod_in_chunks_is_the_transposed_convolution(monkeypatch, V):
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).to(DT)
    x = torch.randn(4, 2, 7, 7, dtype=DT)
    from hbpkit.core.calls import ModuleCall

    rules = ConvRules()
    call = ModuleCall(conv, (x,), conv(x), rules)
    mat = torch.randn(V, 4, *call.output_shape[1:], dtype=DT)
    expected = torch.stack(
        [torch.func.vjp(lambda t: conv(t) - conv.bias[:, None, None], x)[1](m)[0] for m in mat]
    )
    monkeypatch.setattr(workspace, "MIN_BYTES", 0)
    monkeypatch.setattr(base, "COLUMN_CHUNK_BYTES", 1)
    torch.testing.assert_close(rules.jac_t_mat_prod(call, mat), expected, rtol=1e-12, atol=1e-14)
