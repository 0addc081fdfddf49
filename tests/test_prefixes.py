"""Shared pipeline prefixes: one prefix fit per fold gives exactly the scores of fitting each pipeline anew.

Unit level: :func:`airflow_grid.cv.evaluate_shared_prefix` against :func:`airflow_grid.cv.evaluate` per pipeline
(train scores, multi-metric with probability scorers, failures in the prefix and in a final step). End to end:
``airflow-grid run`` against GridSearchCV cell by cell, and the prefix fitted once per fold, not per candidate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import check_scoring
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from airflow_grid import cv, prefixes
from airflow_grid.plan import make_plan, units
from airflow_grid.spec import parse_spec
from airflow_grid.store import Store
from tests.test_equivalence import Reference, _check_ok, assert_equivalent, fit_reference, run_cli, write_spec

X, Y = load_breast_cancer(return_X_y=True)
FOLDS = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, Y))


def _pipeline(n_components: int, final: Any, solver: str = "auto") -> Pipeline:
    pca = PCA(n_components=n_components, svd_solver=solver)
    return Pipeline([("scale", StandardScaler()), ("pca", pca), ("clf", final)])


def _without_times(result: dict[str, Any]) -> str:
    """Every field but the timings and the error text (a traceback), NaN equal to NaN."""
    kept = {k: v for k, v in result.items() if k not in ("fit_time", "score_time", "error", "n_jobs")}
    return json.dumps(kept, sort_keys=True)


def _compare(estimators: list[Any], scoring: Any, metric_names: list[str], error_score: Any = np.nan) -> list[Any]:
    common: dict[str, Any] = {
        "scoring": scoring, "metric_names": metric_names, "error_score": error_score, "return_train_score": True,
    }  # fmt: skip
    shared = cv.evaluate_shared_prefix(estimators, X, Y, FOLDS, cpu=2, **common)
    for estimator, result in zip(estimators, shared, strict=True):
        alone = cv.evaluate(clone(estimator), X, Y, FOLDS, cpu=1, **common)
        assert _without_times(result) == _without_times(alone)
        assert (result["error"] is None) == (alone["error"] is None)
    return shared


def test_shared_prefix_scores_equal_independent_fits() -> None:
    finals = [LogisticRegression(C=c, max_iter=500) for c in (0.01, 0.1, 1, 10)]
    finals.append(SVC(probability=True, random_state=0))
    _compare([_pipeline(5, final) for final in finals], ["accuracy", "roc_auc", "neg_log_loss"],
             ["accuracy", "roc_auc", "neg_log_loss"])  # fmt: skip
    _compare([_pipeline(8, final) for final in finals[:2]], None, ["score"])  # the pipeline's own score
    # svd_solver="full": PCA.fit_transform (U * S) and PCA.transform (X @ V.T) differ in the last bits, so fitting
    # on the one and scoring on the other, as a Pipeline does, is what makes these equal.
    _compare([_pipeline(6, final, "full") for final in finals[:3]], "neg_log_loss", ["score"])


def test_failures_in_the_prefix_and_in_a_final_step() -> None:
    too_many = [_pipeline(200, LogisticRegression(C=c)) for c in (0.1, 1)]  # PCA: more components than features
    results = _compare(too_many, "accuracy", ["score"])
    assert all(r["n_failed_fits"] == 3 for r in results)
    bad_final = [_pipeline(4, LogisticRegression()), _pipeline(4, SVC(kernel="precomputed"))]  # not square
    results = _compare(bad_final, "accuracy", ["score"])
    assert results[0]["n_failed_fits"] == 0 and results[1]["n_failed_fits"] == 3
    with pytest.raises(ValueError, match="n_components"):
        cv.evaluate_shared_prefix(too_many, X, Y, FOLDS, scoring="accuracy", metric_names=["score"],
                                  error_score="raise", return_train_score=False, cpu=1)  # fmt: skip


def test_the_prefix_is_fitted_once_per_fold() -> None:
    fits: list[int] = []

    class CountingScaler(StandardScaler):
        def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> Any:
            fits.append(1)
            return super().fit(X, y, sample_weight)

    pipelines = [Pipeline([("scale", CountingScaler()), ("clf", LogisticRegression(C=c))]) for c in (0.1, 1, 10)]
    prefixes.fit_group(pipelines, X, Y, FOLDS, scorers=check_scoring(pipelines[0], "accuracy"),
                       return_train_score=False, error_score=np.nan, n_jobs=1)  # fmt: skip
    assert len(fits) == len(FOLDS)


def test_which_rows_share_a_prefix() -> None:
    rows = [
        {"index": 0, "params": {"pca__n_components": 5, "clf__C": 1}},
        {"index": 1, "params": {"pca__n_components": 5, "clf__C": 10}},
        {"index": 2, "params": {"pca__n_components": 9, "clf__C": 1}},  # alone: no other with 9
        {"index": 3, "params": {"pca__n_components": 5, "clf": {"_target_": "sklearn.svm.SVC"}}},  # a final swap
        {"index": 4, "params": {"memory": None, "clf__C": 1}},  # a pipeline-level parameter: never shared
    ]
    found, rest = prefixes.find(rows, "clf")
    assert [[r["index"] for r in group] for group in found] == [[0, 1, 3]]
    assert [r["index"] for r in rest] == [2, 4]
    assert prefixes.find(rows, None) == ([], rows)
    assert prefixes.final_step(LogisticRegression()) is None
    assert prefixes.final_step(Pipeline([("clf", LogisticRegression())])) is None  # nothing to share
    assert prefixes.final_step(_pipeline(2, SVC())) == "clf"


PIPELINE_GRID = {"pca__n_components": [10, 20, 30], "clf__C": [0.01, 0.1, 1]}


def _pipeline_spec(**fields: Any) -> dict[str, Any]:
    return {
        "name": "prefixes",
        "data": {"_target_": "sklearn.datasets.load_digits", "return_X_y": True},
        "estimator": {
            "_target_": "sklearn.pipeline.Pipeline",
            "steps": [
                ["scale", {"_target_": "sklearn.preprocessing.StandardScaler"}],
                ["pca", {"_target_": "sklearn.decomposition.PCA"}],
                ["clf", {"_target_": "sklearn.linear_model.LogisticRegression", "max_iter": 300}],
            ],
        },
        "param_grid": PIPELINE_GRID,
        "cv": 4,
        "scoring": ["accuracy", "neg_log_loss"],
        "refit": "neg_log_loss",
        "return_train_score": True,
        "holdout": {"test_size": 0.25, "random_state": 0},
        **fields,
    }


def test_prefix_groups_are_units_of_work(tmp_path: Path) -> None:
    plan = make_plan(parse_spec(_pipeline_spec()), Store(str(tmp_path / "store")))
    # ParameterGrid sorts the names: clf__C outer, pca__n_components fastest; a unit is one n_components
    assert units(plan, 0, list(range(9))) == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    plan = make_plan(parse_spec(_pipeline_spec(units="candidate")), Store(str(tmp_path / "store")))
    assert units(plan, 0, list(range(9))) == [[i] for i in range(9)]


@pytest.mark.slow
def test_shared_prefix_run_matches_gridsearchcv(tmp_path: Path) -> None:
    run = run_cli(tmp_path, write_spec(tmp_path, "prefixes", _pipeline_spec()))
    _check_ok(run)
    X_digits, y_digits = load_digits(return_X_y=True)
    pipeline = Pipeline([("scale", StandardScaler()), ("pca", PCA()), ("clf", LogisticRegression(max_iter=300))])
    ref = Reference(
        pipeline, PIPELINE_GRID, X_digits, y_digits, cv=4, scoring=["accuracy", "neg_log_loss"],
        refit="neg_log_loss", return_train_score=True, holdout=(0.25, 0),
    )  # fmt: skip
    # The worker's BLAS runs 1 thread (resources.cpu 1); multinomial LogisticRegression's log-loss differs in the
    # last bits (~1e-13) between 1 and 2 BLAS threads, with or without sharing, so compare at the same count.
    with threadpool_limits(limits=1):
        fitted = fit_reference(ref)
    assert_equivalent(run, fitted, ref)
    stored = list((tmp_path / "store" / "results").rglob("*.json"))
    assert len(stored) == 9 and all('"shared_prefix"' in path.read_text() for path in stored)
