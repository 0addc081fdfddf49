"""MLflow tracking, one module per concern (as MLflow keeps autolog glue apart from its logging helpers).

- :mod:`~airflow_grid.tracking.runs`: client, tracking URI, experiment, parent/child runs, :func:`log_study`
- :mod:`~airflow_grid.tracking.plots`: the PNG plots logged with a study
- :mod:`~airflow_grid.tracking.registry`: :func:`log_refit` and the :func:`champion_gate`
- :mod:`~airflow_grid.tracking.links`: Airflow task links to MLflow (imports Airflow, so not re-exported here)

The names callers used when this was one module are re-exported, so ``tracking.log_study`` etc. keep working.
Nothing here imports MLflow or matplotlib until a function needs them.
"""

from __future__ import annotations

from airflow_grid.tracking.plots import plots
from airflow_grid.tracking.registry import champion_gate, load_champion, log_refit
from airflow_grid.tracking.runs import (
    DEFAULT_MAX_CHILD_RUNS,
    TAG_BEST_CANDIDATE,
    TAG_BEST_INDEX,
    TAG_BEST_ROUND,
    TAG_CANDIDATE,
    TAG_DAG_ID,
    TAG_DATASET_VERSION,
    TAG_PLAN_ID,
    TAG_PLAN_URI,
    TAG_REFIT_METRIC,
    TAG_ROLE,
    TAG_ROUNDS,
    TAG_RUN_ID,
    TAG_STRATEGY,
    TAG_UNSEEDED,
    airflow_home,
    candidate_runs,
    client,
    cv_results_csv,
    experiment_id,
    find_or_create_parent,
    log_study,
    param_text,
    search_tags,
    tracking_uri,
)

__all__ = [
    "DEFAULT_MAX_CHILD_RUNS",
    "TAG_BEST_CANDIDATE",
    "TAG_BEST_INDEX",
    "TAG_BEST_ROUND",
    "TAG_CANDIDATE",
    "TAG_DAG_ID",
    "TAG_DATASET_VERSION",
    "TAG_PLAN_ID",
    "TAG_PLAN_URI",
    "TAG_REFIT_METRIC",
    "TAG_ROLE",
    "TAG_ROUNDS",
    "TAG_RUN_ID",
    "TAG_STRATEGY",
    "TAG_UNSEEDED",
    "airflow_home",
    "candidate_runs",
    "champion_gate",
    "client",
    "cv_results_csv",
    "experiment_id",
    "find_or_create_parent",
    "load_champion",
    "log_refit",
    "log_study",
    "param_text",
    "plots",
    "search_tags",
    "tracking_uri",
]
