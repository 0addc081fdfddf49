"""Store integrity: damaged results are set aside and recomputed, damaged snapshots stop the worker with the fix and
heal on re-plan, concurrent and interrupted runs leave nothing damaged and give the scores of a clean run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from airflow_grid import worker
from airflow_grid.plan import Plan, make_plan, verify_plan
from airflow_grid.spec import parse_spec
from airflow_grid.store import QUARANTINE_DIR, Store

Doc = Callable[..., dict[str, Any]]
pytestmark = pytest.mark.usefixtures("thread_env")

KEY = "ab" + "0" * 62
RESULT: dict[str, Any] = {"key": KEY, "test_scores": {"score": [1.0]}}


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "local":
        yield Store(str(tmp_path / "store"))
        return
    memory = Store(f"memory://airflow-grid-integrity-{uuid.uuid4().hex}")
    yield memory
    if memory.fs.exists(memory._root_path):
        memory.fs.rm(memory._root_path, recursive=True)


def plan_for(document: dict[str, Any], root: str) -> Plan:
    return make_plan(parse_spec(document), Store(root))


def scores(cv_results: dict[str, Any]) -> dict[str, Any]:
    """cv_results without the timing columns, which differ between any two runs."""
    return {key: value for key, value in cv_results.items() if not key.endswith("_time")}


def reduced(plan: Plan) -> dict[str, Any]:
    from airflow_grid import results

    evaluated = worker.evaluate_candidates(plan.uri, list(range(len(plan.candidates))))["results"]
    return scores(results.to_json(plan.reduce(evaluated)[0]))


# --------------------------------------------------------------------------------------------------
# Results: verified on read


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        pytest.param(json.dumps(RESULT).encode()[:20], "not valid JSON", id="truncated"),
        pytest.param(b"\xff\xfe\x00garbage", "not valid JSON", id="binary"),
        pytest.param(b"", "not valid JSON", id="empty"),
        pytest.param(b"[1, 2]", "holds a list", id="not-an-object"),
        pytest.param(json.dumps({**RESULT, "key": "cd" + "1" * 62}).encode(), "carries the key 'cd1", id="wrong-key"),
        pytest.param(json.dumps({"test_scores": {}}).encode(), "carries the key None", id="no-key"),
    ],
)
def test_damaged_result_is_moved_aside_reported_once_and_missed(
    store: Store, caplog: pytest.LogCaptureFixture, payload: bytes, why: str
) -> None:
    store.write_bytes(store.result_path(KEY), payload)
    with caplog.at_level(logging.WARNING, logger="airflow_grid.store"):
        assert store.get_result(KEY) is None
        assert store.get_result(KEY) is None  # already moved: a plain miss, not a second warning
    [record] = caplog.records
    message = record.getMessage()
    assert store.url(store.result_path(KEY)) in message and why in message and "it will be recomputed" in message
    assert not store.exists(store.result_path(KEY))
    [aside] = store.list_files(QUARANTINE_DIR)
    assert aside.startswith(f"{QUARANTINE_DIR}/{KEY}.json.") and store.read_bytes(aside) == payload
    store.put_result(KEY, RESULT)  # the recomputed result is served again
    assert store.get_result(KEY) == RESULT


def test_local_write_is_fsynced_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(str(tmp_path / "store"))
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        events.append("dir-fsync" if os.path.isdir(f"/proc/self/fd/{descriptor}") else "file-fsync")
        real_fsync(descriptor)

    def replace(source: str, target: str) -> None:
        events.append("replace")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store.put_result(KEY, RESULT)
    assert events == ["file-fsync", "replace", "dir-fsync"]


@pytest.mark.parametrize("damage", ["truncated", "wrong-key"])
def test_worker_recomputes_a_damaged_result(iris_doc: Doc, store_root: str, damage: str) -> None:
    plan = plan_for(iris_doc(), store_root)
    [first] = worker.evaluate_candidates(plan.uri, [1])["results"]
    store = Store(store_root)
    path = Path(store_root) / store.result_path(plan.candidates[1]["key"])
    text = path.read_text()
    path.write_text(text[: len(text) // 2] if damage == "truncated" else text.replace(first["key"], "0" * 64))
    [again] = worker.evaluate_candidates(plan.uri, [1])["results"]
    assert again["from_store"] is False
    assert again["test_scores"] == first["test_scores"]
    assert store.get_result(first["key"]) is not None  # stored again, whole


# --------------------------------------------------------------------------------------------------
# Snapshots: checked by the worker, healed by the planner


def _damage(path: Path, how: str) -> None:
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "flip":  # same size, one byte changed: only the checksum can tell
        payload = bytearray(path.read_bytes())
        payload[-9] ^= 0xFF
        path.write_bytes(bytes(payload))
    else:
        path.unlink()


@pytest.mark.parametrize(
    ("name", "how", "message"),
    [
        pytest.param("X", "truncate", "is damaged", id="X-truncated"),
        pytest.param("folds", "flip", "is damaged", id="folds-corrupted"),
        pytest.param("y", "delete", "is missing", id="y-missing"),
    ],
)
def test_damaged_snapshot_stops_the_worker_and_re_planning_heals_it(
    iris_doc: Doc,
    store_root: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    how: str,
    message: str,
) -> None:
    clean = reduced(plan_for(iris_doc(), str(tmp_path / "clean")))
    plan = plan_for(iris_doc(), store_root)
    snapshot = Path(store_root) / str(plan.file(name))
    _damage(snapshot, how)

    assert worker.main(["evaluate", "--plan", plan.uri, "--candidate", "0"]) == worker.EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert f"snapshot {snapshot} {message}" in error
    assert "fix: re-run the plan task (or airflow-grid run): the planner rebuilds damaged snapshots" in error
    assert not (Path(store_root) / "results").exists()  # nothing fitted on damaged data

    assert verify_plan(Store(store_root), plan.plan_id) is None
    healed = plan_for(iris_doc(), store_root)
    assert healed.plan_id == plan.plan_id
    assert verify_plan(Store(store_root), plan.plan_id) is not None
    assert reduced(healed) == clean


def test_damaged_holdout_stops_refit(iris_doc: Doc, store_root: str, tmp_path: Path) -> None:
    plan = plan_for(iris_doc(holdout={"test_size": 0.2, "random_state": 0}), store_root)
    _damage(Path(store_root) / str(plan.file("X_holdout")), "flip")
    with pytest.raises(worker.BadInput, match=r"X_holdout\.npy is damaged: .* but plan\.json records"):
        worker.refit_candidate(plan.uri, 0, str(tmp_path / "model.joblib"))


@pytest.mark.parametrize("payload", [b'{"plan_id": "abc", "cand', b"[]"], ids=["truncated", "not-an-object"])
def test_damaged_plan_json_stops_the_worker_and_is_rebuilt(iris_doc: Doc, store_root: str, payload: bytes) -> None:
    plan = plan_for(iris_doc(), store_root)
    (Path(store_root) / store_relative(plan) / "plan.json").write_bytes(payload)
    with pytest.raises(worker.BadInput, match=r"cannot read the plan at .*fix: re-run the plan task"):
        worker.evaluate_candidates(plan.uri, [0])
    healed = plan_for(iris_doc(), store_root)
    assert healed.document["candidates"] == plan.document["candidates"]
    assert worker.evaluate_candidates(healed.uri, [0])["results"][0]["from_store"] is False


def store_relative(plan: Plan) -> str:
    return f"plans/{plan.plan_id}"


# --------------------------------------------------------------------------------------------------
# Through the CLI: concurrent and interrupted runs


def write_spec(tmp_path: Path, document: dict[str, Any]) -> Path:
    path = tmp_path / f"{document['name']}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def cli(store_root: str, spec: Path, out: Path, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "airflow_grid.cli", "--store", store_root, "run", str(spec)]
    return [*command, "--out", str(out), "--no-refit", *extra]


def run(store_root: str, spec: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(cli(store_root, spec, out, *extra), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed


def cv_scores(out: Path) -> dict[str, Any]:
    return scores(json.loads((out / "cv_results.json").read_text()))


def assert_store_whole(root: str, quarantined: int = 0, killed: bool = False) -> None:
    """Every result verifies (it parses and carries its own key) and nothing was quarantined or left half-written.

    ``killed``: a SIGKILL may land while a worker writes, leaving its temporary file (dot-named, never read as a
    result; ``airflow-grid gc`` deletes it): allowed, but every result file must still verify."""
    store = Store(root)
    files = store.list_files("results")
    temporary = [name for name in files if name.rsplit("/", 1)[-1].startswith(".")]
    assert files and (killed or not temporary), files
    for name in (name for name in files if name not in temporary):
        key = name.rsplit("/", 1)[-1].removesuffix(".json")
        assert store.get_result(key) is not None, name
    assert len(store.list_files(QUARANTINE_DIR)) == quarantined


def watch_while_running(root: str, processes: list[subprocess.Popen[bytes]]) -> int:
    """Read every result and snapshot as a third client would, while the runs write them: each read must verify.

    Returns how many distinct results were read whole; any partial or mismatched file fails at once.
    """
    store, verified = Store(root), set()
    deadline = time.monotonic() + 300
    while any(process.poll() is None for process in processes) and time.monotonic() < deadline:
        for name in store.list_files("results"):
            if name.rsplit("/", 1)[-1].startswith("."):
                continue  # a temporary file being written: not a result yet
            try:
                result = json.loads(store.read_bytes(name))
            except FileNotFoundError:
                continue
            assert result["key"] == name.rsplit("/", 1)[-1].removesuffix(".json"), name
            verified.add(name)
        for plan_json in Path(root, "plans").glob("*/plan.json"):
            document = json.loads(plan_json.read_text())
            for part, relative in document["files"].items():
                if relative is not None:
                    assert store.file_check(relative) == document["file_checks"][part], relative
        time.sleep(0.005)
    return len(verified)


@pytest.mark.slow
def test_truncated_result_is_recomputed_by_airflow_grid_run(iris_doc: Doc, tmp_path: Path) -> None:
    root, spec = str(tmp_path / "store"), write_spec(tmp_path, iris_doc())
    run(root, spec, tmp_path / "first")
    [victim, *_] = sorted((tmp_path / "store" / "results").glob("*/*.json"))
    victim.write_bytes(victim.read_bytes()[:25])

    second = run(root, spec, tmp_path / "second")
    assert "evaluated 3 candidates: 1 fitted, 2 from store" in second.stdout
    assert second.stderr.count("is damaged") == 1 and "it will be recomputed" in second.stderr
    assert cv_scores(tmp_path / "second") == cv_scores(tmp_path / "first")
    assert_store_whole(root, quarantined=1)


@pytest.mark.slow
def test_damaged_snapshot_heals_on_airflow_grid_run(iris_doc: Doc, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, iris_doc())
    run(str(tmp_path / "clean"), spec, tmp_path / "clean-out")
    root = str(tmp_path / "store")
    plan = plan_for(iris_doc(), root)
    _damage(Path(root) / str(plan.file("X")), "truncate")
    run(root, spec, tmp_path / "out")
    assert cv_scores(tmp_path / "out") == cv_scores(tmp_path / "clean-out")


@pytest.mark.slow
def test_two_concurrent_runs_of_one_spec_agree_and_damage_nothing(iris_doc: Doc, tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    spec = write_spec(tmp_path, iris_doc(param_grid={"clf__C": [0.1, 1, 10, 100]}))
    outs = [tmp_path / "a", tmp_path / "b"]
    processes = [
        subprocess.Popen(cli(root, spec, out, "--parallel", "1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for out in outs
    ]
    seen = watch_while_running(root, processes)
    outputs = [process.communicate(timeout=300)[0].decode() for process in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert seen >= 4  # the watcher read every result while the runs wrote them
    assert cv_scores(outs[0]) == cv_scores(outs[1])
    assert_store_whole(root)
    [plan_dir] = (tmp_path / "store" / "plans").iterdir()
    assert verify_plan(Store(root), plan_dir.name) is not None


@pytest.mark.slow
def test_killed_run_resumes_with_only_the_missing_candidates(iris_doc: Doc, tmp_path: Path) -> None:
    document = iris_doc(param_grid={"clf__C": [0.01, 0.1, 1, 10, 100, 1000]})
    spec = write_spec(tmp_path, document)
    root = str(tmp_path / "store")
    process = subprocess.Popen(
        cli(root, spec, tmp_path / "killed", "--parallel", "1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes the run and its running worker
    )
    results = tmp_path / "store" / "results"
    deadline = time.monotonic() + 120
    while not list(results.glob("*/*.json")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    stored = len(list(results.glob("*/*.json")))
    assert 1 <= stored < 6, "the kill should land between the first and the last candidate"

    resumed = run(root, spec, tmp_path / "resumed")
    assert f"evaluated 6 candidates: {6 - stored} fitted, {stored} from store" in resumed.stdout
    assert_store_whole(root, killed=True)
    run(str(tmp_path / "clean"), spec, tmp_path / "uninterrupted")
    assert cv_scores(tmp_path / "resumed") == cv_scores(tmp_path / "uninterrupted")
