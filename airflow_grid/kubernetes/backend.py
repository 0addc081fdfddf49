"""Where and how evaluate pods run: the deployment's settings, apart from the operator that starts the pods.

A DAG file builds one :class:`KubernetesBackend` at parse time (usually :meth:`KubernetesBackend.from_env`, which
reads ``[airflow_grid] kubernetes_*`` through :mod:`airflow_grid.settings`); the DAG factory passes
:meth:`KubernetesBackend.operator_kwargs` to the evaluate operator's ``.partial``. No connection is read here.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes.client import models as k8s

from airflow_grid import settings
from airflow_grid.kubernetes.pods import WORKER_COMMAND, StoreVolume


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
    worker_command: tuple[str, ...] = WORKER_COMMAND
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
        """Keyword arguments for the evaluate operator (``KubernetesEvaluateOperator.partial(**kwargs)``)."""
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
