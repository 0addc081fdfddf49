"""The refit path: the champion gate on a real MLflow registry (sqlite), on_kill, one refit at a time."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from airflow_grid import tracking
from airflow_grid.plan import make_plan
from airflow_grid.spec import parse_spec
from airflow_grid.store import Store

MODEL = "gate-study"


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow_client = tracking.client()
    mlflow_client.create_registered_model(MODEL)
    yield mlflow_client


def register(mlflow_client: Any, score: float, dataset_version: str | None) -> str:
    """A model version tagged as log_refit tags it (holdout score, dataset version)."""
    tags = {"holdout_score": repr(score), **({"dataset_version": dataset_version} if dataset_version else {})}
    return str(mlflow_client.create_model_version(MODEL, source="file:///airflow-grid-tests/model", tags=tags).version)


def gate(mlflow_client: Any, score: float, dataset_version: str | None) -> dict[str, Any]:
    version = register(mlflow_client, score, dataset_version)
    return tracking.champion_gate(mlflow_client, MODEL, version, score, dataset_version=dataset_version)


def test_gate_compares_like_with_like_and_says_when_it_cannot(registry: Any, caplog: pytest.LogCaptureFixture) -> None:
    first = gate(registry, 0.90, "2026-11-01")
    assert (first["promoted"], first["compared_across_versions"]) == (True, False)

    weaker_same_data = gate(registry, 0.85, "2026-11-01")
    assert (weaker_same_data["promoted"], weaker_same_data["champion_version"]) == (False, "1")
    assert weaker_same_data["compared_across_versions"] is False
    assert "gate_note" not in registry.get_model_version(MODEL, "2").tags

    new_data = gate(registry, 0.95, "2026-11-02")
    assert new_data["promoted"] is True and new_data["compared_across_versions"] is True
    assert (new_data["dataset_version"], new_data["champion_dataset_version"]) == ("2026-11-02", "2026-11-01")
    note = (
        "holdout scores from dataset versions 2026-11-01 (champion v1) and 2026-11-02 (challenger v3) "
        "are not directly comparable"
    )
    assert registry.get_model_version(MODEL, "3").tags["gate_note"] == note
    assert note in caplog.text
    assert str(registry.get_model_version_by_alias(MODEL, "champion").version) == "3"

    lower_on_new_data = gate(registry, 0.60, "2026-11-02")  # now compared with v3, on the same data
    assert (lower_on_new_data["promoted"], lower_on_new_data["compared_across_versions"]) == (False, False)
    assert str(registry.get_model_version_by_alias(MODEL, "challenger").version) == "4"


def test_gate_across_versions_still_decides_on_the_score(registry: Any) -> None:
    gate(registry, 0.90, "v1")
    worse = gate(registry, 0.80, "v2")
    assert (worse["promoted"], worse["compared_across_versions"], worse["champion_version"]) == (False, True, "1")
    assert (
        "dataset versions v1 (champion v1) and v2 (challenger v2)"
        in registry.get_model_version(MODEL, "2").tags["gate_note"]
    )
    unknown = gate(registry, 0.99, None)
    assert unknown["compared_across_versions"] is True
    assert "v1 (champion v1) and unknown (challenger v3)" in registry.get_model_version(MODEL, "3").tags["gate_note"]


def test_log_refit_tags_the_dataset_version(registry: Any) -> None:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    X, y = load_iris(return_X_y=True)
    experiment = tracking.experiment_id(registry, MODEL)
    parent = registry.create_run(experiment, tags={tracking.TAG_DATASET_VERSION: "2026-11-02"}).info.run_id
    model = LogisticRegression(max_iter=500).fit(X, y)
    registered = tracking.log_refit(
        parent_run_id=parent, dag_id="grid_refit", run_id="r1", model=model, input_example=X[:3],
        holdout_score=0.9, holdout_metric="score", tags={},
    )  # fmt: skip
    version = registry.get_model_version(MODEL, registered["version"])
    assert version.tags["dataset_version"] == "2026-11-02"
    assert registered["dataset_version"] == "2026-11-02" and registered["compared_across_versions"] is False


def test_refit_dag_runs_one_refit_at_a_time() -> None:
    from airflow_grid.dag_factory import grid_refit_dag

    assert grid_refit_dag("grid_refit_test").max_active_runs == 1


@pytest.mark.slow
def test_on_kill_terminates_a_running_refit_worker(tmp_path: Path) -> None:
    from airflow.sdk.exceptions import AirflowException

    from airflow_grid.operators.refit import RefitWinnerOperator

    document = {
        "name": "slow-refit",
        "data": {"_target_": "sklearn.datasets.load_digits", "return_X_y": True},
        "estimator": {"_target_": "sklearn.ensemble.RandomForestClassifier", "n_estimators": 20000},
        "param_grid": {"random_state": [0]},
        "resources": {"cpu": 1, "memory": "2Gi"},
    }
    plan = make_plan(parse_spec(document), Store(str(tmp_path / "store")))
    operator = RefitWinnerOperator(task_id="refit", parent_run_id="unused")
    raised: list[BaseException] = []

    def refit() -> None:
        try:
            operator._run_refit(plan.uri, plan.row(0, 0), tmp_path / "model.joblib", 1.0, 2**31)
        except BaseException as error:
            raised.append(error)

    thread = threading.Thread(target=refit)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (operator._hook and operator._hook.sub_process):
        time.sleep(0.05)
    assert operator._hook is not None and operator._hook.sub_process is not None
    worker = psutil.Process(operator._hook.sub_process.pid)
    time.sleep(4)  # imports done, fitting
    assert worker.is_running()
    killed_at = time.monotonic()
    operator.on_kill()
    thread.join(timeout=30)
    if thread.is_alive():  # on_kill did not stop it: clean up, then fail
        os.killpg(worker.pid, signal.SIGKILL)
        thread.join(timeout=30)
        pytest.fail("on_kill left the refit worker running")
    assert time.monotonic() - killed_at < 10
    assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE
    assert len(raised) == 1 and isinstance(raised[0], AirflowException)
    assert "refit worker exited with -15" in str(raised[0])
    assert not (tmp_path / "model.joblib").exists()
