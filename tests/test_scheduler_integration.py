"""The DAGs under a real scheduler: ``airflow standalone`` (LocalExecutor), driven through the REST API.

``dag.test()`` (test_airflow_integration.py) runs every task in one process and ignores pools. Here a module
fixture starts ``airflow standalone`` (tests/standalone.py) twice: on SQLite, the embedded default, and on a private
PostgreSQL, the database of the compose deployment. Each gets a temp AIRFLOW_HOME and a temp DAGs folder holding
one DAG file (four grid-search DAGs over iris CSV specs whose ``data.path`` is templated on ``{{ dataset_version }}``,
plus the shipped ``grid_refit.py``), the pool ``grid_fits`` with 2 slots, and at teardown a check that no process
or port is left.

What a user does from the outside, and what each test proves:

1. trigger with param overrides through REST, as the UI form does → the run succeeds, MLflow records the overrides
   and the dataset version, the refit DAG gets a JSON conf; a conf the Params reject → HTTP 400, no run;
2. POST an asset event with ``extra.dataset_version`` → the asset-scheduled DAG tunes on that version;
3. ``airflow backfill create`` over three dates whose data files differ only on the middle date → only that date
   fits its candidates, the others are served from the store;
4. six candidates in a 2-slot pool with parallelism 4 → never more than 2 evaluate tasks run at once.

The backfill runs on PostgreSQL; on SQLite it is opt-in (see the test). Each test prints its evidence
(``pytest -m scheduler -s`` or ``-rP`` shows it). Takes about 5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from standalone import (
    TERMINAL,
    Airflow,
    cli,
    max_overlap,
    parse_time,
    postgres_bindir,
    private_postgres,
    run_standalone,
)

pytestmark = pytest.mark.scheduler

DAGS_DIR = Path(__file__).resolve().parents[1] / "dags"
POOL = "grid_fits"
POOL_SLOTS = 2
PARALLELISM = 4
ASSET_NAME = "sched_iris"
ASSET_URI = "file:///datasets/sched_iris"
TODAY = datetime.now(UTC).date()
D1, D2, D3 = (TODAY - timedelta(days=n) for n in (6, 5, 4))  # the backfill window, all in the past
REQUIRE_POSTGRES = "AIRFLOW_GRID_REQUIRE_POSTGRES"

DAG_FILE = '''\
"""Grid-search DAGs for the scheduler tests (written by tests/test_scheduler_integration.py)."""

from datetime import datetime, timezone
from pathlib import Path

from airflow.sdk import Asset

from airflow_grid.dag_factory import grid_search_dag

SPECS = Path(__file__).parent / "specs"
START = datetime.fromisoformat("{start}").replace(tzinfo=timezone.utc)
END = datetime.fromisoformat("{end}").replace(tzinfo=timezone.utc)

# Manual runs (REST trigger with overrides); select triggers the shipped grid_refit DAG.
sched_grid = grid_search_dag("sched_grid", SPECS / "iris_versioned.yaml", retries=0)
# The pool test: same spec, no refit.
sched_pool = grid_search_dag("sched_pool", SPECS / "iris_versioned.yaml", refit_dag_id=None, retries=0)
# Scheduled on an asset: POST /api/v2/assets/events with extra.dataset_version.
sched_on_asset = grid_search_dag(
    "sched_on_asset",
    SPECS / "iris_versioned.yaml",
    schedule=[Asset("{asset_name}", uri="{asset_uri}")],
    refit_dag_id=None,
    retries=0,
)
# Nightly: data version = the logical date. end_date closes the schedule on the backfill window, so unpausing
# creates no scheduled run for today; backfills create the runs.
sched_nightly = grid_search_dag(
    "sched_nightly", SPECS / "iris_nightly.yaml", schedule="@daily", start_date=START, refit_dag_id=None, retries=0
)
sched_nightly.end_date = END
'''


def write_data(root: Path) -> None:
    """Iris as CSV files, one per dataset version; ``D2`` and ``v2`` hold different rows than the others."""
    from sklearn.datasets import load_iris

    frame = load_iris(as_frame=True).frame
    frame.columns = ["sepal_length", "sepal_width", "petal_length", "petal_width", "target"]
    changed = frame.drop(index=range(0, 150, 10)).reset_index(drop=True)  # a re-versioned dataset: 15 rows fewer
    root.mkdir(parents=True)
    contents = {"v1": frame, "v2": changed, D1.isoformat(): frame, D2.isoformat(): changed, D3.isoformat(): frame}
    for version, table in contents.items():
        table.to_csv(root / f"iris-{version}.csv", index=False)


def write_dags(dags: Path, data: Path) -> None:
    specs = dags / "specs"
    specs.mkdir(parents=True)
    spec: dict[str, Any] = {
        "name": "sched-iris",
        "data": {"path": f"{data}/iris-{{{{ dataset_version }}}}.csv", "target": "target"},
        "holdout": {"test_size": 0.3, "random_state": 0, "stratify": True},
        "estimator": {"_target_": "sklearn.svm.SVC"},
        "param_grid": {"C": [0.1, 1, 10]},
        "cv": 5,
        "scoring": "accuracy",
        "resources": {"cpu": 1, "memory": "1Gi"},
    }
    (specs / "iris_versioned.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    nightly = {**spec, "name": "sched-nightly", "holdout": None, "param_grid": {"C": [0.5, 5]}, "cv": 3}
    (specs / "iris_nightly.yaml").write_text(yaml.safe_dump(nightly, sort_keys=False))
    (dags / "sched_dags.py").write_text(
        DAG_FILE.format(start=D1.isoformat(), end=D3.isoformat(), asset_name=ASSET_NAME, asset_uri=ASSET_URI)
    )
    (dags / "grid_refit.py").write_text((DAGS_DIR / "grid_refit.py").read_text())


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def airflow(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Airflow]:
    """``airflow standalone`` on SQLite (the embedded default), then on a private PostgreSQL (compose's database)."""
    root = tmp_path_factory.mktemp(f"standalone-{request.param}")
    write_dags(root / "dags", root / "data")
    write_data(root / "data")
    if request.param == "sqlite":
        with run_standalone(root, pool=POOL, pool_slots=POOL_SLOTS, parallelism=PARALLELISM) as server:
            yield server
        return
    bindir = postgres_bindir()
    if bindir is None:
        message = "no PostgreSQL server binaries (initdb): install Debian's postgresql package"
        if os.environ.get(REQUIRE_POSTGRES) == "1":
            pytest.fail(f"{message} ({REQUIRE_POSTGRES}=1: the PostgreSQL-backed layer is required)")
        pytest.skip(f"{message}; set {REQUIRE_POSTGRES}=1 to fail instead of skipping")
    with (
        private_postgres(bindir) as url,
        run_standalone(root, pool=POOL, pool_slots=POOL_SLOTS, parallelism=PARALLELISM, database_url=url) as server,
    ):
        yield server


# --- helpers --------------------------------------------------------------------------------------------------------


def from_store(server: Airflow, dag_id: str, run_id: str) -> dict[str, bool]:
    """``{candidate label: from_store}`` over the run's evaluate results, read through the REST API."""
    flags = {}
    for ti in server.task_instances(dag_id, run_id, task_id="evaluate"):
        payload = server.xcom(dag_id, run_id, "evaluate", ti["map_index"])
        for item in payload["results"]:
            flags[item["label"]] = item["from_store"]
    return dict(sorted(flags.items()))


def plan_document(plan_uri: str) -> dict[str, Any]:
    """The plan.json the plan task wrote to the (local) result store."""
    return dict(json.loads((Path(plan_uri.removeprefix("file://")) / "plan.json").read_text()))


def states(server: Airflow, dag_id: str, run_id: str) -> dict[str, str]:
    return {
        (ti["task_id"] if ti["map_index"] < 0 else f"{ti['task_id']}[{ti['rendered_map_index']}]"): ti["state"]
        for ti in server.task_instances(dag_id, run_id)
    }


# --- 1. REST trigger with overrides; bad conf rejected; refit gets a JSON conf --------------------------------------


def test_rest_trigger_with_overrides_and_bad_conf(airflow: Airflow) -> None:
    conf = {"param_grid": {"C": [1, 10]}, "cv": 3, "dataset_version": "v1"}
    response = airflow.trigger("sched_grid", "rest_overrides", conf)
    assert response.status_code == 200, response.text
    assert response.json()["conf"] == conf and response.json()["logical_date"] is None
    run = airflow.wait_for_run("sched_grid", "rest_overrides")
    plan = airflow.xcom("sched_grid", "rest_overrides", "plan", key="plan")
    print(f"\n[1] sched_grid/rest_overrides: {run['state']} ({run['run_type']}, triggered_by {run['triggered_by']})")
    print(f"    tasks: {states(airflow, 'sched_grid', 'rest_overrides')}")
    print(f"    plan: {plan['n_candidates']} candidates, {plan['n_fits']} fits, version {plan['dataset_version']} "
          f"from {plan['dataset_version_source']}, overrides {plan['overrides']}")  # fmt: skip
    assert run["state"] == "success"
    assert run["triggered_by"] == "rest_api"
    assert (plan["n_candidates"], plan["n_fits"]) == (2, 6)  # the form's grid and cv, not the spec's 3 x 5
    assert plan["overrides"] == ["param_grid", "cv"]

    parent = airflow.parent_run("sched-iris", "sched_grid", "rest_overrides")
    tags = parent.data.tags
    print(f"    MLflow parent {parent.info.run_id}: dataset_version={tags['airflow_grid.dataset_version']} "
          f"source={tags['airflow_grid.dataset_version_source']} overrides={tags['airflow_grid.overrides']} "
          f"n_candidates={tags['airflow_grid.n_candidates']} best_C={parent.data.params.get('best_C')}")  # fmt: skip
    assert tags["airflow_grid.dataset_version"] == "v1"
    assert tags["airflow_grid.dataset_version_source"] == "conf"
    assert json.loads(tags["airflow_grid.overrides"]) == ["param_grid", "cv"]
    assert tags["airflow_grid.n_candidates"] == "2"

    # trigger_refit: the XComArg conf reaches the refit DAG as a JSON object, and the refit runs on it
    refit_id = "refit__sched_grid__rest_overrides"
    refit = airflow.wait_for_run("grid_refit", refit_id)
    refit_result = airflow.xcom("grid_refit", refit_id, "refit")
    print(f"    grid_refit/{refit_id}: {refit['state']} ({refit['run_type']}), conf "
          f"{json.dumps(refit['conf'])[:160]}..., registered {refit_result['model_name']} "
          f"v{refit_result['version']} promoted={refit_result['promoted']}")  # fmt: skip
    assert refit["state"] == "success"
    assert isinstance(refit["conf"], dict)
    assert refit["conf"]["parent_run_id"] == parent.info.run_id
    assert refit["conf"]["dataset_version"] == "v1"

    # a conf the Params reject: HTTP 400 from the API, and no run exists
    before = len(airflow.dag_runs("sched_grid"))
    for bad in ({"cv": 1}, {"max_parallel": 0}, {"dataset_version": "../etc"}):
        response = airflow.trigger("sched_grid", f"bad_{uuid.uuid4().hex[:8]}", bad)
        detail = response.json().get("detail")
        print(f"    bad conf {json.dumps(bad)} -> HTTP {response.status_code}: {str(detail).splitlines()[0]}")
        assert response.status_code == 400, response.text
        assert "Invalid input for param" in str(detail)
    assert len(airflow.dag_runs("sched_grid")) == before == 1


# --- 2. asset event with extra.dataset_version → asset-triggered run on that version --------------------------------


def test_asset_event_triggers_run_on_posted_version(airflow: Airflow) -> None:
    assets = airflow.get("/api/v2/assets", name_pattern=ASSET_NAME)["assets"]
    assert [a["uri"] for a in assets] == [ASSET_URI]
    asset_id = assets[0]["id"]
    assert [d["dag_id"] for d in assets[0]["scheduled_dags"]] == ["sched_on_asset"]
    response = airflow.api.post(
        "/api/v2/assets/events", json={"asset_id": asset_id, "extra": {"dataset_version": "v2"}}
    )
    assert response.status_code == 200, response.text
    event = response.json()
    print(f"\n[2] posted asset event {event['id']} on {ASSET_URI} with extra {event['extra']}")

    deadline = time.monotonic() + 60
    while not (runs := airflow.dag_runs("sched_on_asset")):
        assert time.monotonic() < deadline, "the asset event did not trigger sched_on_asset"
        time.sleep(1)
    assert len(runs) == 1
    run_id = runs[0]["dag_run_id"]
    run = airflow.wait_for_run("sched_on_asset", run_id)
    upstream = airflow.get(f"/api/v2/dags/sched_on_asset/dagRuns/{quote(run_id, safe='')}/upstreamAssetEvents")
    plan = airflow.xcom("sched_on_asset", run_id, "plan", key="plan")
    parent = airflow.parent_run("sched-iris", "sched_on_asset", run_id)
    tags = parent.data.tags
    print(f"    sched_on_asset/{run_id}: {run['state']} ({run['run_type']}, logical_date {run['logical_date']}), "
          f"consumed events {[e['id'] for e in upstream['asset_events']]}")  # fmt: skip
    print(f"    tasks: {states(airflow, 'sched_on_asset', run_id)}")
    print(f"    plan: version {plan['dataset_version']} from {plan['dataset_version_source']}; MLflow "
          f"dataset_version={tags['airflow_grid.dataset_version']} "
          f"source={tags['airflow_grid.dataset_version_source']}")  # fmt: skip
    assert run["state"] == "success"
    assert run["run_type"] == "asset_triggered" and run["logical_date"] is None
    assert [e["id"] for e in upstream["asset_events"]] == [event["id"]]
    assert tags["airflow_grid.dataset_version"] == "v2"
    assert tags["airflow_grid.dataset_version_source"] == "asset_event"
    # and it read iris-v2.csv: 135 rows, 94 of them searched after the 30% holdout (iris-v1.csv would give 105)
    assert plan["dataset_version"] == "v2"
    assert plan_document(plan["plan_uri"])["n_samples"] == 94


# --- 3. backfill: only the date whose data changed is fitted --------------------------------------------------------


def test_backfill_fits_only_the_changed_date(airflow: Airflow) -> None:
    if airflow.backend == "sqlite" and os.environ.get("AIRFLOW_GRID_SQLITE_BACKFILL") != "1":
        pytest.skip(
            "runs on PostgreSQL; on SQLite opt-in (AIRFLOW_GRID_SQLITE_BACKFILL=1): `airflow backfill create` racing "
            "a busy scheduler failed twice under CI load ('database is locked'; the rolled-back runs then crashed the "
            "scheduler with ObjectDeletedError), a single-writer limit of SQLite, not of this package"
        )
    dag_id = "sched_nightly"
    response = airflow.trigger(dag_id, "first_run", {"dataset_version": D1.isoformat()})
    assert response.status_code == 200, response.text
    first = airflow.wait_for_run(dag_id, "first_run")
    first_fits = from_store(airflow, dag_id, "first_run")
    print(f"\n[3] {dag_id}/first_run (manual, data of {D1}): {first['state']}, from_store {first_fits}")
    assert first["state"] == "success"
    assert first_fits and not any(first_fits.values())  # a fresh store: the first run fits everything

    output = cli(
        airflow.env, "backfill", "create", "--dag-id", dag_id, "--from-date", D1.isoformat(), "--to-date",
        D3.isoformat(),
    )  # fmt: skip
    created = output.count("Created backfill Dag run")
    print(f"    airflow backfill create --dag-id {dag_id} --from-date {D1} --to-date {D3}: {created} runs created")
    assert created == 3
    deadline = time.monotonic() + 300
    while True:
        runs = airflow.dag_runs(dag_id, run_type="backfill")
        if len(runs) == 3 and all(r["state"] in TERMINAL for r in runs):
            break
        assert time.monotonic() < deadline, f"backfill runs not done: {[(r['dag_run_id'], r['state']) for r in runs]}"
        time.sleep(2)
    fits: dict[date, dict[str, bool]] = {}
    for run in sorted(runs, key=lambda r: r["logical_date"]):
        day = parse_time(run["logical_date"]).date()
        if run["state"] != "success":
            airflow.explain(dag_id, run["dag_run_id"])
        assert run["state"] == "success", run
        plan = airflow.xcom(dag_id, run["dag_run_id"], "plan", key="plan")
        assert (plan["dataset_version"], plan["dataset_version_source"]) == (day.isoformat(), "logical_date")
        fits[day] = from_store(airflow, dag_id, run["dag_run_id"])
        fitted = [label for label, hit in fits[day].items() if not hit]
        print(f"    {run['dag_run_id']}: {run['state']}, data iris-{plan['dataset_version']}.csv, "
              f"fitted {len(fitted)} of {len(fits[day])} candidates {fitted}, from_store {fits[day]}")  # fmt: skip
    assert sorted(fits) == [D1, D2, D3]
    assert all(fits[D1].values()) and all(fits[D3].values())  # same data as the first run: nothing refitted
    assert fits[D2] and not any(fits[D2].values())  # the changed data: every candidate fitted


# --- 4. the pool caps concurrency -----------------------------------------------------------------------------------


def test_pool_caps_concurrent_evaluate_tasks(airflow: Airflow) -> None:
    conf = {"param_grid": {"C": [0.2, 0.3, 2, 3, 20, 30]}, "dataset_version": "v1"}
    response = airflow.trigger("sched_pool", "six_candidates", conf)
    assert response.status_code == 200, response.text
    run = airflow.wait_for_run("sched_pool", "six_candidates")
    assert run["state"] == "success"
    tis = airflow.task_instances("sched_pool", "six_candidates", task_id="evaluate")
    assert len(tis) == 6 and {ti["pool"] for ti in tis} == {POOL}
    intervals = sorted(
        ((parse_time(ti["start_date"]), parse_time(ti["end_date"]), ti) for ti in tis), key=lambda i: i[:2]
    )
    origin = intervals[0][0]
    print(f"\n[4] sched_pool/six_candidates: {run['state']}; 6 evaluate tasks, pool {POOL} = {POOL_SLOTS} slots, "
          f"parallelism {PARALLELISM} (start/end seconds after the first start):")  # fmt: skip
    for start, end, ti in intervals:
        print(f"    evaluate[{ti['map_index']}] {ti['rendered_map_index']:>6}: "
              f"{(start - origin).total_seconds():6.2f} -> {(end - origin).total_seconds():6.2f} "
              f"({ti['duration']:.2f}s) {ti['state']}")  # fmt: skip
    observed = max_overlap([(start, end) for start, end, _ in intervals])
    # the pool is global: every pooled task of the whole session, across DAGs and runs
    pooled = airflow.get("/api/v2/dags/~/dagRuns/~/taskInstances", pool=POOL, limit=1000)["task_instances"]
    everywhere = max_overlap(
        [(parse_time(t["start_date"]), parse_time(t["end_date"])) for t in pooled if t["start_date"] and t["end_date"]]
    )
    waits = airflow.log.read_text(errors="replace").count(f"open slots in pool {POOL}")
    print(f"    max concurrent evaluate tasks: {observed} in this run, {everywhere} over all {len(pooled)} pooled "
          f"tasks of the session (slots {POOL_SLOTS}); scheduler 'no open slots in pool' lines: {waits}")  # fmt: skip
    assert 1 <= observed <= POOL_SLOTS
    assert everywhere <= POOL_SLOTS
    # the plan task cannot reach the metadata DB under an executor: it warns about the pool instead of failing
    logs = airflow.root / "home" / "logs" / "dag_id=sched_pool" / "run_id=six_candidates" / "task_id=plan"
    warnings = [
        json.loads(line)["event"]
        for path in logs.rglob("*.log")
        for line in path.read_text().splitlines()
        if '"level":"warning"' in line and "pool" in line
    ]
    print(f"    plan task warnings: {warnings}")
    assert warnings == [f"Could not check that pool {POOL!r} exists (no metadata DB access here)."]
