"""Build the grid-search and refit DAGs from a spec path, so a user's DAG file is a few lines.

    plan ──► evaluate[i] (mapped, pooled, labelled) ──► select (cv_results_, MLflow) ──► trigger_refit
    plan ──► evaluate ──► round_1 ──► evaluate_round_1 ──► … ──► select          (successive halving)

Nothing here reads a connection, a variable or the spec's data at parse time: parsing stays cheap and offline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, Asset, Param, TriggerRule, XComArg, task

from airflow_grid import settings
from airflow_grid.operators.evaluate import MAP_INDEX_TEMPLATE, LocalEvaluateOperator
from airflow_grid.operators.kubernetes import KubernetesBackend, KubernetesEvaluateOperator
from airflow_grid.operators.plan import PlanGridSearchOperator
from airflow_grid.operators.refit import RefitWinnerOperator
from airflow_grid.operators.rounds import HalvingRoundOperator
from airflow_grid.operators.select import SelectWinnerOperator

DEFAULT_REFIT_DAG_ID = "grid_refit"
_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$"
_DURATION = r"^[0-9]+(\.[0-9]+)?(s|m|h)$"  # resources.timeout: 90s, 10m, 1.5h (or a number of seconds)


def search_params(*, halving: bool = False) -> dict[str, Param]:
    """What a user may override from the trigger form; each validated by JSON schema before a run exists.

    ``halving``: the DAG has waves for successive-halving rounds, so the form offers those strategies too.
    """
    section = "Overrides (empty = the DAG's spec file)"
    return {
        "spec": Param(None, type=["null", "object"], section=section, title="Whole spec",
                      description_md="A complete search spec (replaces the spec file; validated at plan)."),
        "spec_path": Param(None, type=["null", "string"], section=section, title="Spec file",
                           description="Another spec file in the DAG's specs directory."),
        "param_grid": Param(None, type=["null", "object", "array"], section=section,
                            description_md="Replaces `param_grid`: a mapping of lists, or a list of such mappings."),
        "search": search_param(section, halving),
        "param_distributions": Param(
            None, type=["null", "object", "array"], section=section, items={"type": "object"},
            description_md="Replaces `param_distributions` (random search; replaces the file's `param_grid` too): "
                           "a mapping, or a list of mappings, of lists or scipy.stats object specs such as "
                           "`{\"_target_\": \"scipy.stats.loguniform\", \"a\": 0.001, \"b\": 1000}`."),
        "cv": Param(None, type=["null", "integer", "object"], minimum=2, section=section,
                    description="Number of folds (>= 2) or a splitter object spec."),
        "scoring": Param(None, type=["null", "string", "array", "object"], section=section,
                         description="A scorer name, a list of names, or {metric: scorer-name or "
                                     "{make_scorer: fbeta_score, beta: 2}}."),
        "resources": Param(
            None, section=section, description="Per-candidate budget, e.g. {\"cpu\": 1, \"memory\": \"1Gi\"}.",
            type=["null", "object"], additionalProperties=False,
            properties={"cpu": {"type": ["number", "string"], "pattern": _QUANTITY, "exclusiveMinimum": 0},
                        "memory": {"type": "string", "pattern": _QUANTITY},
                        "timeout": {"type": ["string", "number"], "pattern": _DURATION, "exclusiveMinimum": 0}},
        ),
        "backend": Param(None, type=["null", "string"], enum=[None, "local", "kubernetes"], section=section),
        "dataset_version": Param(None, type=["null", "string"], pattern=r"^[A-Za-z0-9._:+-]{1,128}$",
                                 title="Dataset version",
                                 description="Data version to tune on (default: asset event, logical date)."),
        "max_parallel": Param(None, type=["null", "integer"], minimum=1, maximum=1024,
                              description="Group candidates into at most this many evaluate tasks."),
    }  # fmt: skip


def search_param(section: str, halving: bool) -> Param:
    """``search``: the strategy and its class's keyword arguments, as the spec takes them (checked again at plan)."""
    strategies = ["grid", "random", *(["halving_grid", "halving_random"] if halving else [])]
    amount = {"type": ["integer", "string"], "minimum": 1}
    properties: dict[str, Any] = {
        "strategy": {"type": "string", "enum": strategies},
        "n_iter": {"type": "integer", "minimum": 1},
        "random_state": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
    }
    halving_md = ""
    if halving:
        properties.update(
            n_candidates={**amount, "pattern": "^exhaust$"},
            factor={"type": "number", "exclusiveMinimum": 1},
            resource={"type": "string", "minLength": 1},
            min_resources={**amount, "pattern": "^(exhaust|smallest)$"},
            max_resources={**amount, "pattern": "^auto$"},
            aggressive_elimination={"type": "boolean"},
        )
        halving_md = (
            ', `{"strategy": "halving_grid", "factor": 3, "random_state": 0}` (HalvingGridSearchCV) or '
            '`{"strategy": "halving_random", "n_candidates": 64, "random_state": 0}` (HalvingRandomSearchCV; '
            "rounds of this DAG's waves; `resource`, `min_resources`, `max_resources`, `aggressive_elimination` "
            "as scikit-learn takes them)"
        )
    return Param(
        None, section=section, type=["null", "object"], additionalProperties=False, required=["strategy"],
        description_md='Replaces `search`: `{"strategy": "grid"}` (GridSearchCV), `{"strategy": "random", '
                       '"n_iter": 20, "random_state": 0}` (RandomizedSearchCV; the seed is required so the plan is '
                       f"reproducible){halving_md}. Random strategies search `param_distributions`.",
        properties=properties,
    )  # fmt: skip


@task(multiple_outputs=False)
def candidates_for(items: Any, backend: str) -> list[dict[str, Any]]:
    """The plan items one backend runs (Airflow cannot map over a filtered XCom, so this small task filters)."""
    return [item for item in items if item["backend"] == backend]


def grid_search_dag(
    dag_id: str,
    spec_path: str | Path,
    *,
    schedule: Any = None,
    start_date: datetime | None = None,
    catchup: bool = False,
    pool: str | None = None,
    cpu: float = 1,
    store: str | None = None,
    refit_dag_id: str | None = DEFAULT_REFIT_DAG_ID,
    retries: int = 2,
    spec_dirs: Sequence[str] = (),
    data_roots: Sequence[str] | None = None,
    extra_allowed: Sequence[str] = (),
    kubernetes: KubernetesBackend | None = None,
    tags: Sequence[str] = (),
    doc_md: str | None = None,
    max_rounds: int = 1,
) -> DAG:
    """A grid-search DAG over ``spec_path``: each evaluate task takes ``ceil(cpu)`` slots of ``pool``.

    With ``kubernetes``, the DAG also has ``evaluate_kubernetes`` (one pod per task); the spec's ``backend`` (or
    the ``backend`` param) picks which of the two runs, and the other is skipped. A whole spec passed in a run's
    conf may only read files under ``data_roots`` (default: the directory of the DAG spec's own ``data.path``).
    ``max_rounds`` > 1 adds that many waves for successive halving (``round_<r>`` chooses the survivors, then
    ``evaluate_round_<r>`` maps over them); a search needing more rounds is refused at plan, one needing fewer
    skips the rest.
    """
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be at least 1, got {max_rounds}.")
    pool = pool or settings.default_pool()  # [airflow_grid] default_pool, read at parse time
    slots = max(1, math.ceil(cpu))
    with DAG(
        dag_id=dag_id,
        schedule=schedule,
        start_date=start_date or datetime(2026, 1, 1),
        catchup=catchup,
        params=search_params(halving=max_rounds > 1),
        max_active_runs=1,
        tags=["airflow-grid", *tags],
        doc_md=doc_md,
        default_args={"retries": retries, "retry_delay": timedelta(seconds=15)},
    ) as dag:
        plan = PlanGridSearchOperator(
            task_id="plan",
            spec_path=str(spec_path),
            store=store,
            grid_pool=pool,
            pool_slots_per_candidate=slots,
            spec_dirs=spec_dirs,
            data_roots=data_roots,
            extra_allowed=extra_allowed,
            backends=("local", "kubernetes") if kubernetes is not None else ("local",),
            max_rounds=max_rounds,
            retries=0,
        )
        evaluated = _evaluate_wave(plan.output, "", pool=pool, slots=slots, kubernetes=kubernetes)
        for iteration in range(1, max_rounds):  # successive halving: a wave per round; unneeded rounds skip
            survivors = HalvingRoundOperator(
                task_id=f"round_{iteration}",
                iteration=iteration,
                evaluated=list(evaluated),
                plan_summary=XComArg(plan, key="plan"),
                trigger_rule=TriggerRule.NONE_FAILED,  # the unused backend's evaluate task is skipped
                retries=0,
            )
            wave = _evaluate_wave(
                survivors.output, f"_round_{iteration}", pool=pool, slots=slots, kubernetes=kubernetes
            )
            evaluated += wave
        select = SelectWinnerOperator(
            task_id="select",
            evaluated=evaluated,
            plan_summary=XComArg(plan, key="plan"),
            trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS,  # the unused backend's task is skipped
        )
        if refit_dag_id:
            select >> TriggerDagRunOperator(
                task_id="trigger_refit",
                trigger_dag_id=refit_dag_id,
                trigger_run_id="refit__{{ dag.dag_id }}__{{ run_id }}",
                conf=select.output,  # type: ignore[arg-type]  # resolved to the dict at run time
                skip_when_already_exists=True,
            )
    return dag


def _evaluate_wave(
    items: Any, suffix: str, *, pool: str, slots: int, kubernetes: KubernetesBackend | None
) -> list[Any]:
    """One wave of mapped evaluate tasks over ``items``: local, and with ``kubernetes`` also pods (the spec's
    backend picks which runs; the other maps over [] and is skipped). Returns the tasks' outputs."""
    local_items: Any = items
    if kubernetes is not None:
        local_items = candidates_for.override(task_id=f"local_candidates{suffix}")(items, "local")
    outputs = [
        LocalEvaluateOperator.partial(
            task_id=f"evaluate{suffix}", pool=pool, pool_slots=slots, map_index_template=MAP_INDEX_TEMPLATE
        )
        .expand(candidate=local_items)
        .output
    ]
    if kubernetes is not None:
        outputs.append(
            KubernetesEvaluateOperator.partial(
                task_id=f"evaluate_kubernetes{suffix}",
                pool=pool,
                pool_slots=slots,
                map_index_template=MAP_INDEX_TEMPLATE,
                **kubernetes.operator_kwargs(),
            )
            .expand(candidate=candidates_for.override(task_id=f"kubernetes_candidates{suffix}")(items, "kubernetes"))
            .output
        )
    return outputs


def refit_params() -> dict[str, Param]:
    return {
        "parent_run_id": Param(
            None,
            type=["null", "string"],
            pattern=r"^[0-9a-f]{32}$",
            title="MLflow parent run id",
            description="The study run whose winner to refit.",
        )
    }


def grid_refit_dag(dag_id: str = DEFAULT_REFIT_DAG_ID, *, retries: int = 1) -> DAG:
    """The refit DAG: triggered by a grid-search DAG, or by hand with the MLflow parent run id of a study.

    ``max_active_runs=1``: the champion gate reads the current champion, then moves the alias; two refits running
    at once could both read the same champion and the weaker one could be promoted last. So refits run one at a
    time - for every study whose grid-search DAG triggers this refit DAG, not only per study.
    """
    with DAG(
        dag_id=dag_id,
        schedule=None,
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        params=refit_params(),
        tags=["airflow-grid"],
        default_args={"retries": retries, "retry_delay": timedelta(seconds=15)},
    ) as dag:
        RefitWinnerOperator(task_id="refit", parent_run_id="{{ params.parent_run_id or '' }}")
    return dag


def dataset_asset(name: str, uri: str) -> Asset:
    """An Asset whose events carry ``extra.dataset_version`` for the asset-scheduled grid search."""
    return Asset(name=name, uri=uri)
