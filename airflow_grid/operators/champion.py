"""The champion asset: one Airflow asset per study, with an event each time the refit promotes a new champion.

    name  airflow_grid_champion_<study>          (study = spec name = MLflow experiment = registered model)
    uri   mlflow-model://<study>/champion
    extra model_uri (models:/<study>/<version>), model_name, version, holdout_score, holdout_metric,
          dataset_version, parent_run_id

The study is known only at run time, so the refit task declares the alias :data:`CHAMPION_ALIAS` as its outlet
and adds the study's asset to it when it runs (Airflow's documented way to emit events for assets decided at run
time; Airflow creates the asset the first time). Downstream DAGs schedule on :func:`champion_asset` of one study
(or on the alias, for every study). A challenger that loses the gate emits nothing.
"""

from __future__ import annotations

import math
from typing import Any

from airflow.sdk import Asset, AssetAlias

CHAMPION_ALIAS = "airflow_grid_champion"


def champion_alias() -> AssetAlias:
    return AssetAlias(name=CHAMPION_ALIAS)


def champion_asset(study: str) -> Asset:
    """The asset whose events announce a new champion of ``study``."""
    return Asset(name=f"airflow_grid_champion_{study}", uri=f"mlflow-model://{study}/champion")


def champion_extra(registered: dict[str, Any], *, holdout_metric: str, parent_run_id: str) -> dict[str, Any]:
    """The event's ``extra`` (JSON-ready: a non-finite holdout score becomes null)."""
    name, version = str(registered["model_name"]), str(registered["version"])
    score = registered.get("holdout_score")
    return {
        "model_uri": f"models:/{name}/{version}",
        "model_name": name,
        "version": version,
        "holdout_score": float(score) if score is not None and math.isfinite(score) else None,
        "holdout_metric": holdout_metric,
        "dataset_version": registered.get("dataset_version"),
        "parent_run_id": parent_run_id,
    }


def emit_if_promoted(context: Any, registered: dict[str, Any], **extra: Any) -> dict[str, Any] | None:
    """Add an event for the study's champion asset to the alias when the gate promoted; return its extra."""
    if not registered.get("promoted"):
        return None
    event = champion_extra(registered, **extra)
    context["outlet_events"][champion_alias()].add(champion_asset(event["model_name"]), extra=event)
    return event
