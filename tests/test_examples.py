"""The examples run and check what they claim."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_module_example_matches_autograd():
    assert _load("custom_module").main() < 1e-10


def test_digits_demo_kronecker_step_beats_gradient_descent():
    results = _load("digits_demo").main()
    assert results["kflr"][0] < 0.5 * results["gd"][0]
    assert results["kflr"][1] > 0.9
