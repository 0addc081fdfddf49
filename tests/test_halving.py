"""Successive halving: `airflow-grid run` against HalvingGridSearchCV / HalvingRandomSearchCV, cell by cell.

Same machinery as tests/test_equivalence.py (the real CLI in a subprocess against the scikit-learn class built by
hand): every cv_results_ key including ``iter`` and ``n_resources``, the winner, the rounds' resources and sizes,
and the holdout score of the refit winner. Plus the plan-time errors a halving spec can hit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import loguniform, randint
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import Ridge
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import SVC

from airflow_grid import grid, halving
from airflow_grid.plan import make_plan
from airflow_grid.spec import SpecError, parse_spec
from airflow_grid.store import Store
from tests.test_equivalence import Reference, _check_ok, assert_equivalent, fit_reference, run_cli, write_spec

Case = tuple[dict[str, Any], Callable[[Path], Reference]]


def _digits_svc_n_samples() -> Case:
    """HalvingGridSearchCV's defaults (factor 3, n_samples, exhaust): three rounds on sub-samples."""
    spec = {
        "data": {"_target_": "sklearn.datasets.load_digits", "return_X_y": True},
        "estimator": {"_target_": "sklearn.svm.SVC"},
        "search": {"strategy": "halving_grid", "random_state": 0},
        "param_grid": {"C": [0.1, 1, 10], "gamma": [0.0001, 0.001, 0.01], "kernel": ["rbf"]},
        "cv": 3,
    }

    def reference(_: Path) -> Reference:
        X, y = load_digits(return_X_y=True)
        grid_ = {"C": [0.1, 1, 10], "gamma": [0.0001, 0.001, 0.01], "kernel": ["rbf"]}
        return Reference(
            SVC(), grid_, X, y, cv=3, return_train_score=True, halving={"strategy": "halving_grid", "random_state": 0}
        )

    return spec, reference


def _forest_n_estimators_resource() -> Case:
    """An estimator parameter as the resource: each round sets n_estimators, no sub-sampling."""
    search = {"strategy": "halving_grid", "resource": "n_estimators", "max_resources": 30, "factor": 2}
    spec = {
        "data": {"_target_": "sklearn.datasets.load_breast_cancer", "return_X_y": True},
        "estimator": {"_target_": "sklearn.ensemble.RandomForestClassifier", "random_state": 0},
        "search": search,
        "param_grid": {"max_depth": [2, 4, None], "max_features": ["sqrt", 0.5]},
        "cv": 3,
        "scoring": "roc_auc",
        "return_train_score": False,
        "holdout": {"test_size": 0.2, "random_state": 1},
    }

    def reference(_: Path) -> Reference:
        X, y = load_breast_cancer(return_X_y=True)
        grid_ = {"max_depth": [2, 4, None], "max_features": ["sqrt", 0.5]}
        return Reference(
            RandomForestClassifier(random_state=0), grid_, X, y, cv=3, scoring="roc_auc", holdout=(0.2, 1),
            halving=search,
        )  # fmt: skip

    return spec, reference


def _random_aggressive_elimination() -> Case:
    """More candidates than the resources allow rounds for: aggressive elimination repeats the first amount."""
    search = {
        "strategy": "halving_random", "n_candidates": 24, "factor": 2, "max_resources": 120, "min_resources": 40,
        "aggressive_elimination": True, "random_state": 3,
    }  # fmt: skip
    spec = {
        "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
        "estimator": {"_target_": "sklearn.svm.SVC"},
        "search": search,
        "param_distributions": {
            "C": {"_target_": "scipy.stats.loguniform", "a": 0.01, "b": 100},
            "kernel": ["linear", "rbf"],
        },
        "cv": 4,
    }

    def reference(_: Path) -> Reference:
        X, y = load_iris(return_X_y=True)
        distributions = {"C": loguniform(0.01, 100), "kernel": ["linear", "rbf"]}
        return Reference(SVC(), distributions, X, y, cv=4, return_train_score=True, halving=search)

    return spec, reference


def _random_exhaust_int_distribution_failures() -> Case:
    """n_candidates: exhaust (the data decides how many), an int distribution, and candidates that fail on the
    small first rounds (n_neighbors above the sub-sample: scoring fails, the score is NaN): NaN scores go to the
    bottom, as ``_top_k`` puts them."""
    search = {"strategy": "halving_random", "min_resources": 60, "random_state": 7}
    spec = {
        "data": {"_target_": "sklearn.datasets.load_breast_cancer", "return_X_y": True},
        "estimator": {"_target_": "sklearn.neighbors.KNeighborsClassifier"},
        "search": search,
        "param_distributions": {"n_neighbors": {"_target_": "scipy.stats.randint", "low": 1, "high": 90}},
        "cv": {
            "_target_": "sklearn.model_selection.StratifiedKFold",
            "n_splits": 3,
            "shuffle": True,
            "random_state": 2,
        },
        "scoring": "balanced_accuracy",
    }

    def reference(_: Path) -> Reference:
        X, y = load_breast_cancer(return_X_y=True)
        cv = StratifiedKFold(n_splits=3, shuffle=True, random_state=2)
        distributions = {"n_neighbors": randint(1, 90)}
        return Reference(
            KNeighborsClassifier(), distributions, X, y, cv=cv, scoring="balanced_accuracy", return_train_score=True,
            halving={"strategy": "halving_random", "min_resources": 60, "random_state": 7},
        )  # fmt: skip

    return spec, reference


def _regressor_explicit_resources() -> Case:
    search = {"strategy": "halving_grid", "min_resources": 50, "max_resources": 400, "factor": 2.5, "random_state": 5}
    spec = {
        "data": {"_target_": "sklearn.datasets.load_diabetes", "return_X_y": True},
        "estimator": {"_target_": "sklearn.linear_model.Ridge"},
        "search": search,
        "param_grid": {"alpha": [0.001, 0.01, 0.1, 1, 10, 100]},
        "cv": 5,
        "scoring": "r2",
        "return_train_score": False,
    }

    def reference(_: Path) -> Reference:
        X, y = load_diabetes(return_X_y=True)
        grid_ = {"alpha": [0.001, 0.01, 0.1, 1, 10, 100]}
        return Reference(Ridge(), grid_, X, y, cv=5, scoring="r2", halving=search)

    return spec, reference


CASES = {
    "halving-grid-n-samples-defaults": _digits_svc_n_samples(),
    "halving-grid-estimator-resource-holdout": _forest_n_estimators_resource(),
    "halving-random-aggressive-elimination": _random_aggressive_elimination(),
    "halving-random-exhaust-int-distribution-nan-scores": _random_exhaust_int_distribution_failures(),
    "halving-grid-regressor-explicit-resources": _regressor_explicit_resources(),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(case, id=name) for name, case in CASES.items()])
def test_run_matches_halving_search(tmp_path: Path, case: Case, request: pytest.FixtureRequest) -> None:
    document, reference = case
    run = run_cli(tmp_path, write_spec(tmp_path, "halving", document))
    _check_ok(run)
    ref = reference(tmp_path)
    fitted = fit_reference(ref)
    assert_equivalent(run, fitted, ref)
    assert len(set(run.cv_results["iter"])) == fitted.search.n_iterations_ > 1
    if "nan-scores" in request.node.name:  # the case really has NaN means in a round that keeps survivors
        first = [m for m, i in zip(run.cv_results["mean_test_score"], run.cv_results["iter"], strict=True) if i == 0]
        assert any(np.isnan(first)) and not all(np.isnan(first))


@pytest.mark.slow
def test_rerun_serves_every_round_from_the_store(tmp_path: Path) -> None:
    document, reference = CASES["halving-grid-regressor-explicit-resources"]
    spec_path = write_spec(tmp_path, "halving", document)
    _check_ok(run_cli(tmp_path, spec_path))
    again = run_cli(tmp_path, spec_path, "again")
    _check_ok(again)
    assert " 0 fitted" in again.completed.stdout
    ref = reference(tmp_path)
    assert_equivalent(again, fit_reference(ref), ref)


# --------------------------------------------------------------------------------------------------
# Plan-time decisions and errors


def _spec(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "name": "halving",
        "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
        "estimator": {"_target_": "sklearn.svm.SVC"},
        "search": {"strategy": "halving_grid", "random_state": 0},
        "param_grid": {"C": [0.1, 1, 10, 100]},
        "cv": 3,
    }
    document.update(changes)
    return document


def test_defaults_are_the_class_defaults() -> None:
    spec = parse_spec(_spec())
    assert spec.search == {
        "strategy": "halving_grid", "factor": 3, "resource": "n_samples", "max_resources": "auto",
        "min_resources": "exhaust", "aggressive_elimination": False, "random_state": 0,
    }  # fmt: skip
    assert spec.return_train_score is True  # Halving*SearchCV's default, unlike GridSearchCV's
    assert parse_spec(_spec(return_train_score=False)).return_train_score is False
    sampled = parse_spec(_spec(search={"strategy": "halving_random", "random_state": 1}, param_grid=None,
                               param_distributions={"C": [1, 2]}))  # fmt: skip
    assert (sampled.search["n_candidates"], sampled.search["min_resources"]) == ("exhaust", "smallest")


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"search": {"strategy": "halving_grid", "factor": 1}}, "search.factor", "above 1"),
        ({"search": {"strategy": "halving_grid", "random_state": 0, "factor": "x"}}, "search.factor", "'x'"),
        ({"search": {"strategy": "halving_grid"}}, "search.random_state", "sub-samples"),
        ({"search": {"strategy": "halving_grid", "random_state": 0, "min_resources": 0}}, "search.min_resources", "0"),
        ({"search": {"strategy": "halving_grid", "random_state": 0, "max_resources": "all"}}, "search.max_resources",
         "'all'"),
        ({"search": {"strategy": "halving_grid", "resource": "C"}}, "search.max_resources", "only n_samples"),
        ({"search": {"strategy": "halving_grid", "random_state": 0, "n_iter": 5}}, "search.n_iter",
         "HalvingGridSearchCV"),
        ({"search": {"strategy": "halving_random", "random_state": 0, "min_resources": "exhaust"}, "param_grid": None,
          "param_distributions": {"C": [1]}}, "search.n_candidates", "exhaust"),
        ({"scoring": ["accuracy", "f1_macro"], "refit": "accuracy"}, "scoring", "one metric"),
        ({"refit": {"metric": "score", "rule": "one_standard_error", "simplest": {"param": "C"}}}, "refit",
         "last round"),
        ({"param_distributions": {"C": [1]}, "param_grid": None}, "param_distributions", "halving_grid"),
    ],
)  # fmt: skip
def test_bad_halving_specs_name_the_field(changes: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(SpecError) as raised:
        parse_spec(_spec(**changes))
    assert raised.value.path == field
    assert words in str(raised.value)


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"search": {"strategy": "halving_grid", "resource": "gamma_typo", "max_resources": 10}}, "search.resource",
         "does not have"),
        ({"search": {"strategy": "halving_grid", "resource": "C", "max_resources": 10}}, "search.resource",
         "searched parameter"),
        ({"search": {"strategy": "halving_grid", "random_state": 0, "min_resources": 500}}, "search",
         "greater than max_resources_=150"),
        ({"cv": {"_target_": "sklearn.model_selection.KFold", "shuffle": True}}, "cv", "random_state"),
    ],
)  # fmt: skip
def test_plan_refuses_what_the_data_decides(tmp_path: Path, changes: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(SpecError) as raised:
        make_plan(parse_spec(_spec(**changes)), Store(str(tmp_path / "store")))
    assert raised.value.path == field
    assert words in str(raised.value)
    assert not (tmp_path / "store" / "plans").exists() or not any((tmp_path / "store" / "plans").iterdir())


def test_plan_records_rounds_and_budget_counts_every_round(tmp_path: Path) -> None:
    spec = parse_spec(_spec(param_grid={"C": [0.01, 0.1, 1, 10, 100, 1000, 0.5, 5, 50]}))
    plan = make_plan(spec, Store(str(tmp_path / "store")))
    rounds = plan.document["halving"]
    # iris, 3 classes, 3 folds: min_resources 18 (2 x folds x classes), so 150 rows allow two rounds
    assert rounds["n_candidates_per_round"] == [9, 3] and plan.n_rounds == 2
    assert plan.document["n_fits"] == (9 + 3) * 3
    assert [r["folds"] for r in rounds["rounds"]] == ["folds_round0", "folds_round1"]
    sizes = [len(np.load(tmp_path / "store" / plan.file(r["folds"]))["train_0"]) for r in rounds["rounds"]]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert len({plan.row(r, 0)["key"] for r in range(2)}) == 2  # the round's folds are in the key
    with pytest.raises(SpecError, match="over 3 rounds"):
        grid.check_budget(parse_spec(_spec(limits={"max_fits": 30})), 13, 3, rounds=3)
    with pytest.raises(SpecError, match=r"limits\.max_fits"):  # 36 fits: the later rounds count too
        make_plan(parse_spec(_spec(param_grid={"C": [0.01, 0.1, 1, 10, 100, 1000, 0.5, 5, 50]},
                                   limits={"max_fits": 30})), Store(str(tmp_path / "other")))  # fmt: skip


def test_survivors_match_top_k_with_nan_and_ties() -> None:
    from sklearn.model_selection._search_successive_halving import _top_k

    means = np.array([0.5, np.nan, 0.7, 0.7, 0.1, np.nan, 0.9])
    rows = [10, 11, 12, 13, 14, 15, 16]
    reference = _top_k({"iter": [0] * 7, "mean_test_score": means, "params": [{"i": r} for r in rows]}, 3, 0)
    assert halving.survivors(rows, means, 3, 0) == [p["i"] for p in reference]
