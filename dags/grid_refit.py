"""Refit a study's winner on the full search data, score its holdout, register it and gate the champion.

Triggered by the grid-search DAGs with the study's MLflow parent run id, or by hand with that id.
"""

from airflow_grid.dag_factory import grid_refit_dag

dag = grid_refit_dag("grid_refit")
