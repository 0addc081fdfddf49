"""`python -m airflow_grid.demo`: run grid_search_nightly and its refit under a real scheduler, then stop it.

Starts ``airflow standalone`` (scheduler with LocalExecutor, dag-processor, triggerer, API server; SQLite in
$AIRFLOW_HOME) as production runs the DAGs, so the mapped evaluate tasks run side by side under the pool
``grid_fits`` (``make demo`` migrates the DB and sets the pool first). It triggers one manual run, waits for it
and for the grid_refit run it triggers, then shows that evaluate tasks overlapped (each task's interval and the
most running at once), prints the winner, its scores, the MLflow run and registered model, and stops every process
it started - also on Ctrl-C or a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from airflow_grid import local_airflow, tracking
from airflow_grid.local_airflow import Airflow, LeftRunning, Setup, max_overlap, parse_time

NIGHTLY, REFIT, POOL = "grid_search_nightly", "grid_refit", "grid_fits"
BAR = 40  # width of the timeline column


@dataclass
class Outcome:
    """What the demo saw through the REST API; ``--report`` writes it as JSON (the test reads it)."""

    ui: str
    run_id: str
    state: str
    refit_run_id: str = ""
    refit_state: str = ""
    pool: dict[str, Any] = field(default_factory=dict)
    parallelism: int = 0
    evaluate: list[dict[str, Any]] = field(default_factory=list)  # map_index, label, start, end (s), state
    max_concurrency: int = 0
    champion: dict[str, Any] = field(default_factory=dict)
    stopped_cleanly: bool = False


def parent_run(dag_id: str, run_id: str) -> Any:
    client = tracking.client()
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`{tracking.TAG_DAG_ID}` = '{dag_id}' and tags.`{tracking.TAG_RUN_ID}` = '{run_id}'",
    )
    return next(r for r in runs if r.data.tags.get(tracking.TAG_ROLE) == "parent")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dags", default=str(Path(__file__).resolve().parents[1] / "dags"), help="DAGs folder")
    parser.add_argument("--port", type=int, default=8080, help="UI/API port (taken: any free port)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for each DAG run")
    parser.add_argument("--keep-running", action="store_true", help="after the summary, serve the UI until Ctrl-C")
    parser.add_argument("--report", type=Path, help="also write what the demo saw as JSON here")
    return parser.parse_args(argv)


def demo_setup(args: argparse.Namespace) -> Setup:
    """The embedded default: everything under $AIRFLOW_HOME; only the two demo DAGs unpaused, no scheduled runs."""
    home = tracking.airflow_home()
    return Setup(
        home=home,
        dags=Path(args.dags).resolve(),
        workdir=home,
        mlflow_uri=tracking.tracking_uri(),
        unpause=(NIGHTLY, REFIT),
        api_port=local_airflow.port_or_free(args.port),
        # unpausing a cron DAG with catchup=False starts its latest scheduled run at once: only the manual run here
        extra_env={"AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False"},
    )


def announce(server: Airflow) -> None:
    password = local_airflow.admin_password(server.home)
    print(f"\nAirflow UI: {server.url}  (login: admin / {password}, from {server.home / local_airflow.PASSWORDS_FILE})")
    print(f"  standalone log: {server.log}", flush=True)


class Progress:
    """Prints the run's task states every ``every`` seconds while :meth:`Airflow.wait_for_run` polls."""

    def __init__(self, server: Airflow, dag_id: str, run_id: str, every: float = 20) -> None:
        self.server, self.dag_id, self.run_id, self.every = server, dag_id, run_id, every
        self.started = self.last = time.monotonic()

    def __call__(self, run: dict[str, Any] | None) -> None:
        if run is None or time.monotonic() - self.last < self.every:
            return
        self.last = time.monotonic()
        counts: dict[str, int] = {}
        for ti in self.server.task_instances(self.dag_id, self.run_id, task_id="evaluate"):
            counts[ti["state"] or "none"] = counts.get(ti["state"] or "none", 0) + 1
        shown = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        print(f"  +{self.last - self.started:.0f}s {self.dag_id} {run['state']}; evaluate: {shown}", flush=True)


def evaluate_intervals(server: Airflow, run: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """Each evaluate task's interval in seconds after the run started, and the most running at one instant.

    Tasks that never ran (no start or end) are left out.
    """
    origin = parse_time(run["start_date"])
    rows, spans = [], []
    for ti in server.task_instances(NIGHTLY, run["dag_run_id"]):
        if not ti["task_id"].startswith("evaluate") or not (ti["start_date"] and ti["end_date"]):
            continue
        start, end = parse_time(ti["start_date"]), parse_time(ti["end_date"])
        spans.append((start, end))
        label = ti.get("rendered_map_index") or str(ti["map_index"])
        row = {"task_id": ti["task_id"], "map_index": ti["map_index"], "label": label, "state": ti["state"]}
        rows.append({**row, "start": (start - origin).total_seconds(), "end": (end - origin).total_seconds()})
    return sorted(rows, key=lambda r: (r["start"], r["map_index"])), max_overlap(spans)


def drive(server: Airflow, run_id: str, parallelism: int, timeout: float) -> Outcome:
    """One manual nightly run through REST, then the refit run it triggers; what happened, as REST reports it."""
    response = server.trigger(NIGHTLY, run_id, conf={})
    assert response.status_code == 200, f"trigger {NIGHTLY}: {response.status_code} {response.text}"
    print(f"Triggered {NIGHTLY} run {run_id}: {server.url}/dags/{NIGHTLY}/runs/{run_id}", flush=True)
    run = server.wait_for_run(NIGHTLY, run_id, timeout, on_poll=Progress(server, NIGHTLY, run_id))
    outcome = Outcome(server.url, run_id, run["state"], parallelism=parallelism)
    outcome.pool = server.get(f"/api/v2/pools/{POOL}")
    outcome.evaluate, outcome.max_concurrency = evaluate_intervals(server, run)
    if run["state"] == "success":
        outcome.refit_run_id = f"refit__{NIGHTLY}__{run_id}"  # trigger_refit's trigger_run_id
        print(f"Waiting for {REFIT} run {outcome.refit_run_id} ...", flush=True)
        refit = server.wait_for_run(REFIT, outcome.refit_run_id, timeout, may_not_exist_yet=True)
        outcome.refit_state = refit["state"]
    return outcome


def bar(start: float, end: float, span: float) -> str:
    first, last = round(start / span * BAR), max(round(end / span * BAR), round(start / span * BAR) + 1)
    return (" " * first + "#" * (last - first)).ljust(BAR)


def show_concurrency(outcome: Outcome) -> None:
    """The evidence that candidates ran side by side: every evaluate interval and the peak overlap."""
    pool, span = outcome.pool, max((r["end"] for r in outcome.evaluate), default=1.0) or 1.0
    print(f"\nevaluate tasks of {NIGHTLY}/{outcome.run_id}, seconds after the run started:")
    for r in outcome.evaluate:
        label = r["label"] if len(r["label"]) <= 64 else r["label"][:61] + "..."
        timeline = bar(r["start"], r["end"], span)
        print(f"  [{r['map_index']:>2}] {r['start']:6.1f} -> {r['end']:6.1f}  |{timeline}|  {label}")
    print(f"max evaluate tasks running at once: {outcome.max_concurrency}")
    print(f"pool {pool.get('name', POOL)}: {pool.get('slots')} slots; parallelism {outcome.parallelism}", flush=True)


def tidy(server: Airflow, run_id: str) -> None:
    """Leave the home as a later demo or ``airflow standalone`` wants it: the demo DAGs paused (no nightly run
    starts), and a run cut short (Ctrl-C, failure) marked failed instead of running forever in the DB."""
    for dag_id, dag_run_id in ((NIGHTLY, run_id), (REFIT, f"refit__{NIGHTLY}__{run_id}")):
        with contextlib.suppress(httpx.HTTPError, AssertionError):
            run = server.find_run(dag_id, dag_run_id)
            if run is not None and run["state"] not in local_airflow.TERMINAL:
                server.api.patch(f"/api/v2/dags/{dag_id}/dagRuns/{dag_run_id}", json={"state": "failed"})
                print(f"{dag_id} run {dag_run_id} was {run['state']}: marked failed", flush=True)
        with contextlib.suppress(httpx.HTTPError):
            server.api.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": True})


def keep_running(server: Airflow) -> None:
    print(f"\nAirflow keeps running at {server.url} (login admin / {local_airflow.admin_password(server.home)}); "
          "Ctrl-C stops it.", flush=True)  # fmt: skip
    try:
        while True:
            time.sleep(60)
            print(f"  still serving {server.url}", flush=True)
    except KeyboardInterrupt:
        print("\nCtrl-C: stopping Airflow ...", flush=True)


def summary(outcome: Outcome, dags: Path) -> None:
    """The search's winner, scores, registered model and MLflow run, as MLflow recorded them."""
    client = tracking.client()
    parent = parent_run(NIGHTLY, outcome.run_id)
    study = client.get_experiment(parent.info.experiment_id).name
    champion = client.get_model_version_by_alias(study, "champion")
    challenger = client.get_model_version_by_alias(study, "challenger")
    outcome.champion = {"study": study, "version": champion.version, "source": champion.source}
    best = {k.removeprefix("best_"): v for k, v in parent.data.params.items() if k.startswith("best_")}
    print("\n" + "=" * 100)
    print(f"Study {study}: winner {best}")
    print(f"  mean CV {parent.data.tags.get(tracking.TAG_REFIT_METRIC)}: {parent.data.metrics['best_cv_score']:.4f}")
    print(f"  holdout score of the refitted winner: {challenger.tags.get('holdout_score')}")
    print(f"  registered model {study} v{challenger.version} (challenger); champion is v{champion.version}")
    print(f"  MLflow parent run {parent.info.run_id}; artifacts at {parent.info.artifact_uri}")
    print(f"  model: models:/{study}@champion -> {champion.source}")
    print("Open the UIs:")
    print(f"  MLflow:  .venv/bin/mlflow ui --backend-store-uri {tracking.tracking_uri()} --port 5000")
    print(f"  Airflow: AIRFLOW_HOME={tracking.airflow_home()} AIRFLOW__CORE__DAGS_FOLDER={dags} "
          ".venv/bin/airflow standalone  (or: python -m airflow_grid.demo --keep-running)")  # fmt: skip
    print("=" * 100, flush=True)


def run(args: argparse.Namespace, outcome_box: list[Outcome]) -> None:
    """Serve, drive, show; the server is stopped when this returns or raises."""
    parallelism = len(os.sched_getaffinity(0)) + 2  # the pooled evaluate tasks plus plan/select/refit beside them
    with local_airflow.serve(demo_setup(args), pool=POOL, pool_slots=None, parallelism=parallelism) as server:
        announce(server)
        run_id = f"demo__{datetime.now(UTC):%Y%m%dT%H%M%S}"
        try:
            outcome = drive(server, run_id, parallelism, args.timeout)
            outcome_box.append(outcome)
            show_concurrency(outcome)
            if outcome.state == "success" and outcome.refit_state == "success":
                summary(outcome, Path(args.dags).resolve())
                if args.keep_running:
                    keep_running(server)
        finally:
            tidy(server, run_id)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    box: list[Outcome] = []
    code, clean = 0, True
    try:
        run(args, box)
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        code = 130
    except LeftRunning as error:
        print(f"Airflow did NOT stop cleanly: {error}", file=sys.stderr)
        code, clean = 1, False
    except Exception as error:  # whatever failed, the server was stopped on the way out (LeftRunning otherwise)
        print(f"demo failed: {type(error).__name__}: {error}", file=sys.stderr)
        code = 1
    if clean:
        print("Airflow stopped cleanly: no process or port of it left.")
    outcome = box[0] if box else None
    if outcome is not None:
        outcome.stopped_cleanly = clean
        if outcome.state != "success" or outcome.refit_state != "success":
            print(f"{NIGHTLY} {outcome.state}, {REFIT} {outcome.refit_state or 'not run'}: see the logs above.")
            code = code or 1
        if args.report:
            args.report.write_text(json.dumps(asdict(outcome), indent=2, default=str))
    print(f"took {time.perf_counter() - started:.0f}s in total", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
