"""``benchmarks/models.py``: a quick run (tiny sizes, one repeat) ends to end and prints a row
for every case; the memory worker reports a peak or hbpkit's refusal."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "models.py"
ENV = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def load_script():
    spec = importlib.util.spec_from_file_location("bench_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env=ENV,
    )


@pytest.mark.slow
def test_quick_run_prints_every_case(tmp_path):
    bench = load_script()
    done = run(
        "--quick", "--model", "vit", "gpt", "--no-memory", "--threads", "1", "--out", str(tmp_path)
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = (tmp_path / "models.md").read_text()
    assert text.strip() == done.stdout.strip()
    for name in ("vit", "gpt"):
        section = text.split(f"## {name} ")[1].split("\n## ")[0]
        assert re.search(r"plain forward \+ backward: \d+\.\d ms", section), section
        for lib, ext in bench.CASES:
            row = re.search(rf"^\| {re.escape(lib)} \| {re.escape(ext)} \| (.*)$", section, re.M)
            assert row, (name, lib, ext, section)
            cell = row.group(1).split(" | ")[0]
            ok = re.fullmatch(r"[0-9.]+", cell) or cell.startswith(("refused: ", "failed: "))
            assert ok, (name, lib, ext, cell)
        # curvlinops' KFAC supports the Linear layers of both models
        row = re.search(r"^\| curvlinops \| KFAC-mc \| ([0-9.]+) \|", section, re.M)
        assert row, section
    raw = json.loads((tmp_path / "models.json").read_text())
    assert set(raw) == {"vit", "gpt"}


def test_memory_worker_reports_one_record():
    done = run(
        "--worker",
        "--quick",
        "--model",
        "gpt",
        "--lib",
        "hbpkit",
        "--ext",
        "BatchGrad",
        "--threads",
        "1",
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    assert len(lines) == 1, done.stdout
    record = json.loads(lines[0][len("BENCH ") :])
    if record["status"] == "ok":
        assert record["peak_mb"] >= 0
    else:
        assert record["status"] == "refused" and record["reason"], record
