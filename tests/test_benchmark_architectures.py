"""``benchmarks/architectures.py``: children get the allocator settings; a quick run ends to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "architectures.py"
sys.path.insert(0, str(SCRIPT.parent))
import architectures as bench  # noqa: E402

#: a stand-in worker that reports the glibc tunables of its environment
ECHO = (
    "import json, os; print('BENCH ' + json.dumps({k: os.environ.get(k) for k in "
    "('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_')}))"
)


@pytest.mark.parametrize("reuse", [False, True])
def test_worker_environment_has_the_tunables_only_when_asked(reuse, monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    args = bench.parse_args(["--reuse-freed-memory"] if reuse else [])
    flags = bench.worker_command(args, "time", "fcnn")[2:]  # everything after the script
    records, problem = bench.run_worker([sys.executable, "-c", ECHO, *flags], timeout=60)
    assert problem is None
    expected = bench.REUSE_FREED_MEMORY if reuse else dict.fromkeys(bench.REUSE_FREED_MEMORY)
    assert records == [expected]


@pytest.mark.slow
def test_quick_run_with_reused_memory(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--arch",
            "fcnn",
            "--extensions",
            "none",
            "DiagGGNExact",
            "--reuse-freed-memory",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "benchmark.md").read_text()
    assert "MALLOC_MMAP_THRESHOLD_" in report
    raw = json.loads((tmp_path / "benchmark.json").read_text())
    timed = {(r["lib"], r["ext"]) for r in raw["time"] if "seconds" in r or "times" in r}
    assert ("hbpkit", "DiagGGNExact") in timed and ("BackPACK", "DiagGGNExact") in timed


def test_full_ggn_row_runs_the_operator_and_curvlinops_only():
    """The GGN row (full product) has no BackPACK counterpart; GGNMP (blocks) has."""
    assert bench.runs("hbpkit", "GGN") and bench.runs("curvlinops", "GGN")
    assert not bench.runs("BackPACK", "GGN")
    assert bench.runs("BackPACK", "GGNMP")
