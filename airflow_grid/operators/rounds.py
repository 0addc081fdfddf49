"""Round operator: the next successive-halving round's candidates, from the previous rounds' results.

    plan ──► evaluate ──► round_1 ──► evaluate_round_1 ──► round_2 ──► … ──► select

The DAG has a fixed number of waves; the plan decides how many rounds the search needs. A round the plan does
not need returns no items, so its evaluate wave maps over nothing and is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from airflow_grid.operators.select import collect_results


class HalvingRoundOperator(BaseOperator):
    """Choose round ``iteration``'s candidates exactly as scikit-learn's successive halving keeps them.

    ``evaluated`` is every earlier wave's evaluate output (one per backend and round); the survivors are replayed
    from them by :meth:`airflow_grid.plan.Plan.rounds`, the same function the select task and ``airflow-grid run``
    use. Returns the round's evaluate items (dealt by the ``max_parallel`` param), or ``[]`` when the plan has
    fewer rounds.
    """

    template_fields: Sequence[str] = ("evaluated", "plan_summary")
    ui_color = "#f3e5f5"

    def __init__(self, *, iteration: int, evaluated: Any, plan_summary: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.iteration = iteration
        self.evaluated = evaluated
        self.plan_summary = plan_summary

    def execute(self, context: Context) -> list[dict[str, Any]]:
        # here, not at the top: every task process parses the DAG file, and only this task needs sklearn
        from airflow_grid import results
        from airflow_grid.plan import load_plan, work_items

        plan = load_plan(self.plan_summary["plan_uri"])
        if self.iteration >= plan.n_rounds:
            self.log.info("The search needs %d round(s): round %d has no candidates.", plan.n_rounds, self.iteration)
            return []
        found = collect_results(self.evaluated)
        try:
            rounds = plan.rounds(lambda itr, index: found.get((itr, index)))
        except results.AllFitsFailedError as error:  # scikit-learn stops a halving search there too
            raise AirflowFailException(str(error)) from error
        if len(rounds) <= self.iteration:
            raise AirflowFailException(
                f"round {self.iteration - 1} has candidates without a result: did an evaluate task fail?"
            )
        indices = rounds[self.iteration]
        items = work_items(plan, self.iteration, indices, context["params"].get("max_parallel"))
        self.log.info(
            "Round %d of %d: %d candidates kept of %d, %s=%d each, in %d tasks",
            self.iteration, plan.n_rounds, len(indices), len(rounds[self.iteration - 1]),
            plan.document["halving"]["resource"], plan.row(self.iteration, indices[0])["n_resources"], len(items),
        )  # fmt: skip
        return items
