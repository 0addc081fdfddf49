"""The evaluate pods, built offline: resources, thread caps, command, labels, hardening, volumes, validation.

Every pod here comes from ``KubernetesEvaluateOperator.build_pod_request_obj(context, dry_run=True)`` for a mapped
task instance (map index 3), the call KubernetesPodOperator makes before it creates the pod, so what is asserted is
what the cluster receives (bar the ``airflow_kpo_in_cluster`` label, which needs a kubeconfig). No cluster, no
metadata DB; the whole module runs in a few seconds.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kubernetes_validate
import pytest
import yaml
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from kubernetes.client import ApiClient
from kubernetes.client import models as k8s

from airflow_grid.cv import THREAD_ENV_VARS
from airflow_grid.operators import plan as plan_module
from airflow_grid.operators.kubernetes import (
    WORKER_UID,
    XCOM_SIDECAR_RESOURCES,
    KubernetesBackend,
    KubernetesEvaluateOperator,
    StoreVolume,
    describe_failure,
    render_pod_manifests,
    validate_manifest,
)
from airflow_grid.operators.plan import PlanGridSearchOperator
from airflow_grid.spec import parse_memory
from airflow_grid.worker import XCOM_RETURN_PATH

PLAN_ID = "4f1c2a9e8b7d6c5e4f3a2b1c"
STORE = "/data/airflow-grid"
SIDECAR = "airflow-xcom-sidecar"
SIDECAR_IMAGE = "registry.example/xcom-sidecar:1"
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
WORKER = ("/opt/venv/bin/python", "-m", "airflow_grid.worker")


def plan_item(cpu: Any = 2, memory: str = "1Gi", indices: tuple[int, ...] = (7,)) -> dict[str, Any]:
    """One element of the plan task's output, as the mapped evaluate_kubernetes task receives it."""
    return {
        "plan_uri": f"{STORE}/plans/{PLAN_ID}",
        "indices": list(indices),
        "label": " | ".join(f"clf__C={i}" for i in indices),
        "cpu": cpu,
        "memory": memory,
        "backend": "kubernetes",
    }


def backend(**fields: Any) -> KubernetesBackend:
    defaults: dict[str, Any] = {
        "image": "registry.example/airflow-grid-worker:0.1.0",
        "worker_command": WORKER,
        "store_volume": StoreVolume(mount_path=STORE, claim_name="grid-store"),
    }
    return KubernetesBackend(**{**defaults, **fields})


def mapped_context(map_index: int = 3, try_number: int = 1) -> Any:
    """What KPO reads from a mapped task instance's context to label its pod."""
    ti = SimpleNamespace(
        dag_id="grid_search_nightly",
        task_id="evaluate_kubernetes",
        map_index=map_index,
        try_number=try_number,
        run_id="manual__2026-11-24T02:00:00+00:00",
    )
    return {"ti": ti, "run_id": ti.run_id, "dag": SimpleNamespace(dag_id=ti.dag_id)}


def operator(item: dict[str, Any] | None = None, kube: KubernetesBackend | None = None) -> KubernetesEvaluateOperator:
    kwargs = (kube or backend()).operator_kwargs()
    return KubernetesEvaluateOperator(task_id="evaluate_kubernetes", candidate=item or plan_item(), **kwargs)


def build(item: dict[str, Any] | None = None, kube: KubernetesBackend | None = None, **context: Any) -> k8s.V1Pod:
    return operator(item, kube).build_pod_request_obj(mapped_context(**context), dry_run=True)


def manifest(pod: k8s.V1Pod) -> dict[str, Any]:
    document: dict[str, Any] = ApiClient().sanitize_for_serialization(pod)
    return {"apiVersion": "v1", "kind": "Pod", **document}


def container(pod: k8s.V1Pod, name: str) -> k8s.V1Container:
    matches = [c for c in pod.spec.containers if c.name == name]
    assert len(matches) == 1, [c.name for c in pod.spec.containers]
    return matches[0]


def env_of(pod: k8s.V1Pod) -> dict[str, str]:
    return {variable.name: variable.value for variable in container(pod, "base").env}


def qos_class(pod: k8s.V1Pod) -> str:
    """The QoS class the kubelet assigns (Guaranteed: every container has cpu and memory limits = requests)."""
    guaranteed, any_set = True, False
    for c in pod.spec.containers:
        limits = dict((c.resources and c.resources.limits) or {})
        requests = dict((c.resources and c.resources.requests) or {})
        any_set = any_set or bool(limits or requests)
        effective = {**limits, **requests}  # requests default to limits
        if not ({"cpu", "memory"} <= limits.keys() and effective == limits):
            guaranteed = False
    return "Guaranteed" if guaranteed else ("Burstable" if any_set else "BestEffort")


@pytest.fixture(autouse=True)
def kubernetes_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection KPO reads while building (sidecar image); no kubeconfig, no cluster."""
    extra = {"xcom_sidecar_container_image": SIDECAR_IMAGE}
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", json.dumps({"conn_type": "kubernetes", "extra": extra}))


# --- resources and threads -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpu", "memory", "n_jobs"),
    [(2, "1Gi", "2"), ("500m", "768Mi", "1"), ("1.5", "2G", "1"), (4, "512Mi", "4")],
)
def test_base_container_requests_equal_limits_and_threads_are_capped(cpu: Any, memory: str, n_jobs: str) -> None:
    pod = build(plan_item(cpu=cpu, memory=memory))
    resources = container(pod, "base").resources
    assert resources.requests == resources.limits == {"cpu": str(cpu), "memory": memory}
    assert qos_class(pod) == "Guaranteed"
    env = env_of(pod)
    assert {name: env[name] for name in THREAD_ENV_VARS} == dict.fromkeys(THREAD_ENV_VARS, "1")
    assert env["AIRFLOW_GRID_N_JOBS"] == n_jobs  # floor(cpu), at least 1: folds in parallel, one thread each
    assert env["AIRFLOW_GRID_CPU"] == str(cpu)
    assert env["AIRFLOW_GRID_MEMORY_BYTES"] == str(parse_memory(memory, "memory"))
    assert env["TMPDIR"] == env["JOBLIB_TEMP_FOLDER"] == env["HOME"] == "/tmp"


def test_sidecar_gets_limits_so_the_pod_is_guaranteed() -> None:
    """KPO's sidecar has requests only, which would make every pod Burstable; ours has limits = requests."""
    sidecar = container(build(), SIDECAR)
    assert sidecar.resources.requests == sidecar.resources.limits == XCOM_SIDECAR_RESOURCES


def test_sidecar_limits_from_the_connection_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    resources = {"requests": {"cpu": "20m", "memory": "16Mi"}, "limits": {"cpu": "20m", "memory": "16Mi"}}
    extra = {"xcom_sidecar_container_image": SIDECAR_IMAGE, "xcom_sidecar_container_resources": json.dumps(resources)}
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", json.dumps({"conn_type": "kubernetes", "extra": extra}))
    document = manifest(build())
    sidecar = next(c for c in document["spec"]["containers"] if c["name"] == SIDECAR)
    assert sidecar["resources"] == resources


def test_extra_env_vars_are_merged_not_replaced() -> None:
    kwargs = backend().operator_kwargs()
    op = KubernetesEvaluateOperator(
        task_id="evaluate_kubernetes", candidate=plan_item(), env_vars={"EXTRA": "1", "OMP_NUM_THREADS": "2"}, **kwargs
    )
    env = env_of(op.build_pod_request_obj(mapped_context(), dry_run=True))
    assert env["EXTRA"] == "1" and env["OMP_NUM_THREADS"] == "2" and env["AIRFLOW_GRID_N_JOBS"] == "2"


# --- command, labels ------------------------------------------------------------------------------------------------


def test_command_runs_the_worker_on_the_items_candidates() -> None:
    base = container(build(plan_item(indices=(0, 5, 10))), "base")
    assert base.command == list(WORKER)
    assert base.args == [
        "evaluate", "--plan", f"{STORE}/plans/{PLAN_ID}",
        "--candidate", "0", "--candidate", "5", "--candidate", "10",
        "--out", XCOM_RETURN_PATH,
    ]  # fmt: skip
    assert XCOM_RETURN_PATH == "/airflow/xcom/return.json"
    assert base.image == "registry.example/airflow-grid-worker:0.1.0"


def test_labels_identify_plan_candidate_and_mapped_task_instance() -> None:
    pod = build(plan_item(indices=(0, 5, 10)), map_index=3, try_number=1)
    labels = pod.metadata.labels
    assert labels["app.kubernetes.io/name"] == "airflow-grid"
    assert labels["airflow-grid/plan"] == PLAN_ID
    assert labels["airflow-grid/candidate"] == "0-5-10"
    assert labels["map_index"] == "3"  # KPO's own: how it finds the pod of this mapped task instance again
    assert labels["try_number"] == "1"
    assert labels["dag_id"] == "grid_search_nightly" and labels["task_id"] == "evaluate_kubernetes"
    assert labels["kubernetes_pod_operator"] == "True"
    assert all(LABEL_VALUE.match(value) and len(value) <= 63 for value in labels.values()), labels
    assert pod.metadata.annotations == {"airflow-grid/candidate-label": "clf__C=0 | clf__C=5 | clf__C=10"}
    assert pod.metadata.name.startswith("airflow-grid-evaluate-")
    assert pod.metadata.namespace == "default"


def test_candidate_label_is_a_valid_label_value_for_large_groups() -> None:
    labels = build(plan_item(indices=tuple(range(0, 400, 7)))).metadata.labels
    assert len(labels["airflow-grid/candidate"]) <= 63
    assert LABEL_VALUE.match(labels["airflow-grid/candidate"])


# --- hardening ------------------------------------------------------------------------------------------------------


def test_pod_runs_as_non_root_with_seccomp_and_no_service_account_token() -> None:
    pod = build()
    context = pod.spec.security_context
    assert context.run_as_non_root is True
    assert context.run_as_user == context.run_as_group == WORKER_UID == 10001
    assert context.seccomp_profile.type == "RuntimeDefault"
    assert pod.spec.automount_service_account_token is False
    assert pod.spec.restart_policy == "Never"
    assert not pod.spec.host_network


@pytest.mark.parametrize("name", ["base", SIDECAR])
def test_containers_are_hardened(name: str) -> None:
    context = container(build(), name).security_context
    assert context.allow_privilege_escalation is False
    assert context.capabilities.drop == ["ALL"]
    assert not context.capabilities.add
    assert context.read_only_root_filesystem is True
    assert context.run_as_non_root is True
    assert not context.privileged


def test_xcom_sidecar_shares_the_result_volume() -> None:
    pod = build()
    sidecar = container(pod, SIDECAR)
    assert sidecar.image == SIDECAR_IMAGE  # from the connection extra
    mounts = {m.mount_path: m.name for m in container(pod, "base").volume_mounts}
    assert mounts["/airflow/xcom"] == "xcom"
    assert [m.mount_path for m in sidecar.volume_mounts] == ["/airflow/xcom"]
    volumes = {v.name: v for v in pod.spec.volumes}
    assert volumes["xcom"].empty_dir is not None


# --- volumes --------------------------------------------------------------------------------------------------------


def _volumes(pod: k8s.V1Pod) -> tuple[dict[str, Any], dict[str, Any]]:
    document = manifest(pod)["spec"]
    volumes = {v["name"]: v for v in document["volumes"]}
    base = next(c for c in document["containers"] if c["name"] == "base")
    mounts = {m["mountPath"]: m for m in base["volumeMounts"]}
    assert len(volumes) == len(document["volumes"]), "duplicate volume names"
    assert all(m["name"] in volumes for c in document["containers"] for m in c.get("volumeMounts") or [])
    return volumes, mounts


def test_scratch_tmp_is_an_empty_dir() -> None:
    volumes, mounts = _volumes(build())
    assert volumes[mounts["/tmp"]["name"]] == {"name": "scratch", "emptyDir": {}}


def test_store_volume_from_a_claim() -> None:
    volumes, mounts = _volumes(build(kube=backend(store_volume=StoreVolume(mount_path=STORE, claim_name="grid"))))
    assert mounts[STORE] == {"name": "airflow-grid-store", "mountPath": STORE, "readOnly": False}
    assert volumes["airflow-grid-store"] == {
        "name": "airflow-grid-store",
        "persistentVolumeClaim": {"claimName": "grid"},
    }


@pytest.mark.parametrize("host_path", [None, "/srv/store"])
def test_store_volume_from_a_host_path(host_path: str | None) -> None:
    volume = StoreVolume(mount_path=STORE, host_path=host_path)
    volumes, mounts = _volumes(build(kube=backend(store_volume=volume)))
    assert mounts[STORE]["name"] == "airflow-grid-store"
    expected = {"path": host_path or STORE, "type": "Directory"}
    assert volumes["airflow-grid-store"] == {"name": "airflow-grid-store", "hostPath": expected}


def test_without_a_store_volume_only_scratch_and_xcom() -> None:
    volumes, mounts = _volumes(build(kube=backend(store_volume=None)))
    assert set(volumes) == {"xcom", "scratch"}
    assert set(mounts) == {"/airflow/xcom", "/tmp"}


def test_host_mounts_are_read_only_at_the_same_path() -> None:
    kube = backend(host_mounts=("/root/.pyenv/versions/3.11.7", "/work/checkout"))
    volumes, mounts = _volumes(build(kube=kube))
    for path in kube.host_mounts:
        assert mounts[path]["readOnly"] is True
        assert volumes[mounts[path]["name"]]["hostPath"] == {"path": path, "type": "Directory"}


# --- schema validation ----------------------------------------------------------------------------------------------

VARIANTS: dict[str, KubernetesBackend] = {
    "claim": backend(),
    "host-path": backend(store_volume=StoreVolume(mount_path=STORE, host_path="/srv/store")),
    "no-store": backend(store_volume=None),
    "scheduling": backend(
        namespace="tuning",
        service_account_name="grid-worker",
        image_pull_policy="IfNotPresent",
        node_selector={"pool": "cpu"},
        tolerations=(k8s.V1Toleration(key="dedicated", operator="Equal", value="tuning", effect="NoSchedule"),),
        host_mounts=("/opt/venv",),
    ),
}


@pytest.mark.parametrize("kube", VARIANTS.values(), ids=VARIANTS.keys())
@pytest.mark.parametrize("cpu", [2, "500m"])
def test_every_manifest_passes_strict_validation(kube: KubernetesBackend, cpu: Any) -> None:
    validate_manifest(manifest(build(plan_item(cpu=cpu), kube=kube)))


def test_rendered_manifests_pass_validation() -> None:
    items = [plan_item(indices=(i,)) for i in range(3)]
    manifests = render_pod_manifests(items, VARIANTS["scheduling"])
    assert len(manifests) == 3
    assert [m["metadata"]["labels"]["map_index"] for m in manifests] == ["0", "1", "2"]
    for document in manifests:
        validate_manifest(document)
        assert document["metadata"]["namespace"] == "tuning"
        assert document["spec"]["serviceAccountName"] == "grid-worker"
        assert document["spec"]["nodeSelector"] == {"pool": "cpu"}


def _broken(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    document = copy.deepcopy(manifest(build()))
    edit(document)
    return document


def _base(document: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in document["spec"]["containers"] if c["name"] == "base")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d["spec"].update(automountServiceAccountToken="nope"), "is not of type 'boolean'"),
        (lambda d: d["spec"].update(bogusField=True), "'bogusField' was unexpected"),
        (lambda d: _base(d)["securityContext"].update(runAsUser="root"), "is not of type 'integer'"),
        (lambda d: _base(d).update(imagePullPolicy=7), "is not of type 'string'"),
    ],
    ids=["wrong-type", "unknown-field", "wrong-type-nested", "wrong-type-container"],
)
def test_schema_violations_fail_validation(edit: Callable[[dict[str, Any]], None], match: str) -> None:
    with pytest.raises(kubernetes_validate.ValidationError) as raised:
        validate_manifest(_broken(edit))
    assert match in raised.value.message


@pytest.mark.parametrize(
    "resources",
    [
        {"limits": {"cpu": "2", "memory": "1Gi"}, "requests": {"cpu": "1", "memory": "1Gi"}},
        {"limits": {"cpu": "2"}, "requests": {"cpu": "2"}},
        {"limits": {"cpu": "2", "memroy": "1Gi"}, "requests": {"cpu": "2", "memroy": "1Gi"}},
        {},
    ],
    ids=["requests-below-limits", "no-memory", "misspelled-key", "none"],
)
def test_resource_rules_the_schema_cannot_see(resources: dict[str, Any]) -> None:
    document = _broken(lambda d: _base(d).update(resources=resources))
    kubernetes_validate.validate(document, "1.25", strict=True)  # the schema alone accepts it
    with pytest.raises(ValueError, match="requests = limits"):
        validate_manifest(document)


# --- memory raised on retry ----------------------------------------------------------------------------------------


def _execute_pod(
    op: KubernetesEvaluateOperator, try_number: int, rendered: bool, monkeypatch: pytest.MonkeyPatch
) -> k8s.V1Pod:
    """Run ``execute`` with KPO's own execute replaced by building the pod it would create."""
    monkeypatch.setattr(
        KubernetesPodOperator, "execute", lambda self, context: self.build_pod_request_obj(context, dry_run=True)
    )
    context = mapped_context(try_number=try_number)
    if rendered:  # as the task runner does before execute: env_vars become V1EnvVar objects
        op.render_template_fields(context)
        assert isinstance(op.env_vars, list)
    pod: k8s.V1Pod = op.execute(context)
    return pod


@pytest.mark.parametrize(
    ("factor", "cap", "try_number", "expected"),
    [
        (4.0, None, 1, "100Mi"),
        (4.0, None, 2, str(400 * 2**20)),
        (2.0, None, 3, str(400 * 2**20)),
        (4.0, None, 3, str(400 * 2**20)),  # default cap: 4x the spec's memory
        (4.0, "1Gi", 3, str(2**30)),
        (1.0, None, 3, "100Mi"),
    ],
)
@pytest.mark.parametrize("rendered", [True, False], ids=["rendered", "unrendered"])
def test_retry_raises_memory_up_to_the_cap(
    factor: float, cap: str | None, try_number: int, expected: str, rendered: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    op = operator(plan_item(memory="100Mi"), backend(memory_retry_factor=factor, memory_cap=cap))
    pod = _execute_pod(op, try_number, rendered, monkeypatch)
    resources = container(pod, "base").resources
    assert resources.limits == resources.requests == {"cpu": "2", "memory": expected}
    assert env_of(pod)["AIRFLOW_GRID_MEMORY_BYTES"] == str(parse_memory(expected, "memory"))
    assert pod.metadata.labels["try_number"] == str(try_number)
    validate_manifest(manifest(pod))


# --- backend configuration ----------------------------------------------------------------------------------------


def test_backend_from_env_reads_every_variable() -> None:
    kube = KubernetesBackend.from_env(
        {
            "AIRFLOW_GRID_K8S_IMAGE": "localhost/worker:1",
            "AIRFLOW_GRID_K8S_NAMESPACE": "tuning",
            "AIRFLOW_GRID_K8S_CONN_ID": "k8s_tuning",
            "AIRFLOW_GRID_K8S_CONFIG_FILE": "/tmp/kubeconfig",
            "AIRFLOW_GRID_K8S_IMAGE_PULL_POLICY": "Never",
            "AIRFLOW_GRID_K8S_SERVICE_ACCOUNT": "grid",
            "AIRFLOW_GRID_K8S_WORKER_COMMAND": "/venv/bin/python -m airflow_grid.worker",
            "AIRFLOW_GRID_K8S_STORE_PATH": "/data/store",
            "AIRFLOW_GRID_K8S_STORE_HOST_PATH": "/srv/store",
            "AIRFLOW_GRID_K8S_HOST_MOUNTS": "/root/.pyenv/versions/3.11.7,,/work/checkout",
            "AIRFLOW_GRID_K8S_DEFERRABLE": "True",
            "AIRFLOW_GRID_K8S_MEMORY_RETRY_FACTOR": "2.5",
            "AIRFLOW_GRID_K8S_MEMORY_CAP": "8Gi",
        }
    )
    assert kube == KubernetesBackend(
        image="localhost/worker:1",
        namespace="tuning",
        kubernetes_conn_id="k8s_tuning",
        config_file="/tmp/kubeconfig",
        image_pull_policy="Never",
        service_account_name="grid",
        worker_command=("/venv/bin/python", "-m", "airflow_grid.worker"),
        store_volume=StoreVolume(mount_path="/data/store", host_path="/srv/store"),
        host_mounts=("/root/.pyenv/versions/3.11.7", "/work/checkout"),
        deferrable=True,
        memory_retry_factor=2.5,
        memory_cap="8Gi",
    )
    kwargs = kube.operator_kwargs()
    assert kwargs["config_file"] == "/tmp/kubeconfig" and kwargs["image_pull_policy"] == "Never"
    assert kwargs["service_account_name"] == "grid" and kwargs["deferrable"] is True
    assert [m.mount_path for _, m in kwargs["extra_volumes"]] == list(kube.host_mounts)


def test_backend_from_env_defaults() -> None:
    kube = KubernetesBackend.from_env({})
    assert kube == KubernetesBackend(image="airflow-grid-worker:0.1.0")
    assert kube.store_volume is None and kube.host_mounts == () and kube.memory_retry_factor == 1.0
    kwargs = kube.operator_kwargs()
    assert not {"config_file", "in_cluster", "image_pull_policy", "service_account_name"} & kwargs.keys()
    assert kwargs["worker_command"] == ("python", "-m", "airflow_grid.worker")
    assert kwargs["on_finish_action"] == "delete_pod" and kwargs["deferrable"] is False


def test_backend_from_env_store_claim() -> None:
    kube = KubernetesBackend.from_env(
        {"AIRFLOW_GRID_K8S_STORE_PATH": "/data/store", "AIRFLOW_GRID_K8S_STORE_CLAIM": "grid-store"}
    )
    assert kube.store_volume == StoreVolume(mount_path="/data/store", claim_name="grid-store")


def test_backend_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_GRID_K8S_IMAGE", "localhost/from-environ:2")
    assert KubernetesBackend.from_env().image == "localhost/from-environ:2"


# --- failure reasons ------------------------------------------------------------------------------------------------


def finished_pod(
    *,
    exit_code: int | None = 0,
    reason: str | None = None,
    memory: str = "100Mi",
    pod_reason: str | None = None,
    pod_message: str | None = None,
) -> k8s.V1Pod:
    """A finished pod as the API returns it: base container terminated (or not), sidecar completed."""
    base_state = (
        k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(exit_code=exit_code, reason=reason))
        if exit_code is not None
        else k8s.V1ContainerState(running=k8s.V1ContainerStateRunning())
    )
    sidecar_state = k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(exit_code=0, reason="Completed"))
    resources = k8s.V1ResourceRequirements(limits={"cpu": "1", "memory": memory}, requests={"cpu": "1"})
    return k8s.V1Pod(
        spec=k8s.V1PodSpec(
            containers=[
                k8s.V1Container(name="base", resources=resources),
                k8s.V1Container(name=SIDECAR),
            ]
        ),
        status=k8s.V1PodStatus(
            phase="Failed" if exit_code else "Succeeded",
            reason=pod_reason,
            message=pod_message,
            container_statuses=[
                k8s.V1ContainerStatus(
                    name=SIDECAR, state=sidecar_state, image="x", image_id="", ready=False, restart_count=0
                ),
                k8s.V1ContainerStatus(
                    name="base", state=base_state, image="x", image_id="", ready=False, restart_count=0
                ),
            ],
        ),
    )


def test_describe_oom_killed_names_the_limit() -> None:
    reason = describe_failure(finished_pod(exit_code=137, reason="OOMKilled", memory="100Mi"))
    assert reason == {
        "reason": "OOMKilled",
        "memory_limit": "100Mi",
        "exit_code": 137,
        "message": "OOMKilled: the worker exceeded its memory limit of 100Mi",
    }


def test_describe_evicted() -> None:
    message = "The node was low on resource: memory. Container base was using 1Gi, which exceeds its request of 0."
    reason = describe_failure(finished_pod(exit_code=None, pod_reason="Evicted", pod_message=message))
    assert reason["reason"] == "Evicted"
    assert reason["message"] == f"pod was evicted: {message}"


@pytest.mark.parametrize(
    ("exit_code", "expected_reason", "message"),
    [
        (2, "Error", "worker exited with 2 (Error)"),
        (3, "OutOfMemory", "worker ran out of memory"),
        (1, "Error", "worker exited with 1 (Error)"),
        (137, "Error", "worker exited with 137 (Error)"),  # SIGKILL without the kernel's OOM verdict
    ],
)
def test_describe_exit_codes(exit_code: int, expected_reason: str, message: str) -> None:
    reason = describe_failure(finished_pod(exit_code=exit_code, reason="Error"))
    assert reason["reason"] == expected_reason
    assert reason["exit_code"] == exit_code
    assert reason["message"] == message


@pytest.mark.parametrize(
    "pod",
    [None, k8s.V1Pod(), finished_pod(exit_code=0, reason="Completed"), finished_pod(exit_code=None)],
    ids=["no-pod", "no-status", "succeeded", "still-running"],
)
def test_describe_nothing_to_report(pod: k8s.V1Pod | None) -> None:
    assert describe_failure(pod) == {}


def test_describe_ignores_the_sidecar() -> None:
    pod = finished_pod(exit_code=0, reason="Completed")
    pod.status.container_statuses[0].state.terminated = k8s.V1ContainerStateTerminated(exit_code=137, reason="Error")
    assert describe_failure(pod) == {}


@pytest.fixture
def failing_cleanup(monkeypatch: pytest.MonkeyPatch) -> None:
    """KPO's cleanup raising as it does for a failed base container."""

    def cleanup(self: Any, pod: Any, remote_pod: Any, xcom_result: Any = None, context: Any = None) -> None:
        raise AirflowException("Pod airflow-grid-evaluate-x returned a failure.")

    monkeypatch.setattr(KubernetesPodOperator, "cleanup", cleanup)


@pytest.mark.usefixtures("failing_cleanup")
def test_cleanup_reports_oom_with_the_limit_and_stays_retryable() -> None:
    pod = finished_pod(exit_code=137, reason="OOMKilled", memory="100Mi")
    with pytest.raises(AirflowException) as raised:
        operator(plan_item(memory="100Mi")).cleanup(pod, pod)
    assert not isinstance(raised.value, AirflowFailException)
    assert "OOMKilled: the worker exceeded its memory limit of 100Mi (clf__C=7)" in str(raised.value)


@pytest.mark.usefixtures("failing_cleanup")
def test_cleanup_bad_input_fails_without_retry() -> None:
    pod = finished_pod(exit_code=2, reason="Error")
    with pytest.raises(AirflowFailException, match="worker refused its input"):
        operator().cleanup(pod, pod)


@pytest.mark.usefixtures("failing_cleanup")
def test_cleanup_without_a_reason_reraises_kpo_error() -> None:
    pod = finished_pod(exit_code=None)
    with pytest.raises(AirflowException, match="returned a failure"):
        operator().cleanup(pod, pod)


# --- the plan refuses a kubernetes spec without explicit limits ----------------------------------------------------


class _TI:
    def __init__(self) -> None:
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def _plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: dict[str, Any], backends: tuple[str, ...]) -> Any:
    monkeypatch.setenv("AIRFLOW_GRID_STORE", str(tmp_path / "store"))
    monkeypatch.setattr(plan_module, "pool_exists", lambda name: True)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    op = PlanGridSearchOperator(task_id="plan", spec_path=str(spec_path), backends=backends)
    names = ("spec", "spec_path", "param_grid", "cv", "scoring", "resources", "backend", "dataset_version")
    context = {"params": {**dict.fromkeys(names), "max_parallel": None}, "logical_date": None, "ti": _TI()}
    return op.execute(context)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "resources",
    [None, {"cpu": 1}, {"memory": "1Gi"}],
    ids=["no-resources", "cpu-only", "memory-only"],
)
def test_plan_refuses_kubernetes_without_cpu_and_memory(
    resources: dict[str, Any] | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    iris_doc: Callable[..., dict[str, Any]],
) -> None:
    spec = iris_doc(backend="kubernetes")
    if resources is not None:
        spec["resources"] = resources
    with pytest.raises(AirflowFailException, match="explicit CPU and memory limits"):
        _plan(tmp_path, monkeypatch, spec, ("local", "kubernetes"))


def test_plan_accepts_kubernetes_with_cpu_and_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, iris_doc: Callable[..., dict[str, Any]]
) -> None:
    spec = iris_doc(backend="kubernetes", resources={"cpu": "500m", "memory": "768Mi"})
    items = _plan(tmp_path, monkeypatch, spec, ("local", "kubernetes"))
    assert len(items) == 3
    assert {(i["backend"], i["cpu"], i["memory"]) for i in items} == {("kubernetes", "500m", "768Mi")}


def test_plan_refuses_kubernetes_on_a_local_only_dag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, iris_doc: Callable[..., dict[str, Any]]
) -> None:
    spec = iris_doc(backend="kubernetes", resources={"cpu": 1, "memory": "1Gi"})
    with pytest.raises(AirflowFailException, match="KubernetesBackend"):
        _plan(tmp_path, monkeypatch, spec, ("local",))


# --- airflow-grid render ---------------------------------------------------------------------------------------------


def _render(spec: dict[str, Any], tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_GRID_K8S_")}
    command = [str(Path(sys.executable).parent / "airflow-grid"), "--store", str(tmp_path / "store"), "render"]
    return subprocess.run(
        [*command, str(spec_path), *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


def test_render_prints_one_valid_pod_per_candidate(tmp_path: Path, iris_doc: Callable[..., dict[str, Any]]) -> None:
    spec = iris_doc(param_grid={"clf__C": [0.1, 1, 10, 100]}, resources={"cpu": 2, "memory": "1Gi"})
    completed = _render(spec, tmp_path, "--image", "localhost/worker:9", "--namespace", "tuning")
    assert completed.returncode == 0, completed.stderr[-3000:]
    documents = list(yaml.safe_load_all(completed.stdout))
    assert len(documents) == 4
    assert "4 pod manifests, valid against the Kubernetes schemas (strict)" in completed.stderr
    for index, document in enumerate(documents):
        validate_manifest(document)
        assert document["kind"] == "Pod" and document["metadata"]["namespace"] == "tuning"
        base = _base(document)
        assert base["image"] == "localhost/worker:9"
        assert base["args"][base["args"].index("--candidate") + 1] == str(index)
        assert base["resources"]["limits"] == base["resources"]["requests"] == {"cpu": "2", "memory": "1Gi"}


def test_render_refuses_a_spec_without_limits(tmp_path: Path, iris_doc: Callable[..., dict[str, Any]]) -> None:
    completed = _render(iris_doc(), tmp_path)
    assert completed.returncode == 2
    assert "pods need explicit limits" in completed.stderr
    assert completed.stdout == ""
