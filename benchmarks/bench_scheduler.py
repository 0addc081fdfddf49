"""The grid-search DAG under a real scheduler against `GridSearchCV(n_jobs=2)`, run start -> select end.

    python benchmarks/bench_scheduler.py [digits iris quickfit pipeline] [--max-parallel 64] [--smoke]

Starts ``airflow standalone`` (scheduler, dag-processor, API server, triggerer; LocalExecutor on SQLite, parallelism
4) with tests/standalone.py's runner, over a temp DAGs folder holding one generated DAG file with a
``grid_search_dag`` per workload (``refit_dag_id=None``, ``retries=0``) and the pool ``grid_fits`` of 2 slots.
Each workload's DAG is triggered through REST, one at a time; its time is the DAG run's ``start_date`` to the
``select`` task's ``end_date`` (the metadata DB's own timestamps). ``quickfit`` (10,000 candidates) is triggered
with conf ``{"max_parallel": N}``, which deals the candidates into at most N evaluate tasks (Airflow maps at most
1,024). GridSearchCV(n_jobs=2) runs on the same spec right before ``airflow standalone`` starts and right after it
has stopped, so it never shares the machine with the scheduler; the ratio is to the mean of the two. Scores: the
select task's cv_results.json is checked against GridSearchCV's bit for bit.

Where the time goes is printed per workload: the plan task, the wait before the first evaluate task, the evaluate
tasks' slot-seconds against the workers' fold loops inside them (``elapsed_s`` in their results), the wait before
select, and select (which also logs to MLflow).

``--nights N``: each workload's DAG runs N times; before each run after the first the stored results are deleted
(what a re-versioned dataset does to them: everything is fitted again) while the study's cost history stays, so
the second night maps its units costliest first and batches the quick ones (README: *Order and batching by
cost*). Every night's scores are checked against the same GridSearchCV run.

``--unpaired W ...``: those workloads run through the DAG only (no GridSearchCV, no score check): GridSearchCV on
the 10,000-candidate grid did not finish within 13 minutes here. ``--smoke``: iris with 2 candidates only (still
starts a scheduler: about a minute).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import bench_cli
import paired

sys.path.insert(0, str(paired.REPO / "tests"))
from standalone import Airflow, max_overlap, parse_time, run_standalone

POOL, POOL_SLOTS, PARALLELISM = "grid_fits", 2, 4
TARGETS = {"digits": 0.8, "iris": 1.0, "pipeline": 1.0}
WORKLOADS = {
    **{name: spec for name, (spec, _, _) in bench_cli.WORKLOADS.items()},
    "quickfit": paired.SPECS / "quickfit_10k.yaml",
}

DAG_FILE = '''\
"""Grid-search DAGs for benchmarks/bench_scheduler.py (generated)."""

from pathlib import Path

from airflow_grid.dag_factory import grid_search_dag

SPECS = Path(__file__).parent / "specs"
{dags}
'''


def task_instances(server: Airflow, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    """Every task instance of a run (the REST API pages at 100)."""
    path = f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances"
    found: list[dict[str, Any]] = []
    while True:
        page = server.get(path, limit=100, offset=len(found))["task_instances"]
        found.extend(page)
        if len(page) < 100:
            return found


def seconds(start: str | None, end: str | None) -> float:
    assert start and end, f"missing timestamp: {start} {end}"
    return (parse_time(end) - parse_time(start)).total_seconds()


def run_dag(server: Airflow, name: str, conf: dict[str, Any], timeout: float, night: int = 1) -> dict[str, Any]:
    dag_id, run_id = f"bench_{name}", f"bench_{name}_night{night}_{int(time.time())}"
    response = server.trigger(dag_id, run_id, conf)
    assert response.status_code == 200, response.text
    run = server.wait_for_run(dag_id, run_id, timeout=timeout)
    assert run["state"] == "success", f"{dag_id}/{run_id} ended {run['state']}"
    tis = task_instances(server, dag_id, run_id)
    by_task: dict[str, list[dict[str, Any]]] = {}
    for ti in tis:
        by_task.setdefault(ti["task_id"], []).append(ti)
    plan, select = by_task["plan"][0], by_task["select"][0]
    evaluate = [ti for ti in by_task["evaluate"] if ti["state"] == "success"]
    elapsed = fit = 0.0
    n_results = 0
    for ti in evaluate:
        payload = server.xcom(dag_id, run_id, "evaluate", ti["map_index"])
        for result in payload["results"]:
            n_results += 1
            elapsed += result["elapsed_s"]
            fit += sum(result["fit_time"]) + sum(result["score_time"])
    selected = server.xcom(dag_id, run_id, "select")
    cv_path = Path(selected["results_uri"].removeprefix("file://")) / "cv_results.json"
    first_eval = min(parse_time(ti["start_date"]) for ti in evaluate)
    last_eval = max(parse_time(ti["end_date"]) for ti in evaluate)
    return {
        "run_id": run_id,
        "wall": seconds(run["start_date"], select["end_date"]),
        "plan_s": seconds(plan["start_date"], plan["end_date"]),
        "to_first_evaluate_s": (first_eval - parse_time(plan["end_date"])).total_seconds(),
        "evaluate_span_s": (last_eval - first_eval).total_seconds(),
        "evaluate_tasks": len(evaluate),
        "evaluate_task_s": sum(seconds(ti["start_date"], ti["end_date"]) for ti in evaluate),
        "evaluate_overlap": max_overlap([(parse_time(t["start_date"]), parse_time(t["end_date"])) for t in evaluate]),
        "fold_loops_s": elapsed,
        "fit_score_s": fit,
        "n_results": n_results,
        "to_select_s": (parse_time(select["start_date"]) - last_eval).total_seconds(),
        "select_s": seconds(select["start_date"], select["end_date"]),
        "cv_results": json.loads(cv_path.read_text()),
    }


def where_the_time_goes(name: str, got: dict[str, Any]) -> str:
    outside = got["evaluate_task_s"] - got["fold_loops_s"]
    return (
        f"{name}: where the time goes ({got['wall']:.1f}s): plan task {got['plan_s']:.1f}s; plan end -> first "
        f"evaluate start {got['to_first_evaluate_s']:.1f}s; {got['evaluate_tasks']} evaluate tasks over "
        f"{got['evaluate_span_s']:.1f}s (at most {got['evaluate_overlap']} at once) holding "
        f"{got['evaluate_task_s']:.1f} task-seconds, of which the workers' fold loops {got['fold_loops_s']:.1f}s "
        f"(Σ fit+score {got['fit_score_s']:.1f}s) and {outside:.1f}s outside them "
        f"({outside / got['evaluate_tasks']:.1f}s per task); last evaluate end -> select start "
        f"{got['to_select_s']:.1f}s; select (reduce + MLflow) {got['select_s']:.1f}s"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "workloads", nargs="*", default=["digits", "iris", "quickfit"], help=f"some of {list(WORKLOADS)}"
    )
    parser.add_argument("--max-parallel", type=int, default=64, help="quickfit: conf max_parallel (evaluate tasks)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for each DAG run")
    parser.add_argument("--smoke", action="store_true", help="iris with 2 candidates")
    parser.add_argument(
        "--nights",
        type=int,
        default=1,
        help="runs per workload; before each after the first the stored results are deleted (as a re-versioned "
        "dataset would make them unusable) but the study's cost history is kept, so night 2 shows nightly retuning",
    )
    parser.add_argument(
        "--unpaired", nargs="*", default=[], help="workloads run through the DAG only: no GridSearchCV, no score check"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.workloads = ["iris"]
    unknown = sorted(set(args.workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workloads {unknown}: choose from {list(WORKLOADS)}")
    paired.header(
        "the grid-search DAG under airflow standalone vs GridSearchCV(n_jobs=2)" + (" [SMOKE]" if args.smoke else ""),
        ["the DAG under a real scheduler, run start -> select end: ≤ 0.8x GridSearchCV(n_jobs=2) on digits, "
         "≤ 1.0x on the iris grid and the pipeline grid; the 10,000-candidate quick-fit grid is reported"],
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-scheduler-") as scratch:
        root = Path(scratch)
        specs = root / "dags" / "specs"
        specs.mkdir(parents=True)
        dags = []
        for name in args.workloads:
            document = paired.load_spec_dict(WORKLOADS[name])
            if args.smoke:
                bench_cli.WORKLOADS[name][1](document)
            paired.write_spec(document, specs, name)
            dags.append(
                f'bench_{name} = grid_search_dag("bench_{name}", SPECS / "{name}.yaml", refit_dag_id=None, retries=0)'
            )
        (root / "dags" / "bench_dags.py").write_text(DAG_FILE.format(dags="\n".join(dags)))
        spec_paths = {name: str(specs / f"{name}.yaml") for name in args.workloads}

        def sklearn_round(when: str) -> dict[str, paired.Measured]:
            done = {}
            for name in [w for w in args.workloads if w not in args.unpaired]:
                done[name] = paired.run_sklearn(spec_paths[name], f"{scratch}/{name}-{when}.json")
                print(f"GridSearchCV(n_jobs=2) {when} the scheduler, {name}: {done[name].wall:.1f}s", flush=True)
            return done

        before = sklearn_round("before")
        dag_runs: dict[str, dict[str, Any]] = {}
        with run_standalone(root, pool=POOL, pool_slots=POOL_SLOTS, parallelism=PARALLELISM) as server:
            for name, night in [(n, k) for n in args.workloads for k in range(1, args.nights + 1)]:
                conf = {"max_parallel": args.max_parallel} if name == "quickfit" else {}
                if night > 1:  # a re-versioned dataset refits everything; the study's cost history stays
                    shutil.rmtree(root / "store" / "results", ignore_errors=True)
                label = f"{name} night {night}" if args.nights > 1 else name
                try:
                    dag_runs[label] = got = run_dag(server, name, conf, args.timeout, night)
                except AssertionError as error:
                    print(f"DAG bench_{name} (conf {conf}): not finished: {str(error)[:300]}", flush=True)
                    continue
                if name in before:
                    expected = before[name].cv_results
                    assert expected is not None
                    cells = paired.check_scores(got["cv_results"], expected, f"DAG {label}")
                    checked = f"scores identical to GridSearchCV's ({cells} cells, bit for bit)"
                else:
                    checked = "unpaired: no GridSearchCV run, scores not checked"
                print(f"DAG bench_{name} {label} (conf {conf}): run start -> select end {got['wall']:.1f}s; {checked}")
                print(where_the_time_goes(label, got), flush=True)
        after = sklearn_round("after")
    print()
    rows = []
    for label in dag_runs:
        name = label.split()[0]
        got, n = dag_runs[label], dag_runs[label]["n_results"]
        target = TARGETS.get(name)
        if name in before:
            ratio = got["wall"] / statistics.mean([before[name].wall, after[name].wall])
            shown = f"≤ {target}x: {paired.verdict(ratio, target)}" if target is not None else "reported"
            sides = [f"{before[name].wall:.1f}", f"{after[name].wall:.1f}", f"{ratio:.2f}x", shown]
        else:
            sides = ["-", "-", "-", "unpaired"]
        rows.append([label, str(n), str(got["evaluate_tasks"]), f"{got['wall']:.1f}", *sides])
    print(paired.table(rows, ["workload", "candidates", "evaluate tasks", "DAG s", "GridSearchCV before s",
                              "after s", "ratio", "target"]))  # fmt: skip
    print()
    print("done: every paired DAG's scores identical to GridSearchCV's, bit for bit")


if __name__ == "__main__":
    main()
