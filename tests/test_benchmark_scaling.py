"""``benchmarks/scaling.py --quick`` runs end to end and writes every row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scaling.py"
EXTENSIONS = [
    "BatchGrad",
    "BatchL2",
    "SumGradSquared",
    "Variance",
    "DiagGGNExact",
    "DiagGGNMC",
    "DiagHessian",
    "KFAC",
    "KFLR",
    "KFRA",
    "KFAC+DiagGGNExact+BatchGrad",
]
LIBS = ("hbpkit", "BackPACK")


@pytest.mark.slow
def test_quick_run_writes_every_row(tmp_path):
    """A fresh interpreter (the script starts one child process per case) in a tmp dir."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    md, js = tmp_path / "scaling.md", tmp_path / "scaling.json"
    assert md.exists() and js.exists()

    text = md.read_text()
    assert "## (a) batch size N" in text and "## (b) width factor" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for ext in EXTENSIONS:
        for lib in LIBS:
            # once per sweep table, once in the exponent table
            assert sum(row.startswith(f"| {ext} ({lib}) |") for row in rows) == 2, (ext, lib)
            assert any(row.startswith(f"| {ext} | {lib} |") for row in rows), (ext, lib)

    raw = json.loads(js.read_text())
    configs = {(c["batch"], c["width"]) for c in raw["cases"]}
    assert configs == {(4, 1.0), (8, 1.0), (8, 0.25)}
    cases = {(c["batch"], c["width"], c["lib"], c["ext"]) for c in raw["cases"]}
    for config in configs:
        assert (*config, "plain", None) in cases
        for ext in EXTENSIONS:
            for lib in LIBS:
                assert (*config, lib, ext) in cases
    for case in raw["cases"]:  # every cell is a measurement or a reported failure
        assert case["status"] in ("ok", "failed", "refused")
        if case["status"] == "ok":
            assert case["peak_mb"] >= 0
            assert case["lib"] == "plain" or case["ratio"] > 0
        else:
            assert case["reason"]
    assert {(e["lib"], e["ext"]) for e in raw["exponents"]} == {("plain", None)} | {
        (lib, ext) for ext in EXTENSIONS for lib in LIBS
    }
    assert "memory grows faster than linear" in done.stdout or "no extension's memory" in (
        done.stdout
    )
