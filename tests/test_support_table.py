"""The README's support table comes from the code, and its cells hold when run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hbpkit import backprop, extend

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location(
        "support_table", ROOT / "scripts/support_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_is_up_to_date():
    """``python3 scripts/support_table.py`` would not change README.md (a fresh interpreter:
    other tests register module types of their own)."""
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
    assert set(cells["MultiheadAttention"].values()) == {"✗"}
    assert cells["LayerNorm"]["DiagHessian"] == "exact"
    assert cells["Embedding"]["BatchGrad"] == "exact"
    assert cells["Embedding"]["KFLR"] == "≈¹"
    assert cells["ConvTranspose2d"]["KFLR"] == "✗"
    assert cells["Sigmoid"]["BatchGrad"] == "–"
    assert cells["Sigmoid"]["HMP"] == "✓"


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
    }[name]
    module, before = inner
    layers = [nn.Linear(3, 4), *before, module, nn.Flatten(), nn.Linear(4, 2)]
    return nn.Sequential(*layers).double(), torch.randn(2, 3, dtype=torch.float64)


@pytest.mark.parametrize(
    "name",
    ["Linear", "LayerNorm", "GroupNorm", "BatchNorm1d", "Sigmoid", "ConvTranspose1d", "Embedding"],
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
