"""Select operator: read every mapped result at once, assemble cv_results_, pick the winner, log to MLflow."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airflow_grid import settings, tracking
from airflow_grid.store import Store
from airflow_grid.tracking import links


class SelectWinnerOperator(BaseOperator):
    """Reduce the evaluate results to cv_results_ (identical to GridSearchCV's) and log the study to MLflow.

    ``evaluated`` is the list of the mapped evaluate tasks' outputs (one per backend); each is read with one slice
    request, and a skipped backend contributes nothing. The parent MLflow run
    is found again by (dag_id, run_id) tags, so a retry or a rerun never duplicates it. cv_results and best are
    written to the store before MLflow is contacted; an unreachable tracking server fails the try in seconds with
    a retryable ``AirflowException`` that says where they are. Returns the JSON-ready conf for the refit DAG.
    """

    template_fields: Sequence[str] = ("evaluated", "plan_summary")
    operator_extra_links = (links.MlflowRunLink(),)

    def __init__(
        self,
        *,
        evaluated: Any,
        plan_summary: Any,
        max_child_runs: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.evaluated = evaluated
        self.plan_summary = plan_summary
        self.max_child_runs = max_child_runs

    def execute(self, context: Context) -> dict[str, Any]:
        summary = self.plan_summary
        # here, not at the top: every task process parses the DAG file, and only this task needs sklearn
        from airflow_grid import leaderboard, results
        from airflow_grid.plan import load_plan

        plan = load_plan(summary["plan_uri"])
        spec = plan.spec
        found = collect_results(self.evaluated)
        try:
            rounds = plan.rounds(lambda itr, index: found.get((itr, index)))
            missing = [(itr, i) for itr, indices in enumerate(rounds) for i in indices if (itr, i) not in found]
            if missing or len(rounds) < plan.n_rounds:
                shown = [i for _, i in missing] if plan.n_rounds == 1 else missing or f"rounds after {len(rounds) - 1}"
                raise AirflowFailException(f"no result for candidates {shown}: did evaluate tasks fail or get skipped?")
            ordered = [found[(itr, i)] for itr, indices in enumerate(rounds) for i in indices]
            cv_results, best = plan.reduce(ordered, rounds)
            plan.remember_costs(rounds, ordered)  # the next plan of this study orders and batches by them
        except results.AllFitsFailedError as error:
            raise AirflowFailException(str(error)) from error
        best_index = best["best_index"]
        winner = plan.row(best.get("best_iter", 0), best.get("best_candidate", best_index))
        cv_json = results.to_json(cv_results)
        dag_run = context["dag_run"]
        store = Store(plan.store_root)
        study_dir = f"studies/{spec.name}/{dag_run.dag_id}/{dag_run.run_id}".replace(":", "_").replace("+", "_")
        store.write_json(f"{study_dir}/cv_results.json", cv_json)
        store.write_json(f"{study_dir}/best.json", best)
        fitted = sum(1 for item in ordered if not item.get("from_store"))
        study_log = {
            "study": spec.name,
            "dag_id": dag_run.dag_id,
            "run_id": dag_run.run_id,
            "cv_results": cv_json,
            "best": best,
            "spec_yaml": spec.to_yaml(),
            "tags": {
                tracking.TAG_DATASET_VERSION: str(summary["dataset_version"]),
                "airflow_grid.dataset_version_source": summary["dataset_version_source"],
                tracking.TAG_PLAN_ID: plan.plan_id,
                tracking.TAG_PLAN_URI: plan.uri,
                "airflow_grid.overrides": json.dumps(summary["overrides"]),
                **tracking.search_tags(spec.search, best),
            },
            "max_child_runs": settings.max_child_runs() if self.max_child_runs is None else self.max_child_runs,
            "unseeded": plan.document.get("unseeded", []),  # plans written before the field existed lack it
        }
        parent_run_id = log_study_or_retry(study_log, results_url=store.url(study_dir))
        links.publish(self, context, tracking.candidate_runs(parent_run_id))  # the task links to MLflow
        self.log.info(
            "Winner [%d] %s: mean_test_%s=%.4f (%d candidates, %d fitted now, %d from store); MLflow run %s",
            best_index, winner["label"], spec.refit_metric, best["best_score"],
            len(ordered), fitted, len(ordered) - fitted, parent_run_id,
        )  # fmt: skip
        self.log.info("%s", leaderboard.render(cv_results, spec.refit_metric, best_index=best_index))
        return {
            "parent_run_id": parent_run_id,
            "plan_uri": plan.uri,
            "study": spec.name,
            "best_index": best_index,
            "best_score": best["best_score"],
            "best_label": winner["label"],
            "dataset_version": summary["dataset_version"],
            "results_uri": store.url(study_dir),
        }


#: MLflow's defaults retry a request to a dead server 7 times with exponential backoff (about 4 minutes per
#: request) and wait up to 120 s for each reply: an outage would hold the select try (and its worker slot) for
#: many minutes before Airflow's own retry, which is the one that can wait for the server to come back, gets a
#: turn. The select task uses these instead unless the user set the variables.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


@contextmanager
def bounded_http_retries() -> Iterator[None]:
    """Apply :data:`HTTP_RETRY_DEFAULTS` for the variables the user left unset (MLflow reads them per request)."""
    unset = [name for name in HTTP_RETRY_DEFAULTS if name not in os.environ]
    os.environ.update({name: HTTP_RETRY_DEFAULTS[name] for name in unset})
    try:
        yield
    finally:
        for name in unset:
            os.environ.pop(name, None)


def log_study_or_retry(study_log: dict[str, Any], *, results_url: str) -> str:
    """:func:`tracking.log_study`, with an unreachable tracking server turned into a clear, retryable failure.

    The results are already in the store and ``log_study`` resumes where a failed try stopped, so the retry after
    the server is back logs the study once: the same parent run, each child run once.
    """
    try:
        with bounded_http_retries():
            return tracking.log_study(**study_log)
    except Exception as error:
        cause = connection_failure(error)
        if cause is None:
            raise
        uri = tracking.tracking_uri()
        kind = "server" if uri.startswith(("http://", "https://")) else "store"
        reason = getattr(cause.args[0] if cause.args else None, "reason", None)  # urllib3's, under "max retries"
        detail = re.sub(r"<[^>]* object at 0x[0-9a-f]+>: ", "", str(reason or cause))[:300]
        message = (
            f"MLflow tracking {kind} {uri} is unreachable ({type(cause).__name__}: {detail}): the study's "
            f"cv_results are saved at {results_url}; a retry logs them once the server is back. Fix: check the "
            "tracking URI (MLFLOW_TRACKING_URI) and that the server is up."
        )
        # from None: the chained MLflow error repeats the URI with any user:password in it.
        raise AirflowException(redact(message)) from None


def connection_failure(error: BaseException) -> BaseException | None:
    """The network failure behind an error, if there is one (MLflow wraps it in an ``MlflowException``)."""
    from requests import exceptions

    misconfigured = (exceptions.InvalidURL, exceptions.MissingSchema, exceptions.InvalidSchema)
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, exceptions.RequestException) and not isinstance(current, misconfigured):
            return current
        if isinstance(current, ConnectionError | TimeoutError):
            return current
        current = current.__cause__ or current.__context__
    return None


def redact(text: str) -> str:
    """``text`` without the ``user:password@`` of any URL in it."""
    return re.sub(r"(?<=://)[^/@\s]+@", "", text)


def collect_results(evaluated: Any) -> dict[tuple[int, int], dict[str, Any]]:
    """Every evaluate result of the given outputs, by (round, candidate index)."""
    payloads = [payload for output in evaluated for payload in _all(output)]
    return {(item.get("iter", 0), item["index"]): item for payload in payloads for item in payload["results"]}


def _all(output: Any) -> list[Any]:
    """Every item of a mapped task's output in one request (``[:]``); nothing for a skipped or empty task."""
    if output is None:
        return []
    items = output[:] if hasattr(output, "__getitem__") else list(output)
    return [item for item in items if item is not None]
