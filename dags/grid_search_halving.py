"""Successive halving on digits: each round is a wave of mapped evaluate tasks.

``plan`` decides the rounds (3 for this spec: 12, 4 and 2 candidates on 159, 477 and 1,431 rows);
``round_<r>`` keeps the best third of the previous round exactly as HalvingGridSearchCV does, and
``evaluate_round_<r>`` evaluates them on more data. The DAG has 4 waves: rounds a search does not need are
skipped. Triggered by hand; the form also takes ``search`` (e.g. halving_random) and the search space.
"""

from pathlib import Path

from airflow_grid.dag_factory import grid_search_dag
from airflow_grid.operators.kubernetes import KubernetesBackend

dag = grid_search_dag(
    "grid_search_halving",
    Path(__file__).parent / "specs" / "digits_halving.yaml",
    max_rounds=4,
    kubernetes=KubernetesBackend.from_env(),  # backend: kubernetes runs each round's candidates in pods
    doc_md=__doc__,
)
