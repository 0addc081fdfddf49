"""What an evaluate pod holds, as pure functions of a plan item: no operator instance, no Airflow.

The operator (:mod:`airflow_grid.operators.kubernetes`) only hands these to KubernetesPodOperator, as KPO hands
container helpers to ``cncf.kubernetes.utils``. Keeping them here lets the pod's contents - worker arguments,
requests = limits (Guaranteed QoS), thread caps and n_jobs from the CPU limit, identifying labels, the scratch and
store volumes, a hardened security context - and the reading of a failed pod be used and tested without Airflow.
Only the kubernetes client's models (plain data) and the Airflow-free core are imported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes.client import models as k8s

from airflow_grid.cv import budget, thread_env
from airflow_grid.launch import MEMORY_ENV, WORKER_MODULE, worker_arguments
from airflow_grid.spec import parse_cpu, parse_memory
from airflow_grid.worker import EXIT_OUT_OF_MEMORY, XCOM_RETURN_PATH

WORKER_UID = 10001
SCRATCH = "/tmp"
WORKER_COMMAND: tuple[str, ...] = ("python", "-m", WORKER_MODULE)
"""The container's command when the deployment sets none: the image's python runs the worker."""
# KPO gives the xcom sidecar requests only (cpu 1m, memory 10Mi), which makes the whole pod Burstable; with limits =
# requests on every container it is Guaranteed. 50m: exec'd `cat`/`kill` run throttled in the sidecar's cgroup.
XCOM_SIDECAR_RESOURCES = {"cpu": "50m", "memory": "32Mi"}
VALIDATION_SCHEMA_VERSION = "1.25"  # the oldest kubernetes-validate ships; the fields used here exist since 1.19


@dataclass(frozen=True)
class StoreVolume:
    """How pods reach the plan snapshot and the result store: a volume mounted at the store root's path.

    ``claim_name`` mounts a PersistentVolumeClaim (production, ReadWriteMany); ``host_path`` a node directory
    (single-node tests). With neither, the store root must be an fsspec URL the pod can reach (object storage).
    """

    mount_path: str
    claim_name: str | None = None
    host_path: str | None = None
    read_only: bool = False

    def volume(self) -> k8s.V1Volume:
        if self.claim_name:
            source = {"persistent_volume_claim": k8s.V1PersistentVolumeClaimVolumeSource(claim_name=self.claim_name)}
        else:
            source = {"host_path": k8s.V1HostPathVolumeSource(path=self.host_path or self.mount_path, type="Directory")}
        return k8s.V1Volume(name="airflow-grid-store", **source)

    def mount(self) -> k8s.V1VolumeMount:
        return k8s.V1VolumeMount(name="airflow-grid-store", mount_path=self.mount_path, read_only=self.read_only)


def label_value(text: str) -> str:
    """A Kubernetes label value: at most 63 of [A-Za-z0-9-_.], starting and ending alphanumeric."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63].strip("-_.")
    return cleaned or "none"


def pod_security_context() -> k8s.V1PodSecurityContext:
    return k8s.V1PodSecurityContext(
        run_as_non_root=True,
        run_as_user=WORKER_UID,
        run_as_group=WORKER_UID,
        fs_group=WORKER_UID,
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )


def container_security_context() -> k8s.V1SecurityContext:
    return k8s.V1SecurityContext(
        run_as_non_root=True,
        allow_privilege_escalation=False,
        read_only_root_filesystem=True,
        capabilities=k8s.V1Capabilities(drop=["ALL"]),
    )


def candidate_env(candidate: Mapping[str, Any]) -> dict[str, str]:
    """The worker's environment for a plan item: thread caps and n_jobs from its CPU limit, its memory budget.

    Raises :class:`~airflow_grid.errors.SpecError` for a CPU or memory quantity that does not parse. The budget
    travels in ``MEMORY_ENV`` (a retry raises it with the limit); the worker's watchdog reads it there.
    """
    cpu = parse_cpu(candidate["cpu"], "resources.cpu")
    memory = parse_memory(candidate["memory"], "resources.memory")
    n_jobs, threads = budget(cpu, 1 << 16)
    return {
        **thread_env(threads),
        "AIRFLOW_GRID_CPU": str(candidate["cpu"]),
        "AIRFLOW_GRID_N_JOBS": str(n_jobs),
        MEMORY_ENV: str(memory),
        "TMPDIR": SCRATCH,
        "JOBLIB_TEMP_FOLDER": SCRATCH,
        "HOME": SCRATCH,
    }


def candidate_arguments(candidate: Mapping[str, Any]) -> list[str]:
    """The worker's arguments for a plan item; the result goes to the xcom sidecar's file, the budget by env."""
    return worker_arguments(
        "evaluate",
        candidate["plan_uri"],
        candidate["indices"],
        out=XCOM_RETURN_PATH,
        memory_bytes=None,
        round_=int(candidate.get("round", 0)),  # successive halving's later rounds
    )


def candidate_resources(candidate: Mapping[str, Any]) -> k8s.V1ResourceRequirements:
    """Requests = limits, as the spec wrote them, so the pod gets Guaranteed QoS."""
    quantities = {"cpu": str(candidate["cpu"]), "memory": str(candidate["memory"])}
    return k8s.V1ResourceRequirements(requests=quantities, limits=dict(quantities))


def candidate_labels(candidate: Mapping[str, Any]) -> dict[str, str]:
    """Labels that find a plan's pods (and a candidate's, and a round's) with ``kubectl get pods -l``."""
    plan_id = candidate["plan_uri"].rstrip("/").rsplit("/", 1)[-1]
    return {
        "app.kubernetes.io/name": "airflow-grid",
        "airflow-grid/plan": label_value(plan_id),
        "airflow-grid/candidate": label_value("-".join(map(str, candidate["indices"]))),
        **({"airflow-grid/round": str(int(candidate["round"]))} if candidate.get("round") else {}),
    }


def candidate_annotations(candidate: Mapping[str, Any]) -> dict[str, str]:
    """The candidate's readable label, which a label value (63 characters) cannot hold."""
    return {"airflow-grid/candidate-label": candidate.get("label", "")[:1000]}


def pod_volumes(
    store_volume: StoreVolume | None, extra_volumes: Sequence[tuple[k8s.V1Volume, k8s.V1VolumeMount]] = ()
) -> tuple[list[k8s.V1Volume], list[k8s.V1VolumeMount]]:
    """Volumes and their mounts: a writable scratch at ``SCRATCH`` (the root filesystem is read-only), the store,
    then ``extra_volumes`` in order."""
    volumes = [k8s.V1Volume(name="scratch", empty_dir=k8s.V1EmptyDirVolumeSource())]
    mounts = [k8s.V1VolumeMount(name="scratch", mount_path=SCRATCH)]
    if store_volume is not None:
        volumes.append(store_volume.volume())
        mounts.append(store_volume.mount())
    for volume, mount in extra_volumes:
        volumes.append(volume)
        mounts.append(mount)
    return volumes, mounts


def env_dict(value: Any) -> dict[str, str]:
    """Environment given as a mapping or as ``V1EnvVar``s, as a mapping (empty for ``None``)."""
    if not value:
        return {}
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    return {item.name: item.value for item in value}


def retry_memory(memory: str, factor: float, cap: str | None, tries: int) -> tuple[int, int] | None:
    """(raised memory, cap) in bytes for try ``tries``: ``factor``x more per try, up to ``cap`` (default 4x).

    ``None`` when nothing is raised: the first try, or ``factor`` <= 1.
    """
    if factor <= 1 or tries <= 1:
        return None
    base = parse_memory(memory, "resources.memory")
    ceiling = parse_memory(cap, "memory_cap") if cap else base * 4
    return min(ceiling, int(base * factor ** (tries - 1))), ceiling


def limit_sidecar(pod: k8s.V1Pod, sidecar_name: str) -> k8s.V1Pod:
    """The pod with limits = requests on the xcom sidecar too, unless its resources (from the connection) set limits."""
    for container in pod.spec.containers:
        given = container.resources  # V1ResourceRequirements, or a dict from the connection extra
        limits = given.get("limits") if isinstance(given, dict) else getattr(given, "limits", None)
        if container.name == sidecar_name and not limits:
            container.resources = k8s.V1ResourceRequirements(
                requests=dict(XCOM_SIDECAR_RESOURCES), limits=dict(XCOM_SIDECAR_RESOURCES)
            )
    return pod


def describe_failure(pod: k8s.V1Pod | None) -> dict[str, Any]:
    """Why the base container of a finished pod failed: OOMKilled (with the limit), evicted, or its exit code."""
    if pod is None or pod.status is None:
        return {}
    if (pod.status.reason or "") == "Evicted":
        return {"reason": "Evicted", "message": f"pod was evicted: {pod.status.message}"}
    if (pod.status.reason or "") == "DeadlineExceeded":
        deadline = pod.spec.active_deadline_seconds if pod.spec else None
        return {
            "reason": "DeadlineExceeded",
            "message": f"pod ran past its deadline of {deadline}s (derived from resources.timeout) and was stopped",
        }
    limit = None
    for container in pod.spec.containers if pod.spec else []:
        if container.name == "base" and container.resources and container.resources.limits:
            limit = container.resources.limits.get("memory")
    for status in pod.status.container_statuses or []:
        if status.name != "base" or status.state is None or status.state.terminated is None:
            continue
        terminated = status.state.terminated
        if terminated.reason == "OOMKilled":
            return {
                "reason": "OOMKilled",
                "memory_limit": limit,
                "exit_code": terminated.exit_code,
                "message": f"OOMKilled: the worker exceeded its memory limit of {limit}",
            }
        if terminated.exit_code == EXIT_OUT_OF_MEMORY:
            return {"reason": "OutOfMemory", "exit_code": terminated.exit_code, "message": "worker ran out of memory"}
        if terminated.exit_code:
            return {
                "reason": terminated.reason or "Error",
                "exit_code": terminated.exit_code,
                "message": f"worker exited with {terminated.exit_code} ({terminated.reason})",
            }
    return {}


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Validate against the official schema (strict: unknown fields fail) plus what the schema cannot see."""
    import kubernetes_validate

    kubernetes_validate.validate(manifest, VALIDATION_SCHEMA_VERSION, strict=True)
    for container in manifest["spec"]["containers"]:
        if container["name"] != "base":
            continue
        resources = container.get("resources") or {}
        limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
        if set(limits) != {"cpu", "memory"} or limits != requests:
            raise ValueError(
                f"container base: resources must set cpu and memory with requests = limits, got {resources}"
            )
