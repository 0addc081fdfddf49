"""Warm-start chains: growing an ensemble along its sizes gives exactly the scores of fitting each size anew.

Every class in :data:`airflow_grid.chains.CHAINABLE` is proven here (the chain's per-fold scores equal the
independent path's, cell for cell, train scores included); the CLI cases compare with GridSearchCV itself through
the equivalence harness. Plus: what is and is not chained, how chains become units of work, and a failed fit in
the middle of a chain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.ensemble import (
    BaggingClassifier,
    BaggingRegressor,
    ExtraTreesClassifier,
    ExtraTreesRegressor,
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.metrics import check_scoring
from sklearn.model_selection import KFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from airflow_grid import chains, cv
from airflow_grid.plan import make_plan, units, work_items
from airflow_grid.spec import SpecError, parse_spec
from airflow_grid.store import Store
from tests.test_equivalence import Reference, _check_ok, assert_equivalent, fit_reference, run_cli, write_spec

X_CLS, Y_CLS = load_breast_cancer(return_X_y=True)
X_REG, Y_REG = load_diabetes(return_X_y=True)
FOLDS = list(KFold(3, shuffle=True, random_state=0).split(X_CLS))
FOLDS_REG = list(KFold(3, shuffle=True, random_state=0).split(X_REG))
SIZES = [3, 8, 20]

PROVEN = [
    RandomForestClassifier(random_state=0, max_features=0.3),
    RandomForestClassifier(random_state=1, oob_score=True, max_samples=0.5),
    ExtraTreesClassifier(random_state=2, bootstrap=True),
    RandomForestRegressor(random_state=0, max_features=0.5),
    ExtraTreesRegressor(random_state=3),
    GradientBoostingClassifier(random_state=0, subsample=0.7, max_features=0.5, max_depth=2),
    GradientBoostingRegressor(random_state=4, subsample=0.8),
    BaggingClassifier(random_state=0, max_samples=0.6, max_features=0.7),
    BaggingRegressor(random_state=5, bootstrap_features=True),
]


def _independent(estimator: Any, X: Any, y: Any, folds: Any, size: int, scoring: Any = None) -> dict[str, Any]:
    return cv.evaluate(
        clone(estimator).set_params(n_estimators=size), X, y, folds, scoring=scoring,
        metric_names=["score"] if not isinstance(scoring, list) else scoring, error_score=np.nan,
        return_train_score=True, cpu=1,
    )  # fmt: skip


def _without_times(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("fit_time", "score_time")}


@pytest.mark.parametrize("estimator", PROVEN, ids=lambda e: f"{type(e).__name__}")
def test_every_chainable_class_is_proven_exact(estimator: Any) -> None:
    assert chains.chainable(estimator)
    classifier = "Classifier" in type(estimator).__name__
    X, y, folds = (X_CLS, Y_CLS, FOLDS) if classifier else (X_REG, Y_REG, FOLDS_REG)
    scoring = ["accuracy", "neg_log_loss"] if classifier else None
    metric_names = scoring or ["score"]
    chained = cv.evaluate_chain(
        estimator, "n_estimators", SIZES, X, y, folds, scoring=scoring, metric_names=metric_names,
        error_score=np.nan, return_train_score=True, cpu=2,
    )  # fmt: skip
    for size, result in zip(SIZES, chained, strict=True):
        independent = _independent(estimator, X, y, folds, size, scoring)
        assert _without_times(result) | {"n_jobs": 0} == _without_times(independent) | {"n_jobs": 0}, size
        assert all(t >= 0 for t in result["fit_time"])


def test_a_chain_fits_each_member_once() -> None:
    """The point of a chain: sizes 3, 8, 20 fit 20 trees per fold, not 31."""
    made: list[int] = []

    class Counting(RandomForestClassifier):
        def _make_estimator(self, append: bool = True, random_state: Any = None) -> Any:
            made.append(1)
            return super()._make_estimator(append=append, random_state=random_state)

    chains.fit_chain(
        Counting(random_state=0), "n_estimators", SIZES, X_CLS, Y_CLS, FOLDS, scorers=check_scoring(Counting()),
        fit_params=None,
        return_train_score=False, error_score=np.nan, n_jobs=1,
    )  # fmt: skip
    assert len(made) == SIZES[-1] * len(FOLDS)


def test_chain_fit_time_is_cumulative() -> None:
    results = cv.evaluate_chain(
        RandomForestClassifier(random_state=0), "n_estimators", [5, 50, 100], X_CLS, Y_CLS, FOLDS, scoring=None,
        metric_names=["score"], error_score=np.nan, return_train_score=False, cpu=1,
    )  # fmt: skip
    for fold in range(len(FOLDS)):
        times = [r["fit_time"][fold] for r in results]
        assert times == sorted(times)


def test_a_failed_size_restarts_the_chain_afresh() -> None:
    """A fit that fails mid-chain leaves the model half-grown: the next size is fitted from scratch."""

    class FailsAtEight(RandomForestClassifier):
        def fit(self, X: Any, y: Any, sample_weight: Any = None) -> Any:
            if self.n_estimators == 8:  # fail, leaving a model that growing would build on
                self.estimators_ = [self.estimators_[0]] * 7 if hasattr(self, "estimators_") else []
                raise ValueError("eight is unlucky")
            return super().fit(X, y, sample_weight)

    estimator = FailsAtEight(random_state=0)
    results = cv.evaluate_chain(
        estimator, "n_estimators", SIZES, X_CLS, Y_CLS, FOLDS, scoring=None, metric_names=["score"],
        error_score=np.nan, return_train_score=False, cpu=1,
    )  # fmt: skip
    assert results[1]["n_failed_fits"] == 3 and "eight is unlucky" in results[1]["error"]
    assert np.isnan(results[1]["test_scores"]["score"]).all()
    last = _independent(RandomForestClassifier(random_state=0), X_CLS, Y_CLS, FOLDS, 20)
    assert results[2]["test_scores"] == last["test_scores"]


@pytest.mark.parametrize(
    ("estimator", "chained"),
    [
        (RandomForestClassifier(), True),
        (Pipeline([("scale", StandardScaler()), ("clf", GradientBoostingClassifier())]), True),
        (GradientBoostingClassifier(n_iter_no_change=3), False),  # early stopping: not proven
        (BaggingClassifier(oob_score=True), False),  # sklearn refuses oob_score with warm_start
    ],
)
def test_which_owners_chain(estimator: Any, chained: bool) -> None:
    path = "clf__n_estimators" if isinstance(estimator, Pipeline) else "n_estimators"
    rows = [{"index": i, "params": {path: size, "x": 1}} for i, size in enumerate([30, 10, 20])]
    found, rest = chains.find(rows, lambda params: estimator)
    if chained:
        assert [[r["index"] for r in chain] for chain in found] == [[1, 2, 0]] and rest == []
    else:
        assert found == [] and [r["index"] for r in rest] == [0, 1, 2]


def test_only_candidates_equal_but_for_the_size_chain() -> None:
    rows = [
        {"index": 0, "params": {"n_estimators": 10, "max_depth": 2}},
        {"index": 1, "params": {"n_estimators": 20, "max_depth": 2}},
        {"index": 2, "params": {"n_estimators": 10, "max_depth": 3}},  # alone: no other size with depth 3
        {"index": 3, "params": {"max_depth": 2}},  # no size
        {"index": 4, "params": {"n_estimators": 20, "max_depth": 2}},  # a repeated size: not chained
    ]
    found, rest = chains.find(rows, lambda params: RandomForestClassifier())
    assert found == [] and [r["index"] for r in rest] == [0, 1, 2, 3, 4]
    found, rest = chains.find(rows[:4], lambda params: RandomForestClassifier())
    assert [[r["index"] for r in chain] for chain in found] == [[0, 1]] and [r["index"] for r in rest] == [2, 3]


FOREST_GRID = {"clf__n_estimators": [20, 5, 10], "clf__max_depth": [2, None]}


def _forest_spec(**fields: Any) -> dict[str, Any]:
    return {
        "name": "chains",
        "data": {"_target_": "sklearn.datasets.load_breast_cancer", "return_X_y": True},
        "estimator": {
            "_target_": "sklearn.pipeline.Pipeline",
            "steps": [
                ["scale", {"_target_": "sklearn.preprocessing.StandardScaler"}],
                ["clf", {"_target_": "sklearn.ensemble.RandomForestClassifier", "random_state": 0}],
            ],
        },
        "param_grid": FOREST_GRID,
        "cv": 3,
        "scoring": ["accuracy", "roc_auc"],
        "refit": "roc_auc",
        "return_train_score": True,
        **fields,
    }


def test_chains_are_units_of_work(tmp_path: Path) -> None:
    plan = make_plan(parse_spec(_forest_spec()), Store(str(tmp_path / "store")))
    # ParameterGrid order: max_depth 2 x sizes 20, 5, 10 (0-2), then max_depth None (3-5)
    assert units(plan, 0, list(range(6))) == [[1, 2, 0], [4, 5, 3]]
    assert [item["indices"] for item in work_items(plan, 0, list(range(6)))] == [[1, 2, 0], [4, 5, 3]]
    assert [item["indices"] for item in work_items(plan, 0, list(range(6)), max_parallel=1)] == [[1, 2, 0, 4, 5, 3]]
    single = make_plan(parse_spec(_forest_spec(units="candidate")), Store(str(tmp_path / "store")))
    assert units(single, 0, list(range(6))) == [[i] for i in range(6)]
    timed = make_plan(parse_spec(_forest_spec(resources={"timeout": "10m"})), Store(str(tmp_path / "store")))
    assert units(timed, 0, list(range(6))) == [[i] for i in range(6)]
    with pytest.raises(SpecError, match=r"spec\.units: got 'chain'"):
        parse_spec(_forest_spec(units="chain"))


@pytest.mark.slow
@pytest.mark.parametrize("per_process", ["1", "6"])
def test_chained_run_matches_gridsearchcv(tmp_path: Path, per_process: str) -> None:
    run = run_cli(
        tmp_path, write_spec(tmp_path, "chains", _forest_spec()), "out", "--candidates-per-process", per_process
    )
    _check_ok(run)
    ref = Reference(
        Pipeline([("scale", StandardScaler()), ("clf", RandomForestClassifier(random_state=0))]), FOREST_GRID,
        X_CLS, Y_CLS, cv=3, scoring=["accuracy", "roc_auc"], refit="roc_auc", return_train_score=True,
    )  # fmt: skip
    assert_equivalent(run, fit_reference(ref), ref)
    stored = list((tmp_path / "store" / "results").rglob("*.json"))
    assert len(stored) == 6
    assert sum('"chain"' in path.read_text() for path in stored) == 6  # every candidate came from a chain


@pytest.mark.slow
def test_chained_gradient_boosting_regressor_matches_gridsearchcv(tmp_path: Path) -> None:
    grid = {"n_estimators": [10, 40], "learning_rate": [0.1, 0.3], "subsample": [1.0, 0.6]}
    spec = {
        "name": "chains-gb",
        "data": {"_target_": "sklearn.datasets.load_diabetes", "return_X_y": True},
        "estimator": {"_target_": "sklearn.ensemble.GradientBoostingRegressor", "random_state": 0},
        "param_grid": grid,
        "cv": {"_target_": "sklearn.model_selection.KFold", "n_splits": 4, "shuffle": True, "random_state": 1},
        "scoring": "neg_mean_squared_error",
        "holdout": {"test_size": 0.2, "random_state": 0},
    }
    run = run_cli(tmp_path, write_spec(tmp_path, "chains-gb", spec))
    _check_ok(run)
    ref = Reference(
        GradientBoostingRegressor(random_state=0), grid, X_REG, Y_REG,
        cv=KFold(n_splits=4, shuffle=True, random_state=1), scoring="neg_mean_squared_error", holdout=(0.2, 0),
        stratify=False,
    )  # fmt: skip
    assert_equivalent(run, fit_reference(ref), ref)
