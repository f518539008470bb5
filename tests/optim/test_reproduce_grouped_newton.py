"""The GroupedNewton reproduction runs end to end in ``--quick`` mode and writes finite curves."""

from __future__ import annotations

import csv
import math

import pytest
from example_scripts import load_example


@pytest.mark.slow
def test_reproduce_grouped_newton_quick(tmp_path, capsys):
    runs = load_example("reproduce_grouped_newton").main(["--quick", "--out", str(tmp_path)])
    png, table = tmp_path / "grouped_newton_digits.png", tmp_path / "grouped_newton_digits.csv"
    assert png.stat().st_size > 1000
    with open(table) as f:
        rows = list(csv.DictReader(f))
    methods = {r["method"] for r in rows}
    assert methods == {r.method for r in runs}
    assert {"GroupedNewton", "GroupedNewton, rescaled", "SGD (best of grid)"} <= methods
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in rows)
    # the rescaled parameterisation gives GroupedNewton the same losses (appendix E)
    losses = {m: [r.train_loss for r in runs if r.method == m][0] for m in methods}
    for a, b in zip(losses["GroupedNewton"], losses["GroupedNewton, rescaled"]):
        assert abs(a - b) <= 1e-9 * abs(a)
    assert "seconds per step" in capsys.readouterr().out


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path, monkeypatch):
    module = load_example("reproduce_grouped_newton")

    def missing(*args, **kwargs):
        raise module.FashionMNISTMissingError("Fashion-MNIST not found: `sudo apt install x`")

    monkeypatch.setattr(module, "load_fashion_mnist", missing)
    with pytest.raises(SystemExit, match="apt install(.|\n)*--data digits"):
        module.main(["--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())
