"""`airflow-grid run --parallel 2` against `GridSearchCV(n_jobs=2)`: paired, alternating, scores checked.

    python benchmarks/bench_cli.py [digits iris pipeline] [--repeats 2] [--per-process 1 4] [--rows N] [--smoke]

Workloads: ``digits`` (dags/specs/digits_model_family.yaml, 21 candidates), ``iris`` (dags/specs/iris_random_forest
.yaml, 18 quick candidates) and ``pipeline`` (benchmarks/specs/pipeline_pca_logreg.yaml: StandardScaler → PCA →
LogisticRegression on make_classification 100,000 x 100, 16 candidates x 5 folds). Each repeat runs every side
once, in alternating order, each on a fresh result store; every score cell is checked bit for bit.

Orchestration overhead per candidate = (wall - Σ(fit_time + score_time over all folds) / 2 cores) / candidates,
from each side's own cv_results. For our side it is split further: Σ elapsed_s of the workers' fold loops (read
from the result store) against the slot-seconds (wall x parallel) outside them — process start-up, imports,
loading the snapshot, planning and reducing.

``--history``: every measured run of ours gets the cost history (``costs/`` only) of one unmeasured warm-up run,
as a study's second night has it: units start costliest first (README: *Order and batching by cost*).

``--smoke``: tiny grids and data, one repeat, seconds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paired

SMOKE: dict[str, Callable[[dict[str, Any]], None]] = {}


def _smoke_digits(spec: dict[str, Any]) -> None:
    spec["param_grid"] = [{"clf": [{"_target_": "sklearn.svm.SVC"}], "clf__C": [1, 10]}]
    spec["cv"] = 3


def _smoke_iris(spec: dict[str, Any]) -> None:
    spec["param_grid"] = {"n_estimators": [5], "max_depth": [None, 3]}
    spec["cv"] = 3


def _smoke_pipeline(spec: dict[str, Any]) -> None:
    spec["data"].update(n_samples=1000, n_features=20, n_informative=10, n_redundant=5)
    spec["param_grid"] = {"pca__n_components": [5, 10], "clf__C": [0.1, 1]}
    spec["cv"] = 3


WORKLOADS: dict[str, tuple[Path, Callable[[dict[str, Any]], None], float | None]] = {
    # name: (spec, smoke override, target wall ratio to GridSearchCV(n_jobs=2))
    "digits": (paired.DAG_SPECS / "digits_model_family.yaml", _smoke_digits, 0.7),
    "iris": (paired.DAG_SPECS / "iris_random_forest.yaml", _smoke_iris, None),
    "pipeline": (paired.SPECS / "pipeline_pca_logreg.yaml", _smoke_pipeline, 0.4),
}
OVERHEAD_TARGET = 0.5


def run_workload(
    name: str, spec_path: str, repeats: int, per_process: list[int], scratch: str, history: bool = False
) -> None:
    target = WORKLOADS[name][2]
    print(f"## {name}: {spec_path}" + (" (with the study's cost history)" if history else ""), flush=True)
    warm = f"{scratch}/{name}-warm-up"
    if history:  # last night's run: only its costs/ are handed to the measured runs, not its results
        paired.run_ours(spec_path, f"{warm}/store", f"{warm}/out")
        print(f"warm-up run (not measured) left {warm}/store/costs", flush=True)
    sides: list[tuple[str, int | None]] = [(f"ours K={k}", k) for k in per_process] + [("sklearn", None)]
    runs: list[paired.Measured] = []
    by_side: dict[str, list[paired.Measured]] = {side: [] for side, _ in sides}
    for repeat in range(repeats):
        measured: dict[str, paired.Measured] = {}
        for side, k in paired.alternate(repeat, sides):
            where = f"{scratch}/{name}-{repeat}-{side.replace(' ', '_')}"
            if k is None:
                measured[side] = paired.run_sklearn(spec_path, f"{where}.json")
            else:
                if history:
                    shutil.copytree(f"{warm}/store/costs", f"{where}/store/costs")
                measured[side] = paired.run_ours(spec_path, f"{where}/store", f"{where}/out", per_process=k)
        theirs = measured["sklearn"]
        assert theirs.cv_results is not None
        cells = 0
        for side, k in sides:
            if k is not None:
                ours = measured[side]
                assert ours.cv_results is not None
                cells = paired.check_scores(ours.cv_results, theirs.cv_results, f"{name} repeat {repeat} {side}")
        order = " then ".join(measured[s].side for s, _ in paired.alternate(repeat, sides))
        walls = ", ".join(f"{measured[s].side} {measured[s].wall:.1f}s" for s, _ in sides)
        print(f"repeat {repeat} ({order}): {walls}; scores identical ({cells} cells per side, bit for bit)")
        runs.extend(measured[s] for s, _ in sides)
        for s, _ in sides:
            by_side[s].append(measured[s])
    print()
    print(paired.paired_table(runs))
    print()
    base_wall = statistics.median(r.wall for r in by_side["sklearn"])
    for side, k in sides:
        of_side = by_side[side]
        overhead = statistics.median(paired.overhead_per_candidate(r) for r in of_side)
        first = of_side[0]
        assert first.cv_results is not None
        n = paired.n_candidates(first.cv_results)
        fit = statistics.median(paired.fit_seconds(r.cv_results or {}) for r in of_side)
        line = (
            f"{first.side}: Σ fit+score {fit:.1f}s over {n} candidates; overhead (wall - Σ/2) / candidates = "
            f"{overhead:.2f}s per candidate"
        )
        if k is not None:
            line += f" [target ≤ {OVERHEAD_TARGET}s: {paired.verdict(overhead, OVERHEAD_TARGET)}]"
            elapsed = statistics.median(sum(x["elapsed_s"] for x in r.extra["stored_results"]) for r in of_side)
            wall = statistics.median(r.wall for r in of_side)
            outside = (wall * 2 - elapsed) / n
            line += (
                f"\n    workers' fold loops Σ elapsed_s {elapsed:.1f}s (Σ fit+score {fit:.1f}s); slot-seconds outside "
                f"the fold loops (start-up, imports, snapshot, plan, reduce) {wall * 2 - elapsed:.1f}s = "
                f"{outside:.2f}s per candidate"
            )
            ratio = wall / base_wall
            if target is not None:
                line += f"\n    wall ratio {ratio:.2f}x [target ≤ {target}x: {paired.verdict(ratio, target)}]"
            else:
                line += f"\n    wall ratio {ratio:.2f}x (no target for this workload under airflow-grid run)"
        print(line)
    print(flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="*", default=list(WORKLOADS), help=f"some of {list(WORKLOADS)}")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--per-process", type=int, nargs="+", default=[1], help="--candidates-per-process values")
    parser.add_argument("--rows", type=int, help="pipeline: n_samples instead of the spec's 100,000")
    parser.add_argument("--smoke", action="store_true", help="tiny grids and data, one repeat")
    parser.add_argument(
        "--history",
        action="store_true",
        help="give each measured run the cost history of an unmeasured warm-up run (costs/ only, no results): "
        "units then start costliest first, as on a study's second night",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workloads {unknown}: choose from {list(WORKLOADS)}")
    repeats = 1 if args.smoke else args.repeats
    targets = [
        "airflow-grid run --parallel 2 ≤ 0.7x GridSearchCV(n_jobs=2) wall on digits, ≤ 0.4x on the pipeline grid",
        f"orchestration overhead (wall - Σ fit time / cores) ≤ {OVERHEAD_TARGET} s per candidate",
    ]
    paired.header("airflow-grid run --parallel 2 vs GridSearchCV(n_jobs=2)" + (" [SMOKE]" if args.smoke else ""),
                  targets)  # fmt: skip
    startup = paired.worker_startup_seconds()
    print(f"worker process start-up (python -c 'import airflow_grid.worker, ...', best of 3): {startup:.2f}s\n")
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as scratch:
        for name in args.workloads:
            spec_path, smoke, _ = WORKLOADS[name]
            document = paired.load_spec_dict(spec_path)
            if args.smoke:
                smoke(document)
            if args.rows and name == "pipeline":
                document["data"]["n_samples"] = args.rows
            spec = paired.write_spec(document, scratch, name)
            run_workload(name, spec, repeats, args.per_process, scratch, history=args.history)
    print("done: every score cell identical to GridSearchCV's, bit for bit")


if __name__ == "__main__":
    main()
