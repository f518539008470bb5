"""The examples run and check what they claim."""

from __future__ import annotations

from example_scripts import load_example


def test_custom_module_example_matches_autograd():
    assert load_example("custom_module").main() < 1e-10


def test_digits_demo_kronecker_step_beats_gradient_descent():
    results = load_example("digits_demo").main()
    assert results["kflr"][0] < 0.5 * results["gd"][0]
    assert results["kflr"][1] > 0.9
