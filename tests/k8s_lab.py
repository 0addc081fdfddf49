"""The lab Kubernetes cluster for the test layers that run pods: reaching it, the worker image, watching pods.

A pytest plugin (tests/conftest.py loads it) with the session fixtures ``cluster`` and ``worker_image``. Pods run
this checkout's virtualenv through read-only hostPath mounts at identical paths (the base interpreter
``sys.base_prefix``, the venv and the repository), in an image that is the cluster's base image with ``/root`` made
traversable for the pod's uid 10001; ``kubernetes_settings`` gives the AIRFLOW_GRID_K8S_* a DAG file reads for that.

Without a reachable cluster the tests using these fixtures are skipped, with the reason; ``AIRFLOW_GRID_REQUIRE_K8S=1``
(CI) turns that into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
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


# --- cluster and image ----------------------------------------------------------------------------------------------


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


def _host_mounts() -> list[str]:
    """What the pod needs at identical paths: the base interpreter, the venv, the checkout (editable install)."""
    paths = sorted({str(Path(p).resolve()) for p in (sys.base_prefix, sys.prefix, REPO)})
    return [p for p in paths if not any(p != q and Path(p).is_relative_to(q) for q in paths)]


def kubernetes_settings(cluster: Cluster, image: str, store: Path) -> dict[str, str]:
    """The environment a DAG file reads at parse for the kubernetes backend on the lab cluster, with a hostPath store.

    The store directory is made world-writable: the pods (uid 10001) write their results there.
    """
    store.chmod(0o777)
    extra = {"xcom_sidecar_container_image": SIDECAR_IMAGE}
    return {
        "AIRFLOW_CONN_KUBERNETES_DEFAULT": json.dumps({"conn_type": "kubernetes", "extra": extra}),
        "AIRFLOW_GRID_K8S_IMAGE": image,
        "AIRFLOW_GRID_K8S_IMAGE_PULL_POLICY": "Never",
        "AIRFLOW_GRID_K8S_NAMESPACE": NAMESPACE,
        "AIRFLOW_GRID_K8S_CONFIG_FILE": cluster.kubeconfig,
        "AIRFLOW_GRID_K8S_STORE_PATH": str(store),
        "AIRFLOW_GRID_K8S_STORE_HOST_PATH": str(store),
        "AIRFLOW_GRID_K8S_HOST_MOUNTS": ",".join(_host_mounts()),
        "AIRFLOW_GRID_K8S_WORKER_COMMAND": f"{sys.executable} -m airflow_grid.worker",
        "AIRFLOW_GRID_STORE": str(store),
    }


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
    running_from: float | None = None  # time.monotonic() of the first poll that saw it Running
    running_to: float | None = None  # ... and of the first poll that no longer did (or no longer saw the pod)

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
        now = time.monotonic()
        listed = self._list()
        for seen in self.pods.values():  # deleted since the last poll
            gone = not any(pod.metadata.name == seen.name for pod in listed)
            if seen.running_from is not None and seen.running_to is None and gone:
                seen.running_to = now
        for pod in listed:
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
            if phase == "Running" and seen.running_from is None:
                seen.running_from = now
            elif phase != "Running" and seen.running_from is not None and seen.running_to is None:
                seen.running_to = now
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
