"""The leaderboard table: sklearn's ranking (ties, failed fits last), every metric, and the CLI prints it."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_iris
from sklearn.decomposition import PCA
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.svm import SVC

from airflow_grid import cli, leaderboard, results
from airflow_grid.grid import candidate_label

# cache_size never changes a score (ties); PCA(n_components=10) on iris's 4 features fails every fit (NaN).
GRID = {"pca__n_components": [2, 10], "clf__C": [0.1, 1], "clf__cache_size": [100, 200]}


@pytest.fixture(scope="module")
def search() -> GridSearchCV:
    X, y = load_iris(return_X_y=True)
    estimator = Pipeline([("pca", PCA()), ("clf", SVC())])
    scoring = {"acc": "accuracy", "f1": "f1_macro"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FitFailedWarning and non-finite scores are the point here
        return GridSearchCV(estimator, GRID, scoring=scoring, refit="f1", cv=3, error_score=np.nan).fit(X, y)


def table_rows(text: str) -> list[list[str]]:
    """Data rows split on runs of 2+ spaces: [rank, metric cells..., fit time, params]."""
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()[2:] if not line.startswith("*")]


def test_rows_follow_sklearn_ranks_with_failed_fits_last(search: GridSearchCV) -> None:
    cv = search.cv_results_
    text = leaderboard.render(cv, "f1", top=20, best_index=search.best_index_)
    lines = text.splitlines()
    assert lines[0] == "top 8 of 8 candidates by mean_test_f1 (mean ± std over 3 folds)"
    assert lines[1].split() == ["rank", "f1", "acc", "fit", "time", "params"]  # the refit metric first
    rows = table_rows(text)
    expected = sorted(range(8), key=lambda i: (cv["rank_test_f1"][i], i))
    assert [row[-1] for row in rows] == [candidate_label(cv["params"][i]) for i in expected]
    assert [int(row[0].lstrip("*")) for row in rows] == [int(cv["rank_test_f1"][i]) for i in expected]
    # Ties share sklearn's rank ("min" method) and keep candidate order.
    assert rows[0][0] == "*1" and rows[1][0] == "1"
    assert "cache_size=100" in rows[0][-1] and rows[1][-1] == rows[0][-1].replace("cache_size=100", "cache_size=200")
    # Failed fits (NaN means) rank last, as sklearn ranks them, and say nan.
    failed = [row for row in rows if "n_components=10" in row[-1]]
    assert rows[-4:] == failed and all(row[1] == row[2] == "nan" for row in failed)
    assert {row[0] for row in failed} == {"5"}
    top = expected[0]
    mean, std = cv["mean_test_acc"][top], cv["std_test_acc"][top]
    assert rows[0][1:3] == [f"{cv['mean_test_f1'][top]:.4f} ± {cv['std_test_f1'][top]:.4f}", f"{mean:.4f} ± {std:.4f}"]
    assert rows[0][3] == f"{cv['mean_fit_time'][top]:.3f}s"


def test_top_limits_the_rows(search: GridSearchCV) -> None:
    text = leaderboard.render(search.cv_results_, "f1", top=3)
    assert text.splitlines()[0].startswith("top 3 of 8 candidates")
    assert len(table_rows(text)) == 3


def test_json_cv_results_render_the_same(search: GridSearchCV) -> None:
    """cv_results.json (NaN as NaN, or as null from other writers) gives the same table as the numpy columns."""
    as_json = json.loads(json.dumps(results.to_json(search.cv_results_), default=lambda value: value.item()))
    with_nulls = {k: [None if isinstance(v, float) and math.isnan(v) else v for v in col] for k, col in as_json.items()}
    expected = leaderboard.render(search.cv_results_, "f1")
    assert leaderboard.render(as_json, "f1") == leaderboard.render(with_nulls, "f1") == expected


def test_winner_below_rank_one_is_marked_and_explained(search: GridSearchCV) -> None:
    second = sorted(range(8), key=lambda i: (search.cv_results_["rank_test_f1"][i], i))[2]
    text = leaderboard.render(search.cv_results_, "f1", best_index=second)
    assert table_rows(text)[2][0].startswith("*") and text.endswith("* = winner")


def test_default_metric_is_the_first(search: GridSearchCV) -> None:
    assert leaderboard.render(search.cv_results_).splitlines()[1].split()[:3] == ["rank", "acc", "f1"]


@pytest.mark.parametrize(
    ("cv_results", "message"),
    [
        pytest.param({"params": []}, r"no mean_test_<metric> column", id="no-metric"),
        pytest.param(
            {"mean_test_acc": [1.0]}, r"refit_metric 'f1' is not a test metric .*use one of \['acc'\]", id="bad"
        ),
    ],
)
def test_errors_name_the_value(cv_results: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        leaderboard.render(cv_results, "f1" if "mean_test_acc" in cv_results else None)


def test_airflow_grid_run_ends_with_the_leaderboard(
    iris_doc: Any, store_root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = iris_doc(
        estimator={
            "_target_": "sklearn.pipeline.Pipeline",
            "steps": [["pca", {"_target_": "sklearn.decomposition.PCA"}], ["clf", {"_target_": "sklearn.svm.SVC"}]],
        },
        param_grid={"pca__n_components": [2, 10], "clf__C": [0.1, 10]},
        scoring={"acc": "accuracy", "f1": "f1_macro"},
        refit="f1",
    )
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(document))
    out = tmp_path / "out"
    argv = ["--store", store_root, "run", str(spec_path), "--out", str(out), "--no-refit"]
    assert cli.main([*argv, "--candidates-per-process", "4"]) == 0
    printed = capsys.readouterr().out
    cv_results = json.loads((out / "cv_results.json").read_text())
    best = json.loads((out / "best.json").read_text())["best_index"]
    table = leaderboard.render(cv_results, "f1", best_index=best)
    assert printed.rstrip("\n").endswith(table)
    assert "top 4 of 4 candidates by mean_test_f1" in printed
    assert [line.split()[1:3] for line in table.splitlines()[-2:]] == [["nan", "nan"]] * 2  # failed fits last
