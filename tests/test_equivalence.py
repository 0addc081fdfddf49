"""`airflow-grid run` against GridSearchCV(n_jobs=1) (and RandomizedSearchCV for search: random), cell by cell.

Each case is a pair: a spec document (run through the real CLI in a subprocess, so planning, snapshots, worker
processes, the store and the reduction are all exercised) and a function that builds the same search with plain
scikit-learn code - the data, estimator, grid and splitter are built here independently, never through
airflow_grid's spec builder. Scores, stds and ranks must be bit-identical; params, key order and the winner equal.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from numpy.testing import assert_array_equal
from scipy.stats import loguniform, randint, uniform
from sklearn.base import BaseEstimator
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris
from sklearn.decomposition import PCA
from sklearn.exceptions import FitFailedWarning
from sklearn.experimental import enable_halving_search_cv  # noqa: F401
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import (
    GridSearchCV,
    HalvingGridSearchCV,
    HalvingRandomSearchCV,
    KFold,
    RandomizedSearchCV,
    ShuffleSplit,
    StratifiedKFold,
    train_test_split,
)
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

pytestmark = pytest.mark.slow

SCORE_COLUMN = re.compile(r"^(split\d+_(test|train)_|(mean|std)_(test|train)_|rank_test_)")
TIME_COLUMNS = ("mean_fit_time", "std_fit_time", "mean_score_time", "std_score_time")


# --------------------------------------------------------------------------------------------------
# The reference side: plain scikit-learn


@dataclass
class Reference:
    """A GridSearchCV built by hand; ``holdout`` = (test_size, random_state) split off before the search."""

    estimator: BaseEstimator
    param_grid: Any  # a grid, or the param_distributions (lists or scipy.stats distributions) when n_iter is set
    X: Any
    y: Any
    cv: Any = 5
    scoring: Any = None
    refit: bool | str = True
    error_score: float | str = np.nan
    return_train_score: bool = False
    holdout: tuple[float, int] | None = None
    stratify: bool = True
    n_failed: int = 0  # candidates with at least one failed fit
    n_iter: int | None = None  # set: a RandomizedSearchCV (with random_state) instead of a GridSearchCV
    random_state: int | None = None
    halving: dict[str, Any] | None = None  # set: Halving{Grid,Random}SearchCV with these kwargs (+ "strategy")


@dataclass
class Fitted:
    search: Any  # GridSearchCV, RandomizedSearchCV or a Halving*SearchCV
    holdout_score: float | None
    warnings: list[warnings.WarningMessage] = field(default_factory=list)


def fit_reference(ref: Reference) -> Fitted:
    X, y = ref.X, ref.y
    X_test = y_test = None
    if ref.holdout is not None:
        test_size, random_state = ref.holdout
        X, X_test, y, y_test = train_test_split(
            X, y, test_size=test_size, random_state=random_state, stratify=y if ref.stratify else None
        )
    common: dict[str, Any] = {
        "scoring": ref.scoring,
        "n_jobs": 1,
        "refit": ref.refit,
        "cv": ref.cv,
        "error_score": ref.error_score,
        "return_train_score": ref.return_train_score,
    }
    search: Any
    if ref.halving is not None:
        kwargs = {k: v for k, v in ref.halving.items() if k != "strategy"}
        halving_class = HalvingRandomSearchCV if ref.halving["strategy"] == "halving_random" else HalvingGridSearchCV
        search = halving_class(ref.estimator, ref.param_grid, **kwargs, **common)
    elif ref.n_iter is None:
        search = GridSearchCV(ref.estimator, ref.param_grid, **common)
    else:
        search = RandomizedSearchCV(
            ref.estimator, ref.param_grid, n_iter=ref.n_iter, random_state=ref.random_state, **common
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        search.fit(X, y)
    holdout_score = float(search.score(X_test, y_test)) if ref.holdout is not None else None
    return Fitted(search=search, holdout_score=holdout_score, warnings=list(caught))


# --------------------------------------------------------------------------------------------------
# Cases: (spec document, reference builder); both receive the test's data directory


def _iris_svc() -> tuple[dict[str, Any], Callable[[Path], Reference]]:
    spec = {
        "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
        "estimator": {"_target_": "sklearn.svm.SVC"},
        "param_grid": {"C": [0.1, 1], "kernel": ["linear", "rbf"]},
        "cv": 5,
        "scoring": "accuracy",
    }

    def reference(_: Path) -> Reference:
        X, y = load_iris(return_X_y=True)
        return Reference(SVC(), {"C": [0.1, 1], "kernel": ["linear", "rbf"]}, X, y, cv=5, scoring="accuracy")

    return spec, reference


def _multi_metric_list() -> tuple[dict[str, Any], Callable[[Path], Reference]]:
    spec = {
        "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
        "estimator": {"_target_": "sklearn.tree.DecisionTreeClassifier", "random_state": 0},
        "param_grid": {"max_depth": [1, 3], "criterion": ["gini", "entropy"]},
        "cv": 4,
        "scoring": ["accuracy", "f1_macro", "precision_macro"],
        "refit": "f1_macro",
        "return_train_score": True,
    }

    def reference(_: Path) -> Reference:
        X, y = load_iris(return_X_y=True)
        return Reference(
            DecisionTreeClassifier(random_state=0),
            {"max_depth": [1, 3], "criterion": ["gini", "entropy"]},
            X,
            y,
            cv=4,
            scoring=["accuracy", "f1_macro", "precision_macro"],
            refit="f1_macro",
            return_train_score=True,
        )

    return spec, reference


def _pipeline_swap() -> tuple[dict[str, Any], Callable[[Path], Reference]]:
    spec = {
        "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
        "estimator": {
            "_target_": "sklearn.pipeline.Pipeline",
            "steps": [
                ["scale", {"_target_": "sklearn.preprocessing.StandardScaler"}],
                ["clf", {"_target_": "sklearn.svm.SVC"}],
            ],
        },
        "param_grid": [
            {
                "scale": ["passthrough", {"_target_": "sklearn.preprocessing.StandardScaler"}],
                "clf": [{"_target_": "sklearn.linear_model.LogisticRegression", "max_iter": 500}],
                "clf__C": [0.5],
            },
            {"clf": [{"_target_": "sklearn.svm.SVC", "kernel": "linear"}], "clf__C": [0.1]},
            {"clf": [{"_target_": "sklearn.neighbors.KNeighborsClassifier"}], "clf__n_neighbors": [15]},
        ],
        "cv": 3,
        "scoring": "balanced_accuracy",
    }

    def reference(_: Path) -> Reference:
        X, y = load_iris(return_X_y=True)
        pipeline = Pipeline([("scale", StandardScaler()), ("clf", SVC())])
        grid = [
            {"scale": ["passthrough", StandardScaler()], "clf": [LogisticRegression(max_iter=500)], "clf__C": [0.5]},
            {"clf": [SVC(kernel="linear")], "clf__C": [0.1]},
            {"clf": [KNeighborsClassifier()], "clf__n_neighbors": [15]},
        ]
        return Reference(pipeline, grid, X, y, cv=3, scoring="balanced_accuracy")

    return spec, reference


def _ridge_dict_scoring() -> tuple[dict[str, Any], Callable[[Path], Reference]]:
    spec = {
        "data": {"_target_": "sklearn.datasets.load_diabetes", "return_X_y": True},
        "holdout": {"test_size": 0.25, "random_state": 3},  # stratify omitted: a regressor is not stratified
        "estimator": {"_target_": "sklearn.linear_model.Ridge"},
        "param_grid": {"alpha": [0.01, 1.0, 100.0]},
        "cv": 3,
        "scoring": {"r2": "r2", "mae": "neg_mean_absolute_error"},
        "refit": "r2",
        "return_train_score": True,
    }

    def reference(_: Path) -> Reference:
        X, y = load_diabetes(return_X_y=True)
        return Reference(
            Ridge(),
            {"alpha": [0.01, 1.0, 100.0]},
            X,
            y,
            cv=3,
            scoring={"r2": "r2", "mae": "neg_mean_absolute_error"},
            refit="r2",
            return_train_score=True,
            holdout=(0.25, 3),
            stratify=False,
        )

    return spec, reference


def _kfold_shuffled() -> tuple[dict[str, Any], Callable[[Path], Reference]]:
    spec = {
        "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
        "estimator": {"_target_": "sklearn.tree.DecisionTreeClassifier", "random_state": 0},
        "param_grid": {"max_depth": [2, None], "min_samples_leaf": [1, 5]},
        "cv": {"_target_": "sklearn.model_selection.KFold", "n_splits": 4, "shuffle": True, "random_state": 0},
        "scoring": "accuracy",
    }

    def reference(_: Path) -> Reference:
        X, y = load_iris(return_X_y=True)
        return Reference(
            DecisionTreeClassifier(random_state=0),
            {"max_depth": [2, None], "min_samples_leaf": [1, 5]},
            X,
            y,
            cv=KFold(n_splits=4, shuffle=True, random_state=0),
            scoring="accuracy",
        )

    return spec, reference


def _shuffle_split_default_score() -> tuple[dict[str, Any], Callable[[Path], Reference]]:
    spec = {
        "data": {"_target_": "sklearn.datasets.load_diabetes", "return_X_y": True},
        "estimator": {"_target_": "sklearn.neighbors.KNeighborsRegressor"},
        "param_grid": {"n_neighbors": [5, 20], "weights": ["uniform", "distance"]},
        "cv": {"_target_": "sklearn.model_selection.ShuffleSplit", "n_splits": 3, "test_size": 0.3, "random_state": 1},
        # no scoring: the estimator's own score (R^2), reported without a metric suffix
    }

    def reference(_: Path) -> Reference:
        X, y = load_diabetes(return_X_y=True)
        return Reference(
            KNeighborsRegressor(),
            {"n_neighbors": [5, 20], "weights": ["uniform", "distance"]},
            X,
            y,
            cv=ShuffleSplit(n_splits=3, test_size=0.3, random_state=1),
        )

    return spec, reference


def _holdout_stratified() -> tuple[dict[str, Any], Callable[[Path], Reference]]:
    spec = {
        "data": {"_target_": "sklearn.datasets.load_breast_cancer", "return_X_y": True},
        "holdout": {"test_size": 0.25, "random_state": 0, "stratify": True},
        "estimator": {
            "_target_": "sklearn.pipeline.Pipeline",
            "steps": [
                ["scale", {"_target_": "sklearn.preprocessing.StandardScaler"}],
                ["clf", {"_target_": "sklearn.linear_model.LogisticRegression", "max_iter": 1000}],
            ],
        },
        "param_grid": {"clf__C": [0.01, 1.0]},
        "cv": {
            "_target_": "sklearn.model_selection.StratifiedKFold",
            "n_splits": 3,
            "shuffle": True,
            "random_state": 7,
        },
        "scoring": {"acc": "accuracy", "bal": "balanced_accuracy"},
        "refit": "bal",
        "resources": {"cpu": 2},  # folds run two at a time in the worker (joblib), threads capped
    }

    def reference(_: Path) -> Reference:
        X, y = load_breast_cancer(return_X_y=True)
        pipeline = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=1000))])
        return Reference(
            pipeline,
            {"clf__C": [0.01, 1.0]},
            X,
            y,
            cv=StratifiedKFold(n_splits=3, shuffle=True, random_state=7),
            scoring={"acc": "accuracy", "bal": "balanced_accuracy"},
            refit="bal",
            holdout=(0.25, 0),
        )

    return spec, reference


PCA_SVC = {
    "_target_": "sklearn.pipeline.Pipeline",
    "steps": [["pca", {"_target_": "sklearn.decomposition.PCA"}], ["clf", {"_target_": "sklearn.svm.SVC"}]],
}


def _pca_svc() -> Pipeline:
    return Pipeline([("pca", PCA()), ("clf", SVC())])


def _failing_candidate_nan() -> tuple[dict[str, Any], Callable[[Path], Reference]]:
    # n_components=10 is a valid value (the plan accepts it) that iris's 4 features cannot satisfy: every fit fails
    spec = {
        "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
        "estimator": PCA_SVC,
        "param_grid": {"pca__n_components": [2, 10, 3]},
        "cv": 3,
        "scoring": "accuracy",
        "error_score": float("nan"),
        "return_train_score": True,
    }

    def reference(_: Path) -> Reference:
        X, y = load_iris(return_X_y=True)
        return Reference(
            _pca_svc(),
            {"pca__n_components": [2, 10, 3]},
            X,
            y,
            cv=3,
            scoring="accuracy",
            return_train_score=True,
            n_failed=1,
        )

    return spec, reference


def _one_class_fold(directory: Path) -> Path:
    """An npz file whose third unshuffled KFold training part holds a single class: that fold cannot fit."""
    path = directory / "one_class_fold.npz"
    if not path.exists():
        rng = np.random.default_rng(0)
        X = rng.normal(size=(30, 3))
        y = np.array([0] * 20 + [1] * 10)
        X[y == 1] += 1.5
        np.savez(path, X=X, y=y)
    return path


def _partial_failures_numeric_error_score() -> tuple[Callable[[Path], dict[str, Any]], Callable[[Path], Reference]]:
    def spec(directory: Path) -> dict[str, Any]:
        return {
            "data": {"path": str(_one_class_fold(directory))},
            "estimator": {"_target_": "sklearn.linear_model.LogisticRegression"},
            # class "5" does not exist, so that candidate fails every fold; the others fail on fold 2 only
            "param_grid": [{"C": [0.1, 1.0]}, {"class_weight": [{"5": 1.0}]}],
            "cv": {"_target_": "sklearn.model_selection.KFold", "n_splits": 3},
            "scoring": ["accuracy", "balanced_accuracy", "neg_log_loss"],  # log loss fails on one-class test folds
            "refit": "accuracy",
            "error_score": -1.0,
            "return_train_score": True,
        }

    def reference(directory: Path) -> Reference:
        with np.load(_one_class_fold(directory)) as arrays:
            X, y = arrays["X"], arrays["y"]
        return Reference(
            LogisticRegression(),
            [{"C": [0.1, 1.0]}, {"class_weight": [{"5": 1.0}]}],
            X,
            y,
            cv=KFold(n_splits=3),
            scoring=["accuracy", "balanced_accuracy", "neg_log_loss"],
            refit="accuracy",
            error_score=-1.0,
            return_train_score=True,
            n_failed=3,
        )

    return spec, reference


def _churn_frame() -> pd.DataFrame:
    rng = np.random.default_rng(42)
    n = 160
    frame = pd.DataFrame(
        {
            "age": rng.normal(40, 12, n).round(1),
            "income": rng.lognormal(3, 0.5, n).round(2),  # thousands: unscaled it still converges fast
            "tenure": rng.integers(0, 72, n),
            "plan": rng.choice(["basic", "pro", "team"], n),
            "region": rng.choice(["north", "south", "east", "west"], n),
        }
    )
    logit = 0.04 * (frame["age"] - 40) - 0.05 * (frame["tenure"] - 36) + (frame["plan"] == "basic") * 1.2
    frame["churned"] = np.where(logit + rng.normal(0, 1, n) > 0, "yes", "no")
    return frame


CHURN_COLUMNS = {"num": ["age", "income", "tenure"], "cat": ["plan", "region"]}


def _churn_estimator_spec() -> dict[str, Any]:
    return {
        "_target_": "sklearn.pipeline.Pipeline",
        "steps": [
            [
                "prep",
                {
                    "_target_": "sklearn.compose.ColumnTransformer",
                    "transformers": [
                        ["num", {"_target_": "sklearn.preprocessing.StandardScaler"}, CHURN_COLUMNS["num"]],
                        [
                            "cat",
                            {"_target_": "sklearn.preprocessing.OneHotEncoder", "handle_unknown": "ignore"},
                            CHURN_COLUMNS["cat"],
                        ],
                    ],
                },
            ],
            ["clf", {"_target_": "sklearn.linear_model.LogisticRegression", "max_iter": 1000}],
        ],
    }


def _churn_estimator() -> Pipeline:
    prep = ColumnTransformer(
        [
            ("num", StandardScaler(), CHURN_COLUMNS["num"]),
            ("cat", OneHotEncoder(handle_unknown="ignore"), CHURN_COLUMNS["cat"]),
        ]
    )
    return Pipeline([("prep", prep), ("clf", LogisticRegression(max_iter=1000))])


def _dataframe_file(fmt: str, holdout: bool) -> tuple[Callable[[Path], dict[str, Any]], Callable[[Path], Reference]]:
    def path_in(directory: Path) -> Path:
        path = directory / f"churn.{fmt}"
        if not path.exists():
            frame = _churn_frame()
            if fmt == "parquet":
                frame.to_parquet(path, index=False)
            else:
                frame.to_csv(path, index=False)
        return path

    def spec(directory: Path) -> dict[str, Any]:
        document: dict[str, Any] = {
            "data": {"path": str(path_in(directory)), "target": "churned"},
            "estimator": _churn_estimator_spec(),
            "param_grid": {
                "prep__num": ["passthrough", {"_target_": "sklearn.preprocessing.StandardScaler"}],
                "clf__C": [0.1, 1.0],
            },
            "cv": 3,
            "scoring": ["accuracy", "roc_auc"],
            "refit": "roc_auc",
        }
        if holdout:
            document["holdout"] = {"test_size": 0.2, "random_state": 5, "stratify": True}
        return document

    def reference(directory: Path) -> Reference:
        path = path_in(directory)
        frame = pd.read_parquet(path) if fmt == "parquet" else pd.read_csv(path)
        X, y = frame.drop(columns="churned"), frame["churned"].to_numpy()
        return Reference(
            _churn_estimator(),
            {"prep__num": ["passthrough", StandardScaler()], "clf__C": [0.1, 1.0]},
            X,
            y,
            cv=3,
            scoring=["accuracy", "roc_auc"],
            refit="roc_auc",
            holdout=(0.2, 5) if holdout else None,
        )

    return spec, reference


def _random(n_iter: int, random_state: int) -> dict[str, Any]:
    return {"search": {"strategy": "random", "n_iter": n_iter, "random_state": random_state}}


def _random_lists_only() -> tuple[dict[str, Any], Callable[[Path], Reference]]:
    space = {"max_depth": [1, 2, 3, None], "min_samples_leaf": [1, 2, 5], "criterion": ["gini", "entropy"]}
    spec = {
        "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
        "estimator": {"_target_": "sklearn.tree.DecisionTreeClassifier", "random_state": 0},
        **_random(7, 0),
        "param_distributions": space,  # lists only: sampled without replacement from the grid
        "cv": 3,
        "scoring": "accuracy",
    }

    def reference(_: Path) -> Reference:
        X, y = load_iris(return_X_y=True)
        tree = DecisionTreeClassifier(random_state=0)
        return Reference(tree, space, X, y, cv=3, scoring="accuracy", n_iter=7, random_state=0)

    return spec, reference


def _random_scipy_distributions() -> tuple[dict[str, Any], Callable[[Path], Reference]]:
    spec = {
        "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
        "estimator": {
            "_target_": "sklearn.pipeline.Pipeline",
            "steps": [
                ["scale", {"_target_": "sklearn.preprocessing.StandardScaler"}],
                ["clf", {"_target_": "sklearn.svm.SVC"}],
            ],
        },
        **_random(8, 42),
        "param_distributions": {
            "clf__C": {"_target_": "scipy.stats.loguniform", "a": 0.01, "b": 100},  # continuous
            "clf__degree": {"_target_": "scipy.stats.randint", "low": 1, "high": 5},  # integer
            "clf__kernel": ["rbf", "poly"],
        },
        "cv": 4,
        "scoring": ["accuracy", "f1_macro"],
        "refit": "f1_macro",
        "return_train_score": True,
    }

    def reference(_: Path) -> Reference:
        X, y = load_iris(return_X_y=True)
        space = {"clf__C": loguniform(0.01, 100), "clf__degree": randint(1, 5), "clf__kernel": ["rbf", "poly"]}
        pipeline = Pipeline([("scale", StandardScaler()), ("clf", SVC())])
        return Reference(
            pipeline,
            space,  # distributions, as RandomizedSearchCV takes them
            X,
            y,
            cv=4,
            scoring=["accuracy", "f1_macro"],
            refit="f1_macro",
            return_train_score=True,
            n_iter=8,
            random_state=42,
        )

    return spec, reference


def _random_list_of_mappings_swap() -> tuple[dict[str, Any], Callable[[Path], Reference]]:
    spec = {
        "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
        "estimator": {
            "_target_": "sklearn.pipeline.Pipeline",
            "steps": [
                ["scale", {"_target_": "sklearn.preprocessing.StandardScaler"}],
                ["clf", {"_target_": "sklearn.svm.SVC"}],
            ],
        },
        **_random(10, 3),
        "param_distributions": [
            {
                "clf": [{"_target_": "sklearn.neighbors.KNeighborsClassifier"}],
                "clf__n_neighbors": {"_target_": "scipy.stats.randint", "low": 1, "high": 30},
                "scale": ["passthrough", {"_target_": "sklearn.preprocessing.StandardScaler"}],
            },
            {
                "clf": [{"_target_": "sklearn.linear_model.LogisticRegression", "max_iter": 500}],
                "clf__C": {"_target_": "scipy.stats.loguniform", "a": 0.001, "b": 100},
            },
        ],
        "cv": {"_target_": "sklearn.model_selection.KFold", "n_splits": 3, "shuffle": True, "random_state": 1},
        "scoring": "balanced_accuracy",
    }

    def reference(_: Path) -> Reference:
        X, y = load_iris(return_X_y=True)
        pipeline = Pipeline([("scale", StandardScaler()), ("clf", SVC())])
        space = [
            {
                "clf": [KNeighborsClassifier()],
                "clf__n_neighbors": randint(1, 30),
                "scale": ["passthrough", StandardScaler()],
            },
            {"clf": [LogisticRegression(max_iter=500)], "clf__C": loguniform(0.001, 100)},
        ]
        return Reference(
            pipeline,
            space,
            X,
            y,
            cv=KFold(n_splits=3, shuffle=True, random_state=1),
            scoring="balanced_accuracy",
            n_iter=10,
            random_state=3,
        )

    return spec, reference


def _random_regressor_uniform_holdout() -> tuple[dict[str, Any], Callable[[Path], Reference]]:
    spec = {
        "data": {"_target_": "sklearn.datasets.load_diabetes", "return_X_y": True},
        "holdout": {"test_size": 0.25, "random_state": 3},
        "estimator": {"_target_": "sklearn.linear_model.Ridge"},
        **_random(6, 11),
        "param_distributions": {
            "alpha": {"_target_": "scipy.stats.uniform", "loc": 0.01, "scale": 10},
            "fit_intercept": [True, False],
        },
        "cv": 3,
        "scoring": {"r2": "r2", "mae": "neg_mean_absolute_error"},
        "refit": "mae",
    }

    def reference(_: Path) -> Reference:
        X, y = load_diabetes(return_X_y=True)
        space = {"alpha": uniform(loc=0.01, scale=10), "fit_intercept": [True, False]}
        return Reference(
            Ridge(),
            space,
            X,
            y,
            cv=3,
            scoring={"r2": "r2", "mae": "neg_mean_absolute_error"},
            refit="mae",
            holdout=(0.25, 3),
            stratify=False,
            n_iter=6,
            random_state=11,
        )

    return spec, reference


CASES = {
    "single-metric-svc": _iris_svc(),
    "multi-metric-list-train-scores": _multi_metric_list(),
    "pipeline-estimator-swap-passthrough": _pipeline_swap(),
    "regressor-dict-scoring-holdout": _ridge_dict_scoring(),
    "kfold-shuffled-splitter": _kfold_shuffled(),
    "shuffle-split-estimator-score": _shuffle_split_default_score(),
    "holdout-stratified-multi-metric": _holdout_stratified(),
    "failing-candidate-error-score-nan": _failing_candidate_nan(),
    "partial-failures-npz-error-score-number": _partial_failures_numeric_error_score(),
    "dataframe-parquet-column-transformer": _dataframe_file("parquet", holdout=False),
    "dataframe-csv-column-transformer-holdout": _dataframe_file("csv", holdout=True),
    "random-lists-only": _random_lists_only(),
    "random-scipy-continuous-and-int-multi-metric": _random_scipy_distributions(),
    "random-list-of-mappings-estimator-swap": _random_list_of_mappings_swap(),
    "random-regressor-uniform-holdout": _random_regressor_uniform_holdout(),
}


# --------------------------------------------------------------------------------------------------
# Running the CLI


@dataclass
class Run:
    completed: subprocess.CompletedProcess[str]
    out: Path

    @property
    def cv_results(self) -> dict[str, list[Any]]:
        loaded: dict[str, list[Any]] = json.loads((self.out / "cv_results.json").read_text())
        return loaded

    @property
    def best(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((self.out / "best.json").read_text())
        return loaded


def write_spec(tmp_path: Path, name: str, document: dict[str, Any]) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **document}, sort_keys=False))
    return path


def run_cli(tmp_path: Path, spec_path: Path, out_name: str = "out", *extra: str) -> Run:
    out = tmp_path / out_name
    command = [sys.executable, "-m", "airflow_grid.cli", "--store", str(tmp_path / "store"), "run", str(spec_path)]
    completed = subprocess.run([*command, "--out", str(out), *extra], capture_output=True, text=True, timeout=300)
    return Run(completed=completed, out=out)


def _check_ok(run: Run) -> None:
    assert run.completed.returncode == 0, f"stdout:\n{run.completed.stdout}\nstderr:\n{run.completed.stderr}"


# --------------------------------------------------------------------------------------------------
# Canonical params: object specs (mappings) against the estimator objects sklearn holds


def canonical(value: Any) -> Any:
    """A comparable rendering: estimators and object specs as (class name, explicitly set params)."""
    if isinstance(value, dict) and "_target_" in value:
        kwargs = {k: canonical(v) for k, v in value.items() if k != "_target_"}
        return ("object", str(value["_target_"]).rsplit(".", 1)[-1], kwargs)
    if isinstance(value, BaseEstimator):
        return ("object", type(value).__name__, _explicit_params(value))
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _explicit_params(estimator: BaseEstimator) -> dict[str, Any]:
    """The constructor arguments that differ from the class defaults (what a spec mapping would spell out)."""
    params = estimator.get_params(deep=False)
    defaults = type(estimator)().get_params(deep=False)
    return {k: canonical(v) for k, v in params.items() if k not in defaults or canonical(defaults[k]) != canonical(v)}


def _same_value(ours: Any, theirs: Any) -> bool:
    ours, theirs = canonical(ours), canonical(theirs)
    if isinstance(ours, float) and isinstance(theirs, float) and math.isnan(ours) and math.isnan(theirs):
        return True
    return bool(ours == theirs)


def _numbers(column: list[Any]) -> np.ndarray:
    """A JSON score column as float64 (``null`` and ``NaN`` both read as NaN, as the contract allows)."""
    return np.array([math.nan if v is None else v for v in column], dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# The comparison


def assert_equivalent(run: Run, fitted: Fitted, ref: Reference) -> None:
    ours, best = run.cv_results, run.best
    theirs = fitted.search.cv_results_
    n_candidates = len(theirs["params"])

    assert list(ours) == list(theirs), "cv_results.json keys (and their order) differ from GridSearchCV's"
    for key, expected in theirs.items():
        column = ours[key]
        assert len(column) == n_candidates, key
        if SCORE_COLUMN.match(key):
            if key.startswith("rank_"):
                assert all(isinstance(v, int) for v in column), f"{key}: ranks are not integers: {column}"
            assert_array_equal(_numbers(column), np.asarray(expected, dtype=np.float64), err_msg=key, strict=True)
        elif key.startswith("param_"):
            mask = np.ma.getmaskarray(expected)
            for index in range(n_candidates):
                if mask[index]:
                    assert column[index] is None, f"{key}[{index}] is masked in sklearn but {column[index]!r} here"
                else:
                    assert _same_value(column[index], expected.data[index]), (
                        f"{key}[{index}]: {column[index]!r} != {expected.data[index]!r}"
                    )
        elif key == "params":
            for index, (mine, sklearns) in enumerate(zip(column, expected, strict=True)):
                assert list(mine) == list(sklearns), f"params[{index}] names or order differ"
                assert all(_same_value(mine[name], sklearns[name]) for name in sklearns), (
                    f"params[{index}]: {mine!r} != {sklearns!r}"
                )
        elif key in ("iter", "n_resources"):  # successive halving's rounds
            assert column == [int(v) for v in expected], f"{key}: {column} != {list(expected)}"
        else:
            assert key in TIME_COLUMNS, f"unexpected column {key}"
            times = _numbers(column)
            assert np.all(np.isfinite(times)) and np.all(times >= 0), f"{key}: {column}"

    search = fitted.search
    refit_metric = ref.refit if isinstance(ref.refit, str) else "score"
    assert best["best_index"] == int(search.best_index_)
    assert best["best_score"] == search.best_score_  # exact
    assert best["refit_metric"] == refit_metric
    assert best["n_candidates"] == n_candidates
    assert best["n_failed"] == ref.n_failed
    assert list(best["best_params"]) == list(search.best_params_)
    assert all(_same_value(best["best_params"][k], v) for k, v in search.best_params_.items())
    if ref.halving is not None:
        rounds = best["halving"]
        assert rounds["n_iterations"] == search.n_iterations_
        assert rounds["n_required_iterations"] == search.n_required_iterations_
        assert rounds["n_possible_iterations"] == search.n_possible_iterations_
        assert rounds["n_resources"] == search.n_resources_
        assert rounds["n_candidates_"] == search.n_candidates_
        assert rounds["n_remaining_candidates_"] == search.n_remaining_candidates_
        assert (rounds["min_resources"], rounds["max_resources"]) == (search.min_resources_, search.max_resources_)
    if fitted.holdout_score is None:
        assert best["holdout_score"] is None
    else:
        assert best["holdout_score"] == pytest.approx(fitted.holdout_score, rel=0, abs=1e-12)


@pytest.mark.parametrize("case", [pytest.param(case, id=name) for name, case in CASES.items()])
def test_run_matches_gridsearchcv(
    tmp_path: Path, case: tuple[dict[str, Any] | Callable[[Path], dict[str, Any]], Callable[[Path], Reference]]
) -> None:
    spec, reference = case
    document = spec(tmp_path) if callable(spec) else spec
    run = run_cli(tmp_path, write_spec(tmp_path, "equivalence", document))
    _check_ok(run)

    ref = reference(tmp_path)
    fitted = fit_reference(ref)
    if ref.n_failed:  # the case really exercises failures on the sklearn side too
        assert any(issubclass(w.category, FitFailedWarning) for w in fitted.warnings)
    assert_equivalent(run, fitted, ref)


def test_several_candidates_per_process_match_gridsearchcv(tmp_path: Path) -> None:
    """Sharing a worker process between candidates (to amortise imports) changes no score."""
    spec, reference = CASES["pipeline-estimator-swap-passthrough"]
    assert not callable(spec)
    run = run_cli(tmp_path, write_spec(tmp_path, "chunked", spec), "out", "--candidates-per-process", "3")
    _check_ok(run)
    assert "0 from store" in run.completed.stdout
    ref = reference(tmp_path)
    assert_equivalent(run, fit_reference(ref), ref)


def _sorted_sets(text: str) -> str:
    """Sort the items of ``{...}`` literals: sklearn prints sets, whose order depends on the process's hash seed."""
    return re.sub(r"\{([^{}]*)\}", lambda m: "{" + ", ".join(sorted(m.group(1).split(", "))) + "}", text)


def test_error_score_raise_fails_like_gridsearchcv(tmp_path: Path) -> None:
    """A fit error under error_score=raise: both fail with the same error; the other candidates stay stored."""
    document = {
        "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
        "estimator": PCA_SVC,
        "param_grid": {"pca__n_components": [2, 10, 3]},
        "cv": 3,
        "scoring": "accuracy",
        "error_score": "raise",
    }
    X, y = load_iris(return_X_y=True)
    grid = {"pca__n_components": [2, 10, 3]}
    search = GridSearchCV(_pca_svc(), grid, cv=3, scoring="accuracy", error_score="raise")
    with pytest.raises(ValueError) as raised:
        search.fit(X, y)

    spec_path = write_spec(tmp_path, "raise", document)
    run = run_cli(tmp_path, spec_path)
    assert run.completed.returncode == 1, run.completed.stdout + run.completed.stderr
    stderr = run.completed.stderr
    assert "candidate 1 (n_components=10)" in stderr
    # The worker's last line is sklearn's own error, as GridSearchCV raised it.
    module = type(raised.value).__module__
    name = type(raised.value).__qualname__ if module == "builtins" else f"{module}.{type(raised.value).__qualname__}"
    expected = f"{name}: {raised.value}"
    assert _sorted_sets(stderr.strip().splitlines()[-1]) == _sorted_sets(expected)
    assert not (run.out / "cv_results.json").exists()
    stored = sorted((tmp_path / "store" / "results").glob("*/*.json"))
    assert len(stored) == 2, stored
    assert {json.loads(path.read_text())["index"] for path in stored} == {0, 2}

    # Fixed by dropping the failing value: the two stored candidates are not fitted again.
    document["param_grid"] = {"pca__n_components": [2, 3]}
    rerun = run_cli(tmp_path, write_spec(tmp_path, "raise", document), out_name="fixed")
    _check_ok(rerun)
    assert "evaluated 2 candidates: 0 fitted, 2 from store" in rerun.completed.stdout


def test_second_run_is_served_from_the_store(tmp_path: Path) -> None:
    spec, _ = CASES["failing-candidate-error-score-nan"]  # NaN scores must survive the store too
    assert isinstance(spec, dict)
    spec_path = write_spec(tmp_path, "twice", spec)
    first = run_cli(tmp_path, spec_path, out_name="first")
    _check_ok(first)
    second = run_cli(tmp_path, spec_path, out_name="second")
    _check_ok(second)

    n = first.best["n_candidates"]
    assert f"evaluated {n} candidates: {n} fitted, 0 from store" in first.completed.stdout
    assert f"evaluated {n} candidates: 0 fitted, {n} from store" in second.completed.stdout
    progress = [line for line in second.completed.stdout.splitlines() if re.match(r"^\[\s*\d+/\d+\]", line)]
    assert len(progress) == n
    assert all("(from store" in line for line in progress), progress

    before, after = first.cv_results, second.cv_results
    assert list(before) == list(after)
    for key in before:
        if SCORE_COLUMN.match(key):
            assert_array_equal(_numbers(after[key]), _numbers(before[key]), err_msg=key, strict=True)
        elif not key.endswith("_time"):
            assert after[key] == before[key], key
    assert {k: v for k, v in second.best.items() if k != "model_path"} == {
        k: v for k, v in first.best.items() if k != "model_path"
    }
