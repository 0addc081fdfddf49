"""Evaluate operator, Kubernetes backend: one mapped item's candidates in a hardened pod with limits.

The subclass only sets what is ours - the worker's command and arguments, requests = limits from the spec (so the
pod gets Guaranteed QoS), thread caps and n_jobs derived from the CPU limit, identifying labels, the xcom
sidecar, a hardened security context and the store volume. Pod lifecycle stays KubernetesPodOperator's.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.utils.xcom_sidecar import PodDefaults
from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from kubernetes.client import models as k8s

from airflow_grid import settings
from airflow_grid.cv import budget, thread_env
from airflow_grid.launch import MEMORY_ENV, worker_arguments
from airflow_grid.spec import parse_cpu, parse_memory
from airflow_grid.tracking.links import MlflowCandidateRunLink
from airflow_grid.worker import EXIT_BAD_INPUT, EXIT_OUT_OF_MEMORY, XCOM_RETURN_PATH

WORKER_UID = 10001
SCRATCH = "/tmp"
# KPO gives the xcom sidecar requests only (cpu 1m, memory 10Mi), which makes the whole pod Burstable; with limits =
# requests on every container it is Guaranteed. 50m: exec'd `cat`/`kill` run throttled in the sidecar's cgroup.
XCOM_SIDECAR_RESOURCES = {"cpu": "50m", "memory": "32Mi"}


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


class KubernetesEvaluateOperator(KubernetesPodOperator):
    """Evaluate the candidates of one mapped item in a pod; the worker's result comes back through the sidecar.

    ``candidate`` is a plan item (``plan_uri``, ``indices``, ``label``, ``cpu``, ``memory``). The pod needs no
    Airflow or MLflow credentials: it reads the plan from the store and writes its result to the store and to
    ``/airflow/xcom/return.json``. An OOMKilled container is reported with its limit; with
    ``memory_retry_factor`` > 1 each retry asks for that much more memory, up to ``memory_cap``.
    """

    template_fields: Sequence[str] = (*KubernetesPodOperator.template_fields, "candidate")
    operator_extra_links = (MlflowCandidateRunLink(),)  # written by select once the candidate's child run exists

    def __init__(
        self,
        *,
        candidate: dict[str, Any],
        worker_command: Sequence[str] = ("python", "-m", "airflow_grid.worker"),
        store_volume: StoreVolume | None = None,
        extra_volumes: Sequence[tuple[k8s.V1Volume, k8s.V1VolumeMount]] = (),
        memory_retry_factor: float = 1.0,
        memory_cap: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.candidate = candidate
        self.memory_retry_factor = memory_retry_factor
        self.memory_cap = memory_cap
        cpu = parse_cpu(candidate["cpu"], "resources.cpu")
        memory = parse_memory(candidate["memory"], "resources.memory")
        n_jobs, threads = budget(cpu, 1 << 16)
        # The budget travels in MEMORY_ENV (a retry raises it with the limit); the worker's watchdog reads it there.
        arguments = worker_arguments(
            "evaluate", candidate["plan_uri"], candidate["indices"], out=XCOM_RETURN_PATH, memory_bytes=None
        )
        quantities = {"cpu": str(candidate["cpu"]), "memory": str(candidate["memory"])}
        volumes = [k8s.V1Volume(name="scratch", empty_dir=k8s.V1EmptyDirVolumeSource())]
        mounts = [k8s.V1VolumeMount(name="scratch", mount_path=SCRATCH)]
        if store_volume is not None:
            volumes.append(store_volume.volume())
            mounts.append(store_volume.mount())
        for volume, mount in extra_volumes:
            volumes.append(volume)
            mounts.append(mount)
        env = {
            **thread_env(threads),
            "AIRFLOW_GRID_CPU": str(candidate["cpu"]),
            "AIRFLOW_GRID_N_JOBS": str(n_jobs),
            MEMORY_ENV: str(memory),
            "TMPDIR": SCRATCH,
            "JOBLIB_TEMP_FOLDER": SCRATCH,
            "HOME": SCRATCH,
        }
        plan_id = candidate["plan_uri"].rstrip("/").rsplit("/", 1)[-1]
        labels = {
            "app.kubernetes.io/name": "airflow-grid",
            "airflow-grid/plan": label_value(plan_id),
            "airflow-grid/candidate": label_value("-".join(map(str, candidate["indices"]))),
            **(kwargs.pop("labels", None) or {}),
        }
        kwargs.setdefault("name", "airflow-grid-evaluate")
        kwargs.setdefault("on_finish_action", "delete_pod")
        kwargs.setdefault("get_logs", True)
        super().__init__(
            cmds=list(worker_command),
            arguments=arguments,
            container_resources=k8s.V1ResourceRequirements(requests=quantities, limits=dict(quantities)),
            env_vars={**env, **_env_dict(kwargs.pop("env_vars", None))},
            labels=labels,
            annotations={"airflow-grid/candidate-label": candidate.get("label", "")[:1000]},
            volumes=[*volumes, *(kwargs.pop("volumes", None) or [])],
            volume_mounts=[*mounts, *(kwargs.pop("volume_mounts", None) or [])],
            security_context=kwargs.pop("security_context", None) or pod_security_context(),
            container_security_context=kwargs.pop("container_security_context", None) or container_security_context(),
            xcom_sidecar_container_security_context=kwargs.pop("xcom_sidecar_container_security_context", None)
            or container_security_context(),
            automount_service_account_token=False,
            do_xcom_push=True,
            **kwargs,
        )

    def execute(self, context: Context) -> Any:
        self._raise_memory_for_retry(context)
        return super().execute(context)

    def build_pod_request_obj(self, context: Context | None = None, *, dry_run: bool = False) -> k8s.V1Pod:
        """KPO's pod, with limits = requests on the xcom sidecar too (unless the connection set its limits)."""
        pod = super().build_pod_request_obj(context, dry_run=dry_run)
        for container in pod.spec.containers:
            given = container.resources  # V1ResourceRequirements, or a dict from the connection extra
            limits = given.get("limits") if isinstance(given, dict) else getattr(given, "limits", None)
            if container.name == PodDefaults.SIDECAR_CONTAINER_NAME and not limits:
                container.resources = k8s.V1ResourceRequirements(
                    requests=dict(XCOM_SIDECAR_RESOURCES), limits=dict(XCOM_SIDECAR_RESOURCES)
                )
        return pod

    def _raise_memory_for_retry(self, context: Context) -> None:
        """On a retry after an OOM kill, ask for ``memory_retry_factor``x more memory per try, up to the cap."""
        tries = int(getattr(context["ti"], "try_number", 1) or 1)
        if self.memory_retry_factor <= 1 or tries <= 1:
            return
        base = parse_memory(self.candidate["memory"], "resources.memory")
        cap = parse_memory(self.memory_cap, "memory_cap") if self.memory_cap else base * 4
        raised = min(cap, int(base * self.memory_retry_factor ** (tries - 1)))
        quantity = str(raised)
        resources = self.container_resources
        if resources is not None:
            resources.limits = {**(resources.limits or {}), "memory": quantity}
            resources.requests = {**(resources.requests or {}), "memory": quantity}
        if isinstance(self.env_vars, dict):  # not rendered yet
            self.env_vars[MEMORY_ENV] = quantity
        for variable in self.env_vars if isinstance(self.env_vars, list) else []:
            if variable.name == MEMORY_ENV:  # the pod's own view of its limit follows the raised one
                variable.value = quantity
        self.log.info(
            "Try %d: memory raised from %s to %d bytes (cap %d).", tries, self.candidate["memory"], raised, cap
        )

    def cleanup(
        self,
        pod: k8s.V1Pod,
        remote_pod: k8s.V1Pod,
        xcom_result: dict[str, Any] | None = None,
        context: Context | None = None,
    ) -> None:
        """Name the reason (OOMKilled with its limit, Evicted) and the worker's exit code when the pod failed."""
        try:
            super().cleanup(pod, remote_pod, xcom_result=xcom_result, context=context)
        except AirflowException as error:
            reason = describe_failure(remote_pod)
            if reason.get("exit_code") == EXIT_BAD_INPUT:
                raise AirflowFailException(f"worker refused its input: {error}") from error
            if reason:
                self.log.error("Candidate %s failed: %s", self.candidate.get("label"), reason)
                raise AirflowException(f"{reason['message']} ({self.candidate.get('label')})") from error
            raise


def describe_failure(pod: k8s.V1Pod | None) -> dict[str, Any]:
    """Why the base container of a finished pod failed: OOMKilled (with the limit), evicted, or its exit code."""
    if pod is None or pod.status is None:
        return {}
    if (pod.status.reason or "") == "Evicted":
        return {"reason": "Evicted", "message": f"pod was evicted: {pod.status.message}"}
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


def _env_dict(value: Any) -> dict[str, str]:
    if not value:
        return {}
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    return {item.name: item.value for item in value}


@dataclass(frozen=True)
class KubernetesBackend:
    """Where and how evaluate pods run; one per DAG (image, namespace, connection, scheduling, store volume)."""

    image: str
    namespace: str = "default"
    kubernetes_conn_id: str = "kubernetes_default"
    config_file: str | None = None
    in_cluster: bool | None = None
    image_pull_policy: str | None = None
    service_account_name: str | None = None
    node_selector: dict[str, str] | None = None
    tolerations: tuple[k8s.V1Toleration, ...] = ()
    worker_command: tuple[str, ...] = ("python", "-m", "airflow_grid.worker")
    store_volume: StoreVolume | None = None
    host_mounts: tuple[str, ...] = ()
    deferrable: bool = False
    on_finish_action: str = "delete_pod"
    memory_retry_factor: float = 1.0
    memory_cap: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KubernetesBackend:
        """The ``kubernetes_*`` options of ``[airflow_grid]`` (read at parse time; no connection is read).

        Each falls back to its legacy ``AIRFLOW_GRID_K8S_*`` variable, looked up in ``environ`` (default
        ``os.environ``); see :mod:`airflow_grid.settings`. ``kubernetes_host_mounts`` (comma-separated paths
        mounted read-only at the same path) exists for single-node test clusters that run the host's virtualenv in
        a plain image; production uses the image.
        """

        def option(name: str) -> str | None:
            return settings.get(f"kubernetes_{name}", environ) or None

        store_root = option("store_path")
        store_volume = None
        if store_root:
            store_volume = StoreVolume(
                mount_path=store_root, claim_name=option("store_claim"), host_path=option("store_host_path")
            )
        command = option("worker_command")
        return cls(
            image=settings.get("kubernetes_image", environ),
            namespace=settings.get("kubernetes_namespace", environ),
            kubernetes_conn_id=settings.get("kubernetes_conn_id", environ),
            config_file=option("config_file"),
            image_pull_policy=option("image_pull_policy"),
            service_account_name=option("service_account"),
            worker_command=tuple(shlex.split(command)) if command else cls.worker_command,
            store_volume=store_volume,
            host_mounts=tuple(p for p in (option("host_mounts") or "").split(",") if p),
            deferrable=settings.flag("kubernetes_deferrable", environ),
            memory_retry_factor=settings.number("kubernetes_memory_retry_factor", float, environ),
            memory_cap=option("memory_cap"),
        )

    def operator_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`KubernetesEvaluateOperator` (``.partial(**kwargs)``)."""
        mounts = tuple(
            (
                k8s.V1Volume(name=f"host-{i}", host_path=k8s.V1HostPathVolumeSource(path=path, type="Directory")),
                k8s.V1VolumeMount(name=f"host-{i}", mount_path=path, read_only=True),
            )
            for i, path in enumerate(self.host_mounts)
        )
        kwargs: dict[str, Any] = {
            "image": self.image,
            "namespace": self.namespace,
            "kubernetes_conn_id": self.kubernetes_conn_id,
            "worker_command": self.worker_command,
            "store_volume": self.store_volume,
            "extra_volumes": mounts,
            "deferrable": self.deferrable,
            "on_finish_action": self.on_finish_action,
            "memory_retry_factor": self.memory_retry_factor,
            "memory_cap": self.memory_cap,
        }
        optional = {
            "config_file": self.config_file,
            "in_cluster": self.in_cluster,
            "image_pull_policy": self.image_pull_policy,
            "service_account_name": self.service_account_name,
            "node_selector": self.node_selector,
            "tolerations": list(self.tolerations) or None,
        }
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        return kwargs


VALIDATION_SCHEMA_VERSION = "1.25"  # the oldest kubernetes-validate ships; the fields used here exist since 1.19


def render_pod_manifests(items: Sequence[dict[str, Any]], backend: KubernetesBackend) -> list[dict[str, Any]]:
    """The pod manifests the DAG's evaluate_kubernetes task would create for these plan items (no cluster)."""
    from types import SimpleNamespace

    from kubernetes.client import ApiClient

    manifests = []
    for map_index, item in enumerate(items):
        operator = KubernetesEvaluateOperator(
            task_id="evaluate_kubernetes", candidate=item, **backend.operator_kwargs()
        )
        ti = SimpleNamespace(
            dag_id="grid_search", task_id="evaluate_kubernetes", map_index=map_index, try_number=1, run_id="render"
        )
        context: Any = {"ti": ti, "run_id": "render", "dag": SimpleNamespace(dag_id="grid_search")}
        pod = operator.build_pod_request_obj(context, dry_run=True)
        manifest: dict[str, Any] = ApiClient().sanitize_for_serialization(pod)
        manifest.setdefault("apiVersion", "v1")
        manifest.setdefault("kind", "Pod")
        manifests.append(manifest)
    return manifests


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
