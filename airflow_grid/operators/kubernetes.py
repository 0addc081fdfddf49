"""Evaluate operator, Kubernetes backend: one mapped item's candidates in a hardened pod with limits.

The subclass only sets what is ours - the worker's command and arguments, requests = limits from the spec (so the
pod gets Guaranteed QoS), thread caps and n_jobs derived from the CPU limit, identifying labels, the xcom
sidecar, a hardened security context and the store volume. Pod lifecycle stays KubernetesPodOperator's.

What the pod holds is computed by the pure helpers in :mod:`airflow_grid.kubernetes.pods`, and the deployment's
settings are :class:`airflow_grid.kubernetes.backend.KubernetesBackend`; this module wires them into KPO (adding
what needs an operator: the retry's memory raise, the failure mapping, rendering). The names callers imported from
here before that split are re-exported (``__all__``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.utils.xcom_sidecar import PodDefaults
from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from kubernetes.client import models as k8s

from airflow_grid.kubernetes.backend import KubernetesBackend
from airflow_grid.kubernetes.pods import (
    SCRATCH,
    VALIDATION_SCHEMA_VERSION,
    WORKER_COMMAND,
    WORKER_UID,
    XCOM_SIDECAR_RESOURCES,
    StoreVolume,
    candidate_annotations,
    candidate_arguments,
    candidate_env,
    candidate_labels,
    candidate_resources,
    container_security_context,
    describe_failure,
    env_dict,
    label_value,
    limit_sidecar,
    pod_security_context,
    pod_volumes,
    retry_memory,
    validate_manifest,
)
from airflow_grid.launch import MEMORY_ENV
from airflow_grid.timeouts import item_deadline
from airflow_grid.tracking.links import MlflowCandidateRunLink
from airflow_grid.worker import EXIT_BAD_INPUT

__all__ = [  # the names callers imported from here before the helpers moved to airflow_grid.kubernetes
    "SCRATCH",
    "VALIDATION_SCHEMA_VERSION",
    "WORKER_UID",
    "XCOM_SIDECAR_RESOURCES",
    "KubernetesBackend",
    "KubernetesEvaluateOperator",
    "StoreVolume",
    "container_security_context",
    "describe_failure",
    "label_value",
    "pod_security_context",
    "render_pod_manifests",
    "validate_manifest",
]


class KubernetesEvaluateOperator(KubernetesPodOperator):
    """Evaluate the candidates of one mapped item in a pod; the worker's result comes back through the sidecar.

    ``candidate`` is a plan item (``plan_uri``, ``indices``, ``label``, ``cpu``, ``memory``). The pod needs no
    Airflow or MLflow credentials: it reads the plan from the store and writes its result to the store and to
    ``/airflow/xcom/return.json``. An OOMKilled container is reported with its limit; with
    ``memory_retry_factor`` > 1 each retry asks for that much more memory, up to ``memory_cap``.

    With ``resources.timeout`` (item ``timeout``) the pod gets ``active_deadline_seconds`` =
    :func:`airflow_grid.timeouts.task_deadline` of the item (the local operator's deadline, rounded up): the
    kubelet ends a pod that outlives it and the task fails naming the deadline (retried by Airflow). It is set on
    the pod rather than as ``execution_timeout`` because it holds in deferrable mode too (the task runner applies no
    timeout while a task is deferred) and because it counts from the pod's start, not from scheduling and image
    pulls, which KPO's ``startup_timeout_seconds`` already bounds.
    """

    template_fields: Sequence[str] = (*KubernetesPodOperator.template_fields, "candidate")
    operator_extra_links = (MlflowCandidateRunLink(),)  # written by select once the candidate's child run exists

    def __init__(
        self,
        *,
        candidate: dict[str, Any],
        worker_command: Sequence[str] = WORKER_COMMAND,
        store_volume: StoreVolume | None = None,
        extra_volumes: Sequence[tuple[k8s.V1Volume, k8s.V1VolumeMount]] = (),
        memory_retry_factor: float = 1.0,
        memory_cap: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.candidate = candidate
        self.memory_retry_factor = memory_retry_factor
        self.memory_cap = memory_cap
        env = candidate_env(candidate)  # first: a CPU or memory quantity that does not parse fails here
        arguments = candidate_arguments(candidate)
        volumes, mounts = pod_volumes(store_volume, extra_volumes)
        labels = {**candidate_labels(candidate), **(kwargs.pop("labels", None) or {})}
        kwargs.setdefault("name", "airflow-grid-evaluate")
        kwargs.setdefault("on_finish_action", "delete_pod")
        kwargs.setdefault("get_logs", True)
        deadline = item_deadline(candidate)
        if deadline is not None:  # resources.timeout: the kubelet ends a pod that outlives it (DeadlineExceeded)
            kwargs.setdefault("active_deadline_seconds", math.ceil(deadline))
        super().__init__(
            cmds=list(worker_command),
            arguments=arguments,
            container_resources=candidate_resources(candidate),
            env_vars={**env, **env_dict(kwargs.pop("env_vars", None))},
            labels=labels,
            annotations=candidate_annotations(candidate),
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
        return limit_sidecar(pod, PodDefaults.SIDECAR_CONTAINER_NAME)

    def _raise_memory_for_retry(self, context: Context) -> None:
        """On a retry after an OOM kill, ask for ``memory_retry_factor``x more memory per try, up to the cap."""
        tries = int(getattr(context["ti"], "try_number", 1) or 1)
        raised_and_cap = retry_memory(self.candidate["memory"], self.memory_retry_factor, self.memory_cap, tries)
        if raised_and_cap is None:
            return
        raised, cap = raised_and_cap
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
