"""``resources.timeout``: parsing, keys, fold processes that are stopped, and the evaluate task's deadline.

The study tests run `airflow-grid run` in a subprocess (plan, worker processes, store, reduction) against
GridSearchCV built with plain scikit-learn, as tests/test_equivalence.py does.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.datasets import load_iris
from sklearn.decomposition import PCA
from sklearn.ensemble import GradientBoostingClassifier as _GradientBoosting
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from sklearn.pipeline import Pipeline
from sklearn.svm import SVC
from test_equivalence import CASES, Reference, _check_ok, assert_equivalent, fit_reference, run_cli, write_spec

from airflow_grid import cv, grid, timeouts
from airflow_grid.plan import make_plan, work_items
from airflow_grid.spec import Resources, SpecError, parse_spec
from airflow_grid.store import Store

pytestmark = pytest.mark.usefixtures("thread_env")

BASE_KEY_ARGS: dict[str, Any] = {
    "params": {"clf__C": 1},
    "folds_hash": "f" * 64,
    "data_fingerprint": "d" * 64,
    "versions": {"scikit-learn": "1.9.1", "numpy": "2.4.0", "scipy": "1.17.0"},
}


# --------------------------------------------------------------------------------------------------
# Parsing and keys


@pytest.mark.parametrize(
    ("value", "seconds", "text"),
    [
        pytest.param("30s", 30.0, "30s", id="seconds"),
        pytest.param("10m", 600.0, "10m", id="minutes"),
        pytest.param("1.5h", 5400.0, "1.5h", id="hours-fraction"),
        pytest.param(90, 90.0, "90s", id="number"),
        pytest.param(0.5, 0.5, "0.5s", id="number-fraction"),
    ],
)
def test_timeout_forms(iris_doc: Any, value: Any, seconds: float, text: str) -> None:
    resources = parse_spec(iris_doc(resources={"cpu": 1, "memory": "1Gi", "timeout": value})).resources
    assert (resources.timeout, resources.timeout_text) == (seconds, text)
    assert resources.to_json() == {"cpu": "1", "memory": "1Gi", "timeout": text}


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("10 minutes", id="words"),
        pytest.param("10", id="string-without-unit"),
        pytest.param("10d", id="days"),
        pytest.param("-5m", id="negative"),
        pytest.param("0s", id="zero-duration"),
        pytest.param(0, id="zero"),
        pytest.param(-1, id="negative-number"),
        pytest.param(True, id="bool"),
        pytest.param(float("inf"), id="infinite"),
        pytest.param([10], id="list"),
    ],
)
def test_invalid_timeouts_name_the_field_the_value_and_the_fix(iris_doc: Any, value: Any) -> None:
    with pytest.raises(SpecError, match=r"^spec\.resources\.timeout: got .*Fix: give a duration such as 10m or 90s\.$"):
        parse_spec(iris_doc(resources={"timeout": value}))
    with pytest.raises(SpecError) as raised:
        parse_spec(iris_doc(resources={"timeout": value}))
    assert repr(value) in str(raised.value)


def test_no_timeout_leaves_resources_and_keys_unchanged(iris_doc: Any) -> None:
    spec = parse_spec(iris_doc(resources={"cpu": 1, "memory": "1Gi"}))
    assert spec.resources.timeout is None
    assert spec.resources.to_json() == {"cpu": "1", "memory": "1Gi"}  # what plan documents carried before
    assert Resources().to_json() == {"cpu": "1", "memory": "2Gi"}
    key = grid.candidate_key(spec, **BASE_KEY_ARGS)
    assert key == grid.candidate_key(parse_spec(iris_doc()), **BASE_KEY_ARGS)  # resources never were in it
    timed = grid.candidate_key(parse_spec(iris_doc(resources={"timeout": "10m"})), **BASE_KEY_ARGS)
    assert timed != key  # a timeout can turn a score into error_score
    same = [grid.candidate_key(parse_spec(iris_doc(resources={"timeout": t})), **BASE_KEY_ARGS) for t in (600, "600s")]
    assert same == [timed, timed]  # the duration, not its spelling
    other = grid.candidate_key(parse_spec(iris_doc(resources={"timeout": "11m"})), **BASE_KEY_ARGS)
    assert other != timed


def test_plan_items_carry_the_timeout_only_when_set(iris_doc: Any, store_root: str) -> None:
    plain = make_plan(parse_spec(iris_doc()), Store(store_root))
    assert all("timeout" not in item and "n_folds" not in item for item in work_items(plain, 0, [0, 1, 2]))
    assert plain.document["resources"] == {"cpu": "1", "memory": "2Gi"}
    timed = make_plan(parse_spec(iris_doc(resources={"cpu": 1, "memory": "1Gi", "timeout": "10m"})), Store(store_root))
    items = work_items(timed, 0, [0, 1, 2], max_parallel=2)
    assert [(item["timeout"], item["n_folds"], item["indices"]) for item in items] == [
        ("10m", 3, [0, 2]),
        ("10m", 3, [1]),
    ]


def test_search_params_form_accepts_timeouts() -> None:
    import jsonschema

    from airflow_grid.dag_factory import search_params

    schema = search_params()["resources"].schema
    for good in (
        {"timeout": "10m"},
        {"timeout": "1.5h"},
        {"timeout": 90},
        {"cpu": 1, "memory": "1Gi", "timeout": "30s"},
    ):
        jsonschema.validate(good, schema)
    for bad in ({"timeout": "10 minutes"}, {"timeout": 0}, {"timeout": "10"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


# --------------------------------------------------------------------------------------------------
# The task deadline


@pytest.mark.parametrize(
    ("timeout_s", "n_folds", "cpu", "n_candidates", "expected"),
    [
        pytest.param(600, 5, 1, 1, 600 * 5 + 120, id="one-core-folds-in-turn"),
        pytest.param(600, 5, 2, 1, 600 * 3 + 120, id="two-cores-three-rounds"),
        pytest.param(600, 5, 8, 1, 600 * 1 + 120, id="more-cores-than-folds"),
        pytest.param(60, 3, "500m", 4, 60 * 3 * 4 + 120, id="half-core-four-candidates"),
    ],
)
def test_task_deadline(timeout_s: float, n_folds: int, cpu: Any, n_candidates: int, expected: float) -> None:
    item = {"timeout": f"{timeout_s}s", "n_folds": n_folds, "cpu": cpu, "indices": list(range(n_candidates))}
    assert timeouts.item_deadline(item) == expected
    assert timeouts.item_deadline({"cpu": cpu, "indices": [0]}) is None  # no timeout, no deadline
    assert timeouts.item_deadline(item, margin_s=0) == expected - timeouts.STARTUP_MARGIN_S


def test_operators_take_the_deadline_from_the_item() -> None:
    from airflow_grid.operators.evaluate import LocalEvaluateOperator
    from airflow_grid.operators.kubernetes import KubernetesEvaluateOperator

    item = {"plan_uri": "/s/plans/p", "indices": [0, 1], "label": "a | b", "cpu": "2", "memory": "1Gi"}
    timed = {**item, "timeout": "10m", "n_folds": 5}
    assert LocalEvaluateOperator(task_id="e", candidate=item).execution_timeout is None
    local = LocalEvaluateOperator(task_id="e", candidate=timed)
    assert local.execution_timeout == timedelta(seconds=600 * 3 * 2 + 120)
    shorter = LocalEvaluateOperator(task_id="e", candidate=timed, execution_timeout=timedelta(minutes=5))
    assert shorter.execution_timeout == timedelta(minutes=5)  # a shorter execution_timeout given wins
    assert KubernetesEvaluateOperator(task_id="e", candidate=item, image="w").active_deadline_seconds is None
    pod = KubernetesEvaluateOperator(task_id="e", candidate=timed, image="w")
    assert pod.active_deadline_seconds == 600 * 3 * 2 + 120
    manifest = pod.build_pod_request_obj(None, dry_run=True)
    assert manifest.spec.active_deadline_seconds == 600 * 3 * 2 + 120


def test_each_mapped_item_gets_its_own_execution_timeout() -> None:
    """The task runner builds a mapped task's operator from its item (MappedOperator.unmap) before execute."""
    from airflow.sdk import DAG

    from airflow_grid.operators.evaluate import LocalEvaluateOperator

    item = {"plan_uri": "/s/plans/p", "indices": [0], "label": "a", "cpu": "1", "memory": "1Gi", "n_folds": 5}
    items = [{**item, "timeout": "1m"}, {**item, "timeout": "2m", "indices": [1, 2]}, item]
    with DAG("timeout_mapping", schedule=None):
        partial = LocalEvaluateOperator.partial(task_id="evaluate", execution_timeout=timedelta(hours=5))
        mapped = partial.expand(candidate=items)
    unmapped = [mapped.unmap({"candidate": each}).execution_timeout for each in items]
    assert unmapped == [timedelta(seconds=60 * 5 + 120), timedelta(seconds=120 * 5 * 2 + 120), timedelta(hours=5)]


def test_a_pod_past_its_deadline_is_reported_as_such() -> None:
    from kubernetes.client import models as k8s

    from airflow_grid.operators.kubernetes import describe_failure

    pod = k8s.V1Pod(
        spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="base")], active_deadline_seconds=3720),
        status=k8s.V1PodStatus(phase="Failed", reason="DeadlineExceeded", message="Pod was active too long"),
    )
    assert describe_failure(pod) == {
        "reason": "DeadlineExceeded",
        "message": "pod ran past its deadline of 3720s (derived from resources.timeout) and was stopped",
    }


def test_local_operator_stops_a_worker_past_its_deadline(tmp_path: Path) -> None:
    """A worker that hangs outside a fit (a fake `python` that sleeps, with a child) is stopped at the deadline.

    The task runner's own code applies ``execution_timeout`` around ``execute`` and calls ``on_kill``, as in a
    real task; no Airflow DB is needed.
    """
    from airflow.sdk.exceptions import AirflowTaskTimeout
    from airflow.sdk.execution_time.task_runner import _run_execute_callable

    from airflow_grid.operators.evaluate import LocalEvaluateOperator

    pids = tmp_path / "pids"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nsleep 300 &\necho $$ $! > {pids}\necho worker started\nwait\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    item = {
        "plan_uri": str(tmp_path / "plan"),
        "indices": [0],
        "label": "clf=SVC C=1",
        "cpu": "1",
        "memory": "1Gi",
        "timeout": "0.5s",
        "n_folds": 3,
    }
    operator = LocalEvaluateOperator(task_id="evaluate", candidate=item, python=str(fake), deadline_margin_s=1.0)
    assert operator.execution_timeout == timedelta(seconds=0.5 * 3 + 1.0)
    started = time.monotonic()
    with pytest.raises(AirflowTaskTimeout) as raised:
        _run_execute_callable({}, operator.execute, operator)
    elapsed = time.monotonic() - started
    assert 2.0 <= elapsed < 30, elapsed
    message = str(raised.value)
    assert "candidate(s) clf=SVC C=1: the worker ran past the task deadline of 2.5s" in message
    assert "resources.timeout=0.5s x 3 fold round(s) (3 folds, 1 at a time) x 1 candidate(s) + 1s start-up" in message
    shell, sleeper = (int(pid) for pid in pids.read_text().split())
    for pid in (shell, sleeper):  # the whole process group is gone, not only the worker
        assert _gone(pid), pid


def _gone(pid: int, within: float = 5.0) -> bool:
    """The process ended within ``within`` seconds (a zombie waiting to be reaped counts as ended)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as status:
                if status.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------------------------------
# Fold processes (in-process evaluate, no worker)


def _iris_folds() -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    X, y = load_iris(return_X_y=True)
    return X, y, [(train, test) for train, test in KFold(3).split(X, y)]  # unshuffled: fold 2 lacks a class


def _without_times(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("fit_time", "score_time")}


@pytest.mark.parametrize(
    ("estimator", "error_score"),
    [
        pytest.param(SVC(C=1), np.nan, id="all-folds-fit"),
        pytest.param(Pipeline([("pca", PCA(10)), ("clf", SVC())]), np.nan, id="all-folds-fail"),
        pytest.param(Pipeline([("pca", PCA(3)), ("clf", SVC())]), -1.0, id="no-failure-number"),
    ],
)
def test_fold_processes_give_the_in_process_results(estimator: Any, error_score: float) -> None:
    X, y, folds = _iris_folds()
    common: dict[str, Any] = {
        "scoring": {"acc": "accuracy", "bacc": "balanced_accuracy"},
        "metric_names": ["acc", "bacc"],
        "error_score": error_score,
        "return_train_score": True,
        "cpu": 2,
    }
    in_process = cv.evaluate(estimator, X, y, folds, **common)
    in_children = cv.evaluate(estimator, X, y, folds, **common, timeout=60, timeout_text="1m")
    assert json.dumps(_without_times(in_children)) == json.dumps(_without_times(in_process))  # NaN-safe, exact


def test_partial_failures_are_summarised_as_sklearn_does() -> None:
    """Some folds fail (one class in a training part): the same count and sklearn's own summary text."""
    X, y = load_iris(return_X_y=True)  # sorted by class: rows 0-49 are class 0, 50-99 class 1
    even, odd = np.arange(0, 150, 2), np.arange(1, 150, 2)
    folds = [(np.arange(50), odd), (even, odd), (np.arange(50, 100), even), (odd, even)]
    common: dict[str, Any] = {
        "scoring": "accuracy",
        "metric_names": ["score"],
        "error_score": 0.0,
        "return_train_score": False,
        "cpu": 1,
    }
    estimator = LogisticRegression(max_iter=1000)
    in_process = cv.evaluate(estimator, X, y, folds, **common)
    in_children = cv.evaluate(estimator, X, y, folds, **common, timeout=60)
    assert in_process["n_failed_fits"] == 2
    assert "2 fits failed out of a total of 4" in in_process["error"]
    assert _without_times(in_children) == _without_times(in_process)


def test_a_timed_out_fold_is_a_failed_fit() -> None:
    X, y, folds = _iris_folds()
    hung = _GradientBoosting(n_estimators=100_000, random_state=0)
    started = time.monotonic()
    result = cv.evaluate(
        hung, X, y, folds, scoring="accuracy", metric_names=["score"], error_score=np.nan,
        return_train_score=True, cpu=2, timeout=1.0, timeout_text="1s",
    )  # fmt: skip
    assert time.monotonic() - started < 30
    assert all(math.isnan(v) for v in result["test_scores"]["score"] + result["train_scores"]["score"])
    assert result["n_failed_fits"] == 3
    assert all(1.0 <= t < 10 for t in result["fit_time"]), result["fit_time"]  # the time each fold ran
    for fold in range(3):
        assert f"fold {fold} fit timed out after 1s (resources.timeout)" in result["error"]


class _ThreadProbe(ClassifierMixin, BaseEstimator):
    """Scores the largest native thread pool its fit saw, and the OMP_NUM_THREADS it ran with."""

    def fit(self, X: Any, y: Any) -> _ThreadProbe:
        from threadpoolctl import threadpool_info

        self.pools_ = max(pool["num_threads"] for pool in threadpool_info())
        self.env_ = int(os.environ["OMP_NUM_THREADS"])
        return self

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        return float(self.pools_ * 100 + self.env_)


@pytest.mark.parametrize(("cpu", "threads"), [(1, 1), (4, 2)])
def test_fold_processes_keep_the_thread_caps(cpu: int, threads: int) -> None:
    X, y = load_iris(return_X_y=True)
    folds = [(train, test) for train, test in KFold(2, shuffle=True, random_state=0).split(X)]
    result = cv.evaluate(
        _ThreadProbe(), X, y, folds, scoring=None, metric_names=["score"], error_score="raise",
        return_train_score=False, cpu=cpu, timeout=60,
    )  # fmt: skip
    assert result["threads"] == threads
    assert result["test_scores"]["score"] == [threads * 100 + threads] * 2


def test_a_timeout_under_error_score_raise_fails_the_candidate() -> None:
    X, y, folds = _iris_folds()
    hung = _GradientBoosting(n_estimators=100_000, random_state=0)
    with pytest.raises(timeouts.FoldTimeout, match=r"fold 0 fit timed out after 1s \(resources.timeout\); error_"):
        cv.evaluate(
            hung, X, y, folds, scoring="accuracy", metric_names=["score"], error_score="raise",
            return_train_score=False, cpu=1, timeout=1.0, timeout_text="1s",
        )  # fmt: skip


def test_a_fit_error_under_error_score_raise_is_the_estimators_own() -> None:
    X, y, folds = _iris_folds()
    estimator = Pipeline([("pca", PCA(10)), ("clf", SVC())])
    common: dict[str, Any] = {"scoring": "accuracy", "metric_names": ["score"], "return_train_score": False, "cpu": 1}
    with pytest.raises(ValueError) as in_process:
        cv.evaluate(estimator, X, y, folds, error_score="raise", **common)
    with pytest.raises(ValueError) as in_children:
        cv.evaluate(estimator, X, y, folds, error_score="raise", **common, timeout=60)
    assert (type(in_children.value), str(in_children.value)) == (type(in_process.value), str(in_process.value))


# --------------------------------------------------------------------------------------------------
# Whole studies through `airflow-grid run`


class GradientBoostingClassifier(_GradientBoosting):
    """The reference's stand-in for the hung candidate: same name and parameters, its fit fails at once.

    GridSearchCV then records error_score for it, which is what a timed-out candidate must record.
    """

    def fit(self, X: Any, y: Any, sample_weight: Any = None, monitor: Any = None) -> Any:
        raise RuntimeError("stands for a fit that ran past resources.timeout")


SVC_GRID: dict[str, Any] = {"clf": [{"_target_": "sklearn.svm.SVC"}], "clf__C": [0.1, 1, 10]}
HUNG = {"_target_": "sklearn.ensemble.GradientBoostingClassifier", "n_estimators": 100_000, "random_state": 0}


@pytest.mark.slow
def test_a_hung_candidate_is_recorded_and_the_study_finishes(tmp_path: Path) -> None:
    document = {
        "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
        "estimator": {"_target_": "sklearn.pipeline.Pipeline", "steps": [["clf", {"_target_": "sklearn.svm.SVC"}]]},
        "param_grid": [SVC_GRID, {"clf": [HUNG]}, {"clf": [{"_target_": "sklearn.svm.SVC"}], "clf__C": [100]}],
        "cv": 3,
        "scoring": "accuracy",
        "return_train_score": True,
        "resources": {"cpu": 1, "memory": "2Gi", "timeout": "3s"},
    }
    started = time.monotonic()
    run = run_cli(tmp_path, write_spec(tmp_path, "hung", document))
    wall = time.monotonic() - started
    _check_ok(run)
    assert wall < 120, f"the study took {wall:.0f}s: a hung fit stalled it"

    X, y = load_iris(return_X_y=True)
    svc_grid = {"clf": [SVC()], "clf__C": [0.1, 1, 10]}
    stand_in = {"clf": [GradientBoostingClassifier(n_estimators=100_000, random_state=0)]}
    reference_grid = [svc_grid, stand_in, {"clf": [SVC()], "clf__C": [100]}]
    ref = Reference(
        Pipeline([("clf", SVC())]), reference_grid, X, y, cv=3, scoring="accuracy", return_train_score=True, n_failed=1
    )
    assert_equivalent(run, fit_reference(ref), ref)  # every cell; the hung candidate's are NaN as in sklearn

    stored = [json.loads(path.read_text()) for path in (tmp_path / "store" / "results").glob("*/*.json")]
    hung = next(result for result in stored if result["index"] == 3)
    assert hung["n_failed_fits"] == 3
    assert all(math.isnan(v) for v in hung["test_scores"]["score"] + hung["train_scores"]["score"])
    for fold in range(3):
        assert f"fold {fold} fit timed out after 3s (resources.timeout)" in hung["error"]
    assert all(3.0 <= t < 30 for t in hung["fit_time"]), hung["fit_time"]
    assert all(result["n_failed_fits"] == 0 for result in stored if result["index"] != 3)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["single-metric-svc", "multi-metric-list-train-scores", "partial-failures-npz-error-score-number"]
)
def test_a_timeout_nothing_reaches_changes_no_score(tmp_path: Path, name: str) -> None:
    """Fold processes give GridSearchCV's cv_results cell by cell (failed fits included) when no fold times out."""
    spec, reference = CASES[name]
    document: dict[str, Any] = spec(tmp_path) if callable(spec) else spec  # type: ignore[assignment]
    document = {**document, "resources": {**document.get("resources", {}), "timeout": "5m"}}
    run = run_cli(tmp_path, write_spec(tmp_path, "timeout-unreached", document))
    _check_ok(run)
    ref = reference(tmp_path)
    assert_equivalent(run, fit_reference(ref), ref)


if sys.platform != "linux":  # fold processes are forked (see airflow_grid.timeouts)
    pytestmark = [pytestmark, pytest.mark.skip(reason="Linux only")]
