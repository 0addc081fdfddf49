"""MLflow runs: one parent run per study run (found again by tags) and one child run per candidate (capped).

The layout follows mlflow's own sklearn autolog for parameter searches (``best_<param>`` params, ``best_cv_score``,
``cv_results.csv``) so users recognise it. Logging is the calling task's job: a logging failure raises, it is not
swallowed, and Airflow retries the task - which finds the same parent run by its tags instead of making another.
"""

from __future__ import annotations

import io
import json
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
TAG_REFIT_RULE = "airflow_grid.refit_rule"
TAG_PLAN_URI = "airflow_grid.plan_uri"
TAG_UNSEEDED = "airflow_grid.unseeded"
TAG_STRATEGY = "airflow_grid.search_strategy"
TAG_ROUNDS = "airflow_grid.rounds"
TAG_BEST_CANDIDATE = "airflow_grid.best_candidate"  # halving: the winner's plan candidate and round (the refit's)
TAG_BEST_ROUND = "airflow_grid.best_round"
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


def search_tags(search: dict[str, Any], best: dict[str, Any]) -> dict[str, str]:
    """Parent-run tags for the search: its strategy and settings; for successive halving, the rounds and the
    winner's candidate and round (``best_index`` is its cv_results_ row; the refit needs the candidate)."""
    tags = {TAG_STRATEGY: str(search["strategy"]), "airflow_grid.search": json.dumps(search, sort_keys=True)}
    rounds = best.get("halving")
    if rounds:
        tags[TAG_ROUNDS] = json.dumps(
            {key: rounds[key] for key in ("n_iterations", "n_resources", "n_candidates_", "resource", "factor")}
        )
        tags[TAG_BEST_CANDIDATE] = str(best["best_candidate"])
        tags[TAG_BEST_ROUND] = str(best["best_iter"])
    return tags


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
    unseeded: list[dict[str, Any]] | None = None,
) -> str:
    """Log a finished search under its parent run (idempotent per dag_id/run_id) and return the parent run id.

    ``unseeded`` is the plan's list of components whose scores depend on an unset random_state
    (:func:`airflow_grid.randomness.unseeded`): when non-empty it becomes the tag :data:`TAG_UNSEEDED` (a short
    comma list, cut to MLflow's tag limit) and the artifact ``unseeded.json`` (the whole list).
    """
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
    if best.get("refit_rule"):  # the winner is the rule's choice, not rank 1: say so on the parent run
        run_tags.append(RunTag(TAG_REFIT_RULE, json.dumps(best["refit_rule"], sort_keys=True)))
    if unseeded:  # which scores a fresh run may change: readable in the runs table without opening artifacts
        run_tags.append(RunTag(TAG_UNSEEDED, unseeded_tag(unseeded)))
    _log_missing(mlflow_client, parent, metrics=metrics, params=params, tags=run_tags)
    with tempfile.TemporaryDirectory(prefix="airflow-grid-mlflow-") as scratch:
        folder = Path(scratch)
        (folder / "cv_results.json").write_text(json.dumps(cv_results, indent=1))
        (folder / "cv_results.csv").write_text(cv_results_csv(cv_results))
        (folder / "spec.yaml").write_text(spec_yaml)
        (folder / "best.json").write_text(json.dumps(best, indent=1))
        if unseeded:
            (folder / "unseeded.json").write_text(json.dumps(unseeded, indent=1))
        from airflow_grid.tracking.plots import plots  # matplotlib: only when a study is logged

        for name, png in plots(cv_results, refit_metric).items():
            (folder / name).write_bytes(png)
        mlflow_client.log_artifacts(parent, str(folder))
    _log_children(mlflow_client, parent, study, cv_results, max_child_runs)
    mlflow_client.set_terminated(parent, status="FINISHED")
    return parent


def unseeded_tag(unseeded: list[dict[str, Any]]) -> str:
    """``clf (RandomForestClassifier), cv (ShuffleSplit)``, cut to MLflow's tag value limit (ending in ``...``)."""
    from airflow_grid.randomness import names  # sklearn: only when a study is logged

    try:
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH as limit
    except ImportError:  # moved in another MLflow version: the smallest limit MLflow has had
        limit = 5000
    text = names(unseeded)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        params = [Param(name, param_text(value)[:6000]) for name, value in cv_results["params"][index].items()]
        metrics = [
            Metric(key, _number(column[index]), now, 0)
            for key, column in cv_results.items()
            if key.startswith(("mean_", "std_", "rank_")) or key in ("iter", "n_resources")  # halving's round
        ]
        if run is None:  # a new run holds nothing yet: log all of it without reading it back first
            run = mlflow_client.create_run(
                exp,
                run_name=f"candidate-{index}",
                tags={"mlflow.parentRunId": parent, TAG_CANDIDATE: str(index), TAG_ROLE: "candidate"},
            )
            mlflow_client.log_batch(run.info.run_id, metrics=metrics, params=params)
        else:
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


def _number(value: Any) -> float:
    """A cv_results cell as an MLflow metric value (null, as JSON writes a masked cell, becomes NaN)."""
    return math.nan if value is None else float(value)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def candidate_runs(parent_run_id: str) -> dict[str, Any]:
    """Where a logged study's runs are: its experiment id and its candidates' child runs, best rank first.

    ``{"experiment_id": ..., "parent_run_id": ..., "candidate_runs": [[candidate index, child run id], ...]}``,
    JSON-ready (it travels in XCom to the task links). Candidates past the child-run cap have no entry.
    """
    mlflow_client = client()
    parent = mlflow_client.get_run(parent_run_id)
    experiment = str(parent.info.experiment_id)
    rank = f"rank_test_{parent.data.tags.get(TAG_REFIT_METRIC, 'score')}"
    children = _search_all(
        mlflow_client,
        experiment,
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{TAG_ROLE}` = 'candidate'",
    )
    ranked = sorted(children, key=lambda run: (run.data.metrics.get(rank, math.inf), _index(run)))
    return {
        "experiment_id": experiment,
        "parent_run_id": parent_run_id,
        "candidate_runs": [[_index(run), str(run.info.run_id)] for run in ranked],
    }


def _index(run: Any) -> int:
    return int(run.data.tags[TAG_CANDIDATE])
