"""Paired benchmark: `airflow-grid run` against GridSearchCV on the same spec, same machine, same moment.

    python benchmarks/run_vs_gridsearchcv.py dags/specs/iris_random_forest.yaml [--parallel 2] [--repeats 1]

Prints both wall times, CPU seconds, and the ratio (ours / sklearn's), alternating the order in each repeat so
machine load hits both sides alike. It also checks that the test scores agree, because a fast wrong answer is
worthless. Absolute seconds are noisy here; read the ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.model_selection import GridSearchCV

from airflow_grid import data, grid
from airflow_grid.spec import build, load_spec_file, parse_spec


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


PER_PROCESS = ["1"]


def run_ours(spec_path: str, parallel: int) -> tuple[float, float, dict[str, list[float]]]:
    with tempfile.TemporaryDirectory() as scratch:
        cpu_before, started = child_cpu_seconds(), time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "airflow_grid.cli", "--store", f"{scratch}/store", "run", spec_path,
             "--out", f"{scratch}/out", "--parallel", str(parallel), "--no-refit",
             "--candidates-per-process", PER_PROCESS[0]],
            check=True, capture_output=True,
        )  # fmt: skip
        wall, cpu = time.perf_counter() - started, child_cpu_seconds() - cpu_before
        return wall, cpu, json.loads(Path(f"{scratch}/out/cv_results.json").read_text())


def run_sklearn(spec_path: str, parallel: int) -> tuple[float, float, dict[str, list[float]]]:
    code = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from run_vs_gridsearchcv import sklearn_search
print(json.dumps(sklearn_search({spec_path!r}, {parallel})))
"""
    cpu_before, started = child_cpu_seconds(), time.perf_counter()
    completed = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - started, child_cpu_seconds() - cpu_before
    return wall, cpu, json.loads(completed.stdout)


def sklearn_search(spec_path: str, parallel: int) -> dict[str, list[float]]:
    """GridSearchCV(n_jobs=parallel) as a user would write it, on the spec's data and folds."""
    spec = parse_spec(load_spec_file(spec_path))
    estimator = grid.build_estimator(spec)
    dataset = data.load(spec, estimator)
    param_grid = [{k: [build(v, k, spec.policy) for v in vs] for k, vs in g.items()} for g in spec.param_grid]
    search = GridSearchCV(
        estimator, param_grid, cv=data.make_folds(spec, estimator, dataset.X, dataset.y), scoring=spec.scoring,
        refit=False, n_jobs=parallel, error_score=spec.error_score,
    )  # fmt: skip
    search.fit(dataset.X, dataset.y)
    return {k: np.asarray(v).tolist() for k, v in search.cv_results_.items() if k.startswith("mean_test")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--candidates-per-process", default="1")
    args = parser.parse_args()
    PER_PROCESS[0] = args.candidates_per_process
    ratios = []
    for repeat in range(args.repeats):
        sides = [("airflow-grid run", run_ours), ("GridSearchCV", run_sklearn)]
        if repeat % 2:
            sides.reverse()
        measured = {name: runner(args.spec, args.parallel) for name, runner in sides}
        ours, theirs = measured["airflow-grid run"], measured["GridSearchCV"]
        for key, values in theirs[2].items():
            np.testing.assert_array_equal(np.asarray(ours[2][key], dtype=float), np.asarray(values, dtype=float))
        ratio = ours[0] / theirs[0]
        ratios.append(ratio)
        print(
            f"repeat {repeat}: airflow-grid run {ours[0]:.1f}s wall {ours[1]:.1f} CPU-s | "
            f"GridSearchCV(n_jobs={args.parallel}) {theirs[0]:.1f}s wall {theirs[1]:.1f} CPU-s | "
            f"wall ratio {ratio:.2f}x | scores identical"
        )
    print(f"median wall ratio (ours / GridSearchCV): {float(np.median(ratios)):.2f}x over {len(ratios)} repeats")


if __name__ == "__main__":
    main()
