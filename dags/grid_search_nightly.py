"""Nightly retuning of the digits model family.

Runs at 02:00 UTC on the spec in specs/. Scheduled and backfill runs tune on the data version of their logical
date; a manual trigger may override the grid, cv, scoring, resources or dataset version from the form.
"""

from datetime import datetime
from pathlib import Path

from airflow_grid.dag_factory import grid_search_dag
from airflow_grid.operators.kubernetes import KubernetesBackend

dag = grid_search_dag(
    "grid_search_nightly",
    Path(__file__).parent / "specs" / "digits_model_family.yaml",
    schedule="0 2 * * *",
    start_date=datetime(2026, 11, 1),
    catchup=False,  # backfills: airflow backfill create --dag-id grid_search_nightly --from-date ... --to-date ...
    kubernetes=KubernetesBackend.from_env(),  # backend: kubernetes runs candidates in pods (AIRFLOW_GRID_K8S_*)
    doc_md=__doc__,
)
