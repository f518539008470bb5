"""The reproduction scripts run end to end in ``--quick`` mode and write finite curves."""

from __future__ import annotations

import csv
import math

import pytest
from example_scripts import load_example


@pytest.mark.parametrize(
    "script, stem",
    [
        ("reproduce_fcnn_block_splitting", "fcnn_block_splitting"),
        ("reproduce_cnn_optimizers", "cnn_optimizers"),
    ],
)
def test_reproduction_quick(script, stem, tmp_path):
    runs = load_example(script).main(["--quick", "--out", str(tmp_path)])
    assert runs
    png, table = tmp_path / f"{stem}.png", tmp_path / f"{stem}.csv"
    assert png.stat().st_size > 1000
    with open(table) as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {r.method for r in runs}
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in rows)
