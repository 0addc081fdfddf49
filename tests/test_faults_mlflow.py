"""Fault behaviour (issue 9): MLflow unreachable at select.

The select task writes cv_results/best to the store before it contacts MLflow. If the tracking server is down,
the try fails in seconds with a retryable ``AirflowException`` naming the server (without its credentials) and
where the results are; the retry after the server is back logs the study exactly once: one parent run per
(dag_id, run_id), each child run once, no duplicate metric points, however far the failed try got.

The operator runs on a real plan and real evaluate results (iris, 3 candidates); the outage is a closed port
and the recovery a real ``mlflow server`` on it. Failures in the middle of ``log_study`` are injected (an
``MlflowException`` wrapping a requests ``ConnectionError``, as MLflow raises it) against MLflow's sqlite store.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from mlflow.exceptions import MlflowException

from airflow_grid import tracking
from airflow_grid.operators import select
from airflow_grid.operators.select import SelectWinnerOperator
from airflow_grid.plan import make_plan
from airflow_grid.spec import parse_spec
from airflow_grid.store import Store
from airflow_grid.worker import evaluate_candidates

pytestmark = pytest.mark.airflow

BIN = Path(sys.executable).parent
STUDY = "faults-mlflow"
DAG_ID = "faults_dag"
RUN_ID = "manual__2026-01-01T00:00:00+00:00"
FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}


@dataclass(frozen=True)
class DagRun:
    dag_id: str
    run_id: str


@dataclass(frozen=True)
class Study:
    """A planned and evaluated study, and the select operator over it."""

    operator: SelectWinnerOperator
    store: Store
    study_dir: str
    root: Path

    def select(self) -> dict[str, Any]:
        return self.operator.execute({"dag_run": DagRun(DAG_ID, RUN_ID)})  # type: ignore[arg-type]


@pytest.fixture
def study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, iris_doc: Callable[..., dict[str, Any]], thread_env: None
) -> Study:
    monkeypatch.chdir(tmp_path)
    for name in (*select.HTTP_RETRY_DEFAULTS, "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(name, raising=False)
    store = Store(str(tmp_path / "store"))
    plan = make_plan(parse_spec(iris_doc(name=STUDY)), store)
    evaluated = [[evaluate_candidates(plan.uri, [0, 1]), evaluate_candidates(plan.uri, [2])]]
    summary = {
        "plan_uri": plan.uri,
        "study": STUDY,
        "n_candidates": 3,
        "n_fits": plan.document["n_fits"],
        "dataset_version": "v1",
        "dataset_version_source": "test",
        "overrides": {},
    }
    operator = SelectWinnerOperator(task_id="select", evaluated=evaluated, plan_summary=summary)
    study_dir = f"studies/{STUDY}/{DAG_ID}/{RUN_ID}".replace(":", "_").replace("+", "_")
    return Study(operator, store, study_dir, tmp_path)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def mlflow_server(port: int, root: Path) -> Iterator[None]:
    """A real ``mlflow server`` (sqlite backend, one worker) on ``port``, up until the block ends."""
    log = root / "mlflow-server.log"
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=root,
            start_new_session=True,  # its uvicorn and job-runner children go with it
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not come up on port {port}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        yield
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def connection_error() -> MlflowException:
    """What MLflow raises when the server is gone: an MlflowException whose context is a requests error."""
    error = MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/create failed")
    error.__context__ = requests.exceptions.ConnectionError("[Errno 111] Connection refused")
    return error


def logged(study: Study) -> tuple[Any, list[Any]]:
    """The one parent run of (DAG_ID, RUN_ID), asserting there is exactly one, and its child runs."""
    client = tracking.client()
    experiment = client.get_experiment_by_name(STUDY)
    parents = client.search_runs(
        [experiment.experiment_id],
        filter_string=(
            f"tags.`{tracking.TAG_DAG_ID}` = '{DAG_ID}' and tags.`{tracking.TAG_RUN_ID}` = '{RUN_ID}' "
            f"and tags.`{tracking.TAG_ROLE}` = 'parent'"
        ),
    )
    assert len(parents) == 1, f"{len(parents)} parent runs for one DAG run"
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'"
    )
    return parents[0], list(children)


def assert_logged_once(study: Study, returned: dict[str, Any]) -> None:
    """The study is in MLflow completely, once: parent metrics/params/artifacts, three finished children."""
    client = tracking.client()
    best = study.store.read_json(f"{study.study_dir}/best.json")
    parent, children = logged(study)
    assert returned["parent_run_id"] == parent.info.run_id
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_cv_score"] == pytest.approx(best["best_score"])
    assert parent.data.params["best_clf__C"] == tracking.param_text(best["best_params"]["clf__C"])
    assert len(client.get_metric_history(parent.info.run_id, "best_cv_score")) == 1, "metric logged twice"
    assert "cv_results.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    indices = sorted(int(c.data.tags[tracking.TAG_CANDIDATE]) for c in children)
    assert indices == [0, 1, 2], f"child runs by candidate: {indices}"
    for child in children:
        assert child.info.status == "FINISHED"
        assert set(child.data.params) == {"clf__C"}
        assert "mean_test_score" in child.data.metrics
        assert len(client.get_metric_history(child.info.run_id, "mean_test_score")) == 1


def test_unreachable_server_fails_retryably_then_the_retry_logs_once(
    study: Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    for name, value in FAST_FAIL.items():  # the user's own retry settings are respected
        monkeypatch.setenv(name, value)

    started = time.perf_counter()
    with pytest.raises(AirflowException) as failed:
        study.select()
    elapsed = time.perf_counter() - started
    assert not isinstance(failed.value, AirflowFailException), "an outage must leave the task retryable"
    message = str(failed.value)
    assert f"MLflow tracking server http://127.0.0.1:{port} is unreachable (ConnectionError" in message
    assert study.store.url(study.study_dir) in message and "MLFLOW_TRACKING_URI" in message
    assert elapsed < 15, f"the failing try took {elapsed:.1f}s"
    cv_results = study.store.read_json(f"{study.study_dir}/cv_results.json")
    assert len(cv_results["params"]) == 3, "the results must be in the store before MLflow is contacted"
    assert study.store.read_json(f"{study.study_dir}/best.json")["best_index"] in (0, 1, 2)

    with mlflow_server(port, study.root):
        assert_logged_once(study, study.select())  # the retry, after recovery
        assert_logged_once(study, study.select())  # and another one changes nothing


def test_credentials_are_not_shown_and_the_default_retry_is_bounded(
    study: Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cret@127.0.0.1:{port}")
    started = time.perf_counter()
    with pytest.raises(AirflowException) as failed:
        study.select()
    elapsed = time.perf_counter() - started
    assert f"MLflow tracking server http://127.0.0.1:{port} is unreachable" in str(failed.value)
    shown = "".join(traceback.format_exception(failed.value))
    assert "s3cret" not in shown and "alice" not in shown, shown
    assert elapsed < 60, f"with MLflow's own defaults one request retries for minutes; this try took {elapsed:.1f}s"
    assert not {*select.HTTP_RETRY_DEFAULTS} & set(os.environ), "the task's retry defaults leaked out of it"


def test_retry_defaults_apply_only_where_the_user_set_none(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, str | None] = {}

    def log_study(**_: Any) -> str:
        seen.update({name: os.environ.get(name) for name in select.HTTP_RETRY_DEFAULTS})
        return "run"

    monkeypatch.setattr(tracking, "log_study", log_study)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    assert select.log_study_or_retry({}, results_url="file:///store") == "run"
    assert seen == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"


def test_other_mlflow_errors_are_not_reported_as_an_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    def log_study(**_: Any) -> str:
        raise MlflowException("Invalid value for parameter 'x'", error_code="INVALID_PARAMETER_VALUE")

    monkeypatch.setattr(tracking, "log_study", log_study)
    with pytest.raises(MlflowException, match="Invalid value"):
        select.log_study_or_retry({}, results_url="file:///store")


@pytest.mark.parametrize("where", ["before the children", "in the middle of the children"])
def test_a_try_that_fails_half_way_is_completed_by_the_retry(
    study: Study, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The server goes away after the parent run exists: the retry reuses it and logs each child once."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{study.root / 'mlflow.db'}")
    if where == "before the children":
        original = tracking.runs._log_children  # log_study calls it in its own module
        calls = iter([connection_error()])

        def log_children(*args: Any) -> None:
            error = next(calls, None)
            if error is not None:
                raise error
            original(*args)

        monkeypatch.setattr(tracking.runs, "_log_children", log_children)
    else:  # log_batch: 1 parent, 2 the first child, 3 the second child - created, never given its metrics
        from mlflow import MlflowClient

        original_batch = MlflowClient.log_batch
        count = {"calls": 0}

        def log_batch(self: Any, *args: Any, **kwargs: Any) -> Any:
            count["calls"] += 1
            if count["calls"] == 3:
                raise connection_error()
            return original_batch(self, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, "log_batch", log_batch)

    with pytest.raises(AirflowException, match=r"MLflow tracking store sqlite:///\S+ is unreachable"):
        study.select()
    parent, children = logged(study)
    assert parent.info.status != "FINISHED"
    assert len(children) == (0 if where == "before the children" else 2)

    assert_logged_once(study, study.select())
    assert_logged_once(study, study.select())
