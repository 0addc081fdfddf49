"""Pods under a real scheduler: the ``grid_fits`` pool caps how many candidate pods run at once.

``dag.test()`` runs one task at a time (test_kubernetes_integration.py), so it cannot show the pool. Here
``airflow standalone`` (LocalExecutor, parallelism 4) runs a DAG whose spec says ``backend: kubernetes`` on the lab
cluster: six candidates, each a pod asking 250m CPU (one pool slot each), in a 2-slot pool. The node could run all
six at once (the test prints its allocatable CPU against the pods' requests), so the pool, not the cluster or the
executor, is what holds them back. A watcher polls the API every 0.5 s for this DAG's pods.

A second DAG uses KPO's ``deferrable`` mode: its tasks are seen ``deferred`` while the triggerer watches their pods.
A deferred task gives its pool slot back unless the pool counts deferred tasks, so six candidates run six pods at
once in a pool created without ``--include-deferred``, and at most two with it: why every pool this project
creates uses the flag.

Needs the lab cluster and root (tests/k8s_lab.py); skipped without them unless ``AIRFLOW_GRID_REQUIRE_K8S=1``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from k8s_lab import Cluster, kubernetes_settings, watch_pods
from standalone import TERMINAL, Airflow, cli, max_overlap, parse_time, run_standalone

pytestmark = [pytest.mark.scheduler, pytest.mark.k8s]

POOL = "grid_fits"
POOL_SLOTS = 2
PARALLELISM = 4
CPU = "250m"  # ceil(0.25) = 1 pool slot per candidate
MEMORY = "512Mi"
DAG_ID = "sched_pods"

DAG_FILE = '''\
"""Candidates as pods on the lab cluster (written by tests/test_scheduler_kubernetes.py)."""

import os
from pathlib import Path

from airflow_grid.dag_factory import grid_search_dag
from airflow_grid.operators.kubernetes import KubernetesBackend

SPEC = Path(__file__).parent / "specs" / "iris_pods.yaml"
sched_pods = grid_search_dag(
    "{dag_id}", SPEC, pool="{pool}", refit_dag_id=None, retries=0, kubernetes=KubernetesBackend.from_env()
)
# The same with KPO's deferrable mode: the triggerer watches the pod while the task gives up its worker slot.
sched_pods_deferred = grid_search_dag(
    "{dag_id}_deferred",
    SPEC,
    pool="{pool}",
    refit_dag_id=None,
    retries=0,
    kubernetes=KubernetesBackend.from_env({{**os.environ, "AIRFLOW_GRID_K8S_DEFERRABLE": "true"}}),
)
'''

SPEC: dict[str, Any] = {
    "name": "sched-pods",
    "backend": "kubernetes",
    "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
    "estimator": {"_target_": "sklearn.tree.DecisionTreeClassifier", "random_state": 0},
    "param_grid": {"max_depth": [1, 2, 3], "criterion": ["gini", "entropy"]},
    "cv": 3,
    "scoring": "accuracy",
    "resources": {"cpu": CPU, "memory": MEMORY},
}


def millicores(quantity: str) -> int:
    return int(quantity[:-1]) if quantity.endswith("m") else int(float(quantity) * 1000)


@pytest.fixture(scope="module")
def airflow(cluster: Cluster, worker_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Airflow]:
    root = tmp_path_factory.mktemp("standalone-pods")
    specs = root / "dags" / "specs"
    specs.mkdir(parents=True)
    (specs / "iris_pods.yaml").write_text(yaml.safe_dump(SPEC, sort_keys=False))
    (root / "dags" / "sched_pods.py").write_text(DAG_FILE.format(dag_id=DAG_ID, pool=POOL))
    store = root / "store"
    store.mkdir()
    settings = kubernetes_settings(cluster, worker_image, store)
    with run_standalone(root, pool=POOL, pool_slots=POOL_SLOTS, parallelism=PARALLELISM, extra_env=settings) as server:
        yield server


def test_pool_caps_concurrently_running_pods(airflow: Airflow, cluster: Cluster) -> None:
    (node,) = cluster.api.list_node().items
    allocatable = millicores(node.status.allocatable["cpu"])
    with watch_pods(cluster) as watcher:
        response = airflow.trigger(DAG_ID, "six_pods", {})
        assert response.status_code == 200, response.text
        run = airflow.wait_for_run(DAG_ID, "six_pods", timeout=600)
        left = watcher.remaining()
    assert run["state"] == "success"
    assert not watcher.errors, watcher.errors

    # one pod per candidate, with the spec's limits = requests, all succeeded and deleted
    pods = sorted(watcher.pods.values(), key=lambda p: int(p.labels["airflow-grid/candidate"]))
    assert [p.labels["airflow-grid/candidate"] for p in pods] == [str(i) for i in range(6)]
    expected = {"cpu": CPU, "memory": MEMORY}
    for pod in pods:
        assert pod.base_resources == {"requests": expected, "limits": expected}, pod.name
        assert pod.qos_class == "Guaranteed", pod.name
        assert pod.base_terminated is not None and pod.base_terminated.exit_code == 0, (pod.name, pod.phases)
    assert left == [], f"pods not deleted: {left}"

    # what the node could have run at once: every container's CPU request of one pod, against allocatable
    per_pod = sum(millicores(c.resources.requests["cpu"]) for c in pods[0].last.spec.containers)
    fits_at_once = allocatable // per_pod
    tis = airflow.task_instances(DAG_ID, "six_pods", task_id="evaluate_kubernetes")
    assert len(tis) == 6 and {ti["pool"] for ti in tis} == {POOL} and {ti["pool_slots"] for ti in tis} == {1}
    task_overlap = max_overlap([(parse_time(ti["start_date"]), parse_time(ti["end_date"])) for ti in tis])
    origin = min(p.running_from for p in pods if p.running_from is not None)
    print(
        f"\n{DAG_ID}/six_pods: {run['state']}; 6 candidate pods of {per_pod}m CPU each (base {CPU} + xcom sidecar); "
        f"node allocatable {allocatable}m CPU = room for {fits_at_once} at once; pool {POOL} = {POOL_SLOTS} slots, "
        f"1 slot per pod; parallelism {PARALLELISM}"
    )
    for pod in pods:
        start = (pod.running_from or origin) - origin
        end = (pod.running_to or origin) - origin
        print(f"    pod {pod.name[:40]:40} candidate {pod.labels['airflow-grid/candidate']}: Running "
              f"{start:6.1f}s -> {end:6.1f}s, phases {pod.phases}")  # fmt: skip
    waits = airflow.log.read_text(errors="replace").count(f"open slots in pool {POOL}")
    print(
        f"    max simultaneously Running pods (polled every 0.5 s): {watcher.max_running}; max concurrent "
        f"evaluate_kubernetes tasks: {task_overlap}; pool slots: {POOL_SLOTS}; scheduler 'no open slots in pool' "
        f"lines: {waits}"
    )
    assert fits_at_once > POOL_SLOTS, "the node itself would cap the pods: the test would not show the pool"
    assert all(p.running_from is not None for p in pods), "a pod was never seen Running"
    assert 1 <= watcher.max_running <= POOL_SLOTS
    assert task_overlap <= POOL_SLOTS
    assert waits > 0, "the scheduler never held a task back for the pool"


def run_deferred(airflow: Airflow, cluster: Cluster, run_id: str, max_depth: list[int]) -> dict[str, Any]:
    """Trigger the deferrable DAG on six candidates; what the run, its tasks and its pods did."""
    dag_id = f"{DAG_ID}_deferred"
    conf = {"param_grid": {"max_depth": max_depth, "criterion": ["gini", "entropy"]}}
    seen: dict[int, set[str]] = {}  # map index -> task states polled
    with watch_pods(cluster) as watcher:
        response = airflow.trigger(dag_id, run_id, conf)
        assert response.status_code == 200, response.text
        deadline = time.monotonic() + 600
        while (run := airflow.dag_run(dag_id, run_id))["state"] not in TERMINAL:
            for ti in airflow.task_instances(dag_id, run_id, task_id="evaluate_kubernetes"):
                if ti["map_index"] >= 0:  # -1: not expanded yet
                    seen.setdefault(ti["map_index"], set()).add(str(ti["state"]))
            assert time.monotonic() < deadline, f"{dag_id}/{run_id} still {run['state']}"
            time.sleep(0.5)
        left = watcher.remaining()
    if run["state"] != "success":
        airflow.explain(dag_id, run_id)
    assert not watcher.errors, watcher.errors
    results = [
        airflow.xcom(dag_id, run_id, "evaluate_kubernetes", ti["map_index"])["results"][0]
        for ti in airflow.task_instances(dag_id, run_id, task_id="evaluate_kubernetes")
    ]
    states = {index: sorted(states) for index, states in sorted(seen.items())}
    print(f"    {dag_id}/{run_id}: {run['state']}; max {watcher.max_running} pods Running at once; {len(watcher.pods)} "
          f"pods, left {left}; task states polled {states}; fitted in pods: "
          f"{sum(not r['from_store'] for r in results)} of {len(results)}")  # fmt: skip
    return {"run": run, "max_running": watcher.max_running, "pods": len(watcher.pods), "left": left,
            "states": states, "results": results}  # fmt: skip


def test_deferrable_pods_are_capped_only_by_a_pool_that_counts_deferred_tasks(
    airflow: Airflow, cluster: Cluster
) -> None:
    """A deferred task gives up its pool slot unless the pool counts deferred tasks, while its pod keeps running."""
    print(f"\n{DAG_ID}_deferred: six candidates per run, pool {POOL} = {POOL_SLOTS} slots, parallelism {PARALLELISM}")
    print(f"  pool created by `airflow pools set` without --include-deferred: {airflow.get(f'/api/v2/pools/{POOL}')}")
    loose = run_deferred(airflow, cluster, "pool_without_deferred", [4, 5, 6])
    cli(airflow.env, "pools", "set", POOL, str(POOL_SLOTS), "airflow-grid candidate fits", "--include-deferred")
    pool = airflow.get(f"/api/v2/pools/{POOL}")
    assert pool["include_deferred"] is True and pool["slots"] == POOL_SLOTS
    print(f"  airflow pools set {POOL} {POOL_SLOTS} ... --include-deferred: {pool['include_deferred']=}")
    capped = run_deferred(airflow, cluster, "pool_with_deferred", [7, 8, 9])

    for outcome in (loose, capped):
        assert outcome["run"]["state"] == "success"
        assert sorted(outcome["states"]) == [*range(6)], outcome["states"]
        assert all("deferred" in states for states in outcome["states"].values()), outcome["states"]
        assert outcome["pods"] == 6 and outcome["left"] == []
        assert not any(result["from_store"] for result in outcome["results"])
    assert capped["max_running"] <= POOL_SLOTS
    # Why the deployment creates the pool with --include-deferred: without it the pool did not cap the pods.
    assert loose["max_running"] > POOL_SLOTS, loose["max_running"]
