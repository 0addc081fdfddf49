"""Bad input, all of it: a corpus of generated invalid specs and spec files ends in exit 2 naming the field.

Every case goes through ``airflow-grid plan`` (in process, so an unhandled exception fails the test with its
traceback) and must: return 2, print one ``airflow-grid: invalid spec: spec…`` message with a fix, and start
nothing (no result in the store). A sample also goes through the Airflow plan operator as trigger conf.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_iris

from airflow_grid import cli, grid
from airflow_grid.plan import make_plan
from airflow_grid.spec import SpecError, parse_spec
from airflow_grid.store import Store

IRIS: dict[str, Any] = {
    "name": "bad-specs",
    "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
    "estimator": {"_target_": "sklearn.pipeline.Pipeline", "steps": [["clf", {"_target_": "sklearn.svm.SVC"}]]},
    "param_grid": {"clf__C": [0.1, 1]},
    "cv": 3,
    "scoring": "accuracy",
}
FILES = "{files}"  # replaced by the directory of data files the corpus refers to


def _pipeline(*steps: Any) -> dict[str, Any]:
    return {"_target_": "sklearn.pipeline.Pipeline", "steps": list(steps)}


def _nested(depth: int) -> Any:
    value: Any = [1]
    for _ in range(depth):
        value = [value]
    return value


BAD_VALUES: dict[str, list[Any]] = {
    "name": [None, "", "UPPER", "a" * 70, 3, ["x"], "bad name", "-x", True],
    "data": [
        None, 3, "iris.csv", {}, {"path": ""}, {"path": 5}, {"path": f"{FILES}/x.txt"},
        {"path": f"{FILES}/missing.csv", "target": "target"}, {"path": f"{FILES}/empty.csv", "target": "target"},
        {"path": f"{FILES}/header_only.csv", "target": "target"},
        {"path": f"{FILES}/garbage.parquet", "target": "target"}, {"path": f"{FILES}/garbage.npz"},
        {"path": f"{FILES}/wrong_keys.npz"}, {"path": f"{FILES}/ragged.npz"}, {"path": f"{FILES}/not_utf8.csv",
        "target": "target"}, {"path": f"{FILES}/iris.csv", "target": "nope"},
        {"path": f"{FILES}/iris.csv", "target": "target", "columns": ["zzz"]}, {"path": f"{FILES}/iris.csv"},
        {"path": f"{FILES}/iris.csv", "target": "target", "bogus": 1}, {"path": f"{FILES}/iris.csv", "format": "xls"},
        {"path": FILES, "format": "csv", "target": "target"},
        {"_target_": "sklearn.datasets.load_iris", "bogus": 1},
        {"_target_": "sklearn.datasets.make_classification", "n_samples": -5},
        {"_target_": "sklearn.datasets.make_classification", "n_informative": 50},
        {"_target_": "sklearn.svm.SVC"}, {"_target_": "sklearn.datasets.fetch_openml", "name": "iris"},
        {"_target_": "sklearn.datasets.load_svmlight_file", "f": "/etc/passwd"},
    ],
    "estimator": [
        None, "SVC", {}, {"_target_": 5}, {"_target_": "sklearn.svm.NoSuch"}, {"_target_": "nosuchpackage.Model"},
        {"_target_": "sklearn.svm.SVC", "bogus": 1}, _pipeline(), _pipeline(["clf"]),
        _pipeline(["clf", "notanobject"]), {"_target_": "sklearn.pipeline.Pipeline", "steps": "x"},
        _pipeline(["a", {"_target_": "sklearn.svm.SVC"}], ["clf", {"_target_": "sklearn.svm.SVC"}]),
        _pipeline(["clf", {"_target_": "sklearn.svm.SVC", "gamma": "high"}]),
        _pipeline(["clf", {"_target_": "sklearn.tree.DecisionTreeClassifier", "max_depth": "deep"}]),
        _pipeline(["clf", {"_target_": "sklearn.tree.DecisionTreeClassifier", "criterion": "bogus"}]),
        _pipeline(["clf", {"_target_": "sklearn.svm.SVC", "kernel": "bogus"}]),
        _pipeline(["clf", {"_target_": "sklearn.model_selection.KFold", "n_splits": 1}]),
        {**_pipeline(["clf", {"_target_": "sklearn.svm.SVC"}]), "memory": "/tmp/airflow-grid-cache"},
        {"_target_": "sklearn.base.platform.os.system", "command": "true"},
    ],
    "param_grid": [
        None, [], 5, "abc", {"clf__C": 1}, {"clf__C": []}, {"clf__nope": [1]}, {"clf__C": [-1]},
        {"clf__kernel": ["bogus"]}, [{"clf__C": [1]}, 5], {"clf__C": "abc"}, {"clf__gamma": ["sometimes"]},
        {"clf": [{"_target_": "sklearn.tree.DecisionTreeClassifier", "max_depth": "deep"}]},
        {"clf": ["notanestimator"]}, {"clf__C": [{"_target_": "os.system", "command": "true"}]},
        {"clf__C": list(range(1000)), "clf__gamma": list(range(1000))},  # 10^6 candidates, max_fits 5000
        {"memory": ["/tmp/x"]}, {"clf__C": _nested(80)},
    ],
    "cv": [
        1, 0, -3, True, "five", 1.5, None, {"_target_": "sklearn.model_selection.KFold", "n_splits": 1},
        {"_target_": "sklearn.model_selection.KFold", "n_splits": "x"},
        {"_target_": "sklearn.model_selection.KFold", "bogus": 1},
        {"_target_": "sklearn.model_selection.KFold", "n_splits": 200},
        {"_target_": "sklearn.model_selection.GroupKFold"}, {"_target_": "sklearn.svm.SVC"},
        {"_target_": "sklearn.model_selection.ShuffleSplit", "test_size": 5.0},
        {"_target_": "sklearn.base.platform.os.system", "command": "true"}, 10**9,
    ],
    "scoring": ["bogus", 5, [], ["accuracy", "accuracy"], {"a": "nope"}, {}, ["accuracy", 3], True],
    "refit": ["nope", 5, []],
    "error_score": ["ignore", [], True, None],
    "return_train_score": ["yes", 1, None],
    "holdout": [
        5, "x", {"test_size": 2.0}, {"test_size": 0}, {"random_state": "x"}, {"stratify": "x"}, {"bogus": 1},
        {"test_size": 149}, {"test_size": 0.9999},
    ],
    "resources": [
        5, {"cpu": 0}, {"cpu": "-1"}, {"cpu": "lots"}, {"memory": "lots"}, {"memory": "1"}, {"gpu": 1},
        {"memory": "5m"}, {"cpu": True}, {"cpu": float("inf")},
    ],
    "limits": [5, {"max_fits": 0}, {"max_fits": "x"}, {"max_fits": 10**12}, {"other": 1}, {"max_fits": 2}],
    "backend": ["docker", 5, None],
    "search": [
        5, "random", {"strategy": "bayes"}, {"strategy": "grid", "n_iter": 5}, {"strategy": "random"},
        {"strategy": "random", "n_iter": 0, "random_state": 0}, {"strategy": "random", "random_state": "x"},
    ],
    "param_distributions": [{"clf__C": [1]}, {"clf__C": {"_target_": "scipy.stats.loguniform", "a": 1, "b": 2}}],
}  # fmt: skip
EXTRA_FIELDS = [{"bogus": 1}, {"param_grids": {}}, {"Name": "x"}]
ROUTE_TARGETS = [
    "sklearn.base.platform.os.system", "sklearn.utils.fixes.np.load", "sklearn.datasets.dump_svmlight_file",
    "sklearn.datasets.clear_data_home", "sklearn.utils.Bunch", "sklearn.svm.SVC.fit", "sklearn.utils._joblib.load",
    "joblib.load", "builtins.eval", "subprocess.run", "numpy.load", "scipy.stats.norm.rvs", "pickle.loads",
]  # fmt: skip
ROUTE_PLACES = ["estimator", "cv", "data", "param_grid", "nested"]


def _with_target(document: dict[str, Any], place: str, target: str) -> dict[str, Any]:
    spec = {"_target_": target, "arg": "x"}
    if place == "param_grid":
        document["param_grid"] = {"clf": [spec]}
    elif place == "nested":
        document["param_grid"] = {"clf": [{"_target_": "sklearn.ensemble.BaggingClassifier", "estimator": spec}]}
    else:
        document[place] = spec
    return document


def bad_documents() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every invalid document of the corpus, with an id: one bad field each, then routes in every place."""
    for field, values in BAD_VALUES.items():
        for position, value in enumerate(values):
            document = copy.deepcopy(IRIS)
            if value is None and field in ("name", "data", "estimator", "param_grid"):
                del document[field]
            else:
                document[field] = value
            yield f"{field}-{position}", document
    for position, extra in enumerate(EXTRA_FIELDS):
        yield f"unknown-field-{position}", {**copy.deepcopy(IRIS), **extra}
    for target, place in itertools.product(ROUTE_TARGETS, ROUTE_PLACES):
        yield f"route-{place}-{target}", _with_target(copy.deepcopy(IRIS), place, target)
    wide = copy.deepcopy(IRIS)
    wide["param_grid"] = {"clf__C": list(range(200_000))}
    yield "too-many-values", wide


BAD_FILES: dict[str, bytes | None] = {
    "missing": None,
    "empty": b"",
    "not-utf8": b"name: \xff\xfe bad\n",
    "binary": bytes(range(256)) * 4,
    "yaml-syntax": b"name: [unclosed\n",
    "yaml-scalar": b"just a string\n",
    "yaml-list": b"- a\n- b\n",
    "json-null": b"null",
    "deep-brackets": b"[" * 5000 + b"]" * 5000,
    "deep-mapping": b"a:\n" + b"".join(b" " * i + b"b:\n" for i in range(1, 300)),
    "alias-bomb": b"""
a: &a ["x","x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g,*g]
name: bomb
""",
    "huge": b"name: x\n" + b"#" * 2_000_000,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data files the corpus points at: some good, most damaged."""
    root = tmp_path_factory.mktemp("bad-data")
    frame = load_iris(as_frame=True).frame
    frame.to_csv(root / "iris.csv", index=False)
    (root / "empty.csv").write_bytes(b"")
    (root / "header_only.csv").write_text("a,b,target\n")
    (root / "garbage.parquet").write_bytes(b"PAR1 this is not parquet")
    (root / "garbage.npz").write_bytes(b"PK\x03\x04 truncated zip")
    np.savez(root / "wrong_keys.npz", A=np.zeros((3, 2)), B=np.zeros(3))
    np.savez(root / "ragged.npz", X=np.zeros((3, 2)), y=np.zeros(5))
    (root / "not_utf8.csv").write_bytes(b"a,b,target\n\xff\xfe,\x00,1\n")
    (root / "x.txt").write_text("hello")
    return root


def _write(directory: Path, name: str, document: dict[str, Any], files: Path) -> Path:
    path = directory / f"{name.replace('/', '_')}.yaml"
    text = json.dumps(document, allow_nan=True).replace(FILES, str(files))
    path.write_text(text)
    return path


def _plan_refuses(path: Path, store: Path, capsys: pytest.CaptureFixture[str]) -> str:
    code = cli.main(["--store", str(store), "plan", str(path)])
    captured = capsys.readouterr()
    assert code == 2, f"{path.name}: exit {code}\n{captured.out[-500:]}\n{captured.err[-2000:]}"
    message = captured.err.strip()
    assert message.startswith("airflow-grid: invalid spec: spec"), message
    assert "Traceback" not in captured.err and len(message.splitlines()) == 1, message
    assert " Fix: " in message or "spec.name" in message or "spec: " in message, message
    assert not (store / "results").exists()
    return message


def test_generated_invalid_specs_exit_2_naming_the_field(
    tmp_path: Path, files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    documents = list(bad_documents())
    assert len(documents) >= 200
    fields = set()
    for name, document in documents:
        message = _plan_refuses(_write(tmp_path, name, document, files), tmp_path / "store", capsys)
        fields.add(message.split(":")[2].strip().split(".")[1] if "spec." in message.split(":")[2] else "")
    print(f"{len(documents)} invalid specs refused with exit 2; fields named: {sorted(fields)}")


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_unreadable_spec_files_exit_2(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / f"{name}.yaml"
    content = BAD_FILES[name]
    if content is not None:
        path.write_bytes(content)
    message = _plan_refuses(path, tmp_path / "store", capsys)
    assert str(path) in message or name in ("yaml-scalar", "yaml-list", "json-null", "alias-bomb", "deep-mapping")


def test_the_budget_guard_counts_before_expanding(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A 10^12-candidate grid is refused by arithmetic: nothing is expanded, built or loaded."""
    document = {**copy.deepcopy(IRIS), "param_grid": {f"clf__{p}": list(range(10**4)) for p in ("C", "gamma", "tol")}}
    document["limits"] = {"max_fits": 100}
    spec = parse_spec(document)
    for name in ("expand", "check_candidates", "build_estimator"):
        monkeypatch.setattr(grid, name, _must_not_run(name))
    with pytest.raises(SpecError, match=r"spec\.limits\.max_fits: the grid has 1,000,000,000,000 candidates x 3"):
        make_plan(spec, Store(str(tmp_path / "store")))


def _must_not_run(name: str) -> Any:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{name} ran before the budget guard")

    return fail


@pytest.mark.parametrize(
    ("fields", "path", "shown"),
    [
        pytest.param(
            {"param_grid": {"clf": [{"_target_": "sklearn.tree.DecisionTreeClassifier"}], "clf__max_depth": ["deep"]}},
            "param_grid.clf__max_depth", "max_depth='deep'", id="max-depth-deep",
        ),
        pytest.param({"param_grid": {"clf__kernel": ["rbf", "bogus"]}}, "param_grid.clf__kernel", "kernel='bogus'",
                     id="kernel-bogus"),
        pytest.param(
            {"param_grid": [{"clf__C": [1]}, {"clf": [{"_target_": "sklearn.tree.DecisionTreeClassifier",
                                                      "criterion": "bogus"}]}]},
            "estimator", "criterion", id="criterion-in-grid-object",
        ),
        pytest.param({"estimator": _pipeline()}, "estimator", "no steps", id="empty-steps"),
        pytest.param({"estimator": _pipeline(["clf", "nope"])}, "estimator", "nope", id="malformed-step"),
    ],
)  # fmt: skip
def test_parameter_values_are_validated_at_plan(tmp_path: Path, fields: dict[str, Any], path: str, shown: str) -> None:
    """What scikit-learn's own validation would refuse at fit is refused at plan, before any task runs."""
    spec = parse_spec({**copy.deepcopy(IRIS), **fields})
    with pytest.raises(SpecError, match=rf"^spec\.{path.replace('.', '[.]')}: .*{shown}.*Fix: ") as raised:
        make_plan(spec, Store(str(tmp_path / "store")))
    assert "candidate" in str(raised.value) or path == "estimator"
    assert not (tmp_path / "store" / "plans").exists()


CONF_SAMPLE = [(name, document) for position, (name, document) in enumerate(bad_documents()) if position % 9 == 0]


@pytest.mark.parametrize(("name", "document"), CONF_SAMPLE, ids=[name for name, _ in CONF_SAMPLE])
def test_invalid_spec_in_trigger_conf_fails_the_plan_task_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: Path, name: str, document: dict[str, Any]
) -> None:
    """The same corpus as UI/REST conf: the plan task fails without retries, naming the field; nothing starts."""
    from airflow.sdk.exceptions import AirflowFailException

    from airflow_grid.operators import plan as plan_module

    monkeypatch.setenv("AIRFLOW_GRID_STORE", str(tmp_path / "store"))
    monkeypatch.setattr(plan_module, "pool_exists", lambda pool: True)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(IRIS))
    operator = plan_module.PlanGridSearchOperator(task_id="plan", spec_path=str(spec_path), data_roots=[str(files)])
    conf = json.loads(json.dumps(document).replace(FILES, str(files)))
    params = {key: None for key in ("spec_path", "param_grid", "cv", "scoring", "resources", "backend")}
    context = {"params": {**params, "spec": conf, "dataset_version": None, "max_parallel": None},
               "triggering_asset_events": {}, "logical_date": None, "ti": None}  # fmt: skip
    with pytest.raises(AirflowFailException, match=r"^invalid spec: spec(\.[\w\[\]]+)*: .+") as raised:
        operator.execute(context)  # type: ignore[arg-type]
    assert "Traceback" not in str(raised.value)
    assert not (tmp_path / "store" / "results").exists()
