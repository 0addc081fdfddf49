"""The one entrypoint that runs candidates, identical in a local process and in a pod.

    python -m airflow_grid.worker evaluate --plan URI --candidate N [--candidate M ...] [--round R] [--out P]
                                     [--memory-limit B]
    python -m airflow_grid.worker refit --plan URI --candidate N [--round R] --model PATH [--out PATH]
                                  [--memory-limit B]

It needs only the worker dependencies (sklearn, numpy, pandas, joblib, fsspec, pyyaml, psutil): no Airflow, no MLflow.
A candidate already in the store is not fitted again. Exit codes: 0 done (failed fits are recorded as data
per ``error_score``), 2 bad input (plan, candidate, a memory budget too small to start, a plan naming other
library versions than this worker runs, a snapshot whose size or sha256 is not plan.json's), 3 out of memory: the
whole process tree went over ``--memory-limit`` (nothing stored; see limits.MemoryWatchdog), 1 anything else,
including a fit error under ``error_score="raise"`` - Airflow retries those.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2
EXIT_OUT_OF_MEMORY = 3
XCOM_RETURN_PATH = "/airflow/xcom/return.json"


class BadInput(Exception):
    """The plan or the candidate index is unusable: retrying cannot help."""


def evaluate_candidates(plan_uri: str, indices: list[int], iteration: int = 0, plan: Any = None) -> dict[str, Any]:
    """Evaluate candidates of a plan in one round, serving any already in the store; returns ``{"results": [...]}``.

    ``iteration`` is the successive-halving round (0 for grid and random searches): it sets the resource.
    Candidates whose work is provably shared are evaluated together (:func:`airflow_grid.plan.share`: warm-start
    chains, shared pipeline prefixes; same scores), unless ``units: candidate`` or ``resources.timeout`` is set.
    """
    from airflow_grid.plan import share
    from airflow_grid.store import Store

    plan = plan or _load(plan_uri)
    _check_versions(plan)  # before anything is served or fitted: this worker's keys must be the plan's keys
    spec = plan.spec
    store = Store(plan.store_root)
    _mark_in_use(store, plan.plan_id)
    n_candidates = len(plan.candidates)
    bad = [index for index in indices if not 0 <= index < n_candidates]
    if bad:  # checked before any fit, so a bad index never leaves half the work done
        raise BadInput(f"candidate {', '.join(map(str, bad))} is out of range: the plan has {n_candidates} candidates.")
    if not 0 <= iteration < plan.n_rounds:
        raise BadInput(f"round {iteration} is out of range: the plan has {plan.n_rounds} round(s).")
    rows = [plan.row(iteration, index) for index in indices]
    done: dict[int, dict[str, Any]] = {}
    for row in rows:
        stored = store.get_result(row["key"])
        if stored is not None:  # the same key may have been stored by an equal candidate: this row names itself
            done[row["index"]] = {**stored, **_names(row), "from_store": True}
    pending = [row for row in rows if row["index"] not in done]
    with tempfile.TemporaryDirectory(prefix="airflow-grid-") as cache:
        inputs = _Inputs(plan, store, cache)
        for kind, group in share(spec, pending):  # warm-start chains, shared prefixes, the rest alone
            for result in _evaluate_group(plan, kind, group, inputs):
                store.put_result(result["key"], result)
                done[result["index"]] = {**result, "from_store": False}
    return {"plan_id": plan.plan_id, "results": [done[row["index"]] for row in rows]}


def _names(row: dict[str, Any]) -> dict[str, Any]:
    return {"index": row["index"], "iter": row["iter"], "label": row["label"], "params": row["params"]}


class _Inputs:
    """The round's snapshot files, read (and verified) on first use: a worker serving only stored results
    reads nothing."""

    def __init__(self, plan: Any, store: Any, cache: str) -> None:
        self.plan, self.store, self.cache = plan, store, cache
        self._loaded: tuple[Any, Any, Any, dict[str, Any]] | None = None

    def get(self, folds_name: str) -> tuple[Any, Any, Any, dict[str, Any]]:
        from airflow_grid import data

        if self._loaded is None:
            plan, store, cache = self.plan, self.store, self.cache
            self._loaded = (
                data.read_table(_verified_path(plan, store, "X", cache)),
                data.read_table(_verified_path(plan, store, "y", cache)),
                data.read_folds(_verified_path(plan, store, folds_name, cache)),
                _fit_params(plan, store, cache),
            )
        return self._loaded


def _evaluate_group(plan: Any, kind: str, group: list[dict[str, Any]], inputs: _Inputs) -> list[dict[str, Any]]:
    """Evaluate one candidate, a warm-start chain or a shared-prefix group, into results ready for the store."""
    from airflow_grid import chains, cv, grid, prefix_cache, scoring_spec

    spec = plan.spec
    X, y, folds, fit_params = inputs.get(group[0]["folds"])
    estimator = grid.build_estimator(spec, group[0]["params"])
    capped = _cap_n_jobs(estimator, cv.budget(spec.resources.cpu, len(folds))[1], spec, group[0]["index"])
    common: dict[str, Any] = {
        "scoring": scoring_spec.scorers(spec),
        "metric_names": spec.metric_names,
        "error_score": spec.error_score,
        "return_train_score": spec.return_train_score,
        "cpu": spec.resources.cpu,
        "fit_params": fit_params,
    }
    started = time.perf_counter()
    extra: dict[str, Any] = {}
    final = _reusable_prefix(spec, estimator)
    if kind == "alone" and final is not None and spec.units == "candidate":
        kind = "prefix"  # one candidate per task: its pipeline's prefix may come from another task (prefix_cache)
    if kind == "alone":
        timeout = {"timeout": spec.resources.timeout, "timeout_text": spec.resources.timeout_text}
        all_scores = [cv.evaluate(estimator, X, y, folds, **timeout, **common)]
    elif kind == "prefix":
        estimators = [estimator] + [grid.build_estimator(spec, row["params"]) for row in group[1:]]
        for row, other in zip(group[1:], estimators[1:], strict=True):
            _cap_n_jobs(other, cv.budget(spec.resources.cpu, len(folds))[1], spec, row["index"])
        cache = None
        if spec.units == "candidate":  # the only way a prefix's fold is fitted in several tasks of one search
            key = prefix_cache.prefix_key(spec, plan.document, group[0], str(final), spec.return_train_score)
            cache = prefix_cache.PrefixCache(inputs.store, key)
        all_scores = cv.evaluate_shared_prefix(estimators, X, y, folds, prefix_cache=cache, **common)
        extra["shared_prefix"] = [name for name, _ in estimators[0].steps[:-1]]  # fit_time includes the prefix's
    else:
        name = str(chains.size_param(group[0]["params"]))
        sizes = [int(row["params"][name]) for row in group]
        all_scores = cv.evaluate_chain(estimator, name, sizes, X, y, folds, **common)
        extra["chain"] = {"param": name, "sizes": sizes}  # fit_time is cumulative along the chain
    elapsed = time.perf_counter() - started
    return [
        {
            "key": row["key"],
            **_names(row),
            **scores,
            **extra,
            "elapsed_s": elapsed,
            "peak_rss_bytes": _peak_rss_bytes(),
            "n_jobs_capped": capped,
            "sklearn_version": plan.document["sklearn_version"],
            "versions": plan.document["versions"],
        }
        for row, scores in zip(group, all_scores, strict=True)
    ]


def _reusable_prefix(spec: Any, estimator: Any) -> str | None:
    """A pipeline's final step name when its prefix may be shared (no fit params, no per-fold timeout)."""
    from airflow_grid import prefixes

    if spec.fit_params or spec.resources.timeout is not None:
        return None
    return prefixes.final_step(estimator)


def refit_candidate(plan_uri: str, index: int, model_path: str, iteration: int = 0) -> dict[str, Any]:
    """Fit a candidate (as its row in round ``iteration``) on the whole search data, save it with joblib, and
    score it on the holdout if any."""
    import joblib
    from sklearn.metrics import check_scoring
    from threadpoolctl import threadpool_limits

    from airflow_grid import cv, data, grid, scoring_spec
    from airflow_grid.store import Store

    plan = _load(plan_uri)
    _check_versions(plan)
    spec = plan.spec
    store = Store(plan.store_root)
    _mark_in_use(store, plan.plan_id)
    candidates = plan.candidates
    if not 0 <= index < len(candidates):
        raise BadInput(f"candidate {index} is out of range: the plan has {len(candidates)} candidates.")
    if not 0 <= iteration < plan.n_rounds:
        raise BadInput(f"round {iteration} is out of range: the plan has {plan.n_rounds} round(s).")
    candidate = plan.row(iteration, index)  # halving: the winner's params with the last round's resource
    _, threads = cv.budget(spec.resources.cpu, 1)
    os.environ.update(cv.thread_env(threads))
    with tempfile.TemporaryDirectory(prefix="airflow-grid-") as cache, threadpool_limits(limits=threads):
        X = data.read_table(_verified_path(plan, store, "X", cache), mmap=False)
        y = data.read_table(_verified_path(plan, store, "y", cache), mmap=False)
        estimator = grid.build_estimator(spec, candidate["params"])
        capped = _cap_n_jobs(estimator, threads, spec, index)
        started = time.perf_counter()
        estimator.fit(X, y, **_fit_params(plan, store, cache))  # as GridSearchCV's refit: the whole search data
        fit_time = time.perf_counter() - started
        Path(model_path).parent.mkdir(parents=True, exist_ok=True)
        joblib.dump(estimator, model_path)
        outcome: dict[str, Any] = {
            "index": index,
            "key": candidate["key"],
            "params": candidate["params"],
            "model_path": model_path,
            "fit_time": fit_time,
            "n_jobs_capped": capped,
            "holdout_metric": spec.refit_metric,
            "holdout_score": None,
        }
        if plan.file("X_holdout"):
            X_holdout = data.read_table(_verified_path(plan, store, "X_holdout", cache), mmap=False)
            y_holdout = data.read_table(_verified_path(plan, store, "y_holdout", cache), mmap=False)
            scorer = check_scoring(estimator, scoring=scoring_spec.refit_scorer(spec))
            outcome["holdout_score"] = float(scorer(estimator, X_holdout, y_holdout))
            outcome["n_holdout"] = len(y_holdout)
    return outcome


def _mark_in_use(store: Any, plan_id: str) -> None:
    """Tell `airflow-grid gc` the plan is in use; best effort, because the planner marked it already.

    A pod runs as another user than the planner and may not write into the plan's directory: that must not fail
    the candidate.
    """
    try:
        store.touch_in_use(plan_id)
    except OSError as error:
        print(f"airflow-grid worker: could not mark plan {plan_id} in use ({error}); continuing", file=sys.stderr)


def _load(plan_uri: str) -> Any:
    from airflow_grid.plan import load_plan
    from airflow_grid.spec import SpecError

    try:
        return load_plan(plan_uri)
    except (FileNotFoundError, KeyError, TypeError, ValueError, SpecError) as error:
        raise BadInput(f"cannot read the plan at {plan_uri!r}: {error}; fix: {_REPLAN}.") from error


_REPLAN = "re-run the plan task (or airflow-grid run): the planner rebuilds damaged snapshots"


def _check_versions(plan: Any) -> None:
    """Refuse a plan made under other library versions: its keys would label this worker's scores wrongly."""
    from airflow_grid import versions

    recorded = plan.document.get("versions") or {}
    planned = {**recorded, "result-format": str(plan.document.get("result_format"))}
    running = {**versions.versions_of(recorded), "result-format": str(versions.RESULT_FORMAT)}
    theirs, ours = versions.mismatch(planned, running)
    if theirs:
        raise BadInput(
            f"plan {plan.plan_id} names {versions.describe(theirs)} but this worker runs {versions.describe(ours)}; "
            "nothing was fitted or stored. fix: re-plan the study with the worker's versions (rerun the DAG / "
            "airflow-grid run), or run a worker image with the plan's versions."
        )


def _fit_params(plan: Any, store: Any, cache: str) -> dict[str, Any]:
    """The spec's fit parameters over the whole search data (verified like every snapshot), or {}."""
    from airflow_grid import data

    if not plan.file("fit_params"):
        return {}
    return data.read_fit_params(_verified_path(plan, store, "fit_params", cache))


def _verified_path(plan: Any, store: Any, name: str, cache: str) -> str:
    """A local copy of a snapshot file whose size and sha256 match plan.json: never a silently damaged input."""
    from airflow_grid.store import file_check

    relative = _file(plan, name)
    expected = plan.document.get("file_checks", {}).get(name)
    try:
        path = store.local_path(relative, cache)
        found = file_check(path)
    except FileNotFoundError:
        raise BadInput(f"snapshot {store.url(relative)} is missing; fix: {_REPLAN}.") from None
    if found != expected:
        raise BadInput(
            f"snapshot {store.url(relative)} is damaged: {found['size']} bytes, sha256 {found['sha256'][:12]}, "
            f"but plan.json records {_show_check(expected)}; nothing was fitted. fix: {_REPLAN}."
        )
    return path


def _show_check(check: Any) -> str:
    if not isinstance(check, dict):
        return "no check for it (a plan from an older airflow-grid)"
    return f"{check.get('size')} bytes, sha256 {str(check.get('sha256'))[:12]}"


def _file(plan: Any, name: str) -> str:
    relative = plan.file(name)
    if relative is None:
        raise BadInput(f"the plan has no {name} file.")
    return str(relative)


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process and its (joblib) children, in bytes (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return int(max(own, children) * 1024)


def _cap_n_jobs(estimator: Any, limit: int, spec: Any, index: int) -> dict[str, dict[str, Any]]:
    """Cap every ``n_jobs`` in the candidate to its CPU budget (see limits.cap_n_jobs) and say so on stderr."""
    from airflow_grid import limits

    capped = limits.cap_n_jobs(estimator, limit)
    for path, change in capped.items():
        print(
            f"airflow-grid worker: candidate {index}: capped {path}={change['asked']!r} to {change['used']} "
            f"(resources.cpu={spec.resources.cpu_text})",
            file=sys.stderr,
        )
    return capped


def _guard_memory(limit: int) -> Any:
    """Refuse a budget too small to start (bad input), then watch the whole process tree against it.

    The fit's imports happen first, so the start-up figure is what every candidate pays before touching data.
    """
    import psutil
    import sklearn.model_selection  # noqa: F401 (measured into the start-up figure)

    from airflow_grid import cv, data, grid, limits  # noqa: F401

    problem = limits.startup_problem(limit, psutil.Process().memory_info().rss)
    if problem:
        raise BadInput(problem)
    return limits.MemoryWatchdog(limit, limits.exit_out_of_memory(EXIT_OUT_OF_MEMORY)).start()


def serve(plan_uri: str, requests: Any, replies: Any) -> int:
    """``serve``: evaluate request after request in one process, paying the start-up (imports, plan) once.

    ``airflow-grid run`` keeps one such worker per parallel slot. Each request line is ``{"indices": [...],
    "round": r}``; each reply line is what ``evaluate`` would write, or ``{"bad_input": message}``. Any other
    failure ends the process as ``evaluate`` would end (exit 1, 3 out of memory) with no reply for the request in
    flight; its finished candidates are in the store. End of input: exit 0.
    """
    plan = None
    for line in requests:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            plan = plan or _load(plan_uri)
            payload = evaluate_candidates(plan_uri, list(request["indices"]), int(request.get("round", 0)), plan)
        except BadInput as error:
            payload = {"bad_input": str(error)}
        replies.write(json.dumps(payload, allow_nan=True) + "\n")
        replies.flush()
    return 0


def _protocol_stdout() -> Any:
    """The original stdout for protocol lines; fd 1 (print, C libraries) then goes to stderr, so nothing else can
    interleave with a reply."""
    replies = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)
    return replies


def write_output(payload: dict[str, Any], out: str | None) -> None:
    """Write the result JSON atomically (a reader, such as KPO's xcom sidecar, never sees half of it)."""
    text = json.dumps(payload, allow_nan=True)
    if out is None:
        print(text)
        return
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m airflow_grid.worker", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    evaluate = commands.add_parser("evaluate", help="evaluate candidates of a plan")
    evaluate.add_argument("--plan", required=True, help="plan URI (store root/plans/<plan_id>)")
    evaluate.add_argument("--candidate", type=int, action="append", required=True, help="candidate index")
    evaluate.add_argument("--round", type=int, default=0, help="successive-halving round (default 0)")
    evaluate.add_argument("--out", help="result JSON path (default: stdout)")
    memory_help = "memory budget in bytes for all the worker's processes (default: $AIRFLOW_GRID_MEMORY_BYTES)"
    evaluate.add_argument("--memory-limit", type=int, help=memory_help)
    server = commands.add_parser("serve", help="evaluate requests read from stdin, one JSON line each")
    server.add_argument("--plan", required=True, help="plan URI (store root/plans/<plan_id>)")
    server.add_argument("--memory-limit", type=int, help=memory_help)
    refit = commands.add_parser("refit", help="fit a candidate on the whole search data")
    refit.add_argument("--plan", required=True)
    refit.add_argument("--candidate", type=int, required=True)
    refit.add_argument("--round", type=int, default=0, help="the winner's successive-halving round (default 0)")
    refit.add_argument("--model", required=True, help="where to write model.joblib")
    refit.add_argument("--out", help="outcome JSON path (default: stdout)")
    refit.add_argument("--memory-limit", type=int, help=memory_help)
    args = parser.parse_args(argv)
    memory_limit = args.memory_limit or int(os.environ.get("AIRFLOW_GRID_MEMORY_BYTES") or 0)  # launch.MEMORY_ENV
    watchdog = None
    try:
        watchdog = _guard_memory(memory_limit) if memory_limit else None
        if args.command == "serve":
            return serve(args.plan, sys.stdin, _protocol_stdout())
        if args.command == "evaluate":
            payload = evaluate_candidates(args.plan, args.candidate, args.round)
        else:
            payload = refit_candidate(args.plan, args.candidate, args.model, args.round)
    except BadInput as error:
        print(f"airflow-grid worker: bad input: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MemoryError as error:
        limit = f" (budget {memory_limit} bytes)" if memory_limit else ""
        print(f"airflow-grid worker: out of memory{limit}; nothing was stored: {error}", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    finally:
        if watchdog is not None:
            watchdog.stop()
    write_output(payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
