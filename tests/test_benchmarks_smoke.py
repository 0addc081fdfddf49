"""The benchmarks still run: each non-scheduler benchmark's ``--smoke`` mode (tiny grids and data, one repeat).

Asserts that each completes and that its score check ran - never its timings (benchmarks print ratios; tests never
assert them). The scheduler benchmark (benchmarks/bench_scheduler.py) starts `airflow standalone` and is not run
here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def smoke(script: str, *args: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args, "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=BENCHMARKS.parent,
    )
    assert completed.returncode == 0, f"{script} exited {completed.returncode}:\n{completed.stdout}\n{completed.stderr}"
    assert "[SMOKE]" in completed.stdout and "target:" in completed.stdout
    return completed.stdout


def test_cli_vs_gridsearchcv_smoke() -> None:
    out = smoke("bench_cli.py", "iris")
    assert "scores identical" in out and "done: every score cell identical" in out
    assert "wall ratio" in out and "per candidate" in out


def test_rerun_smoke() -> None:
    out = smoke("bench_rerun.py", "iris")
    assert ": 0 fitted," in out  # the rerun served every candidate from the store
    assert "scores identical to the first run" in out


def test_plan_reduce_smoke() -> None:
    out = smoke("bench_plan_reduce.py")
    assert "make_plan, 1,000 candidates" in out
    assert "results.reduce over 1,000 results" in out


def test_memory_smoke() -> None:
    out = smoke("bench_memory.py")
    assert "scores identical" in out
    assert "peak PSS of the process tree" in out and "peak RSS of the process tree" in out
