"""MLflow model registry: log and register a refitted winner, and the champion gate that moves the alias."""

from __future__ import annotations

import logging
from typing import Any

from airflow_grid.tracking.runs import (
    TAG_DAG_ID,
    TAG_DATASET_VERSION,
    TAG_ROLE,
    TAG_RUN_ID,
    _quote,
    client,
    tracking_uri,
)


def log_refit(
    *,
    parent_run_id: str,
    dag_id: str,
    run_id: str,
    model: Any,
    input_example: Any,
    holdout_score: float | None,
    holdout_metric: str,
    tags: dict[str, str],
) -> dict[str, Any]:
    """Log a refitted winner under its study's parent run, register it, and run the champion gate.

    Idempotent per (dag_id, run_id): a retry reuses the refit run and its registered version.
    """
    import mlflow
    from mlflow.models import infer_signature

    mlflow_client = client()
    parent = mlflow_client.get_run(parent_run_id)
    study = mlflow_client.get_experiment(parent.info.experiment_id).name
    existing = mlflow_client.search_runs(
        [parent.info.experiment_id],
        filter_string=(
            f"tags.`{TAG_DAG_ID}` = '{_quote(dag_id)}' and tags.`{TAG_RUN_ID}` = '{_quote(run_id)}' "
            f"and tags.`{TAG_ROLE}` = 'refit'"
        ),
        max_results=1,
    )
    if existing:
        refit_run_id = existing[0].info.run_id
    else:
        refit_run_id = mlflow_client.create_run(
            parent.info.experiment_id,
            run_name=f"refit/{run_id}",
            tags={
                TAG_DAG_ID: dag_id,
                TAG_RUN_ID: run_id,
                TAG_ROLE: "refit",
                "mlflow.parentRunId": parent_run_id,
                **{
                    k: v
                    for k, v in parent.data.tags.items()
                    if k.startswith("airflow_grid.") and k not in (TAG_DAG_ID, TAG_RUN_ID, TAG_ROLE)
                },
                **tags,
            },
        ).info.run_id
    versions = mlflow_client.search_model_versions(f"run_id = '{refit_run_id}'")
    if versions:
        version = str(versions[0].version)
    else:
        mlflow.set_tracking_uri(tracking_uri())
        mlflow.set_registry_uri(tracking_uri())
        with mlflow.start_run(run_id=refit_run_id):
            if holdout_score is not None:
                mlflow.log_metric(f"holdout_{holdout_metric}", holdout_score)
            signature = infer_signature(input_example, model.predict(input_example))
            info = mlflow.sklearn.log_model(
                model,
                name="model",
                signature=signature,
                input_example=input_example,
                registered_model_name=study,
                serialization_format="cloudpickle",
            )
        version = str(info.registered_model_version)
        if holdout_score is not None:
            mlflow_client.set_model_version_tag(study, version, "holdout_score", repr(float(holdout_score)))
        mlflow_client.set_model_version_tag(study, version, "parent_run_id", parent_run_id)
    dataset_version = parent.data.tags.get(TAG_DATASET_VERSION)
    if dataset_version:  # what the holdout score was measured on: the gate compares like with like
        mlflow_client.set_model_version_tag(study, version, "dataset_version", dataset_version)
    mlflow_client.set_terminated(refit_run_id, status="FINISHED")
    gate = champion_gate(mlflow_client, study, version, holdout_score, dataset_version=dataset_version)
    return {"refit_run_id": refit_run_id, **gate}


def champion_gate(
    mlflow_client: Any, study: str, version: str, holdout_score: float | None, *, dataset_version: str | None = None
) -> dict[str, Any]:
    """Alias ``version`` as ``challenger``; move ``champion`` to it only if it scores at least the champion.

    Scores are the ``holdout_score`` tags of the versions. A version without a score never displaces a champion.
    Holdouts of different dataset versions (``dataset_version`` tags) are different samples, so their scores are
    not directly comparable; the gate still decides (challenger >= champion, so a new dataset can take over) but
    says so: ``compared_across_versions`` in the result, a warning in the log, a ``gate_note`` tag on the version.
    """
    mlflow_client.set_registered_model_alias(study, "challenger", version)
    try:
        champion = mlflow_client.get_model_version_by_alias(study, "champion")
    except Exception:  # MlflowException: no such alias yet
        champion = None
    champion_score = None if champion is None else champion.tags.get("holdout_score")
    promote = champion is None or (
        holdout_score is not None and (champion_score is None or float(holdout_score) >= float(champion_score))
    )
    champion_dataset = None if champion is None else champion.tags.get("dataset_version")
    across = champion is not None and str(champion.version) != version and champion_dataset != dataset_version
    if across:
        note = (
            f"holdout scores from dataset versions {champion_dataset or 'unknown'} (champion v{champion.version}) "
            f"and {dataset_version or 'unknown'} (challenger v{version}) are not directly comparable"
        )
        mlflow_client.set_model_version_tag(study, version, "gate_note", note)
        logging.getLogger(__name__).warning("Champion gate for %s: %s.", study, note)
    if promote:
        mlflow_client.set_registered_model_alias(study, "champion", version)
    return {
        "model_name": study,
        "version": version,
        "promoted": promote,
        "champion_version": version if promote else str(champion.version),
        "previous_champion_score": None if champion_score is None else float(champion_score),
        "compared_across_versions": across,
        "dataset_version": dataset_version,
        "champion_dataset_version": champion_dataset,
    }


def load_champion(study: str) -> tuple[Any, str]:
    """The sklearn model ``models:/<study>@champion`` and its version.

    The alias is resolved once and that version is loaded, so what is returned is one version, named, even if a
    refit moves the alias meanwhile.
    """
    import mlflow

    version = str(client().get_model_version_by_alias(study, "champion").version)
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_registry_uri(tracking_uri())
    return mlflow.sklearn.load_model(f"models:/{study}/{version}"), version
