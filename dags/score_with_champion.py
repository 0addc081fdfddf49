"""Score a batch with the digits study's champion whenever the refit promotes a new one.

Scheduled on the study's champion asset (name airflow_grid_champion_digits-model-family, URI
mlflow-model://digits-model-family/champion), whose events the refit task emits on promotion with
extra.model_uri, version, holdout_score, dataset_version and parent_run_id. Loads models:/digits-model-family@champion
and writes predictions/<study>/<run_id>.csv to the result store.
"""

from datetime import datetime
from pathlib import Path
from typing import Any

from airflow.sdk import dag, task

from airflow_grid.operators.champion import champion_asset

SPEC = Path(__file__).parent / "specs" / "digits_model_family.yaml"
CHAMPION = champion_asset("digits-model-family")


@dag(schedule=[CHAMPION], start_date=datetime(2026, 11, 1), catchup=False, doc_md=__doc__, tags=["airflow-grid"])
def score_with_champion() -> None:
    @task(multiple_outputs=False)
    def score(run_id: str | None = None, triggering_asset_events: Any = None) -> dict[str, Any]:
        from airflow_grid.scoring import score_batch

        events = list((triggering_asset_events or {}).get(CHAMPION, []))
        return score_batch(SPEC, run_id=str(run_id), announced=events[-1].extra if events else None)

    score()


score_with_champion()
