"""The ISAAC and FOOF reproduction scripts run end to end in ``--quick`` mode."""

from __future__ import annotations

import csv
import math

import pytest
from example_scripts import load_example


@pytest.mark.slow
def test_reproduce_isaac_quick(tmp_path):
    runs = load_example("reproduce_isaac").main(["--quick", "--out", str(tmp_path)])
    assert {r.method for r in runs} == {"zeta", "zeta*", "gradient"}
    assert (tmp_path / "isaac_grid.png").stat().st_size > 1000
    with open(tmp_path / "isaac_grid.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(runs) == 3 * 4 + 1  # 3 x 3 zeta, 3 zeta*, the gradient
    assert all(math.isfinite(float(r["final_train_loss"])) for r in rows)
    with open(tmp_path / "isaac_timing.csv") as f:
        timing = list(csv.DictReader(f))
    assert all(float(r[k]) > 0 for r in timing for k in ("SGD", "zeta*", "zeta", "K-FAC"))


@pytest.mark.slow
def test_reproduce_foof_quick(tmp_path):
    runs = load_example("reproduce_foof").main(["--quick", "--out", str(tmp_path)])
    methods = {r.method for r in runs}
    assert methods == {
        "SGD",
        "Adam",
        "K-FAC heuristic",
        "K-FAC correct",
        "natural gradient",
        "FOOF T=1",
        "FOOF T=100",
    }
    assert (tmp_path / "foof_optimizers.png").stat().st_size > 1000
    with open(tmp_path / "foof_optimizers.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == methods
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
    with open(tmp_path / "foof_timing.csv") as f:
        assert {r["method"] for r in csv.DictReader(f)} == methods
