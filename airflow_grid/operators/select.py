"""Select operator: read every mapped result at once, assemble cv_results_, pick the winner, log to MLflow."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from airflow_grid import results, tracking
from airflow_grid.plan import load_plan
from airflow_grid.store import Store


class SelectWinnerOperator(BaseOperator):
    """Reduce the evaluate results to cv_results_ (identical to GridSearchCV's) and log the study to MLflow.

    ``evaluated`` is the list of the mapped evaluate tasks' outputs (one per backend); each is read with one slice
    request, and a skipped backend contributes nothing. The parent MLflow run
    is found again by (dag_id, run_id) tags, so a retry or a rerun never duplicates it. Returns the JSON-ready
    conf for the refit DAG.
    """

    template_fields: Sequence[str] = ("evaluated", "plan_summary")

    def __init__(
        self,
        *,
        evaluated: Any,
        plan_summary: Any,
        max_child_runs: int = tracking.DEFAULT_MAX_CHILD_RUNS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.evaluated = evaluated
        self.plan_summary = plan_summary
        self.max_child_runs = max_child_runs

    def execute(self, context: Context) -> dict[str, Any]:
        payloads = [payload for output in self.evaluated for payload in _all(output)]
        summary = self.plan_summary
        plan = load_plan(summary["plan_uri"])
        spec = plan.spec
        by_index = {item["index"]: item for payload in payloads for item in payload["results"]}
        missing = [c["index"] for c in plan.candidates if c["index"] not in by_index]
        if missing:
            raise AirflowFailException(f"no result for candidates {missing}: did evaluate tasks fail or get skipped?")
        ordered = [by_index[c["index"]] for c in plan.candidates]
        try:
            cv_results, best = plan.reduce(ordered)
        except results.AllFitsFailedError as error:
            raise AirflowFailException(str(error)) from error
        best_index = best["best_index"]
        cv_json = results.to_json(cv_results)
        dag_run = context["dag_run"]
        store = Store(plan.store_root)
        study_dir = f"studies/{spec.name}/{dag_run.dag_id}/{dag_run.run_id}".replace(":", "_").replace("+", "_")
        store.write_json(f"{study_dir}/cv_results.json", cv_json)
        store.write_json(f"{study_dir}/best.json", best)
        fitted = sum(1 for item in ordered if not item.get("from_store"))
        parent_run_id = tracking.log_study(
            study=spec.name,
            dag_id=dag_run.dag_id,
            run_id=dag_run.run_id,
            cv_results=cv_json,
            best=best,
            spec_yaml=spec.to_yaml(),
            tags={
                tracking.TAG_DATASET_VERSION: str(summary["dataset_version"]),
                "airflow_grid.dataset_version_source": summary["dataset_version_source"],
                tracking.TAG_PLAN_ID: plan.plan_id,
                tracking.TAG_PLAN_URI: plan.uri,
                "airflow_grid.overrides": json.dumps(summary["overrides"]),
            },
            max_child_runs=self.max_child_runs,
        )
        self.log.info(
            "Winner [%d] %s: mean_test_%s=%.4f (%d candidates, %d fitted now, %d from store); MLflow run %s",
            best_index, plan.candidates[best_index]["label"], spec.refit_metric, best["best_score"],
            len(ordered), fitted, len(ordered) - fitted, parent_run_id,
        )  # fmt: skip
        return {
            "parent_run_id": parent_run_id,
            "plan_uri": plan.uri,
            "study": spec.name,
            "best_index": best_index,
            "best_score": best["best_score"],
            "best_label": plan.candidates[best_index]["label"],
            "dataset_version": summary["dataset_version"],
            "results_uri": store.url(study_dir),
        }


def _all(output: Any) -> list[Any]:
    """Every item of a mapped task's output in one request (``[:]``); nothing for a skipped or empty task."""
    if output is None:
        return []
    items = output[:] if hasattr(output, "__getitem__") else list(output)
    return [item for item in items if item is not None]
