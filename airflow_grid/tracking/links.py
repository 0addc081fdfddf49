"""Task links to MLflow: "MLflow run" on select, "MLflow model" on refit, "MLflow candidate run" on evaluate.

Airflow 3 evaluates a link once, on the worker, when the task instance finishes (``get_link(operator, ti_key)``),
and stores the URL in XCom under the link's ``xcom_key``; the UI only reads that XCom back. So a link must be
computable from XCom at the end of its own task - except the evaluate link, whose child run is created later, by
select. Select therefore (1) pushes :data:`RUNS_XCOM_KEY` (experiment, parent run, child runs by candidate) for
its own link and (2) writes each upstream evaluate task instance's link XCom itself, keyed by that instance's map
index (:func:`publish`). The evaluate link's own ``get_link`` computes the same URL from select's XCom, so an
evaluate instance re-run after select keeps its link. Candidates past the child-run cap link to nothing ("").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import quote

from airflow.sdk import BaseOperatorLink
from airflow.sdk.execution_time.xcom import XCom

RUNS_XCOM_KEY = "mlflow_runs"
"""Select's XCom: ``{"experiment_id", "parent_run_id", "candidate_runs": [[index, run id], ...]}``."""
RETURN_KEY = "return_value"


def ui_base_url() -> str:
    """The MLflow UI's base URL: ``[airflow_grid] mlflow_ui_url`` (see :func:`airflow_grid.settings.mlflow_ui_url`)."""
    from airflow_grid import settings

    return settings.mlflow_ui_url().rstrip("/")


def run_url(experiment_id: str, run_id: str, base: str | None = None) -> str:
    return f"{base or ui_base_url()}/#/experiments/{quote(str(experiment_id))}/runs/{quote(str(run_id))}"


def model_version_url(name: str, version: str, base: str | None = None) -> str:
    return f"{base or ui_base_url()}/#/models/{quote(str(name), safe='')}/versions/{quote(str(version))}"


def candidate_url(payload: Any, runs: Any, base: str | None = None) -> str:
    """The child run of the best-ranked candidate an evaluate task ran, or "" if none of them has one."""
    if not isinstance(payload, dict) or not isinstance(runs, dict):
        return ""
    mine = {item.get("index") for item in payload.get("results", [])}
    for index, run_id in runs.get("candidate_runs", []):  # best rank first
        if index in mine:
            return run_url(runs["experiment_id"], run_id, base)
    return ""


class MlflowRunLink(BaseOperatorLink):
    """The study's MLflow parent run, from the select task's :data:`RUNS_XCOM_KEY` XCom."""

    name = "MLflow run"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        runs = XCom.get_value(ti_key=ti_key, key=RUNS_XCOM_KEY)
        if not isinstance(runs, dict) or not runs.get("parent_run_id"):
            return ""
        return run_url(runs["experiment_id"], runs["parent_run_id"])


class MlflowModelLink(BaseOperatorLink):
    """The registered model version a refit task logged, from its return value (``model_name``, ``version``)."""

    name = "MLflow model"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        result = XCom.get_value(ti_key=ti_key, key=RETURN_KEY)
        if not isinstance(result, dict) or not result.get("model_name") or not result.get("version"):
            return ""
        return model_version_url(result["model_name"], result["version"])


class MlflowCandidateRunLink(BaseOperatorLink):
    """An evaluate task instance's candidate child run (see the module docstring for who writes it when)."""

    name = "MLflow candidate run"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        payload = XCom.get_value(ti_key=ti_key, key=RETURN_KEY)
        for task_id in linked_task_ids(operator.get_direct_relatives(upstream=False), MlflowRunLink):
            runs = XCom.get_one(
                key=RUNS_XCOM_KEY, dag_id=ti_key.dag_id, task_id=task_id, run_id=ti_key.run_id, map_index=-1
            )
            if url := candidate_url(payload, runs):
                return url
        return ""


def linked_task_ids(tasks: Iterable[Any], link: type[BaseOperatorLink]) -> list[str]:
    """The ids of ``tasks`` that carry ``link`` (works for mapped tasks: their class's links)."""
    return sorted(t.task_id for t in tasks if any(isinstance(x, link) for x in t.operator_extra_links))


def publish(operator: Any, context: Any, runs: dict[str, Any]) -> int:
    """Select's side: push ``runs`` for its own link, then write every upstream evaluate instance's link.

    An evaluate task's return values are read with one request per task, ordered by map index; every evaluate
    instance that succeeded pushed exactly one (select runs only when none failed), so position = map index - the
    same contract Airflow's ``output[:]`` relies on. Returns how many evaluate instances got a non-empty link
    (none when the operator is driven outside a task instance, as unit tests do: there is nothing to link).
    """
    ti = context.get("ti")
    if ti is None:
        return 0
    ti.xcom_push(key=RUNS_XCOM_KEY, value=runs)
    key, linked = MlflowCandidateRunLink().xcom_key, 0
    for task_id in linked_task_ids(operator.get_direct_relatives(upstream=True), MlflowCandidateRunLink):
        payloads: Sequence[Any] = (
            XCom.get_all(key=RETURN_KEY, dag_id=ti.dag_id, task_id=task_id, run_id=ti.run_id) or []
        )
        for map_index, payload in enumerate(payloads):
            url = candidate_url(payload, runs)
            XCom.set(key, url, dag_id=ti.dag_id, task_id=task_id, run_id=ti.run_id, map_index=map_index)
            linked += bool(url)
    return linked
