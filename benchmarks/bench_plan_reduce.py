"""Planning 100,000 candidates and reducing 10,000 results, timed in-process with warm imports.

    python benchmarks/bench_plan_reduce.py [--candidates 100000] [--results 10000] [--smoke]

Planning: ``airflow_grid.plan.make_plan`` on benchmarks/specs/plan_100k.yaml (decision trees on iris, 100 x 100 x 10
= 100,000 candidates x 5 folds, limits.max_fits 1,000,000), on a fresh local store, after a warm-up plan of a tiny
spec in the same process (so imports are not counted). Counted: expanding and validating the grid, loading iris,
the folds, keying every candidate (a hash each), and writing the snapshot and plan.json. Not counted: parsing the
YAML spec (timed separately) and `airflow-grid plan`'s printing of one line per candidate. A re-plan of the same
spec on the same store (the plan is found and its files verified) is timed too.

Reducing: ``airflow_grid.results.reduce`` (cv_results_ assembly, ranking, winner) over 10,000 synthetic
per-candidate results of the worker's shape (5 folds, one metric, fit/score times, params of 3 keys), in a fresh
process: its time, and the process's peak RSS (``ru_maxrss``: interpreter, numpy/scipy, the synthetic results
and the reduce) against its RSS just before the reduce. Parsing the results from JSON (as the select task gets
them) and writing cv_results.json are timed separately.
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
from typing import Any

import paired

PLAN_TARGET_S, REDUCE_TARGET_S, REDUCE_TARGET_MB = 2.0, 5.0, 500


def scaled_grid(document: dict[str, Any], n: int) -> None:
    """Shrink the 100 x 100 x 10 grid to about ``n`` candidates (smoke), keeping its shape."""
    if n >= 100_000:
        return
    depth = max(1, n // 1000)
    document["param_grid"]["max_depth"] = list(range(1, depth + 1))


def plan_benchmark(n: int, profile: bool = False) -> None:
    from airflow_grid.plan import make_plan
    from airflow_grid.spec import parse_spec
    from airflow_grid.store import Store

    document = paired.load_spec_dict(paired.SPECS / "plan_100k.yaml")
    scaled_grid(document, n)
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as scratch:
        warm = {**document, "name": "bench-plan-warm-up", "param_grid": {"max_depth": [1, 2]}}
        make_plan(parse_spec(warm), Store(f"{scratch}/warm"))  # imports, first build of the estimator class
        started = time.perf_counter()
        spec = parse_spec(document)
        parsed = time.perf_counter() - started
        started = time.perf_counter()
        plan = make_plan(spec, Store(f"{scratch}/store"))
        planned = time.perf_counter() - started
        started = time.perf_counter()
        again = make_plan(parse_spec(document), Store(f"{scratch}/store"))
        replanned = time.perf_counter() - started
        size = sum(p.stat().st_size for p in (Path(scratch) / "store").rglob("plan.json"))
        assert again.plan_id == plan.plan_id
    count = len(plan.candidates)
    print(f"parse_spec: {parsed:.2f}s")
    print(
        f"make_plan, {count:,} candidates x {plan.n_splits} folds = {plan.document['n_fits']:,} fits: {planned:.2f}s "
        f"({planned / count * 1e6:.1f} µs per candidate); plan.json {size / 2**20:.1f} MiB "
        f"[target < {PLAN_TARGET_S:.0f}s for 100,000: "
        f"{paired.verdict(planned, PLAN_TARGET_S, strict=True) if count >= 100_000 else 'n/a (smoke)'}]"
    )
    print(f"re-plan (found in the store, files verified): {replanned:.2f}s", flush=True)
    if profile:
        profile_plan(document)


def profile_plan(document: dict[str, Any]) -> None:
    """Where planning's time goes: make_plan under cProfile (slower than unprofiled), top functions by own time."""
    import cProfile
    import io
    import pstats

    from airflow_grid.plan import make_plan
    from airflow_grid.spec import parse_spec
    from airflow_grid.store import Store

    document = {**document, "param_grid": dict(document["param_grid"])}
    scaled_grid(document, 10_000)  # the same grid shape at 10,000 candidates: the profiler is slow
    with tempfile.TemporaryDirectory(prefix="bench-plan-profile-") as scratch:
        profiler = cProfile.Profile()
        profiler.enable()
        make_plan(parse_spec(document), Store(scratch))
        profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    total = stats.total_tt  # type: ignore[attr-defined]
    print(f"\nprofile of make_plan on the same grid cut to 10,000 candidates (cProfile, {total:.1f}s profiled), "
          "cumulative time of the main steps:")  # fmt: skip
    rows = []
    for (filename, _, function), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        if "airflow_grid" in filename and not function.startswith("<"):
            rows.append((cumulative, f"{filename.split('airflow_grid/')[-1]}:{function}"))
    for cumulative, name in sorted(rows, reverse=True)[:12]:
        print(f"  {cumulative:7.2f}s {cumulative / total:6.1%}  {name}")


def synthetic_results(n: int, n_splits: int = 5) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import numpy as np

    rng = np.random.default_rng(0)
    params, results = [], []
    for index in range(n):
        params.append({"max_depth": index % 10 + 1, "min_samples_split": index // 10 % 100 + 2,
                       "min_samples_leaf": index // 1000 % 10 + 1})  # fmt: skip
        scores = np.round(rng.uniform(0.8, 1.0, n_splits), 4).tolist()
        results.append(
            {
                "key": f"{index:064x}",
                "index": index,
                "iter": 0,
                "label": f"candidate {index}",
                "params": params[-1],
                "test_scores": {"score": scores},
                "fit_time": rng.uniform(0.001, 0.002, n_splits).tolist(),
                "score_time": rng.uniform(0.0005, 0.001, n_splits).tolist(),
                "n_failed_fits": 0,
                "error": None,
                "elapsed_s": 0.01,
                "from_store": False,
            }
        )
    return params, results


def reduce_child(n: int) -> None:
    """In a fresh process: build the results, time the reduce; print one JSON line."""
    import psutil
    import scipy.stats  # noqa: F401  # results imports it when it ranks: warm, as the other imports are

    from airflow_grid import results as reducer

    params, results = synthetic_results(n)
    payload = json.dumps({"results": results})
    started = time.perf_counter()
    parsed = json.loads(payload)["results"]
    parse_s = time.perf_counter() - started
    rss_before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    cv_results, best = reducer.reduce(
        params, parsed, n_splits=5, metric_names=["score"], return_train_score=False, refit_metric="score"
    )
    reduce_s = time.perf_counter() - started
    started = time.perf_counter()
    written = json.dumps(reducer.to_json(cv_results))
    write_s = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"n": len(cv_results["mean_test_score"]), "best_index": best["best_index"], "parse_s": parse_s,
                      "reduce_s": reduce_s, "write_s": write_s, "json_mb": len(payload) / 2**20,
                      "cv_results_mb": len(written) / 2**20, "rss_before": rss_before, "peak_rss": peak}))  # fmt: skip


def reduce_benchmark(n: int) -> None:
    command = [sys.executable, __file__, "--reduce-child", str(n)]
    completed = subprocess.run(command, check=True, capture_output=True, text=True, cwd=paired.REPO)
    got = json.loads(completed.stdout.strip().splitlines()[-1])
    peak_mb = got["peak_rss"] / 2**20
    full = n >= 10_000
    print(f"results.reduce over {got['n']:,} results x 5 folds: {got['reduce_s']:.2f}s "
          f"[target < {REDUCE_TARGET_S:.0f}s: {paired.verdict(got['reduce_s'], REDUCE_TARGET_S, strict=True) if full else 'n/a (smoke)'}]")  # fmt: skip  # noqa: E501
    print(f"peak RSS of the reducing process (ru_maxrss, everything included): {peak_mb:.0f} MiB; RSS before the "
          f"reduce {got['rss_before'] / 2**20:.0f} MiB "
          f"[target < {REDUCE_TARGET_MB} MB: {paired.verdict(peak_mb, REDUCE_TARGET_MB, strict=True) if full else 'n/a (smoke)'}]")  # fmt: skip  # noqa: E501
    print(f"not in the reduce time: parsing the {got['json_mb']:.1f} MiB of result JSON {got['parse_s']:.2f}s; "
          f"cv_results to JSON ({got['cv_results_mb']:.1f} MiB) {got['write_s']:.2f}s", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=100_000, help="candidates to plan")
    parser.add_argument("--results", type=int, default=10_000, help="results to reduce")
    parser.add_argument("--smoke", action="store_true", help="1,000 candidates, 1,000 results")
    parser.add_argument("--profile", action="store_true", help="also profile make_plan (where the time goes)")
    parser.add_argument("--reduce-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reduce_child:
        reduce_child(args.reduce_child)
        return
    if args.smoke:
        args.candidates, args.results = 1000, 1000
    paired.header(
        "planning and reducing" + (" [SMOKE]" if args.smoke else ""),
        [f"planning 100,000 candidates < {PLAN_TARGET_S:.0f} s",
         f"reducing 10,000 results < {REDUCE_TARGET_S:.0f} s and < {REDUCE_TARGET_MB} MB"],
    )  # fmt: skip
    plan_benchmark(args.candidates, args.profile)
    reduce_benchmark(args.results)
    print("done")


if __name__ == "__main__":
    main()
