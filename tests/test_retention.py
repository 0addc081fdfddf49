"""`airflow-grid gc`: the newest plans per study, young results and plans in use are kept; the rest is freed.

Stores are built by hand (plan.json files, results, mtimes set with os.utime) so every age is exact; one test
checks that a real planner and worker mark the plan in use.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from airflow_grid import cli, retention, worker
from airflow_grid.plan import make_plan
from airflow_grid.spec import parse_spec
from airflow_grid.store import IN_USE_FILE, QUARANTINE_DIR, Store

Doc = Callable[..., dict[str, Any]]
DAY = 86400.0
NOW = time.time()


def key(name: str) -> str:
    return (name * 64)[:64]


def age(store: Store, relative: str, days: float) -> None:
    """Make a stored file ``days`` old."""
    path = Path(store.root) / relative
    os.utime(path, (NOW - days * DAY, NOW - days * DAY))


def add_result(store: Store, name: str, days: float) -> str:
    store.put_result(key(name), {"key": key(name), "payload": "x" * 100})
    age(store, store.result_path(key(name)), days)
    return store.result_path(key(name))


def add_plan(
    store: Store, plan_id: str, study: str, days: float, keys: list[str], in_use_days: float | None = None
) -> None:
    created = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(NOW - days * DAY))
    document = {"plan_id": plan_id, "study": study, "created": created, "candidates": [{"key": key(k)} for k in keys]}
    store.write_bytes(f"plans/{plan_id}/X.npy", b"\0" * 1000)
    store.write_json(f"plans/{plan_id}/plan.json", document)
    if in_use_days is not None:
        store.touch_in_use(plan_id)
        age(store, f"plans/{plan_id}/{IN_USE_FILE}", in_use_days)


def plans_left(store: Store) -> set[str]:
    return {name.split("/")[1] for name in store.list_files("plans")}


def results_left(store: Store) -> set[str]:
    return {name.rsplit("/", 1)[-1].removesuffix(".json")[:1] for name in store.list_files("results")}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """Study a: plans a1 (oldest) .. a4; study b: b1, b2. Results named by one plan each, all 60 days old, plus
    unreferenced results 'y' (young, 1 day) and 'o' (old, 60 days)."""
    store = Store(str(tmp_path / "store"))
    for number in range(1, 5):
        add_plan(store, f"a{number}", "a", days=10 - number, keys=[f"{number}"])
    add_plan(store, "b1", "b", days=9, keys=["5"])
    add_plan(store, "b2", "b", days=8, keys=["6"])
    for name in ["1", "2", "3", "4", "5", "6", "o"]:
        add_result(store, name, days=60)
    add_result(store, "y", days=1)
    return store


def gc(store: Store, keep: int = 2, max_age: str = "30d", dry_run: bool = False) -> retention.Report:
    return retention.gc(store, keep_plans=keep, max_age=max_age, in_use_window="24h", dry_run=dry_run)


def test_keeps_newest_plans_per_study_with_their_results(store: Store) -> None:
    report = gc(store, keep=2)
    assert plans_left(store) == {"a3", "a4", "b1", "b2"}
    assert results_left(store) == {"3", "4", "5", "6", "y"}  # old results of kept plans stay; 'o', '1', '2' go
    assert report.freed_bytes == sum(entry.size for entry in report.entries if entry.delete) > 0


def test_old_unreferenced_results_go_young_ones_stay(store: Store) -> None:
    gc(store, keep=10, max_age="30d")
    assert results_left(store) == {"1", "2", "3", "4", "5", "6", "y"}
    gc(store, keep=10, max_age="12h")  # now 'y' (1 day) is old too, but nothing unreferenced is left but it
    assert results_left(store) == {"1", "2", "3", "4", "5", "6"}


def test_plan_in_use_and_its_results_are_untouched(store: Store) -> None:
    store.touch_in_use("a1")  # a study running on the oldest plan right now
    add_plan(store, "a0", "a", days=20, keys=["0"], in_use_days=3)  # touched 3 days ago: not in use
    add_result(store, "0", days=60)
    report = gc(store, keep=1)
    assert plans_left(store) == {"a1", "a4", "b2"}
    assert results_left(store) == {"1", "4", "6", "y"}
    [a1] = [entry for entry in report.entries if entry.name == "plans/a1"]
    assert not a1.delete and a1.reason == "in use (touched within 1d)"


def test_incomplete_plans_are_kept_while_in_use(store: Store) -> None:
    store.write_bytes("plans/half/X.npy", b"\0" * 10)  # a planner that died before plan.json
    store.touch_in_use("writing")  # a planner writing right now
    store.write_bytes("plans/writing/X.npy", b"\0" * 10)
    gc(store, keep=10)
    assert {"half", "writing"} & plans_left(store) == {"writing"}


def test_old_quarantine_and_write_leftovers_are_freed(store: Store) -> None:
    store.write_bytes(f"{QUARANTINE_DIR}/{key('q')}.json.20260101T000000.abcdef", b"{")
    age(store, f"{QUARANTINE_DIR}/{key('q')}.json.20260101T000000.abcdef", 60)
    store.write_bytes("results/ab/.deadbeef.tmp", b"partial")
    age(store, "results/ab/.deadbeef.tmp", 2)
    store.write_bytes("results/ab/.cafe.tmp", b"writing")  # a write in progress
    gc(store, keep=10)
    assert not store.list_files(QUARANTINE_DIR)
    assert set(store.list_files("results/ab")) == {"results/ab/.cafe.tmp"}


def test_dry_run_deletes_nothing_and_reports_the_same(store: Store) -> None:
    before = {**store.list_files("plans"), **store.list_files("results")}
    dry = gc(store, keep=1, dry_run=True)
    assert {**store.list_files("plans"), **store.list_files("results")} == before
    assert dry.dry_run and dry.freed_bytes > 0
    done = gc(store, keep=1)
    assert [(e.name, e.delete) for e in done.entries] == [(e.name, e.delete) for e in dry.entries]
    assert done.freed_bytes == dry.freed_bytes


def test_cli_prints_what_it_frees_and_keeps(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--store", store.root, "gc", "--keep-plans", "1", "--max-age", "30d"]
    assert cli.main([*argv, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    report = retention.collect(store, 1, 30 * DAY, DAY)
    freed = report.freed_bytes
    assert dry.splitlines()[0] == f"airflow-grid gc of {store.root} (dry run: nothing deleted)"
    assert "would delete:" in dry and f"would free {freed} bytes" in dry
    assert "  plans           4 (8 files, " in dry  # a1..a3 and b1
    assert "3 older than the 1 newest of study a; 1 older than the 1 newest of study b" in dry
    assert "    plans/a1: older than the 1 newest of study a" in dry
    assert "  results         5 (5 files, " in dry and "5 older than 30d, in no kept plan" in dry
    assert "kept:" in dry and "2 among the 1 newest of its study" in dry and "1 younger than 30d" in dry
    assert len(store.list_files("plans")) == 12  # nothing deleted

    assert cli.main(argv) == 0
    done = capsys.readouterr().out
    assert "deleted:" in done and f"freed {freed} bytes" in done
    assert plans_left(store) == {"a4", "b2"}


@pytest.mark.parametrize("option", [["--max-age", "30 days"], ["--in-use-window", "soon"], ["--keep-plans", "-1"]])
def test_cli_rejects_bad_options(store: Store, capsys: pytest.CaptureFixture[str], option: list[str]) -> None:
    assert cli.main(["--store", store.root, "gc", *option]) == 2
    assert capsys.readouterr().err.startswith("airflow-grid gc: ")
    assert len(store.list_files("plans")) == 12


@pytest.mark.usefixtures("thread_env")
def test_planner_and_worker_mark_the_plan_in_use(iris_doc: Doc, store_root: str) -> None:
    store = Store(store_root)
    plan = make_plan(parse_spec(iris_doc()), store)
    marker = Path(store_root) / f"plans/{plan.plan_id}/{IN_USE_FILE}"
    assert marker.exists()
    os.utime(marker, (NOW - 3 * DAY, NOW - 3 * DAY))
    worker.evaluate_candidates(plan.uri, [0])
    assert NOW - marker.stat().st_mtime < 600  # the worker touched it again
    report = retention.gc(store, keep_plans=0, max_age="0s", in_use_window="1h")
    assert not any(entry.delete for entry in report.entries if entry.kind in ("plan", "result"))
