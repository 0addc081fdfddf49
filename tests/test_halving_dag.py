"""A successive-halving study through the DAG (``dag.test()``): each round a wave of mapped evaluate tasks.

The shipped ``grid_search_halving`` DAG on its own spec (digits, 12 SVC candidates, 3 rounds on sub-samples):
the waves hold the round's candidates, the unneeded fourth wave is skipped, the parent MLflow run's
``cv_results.json`` equals ``HalvingGridSearchCV``'s cell for cell, and the refit DAG fits the winner of the last
round and scores it on the holdout as the class's own refit does.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_array_equal
from sklearn.datasets import load_digits
from sklearn.experimental import enable_halving_search_cv  # noqa: F401
from sklearn.model_selection import HalvingGridSearchCV, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from airflow_grid import tracking
from tests.test_airflow_integration import (
    _isolate,
    artifact,
    load_dag,
    parent_runs,
    run_refit,
    states,
    xcoms,
)

pytestmark = pytest.mark.airflow


@pytest.fixture
def isolated(airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh MLflow tracking store and result store for one test (as in test_airflow_integration)."""
    return _isolate(monkeypatch, tmp_path)


def halving_reference() -> tuple[HalvingGridSearchCV, float]:
    """dags/specs/digits_halving.yaml written as plain scikit-learn: the search and its refit's holdout score."""
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=42, stratify=y)
    search = HalvingGridSearchCV(
        Pipeline([("scale", StandardScaler()), ("clf", SVC())]),
        {"clf__C": [0.1, 1, 10, 100], "clf__gamma": [0.001, 0.01, 0.1]},
        factor=3,
        resource="n_samples",
        random_state=0,
        cv=3,
        scoring="accuracy",
        n_jobs=1,
    ).fit(X_train, y_train)
    return search, float(search.score(X_test, y_test))


def test_halving_dag_runs_rounds_as_waves_and_equals_halving_grid_search(isolated: Path) -> None:
    dag = load_dag("grid_search_halving")
    dag_run = dag.test()
    assert str(dag_run.state) == "success"
    done = states(dag.dag_id, dag_run.run_id)
    succeeded = Counter(task for (task, _), state in done.items() if state == "success")
    assert (succeeded["evaluate"], succeeded["evaluate_round_1"], succeeded["evaluate_round_2"]) == (12, 4, 2)
    assert done[("round_3", -1)] == "success" and done[("evaluate_round_3", -1)] == "skipped"
    round_2 = xcoms(dag.dag_id, dag_run.run_id, "round_2")[-1]
    assert [item["round"] for item in round_2] == [2, 2] and "n_samples=1431" in round_2[0]["label"]

    (parent,) = parent_runs("digits-halving", dag.dag_id, dag_run.run_id)
    ours = json.loads(artifact(parent.info.run_id, "cv_results.json", isolated / "artifacts"))
    search, holdout_score = halving_reference()
    theirs = search.cv_results_
    assert list(ours) == list(theirs)
    for key, column in theirs.items():
        if key.endswith(("_fit_time", "_score_time")):
            continue
        if key == "params" or key.startswith("param_"):
            assert ours[key] == [v for v in (column if key == "params" else column.data)], key
        else:
            assert_array_equal(np.asarray(ours[key], dtype=np.float64), np.asarray(column, dtype=np.float64), key)
    tags = parent.data.tags
    assert int(tags[tracking.TAG_BEST_INDEX]) == search.best_index_
    assert tags[tracking.TAG_STRATEGY] == "halving_grid"
    assert json.loads(tags[tracking.TAG_ROUNDS])["n_resources"] == search.n_resources_
    assert int(tags[tracking.TAG_BEST_ROUND]) == 2

    state, refit = run_refit(parent.info.run_id)
    assert state == "success"
    assert refit["holdout_score"] == pytest.approx(holdout_score, rel=0, abs=1e-12)
