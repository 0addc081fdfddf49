"""airflow_grid: resource-safe scikit-learn grid search as an Apache Airflow 3 provider.

This module imports nothing heavy: Airflow calls :func:`get_provider_info` inside ``import airflow``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def get_provider_info() -> dict[str, Any]:
    """Provider metadata for Airflow's provider registry (validated against its schema in the tests)."""
    return {
        "package-name": "airflow-grid",
        "name": "Airflow Grid",
        "description": "Resource-safe distributed scikit-learn grid search: mapped tasks, pools, "
        "Kubernetes pods with limits, MLflow tracking.",
        "versions": [__version__],
        "extra-links": [
            "airflow_grid.tracking.links.MlflowRunLink",
            "airflow_grid.tracking.links.MlflowModelLink",
            "airflow_grid.tracking.links.MlflowCandidateRunLink",
        ],
        "config": {SECTION: {"description": _SECTION_DOC, "options": _options()}},
    }


SECTION = "airflow_grid"
_SECTION_DOC = (
    "Deployment settings of airflow-grid. Each option also reads its legacy AIRFLOW_GRID_* environment variable "
    "when this section leaves it at its default, so existing deployments keep working."
)


def _option(kind: str, default: str, example: str, description: str) -> dict[str, Any]:
    return {"description": description, "version_added": "0.2.0", "type": kind, "example": example, "default": default}


def _options() -> dict[str, dict[str, Any]]:
    """The ``[airflow_grid]`` options; :mod:`airflow_grid.settings` reads them (and the legacy variables)."""
    k8s = "Kubernetes backend (KubernetesBackend.from_env, read when a DAG file is parsed): "
    return {
        "store": _option("string", "{AIRFLOW_HOME}/airflow_grid", "s3://bucket/airflow-grid",
                         "Result store root (a directory or any fsspec URL): plans, data snapshots and candidate "
                         "results. Pods must reach it. Legacy: AIRFLOW_GRID_STORE."),
        "allowed_targets": _option("string", "", "xgboost.,lightgbm.",
                                   "Extra _target_ prefixes a spec may build, comma-separated, besides sklearn. and "
                                   "scipy.stats. (classes only). Legacy: AIRFLOW_GRID_ALLOWED_TARGETS."),
        "allowed_callables": _option("string", "", "mycompany.data.load_churn",
                                     "Extra functions a spec may call, comma-separated dotted names (only loaders "
                                     "that read no path a spec chooses). Legacy: AIRFLOW_GRID_ALLOWED_CALLABLES."),
        "allow_file_params": _option("boolean", "False", "True",
                                     "Allow parameters that make a fit touch files (Pipeline(memory=...)). "
                                     "Legacy: AIRFLOW_GRID_ALLOW_FILE_PARAMS."),
        "default_pool": _option("string", "grid_fits", "tuning",
                                "Pool of the evaluate tasks when grid_search_dag() is given none."),
        "max_child_runs": _option("integer", "100", "20",
                                  "MLflow child runs logged per study (the best candidates by rank)."),
        "mlflow_ui_url": _option("string", "", "https://mlflow.example.com",
                                 "Base URL of the MLflow UI for task links. Empty: the tracking URI when it is "
                                 "http(s), else http://127.0.0.1:5000, where `mlflow ui` serves by default."),
        "kubernetes_image": _option("string", "airflow-grid-worker:0.1.0", "registry.example.com/grid-worker:0.2.0",
                                    k8s + "worker image. Legacy: AIRFLOW_GRID_K8S_IMAGE."),
        "kubernetes_namespace": _option("string", "default", "tuning",
                                        k8s + "namespace of the pods. Legacy: AIRFLOW_GRID_K8S_NAMESPACE."),
        "kubernetes_conn_id": _option("string", "kubernetes_default", "k8s_tuning",
                                      k8s + "Airflow connection to the cluster. Legacy: AIRFLOW_GRID_K8S_CONN_ID."),
        "kubernetes_config_file": _option("string", "", "/opt/airflow/kubeconfig",
                                          k8s + "kubeconfig path (empty: the connection's). "
                                          "Legacy: AIRFLOW_GRID_K8S_CONFIG_FILE."),
        "kubernetes_image_pull_policy": _option("string", "", "IfNotPresent",
                                                k8s + "imagePullPolicy (empty: Kubernetes' default). "
                                                "Legacy: AIRFLOW_GRID_K8S_IMAGE_PULL_POLICY."),
        "kubernetes_service_account": _option("string", "", "grid-worker",
                                              k8s + "service account of the pods. "
                                              "Legacy: AIRFLOW_GRID_K8S_SERVICE_ACCOUNT."),
        "kubernetes_worker_command": _option("string", "", "/venv/bin/python -m airflow_grid.worker",
                                             k8s + "worker command, shell-split (empty: python -m "
                                             "airflow_grid.worker). Legacy: AIRFLOW_GRID_K8S_WORKER_COMMAND."),
        "kubernetes_store_path": _option("string", "", "/mnt/grid",
                                         k8s + "mount path of the store volume in pods (the same path as store). "
                                         "Legacy: AIRFLOW_GRID_K8S_STORE_PATH."),
        "kubernetes_store_claim": _option("string", "", "grid-store",
                                          k8s + "ReadWriteMany PVC mounted at kubernetes_store_path. "
                                          "Legacy: AIRFLOW_GRID_K8S_STORE_CLAIM."),
        "kubernetes_store_host_path": _option("string", "", "/srv/grid-store",
                                              k8s + "hostPath mounted at kubernetes_store_path instead (single-node "
                                              "test clusters). Legacy: AIRFLOW_GRID_K8S_STORE_HOST_PATH."),
        "kubernetes_host_mounts": _option("string", "", "/opt/venv,/work/checkout",
                                          k8s + "host paths mounted read-only at the same path, comma-separated "
                                          "(test clusters only). Legacy: AIRFLOW_GRID_K8S_HOST_MOUNTS."),
        "kubernetes_deferrable": _option("boolean", "False", "True",
                                         k8s + "run pods in deferrable mode (pool with --include-deferred). "
                                         "Legacy: AIRFLOW_GRID_K8S_DEFERRABLE."),
        "kubernetes_memory_retry_factor": _option("float", "1", "2",
                                                  k8s + "each retry after OOMKilled asks for this factor more "
                                                  "memory. Legacy: AIRFLOW_GRID_K8S_MEMORY_RETRY_FACTOR."),
        "kubernetes_memory_cap": _option("string", "", "16Gi",
                                         k8s + "upper bound of that raised memory. "
                                         "Legacy: AIRFLOW_GRID_K8S_MEMORY_CAP."),
    }  # fmt: skip
