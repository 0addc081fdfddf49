"""Spec validation: every bad field fails with its path, its value and the fix; `_target_` is allowlisted."""

from __future__ import annotations

import json
import math
import re
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from airflow_grid.spec import (
    ALLOWED_TARGETS_ENV,
    Holdout,
    SpecError,
    build,
    load_spec_file,
    parse_spec,
)

Doc = Callable[..., dict[str, Any]]


def says(path: str, *parts: str) -> str:
    """A `match=` pattern: the message starts with the field path, then shows each part in order."""
    return re.escape(f"spec.{path}: ") + "".join(".*" + re.escape(part) for part in parts)


# --------------------------------------------------------------------------------------------------
# One test per class of bad spec

BAD_FIELDS = [
    # param_grid
    pytest.param(
        {"param_grid": [{"clf__C": 1}]},
        says("param_grid[0].clf__C", "got 1 (int)", "Fix: single values need to be wrapped in a list", "[1]"),
        id="grid-scalar-in-list-of-mappings",
    ),
    pytest.param(
        {"param_grid": {"clf__kernel": "rbf"}},
        says("param_grid.clf__kernel", "got 'rbf' (str)", "wrapped in a list with one element: ['rbf']"),
        id="grid-scalar-in-mapping",
    ),
    pytest.param(
        {"param_grid": [{"clf__C": [1]}, {"clf__C": []}]},
        says("param_grid[1].clf__C", "empty list", "Fix: give at least one value"),
        id="grid-empty-list",
    ),
    pytest.param(
        {"param_grid": "clf__C=1"},
        says("param_grid", "got 'clf__C=1'", "Fix: give a mapping of parameter name to a list of values"),
        id="grid-string",
    ),
    pytest.param({"param_grid": []}, says("param_grid", "got []", "Fix: give a mapping"), id="grid-empty"),
    pytest.param({"param_grid": None}, says("param_grid", "got None", "Fix: give a mapping"), id="grid-missing"),
    pytest.param(
        {"param_grid": [{"clf__C": [1]}, ["clf__C", 2]]},
        says("param_grid[1]", "got ['clf__C', 2]", "must be a mapping", "Fix: write each item as"),
        id="grid-list-item-not-mapping",
    ),
    # top level
    pytest.param(
        {"param_grids": {"clf__C": [1]}},
        says("param_grids", "unknown field (value {'clf__C': [1]})", "Fix: did you mean param_grid?"),
        id="unknown-field-typo",
    ),
    pytest.param(
        {"owner": "me"},
        says("owner", "unknown field (value 'me')", "Fix: known fields are: backend, cv"),
        id="unknown-field",
    ),
    pytest.param({"name": "Iris Model"}, says("name", "got 'Iris Model'", "Fix: use 1-63 lowercase"), id="name-space"),
    pytest.param({"name": "-iris"}, says("name", "got '-iris'", "Fix: use 1-63"), id="name-leading-dash"),
    pytest.param({"name": "x" * 64}, says("name", "got 'xxx", "Fix: use 1-63"), id="name-too-long"),
    pytest.param({"name": None}, says("name", "got None", "e.g. digits-model-family"), id="name-missing"),
    pytest.param(
        {"estimator": "sklearn.svm.SVC"},
        says("estimator", "got 'sklearn.svm.SVC'", "Fix: give an object spec, e.g. {_target_: sklearn.svm.SVC}"),
        id="estimator-not-object-spec",
    ),
    pytest.param(
        {"estimator": {"_target_": "SVC"}},
        says("estimator._target_", "must be a dotted import path, got 'SVC'", "Fix: write the full path"),
        id="estimator-target-not-dotted",
    ),
    # scoring and refit
    pytest.param(
        {"scoring": "acuracy"},
        says("scoring", "unknown scorer 'acuracy'", "Fix: use a name from sklearn.metrics.get_scorer_names()"),
        id="scorer-str",
    ),
    pytest.param(
        {"scoring": ["accuracy", "f1_mac"], "refit": "accuracy"},
        says("scoring[1]", "unknown scorer 'f1_mac'", "Did you mean: f1_macro", "Fix: use a name from"),
        id="scorer-in-list",
    ),
    pytest.param(
        {"scoring": {"acc": "accuracy", "auc": "roc_auc_ov"}, "refit": "acc"},
        says("scoring.auc", "unknown scorer 'roc_auc_ov'", "Fix: use a name from"),
        id="scorer-in-dict",
    ),
    pytest.param(
        {"scoring": ["accuracy", "accuracy"]},
        says("scoring", "got duplicates in ['accuracy', 'accuracy']", "Fix: list each scorer once"),
        id="scorer-duplicates",
    ),
    pytest.param({"scoring": 3}, says("scoring", "got 3", "Fix: give a scorer name, a list"), id="scoring-number"),
    pytest.param(
        {"scoring": ["accuracy", "f1_macro"]},
        says("refit", "got None", "must name the one that picks the winner", "one of ['accuracy', 'f1_macro']"),
        id="refit-missing-multimetric",
    ),
    pytest.param(
        {"scoring": {"acc": "accuracy", "f1": "f1_macro"}, "refit": "accuracy"},
        says("refit", "got 'accuracy'", "Fix: write refit: one of ['acc', 'f1']"),
        id="refit-scorer-not-metric-name",
    ),
    pytest.param(
        {"scoring": ["accuracy", "f1_macro"], "refit": True},
        says("refit", "got True", "one of ['accuracy', 'f1_macro']"),
        id="refit-true-multimetric",
    ),
    pytest.param(
        {"scoring": "accuracy", "refit": "f1_macro"},
        says("refit", "got 'f1_macro' with a single metric", "Fix: omit refit"),
        id="refit-other-metric-single",
    ),
    # error_score, return_train_score, backend
    pytest.param(
        {"error_score": "ignore"},
        says("error_score", "got 'ignore'", "Fix: write a number (e.g. .nan or 0) or 'raise'"),
        id="error-score-string",
    ),
    pytest.param({"error_score": True}, says("error_score", "got True", "or 'raise'"), id="error-score-bool"),
    pytest.param({"error_score": None}, says("error_score", "got None", "or 'raise'"), id="error-score-null"),
    pytest.param(
        {"return_train_score": "yes"}, says("return_train_score", "got 'yes'", "Fix: write true or false"), id="rts"
    ),
    pytest.param({"backend": "slurm"}, says("backend", "got 'slurm'", "Fix: write local or kubernetes"), id="backend"),
    # cv
    pytest.param({"cv": 0}, says("cv", "got 0", "at least 2 folds", "Fix: write cv: 5"), id="cv-0"),
    pytest.param({"cv": 1}, says("cv", "got 1", "at least 2 folds", "Fix: write cv: 5"), id="cv-1"),
    pytest.param({"cv": -3}, says("cv", "got -3", "at least 2 folds"), id="cv-negative"),
    pytest.param(
        {"cv": "5"}, says("cv", "got '5'", "Fix: give a number of folds (>= 2) or a splitter"), id="cv-string"
    ),
    pytest.param({"cv": True}, says("cv", "got True", "Fix: give a number of folds"), id="cv-bool"),
    pytest.param({"cv": 2.5}, says("cv", "got 2.5", "Fix: give a number of folds"), id="cv-float"),
    pytest.param(
        {"cv": {"n_splits": 5}}, says("cv", "got {'n_splits': 5}", "KFold, n_splits: 5"), id="cv-mapping-no-target"
    ),
    # holdout
    pytest.param(
        {"holdout": {"test_size": 1.5}},
        says("holdout.test_size", "got 1.5", "Fix: give a fraction in (0, 1) or a number of rows"),
        id="holdout-fraction-above-1",
    ),
    pytest.param({"holdout": {"test_size": 0}}, says("holdout.test_size", "got 0", "fraction"), id="holdout-zero"),
    pytest.param(
        {"holdout": {"test_size": "20%"}}, says("holdout.test_size", "got '20%'", "fraction"), id="holdout-percent"
    ),
    pytest.param(
        {"holdout": {"test_size": 0.2, "random_state": "seed"}},
        says("holdout.random_state", "got 'seed'", "Fix: give an integer"),
        id="holdout-random-state",
    ),
    pytest.param(
        {"holdout": {"stratify": "yes"}},
        says("holdout.stratify", "got 'yes'", "Fix: write true or false"),
        id="holdout-stratify",
    ),
    pytest.param(
        {"holdout": {"size": 0.2}},
        says("holdout.size", "unknown field (value 0.2)", "Fix: holdout takes test_size, random_state, stratify"),
        id="holdout-unknown-field",
    ),
    pytest.param(
        {"holdout": 0.2}, says("holdout", "got 0.2", "Fix: write holdout: {test_size: 0.2"), id="holdout-number"
    ),
    # resources
    pytest.param(
        {"resources": {"cpu": "abc"}},
        says("resources.cpu", "got 'abc'", "Fix: give cores as a number (2, 0.5) or millicores ('500m')"),
        id="cpu-abc",
    ),
    pytest.param(
        {"resources": {"cpu": -1}}, says("resources.cpu", "got -1", "must be positive", "cpu: 1"), id="cpu-negative"
    ),
    pytest.param({"resources": {"cpu": 0}}, says("resources.cpu", "got 0", "must be positive"), id="cpu-zero"),
    pytest.param({"resources": {"cpu": "2Gi"}}, says("resources.cpu", "got '2Gi'", "millicores"), id="cpu-memory"),
    pytest.param(
        {"resources": {"memory": "lots"}},
        says("resources.memory", "got 'lots'", "Fix: give a Kubernetes quantity such as 512Mi or 2Gi"),
        id="memory-lots",
    ),
    pytest.param(
        {"resources": {"memory": 1024}},
        says("resources.memory", "got 1024 (= 1024 bytes), below 1Mi", "memory: 1Gi"),
        id="memory-too-small",
    ),
    pytest.param(
        {"resources": {"cpu": 1, "gpu": 1}},
        says("resources.gpu", "unknown field (value 1)", "Fix: resources takes cpu, memory and timeout"),
        id="resources-unknown-key",
    ),
    pytest.param(
        {"resources": "small"}, says("resources", "got 'small'", "{cpu: 1, memory: 2Gi}"), id="resources-string"
    ),
    # limits
    pytest.param(
        {"limits": {"max_fits": 0}},
        says("limits.max_fits", "got 0", "Fix: give a positive integer"),
        id="max-fits-zero",
    ),
    pytest.param({"limits": {"max_fits": -10}}, says("limits.max_fits", "got -10", "positive"), id="max-fits-neg"),
    pytest.param({"limits": {"max_fits": "1k"}}, says("limits.max_fits", "got '1k'", "positive"), id="max-fits-str"),
    pytest.param({"limits": {"max_fits": True}}, says("limits.max_fits", "got True", "positive"), id="max-fits-bool"),
    pytest.param(
        {"limits": {"max_candidates": 5}},
        says("limits", "got {'max_candidates': 5}", "Fix: write limits: {max_fits: 5000}"),
        id="limits-unknown-key",
    ),
    # data
    pytest.param({"data": None}, says("data", "got None", "Fix: give an object spec returning (X, y)"), id="data-none"),
    pytest.param(
        {"data": "iris.csv"}, says("data", "got 'iris.csv'", "{path: data.parquet, target: label}"), id="data-string"
    ),
    pytest.param(
        {"data": {"path": "s3://bucket/train.txt", "target": "y"}},
        says("data.format", "cannot tell the format of 's3://bucket/train.txt'", "Fix: write format: csv"),
        id="data-unknown-format",
    ),
    pytest.param(
        {"data": {"path": "train.csv", "format": "xlsx", "target": "y"}},
        says("data.format", "got 'xlsx'", "csv, parquet or npz"),
        id="data-bad-format",
    ),
    pytest.param(
        {"data": {"path": "train.parquet"}},
        says("data.target", "got None", "Fix: name the column holding y"),
        id="data-missing-target",
    ),
    pytest.param({"data": {"path": ""}}, says("data.path", "got ''", "Fix: give a file path"), id="data-empty-path"),
    pytest.param(
        {"data": {"path": "train.csv", "target": "y", "sep": ";"}},
        says("data.sep", "unknown field (value ';')", "Fix: data takes path, target, format and columns"),
        id="data-unknown-field",
    ),
]


@pytest.mark.parametrize(("fields", "message"), BAD_FIELDS)
def test_bad_spec_names_path_value_and_fix(iris_doc: Doc, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(iris_doc(**fields))


@pytest.mark.parametrize("missing", ["name", "estimator"])
def test_missing_required_field(iris_doc: Doc, missing: str) -> None:
    document = iris_doc()
    del document[missing]
    with pytest.raises(SpecError, match=says(missing, "got None", "Fix:")):
        parse_spec(document)


def test_spec_error_carries_the_path(iris_doc: Doc) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(iris_doc(param_grid=[{"clf__C": 1}]))
    assert caught.value.path == "param_grid[0].clf__C"


def test_document_must_be_a_mapping() -> None:
    with pytest.raises(SpecError, match=r"^spec: must be a mapping, got \['name'\]\. Fix: see dags/specs/"):
        parse_spec(["name"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# `_target_` allowlist

REFUSED_TARGETS = [
    pytest.param("os.system", "'os.' can run code or touch the system", id="os.system"),
    pytest.param("builtins.eval", "'builtins.' can run code", id="builtins.eval"),
    pytest.param("subprocess.Popen", "'subprocess.' can run code", id="subprocess.Popen"),
    pytest.param("subprocess.run", "'subprocess.' can run code", id="subprocess.run"),
    pytest.param("sklearn.datasets.dump_svmlight_file", "it is a function", id="sklearn-file-writer"),
    pytest.param("sklearn.datasets.fetch_openml", "it is a function", id="sklearn-downloader"),
    pytest.param("sklearn.utils._testing.something", "'_testing' is private", id="sklearn-private"),
    pytest.param("numpy.load", "not under an allowed prefix (sklearn., scipy.stats.)", id="numpy.load-not-allowlisted"),
    pytest.param("sklearn.base.platform.os.system", "passes through module 'platform'", id="through-a-module"),
    pytest.param("sklearn.utils.Bunch", "it is a class, but not an estimator", id="sklearn-non-estimator-class"),
]


def _at_estimator(target: str) -> tuple[dict[str, Any], str]:
    return {"estimator": {"_target_": target}}, "estimator._target_"


def _in_pipeline_step(target: str) -> tuple[dict[str, Any], str]:
    steps = [["scale", {"_target_": "sklearn.preprocessing.StandardScaler"}], ["clf", {"_target_": target}]]
    return {"estimator": {"_target_": "sklearn.pipeline.Pipeline", "steps": steps}}, "estimator.steps[1][1]._target_"


def _in_grid_value(target: str) -> tuple[dict[str, Any], str]:
    grid = [{"clf__C": [1]}, {"clf": [{"_target_": "sklearn.svm.SVC"}, {"_target_": target}]}]
    return {"param_grid": grid}, "param_grid[1].clf[1]._target_"


def _nested_in_grid_value(target: str) -> tuple[dict[str, Any], str]:
    bagging = {"_target_": "sklearn.ensemble.BaggingClassifier", "estimator": {"_target_": target}}
    return {"param_grid": {"clf": [bagging]}}, "param_grid.clf[0].estimator._target_"


def _in_data(target: str) -> tuple[dict[str, Any], str]:
    return {"data": {"_target_": target, "return_X_y": True}}, "data._target_"


def _in_cv(target: str) -> tuple[dict[str, Any], str]:
    return {"cv": {"_target_": target, "n_splits": 3}}, "cv._target_"


LOCATIONS = [
    pytest.param(_at_estimator, id="estimator"),
    pytest.param(_in_pipeline_step, id="pipeline-step"),
    pytest.param(_in_grid_value, id="param-grid-value"),
    pytest.param(_nested_in_grid_value, id="param-grid-nested"),
    pytest.param(_in_data, id="data"),
    pytest.param(_in_cv, id="cv"),
]


@pytest.mark.parametrize("place", LOCATIONS)
@pytest.mark.parametrize(("target", "reason"), REFUSED_TARGETS)
def test_refused_target(
    iris_doc: Doc, place: Callable[[str], tuple[dict[str, Any], str]], target: str, reason: str
) -> None:
    fields, path = place(target)
    with pytest.raises(SpecError, match=says(path, f"_target_ {target!r} is not allowed", reason, "Fix: use")):
        parse_spec(iris_doc(**fields))


@dataclass
class Canary:
    """An importable module that leaves a marker file when (and only when) it is imported."""

    module: str
    marker: Path

    @property
    def imported(self) -> bool:
        return self.module in sys.modules or self.marker.exists()

    @property
    def called(self) -> bool:
        return self.marker.with_name("called").exists()


@pytest.fixture
def canary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Canary]:
    module = f"airflow_grid_canary_{uuid.uuid4().hex[:12]}"
    marker = tmp_path / "imported"
    called = tmp_path / "called"
    source = (
        f"import pathlib\nfrom sklearn.base import BaseEstimator\npathlib.Path({str(marker)!r}).touch()\n\n\n"
        f"class Model(BaseEstimator):\n    def __init__(self, alpha=1):\n"
        f"        pathlib.Path({str(called)!r}).touch()\n        self.alpha = alpha\n\n\n"
        f"def dump_all(**kwargs):\n    pathlib.Path({str(called)!r}).touch()\n"
    )
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield Canary(module, marker)
    sys.modules.pop(module, None)


@pytest.mark.parametrize(
    ("extra_allowed", "attribute", "reason"),
    [
        pytest.param((), "Model", "not under an allowed prefix", id="not-allowlisted"),
        pytest.param(("{module}.",), "_hidden", "'_hidden' is private", id="private-under-allowed-prefix"),
    ],
)
@pytest.mark.parametrize("place", LOCATIONS)
def test_refusing_imports_nothing(
    iris_doc: Doc,
    canary: Canary,
    place: Callable[[str], tuple[dict[str, Any], str]],
    extra_allowed: tuple[str, ...],
    attribute: str,
    reason: str,
) -> None:
    fields, path = place(f"{canary.module}.{attribute}")
    allowed = tuple(prefix.format(module=canary.module) for prefix in extra_allowed)
    with pytest.raises(SpecError, match=says(path, reason)):
        parse_spec(iris_doc(**fields), extra_allowed=allowed)
    assert not canary.imported


def test_validation_calls_nothing_and_build_calls_the_allowed_class(iris_doc: Doc, canary: Canary) -> None:
    spec = parse_spec(iris_doc(estimator={"_target_": f"{canary.module}.Model", "alpha": 1}), (f"{canary.module}.",))
    assert canary.imported and not canary.called  # the object is checked, never called, at validation
    assert build(spec.estimator, "estimator", spec.policy).alpha == 1
    assert canary.called


def test_functions_under_an_allowed_prefix_are_refused(iris_doc: Doc, canary: Canary) -> None:
    """A deployment prefix admits estimator classes, not every function of the module (such as a writer)."""
    target = f"{canary.module}.dump_all"
    with pytest.raises(SpecError, match=says("estimator._target_", "it is a function", "ALLOWED_CALLABLES")):
        parse_spec(iris_doc(estimator={"_target_": target}), (f"{canary.module}.",))
    assert not canary.called


@pytest.mark.parametrize(
    "setting",
    [
        pytest.param("{module}.", id="one-prefix"),
        pytest.param(" xgboost. , {module}. ,", id="list-with-spaces"),
        pytest.param("{module}", id="module-name-without-dot"),
    ],
)
def test_allowlist_from_environment(
    iris_doc: Doc, canary: Canary, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    monkeypatch.setenv(ALLOWED_TARGETS_ENV, setting.format(module=canary.module))
    spec = parse_spec(iris_doc(estimator={"_target_": f"{canary.module}.Model"}))
    assert spec.allowed[0] == "sklearn."
    assert any(canary.module in prefix for prefix in spec.allowed)


def test_allowlist_from_caller(iris_doc: Doc, canary: Canary) -> None:
    target = f"{canary.module}.Model"
    with pytest.raises(SpecError, match="not under an allowed prefix"):
        parse_spec(iris_doc(estimator={"_target_": target}))
    spec = parse_spec(iris_doc(estimator={"_target_": target}), extra_allowed=(f"{canary.module}.",))
    assert spec.estimator == {"_target_": target}


def test_prefix_without_dot_covers_whole_module_names_only(iris_doc: Doc, canary: Canary) -> None:
    parse_spec(iris_doc(estimator={"_target_": f"{canary.module}.Model"}), extra_allowed=(canary.module,))
    with pytest.raises(SpecError, match=says("estimator._target_", "not under an allowed prefix")):
        parse_spec(iris_doc(estimator={"_target_": f"{canary.module}_evil.Model"}), extra_allowed=(canary.module,))


def test_empty_prefix_allows_nothing_new(iris_doc: Doc) -> None:
    with pytest.raises(
        SpecError, match=says("estimator._target_", "'numpy.load' is not allowed: it is not under an allowed prefix")
    ):
        parse_spec(iris_doc(estimator={"_target_": "numpy.load"}), extra_allowed=("", " "))


@pytest.mark.parametrize("target", ["os.system", "os.path.join", "posix.system", "builtins.eval", "subprocess.run"])
@pytest.mark.parametrize("how", ["env", "caller"])
def test_system_modules_stay_refused_when_allowlisted(
    iris_doc: Doc, monkeypatch: pytest.MonkeyPatch, target: str, how: str
) -> None:
    prefixes = ("os.", "os", "posix.", "builtins.", "subprocess.", "")
    if how == "env":
        monkeypatch.setenv(ALLOWED_TARGETS_ENV, ",".join(prefixes))
        extra: tuple[str, ...] = ()
    else:
        extra = prefixes
    with pytest.raises(SpecError, match=says("estimator._target_", target, "refused even if the deployment allows")):
        parse_spec(iris_doc(estimator={"_target_": target}), extra_allowed=extra)


# --------------------------------------------------------------------------------------------------
# Valid forms


@pytest.mark.parametrize(
    ("fields", "scoring", "metric_names", "refit_metric", "refit_scorer"),
    [
        pytest.param({"scoring": None}, None, ["score"], "score", None, id="omitted"),
        pytest.param({"scoring": "accuracy"}, "accuracy", ["score"], "score", "accuracy", id="str"),
        pytest.param(
            {"scoring": "accuracy", "refit": "accuracy"}, "accuracy", ["score"], "score", "accuracy", id="str-refit"
        ),
        pytest.param(
            {"scoring": ["accuracy", "f1_macro"], "refit": "f1_macro"},
            ["accuracy", "f1_macro"],
            ["accuracy", "f1_macro"],
            "f1_macro",
            "f1_macro",
            id="list",
        ),
        pytest.param(
            {"scoring": {"acc": "accuracy", "bal": "balanced_accuracy"}, "refit": "bal"},
            {"acc": "accuracy", "bal": "balanced_accuracy"},
            ["acc", "bal"],
            "bal",
            "balanced_accuracy",
            id="dict",
        ),
    ],
)
def test_scoring_forms(
    iris_doc: Doc,
    fields: dict[str, Any],
    scoring: Any,
    metric_names: list[str],
    refit_metric: str,
    refit_scorer: str | None,
) -> None:
    spec = parse_spec(iris_doc(**fields))
    assert spec.scoring == scoring
    assert spec.metric_names == metric_names
    assert spec.refit_metric == refit_metric
    assert spec.refit_scorer == refit_scorer
    assert spec.multimetric == isinstance(scoring, list | dict)


@pytest.mark.parametrize(
    "cv",
    [
        pytest.param(2, id="int-2"),
        pytest.param(10, id="int-10"),
        pytest.param(
            {"_target_": "sklearn.model_selection.StratifiedKFold", "n_splits": 4, "shuffle": True, "random_state": 0},
            id="splitter",
        ),
    ],
)
def test_cv_forms(iris_doc: Doc, cv: Any) -> None:
    assert parse_spec(iris_doc(cv=cv)).cv == cv


def test_defaults(iris_doc: Doc) -> None:
    document = iris_doc()
    del document["cv"]
    spec = parse_spec(document)
    assert (spec.cv, spec.max_fits, spec.backend, spec.return_train_score, spec.holdout) == (
        5,
        5000,
        "local",
        False,
        None,
    )
    assert math.isnan(spec.error_score)  # type: ignore[arg-type]
    assert (spec.resources.cpu, spec.resources.n_jobs) == (1.0, 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("error_score: .nan", math.nan, id="yaml-nan"),
        pytest.param("error_score: .NaN", math.nan, id="yaml-NaN"),
        pytest.param("error_score: nan", math.nan, id="string-nan"),
        pytest.param("error_score: 0", 0.0, id="zero"),
        pytest.param("error_score: -1.5", -1.5, id="negative"),
        pytest.param("error_score: raise", "raise", id="raise"),
    ],
)
def test_error_score_from_yaml(iris_doc: Doc, tmp_path: Path, text: str, expected: float | str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(iris_doc()) + text + "\n")
    error_score = parse_spec(load_spec_file(path)).error_score
    if isinstance(expected, float) and math.isnan(expected):
        assert isinstance(error_score, float) and math.isnan(error_score)
    else:
        assert error_score == expected


def test_json_spec_file_parses_like_yaml(iris_doc: Doc, tmp_path: Path) -> None:
    document = iris_doc(holdout={"test_size": 0.2, "random_state": 0}, resources={"cpu": "500m", "memory": "1Gi"})
    (tmp_path / "spec.json").write_text(json.dumps(document, indent=2))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(document))
    from_json = parse_spec(load_spec_file(tmp_path / "spec.json"))
    from_yaml = parse_spec(load_spec_file(tmp_path / "spec.yaml"))
    assert from_json.estimator == {
        "_target_": "sklearn.pipeline.Pipeline",
        "steps": [["clf", {"_target_": "sklearn.svm.SVC"}]],
    }
    assert from_json.holdout == Holdout(test_size=0.2, random_state=0, stratify=None)
    assert from_json.fingerprint() == from_yaml.fingerprint()


def test_tuples_and_lists_give_the_same_fingerprint(iris_doc: Doc) -> None:
    steps = iris_doc()["estimator"]["steps"]
    as_tuples = iris_doc(estimator={"_target_": "sklearn.pipeline.Pipeline", "steps": [tuple(s) for s in steps]})
    assert parse_spec(as_tuples).fingerprint() == parse_spec(iris_doc()).fingerprint()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(
            "name: [unclosed\n",
            r"(?s)spec\.yaml is not valid YAML/JSON: .*line 1, column 7.*Fix: fix the syntax at the line shown",
            id="bad-syntax",
        ),
        pytest.param("- name: x\n", r"spec\.yaml must hold a mapping, got \[\{'name': 'x'\}\]", id="not-a-mapping"),
        pytest.param("", r"spec\.yaml must hold a mapping, got None", id="empty-file"),
    ],
)
def test_load_spec_file_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(content)
    with pytest.raises(SpecError, match=message):
        load_spec_file(path)


@pytest.mark.parametrize(
    ("resources", "cpu", "n_jobs", "memory_bytes"),
    [
        pytest.param({"cpu": "500m", "memory": "512Mi"}, 0.5, 1, 512 * 2**20, id="millicores-Mi"),
        pytest.param({"cpu": 0.5}, 0.5, 1, 2 * 2**30, id="half-core-default-memory"),
        pytest.param({"cpu": "1500m", "memory": "1G"}, 1.5, 1, 10**9, id="1500m-G"),
        pytest.param({"cpu": 2, "memory": "2Gi"}, 2.0, 2, 2 * 2**30, id="2-cores"),
        pytest.param({"cpu": "4", "memory": 2**30}, 4.0, 4, 2**30, id="string-cores-int-bytes"),
        pytest.param(None, 1.0, 1, 2 * 2**30, id="omitted"),
    ],
)
def test_resources(iris_doc: Doc, resources: dict[str, Any] | None, cpu: float, n_jobs: int, memory_bytes: int) -> None:
    parsed = parse_spec(iris_doc(resources=resources)).resources
    assert (parsed.cpu, parsed.n_jobs, parsed.memory_bytes) == (cpu, n_jobs, memory_bytes)


def test_resources_keep_the_quantities_as_written(iris_doc: Doc) -> None:
    resources = parse_spec(iris_doc(resources={"cpu": "500m", "memory": "512Mi"})).resources
    assert resources.to_json() == {"cpu": "500m", "memory": "512Mi"}


@pytest.mark.parametrize(
    ("holdout", "expected"),
    [
        pytest.param({"test_size": 0.25, "random_state": 1, "stratify": True}, Holdout(0.25, 1, True), id="fraction"),
        pytest.param({"test_size": 30}, Holdout(30, None, None), id="rows"),
        pytest.param({}, Holdout(), id="defaults"),
        pytest.param(False, None, id="off"),
    ],
)
def test_holdout_forms(iris_doc: Doc, holdout: Any, expected: Holdout | None) -> None:
    assert parse_spec(iris_doc(holdout=holdout)).holdout == expected


def test_grid_forms_normalise_to_a_list(iris_doc: Doc) -> None:
    spec = parse_spec(iris_doc(param_grid={"clf__C": [1, 10], "clf__kernel": ["rbf", None, "passthrough"]}))
    assert spec.param_grid == [{"clf__C": [1, 10], "clf__kernel": ["rbf", None, "passthrough"]}]
    assert spec.raw["param_grid"] == spec.param_grid


def test_data_path_form_infers_format(iris_doc: Doc) -> None:
    spec = parse_spec(iris_doc(data={"path": "s3://bucket/date=2024-01-01/train.parquet", "target": "churned"}))
    assert spec.data == {"path": "s3://bucket/date=2024-01-01/train.parquet", "target": "churned", "format": "parquet"}


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("dags/specs/*.yaml")), ids=lambda p: p.stem)
def test_example_specs_parse(path: Path) -> None:
    assert parse_spec(load_spec_file(path)).name == path.stem.replace("_", "-")
