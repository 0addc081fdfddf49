"""The champion asset: a promotion emits one asset event, a losing challenger none; score_with_champion scores.

Driven end to end on the metadata DB with ``dag.test()``: grid_search_nightly then grid_refit on a small digits study
named like the example's (``digits-model-family``), with ``score_with_champion`` stored and unpaused as the
dag-processor and a user would leave it. The asset event is read from the DB, and the consumer's queue row (what
the scheduler turns into a run) is checked. The consumer is then run with ``dag.test()`` on that very event,
attached to its run the way the scheduler attaches consumed events (as ``test_asset_event_...`` in
test_airflow_integration.py does), and its predictions file is compared with the champion model's predictions.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from airflow_grid import tracking
from airflow_grid.operators.champion import champion_asset

pytestmark = pytest.mark.airflow

STUDY = "digits-model-family"  # the study dags/score_with_champion.py follows
ASSET = champion_asset(STUDY)


def digits_spec(**fields: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": STUDY,
        "data": {"_target_": "sklearn.datasets.load_digits", "return_X_y": True},
        "holdout": {"test_size": 0.3, "random_state": 0, "stratify": True},
        "estimator": {"_target_": "sklearn.pipeline.Pipeline", "steps": [["clf", {"_target_": "sklearn.svm.SVC"}]]},
        "param_grid": {"clf__C": [1, 10]},
        "cv": 2,
        "scoring": "accuracy",
        "resources": {"cpu": 1, "memory": "1Gi"},
    }
    spec.update(fields)
    return spec


def champion_events() -> list[Any]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(
            select(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.name == ASSET.name, AssetModel.uri == ASSET.uri)
            .order_by(AssetEvent.id)
        ).all()
        session.expunge_all()
        return list(rows)


def queued_for(dag_id: str) -> int:
    from airflow.models.asset import AssetDagRunQueue
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    with create_session() as session:
        query = select(func.count()).select_from(AssetDagRunQueue).where(AssetDagRunQueue.target_dag_id == dag_id)
        return int(session.scalar(query) or 0)


def store_unpaused(dag: Any) -> None:
    """Store the DAG as the dag-processor does (its asset schedule included) and unpause it."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session
    from test_airflow_integration import DAGS_DIR

    DagBundlesManager().sync_bundles_to_db()
    bag = DagBag(dag_folder=str(DAGS_DIR / "does-not-exist"), collect_dags=False)
    bag.bag_dag(dag)
    sync_bag_to_db(bag, "dags-folder", None)
    with create_session() as session:
        session.get(DagModel, dag.dag_id).is_paused = False


def study_and_refit(spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    from test_airflow_integration import load_dag, run_refit, run_study

    study = run_study(load_dag("grid_search_nightly"), spec)
    assert study.state == "success"
    state, result = run_refit(study.select["parent_run_id"])
    assert state == "success", result
    return study.select["parent_run_id"], result


@pytest.fixture(scope="module")
def promoted(airflow_db: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from airflow.dag_processing.dagbag import DagBag
    from test_airflow_integration import DAGS_DIR, _isolate

    root = tmp_path_factory.mktemp("champion")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _isolate(monkeypatch, root)
        scorer = DagBag(dag_folder=str(DAGS_DIR / "score_with_champion.py")).dags["score_with_champion"]
        store_unpaused(scorer)
        before = len(champion_events())
        parent_run_id, result = study_and_refit(digits_spec())
        yield {"root": root, "scorer": scorer, "before": before, "parent": parent_run_id, "result": result}


def test_promotion_emits_one_event_with_the_documented_extra(promoted: dict[str, Any]) -> None:
    result = promoted["result"]
    assert result["promoted"] is True
    events = champion_events()[promoted["before"] :]
    assert len(events) == 1
    event = events[0]
    assert (event.source_dag_id, event.source_task_id) == ("grid_refit", "refit")
    assert event.extra == {
        "model_uri": f"models:/{STUDY}/{result['version']}",
        "model_name": STUDY,
        "version": result["version"],
        "holdout_score": result["holdout_score"],
        "holdout_metric": "score",  # single-metric spec: sklearn's name for it
        "dataset_version": result["dataset_version"],
        "parent_run_id": promoted["parent"],
    }
    assert result["dataset_version"]  # recorded on the study, carried by the event
    assert queued_for("score_with_champion") == 1  # the scheduler would start the consumer


def test_a_losing_challenger_emits_nothing(promoted: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from test_airflow_integration import _isolate

    _isolate(monkeypatch, promoted["root"])
    weak = digits_spec(
        estimator={"_target_": "sklearn.tree.DecisionTreeClassifier", "random_state": 0},
        param_grid={"max_depth": [1]},
    )
    count = len(champion_events())
    _, result = study_and_refit(weak)
    assert (result["promoted"], result["champion_version"]) == (False, promoted["result"]["version"])
    assert len(champion_events()) == count


def test_score_with_champion_writes_predictions(promoted: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import airflow.models.dagrun as dagrun_module
    import pandas as pd
    from airflow.models.asset import AssetEvent
    from test_airflow_integration import DAGS_DIR, _isolate, xcoms

    from airflow_grid import data, grid
    from airflow_grid.spec import load_spec_file, parse_spec

    root = _isolate(monkeypatch, promoted["root"])
    event_id = champion_events()[promoted["before"]].id
    create = dagrun_module.get_or_create_dagrun

    def create_with_event(**kwargs: Any) -> Any:
        dag_run = create(**kwargs)
        dag_run.consumed_asset_events.append(kwargs["session"].get(AssetEvent, event_id))
        kwargs["session"].commit()
        return dag_run

    monkeypatch.setattr(dagrun_module, "get_or_create_dagrun", create_with_event)
    scorer = promoted["scorer"]
    run = scorer.test(logical_date=None)
    assert run.state == "success"
    scored = xcoms(scorer.dag_id, run.run_id, "score")[-1]
    version = promoted["result"]["version"]
    assert (scored["version"], scored["announced_version"]) == (version, version)
    path = root / "store" / "predictions" / STUDY / f"{run.run_id.replace(':', '_').replace('+', '_')}.csv"
    assert scored["predictions"].endswith(path.name) and path.is_file()
    frame = pd.read_csv(path)
    spec = parse_spec(load_spec_file(DAGS_DIR / "specs" / "digits_model_family.yaml"))  # the example's batch
    holdout = data.load(spec, grid.build_estimator(spec)).X_holdout
    model, _ = tracking.load_champion(STUDY)
    assert list(frame.columns) == ["row", "prediction"] and len(frame) == len(holdout) == scored["rows"]
    assert frame["prediction"].tolist() == model.predict(holdout).tolist()
