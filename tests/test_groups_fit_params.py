"""`data.groups` and `fit_params`: groups go to the splitter, fit parameters are sliced per fold as sklearn does.

The equivalence cases run `airflow-grid run` in a subprocess against ``GridSearchCV(...).fit(X, y, groups=g)`` and
``GridSearchCV(...).fit(X, y, clf__sample_weight=w)`` built with plain scikit-learn; the rest are quick checks of
the holdout split, the fingerprint and the plan-time validation.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import (
    GridSearchCV,
    GroupKFold,
    GroupShuffleSplit,
    LeaveOneGroupOut,
    StratifiedGroupKFold,
    train_test_split,
)
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from test_equivalence import Fitted, Reference, _check_ok, assert_equivalent, run_cli, write_spec

from airflow_grid import cli, data, grid, worker
from airflow_grid.plan import make_plan, verify_plan
from airflow_grid.spec import SpecError, parse_spec
from airflow_grid.store import Store

FEATURES = ["f0", "f1", "f2", "f3"]


def _frame(seed: int = 0, n_groups: int = 24, per_group: int = 6) -> pd.DataFrame:
    """Rows grouped by patient (string ids), a per-row weight, and a target that depends on the features."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    X = rng.normal(size=(n, len(FEATURES)))
    frame = pd.DataFrame(X, columns=FEATURES)
    frame["patient"] = [f"p{k // per_group:02d}" for k in range(n)]
    frame["weight"] = rng.uniform(0.05, 5.0, size=n)
    noise = rng.normal(scale=1.0, size=n)
    frame["label"] = (X[:, 0] + 0.5 * X[:, 1] - 0.3 * X[:, 2] + noise > 0).astype(int)
    return frame


def _csv(directory: Path, frame: pd.DataFrame | None = None, name: str = "visits.csv") -> Path:
    path = directory / name
    (_frame() if frame is None else frame).to_csv(path, index=False)
    return path


def _pipeline_spec() -> dict[str, Any]:
    return {
        "_target_": "sklearn.pipeline.Pipeline",
        "steps": [
            ["scale", {"_target_": "sklearn.preprocessing.StandardScaler"}],
            ["clf", {"_target_": "sklearn.linear_model.LogisticRegression", "max_iter": 1000}],
        ],
    }


def _pipeline() -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=1000))])


def _read(path: Path) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    frame = pd.read_csv(path)
    X = frame.drop(columns=["label", "patient", "weight"])
    return X, frame["label"].to_numpy(), frame["patient"].to_numpy(), frame["weight"].to_numpy()


def _fit(search: GridSearchCV, X: Any, y: Any, **params: Any) -> Fitted:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        search.fit(X, y, **params)
    return Fitted(search=search, holdout_score=None, warnings=list(caught))


GRID = {"clf__C": [0.01, 0.1, 1.0, 10.0], "clf__class_weight": [None, "balanced"]}
SCORING = ["accuracy", "roc_auc"]


# --------------------------------------------------------------------------------------------------
# Equivalence with GridSearchCV through the CLI


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cv_spec", "splitter"),
    [
        pytest.param(
            {"_target_": "sklearn.model_selection.GroupKFold", "n_splits": 4}, GroupKFold(4), id="group-kfold"
        ),
        pytest.param(
            {
                "_target_": "sklearn.model_selection.StratifiedGroupKFold",
                "n_splits": 3,
                "shuffle": True,
                "random_state": 1,
            },
            StratifiedGroupKFold(n_splits=3, shuffle=True, random_state=1),
            id="stratified-group-kfold",
        ),
    ],
)
def test_groups_match_gridsearchcv(tmp_path: Path, cv_spec: dict[str, Any], splitter: Any) -> None:
    path = _csv(tmp_path)
    document = {
        "data": {"path": str(path), "target": "label", "groups": "patient"},
        "estimator": _pipeline_spec(),
        "param_grid": GRID,
        "cv": cv_spec,
        "scoring": SCORING,
        "refit": "roc_auc",
        "return_train_score": True,
        "fit_params": {"clf__sample_weight": "weight"},  # removed from X like the groups, whatever the case
    }
    # the weights too: groups and fit params together, as GridSearchCV.fit(X, y, groups=g, clf__sample_weight=w)
    run = run_cli(tmp_path, write_spec(tmp_path, "groups", document))
    _check_ok(run)

    X, y, groups, weight = _read(path)
    search = GridSearchCV(
        _pipeline(), GRID, scoring=SCORING, refit="roc_auc", cv=splitter, n_jobs=1, return_train_score=True
    )
    fitted = _fit(search, X, y, groups=groups, clf__sample_weight=weight)
    assert_equivalent(run, fitted, Reference(_pipeline(), GRID, X, y, scoring=SCORING, refit="roc_auc"))


@pytest.mark.slow
def test_sample_weight_through_a_pipeline_matches_gridsearchcv(tmp_path: Path) -> None:
    """Weights sliced per fold, and the refit fits with them: its holdout score equals the reference's."""
    path = _csv(tmp_path)
    document = {
        "data": {"path": str(path), "target": "label", "columns": FEATURES},  # no groups: the ids are no feature
        "holdout": {"test_size": 0.25, "random_state": 3},
        "estimator": _pipeline_spec(),
        "param_grid": GRID,
        "cv": 4,
        "scoring": SCORING,
        "refit": "accuracy",
        "fit_params": {"clf__sample_weight": "weight"},
    }
    run = run_cli(tmp_path, write_spec(tmp_path, "weights", document))
    _check_ok(run)

    frame = pd.read_csv(path)
    X, y, weight = frame[FEATURES], frame["label"].to_numpy(), frame["weight"].to_numpy()
    X, X_test, y, y_test, weight, _ = train_test_split(X, y, weight, test_size=0.25, random_state=3, stratify=y)
    search = GridSearchCV(_pipeline(), GRID, scoring=SCORING, refit="accuracy", cv=4, n_jobs=1)
    fitted = _fit(search, X, y, clf__sample_weight=weight)
    fitted.holdout_score = float(search.score(X_test, y_test))
    unweighted = GridSearchCV(_pipeline(), GRID, scoring=SCORING, refit="accuracy", cv=4, n_jobs=1).fit(X, y)
    assert not np.array_equal(unweighted.cv_results_["mean_test_roc_auc"], search.cv_results_["mean_test_roc_auc"])
    assert_equivalent(run, fitted, Reference(_pipeline(), GRID, X, y, scoring=SCORING, refit="accuracy"))


# --------------------------------------------------------------------------------------------------
# Holdout, fingerprint, snapshot


def _spec(path: Path, **fields: Any) -> Any:
    document: dict[str, Any] = {
        "name": "groups",
        "data": {"path": str(path), "target": "label", "groups": "patient"},
        "estimator": _pipeline_spec(),
        "param_grid": {"clf__C": [0.1, 1.0]},
        "cv": {"_target_": "sklearn.model_selection.GroupKFold", "n_splits": 3},
        **fields,
    }
    return parse_spec({k: v for k, v in document.items() if v is not None})


def test_holdout_with_groups_keeps_each_group_on_one_side(tmp_path: Path) -> None:
    spec = _spec(_csv(tmp_path), holdout={"test_size": 0.25, "random_state": 7})
    dataset = data.load(spec, grid.build_estimator(spec))
    assert dataset.groups is not None and dataset.groups_holdout is not None
    assert set(dataset.groups).isdisjoint(dataset.groups_holdout)
    assert len(set(dataset.groups_holdout)) == 6  # a quarter of the 24 groups, as GroupShuffleSplit counts
    assert list(dataset.X.columns) == [*FEATURES, "weight"]  # groups are not a feature (no fit_params here)
    assert len(dataset.X) == len(dataset.y) == len(dataset.groups)


def test_folds_are_split_with_the_groups(tmp_path: Path) -> None:
    spec = _spec(_csv(tmp_path))
    dataset = data.load(spec, grid.build_estimator(spec))
    folds = data.make_folds(spec, grid.build_estimator(spec), dataset.X, dataset.y, dataset.groups)
    assert dataset.groups is not None
    for train, test in folds:
        assert set(dataset.groups[train]).isdisjoint(dataset.groups[test])


def test_fit_params_are_snapshotted_and_in_the_keys(tmp_path: Path) -> None:
    frame = _frame()
    spec = _spec(_csv(tmp_path, frame), fit_params={"clf__sample_weight": "weight"})
    store = Store(str(tmp_path / "store"))
    plan = make_plan(spec, store)
    relative = plan.file("fit_params")
    assert relative is not None and plan.document["file_checks"]["fit_params"] == store.file_check(relative)
    saved = data.read_fit_params(store.local_path(relative, str(tmp_path)))
    np.testing.assert_array_equal(saved["clf__sample_weight"], frame["weight"].to_numpy())

    frame.loc[0, "weight"] += 1.0  # one weight changed: new plan, new keys
    changed = make_plan(_spec(_csv(tmp_path, frame, "changed.csv"), fit_params={"clf__sample_weight": "weight"}), store)
    assert changed.plan_id != plan.plan_id
    assert not {c["key"] for c in changed.candidates} & {c["key"] for c in plan.candidates}
    regrouped = frame.assign(patient=frame["patient"].iloc[::-1].to_numpy())
    moved = make_plan(
        _spec(_csv(tmp_path, regrouped, "regrouped.csv"), fit_params={"clf__sample_weight": "weight"}), store
    )
    assert moved.plan_id != changed.plan_id


def test_a_damaged_fit_params_snapshot_stops_the_worker_and_heals_on_re_plan(tmp_path: Path) -> None:
    spec = _spec(_csv(tmp_path), fit_params={"clf__sample_weight": "weight"})
    store = Store(str(tmp_path / "store"))
    plan = make_plan(spec, store)
    snapshot = tmp_path / "store" / str(plan.file("fit_params"))
    payload = bytearray(snapshot.read_bytes())
    payload[-9] ^= 0xFF  # same size: only the checksum can tell
    snapshot.write_bytes(bytes(payload))
    with pytest.raises(worker.BadInput, match=r"fit_params\.npz is damaged"):
        worker.evaluate_candidates(plan.uri, [0])
    with pytest.raises(worker.BadInput, match=r"fit_params\.npz is damaged"):
        worker.refit_candidate(plan.uri, 0, str(tmp_path / "model.joblib"))
    assert not (tmp_path / "store" / "results").exists()
    assert verify_plan(store, plan.plan_id) is None
    assert make_plan(spec, store).plan_id == plan.plan_id and verify_plan(store, plan.plan_id) is not None


# --------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"holdout": {"test_size": 0.2, "stratify": True}}, "holdout.stratify", "GroupShuffleSplit"),
        ({"fit_params": {"clf__sample_weight": "label"}}, "fit_params.clf__sample_weight", "target"),
        ({"fit_params": {"clf__sample_weight": 3}}, "fit_params.clf__sample_weight", "name the column"),
        ({"fit_params": []}, "fit_params", "clf__sample_weight"),
    ],
)
def test_bad_specs_are_refused_at_parse(tmp_path: Path, fields: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(SpecError) as raised:
        _spec(tmp_path / "visits.csv", **fields)
    assert raised.value.path == field and words in str(raised.value)


def test_fit_params_need_a_data_file() -> None:
    with pytest.raises(SpecError, match="object spec"):
        parse_spec(
            {
                "name": "iris",
                "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
                "estimator": {"_target_": "sklearn.svm.SVC"},
                "param_grid": {"C": [1.0]},
                "fit_params": {"sample_weight": "w"},
            }
        )


@pytest.mark.parametrize(
    ("data_fields", "fields", "field", "words"),
    [
        ({"groups": "visit"}, {}, "data.groups", "'visit' is not in"),
        ({}, {"fit_params": {"clf__sample_weight": "w"}}, "fit_params", "'w' is not in"),
        ({"columns": ["f0", "weight"]}, {"fit_params": {"clf__sample_weight": "weight"}}, "data.columns", "weight"),
        ({}, {"fit_params": {"sample_weight": "weight"}}, "fit_params.sample_weight", "<step>__<parameter>"),
        ({}, {"fit_params": {"knn__sample_weight": "weight"}}, "fit_params.knn__sample_weight", "steps are"),
        (
            {},
            {
                "estimator": {"_target_": "sklearn.neighbors.KNeighborsClassifier"},
                "param_grid": {"n_neighbors": [3]},
                "fit_params": {"sample_weight": "weight"},
            },
            "fit_params.sample_weight",
            "KNeighborsClassifier.fit does not take 'sample_weight'",
        ),
        ({"groups": None}, {}, "cv", "set data.groups"),
    ],
)
def test_bad_columns_and_fit_params_are_refused_at_plan(
    tmp_path: Path, data_fields: dict[str, Any], fields: dict[str, Any], field: str, words: str
) -> None:
    spec = _spec(_csv(tmp_path), **fields)
    document = {**spec.raw, "data": {k: v for k, v in {**spec.raw["data"], **data_fields}.items() if v is not None}}
    spec = parse_spec(document)
    with pytest.raises(SpecError) as raised:
        make_plan(spec, Store(str(tmp_path / "store")))
    assert raised.value.path == field and words in str(raised.value), str(raised.value)


def test_groups_and_fit_params_from_npz_arrays(tmp_path: Path) -> None:
    frame = _frame()
    path = tmp_path / "visits.npz"
    arrays = {
        "X": frame[FEATURES].to_numpy(),
        "y": frame["label"].to_numpy(),
        "g": frame["patient"].to_numpy(dtype=str),
    }
    np.savez(path, **arrays, w=frame["weight"].to_numpy())
    document = {**_spec(tmp_path / "x.csv").raw, "data": {"path": str(path), "groups": "g"}}
    spec = parse_spec({**document, "fit_params": {"clf__sample_weight": "w"}})
    dataset = data.load(spec, grid.build_estimator(spec))
    assert dataset.groups is not None and list(dataset.groups) == list(frame["patient"])
    np.testing.assert_array_equal(dataset.fit_params["clf__sample_weight"], frame["weight"].to_numpy())
    assert np.shape(dataset.X) == (len(frame), len(FEATURES))
    missing = parse_spec({**document, "data": {"path": str(path), "groups": "visit"}})
    with pytest.raises(SpecError, match="array 'visit' is not in") as raised:
        data.load(missing, grid.build_estimator(missing))
    assert raised.value.path == "data.groups"


def test_a_grid_that_swaps_the_step_leaves_the_check_to_the_fits(tmp_path: Path) -> None:
    swap = {"clf": [{"_target_": "sklearn.linear_model.LogisticRegression"}], "clf__C": [1.0]}
    spec = _spec(_csv(tmp_path), param_grid=swap, fit_params={"clf__sample_weight": "weight"})
    data.check_fit_params(spec, grid.build_estimator(spec))  # no refusal: each candidate's clf decides


def test_plan_command_shows_groups_and_fit_params(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _spec(_csv(tmp_path), fit_params={"clf__sample_weight": "weight"})
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.raw))
    assert cli.main(["--store", str(tmp_path / "store"), "plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "groups: patient; fit params (sliced per fold): clf__sample_weight <- weight" in out


def test_a_bad_fit_param_is_refused_by_the_cli_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _spec(_csv(tmp_path), fit_params={"clf__sample_weigth": "weight"})
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.raw))
    assert cli.main(["--store", str(tmp_path / "store"), "plan", str(path)]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("airflow-grid: invalid spec: spec.fit_params.clf__sample_weigth: LogisticRegression")
    assert "sample_weight" in message and " Fix: " in message and len(message.splitlines()) == 1


@pytest.mark.parametrize(
    ("cv_spec", "splitter"),
    [
        ({"_target_": "sklearn.model_selection.LeaveOneGroupOut"}, LeaveOneGroupOut()),
        (
            {"_target_": "sklearn.model_selection.GroupShuffleSplit", "n_splits": 4, "random_state": 2},
            GroupShuffleSplit(n_splits=4, random_state=2),
        ),
    ],
    ids=["leave-one-group-out", "group-shuffle-split"],
)
def test_group_splitters_give_sklearns_folds(tmp_path: Path, cv_spec: dict[str, Any], splitter: Any) -> None:
    path = _csv(tmp_path)
    spec = _spec(path, cv=cv_spec)
    dataset = data.load(spec, grid.build_estimator(spec))
    folds = data.make_folds(spec, grid.build_estimator(spec), dataset.X, dataset.y, dataset.groups)
    X, y, groups, _ = _read(path)
    expected = list(splitter.split(X, y, groups))
    assert len(folds) == len(expected)
    for (train, test), (want_train, want_test) in zip(folds, expected, strict=True):
        np.testing.assert_array_equal(train, want_train)
        np.testing.assert_array_equal(test, want_test)
