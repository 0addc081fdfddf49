"""Shared machinery of the paired benchmarks: run each side in a subprocess, measure it, check its scores.

Every side is a whole process started from here (``airflow-grid run`` or a GridSearchCV process), so both pay
their imports and data loading. For each side we record:

- wall seconds (``time.perf_counter`` around the process);
- CPU seconds of the process and every descendant it reaped (``RUSAGE_CHILDREN`` before/after; GridSearchCV's
  loky workers are joined at interpreter exit, so they are counted too);
- peak memory of the whole process tree, sampled every 50 ms with psutil over the process and its descendants:
  the sum of RSS (counts a page shared by several processes once per process, so a memory-mapped snapshot
  read by two workers is counted twice) and the sum of PSS from ``/proc/<pid>/smaps_rollup`` (shares each page
  among the processes mapping it: the tree's real footprint). A process living less than 50 ms can be missed.

Scores: every ``split<k>_test_*``, ``mean_test_*``, ``std_test_*``, ``rank_test_*`` (and train) column must be
equal bit for bit as float64 arrays (NaN equals NaN), or the benchmark stops with the first difference.

The GridSearchCV side is built from the spec through ``airflow_grid.spec``/``grid``/``data`` exactly as
the worker sees them (same data, holdout, folds and estimator), so both sides run the same
search. ``python benchmarks/paired.py sklearn SPEC --n-jobs 2 --out FILE`` is that side's process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SPECS = HERE / "specs"
DAG_SPECS = REPO / "dags" / "specs"
SAMPLE_INTERVAL = 0.05
SCORE_COLUMN = re.compile(r"^(split\d+_(test|train)_|(mean|std)_(test|train)_|rank_test_)")
BASELINE = "GridSearchCV(n_jobs=2)"


# --- headers --------------------------------------------------------------------------------------------------------


def header(title: str, targets: Sequence[str]) -> None:
    """What every benchmark prints first: its command line, the machine, the moment, and its targets."""
    import sklearn

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# {title}")
    print(f"$ {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.1f} GiB, {platform.machine()}, "
        f"load average {load}; Python {platform.python_version()}, scikit-learn {sklearn.__version__}, "
        f"numpy {np.__version__}"
    )
    print(f"date: {datetime.now(UTC).isoformat(timespec='seconds')}; {source_fingerprint()}")
    for target in targets:
        print(f"target: {target}")
    print(flush=True)


def source_fingerprint() -> str:
    """Which code was measured: a hash of the package's source files and the newest one's modification time."""
    import hashlib

    files = sorted((REPO / "airflow_grid").rglob("*.py"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    newest = max(files, key=lambda p: p.stat().st_mtime)
    changed = datetime.fromtimestamp(newest.stat().st_mtime, UTC).isoformat(timespec="seconds")
    return f"airflow_grid source sha256 {digest.hexdigest()[:12]} (newest file {newest.name}, {changed})"


def verdict(value: float, limit: float, *, strict: bool = False) -> str:
    met = value < limit if strict else value <= limit
    return "MET" if met else "MISSED"


# --- specs ----------------------------------------------------------------------------------------------------------


def load_spec_dict(path: str | Path) -> dict[str, Any]:
    document = yaml.safe_load(Path(path).read_text())
    assert isinstance(document, dict), f"{path}: not a mapping"
    return document


def write_spec(document: dict[str, Any], directory: str | Path, name: str) -> str:
    """Write a (possibly modified) spec as YAML for both sides; returns its path."""
    path = Path(directory) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return str(path)


# --- measuring a process tree ---------------------------------------------------------------------------------------


def _pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class TreeSampler:
    """Peak summed RSS and PSS over a process and its descendants, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL) -> None:
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0
        self.max_processes = 0
        self.at_peak: list[tuple[str, int, int]] = []  # (command, rss, pss) of each process at the PSS peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                processes = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            rss = pss = 0
            each = []
            for process in processes:
                try:
                    one_rss = process.memory_info().rss
                    command = " ".join(process.cmdline()[1:4])
                except psutil.Error:
                    continue
                one_pss = _pss_bytes(process.pid)
                rss, pss = rss + one_rss, pss + one_pss
                each.append((command, one_rss, one_pss))
            if pss > self.peak_pss:
                self.at_peak = each
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.max_processes = max(self.max_processes, len(processes))
            self._stop.wait(self.interval)


@dataclass
class Measured:
    """One side's run: what was measured, its output, and its cv_results (score columns) when it has them."""

    side: str
    wall: float
    cpu: float
    peak_rss: int
    peak_pss: int
    output: str
    cv_results: dict[str, list[Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(side: str, command: list[str], *, env: dict[str, str] | None = None, check: bool = True) -> Measured:
    """Run ``command`` to completion; wall, CPU of its reaped tree, peak RSS/PSS of its tree, its output."""
    with tempfile.TemporaryFile() as output:
        cpu_before, started = children_cpu(), time.perf_counter()
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        with TreeSampler(process.pid) as sampler:
            process.wait()
        wall, cpu = time.perf_counter() - started, children_cpu() - cpu_before
        output.seek(0)
        text = output.read().decode(errors="replace")
    if check and process.returncode != 0:
        raise SystemExit(f"{side} failed ({process.returncode}): {shlex.join(command)}\n{text[-4000:]}")
    return Measured(side, wall, cpu, sampler.peak_rss, sampler.peak_pss, text, extra={"at_peak": sampler.at_peak})


# --- the two sides --------------------------------------------------------------------------------------------------


def ours_command(spec_path: str, store: str, out: str, parallel: int = 2, per_process: int = 1) -> list[str]:
    return [
        sys.executable, "-m", "airflow_grid.cli", "--store", store, "run", spec_path, "--out", out,
        "--parallel", str(parallel), "--no-refit", "--candidates-per-process", str(per_process),
    ]  # fmt: skip


def run_ours(
    spec_path: str, store: str, out: str, *, parallel: int = 2, per_process: int = 1, side: str | None = None
) -> Measured:
    """``airflow-grid run --parallel N --no-refit`` on a store (fresh unless reused), with its cv_results."""
    name = side or f"airflow-grid run --parallel {parallel}" + (f" (K={per_process})" if per_process != 1 else "")
    measured = measure(name, ours_command(spec_path, store, out, parallel, per_process))
    measured.cv_results = json.loads((Path(out) / "cv_results.json").read_text())
    measured.extra["stored_results"] = stored_results(store)
    return measured


def run_sklearn(spec_path: str, out: str, n_jobs: int = 2) -> Measured:
    """``GridSearchCV(n_jobs=N)`` on the spec's data and folds, as its own process (this file's ``sklearn``)."""
    command = [sys.executable, str(HERE / "paired.py"), "sklearn", spec_path, "--n-jobs", str(n_jobs), "--out", out]
    measured = measure(f"GridSearchCV(n_jobs={n_jobs})", command)
    measured.cv_results = json.loads(Path(out).read_text())
    return measured


def sklearn_search(spec_path: str, n_jobs: int) -> dict[str, list[Any]]:
    """GridSearchCV(n_jobs) as a user would write it, on the spec's data (holdout removed) and folds."""
    from sklearn.model_selection import GridSearchCV

    from airflow_grid import data, grid
    from airflow_grid.spec import build, load_spec_file, parse_spec

    spec = parse_spec(load_spec_file(spec_path))
    estimator = grid.build_estimator(spec)
    dataset = data.load(spec, estimator)
    param_grid = [{k: [build(v, k, spec.policy) for v in vs] for k, vs in g.items()} for g in spec.param_grid]
    search = GridSearchCV(
        estimator, param_grid, cv=data.make_folds(spec, estimator, dataset.X, dataset.y), scoring=spec.scoring,
        refit=False, n_jobs=n_jobs, error_score=spec.error_score, return_train_score=spec.return_train_score,
    )  # fmt: skip
    search.fit(dataset.X, dataset.y)
    return {k: np.asarray(v).tolist() for k, v in search.cv_results_.items() if k != "params" and "param_" not in k}


def stored_results(store: str) -> list[dict[str, Any]]:
    """The result JSONs a run left in its store (``elapsed_s``, fit and score times per candidate)."""
    found = []
    for path in Path(store).glob("results/*/*.json"):
        try:
            found.append(json.loads(path.read_text()))
        except ValueError:
            continue
    return found


# --- checks and summaries -------------------------------------------------------------------------------------------


def score_columns(cv_results: dict[str, list[Any]]) -> list[str]:
    return [key for key in cv_results if SCORE_COLUMN.match(key)]


def _as_float64(values: list[Any]) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def check_scores(ours: dict[str, list[Any]], theirs: dict[str, list[Any]], label: str) -> int:
    """Every score column equal bit for bit (NaN == NaN); returns how many cells were compared. Fails loudly."""
    columns = score_columns(theirs)
    if not columns or set(score_columns(ours)) != set(columns):
        raise SystemExit(
            f"SCORE CHECK FAILED ({label}): columns differ:\n ours {score_columns(ours)}\n sklearn {columns}"
        )
    cells = 0
    for column in columns:
        a, b = _as_float64(ours[column]), _as_float64(theirs[column])
        if a.shape != b.shape:
            raise SystemExit(f"SCORE CHECK FAILED ({label}): {column} has {a.shape} against {b.shape}")
        both_nan = np.isnan(a) & np.isnan(b)
        same_bits = a.view(np.uint64) == b.view(np.uint64)
        bad = np.flatnonzero(~(both_nan | same_bits))
        if bad.size:
            i = int(bad[0])
            raise SystemExit(
                f"SCORE CHECK FAILED ({label}): {column}[{i}] = {a[i]!r} (ours) != {b[i]!r} (GridSearchCV); "
                f"{bad.size} of {a.size} cells differ"
            )
        cells += a.size
    return cells


def fit_seconds(cv_results: dict[str, list[Any]]) -> float:
    """Σ (fit_time + score_time) over every candidate's folds, from cv_results' means x number of splits."""
    n_splits = sum(1 for key in cv_results if re.match(r"^split\d+_test_", key)) // max(
        1, sum(1 for key in cv_results if key.startswith("mean_test_"))
    )
    fit = _as_float64(cv_results["mean_fit_time"])
    score = _as_float64(cv_results["mean_score_time"])
    return float(np.nansum(fit + score) * n_splits)


def n_candidates(cv_results: dict[str, list[Any]]) -> int:
    return len(cv_results["mean_fit_time"])


def overhead_per_candidate(measured: Measured, cores: int = 2) -> float:
    """(wall - Σ fit and score seconds / cores) / candidates."""
    assert measured.cv_results is not None
    return (measured.wall - fit_seconds(measured.cv_results) / cores) / n_candidates(measured.cv_results)


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f} MiB"


def table(rows: list[list[str]], headings: list[str]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headings, *rows, strict=True)]
    lines = [
        "  ".join(
            str(cell).rjust(w) if i else str(cell).ljust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [headings, *rows]
    ]
    return "\n".join(lines)


def paired_table(runs: list[Measured], baseline: str = BASELINE) -> str:
    """One row per side: median wall, CPU, peak tree RSS/PSS over repeats, and the ratios to the baseline's."""
    by_side: dict[str, list[Measured]] = {}
    for run in runs:
        by_side.setdefault(run.side, []).append(run)
    base = by_side[baseline]
    base_wall = statistics.median(r.wall for r in base)
    rows = []
    for side, measured in by_side.items():
        wall = statistics.median(r.wall for r in measured)
        rows.append(
            [
                side,
                " ".join(f"{r.wall:.1f}" for r in measured),
                f"{wall:.1f}",
                f"{statistics.median(r.cpu for r in measured):.1f}",
                mib(statistics.median(r.peak_rss for r in measured)),
                mib(statistics.median(r.peak_pss for r in measured)),
                f"{wall / base_wall:.2f}x",
            ]
        )
    return table(rows, ["side", "wall s (each repeat)", "median wall s", "CPU-s", "peak RSS tree", "peak PSS tree",
                        "wall ratio"])  # fmt: skip


def alternate(repeat: int, sides: list[Any]) -> list[Any]:
    """Order of the sides in a repeat: as given in even repeats, reversed in odd ones."""
    return sides if repeat % 2 == 0 else list(reversed(sides))


def worker_startup_seconds(repeats: int = 3) -> float:
    """The fastest of ``repeats`` starts of a worker process that only imports what it needs to fit."""
    code = "import airflow_grid.worker, airflow_grid.cv, sklearn.model_selection, pandas"
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
        best = min(best, time.perf_counter() - started)
    return best


def idle_worker_seconds(store: str, repeats: int = 3) -> float:
    """The fastest of ``repeats`` worker processes (as `airflow-grid run` starts them) that fit nothing: candidate 0
    of the store's plan, already in the store, so the process only starts, loads the plan and reads a result."""
    from airflow_grid import launch
    from airflow_grid.store import Store

    plan_dir = next(Path(store).glob("plans/*/plan.json")).parent
    best = float("inf")
    with tempfile.TemporaryDirectory(prefix="bench-idle-worker-") as scratch:
        command = launch.worker_command(
            "evaluate", Store(store).url(f"plans/{plan_dir.name}"), 0, out=f"{scratch}/out.json", memory_bytes=2**30
        )
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run(command, check=True, env=launch.worker_env(1), cwd=REPO, capture_output=True)
            best = min(best, time.perf_counter() - started)
        assert json.loads(Path(f"{scratch}/out.json").read_text())["results"][0]["from_store"]
    return best


# --- the GridSearchCV side as a process -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the GridSearchCV side of a paired benchmark")
    commands = parser.add_subparsers(dest="command", required=True)
    side = commands.add_parser("sklearn")
    side.add_argument("spec")
    side.add_argument("--n-jobs", type=int, default=2)
    side.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    Path(args.out).write_text(json.dumps(sklearn_search(args.spec, args.n_jobs)))


if __name__ == "__main__":
    main()
