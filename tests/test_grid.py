"""Grid expansion: sklearn's candidate order, readable labels, plan-time parameter checks, budget, stable keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sklearn.model_selection import ParameterGrid

from airflow_grid import grid
from airflow_grid.plan import make_plan
from airflow_grid.spec import SpecError, parse_spec
from airflow_grid.store import Store

Doc = Callable[..., dict[str, Any]]

SVC = {"_target_": "sklearn.svm.SVC"}
FOREST = {"_target_": "sklearn.ensemble.RandomForestClassifier", "random_state": 42}
LOGISTIC = {"_target_": "sklearn.linear_model.LogisticRegression", "max_iter": 500}

GRIDS = [
    pytest.param({"clf__kernel": ["rbf", "poly"], "clf__C": [0.1, 1, 10]}, id="mapping-unsorted-keys"),
    pytest.param(
        [
            {"clf": [FOREST], "clf__n_estimators": [50, 100], "clf__max_depth": [None, 10, 20]},
            {"clf": [SVC], "clf__kernel": ["rbf", "poly"], "clf__C": [0.1, 1, 10]},
            {"clf": [LOGISTIC, SVC], "clf__C": [1.0]},
        ],
        id="list-of-mappings-with-estimators",
    ),
    pytest.param(
        [{"scale": ["passthrough", {"_target_": "sklearn.preprocessing.StandardScaler"}], "clf__C": [1, 2]}, {}],
        id="passthrough-and-empty-mapping",
    ),
]

PIPELINE = {
    "_target_": "sklearn.pipeline.Pipeline",
    "steps": [["scale", {"_target_": "sklearn.preprocessing.StandardScaler"}], ["clf", SVC]],
}


@pytest.mark.parametrize("param_grid", GRIDS)
def test_candidates_in_parameter_grid_order(iris_doc: Doc, param_grid: Any) -> None:
    candidates = grid.expand(parse_spec(iris_doc(estimator=PIPELINE, param_grid=param_grid)))
    expected = list(ParameterGrid(param_grid))
    assert [c.params for c in candidates] == expected
    assert [list(c.params) for c in candidates] == [list(p) for p in expected]  # key order too
    assert [c.index for c in candidates] == list(range(len(expected)))


def test_candidates_can_be_set_on_the_estimator(iris_doc: Doc) -> None:
    spec = parse_spec(iris_doc(estimator=PIPELINE, param_grid=GRIDS[1].values[0]))
    candidates = grid.expand(spec)
    grid.check_candidates(spec, candidates)
    estimator = grid.build_estimator(spec, candidates[0].params)
    assert type(estimator.named_steps["clf"]).__name__ == "RandomForestClassifier"
    assert estimator.get_params()["clf__max_depth"] is None


@pytest.mark.parametrize(
    ("params", "label"),
    [
        pytest.param({"clf": SVC, "clf__C": 10, "clf__kernel": "rbf"}, "clf=SVC C=10 kernel=rbf", id="design-example"),
        pytest.param({"clf__kernel": "rbf", "clf__C": 10.0, "clf": SVC}, "clf=SVC C=10 kernel=rbf", id="float-10"),
        pytest.param({"C": 0.1}, "C=0.1", id="no-prefix"),
        pytest.param({"clf": FOREST, "clf__max_depth": None}, "clf=RandomForestClassifier max_depth=None", id="none"),
        pytest.param(
            {"scale": "passthrough", "clf__fit_intercept": True}, "fit_intercept=True scale=passthrough", id="bool"
        ),
        pytest.param(
            {"pca__n_components": 2, "svd__n_components": 3, "clf__C": 1},
            "C=1 pca__n_components=2 svd__n_components=3",
            id="ambiguous-names-keep-prefix",
        ),
        pytest.param({}, "", id="empty"),
    ],
)
def test_candidate_label(params: dict[str, Any], label: str) -> None:
    assert grid.candidate_label(params) == label


def test_labels_of_expanded_candidates(iris_doc: Doc) -> None:
    spec = parse_spec(iris_doc(param_grid=[{"clf": [SVC], "clf__C": [10], "clf__kernel": ["rbf"]}]))
    assert [c.label for c in grid.expand(spec)] == ["clf=SVC C=10 kernel=rbf"]
    assert grid.expand(spec)[0].to_json() == {
        "index": 0,
        "params": {"clf": SVC, "clf__C": 10, "clf__kernel": "rbf"},
        "label": "clf=SVC C=10 kernel=rbf",
    }


# --------------------------------------------------------------------------------------------------
# Unknown estimator parameters fail at plan time

UNKNOWN_PARAMS = [
    pytest.param(
        {"clf__bogus": [1, 2]},
        r"spec\.param_grid\.clf__bogus: candidate 0 \(bogus=1\) cannot set clf__bogus=1 on the estimator: "
        r"Invalid parameter 'bogus' for estimator SVC\(\).*Fix: use parameter names the estimator has",
        id="unknown-step-param",
    ),
    pytest.param(
        {"clf__C": [1], "clf__bogus": [2]},
        r"spec\.param_grid\.clf__bogus: candidate 0 \(C=1 bogus=2\) cannot set clf__bogus=2",
        id="valid-and-unknown-in-one-candidate",
    ),
    pytest.param(
        {"clf": [SVC, FOREST], "clf__kernel": ["rbf"]},
        r"spec\.param_grid\.clf__kernel: candidate 1 \(clf=RandomForestClassifier kernel=rbf\) cannot set "
        r"clf__kernel='rbf' on the estimator: Invalid parameter 'kernel' for estimator RandomForestClassifier",
        id="param-only-on-one-swapped-estimator",
    ),
    pytest.param(
        [{"clf": [FOREST], "clf__max_depth": [None, 5]}, {"clf": [SVC], "clf__C": [1], "clf__max_depth": [3]}],
        r"spec\.param_grid\[1\]\.clf__max_depth: candidate 2 \(clf=SVC C=1 max_depth=3\) cannot set clf__max_depth=3",
        id="second-mapping-names-its-index",
    ),
    pytest.param(
        {"bogus": [1]},
        r"spec\.param_grid\.bogus: candidate 0 \(bogus=1\) cannot set bogus=1 on the estimator: "
        r"Invalid parameter 'bogus' for estimator Pipeline",
        id="unknown-top-level-param",
    ),
]


@pytest.mark.parametrize(("param_grid", "message"), UNKNOWN_PARAMS)
def test_unknown_parameter_fails_in_check_candidates(iris_doc: Doc, param_grid: Any, message: str) -> None:
    spec = parse_spec(iris_doc(param_grid=param_grid))
    with pytest.raises(SpecError, match=message):
        grid.check_candidates(spec, grid.expand(spec))


@pytest.mark.parametrize(("param_grid", "message"), UNKNOWN_PARAMS)
def test_unknown_parameter_fails_in_make_plan(iris_doc: Doc, store_root: str, param_grid: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        make_plan(parse_spec(iris_doc(param_grid=param_grid)), Store(store_root))
    assert not Path(store_root).exists()


def test_bad_object_spec_in_grid_fails_at_plan_time(iris_doc: Doc) -> None:
    spec = parse_spec(iris_doc(param_grid={"clf": [{"_target_": "sklearn.svm.SVC", "kernal": "rbf"}]}))
    with pytest.raises(SpecError, match=r"spec\.param_grid\.clf: sklearn\.svm\.SVC\(\*\*\{'kernal': 'rbf'\}\) failed"):
        grid.check_candidates(spec, grid.expand(spec))


# --------------------------------------------------------------------------------------------------
# Budget guard


@pytest.mark.parametrize(
    ("n_candidates", "n_splits", "max_fits", "message"),
    [
        pytest.param(18, 5, 89, "18 candidates x 5 folds = 90 fits, more than max_fits=89", id="one-over"),
        pytest.param(
            1000, 10, 5000, "1,000 candidates x 10 folds = 10,000 fits, more than max_fits=5,000", id="default"
        ),
        pytest.param(18, 5, 90, None, id="at-limit"),
        pytest.param(1, 2, 5000, None, id="small"),
    ],
)
def test_check_budget(iris_doc: Doc, n_candidates: int, n_splits: int, max_fits: int, message: str | None) -> None:
    spec = parse_spec(iris_doc(limits={"max_fits": max_fits}))
    if message is None:
        assert grid.check_budget(spec, n_candidates, n_splits) == n_candidates * n_splits
    else:
        with pytest.raises(SpecError, match=r"spec\.limits\.max_fits: the grid has " + message + r".*Fix: shrink"):
            grid.check_budget(spec, n_candidates, n_splits)


def test_budget_guard_fails_before_anything_is_written(iris_doc: Doc, store_root: str) -> None:
    param_grid = {"clf__C": [0.01, 0.1, 1, 10, 100, 1000], "clf__gamma": ["scale", "auto", 0.1]}
    spec = parse_spec(iris_doc(param_grid=param_grid, cv=5, limits={"max_fits": 50}))
    with pytest.raises(SpecError, match=r"18 candidates x 5 folds = 90 fits, more than max_fits=50"):
        make_plan(spec, Store(store_root))
    assert not (Path(store_root) / "results").exists()
    assert not Path(store_root).exists()


# --------------------------------------------------------------------------------------------------
# Candidate keys

BASE_KEY_ARGS: dict[str, Any] = {
    "params": {"clf__C": 1},
    "folds_hash": "f" * 64,
    "data_fingerprint": "d" * 64,
    "versions": {"numpy": "2.4.0", "scikit-learn": "1.9.1", "scipy": "1.17.0"},
}


@pytest.mark.parametrize(
    ("spec_fields", "arguments"),
    [
        pytest.param({}, {"params": {"clf__C": 10}}, id="params"),
        pytest.param({}, {"params": {"clf__C": 1.5}}, id="params-float"),
        pytest.param({}, {"folds_hash": "e" * 64}, id="folds"),
        pytest.param({}, {"data_fingerprint": "c" * 64}, id="data"),
        pytest.param({}, {"versions": {**BASE_KEY_ARGS["versions"], "scikit-learn": "1.9.2"}}, id="sklearn-version"),
        pytest.param({}, {"versions": {**BASE_KEY_ARGS["versions"], "numpy": "2.4.1"}}, id="numpy-version"),
        pytest.param({}, {"versions": {**BASE_KEY_ARGS["versions"], "scipy": "1.17.1"}}, id="scipy-version"),
        pytest.param({}, {"versions": {**BASE_KEY_ARGS["versions"], "xgboost": "3.1.0"}}, id="extra-library"),
        pytest.param({}, {"result_format": 999}, id="result-format"),
        pytest.param({"scoring": "balanced_accuracy"}, {}, id="scoring"),
        pytest.param({"scoring": None}, {}, id="scoring-omitted"),
        pytest.param({"error_score": 0}, {}, id="error-score"),
        pytest.param({"error_score": "raise"}, {}, id="error-score-raise"),
        pytest.param({"return_train_score": True}, {}, id="return-train-score"),
        pytest.param({"estimator": {"_target_": "sklearn.svm.SVC", "gamma": "auto"}}, {}, id="estimator"),
    ],
)
def test_candidate_key_changes_with_each_input(
    iris_doc: Doc, spec_fields: dict[str, Any], arguments: dict[str, Any]
) -> None:
    base = grid.candidate_key(parse_spec(iris_doc()), **BASE_KEY_ARGS)
    changed = grid.candidate_key(parse_spec(iris_doc(**spec_fields)), **{**BASE_KEY_ARGS, **arguments})
    assert changed != base


@pytest.mark.parametrize(
    "spec_fields",
    [
        pytest.param({"resources": {"cpu": 2, "memory": "4Gi"}}, id="resources"),
        pytest.param({"limits": {"max_fits": 10}}, id="limits"),
        pytest.param({"name": "another-study"}, id="name"),
        pytest.param({"backend": "kubernetes"}, id="backend"),
        pytest.param({"param_grid": {"clf__C": [1, 2, 3, 4]}}, id="rest-of-the-grid"),
    ],
)
def test_candidate_key_ignores_what_does_not_change_scores(iris_doc: Doc, spec_fields: dict[str, Any]) -> None:
    base = grid.candidate_key(parse_spec(iris_doc()), **BASE_KEY_ARGS)
    assert grid.candidate_key(parse_spec(iris_doc(**spec_fields)), **BASE_KEY_ARGS) == base


def _plan_keys(document: dict[str, Any], root: Path) -> tuple[list[str], dict[str, Any]]:
    plan = make_plan(parse_spec(document), Store(str(root)))
    return [c["key"] for c in plan.candidates], plan.document


def test_keys_are_stable_across_calls_stores_and_processes(iris_doc: Doc, tmp_path: Path) -> None:
    keys, _ = _plan_keys(iris_doc(), tmp_path / "a")
    assert len(set(keys)) == len(keys) == 3
    assert _plan_keys(iris_doc(), tmp_path / "a")[0] == keys
    assert _plan_keys(iris_doc(), tmp_path / "b")[0] == keys
    script = (
        "import json, sys\n"
        "from airflow_grid.plan import make_plan\n"
        "from airflow_grid.spec import parse_spec\n"
        "from airflow_grid.store import Store\n"
        "plan = make_plan(parse_spec(json.loads(sys.argv[1])), Store(sys.argv[2]))\n"
        "print(json.dumps([c['key'] for c in plan.candidates]))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, json.dumps(iris_doc()), str(tmp_path / "c")],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert json.loads(completed.stdout) == keys


KFOLD = {"_target_": "sklearn.model_selection.KFold", "n_splits": 3}


@pytest.mark.parametrize(
    ("base_fields", "changed_fields", "same_folds"),
    [
        pytest.param(
            {"cv": KFOLD},
            {"cv": KFOLD, "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True, "as_frame": True}},
            True,
            id="data-only",
        ),
        pytest.param(
            {"cv": {**KFOLD, "shuffle": True, "random_state": 0}},
            {"cv": {**KFOLD, "shuffle": True, "random_state": 1}},
            False,
            id="folds-only",
        ),
        pytest.param({}, {"cv": 5}, False, id="number-of-folds"),
        pytest.param({}, {"holdout": {"test_size": 0.2, "random_state": 0}}, False, id="holdout"),
        pytest.param({}, {"scoring": "f1_macro"}, True, id="scoring"),
    ],
)
def test_plan_keys_change_with_data_folds_and_scoring(
    iris_doc: Doc,
    tmp_path: Path,
    base_fields: dict[str, Any],
    changed_fields: dict[str, Any],
    same_folds: bool,
) -> None:
    base_keys, base_plan = _plan_keys(iris_doc(**base_fields), tmp_path / "base")
    changed_keys, changed_plan = _plan_keys(iris_doc(**changed_fields), tmp_path / "changed")
    assert (base_plan["folds_hash"] == changed_plan["folds_hash"]) is same_folds
    assert not set(base_keys) & set(changed_keys)


def test_plan_keys_are_shared_by_equal_candidates_of_different_grids(iris_doc: Doc, tmp_path: Path) -> None:
    small, _ = _plan_keys(iris_doc(param_grid={"clf__C": [0.1, 1, 10]}), tmp_path / "small")
    large, _ = _plan_keys(iris_doc(param_grid={"clf__C": [0.01, 0.1, 1, 10]}), tmp_path / "large")
    assert large[1:] == small  # a widened grid reuses the results it already has


@pytest.mark.parametrize(
    ("steps", "bad"),
    [
        (["sklearn.linear_model.LogisticRegression", "sklearn.svm.SVC"], 0),
        (["sklearn.svm.SVC", "sklearn.linear_model.LogisticRegression"], 1),  # valid for SVC: checked again for LR
    ],
)
def test_values_are_validated_once_per_structure(iris_doc: Doc, steps: list[str], bad: int) -> None:
    """max_iter=-1 means "no limit" to SVC but is invalid for LogisticRegression: a value checked valid under one
    estimator is checked again under another, and the error names the first candidate that has it."""
    spec = parse_spec(iris_doc(param_grid={"clf": [{"_target_": t} for t in steps], "clf__max_iter": [100, -1]}))
    candidates = grid.expand(spec)
    with pytest.raises(SpecError, match=rf"candidate {2 * bad + 1} \(.*max_iter=-1\) has an invalid value"):
        grid.check_candidates(spec, candidates)


def test_a_large_grid_is_validated_in_as_many_candidates_as_it_has_values(
    iris_doc: Doc, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[int] = []
    validate = grid.validate_values
    monkeypatch.setattr(grid, "validate_values", lambda e, **kw: checked.append(1) or validate(e, **kw))
    spec = parse_spec(iris_doc(param_grid={"clf__C": [0.1 * i for i in range(1, 41)], "clf__tol": [1e-3, 1e-4] * 1}))
    grid.check_candidates(spec, grid.expand(spec))
    assert len(checked) == 1 + 40 + 1  # the structure, one candidate per new C, one for the second tol
    bad = parse_spec(iris_doc(param_grid={"clf__C": [0.1 * i for i in range(1, 41)], "clf__tol": [1e-3, -1.0]}))
    with pytest.raises(SpecError, match=r"candidate 1 \(.*tol=-1\) has an invalid value"):
        grid.check_candidates(bad, grid.expand(bad))
