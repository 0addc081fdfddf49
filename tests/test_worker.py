"""The worker entrypoint: results into the store and --out, exit codes, the CPU budget, refit with holdout.

One test runs ``python -m airflow_grid.worker`` as a process, as a pod or the local backend does; the others call
``worker.main`` in-process, which is the same code without the interpreter start-up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import sklearn.model_selection
from joblib import parallel_config
from sklearn.metrics import accuracy_score

from airflow_grid import cv, worker
from airflow_grid.data import read_table
from airflow_grid.plan import Plan, load_plan, make_plan
from airflow_grid.spec import ALLOWED_TARGETS_ENV, parse_spec
from airflow_grid.store import Store

Doc = Callable[..., dict[str, Any]]

# Evaluating in-process caps BLAS pools through os.environ: restore it after every test.
pytestmark = pytest.mark.usefixtures("thread_env")


def plan_for(document: dict[str, Any], root: str) -> Plan:
    return make_plan(parse_spec(document), Store(root))


def run_worker(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "airflow_grid.worker", *arguments], capture_output=True, text=True, timeout=120
    )


def read_results(path: Path) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = json.loads(path.read_text())["results"]
    return results


# --------------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_process_writes_result_then_serves_it_from_store(
    iris_doc: Doc, store_root: str, tmp_path: Path
) -> None:
    plan = plan_for(iris_doc(), store_root)
    out = tmp_path / "xcom" / "return.json"
    arguments = ("evaluate", "--plan", plan.uri, "--candidate", "1", "--out", str(out))

    first = run_worker(*arguments)
    assert first.returncode == 0, first.stderr
    payload = json.loads(out.read_text())
    assert payload["plan_id"] == plan.plan_id
    [result] = payload["results"]
    assert (result["index"], result["key"], result["label"]) == (1, plan.candidates[1]["key"], "C=1")
    assert result["from_store"] is False
    assert len(result["test_scores"]["score"]) == len(result["fit_time"]) == plan.n_splits == 3
    assert result["n_failed_fits"] == 0 and result["error"] is None
    assert result["n_jobs"] == 1
    assert Store(store_root).get_result(plan.candidates[1]["key"]) is not None
    assert [p.name for p in out.parent.iterdir()] == ["return.json"]  # written atomically, no temporary left

    second = run_worker(*arguments)
    assert second.returncode == 0, second.stderr
    [again] = read_results(out)
    assert again["from_store"] is True
    assert {**again, "from_store": False} == result


def test_evaluate_several_candidates_in_one_call(iris_doc: Doc, store_root: str, tmp_path: Path) -> None:
    plan = plan_for(iris_doc(), store_root)
    out = tmp_path / "out.json"
    assert worker.main(["evaluate", "--plan", plan.uri, "--candidate", "2", "--candidate", "0", "--out", str(out)]) == 0
    results = read_results(out)
    assert [r["index"] for r in results] == [2, 0]
    assert [r["key"] for r in results] == [plan.candidates[2]["key"], plan.candidates[0]["key"]]


def test_evaluate_without_out_prints_json(iris_doc: Doc, store_root: str, capsys: pytest.CaptureFixture[str]) -> None:
    plan = plan_for(iris_doc(), store_root)
    assert worker.main(["evaluate", "--plan", plan.uri, "--candidate", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["index"] == 0


def test_failed_fits_are_data_with_exit_code_0(iris_doc: Doc, store_root: str, tmp_path: Path) -> None:
    # A class weight for a class iris does not have fails every fit (a valid value the data refuses); with
    # error_score nan the candidate is recorded, not raised.
    plan = plan_for(iris_doc(param_grid={"clf__class_weight": [{"5": 1.0}, None]}), store_root)
    out = tmp_path / "out.json"
    assert worker.main(["evaluate", "--plan", plan.uri, "--candidate", "0", "--out", str(out)]) == 0
    [result] = read_results(out)
    assert result["n_failed_fits"] == 3
    assert "class" in result["error"]
    assert all(np.isnan(result["test_scores"]["score"]))


@pytest.mark.parametrize(
    ("command", "arguments", "message"),
    [
        pytest.param(
            "evaluate", ["--candidate", "3"], r"candidate 3 is out of range: the plan has 3 candidates", id="index-3"
        ),
        pytest.param(
            "evaluate", ["--candidate", "-1"], r"candidate -1 is out of range: the plan has 3 candidates", id="negative"
        ),
        pytest.param(
            "refit",
            ["--candidate", "7", "--model", "{tmp}/model.joblib"],
            r"candidate 7 is out of range: the plan has 3 candidates",
            id="refit-index",
        ),
    ],
)
def test_out_of_range_candidate_exits_2(
    iris_doc: Doc,
    store_root: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    arguments: list[str],
    message: str,
) -> None:
    plan = plan_for(iris_doc(), store_root)
    argv = [command, "--plan", plan.uri, *(a.format(tmp=tmp_path) for a in arguments)]
    assert worker.main(argv) == worker.EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith("airflow-grid worker: bad input: ")
    with pytest.raises(worker.BadInput, match=message):
        if command == "evaluate":
            worker.evaluate_candidates(plan.uri, [int(arguments[1])])
        else:
            worker.refit_candidate(plan.uri, int(arguments[1]), str(tmp_path / "model.joblib"))


@pytest.mark.parametrize(
    ("plan_uri", "message"),
    [
        pytest.param("{store}/plans/0123456789abcdef01234567", r"plan\.json", id="missing-plan"),
        pytest.param("{store}/not-a-plan", r"is not a plan URI: expected <store root>/plans/<plan_id>", id="not-a-uri"),
        pytest.param("{store}/plans/", r"plan\.json", id="empty-plan-id"),
    ],
)
def test_missing_plan_exits_2(store_root: str, capsys: pytest.CaptureFixture[str], plan_uri: str, message: str) -> None:
    uri = plan_uri.format(store=store_root)
    assert worker.main(["evaluate", "--plan", uri, "--candidate", "0"]) == worker.EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith(f"airflow-grid worker: bad input: cannot read the plan at {uri!r}")
    with pytest.raises(worker.BadInput, match=message):
        worker.evaluate_candidates(uri, [0])


def test_bad_input_process_exit_code_and_stderr(iris_doc: Doc, store_root: str, tmp_path: Path) -> None:
    plan = plan_for(iris_doc(), store_root)
    out = tmp_path / "out.json"
    completed = run_worker("evaluate", "--plan", plan.uri, "--candidate", "9", "--out", str(out))
    assert completed.returncode == 2
    assert completed.stderr.strip() == (
        "airflow-grid worker: bad input: candidate 9 is out of range: the plan has 3 candidates."
    )
    assert not out.exists()


def test_plan_on_non_local_store(iris_doc: Doc, tmp_path: Path) -> None:
    """Pods read plans from object storage: the same worker code on an fsspec filesystem that is not local."""
    root = f"memory://airflow-grid-worker-{tmp_path.name}"
    try:
        plan = plan_for(iris_doc(), root)
        assert plan.uri.startswith("memory://")
        payload = worker.evaluate_candidates(plan.uri, [0])
        assert payload["results"][0]["from_store"] is False
        assert worker.evaluate_candidates(plan.uri, [0])["results"][0]["from_store"] is True
        assert load_plan(plan.uri).plan_id == plan.plan_id
    finally:
        store = Store(root)
        store.fs.rm(store._root_path, recursive=True)


# --------------------------------------------------------------------------------------------------
# CPU budget: n_jobs comes from resources.cpu, never -1


@pytest.mark.parametrize(
    ("cpu", "n_folds", "expected"),
    [
        pytest.param(1, 3, (1, 1), id="1cpu-3folds"),
        pytest.param(0.5, 3, (1, 1), id="half-cpu"),
        pytest.param(1.9, 5, (1, 1), id="fraction-rounds-down"),
        pytest.param(2, 3, (2, 1), id="2cpu-3folds"),
        pytest.param(4, 3, (3, 1), id="more-cpus-than-folds"),
        pytest.param(8, 3, (3, 2), id="leftover-cores-as-threads"),
        pytest.param(16, 5, (5, 3), id="16cpu-5folds"),
        pytest.param(2, 1, (1, 2), id="refit-one-fit"),
    ],
)
def test_budget(cpu: float, n_folds: int, expected: tuple[int, int]) -> None:
    assert cv.budget(cpu, n_folds) == expected


@pytest.mark.parametrize("n_folds", [1, 2, 3, 5, 10])
@pytest.mark.parametrize("cpu", [0.1, 0.5, 1, 1.5, 2, 3, 7, 64])
def test_budget_never_exceeds_cpus_and_is_never_negative(cpu: float, n_folds: int) -> None:
    n_jobs, threads = cv.budget(cpu, n_folds)
    assert 1 <= n_jobs <= n_folds
    assert threads >= 1
    assert n_jobs * threads <= max(1, int(cpu))


def test_thread_env_caps_every_pool() -> None:
    assert cv.thread_env(2) == dict.fromkeys(cv.THREAD_ENV_VARS, "2")


@pytest.mark.parametrize(
    ("cpu", "n_jobs"),
    [pytest.param(1, 1, id="cpu-1"), pytest.param("500m", 1, id="cpu-500m"), pytest.param(2, 2, id="cpu-2")],
)
def test_result_records_n_jobs_from_cpu(
    iris_doc: Doc, store_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu: Any, n_jobs: int
) -> None:
    passed: list[Any] = []
    real = sklearn.model_selection.cross_validate

    def spy(*args: Any, **kwargs: Any) -> Any:
        passed.append(kwargs["n_jobs"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sklearn.model_selection, "cross_validate", spy)
    plan = plan_for(iris_doc(resources={"cpu": cpu, "memory": "1Gi"}), store_root)
    out = tmp_path / "out.json"
    with parallel_config(backend="threading"):  # same n_jobs, without starting worker processes in the test
        assert worker.main(["evaluate", "--plan", plan.uri, "--candidate", "0", "--out", str(out)]) == 0
    [result] = read_results(out)
    assert (result["n_jobs"], result["threads"]) == (n_jobs, 1)
    assert passed == [n_jobs]


# --------------------------------------------------------------------------------------------------
# refit


HOLDOUT = {"test_size": 0.2, "random_state": 0, "stratify": True}


def test_refit_writes_model_and_holdout_score(iris_doc: Doc, store_root: str, tmp_path: Path) -> None:
    plan = plan_for(iris_doc(holdout=HOLDOUT), store_root)
    model_path = tmp_path / "model" / "model.joblib"
    out = tmp_path / "refit.json"
    argv = ["refit", "--plan", plan.uri, "--candidate", "1", "--model", str(model_path), "--out", str(out)]
    assert worker.main(argv) == 0

    outcome = json.loads(out.read_text())
    assert outcome["model_path"] == str(model_path)
    assert (outcome["index"], outcome["key"]) == (1, plan.candidates[1]["key"])
    assert (outcome["holdout_metric"], outcome["n_holdout"]) == ("score", 30)
    model = joblib.load(model_path)
    assert model.get_params()["clf__C"] == 1
    store = Store(store_root)
    X_holdout = read_table(store.local_path(str(plan.file("X_holdout")), str(tmp_path)))
    y_holdout = read_table(store.local_path(str(plan.file("y_holdout")), str(tmp_path)))
    assert outcome["holdout_score"] == accuracy_score(y_holdout, model.predict(X_holdout))
    assert 0.8 <= outcome["holdout_score"] <= 1.0


def test_refit_without_holdout_has_no_holdout_score(iris_doc: Doc, store_root: str, tmp_path: Path) -> None:
    plan = plan_for(iris_doc(), store_root)
    model_path = tmp_path / "model.joblib"
    outcome = worker.refit_candidate(plan.uri, 0, str(model_path))
    assert outcome["holdout_score"] is None and "n_holdout" not in outcome
    model = joblib.load(model_path)
    assert model.predict(np.zeros((1, 4))).shape == (1,)


def test_worker_keeps_the_allowlist_the_plan_was_validated_with(
    iris_doc: Doc, store_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefix allowed by the planner's environment stays allowed in a worker (a pod) whose environment lacks it."""
    module = f"airflow_grid_models_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text("from sklearn.svm import SVC as Model\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(ALLOWED_TARGETS_ENV, f"{module}.")
    estimator = {"_target_": "sklearn.pipeline.Pipeline", "steps": [["clf", {"_target_": f"{module}.Model"}]]}
    plan = plan_for(iris_doc(estimator=estimator), store_root)
    monkeypatch.delenv(ALLOWED_TARGETS_ENV)
    try:
        assert worker.evaluate_candidates(plan.uri, [0])["results"][0]["n_failed_fits"] == 0
    finally:
        sys.modules.pop(module, None)


def test_a_worker_that_cannot_mark_the_plan_in_use_still_evaluates(
    iris_doc: Doc, store_root: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pod runs as another user than the planner and may not write into the plan's directory (seen on the lab
    cluster): the in-use mark is best effort, the candidate's result is not."""
    plan = plan_for(iris_doc(), store_root)

    def refuse(self: Store, plan_id: str) -> None:
        raise PermissionError(13, "Permission denied", f"plans/{plan_id}/in_use")

    monkeypatch.setattr(Store, "touch_in_use", refuse)
    [result] = worker.evaluate_candidates(plan.uri, [0])["results"]
    assert result["n_failed_fits"] == 0 and not result["from_store"]
    assert "could not mark plan" in capsys.readouterr().err
