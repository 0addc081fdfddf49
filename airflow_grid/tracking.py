"""MLflow: one parent run per study run (found again by tags), child runs per candidate, plots, model registry.

The layout follows mlflow's own sklearn autolog for parameter searches (``best_<param>`` params, ``best_cv_score``,
``cv_results.csv``) so users recognise it. Logging is the calling task's job: a logging failure raises, it is not
swallowed, and Airflow retries the task - which finds the same parent run by its tags instead of making another.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from airflow_grid.spec import TARGET_KEY, is_object_spec

TAG_DAG_ID = "airflow_grid.dag_id"
TAG_RUN_ID = "airflow_grid.run_id"
TAG_ROLE = "airflow_grid.role"
TAG_CANDIDATE = "airflow_grid.candidate_index"
TAG_DATASET_VERSION = "airflow_grid.dataset_version"
TAG_PLAN_ID = "airflow_grid.plan_id"
TAG_BEST_INDEX = "airflow_grid.best_index"
TAG_REFIT_METRIC = "airflow_grid.refit_metric"
TAG_PLAN_URI = "airflow_grid.plan_uri"
DEFAULT_MAX_CHILD_RUNS = 100


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else a sqlite store under the Airflow home (needs no server and no flag)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{airflow_home() / 'mlflow.db'}"


def airflow_home() -> Path:
    return Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")


def client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())


def experiment_id(mlflow_client: Any, name: str) -> str:
    """The study's experiment, created with an artifact root under the Airflow home when it is new."""
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    from mlflow.exceptions import MlflowException

    location = None  # a tracking server decides where artifacts go
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):  # otherwise MLflow would use ./mlruns under whatever directory the task runs in
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlflow-artifacts" / name).as_uri()
    try:
        return str(mlflow_client.create_experiment(name, artifact_location=location))
    except MlflowException as error:
        # A create whose response was lost (the server went away, MLflow's HTTP retry resent it): it exists now.
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return str(mlflow_client.get_experiment_by_name(name).experiment_id)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def find_or_create_parent(mlflow_client: Any, study: str, dag_id: str, run_id: str, tags: dict[str, str]) -> str:
    """The parent run of (dag_id, run_id): the existing one on a retry or rerun, a new one the first time."""
    exp = experiment_id(mlflow_client, study)
    existing = mlflow_client.search_runs(
        [exp],
        filter_string=(
            f"tags.`{TAG_DAG_ID}` = '{_quote(dag_id)}' and tags.`{TAG_RUN_ID}` = '{_quote(run_id)}' "
            f"and tags.`{TAG_ROLE}` = 'parent'"
        ),
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    if existing:
        return str(existing[0].info.run_id)
    run = mlflow_client.create_run(
        exp,
        run_name=f"{dag_id}/{run_id}",
        tags={TAG_DAG_ID: dag_id, TAG_RUN_ID: run_id, TAG_ROLE: "parent", **tags},
    )
    return str(run.info.run_id)


def param_text(value: Any) -> str:
    """How a grid value reads in MLflow: object specs by class name (with their arguments), else JSON."""
    if is_object_spec(value):
        arguments = {k: v for k, v in value.items() if k != TARGET_KEY}
        name = str(value[TARGET_KEY]).rsplit(".", 1)[-1]
        return f"{name}({json.dumps(arguments, sort_keys=True)[1:-1]})" if arguments else name
    return value if isinstance(value, str) else json.dumps(value)


def log_study(
    *,
    study: str,
    dag_id: str,
    run_id: str,
    cv_results: dict[str, list[Any]],
    best: dict[str, Any],
    spec_yaml: str,
    tags: dict[str, str],
    max_child_runs: int = DEFAULT_MAX_CHILD_RUNS,
) -> str:
    """Log a finished search under its parent run (idempotent per dag_id/run_id) and return the parent run id."""
    from mlflow.entities import Metric, Param, RunTag

    mlflow_client = client()
    parent = find_or_create_parent(mlflow_client, study, dag_id, run_id, tags)
    now = _now_ms()
    refit_metric = best["refit_metric"]
    params = [Param(f"best_{name}", param_text(value)[:6000]) for name, value in best["best_params"].items()]
    metrics = [Metric("best_cv_score", float(best["best_score"]), now, 0)]
    for key, column in cv_results.items():
        if key.startswith("mean_test_"):
            metrics.append(Metric(f"best_{key}", _number(column[best["best_index"]]), now, 0))
    run_tags = [
        RunTag(TAG_REFIT_METRIC, refit_metric),
        RunTag(TAG_BEST_INDEX, str(best["best_index"])),
        RunTag("airflow_grid.n_candidates", str(len(cv_results["params"]))),
    ]
    _log_missing(mlflow_client, parent, metrics=metrics, params=params, tags=run_tags)
    with tempfile.TemporaryDirectory(prefix="airflow-grid-mlflow-") as scratch:
        folder = Path(scratch)
        (folder / "cv_results.json").write_text(json.dumps(cv_results, indent=1))
        (folder / "cv_results.csv").write_text(cv_results_csv(cv_results))
        (folder / "spec.yaml").write_text(spec_yaml)
        (folder / "best.json").write_text(json.dumps(best, indent=1))
        for name, png in plots(cv_results, refit_metric).items():
            (folder / name).write_bytes(png)
        mlflow_client.log_artifacts(parent, str(folder))
    _log_children(mlflow_client, parent, study, cv_results, max_child_runs)
    mlflow_client.set_terminated(parent, status="FINISHED")
    return parent


def _log_children(mlflow_client: Any, parent: str, study: str, cv_results: dict[str, list[Any]], cap: int) -> None:
    """One nested run per candidate (the best ``cap`` by rank), resumable after a failed try.

    A candidate whose run a previous try finished is skipped; one whose run it created but did not finish (the
    server went away in between) is completed in place, so a retry never duplicates a child run.
    """
    from mlflow.entities import Metric, Param

    exp = experiment_id(mlflow_client, study)
    logged = {
        run.data.tags.get(TAG_CANDIDATE): run
        for run in _search_all(
            mlflow_client, exp, f"tags.`mlflow.parentRunId` = '{parent}' and tags.`{TAG_ROLE}` = 'candidate'"
        )
    }
    rank_key = next(k for k in cv_results if k.startswith("rank_test_"))
    order = sorted(range(len(cv_results["params"])), key=lambda i: (cv_results[rank_key][i], i))[:cap]
    now = _now_ms()
    for index in order:
        run = logged.get(str(index))
        if run is not None and run.info.status == "FINISHED":
            continue
        if run is None:
            run = mlflow_client.create_run(
                exp,
                run_name=f"candidate-{index}",
                tags={"mlflow.parentRunId": parent, TAG_CANDIDATE: str(index), TAG_ROLE: "candidate"},
            )
        params = [Param(name, param_text(value)[:6000]) for name, value in cv_results["params"][index].items()]
        metrics = [
            Metric(key, _number(column[index]), now, 0)
            for key, column in cv_results.items()
            if key.startswith(("mean_", "std_", "rank_"))
        ]
        _log_missing(mlflow_client, run.info.run_id, metrics=metrics, params=params)
        mlflow_client.set_terminated(run.info.run_id, status="FINISHED")


def _search_all(mlflow_client: Any, experiment: str, filter_string: str) -> list[Any]:
    """Every run matching the filter, across result pages (a grid can have more children than one page holds)."""
    runs: list[Any] = []
    token = None
    while True:
        page = mlflow_client.search_runs([experiment], filter_string=filter_string, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _log_missing(
    mlflow_client: Any, run_id: str, *, metrics: list[Any], params: list[Any], tags: list[Any] | None = None
) -> None:
    """Log what the run does not hold yet: a retry re-sends neither a param (immutable in MLflow) nor a metric
    whose latest value is already the same (it would add a duplicate point to the metric's history)."""
    data = mlflow_client.get_run(run_id).data
    metrics = [m for m in metrics if not _same(data.metrics.get(m.key), m.value)]
    params = [p for p in params if p.key not in data.params]
    if metrics or params or tags:
        mlflow_client.log_batch(run_id, metrics=metrics, params=params, tags=tags or [])


def _same(logged: float | None, value: float) -> bool:
    return logged is not None and (logged == value or (math.isnan(logged) and math.isnan(value)))


def cv_results_csv(cv_results: dict[str, list[Any]]) -> str:
    import pandas as pd

    frame = pd.DataFrame(
        {k: [json.dumps(v) if isinstance(v, dict) else v for v in col] for k, col in cv_results.items()}
    )
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    return buffer.getvalue()


def plots(cv_results: dict[str, list[Any]], refit_metric: str) -> dict[str, bytes]:
    """PNG plots: mean test score per parameter value (std bars) per estimator family, and a ranked bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean_key, std_key = f"mean_test_{refit_metric}", f"std_test_{refit_metric}"
    means, stds, params = cv_results[mean_key], cv_results[std_key], cv_results["params"]
    families = [_family(p) for p in params]
    panels: list[tuple[str, str, list[tuple[str, float, float]]]] = []
    for family in dict.fromkeys(families):
        members = [i for i, f in enumerate(families) if f == family]
        names = sorted({n for i in members for n, v in params[i].items() if not is_object_spec(v)})
        for name in names:
            best_per_value: dict[str, tuple[float, float]] = {}
            for i in members:
                if name not in params[i] or not math.isfinite(means[i]):
                    continue
                value = param_text(params[i][name])
                if value not in best_per_value or means[i] > best_per_value[value][0]:
                    best_per_value[value] = (means[i], stds[i])
            if best_per_value:
                panels.append((family, name, [(v, m, s) for v, (m, s) in best_per_value.items()]))
    images: dict[str, bytes] = {}
    if panels:
        columns = min(3, len(panels))
        rows = math.ceil(len(panels) / columns)
        figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
        for axis, (family, name, points) in zip(axes.flat, panels, strict=False):
            axis.errorbar(
                range(len(points)), [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=4
            )
            axis.set_xticks(range(len(points)), [p[0] for p in points], rotation=30, ha="right")
            axis.set_title(f"{family}: {name.rsplit('__', 1)[-1]}", fontsize=10)
            axis.set_ylabel(f"mean {refit_metric} (best per value)", fontsize=8)
            axis.grid(alpha=0.3)
        for axis in list(axes.flat)[len(panels) :]:
            axis.set_visible(False)
        figure.suptitle("Mean CV score per parameter value (error bars: std over folds)")
        figure.tight_layout()
        images["score_by_param.png"] = _png(figure, plt)
    order = sorted(range(len(params)), key=lambda i: (cv_results[f"rank_test_{refit_metric}"][i], i))
    figure, axis = plt.subplots(figsize=(8, max(2.5, 0.28 * len(order) + 1)))
    labels = [f"#{cv_results[f'rank_test_{refit_metric}'][i]} {_label(params[i])}" for i in order]
    values = [means[i] if math.isfinite(means[i]) else 0.0 for i in order]
    axis.barh(range(len(order)), values, xerr=[stds[i] if math.isfinite(stds[i]) else 0.0 for i in order], capsize=2)
    axis.set_yticks(range(len(order)), labels, fontsize=7)
    axis.invert_yaxis()
    finite = [v for v in values if v]
    if finite:
        axis.set_xlim(max(0.0, min(finite) - 0.05 * abs(min(finite))), max(finite) * 1.01 if max(finite) > 0 else 0)
    axis.set_xlabel(f"mean test {refit_metric}")
    axis.set_title("Candidates by rank")
    figure.tight_layout()
    images["ranked_candidates.png"] = _png(figure, plt)
    return images


def _family(params: dict[str, Any]) -> str:
    swaps = [param_text(v).split("(", 1)[0] for _, v in sorted(params.items()) if is_object_spec(v)]
    return "/".join(swaps) or "estimator"


def _label(params: dict[str, Any]) -> str:
    parts = [f"{n.rsplit('__', 1)[-1]}={param_text(v).split('(', 1)[0]}" for n, v in sorted(params.items())]
    return " ".join(parts)[:70]


def _png(figure: Any, plt: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def _number(value: Any) -> float:
    """A cv_results cell as an MLflow metric value (null, as JSON writes a masked cell, becomes NaN)."""
    return math.nan if value is None else float(value)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


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
