"""The brute-force helpers of :mod:`reference` agree with each other (guards the reference)."""

from __future__ import annotations

import pytest
import reference as ref
from quantities import (
    LOSSES,
    Case,
    close,
    kron,
    mlp,
)


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
        close(kron(sqrt[q]), g, "sqrt factors at N=1 == GGN")
        close(kron(avg[q]), h, "batch-average (hessian) at N=1 == Hessian")
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
