"""Units of work ordered by predicted cost and quick ones batched: costs.py alone, then through the plan's items.

That the order and batching leave cv_results_ unchanged is checked through a real DAG run in
tests/test_airflow_integration.py (``test_history_reorders_and_batches_tasks_without_changing_scores``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from airflow_grid import costs
from airflow_grid.plan import default_min_items, make_plan, work_items
from airflow_grid.spec import parse_spec
from airflow_grid.store import Store


def _spec(**fields: Any) -> dict[str, Any]:
    """6 SVC candidates (each a unit of its own), 3 folds on iris."""
    return {
        "name": "costs-iris",
        "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
        "estimator": {"_target_": "sklearn.svm.SVC"},
        "param_grid": {"C": [0.1, 1, 10], "kernel": ["linear", "rbf"]},
        "cv": 3,
        **fields,
    }


def _seed(store: Store, spec: Any, plan: Any, seconds: dict[int, float]) -> None:
    history = {costs.signature(spec, plan.row(0, index)): value for index, value in seconds.items()}
    store.write_json(costs.history_path(spec.name), history)


# --- schedule ------------------------------------------------------------------------------------------------------


def test_without_history_units_are_ordered_by_size_and_not_batched() -> None:
    units = [[0], [1, 2, 3], [4], [5, 6]]
    cost, in_seconds = costs.predict([["a"], ["b", "c", "d"], ["e"], ["f", "g"]], {})
    assert (cost, in_seconds) == ([1.0, 3.0, 1.0, 2.0], False)
    got = costs.schedule(units, cost, quick_seconds=None, min_items=2)
    assert got == [[1, 2, 3], [5, 6], [0], [4]]  # biggest first; equal sizes keep the plan's order


def test_quick_units_are_batched_but_slots_are_never_left_idle() -> None:
    units = [[i] for i in range(8)]
    cost = [1.0, 2.0, 1.5, 0.5, 3.0, 2.5, 1.0, 0.5]  # 12 s in all, every unit under 10 s
    got = costs.schedule(units, cost, quick_seconds=10.0, min_items=2)
    assert sorted(i for task in got for i in task) == list(range(8))  # every unit exactly once
    assert len(got) == 2  # 12 s would fit 2 tasks of 10 s; 2 slots want 2 tasks
    loads = [sum(cost[i] for i in task) for task in got]
    assert loads == sorted(loads, reverse=True) and max(loads) - min(loads) <= 1.0  # balanced, costliest first
    assert len(costs.schedule(units, cost, quick_seconds=10.0, min_items=5)) == 5
    assert len(costs.schedule(units, cost, quick_seconds=2.0, min_items=1)) == 6  # ceil(12 / 2), capped by units


def test_slow_units_stay_alone_and_run_first() -> None:
    units = [[0], [1], [2], [3, 4]]
    cost = [1.0, 30.0, 2.0, 50.0]
    got = costs.schedule(units, cost, quick_seconds=10.0, min_items=2)
    assert got == [[3, 4], [1], [2, 0]]  # the quick two share a task; the slot count is met by the slow ones


def test_max_items_packs_the_longest_first_into_the_lightest_task() -> None:
    units = [[i] for i in range(5)]
    cost = [5.0, 4.0, 3.0, 3.0, 2.0]
    got = costs.schedule(units, cost, quick_seconds=None, min_items=1, max_items=2)
    assert got == [[1, 2, 4], [0, 3]]  # 5 | 4, then 3 to the 4 (7), 3 to the 5 (8), 2 to the 7 (9): costliest first


# --- history -------------------------------------------------------------------------------------------------------


def test_signature_ignores_the_data_but_not_params_estimator_or_resource() -> None:
    spec = parse_spec(_spec())
    row = {"params": {"C": 1, "kernel": "rbf"}, "key": "k1"}
    assert costs.signature(spec, row) == costs.signature(spec, {**row, "key": "another data version"})
    assert costs.signature(spec, row) != costs.signature(spec, {**row, "params": {"C": 10, "kernel": "rbf"}})
    assert costs.signature(spec, row) != costs.signature(spec, {**row, "n_resources": 100})
    other = parse_spec(_spec(estimator={"_target_": "sklearn.svm.SVC", "gamma": "auto"}))
    assert costs.signature(spec, row) != costs.signature(other, row)


def test_a_unit_elapsed_time_is_shared_by_its_candidates() -> None:
    spec = parse_spec(_spec())
    rows = [{"params": {"C": c}} for c in (1, 2, 3)]
    chain = {"param": "n_estimators", "sizes": [10, 20]}
    results = [
        {"elapsed_s": 6.0, "chain": chain},
        {"elapsed_s": 6.0, "chain": chain},
        {"elapsed_s": 1.5},
    ]
    seen = costs.observed(spec, rows, results)
    assert [seen[costs.signature(spec, row)] for row in rows] == [3.0, 3.0, 1.5]


def test_history_is_merged_and_a_damaged_file_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store, spec = Store(str(tmp_path)), parse_spec(_spec())
    first = [{"params": {"C": 1}}, {"params": {"C": 2}}]
    costs.remember(store, spec, first, [{"elapsed_s": 1.0}, {"elapsed_s": 2.0}])
    costs.remember(store, spec, first[1:], [{"elapsed_s": 4.0}])
    history = costs.load(store, spec.name)
    assert sorted(history.values()) == [1.0, 4.0]  # the newest measurement wins
    (tmp_path / costs.history_path(spec.name)).write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert costs.load(store, spec.name) == {}
    assert "cost history" in caplog.text
    (tmp_path / costs.history_path(spec.name)).write_text(json.dumps({"a": "x", "b": -1, "c": 2.5}))
    assert costs.load(store, spec.name) == {"c": 2.5}


# --- through the plan's evaluate items -----------------------------------------------------------------------------


def test_items_follow_the_history(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    spec = parse_spec(_spec())
    plan = make_plan(spec, store)
    every = list(range(6))
    assert [item["indices"] for item in work_items(plan, 0, every)] == [[i] for i in every]  # no history: as planned

    _seed(store, spec, plan, {i: 20.0 + i for i in every})  # all slow, the last candidate the costliest
    assert [item["indices"] for item in work_items(plan, 0, every)] == [[i] for i in reversed(every)]

    _seed(store, spec, plan, {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 25.0})  # one slow, five quick
    items = work_items(plan, 0, every, min_items=3)
    assert items[0]["indices"] == [5]
    assert len(items) == 3 and sorted(i for item in items for i in item["indices"]) == every
    assert all(" | " in item["label"] for item in items[1:])  # a batched task names every candidate in it

    _seed(store, spec, plan, {0: 1.0, 1: 1.0})  # the others unknown: they cost the median of the known
    assert len(work_items(plan, 0, every, min_items=2)) == 2

    single = make_plan(parse_spec(_spec(units="candidate")), store)
    _seed(store, single.spec, single, {i: 1.0 + i for i in every})
    assert [item["indices"] for item in work_items(single, 0, every)] == [[i] for i in reversed(every)]


def test_default_slots_follow_the_backend_and_cpu() -> None:
    assert default_min_items(parse_spec(_spec(backend="kubernetes"))) == 16
    local = default_min_items(parse_spec(_spec(resources={"cpu": 1})))
    assert local >= 1
    assert default_min_items(parse_spec(_spec(resources={"cpu": 64}))) == 1
