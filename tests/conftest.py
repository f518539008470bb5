"""Shared set-up of the test suite.

* ``tests/`` is on ``sys.path`` (pytest puts a rootless ``conftest.py``'s folder there), so
  every test file, in whichever sub-folder, imports the shared helpers as plain modules:
  ``import reference as ref``, ``from quantities import Case``.
* Intra-op threads: one for the whole session. The tensors here are tiny, so threads only
  add overhead (and spin for long when the machine is busy); the thread count in force
  before the session is restored at its end.
* ``default_float64``: a fixture for the few tests that need float64 as the default dtype
  (code that allocates without a dtype, e.g. BackPACK 1.7.1's ``MSELoss.sum_hessian``).
* The exact limits (:mod:`exact_limits`) as named fixtures.
"""

from __future__ import annotations

import pytest
import torch
from exact_limits import (
    HBP_HESSIAN_BATCH_ONE,
    HBP_HESSIAN_SQRT_BATCH_ONE,
    KFAC_MEAN_TO_KFLR,
    KFLR_DEEP_LINEAR_MSE,
    KFLR_KFRA_BATCH_ONE,
    ExactLimit,
    MonteCarloLimit,
)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def default_float64():
    """float64 as the default dtype for the test, restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(old)


@pytest.fixture
def kflr_kfra_batch_one() -> ExactLimit:
    """KFLR and KFRA at batch size 1, without weight sharing: the exact GGN block."""
    return KFLR_KFRA_BATCH_ONE


@pytest.fixture
def kflr_deep_linear_mse() -> ExactLimit:
    """KFLR (and KFRA) of a deep linear network with MSE: the exact GGN block, any batch size."""
    return KFLR_DEEP_LINEAR_MSE


@pytest.fixture
def hbp_hessian_batch_one() -> ExactLimit:
    """HBP("hessian", "average", "batch-average") at batch size 1: the exact Hessian block."""
    return HBP_HESSIAN_BATCH_ONE


@pytest.fixture
def hbp_hessian_sqrt_batch_one() -> ExactLimit:
    """HBP("hessian", "exact", "sqrt") at batch size 1: the exact Hessian block."""
    return HBP_HESSIAN_SQRT_BATCH_ONE


@pytest.fixture
def kfac_mean_to_kflr() -> MonteCarloLimit:
    """The mean of many KFAC draws tends to KFLR."""
    return KFAC_MEAN_TO_KFLR
