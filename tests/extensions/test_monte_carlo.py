"""Monte-Carlo extensions (KFAC, sampled HBP, DiagGGNMC): convergence and seeding (float64).

The means over many draws tend to the exact quantities (relative Frobenius error below
5 %); one draw is random and reproducible under a seed.
"""

from __future__ import annotations

import pytest
import torch
from quantities import (
    LOSSES,
    SAVEFIELDS,
    Case,
    close,
    kron_param_names,
    mlp,
    rel_err,
)

from hbpkit.extensions import (
    HBP,
    KFAC,
    KFRA,
    DiagGGNExact,
    DiagGGNMC,
)


@pytest.mark.parametrize("loss", LOSSES)
def test_kfac_mc_mean_converges_to_kflr(kfac_mean_to_kflr, loss):
    case = Case(lambda: mlp("Tanh"), loss, "mean", (4, 5))
    torch.manual_seed(0)
    case.run(*kfac_mean_to_kflr.make(kfac_mean_to_kflr.mc_samples))
    kfac_mean_to_kflr.check([(name, p) for p, _, name in kron_param_names(case)], close)


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
