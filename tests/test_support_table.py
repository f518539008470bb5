"""The docs' generated tables come from the code, and their cells hold when run.

``docs/supported-modules.md``: which module supports which extension;
``docs/own-module.md``: which rule methods each extension needs (the rule matrix).
"""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import hbpkit
from hbpkit import backprop, extend
from hbpkit.modules.base import ModuleRules
from hbpkit.modules.tables import SECOND_ORDER

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location(
        "support_table", ROOT / "scripts/support_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_tables_are_up_to_date():
    """``python3 scripts/support_table.py`` would not change the docs pages (a fresh
    interpreter: other tests register module types of their own)."""
    script = ROOT / "scripts" / "support_table.py"
    done = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _cells() -> dict[str, dict[str, str]]:
    """``{module name: {column: cell}}`` from the generated rows."""
    script = _script()
    headers = [h for h, _, _ in script.COLUMNS]
    return {
        name: dict(zip(headers, cells)) for _, names, cells, _ in script.rows() for name in names
    }


def test_rows_and_cells():
    cells = _cells()
    generic = cells[_script().ANY_OTHER]  # the generic path: all but Kronecker factors
    assert generic["BatchGrad"] == generic["DiagHessian"] == generic["GGNMP"] == "exact"
    assert generic["KFLR"] == generic["KFAC"] == "✗"
    assert cells["Upsample"]["DiagGGNExact"] == "✓"
    assert cells["LayerNorm"]["DiagHessian"] == "exact"
    assert cells["Embedding"]["BatchGrad"] == "exact"
    assert cells["Embedding"]["KFLR"] == "≈¹"
    assert cells["ConvTranspose2d"]["KFLR"] == cells["Conv2d"]["KFRA"] == "≈"
    assert cells["Sigmoid"]["BatchGrad"] == "–"
    assert cells["Sigmoid"]["HMP"] == "✓"


class Gain(nn.Module):
    """A module with a parameter and no rules (the generic path)."""

    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        return x * self.g


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A tiny chain with the module after a Linear layer (Embedding: first), and its input."""
    torch.manual_seed(0)
    if name == "Embedding":
        return nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2)), torch.tensor(
            [[1, 2], [3, 1]]
        )
    inner = {
        "Linear": (nn.Linear(4, 4), []),
        "LayerNorm": (nn.LayerNorm(4), []),
        "BatchNorm1d": (nn.BatchNorm1d(4).eval(), []),
        "GroupNorm": (nn.GroupNorm(2, 4), []),
        "Sigmoid": (nn.Sigmoid(), []),
        "ConvTranspose1d": (nn.ConvTranspose1d(2, 2, 1), [nn.Unflatten(1, (2, 2))]),
        "Upsample": (nn.Upsample(scale_factor=1), [nn.Unflatten(1, (2, 2))]),
        _script().ANY_OTHER: (Gain(), []),
    }[name]
    module, before = inner
    layers = [nn.Linear(3, 4), *before, module, nn.Flatten(), nn.Linear(4, 2)]
    return nn.Sequential(*layers).double(), torch.randn(2, 3, dtype=torch.float64)


@pytest.mark.parametrize(
    "name",
    [
        "Linear",
        "LayerNorm",
        "GroupNorm",
        "BatchNorm1d",
        "Sigmoid",
        "ConvTranspose1d",
        "Embedding",
        "Upsample",
        _script().ANY_OTHER,
    ],
)
def test_cells_hold(name):
    """Every column: the extension runs where the cell says so, and refuses where it says ✗."""
    script = _script()
    cells = _cells()[name]
    for header, extension, _ in script.COLUMNS:
        model, X = _model(name)
        model = extend(model)
        out = model(X)
        loss = extend(nn.CrossEntropyLoss())(out, torch.tensor([0, 1]))
        if cells[header] == "✗":
            with pytest.raises(NotImplementedError), backprop(extension):
                loss.backward()
        else:
            with backprop(extension):
                loss.backward()


# ------------------------------------------------------------------------- the rule matrix
#: rules with defaults built on ``batch_grad``: reset in the restricted classes below, so
#: that a class keeping only ``batch_grad`` behaves like a user's class that implements it
FIRST_ORDER_DEFAULTS = ("batch_l2", "sum_grad_squared", "summed_grad", "cached_batch_grad")


class _MatrixLinear(nn.Linear):
    """Served by a copy of the Linear rules that keeps only the matrix's rules."""


class _MatrixSigmoid(nn.Sigmoid):
    """Served by a copy of the Sigmoid rules that keeps only the matrix's rules."""


def _matrix_methods() -> list[str]:
    """The matrix's ``ModuleRules`` columns (parameter and message rules)."""
    columns = _script().MATRIX_COLUMNS
    return columns["parameter rules"] + columns["message rules"]


def _restricted(rules: ModuleRules, keep: set[str]) -> ModuleRules:
    """A copy of ``rules`` whose matrix methods outside ``keep`` are ``ModuleRules``' own."""
    reset = [m for m in _matrix_methods() if m not in keep] + list(FIRST_ORDER_DEFAULTS)
    cls = type(
        f"Only{type(rules).__name__}", (type(rules),), {m: getattr(ModuleRules, m) for m in reset}
    )
    copied = copy.copy(rules)
    copied.__class__ = cls
    return copied


def _run(extension, linear: type, sigmoid: type) -> list:
    """``extension``'s results on ``Linear -> Sigmoid -> Linear -> CrossEntropyLoss``."""
    torch.manual_seed(0)
    model = extend(nn.Sequential(linear(3, 4), sigmoid(), linear(4, 2)).double())
    X = torch.randn(5, 3, dtype=torch.float64)
    loss = extend(nn.CrossEntropyLoss())(model(X), torch.tensor([0, 1, 0, 1, 1]))
    torch.manual_seed(1)  # the same Monte-Carlo draws
    with backprop(extension):
        loss.backward()
    results = []
    for p in model.parameters():
        value = getattr(p, extension.savefield)
        if callable(value):  # a curvature-matrix product: apply it
            value = value(torch.randn(2, *p.shape, dtype=torch.float64, generator=_gen()))
        results.append(value)
    return results


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(2)


@pytest.mark.parametrize("row", [h for h, _ in _script().MATRIX_ROWS])
def test_rule_matrix_rows_hold(row):
    """Rules that implement exactly a row's methods compute the extension (same values as
    the full rules), and dropping any method the row marks ✓ makes it refuse."""
    script = _script()
    extension = dict(script.MATRIX_ROWS)[row]
    needs = script.rule_needs(extension)
    linear_rules = SECOND_ORDER.lookup(nn.Linear(1, 1))  # linear in input and parameters
    sigmoid_rules = SECOND_ORDER.lookup(nn.Sigmoid())  # nonlinear in its input
    keep_linear = {m for m, c in needs.items() if c == "✓"}
    keep_sigmoid = {m for m, c in needs.items() if c in ("✓", "ⁱ")}
    hbpkit.register(_MatrixSigmoid, _restricted(sigmoid_rules, keep_sigmoid))
    hbpkit.register(_MatrixLinear, _restricted(linear_rules, keep_linear))
    got = _run(extension, _MatrixLinear, _MatrixSigmoid)
    expected = _run(extension, nn.Linear, nn.Sigmoid)
    for g, e in zip(got, expected, strict=True):  # tensors, or KroneckerFactors (tuples)
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    for method in sorted(keep_linear & set(_matrix_methods())):
        hbpkit.register(_MatrixLinear, _restricted(linear_rules, keep_linear - {method}))
        with pytest.raises(NotImplementedError):
            _run(extension, _MatrixLinear, _MatrixSigmoid)
