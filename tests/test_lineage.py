"""OpenLineage: the plan reports the dataset it read, the refit the model it registered.

Pure naming is tested directly (against the OpenLineage client's own naming classes where they exist). The hooks
return ``None`` without the provider and import nothing. The ``airflow``-marked test runs a study and its refit with
``dag.test()`` in a fresh interpreter with the OpenLineage provider's listener on a file transport, and reads the
events it wrote: a fresh interpreter, because the provider decides at plugin load (once per process, cached)
whether it is enabled, and this test process may have loaded Airflow's plugins already without a transport.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from airflow_grid import lineage
from airflow_grid.lineage import Lineage, LineageDataset

REGISTERED = {
    "model_name": "iris-lineage",
    "version": "3",
    "promoted": True,
    "champion_version": "3",
    "refit_run_id": "abc123",
    "dataset_version": "2026-11-01",
}


# --- naming (pure) ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        pytest.param("s3://bucket/churn/date=2026-11-01/x", ("s3://bucket", "churn/date=2026-11-01/x"), id="s3"),
        pytest.param("s3a://bucket/a/b.csv", ("s3://bucket", "a/b.csv"), id="s3a"),
        pytest.param("gs://bucket/a/b.csv", ("gs://bucket", "a/b.csv"), id="gs"),
        pytest.param("gcs://bucket/a/b.csv", ("gs://bucket", "a/b.csv"), id="gcs-alias"),
        pytest.param("/data/iris.csv", ("file", "/data/iris.csv"), id="absolute-path"),
        pytest.param("file:///data/my%20iris.csv", ("file", "/data/my iris.csv"), id="file-url"),
        pytest.param("file://nas01/data/iris.csv", ("file://nas01", "/data/iris.csv"), id="remote-file"),
        pytest.param("simplecache::s3://bucket/k.npz", ("s3://bucket", "k.npz"), id="fsspec-chain"),
        pytest.param("hdfs://namenode:8020/data/x.parquet", ("hdfs://namenode:8020", "/data/x.parquet"), id="hdfs"),
        pytest.param(
            "abfss://box@acct.dfs.core.windows.net/d/x.csv",
            ("abfss://box@acct.dfs.core.windows.net", "d/x.csv"),
            id="abfss",
        ),
        pytest.param("https://user:secret@host:8443/d/x.csv?sig=1", ("https://host:8443", "/d/x.csv"), id="no-secrets"),
    ],
)  # fmt: skip
def test_location_names_follow_the_naming_spec(uri: str, expected: tuple[str, str]) -> None:
    assert lineage.location_name(uri) == expected


def test_relative_path_is_named_by_its_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert lineage.location_name("data/iris.csv") == ("file", str(tmp_path / "data" / "iris.csv"))


def test_names_agree_with_the_openlineage_client() -> None:
    naming = pytest.importorskip("openlineage.client.naming.dataset")
    for uri, reference in [
        ("s3://bucket/a/b.csv", naming.S3(bucket_name="bucket", object_key="a/b.csv")),
        ("gs://bucket/a/b.csv", naming.GCS(bucket_name="bucket", object_key="a/b.csv")),
        ("/data/iris.csv", naming.LocalFileSystem(path="/data/iris.csv")),
        ("file://nas01/data/iris.csv", naming.RemoteFileSystem(host="nas01", path="/data/iris.csv")),
        ("hdfs://nn:8020/d/x", naming.HDFS(namenode_host="nn", namenode_port="8020", path="/d/x")),
    ]:
        assert lineage.location_name(uri) == (reference.get_namespace(), reference.get_name()), uri


@pytest.mark.parametrize(
    ("tracking_uri", "namespace"),
    [
        pytest.param("sqlite:////home/airflow/mlflow.db", "mlflow://local", id="sqlite"),
        pytest.param("file:///tmp/mlruns", "mlflow://local", id="file-store"),
        pytest.param("http://mlflow.internal:5000", "mlflow://mlflow.internal:5000", id="server"),
        pytest.param("https://u:pw@mlflow.example.com/", "mlflow://mlflow.example.com", id="no-credentials"),
        pytest.param("postgresql://u:pw@db:5432/mlflow", "mlflow://db:5432", id="db-store"),
        pytest.param("databricks://my-profile", "mlflow://databricks", id="databricks-profile"),
    ],
)
def test_tracking_namespace(tracking_uri: str, namespace: str) -> None:
    assert lineage.tracking_namespace(tracking_uri) == namespace


def test_loader_dataset_is_named_after_the_loader() -> None:
    data = {"_target_": "sklearn.datasets.load_digits", "return_X_y": True, "n_class": 5}
    dataset = lineage.data_dataset(data, "2026-11-01", "f" * 64)
    assert dataset == LineageDataset(
        "python",
        "sklearn.datasets.load_digits",
        "2026-11-01",
        {"fingerprint": "f" * 64, "loaderKwargs": {"return_X_y": True, "n_class": 5}},
    )


def test_refit_lineage_names_the_registered_model_and_its_data() -> None:
    document = {"spec": {"data": {"path": "s3://b/iris.csv", "target": "y"}}, "data_fingerprint": "ab" * 32}
    result = lineage.refit_lineage(document, REGISTERED, "http://mlflow:5000")
    assert result.inputs == (
        LineageDataset("s3://b", "iris.csv", "2026-11-01", {"fingerprint": "ab" * 32, "format": "csv"}),
    )
    (model,) = result.outputs
    assert (model.namespace, model.name, model.version) == ("mlflow://mlflow:5000", "models/iris-lineage/3", "3")
    assert model.facts == {
        "modelUri": "models:/iris-lineage/3",
        "refitRunId": "abc123",
        "promoted": True,
        "championVersion": "3",
    }


# --- the hooks, with and without the provider ------------------------------------------------------------------------


def _operators(tmp_path: Path) -> list[Any]:
    from airflow_grid.operators.plan import PlanGridSearchOperator
    from airflow_grid.operators.refit import RefitWinnerOperator

    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\n")
    return [
        PlanGridSearchOperator(task_id="plan", spec_path=str(spec)),
        RefitWinnerOperator(task_id="refit", parent_run_id="r"),
    ]


def test_hooks_return_none_and_import_nothing_without_the_provider(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    operators = _operators(tmp_path)
    for name in ("airflow.providers.openlineage", "airflow.providers.openlineage.extractors", "openlineage"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError, as if not installed
    before = {name for name in sys.modules if "openlineage" in name}
    document = {"spec": {"data": {"path": "/d/iris.csv"}}, "data_fingerprint": "0" * 64}
    for operator in operators:
        assert operator.get_openlineage_facets_on_start() is None
        assert operator.get_openlineage_facets_on_complete(None) is None  # nothing executed yet
        operator._lineage = lineage.refit_lineage(document, REGISTERED, "sqlite:///m.db")
        assert operator.get_openlineage_facets_on_complete(None) is None
    assert {name for name in sys.modules if "openlineage" in name} == before


def test_lineage_module_imports_nothing_heavy(tmp_path: Path) -> None:
    script = "import json, sys, airflow_grid.lineage; print(json.dumps(sorted(sys.modules)))"
    names = json.loads(
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    )
    assert [name for name in names if name.split(".")[0] in {"airflow", "mlflow", "openlineage", "attr"}] == []


def test_hooks_serialise_with_the_openlineage_client(tmp_path: Path) -> None:
    pytest.importorskip("airflow.providers.openlineage")
    from airflow.providers.openlineage.extractors import OperatorLineage
    from openlineage.client.serde import Serde

    plan, refit = _operators(tmp_path)
    assert plan.get_openlineage_facets_on_start() == OperatorLineage()
    assert plan.get_openlineage_facets_on_complete(None) == OperatorLineage()  # failed before reading: no input
    document = {"spec": {"data": {"path": "gs://b/iris.csv", "format": "csv"}}, "data_fingerprint": "0" * 64}
    refit._lineage = lineage.refit_lineage(document, REGISTERED, "http://mlflow:5000")
    result = refit.get_openlineage_facets_on_complete(None)
    assert isinstance(result, OperatorLineage)
    (output,) = [Serde.to_dict(dataset) for dataset in result.outputs]
    assert (output["namespace"], output["name"]) == ("mlflow://mlflow:5000", "models/iris-lineage/3")
    assert output["facets"]["version"]["datasetVersion"] == "3"
    facet = output["facets"]["airflowGrid"]
    assert facet["modelUri"] == "models:/iris-lineage/3" and facet["promoted"] is True
    assert facet["_schemaURL"].startswith("https://openlineage.io/spec/") and facet["_producer"]
    (data,) = [Serde.to_dict(dataset) for dataset in result.inputs]
    assert data["facets"]["airflowGrid"] == {**facet_base(data), "fingerprint": "0" * 64, "format": "csv"}


def facet_base(dataset: dict[str, Any]) -> dict[str, Any]:
    facet = dataset["facets"]["airflowGrid"]
    return {"_producer": facet["_producer"], "_schemaURL": facet["_schemaURL"]}


def test_empty_lineage_is_empty() -> None:
    pytest.importorskip("airflow.providers.openlineage")
    converted = Lineage().to_operator_lineage()
    assert converted is not None and (converted.inputs, converted.outputs) == ([], [])


# --- events emitted by the OpenLineage listener during dag.test() ----------------------------------------------------

DAG_FILE = """
from airflow_grid.dag_factory import grid_refit_dag, grid_search_dag

study = grid_search_dag("lineage_study", {spec!r}, refit_dag_id=None, data_roots=[{root!r}], retries=0)
refit = grid_refit_dag("lineage_refit", retries=0)
"""

RUN_SCRIPT = r"""
import importlib.util, json, sys
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session
from sqlalchemy import select

dag_file, version = sys.argv[1:]
module_spec = importlib.util.spec_from_file_location("lineage_dags", dag_file)
dags = importlib.util.module_from_spec(module_spec)
module_spec.loader.exec_module(dags)
study_run = dags.study.test(run_conf={"dataset_version": version})
with create_session() as session:
    query = select(XComModel.value).where(
        XComModel.dag_id == "lineage_study", XComModel.run_id == study_run.run_id, XComModel.task_id == "select",
        XComModel.key == "return_value",
    )
    parent_run_id = session.scalars(query).one()["parent_run_id"]
refit_run = dags.refit.test(run_conf={"parent_run_id": parent_run_id})
print("RESULT " + json.dumps({"study": str(study_run.state), "refit": str(refit_run.state)}))
"""


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _task_event(events: list[dict[str, Any]], job: str, event_type: str) -> dict[str, Any]:
    found = [e for e in events if e.get("job", {}).get("name") == job and e.get("eventType") == event_type]
    assert len(found) == 1, f"{len(found)} {event_type} events for {job}: {sorted({e['job']['name'] for e in events})}"
    return found[0]


def _airflow(env: dict[str, str], *args: str) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), *args], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"airflow {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _iris_csv_study(root: Path, version: str) -> tuple[Path, Path]:
    """An iris CSV at ``root/data/<version>/iris.csv`` and a spec whose data.path templates the version."""
    from sklearn.datasets import load_iris

    data = root / "data" / version / "iris.csv"
    data.parent.mkdir(parents=True)
    load_iris(as_frame=True).frame.to_csv(data, index=False)
    spec = {
        "name": "iris-lineage",
        "data": {"path": str(root / "data" / "{{ dataset_version }}" / "iris.csv"), "target": "target"},
        "holdout": {"test_size": 0.3, "random_state": 0, "stratify": True},
        "estimator": {"_target_": "sklearn.svm.SVC"},
        "param_grid": {"C": [1, 10]},
        "cv": 2,
        "resources": {"cpu": 1, "memory": "1Gi"},
    }
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    return data, spec_path


@pytest.mark.airflow
def test_dag_test_emits_plan_input_and_refit_model(tmp_path: Path) -> None:
    """A study on a templated CSV path, then its refit, under the OpenLineage listener with a file transport.

    Its own AIRFLOW_HOME and DAGs folder: dag.test() serialises a DAG only from the configured DAG bundle, and
    pointing the session's bundle at a temporary folder would retire the repository's DAGs for later tests.
    """
    pytest.importorskip("airflow.providers.openlineage")
    version = "2026-11-01"
    data, spec_path = _iris_csv_study(tmp_path, version)
    (tmp_path / "dags").mkdir()
    dag_file = tmp_path / "dags" / "lineage_dags.py"
    dag_file.write_text(DAG_FILE.format(spec=str(spec_path), root=str(tmp_path / "data")))
    events_file = tmp_path / "ol.jsonl"
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(tmp_path / "dags"),
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": str(events_file), "append": True}
        ),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "airflow-grid-tests",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "AIRFLOW_GRID_STORE": str(tmp_path / "store"),
    }
    _airflow(env, "db", "migrate")
    _airflow(env, "pools", "set", "grid_fits", "2", "airflow-grid candidate fits (lineage test)")
    done = subprocess.run(
        [sys.executable, "-c", RUN_SCRIPT, str(dag_file), version],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and result, done.stdout[-3000:] + done.stderr[-5000:]
    assert json.loads(result[0].removeprefix("RESULT ")) == {"study": "success", "refit": "success"}
    events = _events(events_file)

    plan = _task_event(events, "lineage_study.plan", "COMPLETE")
    assert plan["job"]["namespace"] == "airflow-grid-tests"
    (read,) = plan["inputs"]
    assert (read["namespace"], read["name"]) == ("file", str(data))  # data.path as rendered for this run
    assert read["facets"]["version"]["datasetVersion"] == version
    assert len(read["facets"]["airflowGrid"]["fingerprint"]) == 64
    assert read["facets"]["airflowGrid"]["format"] == "csv"  # inferred from the path, as the spec does
    assert plan["outputs"] == []
    assert _task_event(events, "lineage_study.plan", "START")["inputs"] == []

    refit = _task_event(events, "lineage_refit.refit", "COMPLETE")
    (model,) = refit["outputs"]
    assert (model["namespace"], model["name"]) == ("mlflow://local", "models/iris-lineage/1")
    assert model["facets"]["version"]["datasetVersion"] == "1"
    assert model["facets"]["airflowGrid"]["modelUri"] == "models:/iris-lineage/1"
    assert model["facets"]["airflowGrid"]["promoted"] is True
    assert [(d["namespace"], d["name"], d["facets"]["version"]["datasetVersion"]) for d in refit["inputs"]] == [
        ("file", str(data), version)
    ]
