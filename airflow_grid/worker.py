"""The one entrypoint that runs candidates, identical in a local process and in a pod.

    python -m airflow_grid.worker evaluate --plan URI --candidate N [--candidate M ...] [--out PATH]
    python -m airflow_grid.worker refit --plan URI --candidate N --model PATH [--out PATH]

It needs only the worker dependencies (sklearn, numpy, pandas, joblib, fsspec, pyyaml): no Airflow, no MLflow.
A candidate already in the store is not fitted again. Exit codes: 0 done (failed fits are recorded as data
per ``error_score``), 2 bad input (plan or candidate), 3 out of memory (nothing stored), 1 anything else,
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


def evaluate_candidates(plan_uri: str, indices: list[int]) -> dict[str, Any]:
    """Evaluate candidates of a plan, serving any already in the store; returns ``{"results": [...]}``."""
    from airflow_grid import cv, data, grid
    from airflow_grid.store import Store

    plan = _load(plan_uri)
    spec = plan.spec
    store = Store(plan.store_root)
    candidates = plan.candidates
    results = []
    with tempfile.TemporaryDirectory(prefix="airflow-grid-") as cache:
        loaded: tuple[Any, Any, Any] | None = None
        bad = [index for index in indices if not 0 <= index < len(candidates)]
        if bad:  # checked before any fit, so a bad index never leaves half the work done
            shown = ", ".join(map(str, bad))
            raise BadInput(f"candidate {shown} is out of range: the plan has {len(candidates)} candidates.")
        for index in indices:
            candidate = candidates[index]
            stored = store.get_result(candidate["key"])
            if stored is not None:
                results.append({**stored, "from_store": True})
                continue
            if loaded is None:
                loaded = (
                    data.read_table(store.local_path(_file(plan, "X"), cache)),
                    data.read_table(store.local_path(_file(plan, "y"), cache)),
                    data.read_folds(store.local_path(_file(plan, "folds"), cache)),
                )
            X, y, folds = loaded
            estimator = grid.build_estimator(spec, candidate["params"])
            started = time.perf_counter()
            scores = cv.evaluate(
                estimator,
                X,
                y,
                folds,
                scoring=spec.scoring,
                metric_names=spec.metric_names,
                error_score=spec.error_score,
                return_train_score=spec.return_train_score,
                cpu=spec.resources.cpu,
            )
            result = {
                "key": candidate["key"],
                "index": index,
                "label": candidate["label"],
                "params": candidate["params"],
                **scores,
                "elapsed_s": time.perf_counter() - started,
                "peak_rss_bytes": _peak_rss_bytes(),
                "sklearn_version": plan.document["sklearn_version"],
            }
            store.put_result(candidate["key"], result)
            results.append({**result, "from_store": False})
    return {"plan_id": plan.plan_id, "results": results}


def refit_candidate(plan_uri: str, index: int, model_path: str) -> dict[str, Any]:
    """Fit a candidate on the whole search data, save it with joblib, and score it on the holdout if any."""
    import joblib
    from sklearn.metrics import check_scoring
    from threadpoolctl import threadpool_limits

    from airflow_grid import cv, data, grid
    from airflow_grid.store import Store

    plan = _load(plan_uri)
    spec = plan.spec
    store = Store(plan.store_root)
    candidates = plan.candidates
    if not 0 <= index < len(candidates):
        raise BadInput(f"candidate {index} is out of range: the plan has {len(candidates)} candidates.")
    candidate = candidates[index]
    _, threads = cv.budget(spec.resources.cpu, 1)
    os.environ.update(cv.thread_env(threads))
    with tempfile.TemporaryDirectory(prefix="airflow-grid-") as cache, threadpool_limits(limits=threads):
        X = data.read_table(store.local_path(_file(plan, "X"), cache), mmap=False)
        y = data.read_table(store.local_path(_file(plan, "y"), cache), mmap=False)
        estimator = grid.build_estimator(spec, candidate["params"])
        started = time.perf_counter()
        estimator.fit(X, y)
        fit_time = time.perf_counter() - started
        Path(model_path).parent.mkdir(parents=True, exist_ok=True)
        joblib.dump(estimator, model_path)
        outcome: dict[str, Any] = {
            "index": index,
            "key": candidate["key"],
            "params": candidate["params"],
            "model_path": model_path,
            "fit_time": fit_time,
            "holdout_metric": spec.refit_metric,
            "holdout_score": None,
        }
        if plan.file("X_holdout"):
            X_holdout = data.read_table(store.local_path(_file(plan, "X_holdout"), cache), mmap=False)
            y_holdout = data.read_table(store.local_path(_file(plan, "y_holdout"), cache), mmap=False)
            scorer = check_scoring(estimator, scoring=spec.refit_scorer)
            outcome["holdout_score"] = float(scorer(estimator, X_holdout, y_holdout))
            outcome["n_holdout"] = len(y_holdout)
    return outcome


def _load(plan_uri: str) -> Any:
    from airflow_grid.plan import load_plan
    from airflow_grid.spec import SpecError

    try:
        return load_plan(plan_uri)
    except (FileNotFoundError, KeyError, ValueError, SpecError) as error:
        raise BadInput(f"cannot read the plan at {plan_uri!r}: {error}") from error


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


def _limit_memory(limit: int) -> None:
    """Cap this process's address space (inherited by joblib workers, so the cap is per process).

    A local stand-in for a container's memory limit: an over-budget fit raises MemoryError instead of pushing the
    machine into swap. The Kubernetes backend enforces the real cgroup limit.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


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
    evaluate.add_argument("--out", help="result JSON path (default: stdout)")
    evaluate.add_argument("--memory-limit", type=int, help="address-space limit per process, bytes")
    refit = commands.add_parser("refit", help="fit a candidate on the whole search data")
    refit.add_argument("--plan", required=True)
    refit.add_argument("--candidate", type=int, required=True)
    refit.add_argument("--model", required=True, help="where to write model.joblib")
    refit.add_argument("--out", help="outcome JSON path (default: stdout)")
    args = parser.parse_args(argv)
    if getattr(args, "memory_limit", None):
        _limit_memory(args.memory_limit)
    try:
        if args.command == "evaluate":
            payload = evaluate_candidates(args.plan, args.candidate)
        else:
            payload = refit_candidate(args.plan, args.candidate, args.model)
    except BadInput as error:
        print(f"airflow-grid worker: bad input: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MemoryError as error:
        limit = f" (limit {args.memory_limit} bytes)" if getattr(args, "memory_limit", None) else ""
        print(f"airflow-grid worker: out of memory{limit}; nothing was stored: {error}", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    write_output(payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
