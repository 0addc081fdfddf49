"""The kubernetes backend on a real cluster: the nightly DAG's candidates run as pods, scores equal the local run's.

Needs the single-node lab cluster (``cluster up``; see the platform's k8s README) and root, to import the worker
image. Pods run this checkout's virtualenv through read-only hostPath mounts at identical paths (the base
interpreter ``sys.base_prefix``, the venv and the repository), in an image that is the cluster's base image with
``/root`` made traversable for the pod's uid 10001. The result store is a hostPath too.

Without a reachable cluster every test here is skipped, with the reason; ``AIRFLOW_GRID_REQUIRE_K8S=1`` (CI) turns
that into a failure. ``dag.test()`` runs one task at a time, so the ``grid_fits`` pool is not exercised here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from airflow_grid.operators.kubernetes import WORKER_UID, describe_failure
from airflow_grid.operators.plan import DEFAULT_POOL

pytestmark = [pytest.mark.k8s, pytest.mark.airflow]

REPO = Path(__file__).resolve().parents[1]
DAGS_DIR = REPO / "dags"
BIN = Path(sys.executable).parent
NAMESPACE = "default"
SELECTOR = "app.kubernetes.io/name=airflow-grid"
WORKER_IMAGE = os.environ.get("AIRFLOW_GRID_K8S_TEST_IMAGE", "localhost/airflow-grid-worker-test:1")
REQUIRE_ENV = "AIRFLOW_GRID_REQUIRE_K8S"
STATE_DIR = Path(os.environ.get("K8S_LAB_STATE", "/tmp/k8s-lab"))
CACHE_DIR = Path(os.environ.get("K8S_LAB_CACHE", "/var/cache/k8s-lab"))
SIDECAR_IMAGE = os.environ.get("K8S_LAB_BASE_IMAGE", "localhost/k8s-lab-base:1")


def unavailable(reason: str) -> None:
    """Skip (a developer machine without the cluster), or fail when CI said the cluster must be there."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: a reachable cluster is required)")
    pytest.skip(f"{reason} (start one with `cluster up`; set {REQUIRE_ENV}=1 to fail instead of skipping)")


# --- cluster, image, metadata DB -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    kubeconfig: str
    api: Any  # kubernetes.client.CoreV1Api


def _kubeconfig() -> Path | None:
    candidates = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    candidates.append(str(STATE_DIR / "kubeconfig"))
    return next((Path(p) for p in candidates if Path(p).is_file()), None)


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    from kubernetes import client, config

    kubeconfig = _kubeconfig()
    if kubeconfig is None:
        unavailable(f"no kubeconfig: KUBECONFIG is unset or missing and {STATE_DIR / 'kubeconfig'} does not exist")
    assert kubeconfig is not None
    try:
        api = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
        nodes = api.list_node(_request_timeout=10).items
    except Exception as error:  # connection refused, TLS, a stale kubeconfig of a cluster that is down
        unavailable(f"Kubernetes API of {kubeconfig} unreachable: {type(error).__name__}: {error}")
    ready = [
        n.metadata.name
        for n in nodes
        if any(c.type == "Ready" and c.status == "True" for c in (n.status.conditions or []))
    ]
    if not ready:
        unavailable(f"the cluster of {kubeconfig} has no Ready node")
    return Cluster(str(kubeconfig), api)


def _cluster_script() -> str | None:
    for candidate in (os.environ.get("K8S_LAB_SCRIPT"), shutil.which("cluster"), REPO.parent / "shared/k8s/cluster"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _node_images(cluster: Cluster) -> set[str]:
    return {
        name
        for node in cluster.api.list_node().items
        for image in node.status.images or []
        for name in image.names or []
    }


@pytest.fixture(scope="session")
def worker_image(cluster: Cluster) -> str:
    """The base image with /root 0755: the pod (uid 10001) must traverse /root to the hostPath'd pyenv."""
    if sys.base_prefix == "/usr" or sys.base_prefix.startswith("/usr/"):
        unavailable(f"sys.base_prefix is {sys.base_prefix}: a system Python cannot be hostPath-mounted into pods")
    if WORKER_IMAGE in _node_images(cluster):
        return WORKER_IMAGE
    script = _cluster_script()
    pointer = CACHE_DIR / "images" / "base.current"
    if script is None or not pointer.is_file():
        unavailable(f"cannot build {WORKER_IMAGE}: no `cluster` script (K8S_LAB_SCRIPT) or no {pointer}")
    if os.geteuid() != 0:
        unavailable(f"cannot build {WORKER_IMAGE}: `cluster image` needs root")
    assert script is not None
    work = Path(tempfile.mkdtemp(prefix="airflow-grid-image-"))
    try:
        base_tar = pointer.read_text().strip()
        with open(work / "layer.tar", "wb") as layer:
            subprocess.run(["tar", "-xf", base_tar, "--wildcards", "*/layer.tar", "-O"], stdout=layer, check=True)
        rootfs = work / "rootfs"
        rootfs.mkdir()
        subprocess.run(["tar", "--numeric-owner", "-xf", str(work / "layer.tar"), "-C", str(rootfs)], check=True)
        (rootfs / "root").chmod(0o755)
        built = subprocess.run([script, "image", WORKER_IMAGE, str(rootfs)], capture_output=True, text=True)
        assert built.returncode == 0, f"cluster image failed:\n{built.stdout[-2000:]}\n{built.stderr[-2000:]}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return WORKER_IMAGE


def _airflow_cli(*args: str) -> None:
    completed = subprocess.run(
        [str(BIN / "airflow"), *args], capture_output=True, text=True, env=dict(os.environ), timeout=600
    )
    assert completed.returncode == 0, (
        f"airflow {' '.join(args)}:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    )


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """The session's metadata DB (conftest points AIRFLOW_HOME at a temp dir) with the grid pool."""
    _airflow_cli("db", "migrate")
    _airflow_cli("pools", "set", DEFAULT_POOL, "2", "airflow-grid candidate fits (kubernetes tests)")


def _host_mounts() -> list[str]:
    """What the pod needs at identical paths: the base interpreter, the venv, the checkout (editable install)."""
    paths = sorted({str(Path(p).resolve()) for p in (sys.base_prefix, sys.prefix, REPO)})
    return [p for p in paths if not any(p != q and Path(p).is_relative_to(q) for q in paths)]


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
    store.chmod(0o777)  # the pods (uid 10001) write their results here
    extra = {"xcom_sidecar_container_image": SIDECAR_IMAGE}
    env = {
        "AIRFLOW_CONN_KUBERNETES_DEFAULT": json.dumps({"conn_type": "kubernetes", "extra": extra}),
        "AIRFLOW_GRID_K8S_IMAGE": worker_image,
        "AIRFLOW_GRID_K8S_IMAGE_PULL_POLICY": "Never",
        "AIRFLOW_GRID_K8S_NAMESPACE": NAMESPACE,
        "AIRFLOW_GRID_K8S_CONFIG_FILE": cluster.kubeconfig,
        "AIRFLOW_GRID_K8S_STORE_PATH": str(store),
        "AIRFLOW_GRID_K8S_STORE_HOST_PATH": str(store),
        "AIRFLOW_GRID_K8S_HOST_MOUNTS": ",".join(_host_mounts()),
        "AIRFLOW_GRID_K8S_WORKER_COMMAND": f"{sys.executable} -m airflow_grid.worker",
        "AIRFLOW_GRID_STORE": str(store),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    for name in ("AIRFLOW_GRID_K8S_MEMORY_RETRY_FACTOR", "AIRFLOW_GRID_K8S_MEMORY_CAP", "AIRFLOW_GRID_K8S_DEFERRABLE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # MLflow's sqlite store puts artifacts under ./mlruns
    return Env(store)


# --- watching pods -------------------------------------------------------------------------------------------------


@dataclass
class SeenPod:
    name: str
    labels: dict[str, str]
    base_resources: dict[str, Any]
    run_as_user: int | None
    run_as_non_root: bool | None
    qos_class: str | None = None
    phases: list[str] = field(default_factory=list)
    last: Any = None  # the last V1Pod seen

    @property
    def base_terminated(self) -> Any:
        for status in (self.last.status.container_statuses or []) if self.last and self.last.status else []:
            if status.name == "base" and status.state and status.state.terminated:
                return status.state.terminated
        return None


class PodWatcher(threading.Thread):
    """Polls the API every ``interval`` s for this run's pods: resources, security context, phases, concurrency."""

    def __init__(self, api: Any, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.api = api
        self.interval = interval
        self.preexisting = {p.metadata.uid for p in self._list()}
        self.pods: dict[str, SeenPod] = {}
        self.max_running = 0
        self.errors: list[str] = []
        self._stopped = threading.Event()

    def _list(self) -> list[Any]:
        items: list[Any] = self.api.list_namespaced_pod(NAMESPACE, label_selector=SELECTOR, _request_timeout=10).items
        return items

    def poll(self) -> None:
        running = 0
        for pod in self._list():
            uid = pod.metadata.uid
            if uid in self.preexisting:
                continue
            seen = self.pods.get(uid)
            if seen is None:
                base = next(c for c in pod.spec.containers if c.name == "base")
                context = pod.spec.security_context
                seen = self.pods[uid] = SeenPod(
                    name=pod.metadata.name,
                    labels=dict(pod.metadata.labels or {}),
                    base_resources={
                        "requests": dict(base.resources.requests or {}),
                        "limits": dict(base.resources.limits or {}),
                    },
                    run_as_user=context.run_as_user if context else None,
                    run_as_non_root=context.run_as_non_root if context else None,
                )
            phase = pod.status.phase if pod.status else None
            if phase and (not seen.phases or seen.phases[-1] != phase):
                seen.phases.append(phase)
            seen.qos_class = (pod.status.qos_class if pod.status else None) or seen.qos_class
            seen.last = pod
            running += phase == "Running"
        self.max_running = max(self.max_running, running)

    def run(self) -> None:
        while not self._stopped.is_set():
            try:
                self.poll()
            except Exception as error:  # keep watching; reported by the test
                self.errors.append(f"{type(error).__name__}: {error}")
            self._stopped.wait(self.interval)

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=30)

    def remaining(self, timeout: float = 60) -> list[str]:
        """Names of this run's pods still in the API after ``timeout`` s (KPO deletes them when done)."""
        deadline = time.monotonic() + timeout
        while True:
            left = [p.metadata.name for p in self._list() if p.metadata.uid in self.pods]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.5)


@contextmanager
def watch_pods(cluster: Cluster) -> Iterator[PodWatcher]:
    watcher = PodWatcher(cluster.api)
    watcher.start()
    try:
        yield watcher
    finally:
        watcher.stop()


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
