"""The DAGs run for real on an Airflow metadata DB (SQLite) through ``dag.test()``, logging to a fresh MLflow.

``dag.test()`` runs every task in this process, in dependency order, against the session's AIRFLOW_HOME (set by
conftest). It ignores pools (the plan checks the pool itself) and returns a failed DagRun instead of raising. The
evaluate and refit tasks start the real worker processes; select and refit log to a per-test sqlite MLflow.

What is driven end to end here: study DAG → MLflow parent run equal to ``airflow-grid run``; the refit DAG with
the conf the study's trigger created; the champion gate across two studies; a rerun of the same DAG run served
from the store without duplicating MLflow runs; an asset event's ``extra.dataset_version`` reaching the MLflow
run (the event is attached to the run the way the scheduler attaches it, see ``test_asset_event_...``);
plan-time failures, and conf rejected before a run exists.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from airflow_grid import tracking

pytestmark = pytest.mark.airflow

DAGS_DIR = Path(__file__).resolve().parents[1] / "dags"
BIN = Path(sys.executable).parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ARTIFACTS = {
    "cv_results.json",
    "cv_results.csv",
    "spec.yaml",
    "best.json",
    "score_by_param.png",
    "ranked_candidates.png",
}


def iris_spec(name: str, **fields: Any) -> dict[str, Any]:
    """3 SVC candidates x 3 folds on iris, with a holdout for the refit; keyword arguments replace fields."""
    spec: dict[str, Any] = {
        "name": name,
        "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
        "holdout": {"test_size": 0.3, "random_state": 0, "stratify": True},
        "estimator": {"_target_": "sklearn.pipeline.Pipeline", "steps": [["clf", {"_target_": "sklearn.svm.SVC"}]]},
        "param_grid": {"clf__C": [0.1, 1, 10]},
        "cv": 3,
        "scoring": "accuracy",
        "resources": {"cpu": 1, "memory": "1Gi"},
    }
    spec.update(fields)
    return spec


def weak_spec(name: str) -> dict[str, Any]:
    """The same study, a deliberately weak grid: decision stumps (about 0.67 holdout accuracy on iris)."""
    return iris_spec(
        name,
        estimator={"_target_": "sklearn.tree.DecisionTreeClassifier", "random_state": 0},
        param_grid={"max_depth": [1], "criterion": ["gini", "entropy"]},
    )


# --- fixtures -------------------------------------------------------------------------------------------------------


def _isolate(monkeypatch: pytest.MonkeyPatch, root: Path) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("AIRFLOW_GRID_STORE", str(root / "store"))
    # A sqlite-tracked experiment without an artifact location puts artifacts under ./mlruns: keep them here.
    monkeypatch.chdir(root)
    return root


@pytest.fixture
def isolated(airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh MLflow tracking store and result store for one test."""
    return _isolate(monkeypatch, tmp_path)


# --- helpers --------------------------------------------------------------------------------------------------------


def load_dag(name: str) -> Any:
    """A DAG file of dags/, imported as a fresh module (as the user would load it for ``dag.test()``)."""
    module_spec = importlib.util.spec_from_file_location(f"dag_{name}_{uuid.uuid4().hex}", DAGS_DIR / f"{name}.py")
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.dag


@dataclass(frozen=True)
class TI:
    task_id: str
    map_index: int
    state: str | None
    rendered_map_index: str | None
    start_date: datetime | None


def task_instances(dag_id: str, run_id: str) -> list[TI]:
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(
            select(TaskInstance).where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)
        ).all()
        return sorted(
            (TI(t.task_id, t.map_index, t.state, t.rendered_map_index, t.start_date) for t in rows),
            key=lambda t: (t.task_id, t.map_index),
        )


def states(dag_id: str, run_id: str) -> dict[tuple[str, int], str | None]:
    return {(t.task_id, t.map_index): t.state for t in task_instances(dag_id, run_id)}


def xcoms(dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> dict[int, Any]:
    """``{map_index: value}`` of one task's XCom in one run."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(
            select(XComModel).where(
                XComModel.dag_id == dag_id,
                XComModel.run_id == run_id,
                XComModel.task_id == task_id,
                XComModel.key == key,
            )
        ).all()
        return {row.map_index: row.value for row in rows}


def dag_run_conf(dag_id: str, run_id: str) -> Any:
    from airflow.models import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        runs = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)).all()
        assert len(runs) == 1, f"{len(runs)} runs of {dag_id} with run_id {run_id}"
        return runs[0].conf


def count_dag_runs(dag_id: str) -> int:
    from airflow.models import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    with create_session() as session:
        return int(session.scalar(select(func.count()).select_from(DagRun).where(DagRun.dag_id == dag_id)) or 0)


def parent_runs(study: str, dag_id: str, run_id: str) -> list[Any]:
    client = tracking.client()
    experiment = client.get_experiment_by_name(study)
    assert experiment is not None, f"no MLflow experiment {study!r}"
    return list(
        client.search_runs(
            [experiment.experiment_id],
            filter_string=(
                f"tags.`{tracking.TAG_DAG_ID}` = '{dag_id}' and tags.`{tracking.TAG_RUN_ID}` = '{run_id}' "
                f"and tags.`{tracking.TAG_ROLE}` = 'parent'"
            ),
        )
    )


def child_runs(parent: Any) -> list[Any]:
    return list(
        tracking.client().search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
    )


def artifact(run_id: str, path: str, into: Path) -> bytes:
    into.mkdir(parents=True, exist_ok=True)
    local = tracking.client().download_artifacts(run_id, path, str(into))
    return Path(local).read_bytes()


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def same_cell(a: Any, b: Any) -> bool:
    """Exact equality; a NaN cell (JSON ``NaN`` or ``null``) equals only another NaN cell."""
    if _missing(a) or _missing(b):
        return _missing(a) and _missing(b)
    return bool(a == b)


def score_columns(cv_results: dict[str, list[Any]]) -> list[str]:
    """Every non-timing column: params, param_<p>, split<k>_test_<m>, mean/std/rank_test_<m>."""
    keys = [k for k in cv_results if not k.endswith(("_fit_time", "_score_time"))]
    assert "params" in keys and any(k.startswith("rank_test_") for k in keys)
    return keys


def run_cli(spec: dict[str, Any], root: Path) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """``airflow-grid run`` on the same spec, with its own store: an independent computation."""
    root.mkdir(parents=True, exist_ok=True)
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = root / "out"
    command = [str(BIN / "airflow-grid"), "--store", str(root / "store"), "run", str(spec_path), "--out", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads((out / "cv_results.json").read_text()), json.loads((out / "best.json").read_text())


@dataclass
class Study:
    dag_id: str
    run_id: str
    state: str
    select: dict[str, Any]
    plan: dict[str, Any]


def run_study(dag: Any, spec: dict[str, Any], **test_kwargs: Any) -> Study:
    dag_run = dag.test(run_conf={"spec": spec}, **test_kwargs)
    select = xcoms(dag.dag_id, dag_run.run_id, "select").get(-1, {})
    plan = xcoms(dag.dag_id, dag_run.run_id, "plan", key="plan").get(-1, {})
    return Study(dag.dag_id, dag_run.run_id, str(dag_run.state), select, plan)


def run_refit(parent_run_id: str) -> tuple[str, dict[str, Any]]:
    refit_dag = load_dag("grid_refit")
    dag_run = refit_dag.test(run_conf={"parent_run_id": parent_run_id})
    return str(dag_run.state), xcoms(refit_dag.dag_id, dag_run.run_id, "refit").get(-1, {})


# --- 2. study → MLflow parent run (= airflow-grid run) → refit → champion gate --------------------------------------

STUDY = "iris-integration"


@dataclass
class StudyFixture:
    root: Path
    spec: dict[str, Any]
    first: Study


@pytest.fixture(scope="class")
def study(airflow_db: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StudyFixture]:
    """One run of grid_search_nightly on the iris spec, shared by the tests of the class (one MLflow, one store)."""
    root = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _isolate(monkeypatch, root)
        spec = iris_spec(STUDY)
        yield StudyFixture(root=root, spec=spec, first=run_study(load_dag("grid_search_nightly"), spec))


@pytest.fixture
def in_study(study: StudyFixture, monkeypatch: pytest.MonkeyPatch) -> StudyFixture:
    """The class's study, with its MLflow and store active for this test."""
    _isolate(monkeypatch, study.root)
    return study


@pytest.fixture(scope="class")
def cli_run(study: StudyFixture) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    return run_cli(study.spec, study.root / "cli")


@dataclass
class Refit:
    conf: Any
    result: dict[str, Any]


@pytest.fixture(scope="class")
def first_refit(study: StudyFixture) -> Refit:
    """The refit DAG run with the parent run id from the conf the study's trigger_refit created."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _isolate(monkeypatch, study.root)
        conf = dag_run_conf("grid_refit", f"refit__{study.first.dag_id}__{study.first.run_id}")
        assert isinstance(conf, dict), f"the refit run got {type(conf).__name__}: {conf!r}"
        state, result = run_refit(conf["parent_run_id"])
        assert state == "success", result
        return Refit(conf=conf, result=result)


class TestStudyAndRefit:
    def test_dag_run_succeeds_with_one_task_per_candidate(self, in_study: StudyFixture) -> None:
        first = in_study.first
        assert first.state == "success"
        tis = task_instances(first.dag_id, first.run_id)
        assert {(t.task_id, t.map_index): t.state for t in tis} == {
            ("plan", -1): "success",
            ("local_candidates", -1): "success",
            ("kubernetes_candidates", -1): "success",
            ("evaluate_kubernetes", -1): "skipped",  # backend local: the pod task maps over nothing
            ("evaluate", 0): "success",
            ("evaluate", 1): "success",
            ("evaluate", 2): "success",
            ("select", -1): "success",
            ("trigger_refit", -1): "success",
        }
        # map_index_template: the UI shows the candidate, not a number
        assert [t.rendered_map_index for t in tis if t.task_id == "evaluate"] == ["C=0.1", "C=1", "C=10"]
        assert first.plan["n_candidates"] == 3 and first.plan["n_fits"] == 9
        assert first.plan["overrides"] == ["spec"]
        results = xcoms(first.dag_id, first.run_id, "evaluate")
        assert sorted(results) == [0, 1, 2]
        assert all(not item["from_store"] for payload in results.values() for item in payload["results"])

    def test_one_parent_run_with_artifacts_params_and_metrics(self, in_study: StudyFixture) -> None:
        first, downloads = in_study.first, in_study.root / "downloads"
        parents = parent_runs(STUDY, first.dag_id, first.run_id)
        assert len(parents) == 1
        parent = parents[0]
        assert parent.info.run_id == first.select["parent_run_id"]
        assert parent.info.status == "FINISHED"
        names = {item.path for item in tracking.client().list_artifacts(parent.info.run_id)}
        assert names >= ARTIFACTS
        for png in ("score_by_param.png", "ranked_candidates.png"):
            assert artifact(parent.info.run_id, png, downloads).startswith(PNG_MAGIC)
        spec_yaml = yaml.safe_load(artifact(parent.info.run_id, "spec.yaml", downloads))
        assert spec_yaml["name"] == STUDY
        assert spec_yaml["param_grid"] == [in_study.spec["param_grid"]]  # normalised: a list of grids, as sklearn's
        csv_lines = artifact(parent.info.run_id, "cv_results.csv", downloads).decode().strip().splitlines()
        assert {"params", "mean_test_score", "rank_test_score"} <= set(csv_lines[0].split(","))
        assert len(csv_lines) == 1 + 3

        best = json.loads(artifact(parent.info.run_id, "best.json", downloads))
        assert best["best_index"] == first.select["best_index"]
        assert parent.data.params == {
            f"best_{name}": tracking.param_text(value) for name, value in best["best_params"].items()
        }
        assert parent.data.params  # best_clf__C
        assert parent.data.metrics["best_cv_score"] == first.select["best_score"]
        assert parent.data.metrics["best_mean_test_score"] == first.select["best_score"]
        tags = parent.data.tags
        assert tags[tracking.TAG_DATASET_VERSION] == first.plan["dataset_version"] == first.select["dataset_version"]
        assert tags["airflow_grid.dataset_version_source"] == first.plan["dataset_version_source"]
        assert tags[tracking.TAG_PLAN_URI] == first.plan["plan_uri"]
        assert tags[tracking.TAG_BEST_INDEX] == str(best["best_index"])

        children = child_runs(parent)
        assert sorted(int(c.data.tags[tracking.TAG_CANDIDATE]) for c in children) == [0, 1, 2]
        assert all(c.data.tags[tracking.TAG_ROLE] == "candidate" for c in children)

    def test_cv_results_equal_airflow_grid_run(
        self, in_study: StudyFixture, cli_run: tuple[dict[str, list[Any]], dict[str, Any]]
    ) -> None:
        parent_id, downloads = in_study.first.select["parent_run_id"], in_study.root / "downloads"
        from_dag = json.loads(artifact(parent_id, "cv_results.json", downloads))
        from_dag_best = json.loads(artifact(parent_id, "best.json", downloads))
        from_cli, cli_best = cli_run
        assert set(from_dag) == set(from_cli)
        columns = score_columns(from_dag)
        assert {"params", "param_clf__C", "mean_test_score", "std_test_score", "rank_test_score"} <= set(columns)
        assert {f"split{k}_test_score" for k in range(3)} <= set(columns)
        for column in columns:
            assert len(from_dag[column]) == len(from_cli[column]) == 3, column
            for index, (a, b) in enumerate(zip(from_dag[column], from_cli[column], strict=True)):
                assert same_cell(a, b), f"{column}[{index}]: DAG {a!r} != CLI {b!r}"
        for key in ("best_index", "best_score", "best_params", "refit_metric", "n_candidates", "n_failed"):
            assert from_dag_best[key] == cli_best[key], key

    def test_trigger_passes_json_conf_and_refit_registers_champion(
        self,
        in_study: StudyFixture,
        first_refit: Refit,
        cli_run: tuple[dict[str, list[Any]], dict[str, Any]],
    ) -> None:
        first, conf, result = in_study.first, first_refit.conf, first_refit.result
        assert conf == first.select  # JSON-ready dict, not a repr string
        assert (result["model_name"], result["version"], result["promoted"]) == (STUDY, "1", True)
        assert result["best_index"] == first.select["best_index"]
        client = tracking.client()
        assert str(client.get_model_version_by_alias(STUDY, "champion").version) == "1"
        assert str(client.get_model_version_by_alias(STUDY, "challenger").version) == "1"
        version = client.get_model_version(STUDY, "1")
        assert float(version.tags["holdout_score"]) == result["holdout_score"]
        refit_run = client.get_run(version.run_id)
        assert refit_run.data.tags[tracking.TAG_ROLE] == "refit"
        assert refit_run.data.tags["mlflow.parentRunId"] == conf["parent_run_id"]
        assert any(key.startswith("holdout_") for key in refit_run.data.metrics)
        import mlflow

        mlflow.set_tracking_uri(tracking.tracking_uri())
        mlflow.set_registry_uri(tracking.tracking_uri())
        assert mlflow.models.get_model_info(f"models:/{STUDY}@champion").signature is not None
        # same refit worker, same data: `airflow-grid run` scores the holdout identically
        assert result["holdout_score"] == cli_run[1]["holdout_score"]

    def test_weaker_study_becomes_challenger_not_champion(self, in_study: StudyFixture, first_refit: Refit) -> None:
        second = run_study(load_dag("grid_search_nightly"), weak_spec(STUDY))
        assert second.state == "success"
        assert second.run_id != in_study.first.run_id
        assert second.select["parent_run_id"] != in_study.first.select["parent_run_id"]
        assert len(parent_runs(STUDY, second.dag_id, second.run_id)) == 1
        state, result = run_refit(second.select["parent_run_id"])
        assert state == "success", result
        assert result["holdout_score"] < first_refit.result["holdout_score"]
        assert (result["version"], result["promoted"], result["champion_version"]) == ("2", False, "1")
        client = tracking.client()
        assert str(client.get_model_version_by_alias(STUDY, "challenger").version) == "2"
        assert str(client.get_model_version_by_alias(STUDY, "champion").version) == "1"


# --- 3. rerun of the same DAG run: everything from the store, no duplicate MLflow runs -----------------------------


def test_reruns_are_served_from_store_without_duplicate_mlflow_runs(isolated: Path) -> None:
    dag = load_dag("grid_search_nightly")
    spec = iris_spec("iris-rerun", param_grid={"clf__C": [0.1, 10]}, holdout=None)
    when = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)  # a scheduled-like run: version = its logical date

    def from_store(run_id: str) -> list[bool]:
        payloads = xcoms(dag.dag_id, run_id, "evaluate")
        return [item["from_store"] for index in sorted(payloads) for item in payloads[index]["results"]]

    first = run_study(dag, spec, logical_date=when, run_after=when)
    assert first.state == "success"
    assert from_store(first.run_id) == [False, False]
    assert first.plan["dataset_version"] == "2026-11-20"
    assert first.plan["dataset_version_source"] == "logical_date"

    # The same DAG again with the same conf: a new DAG run, nothing fitted, a new study run in MLflow.
    again = run_study(dag, spec)
    assert again.state == "success" and again.run_id != first.run_id
    assert from_store(again.run_id) == [True, True]
    assert again.plan["plan_uri"] == first.plan["plan_uri"]
    assert again.select["parent_run_id"] != first.select["parent_run_id"]

    # The first DAG run cleared and run again (dag.test() with the same logical date replaces the run under the
    # same run_id): select logs for the same (dag_id, run_id) and must find the parent run it made the first time.
    rerun = run_study(dag, spec, logical_date=when, run_after=when)
    assert rerun.state == "success" and rerun.run_id == first.run_id
    assert from_store(rerun.run_id) == [True, True]
    parents = parent_runs("iris-rerun", dag.dag_id, first.run_id)
    assert len(parents) == 1
    assert rerun.select["parent_run_id"] == first.select["parent_run_id"] == parents[0].info.run_id
    assert sorted(int(c.data.tags[tracking.TAG_CANDIDATE]) for c in child_runs(parents[0])) == [0, 1]
    assert parents[0].data.tags[tracking.TAG_DATASET_VERSION] == "2026-11-20"
    experiment = tracking.client().get_experiment_by_name("iris-rerun")
    all_parents = tracking.client().search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{tracking.TAG_ROLE}` = 'parent'"
    )
    assert len(all_parents) == 2  # one per DAG run: first (rerun included) and again
    # the refit was triggered once for the first run; the rerun's trigger found that run and skipped
    assert states(dag.dag_id, rerun.run_id)[("trigger_refit", -1)] == "skipped"
    assert dag_run_conf("grid_refit", f"refit__{dag.dag_id}__{first.run_id}")["parent_run_id"] == parents[0].info.run_id


def test_history_reorders_and_batches_tasks_without_changing_scores(isolated: Path) -> None:
    """A study with cost history (as after last night's run) maps fewer, costlier-first tasks; same cv_results_."""
    from airflow_grid import costs
    from airflow_grid.plan import default_min_items, make_plan
    from airflow_grid.spec import parse_spec
    from airflow_grid.store import Store

    spec = iris_spec("iris-costs", param_grid={"clf__C": [0.1, 1, 10, 100], "clf__kernel": ["linear", "rbf"]})
    parsed, store = parse_spec(spec), Store(str(isolated / "store"))
    plan = make_plan(parsed, store)  # the plan the DAG's plan task will find: same spec, same data
    seeded = {costs.signature(parsed, plan.row(0, i)): 0.1 * (1 + i) for i in range(8)}  # quick, the last costliest
    store.write_json(costs.history_path(parsed.name), seeded)

    run = run_study(load_dag("grid_search_nightly"), spec)
    assert run.state == "success"
    tasks = xcoms(run.dag_id, run.run_id, "evaluate")
    indices = [[r["index"] for r in tasks[m]["results"]] for m in sorted(tasks)]
    assert len(indices) == min(8, default_min_items(parsed)) < 8  # quick candidates share tasks
    assert 7 in indices[0]  # the costliest unit's task is mapped first
    assert sorted(i for task in indices for i in task) == list(range(8))

    from_dag = json.loads((Path(run.select["results_uri"].removeprefix("file://")) / "cv_results.json").read_text())
    from_cli, _ = run_cli(spec, isolated / "cli")  # one candidate per request, in the plan's order
    for column in score_columns(from_dag):
        for index, (a, b) in enumerate(zip(from_dag[column], from_cli[column], strict=True)):
            assert same_cell(a, b), f"{column}[{index}]: DAG {a!r} != CLI {b!r}"
    learned = costs.load(store, parsed.name)
    assert set(learned) == set(seeded) and learned != seeded  # select replaced the guesses with measurements


# --- 4. asset event → dataset version on the MLflow run ------------------------------------------------------------


def test_asset_event_dataset_version_reaches_mlflow(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An asset event with ``extra.dataset_version``, consumed by the run, decides the version the study records.

    ``dag.test()`` creates a manual run with no consumed events. As the scheduler does for an asset-triggered run
    (``dag_run.consumed_asset_events.extend(events)``), the event - registered through Airflow's AssetManager, the
    same call the REST API's ``POST /assets/events`` makes - is attached to the run right after dag.test creates
    it, before any task starts. The task then receives it through the Execution API as ``triggering_asset_events``.
    """
    import airflow.models.dagrun as dagrun_module
    from airflow.assets.manager import AssetManager
    from airflow.models.asset import AssetModel
    from sqlalchemy import select

    version = "v2026.11.24-rc1"
    create = dagrun_module.get_or_create_dagrun
    consumed: list[int] = []

    def create_with_event(**kwargs: Any) -> Any:
        dag_run = create(**kwargs)
        session = kwargs["session"]
        asset = session.scalar(select(AssetModel).where(AssetModel.name == "digits_dataset"))
        assert asset is not None, "the dag-processor did not register the DAG's asset"
        assert "grid_search_on_dataset" in {ref.dag_id for ref in asset.scheduled_dags}
        event = AssetManager.register_asset_change(
            asset=asset, extra={"dataset_version": version}, session=session, source_is_api=True
        )
        assert event is not None
        dag_run.consumed_asset_events.append(event)
        session.commit()
        consumed.append(event.id)
        return dag_run

    monkeypatch.setattr(dagrun_module, "get_or_create_dagrun", create_with_event)
    dag = load_dag("grid_search_on_dataset")
    study = run_study(dag, iris_spec("iris-asset", param_grid={"clf__C": [0.1, 10]}), logical_date=None)
    assert consumed, "the asset event was not attached"
    assert study.state == "success"
    assert study.plan["dataset_version"] == version
    assert study.plan["dataset_version_source"] == "asset_event"
    parent = parent_runs("iris-asset", dag.dag_id, study.run_id)
    assert len(parent) == 1
    assert parent[0].data.tags[tracking.TAG_DATASET_VERSION] == version
    assert parent[0].data.tags["airflow_grid.dataset_version_source"] == "asset_event"
    assert dag_run_conf("grid_refit", f"refit__{dag.dag_id}__{study.run_id}")["dataset_version"] == version


def test_dataset_version_conf_is_recorded(isolated: Path) -> None:
    """The conf path end to end (conf wins over the logical date dag.test sets)."""
    dag = load_dag("grid_search_on_dataset")
    spec = iris_spec("iris-conf-version", param_grid={"clf__C": [1]}, holdout=None)
    dag_run = dag.test(run_conf={"spec": spec, "dataset_version": "2026-10-01"})
    assert dag_run.state == "success"
    plan = xcoms(dag.dag_id, dag_run.run_id, "plan", key="plan")[-1]
    assert (plan["dataset_version"], plan["dataset_version_source"]) == ("2026-10-01", "conf")
    parent = parent_runs("iris-conf-version", dag.dag_id, dag_run.run_id)
    assert parent[0].data.tags[tracking.TAG_DATASET_VERSION] == "2026-10-01"


# --- 5. plan-time failures, and conf rejected before a run exists ---------------------------------------------------


def _no_pool_dag() -> Any:
    """A grid-search DAG in a pool that does not exist, stored in the DB as the dag-processor would store it."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    from airflow_grid.dag_factory import grid_search_dag

    dag = grid_search_dag("grid_search_no_pool", DAGS_DIR / "specs" / "iris_random_forest.yaml", pool="no_such_pool")
    DagBundlesManager().sync_bundles_to_db()  # the bundle row the DAG refers to, if no dag.test() made it yet
    bag = DagBag(dag_folder=str(DAGS_DIR / "does-not-exist"), collect_dags=False)
    bag.bag_dag(dag)
    sync_bag_to_db(bag, "dags-folder", None)
    return dag


PLAN_FAILURES = [
    pytest.param(
        "grid_search_nightly",
        iris_spec("iris-bad-param", param_grid={"clf__C": [1], "clf__bogus": [1, 2]}),
        r"invalid spec: .*clf__bogus",
        id="unknown-estimator-param",
    ),
    pytest.param(
        "grid_search_nightly",
        iris_spec("iris-over-budget", limits={"max_fits": 5}),
        r"invalid spec: .*9 fits, more than max_fits=5",
        id="over-max-fits",
    ),
    pytest.param(
        "no_pool",
        iris_spec("iris-no-pool"),
        r"pool 'no_such_pool' does not exist.*airflow pools set no_such_pool",
        id="missing-pool",
    ),
]


@pytest.mark.parametrize(("dag_name", "spec", "message"), PLAN_FAILURES)
def test_plan_failure_stops_the_run_before_any_candidate(
    isolated: Path, capfd: pytest.CaptureFixture[str], dag_name: str, spec: dict[str, Any], message: str
) -> None:
    import re

    dag = _no_pool_dag() if dag_name == "no_pool" else load_dag(dag_name)
    dag_run = dag.test(run_conf={"spec": spec})
    output = "".join(capfd.readouterr())
    assert str(dag_run.state) == "failed"
    tis = task_instances(dag.dag_id, dag_run.run_id)
    by_task = {(t.task_id, t.map_index): t.state for t in tis}
    assert by_task[("plan", -1)] == "failed"
    # evaluate never expanded, never ran: only the unexpanded placeholder, upstream_failed
    evaluate_tis = [(t.task_id, t.map_index, t.state) for t in tis if t.task_id.startswith("evaluate")]
    assert ("evaluate", -1, "upstream_failed") in evaluate_tis
    assert all((index, state) == (-1, "upstream_failed") for _, index, state in evaluate_tis), evaluate_tis
    assert xcoms(dag.dag_id, dag_run.run_id, "evaluate") == {}
    assert by_task[("select", -1)] == "upstream_failed"
    assert not (isolated / "store" / "results").exists()  # no candidate result was written
    assert tracking.client().get_experiment_by_name(spec["name"]) is None  # nothing logged
    assert re.search(message, output), f"{message!r} not in the task log"


@pytest.mark.parametrize(
    ("conf", "match"),
    [
        ({"cv": 1}, "param cv"),
        ({"resources": {"cpu": "lots"}}, "param resources"),
        ({"max_parallel": 0}, "param max_parallel"),
        ({"backend": "spark"}, "param backend"),
    ],
    ids=["cv-1", "cpu-lots", "max-parallel-0", "backend-spark"],
)
def test_bad_conf_is_rejected_before_a_run_exists(isolated: Path, conf: dict[str, Any], match: str) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    dag = load_dag("grid_search_nightly")
    before = count_dag_runs(dag.dag_id)
    with pytest.raises(ParamValidationError, match=match):
        dag.test(run_conf=conf)
    assert count_dag_runs(dag.dag_id) == before
