"""Weekly retention of the grid-search result store: `airflow-grid gc` as a task.

Keeps the 3 newest plans per study with their results, results younger than 30 days and every plan a running study
touched in the last 24 hours; deletes the rest and logs what it freed. The store is [airflow_grid] store (or
$AIRFLOW_GRID_STORE, else $AIRFLOW_HOME/airflow_grid); the same pass by hand:
airflow-grid gc --keep-plans 3 --max-age 30d [--dry-run].
"""

from datetime import datetime

from airflow.sdk import dag, task


@dag(schedule="@weekly", start_date=datetime(2026, 11, 1), catchup=False, doc_md=__doc__, tags=["airflow-grid"])
def grid_store_gc() -> None:
    @task
    def gc() -> int:
        from airflow_grid import retention, settings
        from airflow_grid.store import Store

        report = retention.gc(Store(settings.store()), keep_plans=3, max_age="30d", in_use_window="24h")
        print(retention.render(report))
        return report.freed_bytes

    gc()


grid_store_gc()
