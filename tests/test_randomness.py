"""Which components' scores depend on an unset random_state: the rules, the plan, the CLI and the MLflow parent run.

Rules are checked class by class through :func:`randomness.unseeded` on real specs (built through the policy, as
the plan builds them), with each exception scikit-learn documents; the plan, the ``airflow-grid plan`` output and
the MLflow tag/artifact are checked end to end on iris.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from airflow_grid import cli, grid, randomness, results
from airflow_grid.plan import Plan, make_plan
from airflow_grid.spec import SearchSpec, parse_spec
from airflow_grid.store import Store

RF = {"_target_": "sklearn.ensemble.RandomForestClassifier", "n_estimators": 5}


def _doc(clf: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """Iris, a Pipeline(scale, clf), a grid over a parameter no rule reads."""
    document: dict[str, Any] = {
        "name": "randomness",
        "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
        "estimator": {
            "_target_": "sklearn.pipeline.Pipeline",
            "steps": [
                ["scale", {"_target_": "sklearn.preprocessing.StandardScaler"}],
                ["clf", clf or {"_target_": "sklearn.svm.SVC"}],
            ],
        },
        "param_grid": {"scale__with_mean": [True, False]},
        "cv": 3,
    }
    return {**document, **fields}


def _unseeded(document: dict[str, Any]) -> list[dict[str, Any]]:
    spec = parse_spec(document)
    return randomness.unseeded(spec, grid.expand(spec))


def _by_component(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {entry["component"]: entry for entry in entries}


def _target(name: str, **kwargs: Any) -> dict[str, Any]:
    return {"_target_": name, **kwargs}


# --------------------------------------------------------------------------------------------------
# Estimators: listed, not listed, and "may"

ESTIMATORS = [  # id, object spec, listed?, may?
    ("forest", RF, True, False),
    ("forest-seeded", {**RF, "random_state": 0}, False, False),
    ("tree", _target("sklearn.tree.DecisionTreeClassifier"), True, False),
    ("gradient-boosting", _target("sklearn.ensemble.GradientBoostingClassifier", n_estimators=5), True, False),
    ("hist-gradient-boosting", _target("sklearn.ensemble.HistGradientBoostingClassifier"), True, True),
    (
        "hist-gb-early-stopping",
        _target("sklearn.ensemble.HistGradientBoostingClassifier", early_stopping=True),
        True,
        False,
    ),
    ("kmeans", _target("sklearn.cluster.KMeans", n_clusters=3), True, False),
    ("mlp", _target("sklearn.neural_network.MLPClassifier"), True, False),
    ("sgd", _target("sklearn.linear_model.SGDClassifier"), True, False),
    ("sgd-no-shuffle", _target("sklearn.linear_model.SGDClassifier", shuffle=False), False, False),
    (
        "sgd-no-shuffle-early-stopping",
        _target("sklearn.linear_model.SGDClassifier", shuffle=False, early_stopping=True),
        True,
        False,
    ),
    ("svc", _target("sklearn.svm.SVC"), False, False),
    ("svc-probability", _target("sklearn.svm.SVC", probability=True), True, False),
    ("nusvc", _target("sklearn.svm.NuSVC"), False, False),
    ("svr-has-no-random-state", _target("sklearn.svm.SVR"), False, False),
    ("linear-svc-dual-false", _target("sklearn.svm.LinearSVC", dual=False), False, False),
    ("linear-svc-dual-true", _target("sklearn.svm.LinearSVC", dual=True), True, False),
    ("linear-svc-dual-auto", _target("sklearn.svm.LinearSVC"), True, True),
    ("logistic-lbfgs", _target("sklearn.linear_model.LogisticRegression"), False, False),
    ("logistic-newton-cg", _target("sklearn.linear_model.LogisticRegression", solver="newton-cg"), False, False),
    ("logistic-sag", _target("sklearn.linear_model.LogisticRegression", solver="sag"), True, False),
    ("logistic-saga", _target("sklearn.linear_model.LogisticRegression", solver="saga"), True, False),
    ("logistic-liblinear", _target("sklearn.linear_model.LogisticRegression", solver="liblinear"), True, False),
    ("ridge-auto", _target("sklearn.linear_model.RidgeClassifier"), False, False),
    ("ridge-sag", _target("sklearn.linear_model.RidgeClassifier", solver="sag"), True, False),
    ("lasso-cyclic", _target("sklearn.linear_model.Lasso"), False, False),
    ("lasso-random", _target("sklearn.linear_model.Lasso", selection="random"), True, False),
]


@pytest.mark.parametrize(("clf", "listed", "may"), [e[1:] for e in ESTIMATORS], ids=[e[0] for e in ESTIMATORS])
def test_estimator_rules(clf: dict[str, Any], listed: bool, may: bool) -> None:
    entries = _by_component(_unseeded(_doc(clf)))
    assert ("clf" in entries) is listed, entries
    if listed:
        entry = entries["clf"]
        assert entry["class"] == clf["_target_"].rsplit(".", 1)[-1]
        assert entry["may"] is may
        assert entry["source"] == "estimator"
        assert entry["candidates"] == [[0, 1]] and entry["n_candidates"] == 2
        assert entry["why"]
    assert set(entries) <= {"clf"}, "StandardScaler and the int cv never draw"


DECOMPOSITIONS = [  # id, object spec, listed?, may?
    ("pca-full", _target("sklearn.decomposition.PCA", svd_solver="full"), False, False),
    ("pca-covariance-eigh", _target("sklearn.decomposition.PCA", svd_solver="covariance_eigh"), False, False),
    ("pca-auto", _target("sklearn.decomposition.PCA"), True, True),
    ("pca-arpack", _target("sklearn.decomposition.PCA", n_components=2, svd_solver="arpack"), True, False),
    ("pca-randomized", _target("sklearn.decomposition.PCA", svd_solver="randomized"), True, False),
    ("pca-seeded", _target("sklearn.decomposition.PCA", svd_solver="randomized", random_state=0), False, False),
    ("kernel-pca-dense", _target("sklearn.decomposition.KernelPCA", eigen_solver="dense"), False, False),
    ("kernel-pca-auto", _target("sklearn.decomposition.KernelPCA"), True, True),
    ("truncated-svd", _target("sklearn.decomposition.TruncatedSVD", n_components=2), True, False),
]


@pytest.mark.parametrize(("step", "listed", "may"), [e[1:] for e in DECOMPOSITIONS], ids=[e[0] for e in DECOMPOSITIONS])
def test_decomposition_rules(step: dict[str, Any], listed: bool, may: bool) -> None:
    document = _doc()
    document["estimator"]["steps"][0] = ["reduce", step]
    document["param_grid"] = {"clf__C": [1.0]}
    entries = _by_component(_unseeded(document))
    assert ("reduce" in entries) is listed, entries
    if listed:
        assert entries["reduce"]["may"] is may
        assert entries["reduce"]["class"] == step["_target_"].rsplit(".", 1)[-1]


def test_grid_values_decide_per_candidate() -> None:
    """Object specs in the grid, a seed set in the grid, and a solver grid: each candidate by its own values."""
    document = _doc(
        param_grid=[
            {"clf__C": [0.1, 1.0, 10.0]},  # 0-2: SVC, not listed
            {"clf": [RF], "clf__max_depth": [None, 3, 5]},  # 3-5: listed, from the grid value
            {"clf": [{**RF, "random_state": 42}], "clf__max_depth": [None, 3]},  # 6-7: seeded inside the value
            {"clf": [RF], "clf__random_state": [None, 0]},  # 8 listed (the grid sets None), 9 seeded by the grid
            {"clf": [_target("sklearn.linear_model.LogisticRegression")], "clf__solver": ["lbfgs", "saga"]},  # 11
        ]
    )
    entries = _unseeded(document)
    forest = [e for e in entries if e["class"] == "RandomForestClassifier"]
    assert [(e["source"], e["candidates"]) for e in forest] == [
        ("param_grid.clf", [[3, 5]]),
        ("param_grid.clf__random_state", [[8, 8]]),
    ]
    logistic = [e for e in entries if e["class"] == "LogisticRegression"]
    assert [(e["source"], e["candidates"], e["why"]) for e in logistic] == [
        ("param_grid.clf", [[11, 11]], "solver='saga' shuffles the data")
    ]
    assert {e["class"] for e in entries} == {"RandomForestClassifier", "LogisticRegression"}


def test_a_splitter_inside_an_estimator_is_checked() -> None:
    clf = _target(
        "sklearn.linear_model.LogisticRegressionCV",
        cv=_target("sklearn.model_selection.KFold", n_splits=3, shuffle=True),
        max_iter=200,
    )
    entries = _by_component(_unseeded(_doc(clf)))
    assert set(entries) == {"clf__cv"}, "LogisticRegressionCV with lbfgs does not draw; its shuffled KFold does"
    assert entries["clf__cv"]["class"] == "KFold"


# --------------------------------------------------------------------------------------------------
# Splitters, holdout, search

SPLITTERS = [  # id, cv, listed?
    ("int", 3, False),
    ("kfold", _target("sklearn.model_selection.KFold", n_splits=3), False),
    ("kfold-shuffle", _target("sklearn.model_selection.KFold", n_splits=3, shuffle=True), True),
    ("kfold-shuffle-seeded", _target("sklearn.model_selection.KFold", n_splits=3, shuffle=True, random_state=0), False),
    ("stratified-kfold-shuffle", _target("sklearn.model_selection.StratifiedKFold", n_splits=3, shuffle=True), True),
    ("shuffle-split", _target("sklearn.model_selection.ShuffleSplit", n_splits=3), True),
    ("stratified-shuffle-split", _target("sklearn.model_selection.StratifiedShuffleSplit", n_splits=3), True),
    ("shuffle-split-seeded", _target("sklearn.model_selection.ShuffleSplit", n_splits=3, random_state=1), False),
    ("repeated-kfold", _target("sklearn.model_selection.RepeatedKFold", n_splits=3, n_repeats=2), True),
    (
        "repeated-stratified-kfold",
        _target("sklearn.model_selection.RepeatedStratifiedKFold", n_splits=3, n_repeats=2),
        True,
    ),
    ("time-series-split", _target("sklearn.model_selection.TimeSeriesSplit", n_splits=3), False),
]


@pytest.mark.parametrize(("cv", "listed"), [s[1:] for s in SPLITTERS], ids=[s[0] for s in SPLITTERS])
def test_splitter_rules(cv: Any, listed: bool) -> None:
    entries = _by_component(_unseeded(_doc(cv=cv)))
    assert ("cv" in entries) is listed, entries
    if listed:
        assert entries["cv"]["source"] == "cv" and entries["cv"]["candidates"] == [[0, 1]]


@pytest.mark.parametrize(
    ("splitter", "listed"),
    [
        ("GroupShuffleSplit", True),
        ("GroupKFold", False),
        ("StratifiedGroupKFold", False),
        ("LeaveOneOut", False),
        ("LeaveOneGroupOut", False),
    ],
)
def test_group_and_exhaustive_splitters(splitter: str, listed: bool) -> None:
    import sklearn.model_selection as selection

    assert (randomness._splitter_rule(getattr(selection, splitter)()) is not None) is listed
    if hasattr(getattr(selection, splitter)(), "shuffle"):
        assert randomness._splitter_rule(getattr(selection, splitter)(shuffle=True)) is not None


def test_holdout() -> None:
    unseeded = _by_component(_unseeded(_doc(holdout={"test_size": 0.2})))
    assert unseeded["holdout"]["class"] == "train_test_split"
    assert "holdout" not in _by_component(_unseeded(_doc(holdout={"test_size": 0.2, "random_state": 3})))
    assert "holdout" not in _by_component(_unseeded(_doc()))
    spec = parse_spec(_doc(holdout={"test_size": 0.2, "stratify": False}))
    grouped = dataclasses.replace(spec, data={**spec.data, "groups": "patient"})  # the split data.load makes
    assert _by_component(randomness.unseeded(grouped, grid.expand(spec)))["holdout"]["class"] == "GroupShuffleSplit"


@pytest.mark.parametrize(
    ("search", "listed"),
    [
        ({"strategy": "grid"}, None),
        ({"strategy": "random", "n_iter": 2, "random_state": 0}, None),
        ({"strategy": "random", "n_iter": 2, "random_state": None}, "RandomizedSearchCV"),
        ({"strategy": "halving_random", "random_state": None}, "HalvingRandomSearchCV"),
        ({"strategy": "halving_grid", "resource": "n_samples", "random_state": None}, "HalvingGridSearchCV"),
        ({"strategy": "halving_grid", "resource": "clf__n_estimators", "random_state": None}, None),
        ({"strategy": "some_new_strategy"}, "some_new_strategy"),
    ],
    ids=["grid", "random-seeded", "random", "halving-random", "halving-grid-n-samples", "halving-grid-param", "new"],
)
def test_search(search: dict[str, Any], listed: str | None) -> None:
    """The parser refuses most unseeded strategies; a spec built otherwise (or a new strategy) is still listed."""
    spec = dataclasses.replace(parse_spec(_doc()), search=search)
    entries = _by_component(randomness.unseeded(spec, grid.expand(parse_spec(_doc()))))
    assert (entries["search"]["class"] if "search" in entries else None) == listed


# --------------------------------------------------------------------------------------------------
# Output: order, JSON, text, speed


def test_entries_are_json_ready_and_ordered() -> None:
    document = _doc(
        param_grid=[{"clf__C": [1.0]}, {"clf": [RF]}],
        cv=_target("sklearn.model_selection.ShuffleSplit", n_splits=2),
        holdout={"test_size": 0.2},
    )
    document["estimator"]["steps"][0] = ["reduce", _target("sklearn.decomposition.PCA")]
    entries = _unseeded(document)
    assert json.loads(json.dumps(entries)) == entries
    assert [(e["component"], e["class"]) for e in entries] == [
        ("reduce", "PCA"),
        ("clf", "RandomForestClassifier"),
        ("cv", "ShuffleSplit"),
        ("holdout", "train_test_split"),
    ]
    assert _unseeded(document) == entries
    assert randomness.summary(entries, 2) == (
        "results depend on an unset random_state: reduce (PCA, may); clf (RandomForestClassifier, candidate 1); "
        "cv (ShuffleSplit); holdout (train_test_split). Set random_state to make reruns reproducible."
    )
    assert randomness.summary([], 2) == ""


def test_many_candidates_stay_fast() -> None:
    """100,000 candidates: grouped by the values a rule can read, so the estimator is built a handful of times."""
    document = _doc(
        param_grid=[
            {"clf__C": [float(c) for c in range(1, 101)], "clf__gamma": [g / 10 for g in range(1, 51)],
             "clf__kernel": ["rbf", "poly"], "clf__tol": [1e-3, 1e-4, 1e-5, 1e-6, 1e-7]},
            {"clf": [RF], "clf__n_estimators": list(range(1, 101)), "clf__max_depth": [None, *range(1, 500)]},
        ],
        limits={"max_fits": 1_000_000},
    )  # fmt: skip
    spec = parse_spec(document)
    candidates = grid.expand(spec)
    assert len(candidates) == 100_000
    started = time.perf_counter()
    entries = randomness.unseeded(spec, candidates)
    elapsed = time.perf_counter() - started
    assert [(e["class"], e["candidates"]) for e in entries] == [("RandomForestClassifier", [[50_000, 99_999]])]
    assert elapsed < 2.0, f"{elapsed:.2f}s"


# --------------------------------------------------------------------------------------------------
# Plan, CLI, MLflow


def _write(tmp_path: Path, document: dict[str, Any]) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def test_plan_records_unseeded_without_changing_keys(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    spec: SearchSpec = parse_spec(_doc(param_grid=[{"clf__C": [1.0]}, {"clf": [RF]}]))
    plan = make_plan(spec, store)
    assert [(e["component"], e["class"], e["candidates"]) for e in plan.document["unseeded"]] == [
        ("clf", "RandomForestClassifier", [[1, 1]])
    ]
    assert make_plan(spec, store).plan_id == plan.plan_id


def test_cli_plan_prints_the_unseeded_components(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document = _doc(
        param_grid=[{"clf__C": [0.1, 1.0, 10.0]}, {"clf": [RF], "clf__max_depth": [None, 3, 5]}],
        cv=_target("sklearn.model_selection.ShuffleSplit", n_splits=3),
    )
    assert cli.main(["--store", str(tmp_path / "store"), "plan", str(_write(tmp_path, document))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("study randomness: 6 candidates x 3 folds = 18 fits")
    assert (
        "results depend on an unset random_state: clf (RandomForestClassifier, candidates 3-5); cv (ShuffleSplit). "
        "Set random_state to make reruns reproducible."
    ) in lines
    assert any(line.startswith("  - cv (ShuffleSplit, cv, all candidates): ") for line in lines)
    assert any(line.startswith("plan: ") for line in lines)


def test_cli_plan_prints_nothing_when_seeded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document = _doc(param_grid={"clf": [{**RF, "random_state": 0}]})
    assert cli.main(["--store", str(tmp_path / "store"), "plan", str(_write(tmp_path, document))]) == 0
    assert "random_state" not in capsys.readouterr().out


def test_a_plan_without_the_field_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    cli._print_unseeded(Plan(uri="file:///store/plans/old", document={"candidates": []}))
    assert capsys.readouterr().out == ""


def _log(tmp_path: Path, run_id: str, unseeded: list[dict[str, Any]] | None) -> tuple[Any, str]:
    from airflow_grid.tracking import runs

    params = [{"C": 0.1}, {"C": 1.0}]
    outcomes = [
        {"test_scores": {"score": scores}, "fit_time": [0.0, 0.0], "score_time": [0.0, 0.0], "n_failed_fits": 0}
        for scores in ([0.9, 0.8], [0.95, 0.97])
    ]
    cv_results, best = results.reduce(
        params, outcomes, n_splits=2, metric_names=["score"], return_train_score=False, refit_metric="score"
    )
    parent = runs.log_study(
        study="randomness", dag_id="dag", run_id=run_id, cv_results=results.to_json(cv_results),
        best={**best, "holdout_score": None}, spec_yaml="name: randomness\n", tags={}, unseeded=unseeded,
    )  # fmt: skip
    return runs.client(), parent


def test_mlflow_parent_run_carries_the_tag_and_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from airflow_grid.tracking import runs

    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    spec = parse_spec(_doc(param_grid=[{"clf__C": [1.0]}, {"clf": [RF]}], holdout={"test_size": 0.2}))
    unseeded = randomness.unseeded(spec, grid.expand(spec))
    mlflow_client, parent = _log(tmp_path, "with", unseeded)
    run = mlflow_client.get_run(parent)
    assert run.data.tags[runs.TAG_UNSEEDED] == "clf (RandomForestClassifier), holdout (train_test_split)"
    local = mlflow_client.download_artifacts(parent, "unseeded.json", str(tmp_path / "download"))
    assert json.loads(Path(local).read_text()) == unseeded

    mlflow_client, seeded = _log(tmp_path, "without", [])
    assert runs.TAG_UNSEEDED not in mlflow_client.get_run(seeded).data.tags
    assert "unseeded.json" not in [item.path for item in mlflow_client.list_artifacts(seeded)]


def test_the_tag_is_cut_to_mlflows_limit() -> None:
    pytest.importorskip("mlflow")
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    from airflow_grid.tracking import runs

    many = [{"component": f"step{i}", "class": "RandomForestClassifier"} for i in range(2000)]
    tag = runs.unseeded_tag(many)
    assert len(tag) == MAX_TAG_VAL_LENGTH and tag.endswith("...")
    assert tag.startswith("step0 (RandomForestClassifier), step1 (RandomForestClassifier)")


class _Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, message: str, *args: Any) -> None:
        self.lines.append(("info", message % args))

    def warning(self, message: str, *args: Any) -> None:
        self.lines.append(("warning", message % args))


class _TaskInstance:
    def xcom_push(self, key: str, value: Any) -> None:
        pass


@pytest.mark.parametrize("seeded", [False, True], ids=["unseeded", "seeded"])
def test_plan_task_warns_naming_the_unseeded_components(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seeded: bool
) -> None:
    pytest.importorskip("airflow")
    from airflow_grid.operators import plan as plan_module

    monkeypatch.setattr(plan_module, "pool_exists", lambda pool: True)
    log = _Log()
    monkeypatch.setattr(plan_module.PlanGridSearchOperator, "log", property(lambda self: log))
    forest = {**RF, "random_state": 0} if seeded else RF
    spec_path = _write(tmp_path, _doc(param_grid={"clf": [forest], "clf__max_depth": [None, 3]}))
    operator = plan_module.PlanGridSearchOperator(task_id="plan", spec_path=str(spec_path), store=str(tmp_path / "s"))
    params = {key: None for key in ("spec", "spec_path", "param_grid", "cv", "scoring", "resources", "backend")}
    context = {"params": {**params, "dataset_version": None, "max_parallel": None},
               "triggering_asset_events": {}, "logical_date": None, "ti": _TaskInstance()}  # fmt: skip
    operator.execute(context)  # type: ignore[arg-type]
    assert any(line.startswith("Planned randomness: 2 candidates x 3 folds") for level, line in log.lines)
    warnings = [line for level, line in log.lines if level == "warning" and "random_state" in line]
    expected = [] if seeded else [randomness.summary([{"component": "clf", "class": "RandomForestClassifier"}])]
    assert warnings == expected
