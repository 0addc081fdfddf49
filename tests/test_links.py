"""Task links to MLflow: "MLflow run" (select), "MLflow model" (refit), "MLflow candidate run" (each evaluate).

The end-to-end test runs grid_search_nightly and the refit with ``dag.test()``, then asks for each task instance's
links through the Airflow API server's own route (``GET .../taskInstances/{task}/links``), which reads what the
links stored in XCom when their task instances finished - the URLs a user's button opens, mapped and unmapped.
The unit tests pin the URL shapes, the base-URL setting and the empty link when there is nothing to link to.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_grid import tracking
from airflow_grid.tracking import links

BASE = "http://mlflow.test:5000"
UI_URL_ENV = "AIRFLOW__AIRFLOW_GRID__MLFLOW_UI_URL"

# --- unit: URLs, base URL, nothing to link to --------------------------------------------------------------------


def test_urls() -> None:
    assert links.run_url("7", "abc", BASE) == f"{BASE}/#/experiments/7/runs/abc"
    assert (
        links.model_version_url("digits-model-family", "3", BASE) == f"{BASE}/#/models/digits-model-family/versions/3"
    )


@pytest.mark.parametrize(
    ("configured", "tracking_uri", "base"),
    [
        ("https://mlflow.example.com/", "sqlite:////tmp/mlflow.db", "https://mlflow.example.com"),
        (None, "http://tracking:5000/", "http://tracking:5000"),
        (None, "sqlite:////tmp/mlflow.db", "http://127.0.0.1:5000"),  # where `mlflow ui` serves by default
    ],
    ids=["configured", "tracking-server", "embedded-sqlite"],
)
def test_base_url(monkeypatch: pytest.MonkeyPatch, configured: str | None, tracking_uri: str, base: str) -> None:
    if configured is None:
        monkeypatch.delenv(UI_URL_ENV, raising=False)
    else:
        monkeypatch.setenv(UI_URL_ENV, configured)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    assert links.ui_base_url() == base
    assert links.run_url("1", "r").startswith(f"{base}/#/")


RUNS = {"experiment_id": "4", "parent_run_id": "p", "candidate_runs": [[2, "c2"], [0, "c0"]]}  # best rank first


@pytest.mark.parametrize(
    ("payload", "runs", "url"),
    [
        ({"results": [{"index": 0}]}, RUNS, f"{BASE}/#/experiments/4/runs/c0"),
        ({"results": [{"index": 0}, {"index": 2}]}, RUNS, f"{BASE}/#/experiments/4/runs/c2"),  # the better one
        ({"results": [{"index": 1}]}, RUNS, ""),  # past the child-run cap
        ({"results": [{"index": 0}]}, None, ""),  # select has not run (yet)
        (None, RUNS, ""),  # the evaluate task failed: no result
    ],
    ids=["child-run", "grouped-best-first", "no-child-run", "no-select", "no-result"],
)
def test_candidate_url(payload: Any, runs: Any, url: str) -> None:
    assert links.candidate_url(payload, runs, BASE) == url


class FakeXCom:
    """The SDK XCom with nothing stored (what a link sees when its task produced nothing)."""

    def __init__(self, values: dict[tuple[str, str, int], Any]) -> None:
        self.values = values

    def get_value(self, *, ti_key: Any, key: str) -> Any:
        return self.values.get((ti_key.task_id, key, ti_key.map_index))

    def get_one(self, *, key: str, task_id: str, map_index: int, **_: Any) -> Any:
        return self.values.get((task_id, key, map_index))


def _ti_key(task_id: str, map_index: int = -1) -> Any:
    return SimpleNamespace(dag_id="d", run_id="r", task_id=task_id, map_index=map_index, try_number=1)


def _operator(downstream: list[Any]) -> Any:
    return SimpleNamespace(get_direct_relatives=lambda upstream: [] if upstream else downstream)


@pytest.mark.parametrize("stored", [{}, {"mlflow_runs": {"experiment_id": "4"}}], ids=["nothing", "no-parent"])
def test_run_link_is_empty_without_a_parent_run(monkeypatch: pytest.MonkeyPatch, stored: dict[str, Any]) -> None:
    monkeypatch.setattr(links, "XCom", FakeXCom({("select", k, -1): v for k, v in stored.items()}))
    assert links.MlflowRunLink().get_link(_operator([]), ti_key=_ti_key("select")) == ""


@pytest.mark.parametrize(
    "result", [None, {"model_name": "m"}, "not a dict"], ids=["failed-refit", "no-version", "unexpected"]
)
def test_model_link_is_empty_without_a_registered_version(monkeypatch: pytest.MonkeyPatch, result: Any) -> None:
    monkeypatch.setattr(links, "XCom", FakeXCom({("refit", "return_value", -1): result}))
    assert links.MlflowModelLink().get_link(_operator([]), ti_key=_ti_key("refit")) == ""


def test_candidate_link_reads_the_downstream_select(monkeypatch: pytest.MonkeyPatch) -> None:
    """At the evaluate task's end select has not run: empty; after select (a re-run evaluate): its child run."""
    monkeypatch.setenv(UI_URL_ENV, BASE)
    select = SimpleNamespace(task_id="select", operator_extra_links=[links.MlflowRunLink()])
    values: dict[tuple[str, str, int], Any] = {("evaluate", "return_value", 1): {"results": [{"index": 2}]}}
    monkeypatch.setattr(links, "XCom", FakeXCom(values))
    link, key = links.MlflowCandidateRunLink(), _ti_key("evaluate", 1)
    assert link.get_link(_operator([select]), ti_key=key) == ""
    values[("select", links.RUNS_XCOM_KEY, -1)] = RUNS
    assert link.get_link(_operator([select]), ti_key=key) == f"{BASE}/#/experiments/4/runs/c2"
    assert link.get_link(_operator([]), ti_key=key) == ""  # no study task downstream


def test_provider_registers_the_links() -> None:
    from airflow_grid import get_provider_info

    registered = get_provider_info()["extra-links"]
    names = ["MlflowRunLink", "MlflowModelLink", "MlflowCandidateRunLink"]
    assert registered == [f"airflow_grid.tracking.links.{name}" for name in names]


# --- end to end: dag.test(), then the API server's links route -------------------------------------------------


def api_links(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict[str, str | None]:
    """What ``GET /api/v2/dags/{dag}/dagRuns/{run}/taskInstances/{task}/links?map_index=`` answers."""
    from airflow.api_fastapi.core_api.routes.public.extra_links import get_extra_links
    from airflow.models.dagbag import DBDagBag
    from airflow.utils.session import create_session

    with create_session() as session:
        response = get_extra_links(
            dag_id=dag_id, dag_run_id=run_id, task_id=task_id, session=session, dag_bag=DBDagBag(), map_index=map_index
        )
    return dict(response.extra_links)


@pytest.fixture(scope="module")
def linked_study(airflow_db: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """grid_search_nightly on 3 iris candidates with 2 child runs, then its refit; links to a configured UI."""
    from test_airflow_integration import _isolate, iris_spec, load_dag, run_study, xcoms

    with pytest.MonkeyPatch.context() as monkeypatch:
        _isolate(monkeypatch, tmp_path_factory.mktemp("links"))
        monkeypatch.setenv(UI_URL_ENV, BASE)
        monkeypatch.setenv("AIRFLOW__AIRFLOW_GRID__MAX_CHILD_RUNS", "2")
        study = run_study(load_dag("grid_search_nightly"), iris_spec("iris-links"))
        assert study.state == "success"
        refit_run = load_dag("grid_refit").test(run_conf={"parent_run_id": study.select["parent_run_id"]})
        assert refit_run.state == "success"
        client = tracking.client()
        parent = client.get_run(study.select["parent_run_id"])
        children = client.search_runs(
            [parent.info.experiment_id],
            filter_string=(
                f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`{tracking.TAG_ROLE}` = 'candidate'"
            ),
        )
        yield {
            "study": study,
            "refit": xcoms("grid_refit", refit_run.run_id, "refit")[-1],
            "refit_run_id": refit_run.run_id,
            "experiment_id": parent.info.experiment_id,
            "children": {int(c.data.tags[tracking.TAG_CANDIDATE]): c.info.run_id for c in children},
        }


@pytest.mark.airflow
def test_select_links_the_parent_run(linked_study: dict[str, Any]) -> None:
    study = linked_study["study"]
    expected = f"{BASE}/#/experiments/{linked_study['experiment_id']}/runs/{study.select['parent_run_id']}"
    assert api_links(study.dag_id, study.run_id, "select") == {"MLflow run": expected}


@pytest.mark.airflow
def test_each_evaluate_instance_links_its_child_run_where_one_exists(linked_study: dict[str, Any]) -> None:
    study, children = linked_study["study"], linked_study["children"]
    assert len(children) == 2  # capped: the third candidate has no child run
    seen = {}
    for map_index in (0, 1, 2):  # one candidate per task: map index = candidate index
        child = children.get(map_index)
        expected = None if child is None else f"{BASE}/#/experiments/{linked_study['experiment_id']}/runs/{child}"
        seen[map_index] = api_links(study.dag_id, study.run_id, "evaluate", map_index)
        assert seen[map_index] == {"MLflow candidate run": expected}, map_index
    assert sum(v["MLflow candidate run"] is None for v in seen.values()) == 1


@pytest.mark.airflow
def test_refit_links_the_registered_version(linked_study: dict[str, Any]) -> None:
    refit = linked_study["refit"]
    assert (refit["model_name"], refit["version"]) == ("iris-links", "1")
    expected = f"{BASE}/#/models/iris-links/versions/1"
    assert api_links("grid_refit", linked_study["refit_run_id"], "refit") == {"MLflow model": expected}
