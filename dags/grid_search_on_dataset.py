"""Retune the digits model family whenever a new version of its dataset is published.

A producer (another DAG's outlet, or POST /api/v2/assets/events) sets extra.dataset_version on the asset
event; the plan task tunes on that version and records it on the MLflow run.
"""

from pathlib import Path

from airflow_grid.dag_factory import dataset_asset, grid_search_dag
from airflow_grid.operators.kubernetes import KubernetesBackend

DIGITS = dataset_asset("digits_dataset", "file:///datasets/digits")

dag = grid_search_dag(
    "grid_search_on_dataset",
    Path(__file__).parent / "specs" / "digits_model_family.yaml",
    schedule=[DIGITS],
    kubernetes=KubernetesBackend.from_env(),  # backend: kubernetes runs candidates in pods (AIRFLOW_GRID_K8S_*)
    doc_md=__doc__,
)
