"""The examples run and check what they claim."""

from __future__ import annotations

import re
from pathlib import Path

from example_scripts import EXAMPLES, load_example


def test_custom_module_example_matches_autograd():
    assert load_example("custom_module").main() < 1e-10


def test_digits_demo_kronecker_step_beats_gradient_descent():
    results = load_example("digits_demo").main()
    assert results["kflr"][0] < 0.5 * results["gd"][0]
    assert results["kflr"][1] > 0.9


def test_transformer_example_is_consistent():
    """The converted transformer: GGN diagonal and GGN products agree on the class token,
    per-sample gradients of the bare parameters sum to the gradient, every Linear (the
    attention's projections included) has KFAC factors."""
    results = load_example("transformer_curvature").main(batch=16)
    assert results["error"] < 1e-10
    assert results["grad_batch_sums_to_grad"] < 1e-12
    assert len(results["kfac"]) == 6


def test_every_example_runs_in_a_test():
    """Each script in ``examples/`` (helpers start with ``_``) is named, as a string, by a
    test that runs it (``load_example("name")``, a parametrised list, or ``"name.py"``)."""
    tests = Path(__file__).resolve().parent
    sources = "\n".join(p.read_text() for p in sorted(tests.rglob("test_*.py")))
    scripts = sorted(p.stem for p in EXAMPLES.glob("*.py") if not p.stem.startswith("_"))
    assert scripts, f"no examples found in {EXAMPLES}"
    untested = [n for n in scripts if not re.search(rf"[\"']{n}(\.py)?[\"']", sources)]
    assert not untested, f"examples that no test runs: {untested}"


def test_laplace_digits_example_agrees_with_curvlinops(tmp_path):
    """The laplace-torch example, small (the MLP, one repeat, a short training): hbpkit's
    backend gives curvlinops' predictive (same conventions) in every setting both fit,
    BackPACK's on the MLP (no weight sharing), and writes the reliability diagram."""
    load_example("_laplace_env").import_laplace()  # scripts/install.sh installs laplace-torch
    png = tmp_path / "reliability.png"
    example = load_example("laplace_digits")
    results = example.main(repeats=1, models=("mlp",), steps=30, png=str(png))
    assert png.stat().st_size > 0
    rows = {k: v for k, v in results.items() if len(k) == 4}
    assert len(rows) == 11  # 4 settings x 3 backends, less curvlinops' diag of all weights
    for (name, subset, structure, label), row in rows.items():
        ours = results[(name, subset, structure, "hbpkit")]
        for key in ("nll", "acc", "ece", "prior"):
            assert abs(row[key] - ours[key]) <= 1e-4 * max(1.0, abs(ours[key])), (key, label)
    assert results[("mlp", "MAP")]["acc"] > 0.8
