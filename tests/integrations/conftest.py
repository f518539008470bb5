"""laplace-torch for the tests of ``hbpkit.integrations.laplace``: skipped where it is not
installed (``pip install hbpkit[laplace]``); imported through ``examples/_laplace_env.py``
(torchvision's CUDA-built wheel and the absent opt_einsum, see there)."""

from __future__ import annotations

import pytest
from example_scripts import load_example

try:
    load_example("_laplace_env").import_laplace()
except ImportError:  # pragma: no cover - laplace-torch not installed
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(autouse=True)
def _float32_default():
    """laplace's tests run in float32 (its own fixture resets the default)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)
