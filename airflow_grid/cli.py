"""`airflow-grid plan|run`: the whole pipeline on one machine, no Airflow database needed.

``run`` plans once, runs every candidate through the worker as its own process (N at a time, each inside the
spec's CPU budget), reduces to cv_results_, refits the winner and scores the holdout - the same steps, files and
worker the Airflow DAG uses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_grid import rerun, versions
from airflow_grid.errors import SpecError
from airflow_grid.policy import Policy
from airflow_grid.spec import load_spec_file, parse_spec
from airflow_grid.store import Store

if TYPE_CHECKING:
    from airflow_grid.plan import Plan

# scikit-learn, scipy and the planner are imported where they are used: a rerun answered from the store
# (:mod:`airflow_grid.rerun`) needs none of them.


class RunFailed(RuntimeError):
    """Some candidates could not be evaluated; results already computed stay in the store."""


def plan_command(args: argparse.Namespace) -> int:
    from airflow_grid.plan import make_plan

    spec = parse_spec(load_spec_file(args.spec))
    plan = make_plan(spec, Store(args.store))
    document = plan.document
    print(f"study {spec.name}: {len(plan.candidates)} candidates x {plan.n_splits} folds = {document['n_fits']} fits")
    if document.get("halving"):  # successive halving: the rounds the plan decided (survivors come from scores)
        rounds = document["halving"]
        shown = ", ".join(
            f"{n} x {rounds['resource']}={r}"
            for n, r in zip(rounds["n_candidates_per_round"], rounds["n_resources"], strict=True)
        )
        print(f"search {spec.strategy}: {rounds['n_iterations']} rounds (factor {rounds['factor']}): {shown}")
    print(f"budget guard: {document['n_fits']} <= limits.max_fits={spec.max_fits}: ok")
    print(f"resources per candidate: {spec.resources.to_json()} -> n_jobs <= {spec.resources.n_jobs}")
    print(f"data: {document['n_samples']} search rows, fingerprint {document['data_fingerprint'][:12]}")
    if spec.data.get("groups") or spec.fit_params:  # both in the fingerprint; groups only shape the folds
        shown = ", ".join(f"{name} <- {column}" for name, column in spec.fit_params.items()) or "none"
        print(f"groups: {spec.data.get('groups') or 'none'}; fit params (sliced per fold): {shown}")
    print(f"keys name: {versions.describe(document['versions'])}, result format {document['result_format']}")
    _print_unseeded(plan)
    print(f"plan: {plan.uri}")
    store = Store(plan.store_root)
    for candidate in plan.candidates:
        cached = " (in store)" if store.exists(store.result_path(candidate["key"])) else ""
        print(f"  [{candidate['index']:>3}] {candidate['label']}{cached}")
    return 0


def run_command(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    document = load_spec_file(args.spec)
    store = Store(args.store)
    policy = Policy.from_env().to_json()
    answered = rerun.answer(store, document, policy)
    if answered is not None:
        return _answered_from_store(args, answered, started)
    spec = parse_spec(document)
    cv_text, summary, winner, board, plan = _search(args, spec, store)
    reduced = {"cv_results_json": cv_text, "best": summary, "winner": winner, "leaderboard": board}
    if rerun.decided_by_inputs(spec, plan.document):
        digest = rerun.results_digest(store, [candidate["key"] for candidate in plan.candidates])
        identity = rerun.data_identity(document)
        if digest is not None and identity is not None:
            rerun.remember(store, rerun.lookup_key(document, policy, identity), plan.plan_id, digest, reduced)
    return _write_outputs(args, spec, plan.uri, plan.document, reduced, started)


def _search(args: argparse.Namespace, spec: Any, store: Store) -> tuple[str, dict[str, Any], dict[str, Any], str, Plan]:
    """Plan, evaluate every round, reduce: (cv_results.json text, best.json content, the winner's row, the
    leaderboard text, the plan)."""
    from airflow_grid import leaderboard, results
    from airflow_grid.plan import make_plan

    plan = make_plan(spec, store)
    cores = os.cpu_count() or 1
    parallel = args.parallel or max(1, cores // max(1, math.ceil(spec.resources.cpu)))
    n = len(plan.candidates)
    print(
        f"study {spec.name}: {n} candidates x {plan.n_splits} folds = {plan.document['n_fits']} fits, "
        f"{parallel} at a time, {spec.resources.to_json()} each; store {store.root}",
        flush=True,
    )
    _print_unseeded(plan)
    found: dict[tuple[int, int], dict[str, Any]] = {}
    for iteration in range(plan.n_rounds):  # successive halving: each round's survivors from the previous results
        indices = plan.rounds(lambda itr, index: found.get((itr, index)))[iteration]
        if plan.n_rounds > 1:
            print(f"round {iteration}: {len(indices)} candidates", flush=True)
        rows = [plan.row(iteration, index) for index in indices]
        for result in evaluate_all(plan, store, parallel, spec.resources.cpu, args.candidates_per_process, rows):
            found[(iteration, result["index"])] = result
    rounds = plan.rounds(lambda itr, index: found.get((itr, index)))
    candidate_results = [found[(itr, index)] for itr, indices in enumerate(rounds) for index in indices]
    fitted = sum(1 for r in candidate_results if not r["from_store"])
    n = len(candidate_results)
    print(f"evaluated {n} candidates: {fitted} fitted, {n - fitted} from store", flush=True)

    cv_results, best_fields = plan.reduce(candidate_results, rounds)
    plan.remember_costs(rounds, candidate_results)  # the next run of this study starts its slowest units first
    best = best_fields["best_index"]
    winner = plan.row(best_fields.get("best_iter", 0), best_fields.get("best_candidate", best))
    summary: dict[str, Any] = {**best_fields, "study": spec.name, "plan_id": plan.plan_id}
    cv_text = json.dumps(results.to_json(cv_results), indent=1)
    board = leaderboard.render(cv_results, spec.refit_metric, best_index=best)
    return cv_text, summary, {k: winner[k] for k in ("index", "iter", "label")}, board, plan


def _answered_from_store(args: argparse.Namespace, answered: dict[str, Any], started: float) -> int:
    """A rerun with nothing changed: the stored outcome, written as a full run writes it."""
    document = answered["document"]
    n = len(document["candidates"])
    print(
        f"study {document['study']}: nothing changed since plan {answered['plan_id']} (same spec, policy, data and "
        f"library versions): answered from store {args.store or Store().root}",
        flush=True,
    )
    for count, (candidate, result) in enumerate(zip(document["candidates"], answered["results"], strict=True), 1):
        _progress(count, n, candidate, {**result, "from_store": True})
    print(f"evaluated {n} candidates: 0 fitted, {n} from store", flush=True)
    spec = None if args.no_refit else parse_spec(document["spec"], policy=Policy.from_json(document["policy"]))
    return _write_outputs(args, spec, answered["plan_uri"], document, answered, started)


def _write_outputs(
    args: argparse.Namespace,
    spec: Any,
    plan_uri: str,
    document: dict[str, Any],
    reduced: dict[str, Any],
    started: float,
) -> int:
    """cv_results.json, best.json, the winner's refit (unless --no-refit) and the leaderboard."""
    summary, winner = dict(reduced["best"]), reduced["winner"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cv_results.json").write_text(reduced["cv_results_json"])
    (out / "best.json").write_text(json.dumps(summary, indent=1))
    metric = summary["refit_metric"]
    print(f"winner [{summary['best_index']}] {winner['label']}: mean_test_{metric}={summary['best_score']:.4f}")
    if not args.no_refit:
        from airflow_grid import launch

        refit = launch.worker_command(
            "refit",
            plan_uri,
            winner["index"],
            out=None,
            memory_bytes=spec.resources.memory_bytes,
            model=str(out / "model.joblib"),
            round_=winner["iter"],
        )
        outcome = _run_worker(refit, spec.resources.cpu)
        summary["holdout_score"] = outcome["holdout_score"]
        summary["model_path"] = outcome["model_path"]
        (out / "best.json").write_text(json.dumps(summary, indent=1))
        if outcome["holdout_score"] is not None:
            score = outcome["holdout_score"]
            print(f"refit on {document['n_samples']} rows; holdout {metric}={score:.4f}")
        print(f"model: {outcome['model_path']}")
    print(f"wrote {out / 'cv_results.json'} and {out / 'best.json'} in {time.perf_counter() - started:.1f}s")
    print(reduced["leaderboard"], flush=True)
    return 0


def _print_unseeded(plan: Plan) -> None:
    """The components whose scores a fresh run may change (an unset random_state); nothing when there are none.

    Plans written before this field existed lack it: nothing is printed for them.
    """
    entries = plan.document.get("unseeded") or []
    if entries:
        from airflow_grid import randomness

        print(randomness.summary(entries, len(plan.candidates)))
        for line in randomness.details(entries, len(plan.candidates)):
            print(f"  - {line}")


def gc_command(args: argparse.Namespace) -> int:
    """Apply the store's retention rules (:mod:`airflow_grid.retention`) and print what was freed and kept."""
    from airflow_grid import retention

    try:
        report = retention.gc(Store(args.store), args.keep_plans, args.max_age, args.in_use_window, args.dry_run)
    except ValueError as error:
        print(f"airflow-grid gc: {error}", file=sys.stderr)
        return 2
    print(retention.render(report))
    return 0


def render_command(args: argparse.Namespace) -> int:
    """Print the evaluate pods the DAG would create for this spec, validated offline against Kubernetes schemas."""
    import yaml

    from airflow_grid.operators.kubernetes import KubernetesBackend, render_pod_manifests, validate_manifest
    from airflow_grid.plan import make_plan

    spec = parse_spec(load_spec_file(args.spec))
    given = spec.raw.get("resources") or {}
    if not ("cpu" in given and "memory" in given):
        raise SpecError(
            "resources", f"got {given!r}; pods need explicit limits.", "write resources: {cpu: 1, memory: 2Gi}."
        )
    plan = make_plan(spec, Store(args.store))
    backend = KubernetesBackend.from_env()
    if args.image:
        backend = replace(backend, image=args.image)
    if args.namespace:
        backend = replace(backend, namespace=args.namespace)
    items = [
        {
            "plan_uri": plan.uri,
            "indices": [c["index"]],
            "label": c["label"],
            "cpu": spec.resources.cpu_text,
            "memory": spec.resources.memory_text,
            "backend": "kubernetes",
            **({} if spec.resources.timeout is None else {"timeout": spec.resources.timeout_text}),
            **({} if spec.resources.timeout is None else {"n_folds": plan.n_splits}),
        }
        for c in plan.candidates
    ]
    with contextlib.redirect_stdout(sys.stderr):  # KPO logs "Building pod ..." to stdout: keep stdout pure YAML
        manifests = render_pod_manifests(items, backend)
    for manifest in manifests:
        validate_manifest(manifest)
    print(yaml.safe_dump_all(manifests, sort_keys=False), end="")
    print(f"# {len(manifests)} pod manifests, valid against the Kubernetes schemas (strict)", file=sys.stderr)
    return 0


def evaluate_all(
    plan: Plan,
    store: Store,
    parallel: int,
    cpu: float,
    per_process: int = 1,
    rows: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every row's result in row order (default: every candidate): stored ones read, the rest run as workers.

    ``rows`` are :meth:`Plan.row` of one round. Units of work go to ``parallel`` long-lived workers
    (:mod:`airflow_grid.pool`), ``per_process`` candidates' worth at a time. Each worker runs inside the spec's CPU
    budget and its memory budget (``resources.memory``, all its processes).
    """
    from airflow_grid import pool
    from airflow_grid.plan import scheduled_units

    candidates = rows if rows is not None else [plan.row(0, c["index"]) for c in plan.candidates]
    iteration = candidates[0]["iter"] if candidates else 0
    memory = plan.spec.resources.memory_bytes
    done: dict[int, dict[str, Any]] = {}
    failures: dict[int, str] = {}
    pending = []
    for candidate in candidates:
        stored = store.get_result(candidate["key"])
        if stored is None:
            pending.append(candidate)
        else:
            done[candidate["index"]] = {**stored, **_row(candidate), "from_store": True}
            _progress(len(done) + len(failures), len(candidates), candidate, done[candidate["index"]])

    # Units of work as the DAG runs them (a warm-start chain is one); per_process candidates' worth per request,
    # handed to a pool of long-lived workers (one per parallel slot: start-up paid once per slot).
    by_index = {candidate["index"]: candidate for candidate in pending}
    n_requests = max(1, -(-len(pending) // max(1, per_process))) if pending else 0
    # Not batched: the long-lived workers take the next request as they finish, which balances quick units as well.
    groups = scheduled_units(plan, iteration, list(by_index), max_items=n_requests, batch=False)
    requests = [{"indices": group, "round": iteration} for group in groups]  # the costliest first
    with tempfile.TemporaryDirectory(prefix="airflow-grid-run-") as scratch:
        outcomes = pool.run(plan.uri, requests, slots=parallel, cpu=cpu, memory_bytes=memory, scratch=Path(scratch))
        for outcome in outcomes:
            chunk = [by_index[i] for i in outcome.request["indices"]]
            if outcome.payload is not None and "results" in outcome.payload:
                for result in outcome.payload["results"]:
                    done[result["index"]] = result
            else:  # the worker stores each candidate as it finishes: read back what it completed
                why = outcome.failure or f"bad input: {(outcome.payload or {}).get('bad_input')}"
                for candidate in chunk:
                    stored = store.get_result(candidate["key"])
                    if stored is not None:
                        done[candidate["index"]] = {**stored, **_row(candidate), "from_store": False}
                    else:
                        failures[candidate["index"]] = why
            for candidate in chunk:
                _progress(len(done) + len(failures), len(candidates), candidate, done.get(candidate["index"]))
    if failures:
        labels = {c["index"]: c["label"] for c in candidates}
        details = "\n".join(f"--- candidate {i} ({labels[i]}):\n{text}" for i, text in failures.items())
        raise RunFailed(
            f"{len(failures)} of {len(candidates)} candidates failed; the other {len(done)} results are kept in the "
            f"store and a rerun will not fit them again.\n{details}"
        )
    return [done[candidate["index"]] for candidate in candidates]


def _row(candidate: dict[str, Any]) -> dict[str, Any]:
    """The fields that name a row: a stored result may come from an equal candidate elsewhere in the grid."""
    return {name: candidate[name] for name in ("index", "iter", "label", "params")}


def _progress(count: int, total: int, candidate: dict[str, Any], result: dict[str, Any] | None) -> None:
    if result is None:
        status = "FAILED"
    else:
        metric, scores = next(iter(result["test_scores"].items()))
        finite = [s for s in scores if not math.isnan(s)]
        mean = f"{sum(finite) / len(finite):.4f}" if finite else "nan"
        how = "from store" if result["from_store"] else f"fitted in {result['elapsed_s']:.1f}s"
        failed = f", {result['n_failed_fits']} fits failed" if result.get("n_failed_fits") else ""
        status = f"{metric}={mean} ({how}{failed})"
    print(f"[{count:>{len(str(total))}}/{total}] {candidate['label']}: {status}", flush=True)


def _run_worker(command: list[str], cpu: float) -> dict[str, Any]:
    """Run one worker (built by the launcher) to completion; its JSON outcome comes on stdout."""
    from airflow_grid import launch

    completed = subprocess.run(command, capture_output=True, text=True, env=launch.worker_env(cpu))
    if completed.returncode != 0:
        action = command[3] if len(command) > 3 else "worker"
        raise RunFailed(f"worker {action} failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    outcome: dict[str, Any] = json.loads(completed.stdout)
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="airflow-grid", description="Resource-safe scikit-learn grid search.")
    parser.add_argument(
        "--store",
        default=None,
        help="result store root (default: $AIRFLOW_GRID_STORE or $AIRFLOW_HOME/airflow_grid)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="validate a spec and show its candidates, fits and budget guard")
    plan.add_argument("spec")
    run = commands.add_parser("run", help="run a whole search locally, write cv_results.json and best.json")
    run.add_argument("spec")
    run.add_argument("--out", required=True, help="output directory")
    run.add_argument("--parallel", type=int, default=None, help="candidates at a time (default: CPUs / cpu each)")
    run.add_argument("--no-refit", action="store_true", help="skip refitting the winner")
    run.add_argument(
        "--candidates-per-process",
        type=int,
        default=1,
        help="candidates each worker process evaluates (default 1: one process per candidate)",
    )
    render = commands.add_parser("render", help="print the evaluate pod manifests, validated offline")
    render.add_argument("spec")
    render.add_argument("--image", help="worker image (default $AIRFLOW_GRID_K8S_IMAGE)")
    render.add_argument("--namespace", help="namespace (default $AIRFLOW_GRID_K8S_NAMESPACE or default)")
    gc = commands.add_parser(
        "gc", help="delete old plans and results; keeps the newest plans per study, young results and plans in use"
    )
    gc.add_argument("--keep-plans", type=int, default=3, help="plans kept per study, newest first (default 3)")
    gc.add_argument("--max-age", default="30d", help="results no kept plan names are deleted after this (30d)")
    gc.add_argument("--in-use-window", default="24h", help="a plan touched within this is in use: kept (24h)")
    gc.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    args = parser.parse_args(argv)
    try:
        commands_by_name = {"plan": plan_command, "run": run_command, "render": render_command, "gc": gc_command}
        return commands_by_name[args.command](args)
    except SpecError as error:
        print(f"airflow-grid: invalid spec: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        from airflow_grid.results import AllFitsFailedError

        if not isinstance(error, RunFailed | AllFitsFailedError):
            raise
        print(f"airflow-grid: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
