"""Refit operator: fit a study's winner on the full search data, score the holdout, register and gate it."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.providers.standard.hooks.subprocess import SubprocessHook
from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airflow_grid import lineage, tracking
from airflow_grid.launch import worker_command, worker_env
from airflow_grid.operators.champion import champion_alias, emit_if_promoted
from airflow_grid.store import Store
from airflow_grid.tracking.links import MlflowModelLink
from airflow_grid.worker import EXIT_BAD_INPUT


class RefitWinnerOperator(BaseOperator):
    """Refit the winner of the MLflow parent run ``parent_run_id`` and run the champion gate.

    The parent run records the plan URI and the winner's index (tags), so a manual trigger needs only the parent
    run id. The model is fitted by the worker (same code, same budget), then logged here with a signature and an
    input example, registered under the study name, aliased ``challenger``, and promoted to ``champion`` only if
    its holdout score is at least the current champion's. A promotion emits an event for the study's champion
    asset through the :data:`~airflow_grid.operators.champion.CHAMPION_ALIAS` outlet (added to ``outlets``).
    """

    template_fields: Sequence[str] = ("parent_run_id",)
    operator_extra_links = (MlflowModelLink(),)

    def __init__(self, *, parent_run_id: str, python: str | None = None, **kwargs: Any) -> None:
        outlets = kwargs.pop("outlets", None) or []
        super().__init__(outlets=[*(outlets if isinstance(outlets, list) else [outlets]), champion_alias()], **kwargs)
        self.parent_run_id = parent_run_id
        self.python = python or sys.executable
        self._hook: SubprocessHook | None = None

    def execute(self, context: Context) -> dict[str, Any]:
        if not self.parent_run_id:
            raise AirflowFailException('no parent_run_id: trigger with conf {"parent_run_id": "<MLflow run id>"}.')
        parent = tracking.client().get_run(self.parent_run_id)
        tags = parent.data.tags
        if tracking.TAG_PLAN_URI not in tags or tracking.TAG_BEST_INDEX not in tags:
            raise AirflowFailException(f"MLflow run {self.parent_run_id} is not an airflow-grid study run.")
        # here, not at the top: every task process parses the DAG file, and only this task needs sklearn
        from airflow_grid import data
        from airflow_grid.plan import load_plan

        plan = load_plan(tags[tracking.TAG_PLAN_URI])
        spec = plan.spec
        best_index = int(tags[tracking.TAG_BEST_INDEX])  # the cv_results_ row
        # Successive halving: the row is a candidate in a round (its resource); otherwise row = candidate.
        winner = plan.row(
            int(tags.get(tracking.TAG_BEST_ROUND, 0)), int(tags.get(tracking.TAG_BEST_CANDIDATE, best_index))
        )
        store = Store(plan.store_root)
        model_path = Path(tempfile.mkdtemp(prefix="airflow-grid-refit-")) / "model.joblib"
        outcome = self._run_refit(plan.uri, winner, model_path, spec.resources.cpu, spec.resources.memory_bytes)
        import joblib

        model = joblib.load(model_path)
        with tempfile.TemporaryDirectory() as cache:
            X = data.read_table(store.local_path(str(plan.file("X")), cache), mmap=False)
            input_example = X[:5] if not hasattr(X, "iloc") else X.iloc[:5]
        dag_run = context["dag_run"]
        registered = tracking.log_refit(
            parent_run_id=self.parent_run_id,
            dag_id=dag_run.dag_id,
            run_id=dag_run.run_id,
            model=model,
            input_example=input_example,
            holdout_score=outcome["holdout_score"],
            holdout_metric=outcome["holdout_metric"],
            tags={"airflow_grid.best_label": winner["label"]},
        )
        self._lineage = lineage.refit_lineage(plan.document, registered, tracking.tracking_uri())
        self.log.info(
            "Refit %s winner [%d] %s: holdout %s=%s; registered %s v%s; champion is v%s (%s)",
            spec.name, best_index, winner["label"], outcome["holdout_metric"],
            outcome["holdout_score"], registered["model_name"], registered["version"],
            registered["champion_version"], "promoted" if registered["promoted"] else "kept",
        )  # fmt: skip
        result = {**registered, "holdout_score": outcome["holdout_score"], "best_index": best_index}
        emit_if_promoted(context, result, holdout_metric=outcome["holdout_metric"], parent_run_id=self.parent_run_id)
        return result

    def _run_refit(
        self, plan_uri: str, winner: dict[str, Any], model_path: Path, cpu: float, memory: int
    ) -> dict[str, Any]:
        """Fit in a worker process inside the spec's CPU and memory budget (the evaluate tasks' budget)."""
        with tempfile.TemporaryDirectory(prefix="airflow-grid-refit-") as scratch:
            out = Path(scratch) / "outcome.json"
            command = worker_command(
                "refit",
                plan_uri,
                winner["index"],
                out=str(out),
                memory_bytes=memory,
                python=self.python,
                model=str(model_path),
                round_=winner["iter"],
            )
            self._hook = SubprocessHook()
            result = self._hook.run_command(command, env=worker_env(cpu), cwd=scratch)
            if result.exit_code == EXIT_BAD_INPUT:
                raise AirflowFailException(f"refit worker refused its input: {result.output}")
            if result.exit_code != 0:
                raise AirflowException(f"refit worker exited with {result.exit_code}: {result.output}")
            outcome: dict[str, Any] = json.loads(out.read_text())
        return outcome

    def get_openlineage_facets_on_start(self) -> Any:
        """Empty: the study, its data and the model version are known only once the parent run is read."""
        return lineage.Lineage().to_operator_lineage()

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """Input: the study's dataset (at the version the holdout was scored on); output: the registered model.

        ``None`` without the OpenLineage provider; empty if the refit failed before registering a version.
        """
        return getattr(self, "_lineage", lineage.Lineage()).to_operator_lineage()

    def on_kill(self) -> None:
        """Stop the refit worker (its process group: the fit and any joblib workers) when the task is killed."""
        if self._hook is not None:
            self._hook.send_sigterm()
