"""The kubernetes backend on a real cluster: the nightly DAG's candidates run as pods, scores equal the local run's.

Needs the single-node lab cluster (``cluster up``; see the platform's k8s README) and root, to import the worker
image; tests/k8s_lab.py reaches the cluster, builds the image and watches pods. The result store is a hostPath.

Without a reachable cluster every test here is skipped, with the reason; ``AIRFLOW_GRID_REQUIRE_K8S=1`` (CI) turns
that into a failure. ``dag.test()`` runs one task at a time, so the ``grid_fits`` pool is not exercised here: see
test_scheduler_kubernetes.py for pods under a real scheduler and pool.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from k8s_lab import REPO, Cluster, kubernetes_settings, watch_pods

from airflow_grid.operators.kubernetes import WORKER_UID, describe_failure

pytestmark = [pytest.mark.k8s, pytest.mark.airflow]

DAGS_DIR = REPO / "dags"


@dataclass(frozen=True)
class Env:
    store: Path


@pytest.fixture
def k8s_env(
    cluster: Cluster, worker_image: str, airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Env:
    """AIRFLOW_GRID_K8S_* for the nightly DAG (read when its file is loaded), a hostPath store, a fresh MLflow."""
    store = tmp_path / "k8s-store"
    store.mkdir()
    env = {
        **kubernetes_settings(cluster, worker_image, store),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    for name in ("AIRFLOW_GRID_K8S_MEMORY_RETRY_FACTOR", "AIRFLOW_GRID_K8S_MEMORY_CAP", "AIRFLOW_GRID_K8S_DEFERRABLE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # MLflow's sqlite store puts artifacts under ./mlruns
    return Env(store)


# --- running the DAG -------------------------------------------------------------------------------------------------


def load_nightly() -> Any:
    """dags/grid_search_nightly.py imported fresh: it reads AIRFLOW_GRID_K8S_* when the file is loaded."""
    spec = importlib.util.spec_from_file_location(f"nightly_{uuid.uuid4().hex}", DAGS_DIR / "grid_search_nightly.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dag


def task_instances(dag_id: str, run_id: str) -> dict[tuple[str, int], Any]:
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(
            select(TaskInstance).where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)
        ).all()
        return {(t.task_id, t.map_index): (t.state, t.try_number) for t in rows}


def study_cv_results(store: Path, study: str, dag_id: str) -> dict[str, list[Any]]:
    """The cv_results.json the select task wrote to ``studies/<study>/<dag_id>/<run_id>/``."""
    found = sorted((store / "studies" / study / dag_id).glob("*/cv_results.json"))
    assert len(found) == 1, found
    results: dict[str, list[Any]] = json.loads(found[0].read_text())
    return results


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def score_columns(cv_results: dict[str, list[Any]]) -> list[str]:
    """Every non-timing column: params, param_<p>, split<k>_test_<m>, mean/std/rank_test_<m>."""
    keys = [k for k in cv_results if not k.endswith(("_fit_time", "_score_time"))]
    assert (
        "params" in keys and any(k.startswith("rank_test_") for k in keys) and any(k.startswith("split") for k in keys)
    )
    return keys


def assert_same_cv_results(got: dict[str, list[Any]], expected: dict[str, list[Any]]) -> None:
    assert score_columns(got) == score_columns(expected)
    for key in score_columns(expected):
        assert len(got[key]) == len(expected[key]), key
        for row, (a, b) in enumerate(zip(got[key], expected[key], strict=True)):
            same = (_missing(a) and _missing(b)) if (_missing(a) or _missing(b)) else a == b
            assert same, f"{key}[{row}]: kubernetes {a!r} != local {b!r}"


def iris_spec(name: str, **fields: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
        "estimator": {"_target_": "sklearn.tree.DecisionTreeClassifier", "random_state": 0},
        "param_grid": {"max_depth": [1, 2, 3], "criterion": ["gini", "entropy"]},
        "cv": 3,
        "scoring": "accuracy",
        "resources": {"cpu": "500m", "memory": "512Mi"},
    }
    spec.update(fields)
    return spec


# --- a. kubernetes equals local ------------------------------------------------------------------------------------


def test_kubernetes_run_equals_local_run_cell_for_cell(
    k8s_env: Env, cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = iris_spec(f"iris-k8s-{uuid.uuid4().hex[:8]}")
    n_candidates = 6

    started = time.perf_counter()
    dag = load_nightly()
    with watch_pods(cluster) as watcher:
        k8s_run = dag.test(run_conf={"spec": {**spec, "backend": "kubernetes"}})
    k8s_seconds = time.perf_counter() - started
    assert str(k8s_run.state) == "success", task_instances(dag.dag_id, k8s_run.run_id)
    tis = task_instances(dag.dag_id, k8s_run.run_id)
    assert sorted(
        i for (task, i), (state, _) in tis.items() if task == "evaluate_kubernetes" and state == "success"
    ) == [*range(n_candidates)]
    assert {state for (task, _), (state, _) in tis.items() if task == "evaluate"} == {"skipped"}
    k8s_cv = study_cv_results(k8s_env.store, spec["name"], dag.dag_id)

    # What the pods were: one per candidate, limits = requests = the spec's, Guaranteed, non-root, succeeded, gone.
    assert not watcher.errors, watcher.errors
    pods = list(watcher.pods.values())
    assert sorted(p.labels["airflow-grid/candidate"] for p in pods) == [str(i) for i in range(n_candidates)], pods
    expected = {"cpu": "500m", "memory": "512Mi"}
    for pod in pods:
        assert pod.base_resources == {"requests": expected, "limits": expected}, pod.name
        assert pod.qos_class == "Guaranteed", (pod.name, pod.qos_class)
        assert pod.run_as_user == WORKER_UID and pod.run_as_non_root is True, pod.name
        assert pod.labels["dag_id"] == dag.dag_id and pod.labels["run_id"] and pod.labels["map_index"]
        terminated = pod.base_terminated
        assert terminated is not None and terminated.exit_code == 0, (pod.name, pod.phases, terminated)
    assert watcher.remaining() == [], "evaluate pods were not deleted"
    # The results in the store were written by the pods, as the worker's uid (not by this root process).
    results = sorted((k8s_env.store / "results").rglob("*.json"))
    assert len(results) == n_candidates
    assert {r.stat().st_uid for r in results} == {WORKER_UID}
    print(
        f"\nkubernetes run: {len(pods)} pods in {k8s_seconds:.1f}s; max {watcher.max_running} pod(s) Running at once "
        "(dag.test runs one task at a time: the pool is not exercised here)"
    )

    # The same spec on the local backend, with its own store (nothing served from the pods' results) and MLflow.
    local_root = tmp_path / "local"
    local_root.mkdir()
    monkeypatch.setenv("AIRFLOW_GRID_STORE", str(local_root / "store"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{local_root / 'mlflow.db'}")
    monkeypatch.chdir(local_root)
    started = time.perf_counter()
    dag = load_nightly()
    local_run = dag.test(run_conf={"spec": {**spec, "backend": "local"}})
    print(f"local run: {time.perf_counter() - started:.1f}s")
    assert str(local_run.state) == "success", task_instances(dag.dag_id, local_run.run_id)
    local_cv = study_cv_results(local_root / "store", spec["name"], dag.dag_id)

    assert len(local_cv["params"]) == n_candidates
    assert_same_cv_results(k8s_cv, local_cv)


# --- b. OOMKilled, then a retry with more memory ---------------------------------------------------------------------


def _evaluate_task(dag: Any, retries: int) -> Any:
    task = dag.task_dict["evaluate_kubernetes"]
    task.retries = retries
    task.retry_delay = timedelta(seconds=1)  # the DAG's 15 s, shortened; dag.test() waits for it, then retries
    return task


def test_oom_killed_is_reported_with_the_limit_and_a_retry_gets_more_memory(
    k8s_env: Env, cluster: Cluster, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # Importing scikit-learn takes ~150-200 MB: 100Mi gets the worker OOMKilled; 4 x 100Mi = 400Mi is enough.
    spec = iris_spec(
        f"iris-oom-{uuid.uuid4().hex[:8]}",
        param_grid={"max_depth": [2]},
        resources={"cpu": "500m", "memory": "100Mi"},
        backend="kubernetes",
    )

    # 1. No retries, no memory factor: the task fails and says why, with the limit.
    dag = load_nightly()
    _evaluate_task(dag, retries=0)
    with watch_pods(cluster) as watcher:
        failed_run = dag.test(run_conf={"spec": spec})
    output = "".join(capfd.readouterr())
    assert str(failed_run.state) == "failed"
    tis = task_instances(dag.dag_id, failed_run.run_id)
    assert tis[("evaluate_kubernetes", 0)] == ("failed", 1)
    (pod,) = watcher.pods.values()
    assert pod.base_resources["limits"] == pod.base_resources["requests"] == {"cpu": "500m", "memory": "100Mi"}
    assert pod.base_terminated is not None and pod.base_terminated.reason == "OOMKilled", pod.phases
    reason = describe_failure(pod.last)
    assert reason["reason"] == "OOMKilled" and reason["memory_limit"] == "100Mi" and reason["exit_code"] == 137
    assert "OOMKilled: the worker exceeded its memory limit of 100Mi (max_depth=2)" in output
    assert watcher.remaining() == []

    # 2. memory_retry_factor 4 and one retry: try 1 is OOMKilled at 100Mi, try 2 runs with 400Mi and succeeds.
    monkeypatch.setenv("AIRFLOW_GRID_K8S_MEMORY_RETRY_FACTOR", "4")
    dag = load_nightly()
    _evaluate_task(dag, retries=1)
    with watch_pods(cluster) as watcher:
        retried_run = dag.test(run_conf={"spec": spec})
    output = "".join(capfd.readouterr())
    tis = task_instances(dag.dag_id, retried_run.run_id)
    assert str(retried_run.state) == "success", tis
    assert tis[("evaluate_kubernetes", 0)] == ("success", 2)
    by_try = {p.labels["try_number"]: p for p in watcher.pods.values()}
    assert sorted(by_try) == ["1", "2"], by_try
    assert by_try["1"].base_terminated.reason == "OOMKilled"
    raised = {"cpu": "500m", "memory": str(400 * 2**20)}
    assert by_try["2"].base_resources == {"requests": raised, "limits": raised}
    env = {v.name: v.value for c in by_try["2"].last.spec.containers if c.name == "base" for v in c.env}
    assert env["AIRFLOW_GRID_MEMORY_BYTES"] == str(400 * 2**20)
    assert by_try["2"].qos_class == "Guaranteed"
    assert by_try["2"].base_terminated is not None and by_try["2"].base_terminated.exit_code == 0
    assert "Try 2: memory raised from 100Mi to 419430400 bytes" in output
    assert watcher.remaining() == []
    cv_results = study_cv_results(k8s_env.store, spec["name"], dag.dag_id)
    assert cv_results["rank_test_score"] == [1]
