"""Custom scorers (``{make_scorer: <sklearn.metrics function>, ...}``) and refit rules (one standard error).

Unit tests check validation (every error names the field, shows the value, says the fix), the pure selection
function and the candidate key; the slow tests run ``airflow-grid run`` and compare against GridSearchCV with
``make_scorer`` and with the equivalent ``refit`` callable, cell by cell.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import fbeta_score, make_scorer, zero_one_loss
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from test_equivalence import Fitted, Reference, _check_ok, assert_equivalent, fit_reference, run_cli, write_spec

from airflow_grid import grid, results, scoring_spec
from airflow_grid.errors import SpecError
from airflow_grid.spec import parse_spec

C_VALUES = [0.001, 0.01, 0.1, 1.0, 10.0]
GRID = {"clf__C": C_VALUES, "clf__fit_intercept": [True, False]}
RULE = {"metric": "acc", "rule": "one_standard_error", "simplest": {"param": "clf__C", "order": "ascending"}}


def _document(**fields: Any) -> dict[str, Any]:
    document = {
        "name": "scoring-rules",
        "data": {"_target_": "sklearn.datasets.load_breast_cancer", "return_X_y": True},
        "estimator": {
            "_target_": "sklearn.pipeline.Pipeline",
            "steps": [
                ["scale", {"_target_": "sklearn.preprocessing.StandardScaler"}],
                ["clf", {"_target_": "sklearn.linear_model.LogisticRegression", "max_iter": 1000}],
            ],
        },
        "param_grid": copy.deepcopy(GRID),
        "cv": 4,
        "scoring": {"acc": "accuracy", "f2": {"make_scorer": "fbeta_score", "beta": 2}},
        "refit": "acc",
    }
    return {**document, **copy.deepcopy(fields)}


def says(path: str, *parts: str) -> str:
    return re.escape(f"spec.{path}: ") + "".join(".*" + re.escape(part) for part in parts) + ".*Fix: "


# --------------------------------------------------------------------------------------------------
# Validation: at parse, so at plan, before anything runs


def _f2(**entry: Any) -> dict[str, Any]:
    return {"acc": "accuracy", "f2": {"make_scorer": "fbeta_score", "beta": 2, **entry}}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param(
            {"scoring": _f2(make_scorer="sklearn.metrics.fbeta_score")},
            says("scoring.f2.make_scorer", "'sklearn.metrics.fbeta_score'", "only a function name"),
            id="dotted-name",
        ),
        pytest.param(
            {"scoring": _f2(make_scorer="os.system")},
            says("scoring.f2.make_scorer", "'os.system'", "only a function name"),
            id="other-module",
        ),
        pytest.param(
            {"scoring": _f2(make_scorer="fbeta_scor")},
            says("scoring.f2.make_scorer", "'fbeta_scor'", "not a score or loss function"),
            id="unknown-function",
        ),
        pytest.param(  # a public sklearn.metrics function, but not a metric: returns a matrix
            {"scoring": _f2(make_scorer="confusion_matrix")},
            says("scoring.f2.make_scorer", "'confusion_matrix'", "not a score or loss function"),
            id="non-metric-function",
        ),
        pytest.param(
            {"scoring": _f2(make_scorer="make_scorer")},
            says("scoring.f2.make_scorer", "'make_scorer'", "not a score or loss function"),
            id="make-scorer-itself",
        ),
        pytest.param(
            {"scoring": _f2(make_scorer="_check_targets")},
            says("scoring.f2.make_scorer", "'_check_targets'"),
            id="private-name",
        ),
        pytest.param(
            {"scoring": _f2(bta=3)},
            says("scoring.f2.bta", "fbeta_score takes no keyword argument 'bta'", "3") + "did you mean beta?",
            id="unknown-kwarg",
        ),
        pytest.param(
            {"scoring": _f2(y_true=[1])},
            says("scoring.f2.y_true", "no keyword argument 'y_true'"),
            id="data-argument",
        ),
        pytest.param(
            {"scoring": _f2(average={"_target_": "sklearn.svm.SVC"})},
            says("scoring.f2.average", "a metric argument is a plain value"),
            id="object-spec-kwarg",
        ),
        pytest.param(
            {"scoring": _f2(response_method="predict_probaa")},
            says("scoring.f2.response_method", "'predict_probaa'"),
            id="bad-response-method",
        ),
        pytest.param(
            {"scoring": _f2(response_method=["predict", "transform"])},
            says("scoring.f2.response_method", "transform"),
            id="bad-response-method-list",
        ),
        pytest.param(
            {"scoring": _f2(greater_is_better="yes")},
            says("scoring.f2.greater_is_better", "'yes'"),
            id="bad-greater-is-better",
        ),
        pytest.param(
            {"scoring": {"make_scorer": "fbeta_score", "beta": 2}, "refit": None},
            says("scoring", "needs a metric name"),
            id="unnamed-make-scorer",
        ),
        pytest.param({"refit": {**RULE, "rule": "best"}}, says("refit.rule", "'best'"), id="bad-rule"),
        pytest.param({"refit": {**RULE, "metric": "f3"}}, says("refit.metric", "'f3'"), id="unknown-metric"),
        pytest.param(
            {"refit": {**RULE, "simplest": {"param": "clf__C", "order": "up"}}},
            says("refit.simplest.order", "'up'"),
            id="bad-order",
        ),
        pytest.param(
            {"refit": {**RULE, "simplest": {"param": "clf__c"}}},
            says("refit.simplest.param", "'clf__c'", "not a searched parameter") + "did you mean clf__C",
            id="unknown-param",
        ),
        pytest.param(
            {"refit": {**RULE, "simplest": {"param": "clf__fit_intercept"}}},
            says("refit.simplest.param", "have no order"),
            id="unordered-param",
        ),
        pytest.param({"refit": {**RULE, "simplest": "clf__C"}}, says("refit.simplest", "'clf__C'"), id="no-mapping"),
        pytest.param({"refit": {**RULE, "tie": "first"}}, says("refit.tie", "unknown field"), id="unknown-field"),
        pytest.param(
            {"refit": {**RULE, "simplest": {"param": "clf__C", "prefer": "low"}}},
            says("refit.simplest.prefer", "unknown field"),
            id="unknown-simplest-field",
        ),
        pytest.param(
            {"scoring": "accuracy", "refit": {**RULE, "metric": "f1"}},
            says("refit.metric", "'f1' with a single metric"),
            id="single-metric-other-name",
        ),
    ],
)
def test_bad_scoring_or_rule_names_path_value_and_fix(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(_document(**fields))


def test_make_scorer_entry_is_built_once_for_cv_and_holdout() -> None:
    spec = parse_spec(_document(refit="f2"))
    built = scoring_spec.scorers(spec)
    assert built["acc"] == "accuracy"
    assert repr(built["f2"]) == repr(make_scorer(fbeta_score, beta=2))
    assert repr(scoring_spec.refit_scorer(spec)) == repr(built["f2"])
    assert spec.raw["scoring"]["f2"] == {"make_scorer": "fbeta_score", "beta": 2}  # JSON-ready, as written
    loss = parse_spec(_document(scoring={"r": {"make_scorer": "zero_one_loss", "greater_is_better": False}}, refit="r"))
    scorer = scoring_spec.refit_scorer(loss)
    assert (scorer._score_func, scorer._sign) == (zero_one_loss, -1)


def test_candidate_key_includes_the_make_scorer_mapping() -> None:
    def key(spec_fields: dict[str, Any]) -> str:
        return grid.candidate_key(parse_spec(_document(**spec_fields)), {"clf__C": 1.0}, "folds", "data", {})

    beta2 = key({})
    assert beta2 == key({})
    assert beta2 != key({"scoring": _f2(beta=3)})
    assert beta2 != key({"scoring": _f2(average="macro")})
    assert beta2 != key({"scoring": _f2(response_method="predict")})


def test_rule_is_normalised_and_single_metric_rule_ranks_by_score() -> None:
    spec = parse_spec(_document(refit={"metric": "acc", "rule": "one_standard_error", "simplest": {"param": "clf__C"}}))
    assert spec.refit_metric == "acc"
    assert spec.refit_rule == {**RULE, "simplest": {"param": "clf__C", "order": "ascending"}}
    single = parse_spec(
        _document(scoring="accuracy", refit={"rule": "one_standard_error", "simplest": RULE["simplest"]})
    )
    assert single.refit_metric == "score"
    assert single.refit_rule is not None and single.refit_rule["metric"] == "score"
    assert parse_spec(_document()).refit_rule is None


# --------------------------------------------------------------------------------------------------
# The selection function


def _cv_results(means: list[float], stds: list[float], params: list[dict[str, Any]]) -> dict[str, Any]:
    filled = [m if not math.isnan(m) else -np.inf for m in means]
    ranks = [1 + sum(other > mine for other in filled) for mine in filled]
    return {"mean_test_acc": means, "std_test_acc": stds, "rank_test_acc": ranks, "params": params}


def test_one_standard_error_picks_the_simplest_within_one_std_of_the_best() -> None:
    params = [{"C": 0.1}, {"C": 0.1}, {"C": 1.0}, {"C": 10.0}, {"kernel": "rbf"}, {"C": 0.01}]
    cv = _cv_results([0.90, 0.91, 0.95, 0.96, 0.955, 0.80], [0.0, 0.0, 0.01, 0.02, 0.0, 0.3], params)
    # best: index 3 (0.96 ± 0.02) -> threshold 0.94: eligible 2, 3, 4 (index 5 is not: its own std does not count)
    assert results.one_standard_error(cv, "acc", "C", "ascending") == 2
    assert results.one_standard_error(cv, "acc", "C", "descending") == 3
    cv["std_test_acc"][3] = 0.06  # threshold 0.90: 0 and 1 tie on C=0.1, the lower index wins
    assert results.one_standard_error(cv, "acc", "C", "ascending") == 0
    assert results.one_standard_error(cv, "acc", "kernel", "ascending") == 4  # lacking the param sorts last
    assert results.one_standard_error(cv, "acc", "gamma", "ascending") == 0  # nobody has it: lowest index


def test_one_standard_error_never_picks_nan_and_falls_back_to_the_best() -> None:
    params = [{"C": 0.01}, {"C": 1.0}, {"C": 10.0}]
    cv = _cv_results([math.nan, 0.9, 0.89], [math.nan, 0.05, 0.0], params)
    assert results.one_standard_error(cv, "acc", "C") == 1
    cv = _cv_results([math.nan] * 3, [math.nan] * 3, params)
    assert results.one_standard_error(cv, "acc", "C") == results.best_index(cv, "acc") == 0


def test_reduce_records_the_rule_and_reports_the_chosen_mean() -> None:
    params = [{"C": 0.1}, {"C": 1.0}]
    outcomes = [
        {"test_scores": {"acc": scores}, "fit_time": [0.0, 0.0], "score_time": [0.0, 0.0], "n_failed_fits": 0}
        for scores in ([0.93, 0.95], [0.93, 0.97])  # means 0.94, 0.95 ± 0.02
    ]
    rule = {"metric": "acc", "rule": "one_standard_error", "simplest": {"param": "C", "order": "ascending"}}
    _, plain = results.reduce(params, outcomes, n_splits=2, metric_names=["acc"], return_train_score=False,
                              refit_metric="acc")  # fmt: skip
    _, ruled = results.reduce(params, outcomes, n_splits=2, metric_names=["acc"], return_train_score=False,
                              refit_metric="acc", refit_rule=rule)  # fmt: skip
    assert (plain["best_index"], plain["best_score"], "refit_rule" in plain) == (1, pytest.approx(0.95), False)
    assert (ruled["best_index"], ruled["best_score"], ruled["refit_rule"]) == (0, pytest.approx(0.94), rule)
    assert ruled["best_params"] == {"C": 0.1}


# --------------------------------------------------------------------------------------------------
# Equivalence with GridSearchCV through `airflow-grid run`


def _estimator() -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=1000))])


def one_standard_error_callable(metric: str, param: str, descending: bool = False) -> Callable[[Any], int]:
    """The rule as a ``refit`` callable for GridSearchCV, written independently of airflow_grid.results."""

    def refit(cv_results: dict[str, Any]) -> int:
        means, stds = cv_results[f"mean_test_{metric}"], cv_results[f"std_test_{metric}"]
        best = int(np.argmin(cv_results[f"rank_test_{metric}"]))
        within = np.flatnonzero(means >= means[best] - stds[best])
        values = np.array([cv_results["params"][i][param] for i in within], dtype=np.float64)
        return int(within[np.lexsort((within, -values if descending else values))[0]])

    return refit


class _ChosenMean:
    """GridSearchCV with a callable refit has no ``best_score_``: ours is the chosen candidate's mean."""

    def __init__(self, search: Any, metric: str) -> None:
        self._search = search
        self.best_score_ = search.cv_results_[f"mean_test_{metric}"][search.best_index_]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._search, name)


@pytest.mark.slow
def test_make_scorer_metric_in_a_multi_metric_search_matches_gridsearchcv(tmp_path: Path) -> None:
    """fbeta(beta=2) by make_scorer, refit on it, with a holdout scored by the same scorer."""
    scoring = {"acc": "accuracy", "f2": {"make_scorer": "fbeta_score", "beta": 2, "average": "binary"}}
    document = _document(scoring=scoring, refit="f2", holdout={"test_size": 0.25, "random_state": 7})
    run = run_cli(tmp_path, write_spec(tmp_path, "make-scorer", document))
    _check_ok(run)
    X, y = load_breast_cancer(return_X_y=True)
    reference = Reference(
        _estimator(), GRID, X, y, cv=4, refit="f2", holdout=(0.25, 7),
        scoring={"acc": "accuracy", "f2": make_scorer(fbeta_score, beta=2, average="binary")},
    )  # fmt: skip
    assert_equivalent(run, fit_reference(reference), reference)


@pytest.mark.slow
@pytest.mark.parametrize("descending", [False, True], ids=["ascending", "descending"])
def test_one_standard_error_rule_matches_gridsearchcv_refit_callable(tmp_path: Path, descending: bool) -> None:
    order = "descending" if descending else "ascending"
    rule = {"metric": "acc", "rule": "one_standard_error", "simplest": {"param": "clf__C", "order": order}}
    run = run_cli(tmp_path, write_spec(tmp_path, "one-se", _document(refit=rule)))
    _check_ok(run)
    X, y = load_breast_cancer(return_X_y=True)
    reference = Reference(
        _estimator(), GRID, X, y, cv=4, refit=one_standard_error_callable("acc", "clf__C", descending),
        scoring={"acc": "accuracy", "f2": make_scorer(fbeta_score, beta=2)},
    )  # fmt: skip
    fitted = fit_reference(reference)
    search = fitted.search
    # the rule matters here: rank 1 is not its choice (ties on C go to the lower index in the ascending case)
    assert search.best_index_ != int(np.argmin(search.cv_results_["rank_test_acc"]))
    assert run.best["refit_rule"] == rule
    chosen = Fitted(search=_ChosenMean(search, "acc"), holdout_score=None)  # type: ignore[arg-type]
    assert_equivalent(run, chosen, dataclasses.replace(reference, refit="acc"))
    assert f"mean_test_acc={run.best['best_score']:.4f}" in run.completed.stdout


@pytest.mark.slow
def test_single_metric_rule_with_holdout_matches_gridsearchcv(tmp_path: Path) -> None:
    """Single metric: the rule on ``score``; the refit winner is the rule's and the holdout scores it."""
    rule = {"rule": "one_standard_error", "simplest": {"param": "clf__C", "order": "ascending"}}
    document = _document(scoring="accuracy", refit=rule, holdout={"test_size": 0.25, "random_state": 7})
    run = run_cli(tmp_path, write_spec(tmp_path, "one-se-single", document))
    _check_ok(run)
    X, y = load_breast_cancer(return_X_y=True)
    reference = Reference(
        _estimator(), GRID, X, y, cv=4, scoring="accuracy", holdout=(0.25, 7),
        refit=one_standard_error_callable("score", "clf__C"),
    )  # fmt: skip
    fitted = fit_reference(reference)
    assert fitted.search.best_index_ != int(np.argmin(fitted.search.cv_results_["rank_test_score"]))
    chosen = Fitted(search=_ChosenMean(fitted.search, "score"), holdout_score=fitted.holdout_score)  # type: ignore[arg-type]
    assert_equivalent(run, chosen, dataclasses.replace(reference, refit=True))


def test_mlflow_parent_run_records_the_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from airflow_grid.tracking import runs

    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = [{"C": 0.1}, {"C": 1.0}]
    outcomes = [
        {"test_scores": {"acc": scores}, "fit_time": [0.0, 0.0], "score_time": [0.0, 0.0], "n_failed_fits": 0}
        for scores in ([0.93, 0.95], [0.93, 0.97])
    ]
    rule = {"metric": "acc", "rule": "one_standard_error", "simplest": {"param": "C", "order": "ascending"}}
    cv_results, best = results.reduce(params, outcomes, n_splits=2, metric_names=["acc"], return_train_score=False,
                                      refit_metric="acc", refit_rule=rule)  # fmt: skip
    parent = runs.log_study(
        study="scoring-rules", dag_id="dag", run_id="run", cv_results=results.to_json(cv_results),
        best={**best, "holdout_score": None}, spec_yaml="name: scoring-rules\n", tags={},
    )  # fmt: skip
    tags = runs.client().get_run(parent).data.tags
    assert json.loads(tags[runs.TAG_REFIT_RULE]) == rule
    assert tags[runs.TAG_BEST_INDEX] == "0"
