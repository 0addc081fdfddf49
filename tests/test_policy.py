"""The trust policy: what a spec may build is decided on the resolved object, and nothing refused is ever called.

Route regressions (one per class of route found), the file-parameter rule, and a property test that walks the
attribute graph of every allowed package and checks that no generated dotted path resolves outside the policy.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_grid import policy
from airflow_grid.build import build
from airflow_grid.policy import Policy
from airflow_grid.spec import SpecError, parse_spec

Doc = Callable[..., dict[str, Any]]
POLICY = Policy()


def _places(target: Any) -> list[tuple[str, dict[str, Any]]]:
    """The spec fields that accept object specs from trigger conf, each holding ``target``."""
    return [
        ("estimator", {"estimator": target}),
        ("cv", {"cv": target}),
        ("data", {"data": target}),
        ("param_grid", {"param_grid": {"clf": [target]}}),
        ("nested", {"param_grid": {"clf": [{"_target_": "sklearn.ensemble.BaggingClassifier", "estimator": target}]}}),
        *(
            (f"param_distributions-{name}", {**RANDOM, "param_grid": None, "param_distributions": space})
            for name, space in (
                ("distribution", {"clf__C": target}),
                ("list", [{"clf": [target]}]),
                ("distribution-argument", {"clf__C": {"_target_": "scipy.stats.loguniform", "a": target, "b": 1}}),
            )
        ),
    ]


RANDOM = {"search": {"strategy": "random", "n_iter": 2, "random_state": 0}}


# One route per class: through another module, a function that runs code or touches files, a non-estimator
# class, a method reached through an object, private names, a re-export defined elsewhere, test code.
ROUTES = [
    pytest.param({"_target_": "sklearn.base.platform.os.system", "command": "touch {marker}"}, id="module-attribute"),
    pytest.param({"_target_": "sklearn.utils.fixes.np.load", "file": "{marker}"}, id="numpy-through-sklearn"),
    pytest.param({"_target_": "sklearn.externals.array_api_compat.numpy.load", "file": "x"}, id="vendored-reexport"),
    pytest.param({"_target_": "sklearn.datasets.load_svmlight_file", "f": "/etc/passwd"}, id="reads-a-file"),
    pytest.param({"_target_": "sklearn.datasets.load_files", "container_path": "/"}, id="reads-a-tree"),
    pytest.param({"_target_": "sklearn.datasets.fetch_openml", "name": "iris"}, id="downloads"),
    pytest.param({"_target_": "sklearn.datasets.get_data_home", "data_home": "{marker}"}, id="creates-a-directory"),
    pytest.param({"_target_": "sklearn.datasets.clear_data_home", "data_home": "/tmp"}, id="deletes"),
    pytest.param({"_target_": "sklearn.datasets.dump_svmlight_file", "f": "{marker}"}, id="writes-a-file"),
    pytest.param({"_target_": "sklearn.tree.export_graphviz", "out_file": "{marker}"}, id="writes-graphviz"),
    pytest.param({"_target_": "sklearn.utils.parallel.Parallel"}, id="non-estimator-class"),
    pytest.param({"_target_": "sklearn.utils.Bunch", "a": 1}, id="bunch"),
    pytest.param({"_target_": "sklearn.set_config", "assume_finite": True}, id="global-config"),
    pytest.param({"_target_": "sklearn.svm.SVC.fit"}, id="method-through-class"),
    pytest.param({"_target_": "sklearn.svm.SVC.mro"}, id="builtin-method"),
    pytest.param({"_target_": "scipy.stats.norm.rvs"}, id="method-through-object"),
    pytest.param({"_target_": "sklearn.svm.SVC.__init__"}, id="dunder"),
    pytest.param({"_target_": "sklearn.utils._joblib.load"}, id="private-module"),
    pytest.param({"_target_": "sklearn.conftest.pytest_configure"}, id="test-code"),
    pytest.param({"_target_": "joblib.load", "filename": "{marker}"}, id="pickle-loader"),
    pytest.param({"_target_": "builtins.exec", "source": "open('{marker}', 'w')"}, id="builtins"),
]


@pytest.mark.parametrize("route", ROUTES)
def test_route_is_refused_at_parse_in_every_place(iris_doc: Doc, tmp_path: Path, route: dict[str, Any]) -> None:
    marker = tmp_path / "touched"
    target = {k: v.format(marker=marker) if isinstance(v, str) else v for k, v in route.items()}
    for place, fields in _places(target):
        with pytest.raises(SpecError, match=r"_target_ '.+' is not allowed: .+ Fix: ") as raised:
            parse_spec(iris_doc(**fields))
        assert raised.value.path.endswith("._target_"), (place, raised.value.path)
    assert not marker.exists()


def test_the_reported_cli_route_runs_nothing(tmp_path: Path) -> None:
    """The issue's reproduction: `airflow-grid plan` on a spec whose cv reaches os.system exits 2, touching nothing."""
    marker = tmp_path / "x"
    spec = {
        "name": "attack",
        "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
        "estimator": {"_target_": "sklearn.svm.SVC"},
        "param_grid": {"C": [1]},
        "cv": {"_target_": "sklearn.base.platform.os.system", "command": f"touch {marker}"},
    }
    path = tmp_path / "attack.yaml"
    path.write_text(yaml.safe_dump(spec))
    cli = Path(sys.executable).parent / "airflow-grid"
    done = subprocess.run(
        [str(cli), "--store", str(tmp_path / "store"), "plan", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert "spec.cv._target_: _target_ 'sklearn.base.platform.os.system' is not allowed" in done.stderr
    assert "passes through module 'platform'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists() and not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    ("target", "role"),
    [
        pytest.param("sklearn.svm.SVC", "object", id="estimator"),
        pytest.param("sklearn.pipeline.Pipeline", "object", id="pipeline"),
        pytest.param("sklearn.model_selection.RepeatedStratifiedKFold", "object", id="repeated-splitter"),
        pytest.param("sklearn.model_selection.GroupKFold", "object", id="group-splitter"),
        pytest.param("sklearn.gaussian_process.kernels.RBF", "object", id="kernel"),
        pytest.param("sklearn.compose.make_column_selector", "object", id="column-selector"),
        pytest.param("scipy.stats.loguniform", "object", id="distribution"),
        pytest.param("sklearn.datasets.load_digits", "data", id="offline-loader"),
        pytest.param("sklearn.datasets.make_classification", "data", id="generator"),
        pytest.param("sklearn.metrics.fbeta_score", "metric", id="metric-function"),
    ],
)
def test_what_the_policy_allows(target: str, role: str) -> None:
    assert policy.resolve(target, "x", POLICY, role) is not None


@pytest.mark.parametrize(
    ("target", "role", "reason"),
    [
        ("sklearn.datasets.load_iris", "object", "it is a function"),
        ("sklearn.metrics.fbeta_score", "data", "not an offline dataset loader"),
        ("sklearn.metrics.make_scorer", "metric", "it is a function"),
        ("sklearn.datasets.fetch_california_housing", "data", "not an offline dataset loader"),
    ],
)
def test_callables_are_allowed_by_role_only(target: str, role: str, reason: str) -> None:
    with pytest.raises(SpecError, match=reason):
        policy.resolve(target, "x", POLICY, role)


def test_deployment_may_allow_a_callable_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(policy.ALLOWED_CALLABLES_ENV, "sklearn.datasets.fetch_covtype")
    allowed = Policy.from_env()
    assert policy.resolve("sklearn.datasets.fetch_covtype", "data", allowed, "data") is not None
    with pytest.raises(SpecError):
        policy.resolve("sklearn.datasets.fetch_openml", "data", allowed, "data")


def test_deployment_prefix_admits_only_allowed_kinds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module a deployment allows may re-export a system function: it is refused where it is defined."""
    module = f"airflow_grid_models_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text("from os import system\nfrom sklearn.svm import SVC as Model\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    allowed = Policy.from_env((f"{module}.",))
    try:
        assert policy.resolve(f"{module}.Model", "x", allowed) is not None
        with pytest.raises(SpecError, match=r"defined in 'posix'|'os\.' can run code"):
            policy.resolve(f"{module}.system", "x", allowed)
    finally:
        sys.modules.pop(module, None)


# --------------------------------------------------------------------------------------------------
# Parameters that touch files


FILE_ROUTES = [
    pytest.param(
        {"estimator": {"_target_": "sklearn.pipeline.Pipeline", "steps": [["clf", {"_target_": "sklearn.svm.SVC"}]],
                       "memory": "{dir}"}},
        "estimator.memory", id="pipeline-memory",
    ),
    pytest.param({"param_grid": {"memory": ["{dir}"]}}, "param_grid.memory[0]", id="grid-memory"),
    pytest.param(
        {"search": {"strategy": "random", "random_state": 0}, "param_grid": None,
         "param_distributions": [{"C": [1]}, {"memory": ["{dir}"]}]},
        "param_distributions[1].memory[0]", id="distributions-memory",
    ),
    pytest.param(
        {"param_grid": {"clf": [{"_target_": "sklearn.cluster.FeatureAgglomeration", "memory": "{dir}"}]}},
        "param_grid.clf[0].memory", id="nested-memory",
    ),
    pytest.param(
        {"estimator": {"_target_": "sklearn.pipeline.Pipeline", "steps": [
            ["tfidf", {"_target_": "sklearn.feature_extraction.text.TfidfVectorizer", "input": "filename"}],
            ["clf", {"_target_": "sklearn.svm.SVC"}]]}},
        "estimator.steps[0][1].input", id="vectorizer-reads-files",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "path"), FILE_ROUTES)
def test_file_parameters_are_refused_unless_enabled(
    iris_doc: Doc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fields: dict[str, Any], path: str
) -> None:
    document = yaml.safe_load(yaml.safe_dump(fields).replace("'{dir}'", str(tmp_path / "cache")))
    with pytest.raises(SpecError, match=rf"spec\.{re.escape(path)}: got .*makes a fit read or write files.*Fix: "):
        parse_spec(iris_doc(**document))
    monkeypatch.setenv(policy.FILE_PARAMS_ENV, "1")
    parse_spec(iris_doc(**document))  # the deployment's choice
    assert not (tmp_path / "cache").exists()


def test_build_refuses_what_parse_refuses() -> None:
    """build() is the one door: it checks again, so an object spec that skipped parse_spec is refused too."""
    with pytest.raises(SpecError, match="passes through module"):
        build({"_target_": "sklearn.base.platform.os.system", "command": "true"}, "cv", POLICY)
    with pytest.raises(SpecError, match="makes a fit read or write files"):
        build({"_target_": "sklearn.pipeline.Pipeline", "steps": [], "memory": "/tmp"}, "estimator", POLICY)


# --------------------------------------------------------------------------------------------------
# Data, versions and spec files chosen by conf


@pytest.mark.parametrize("version", ["../../etc", "a/b", "..", "v 1", "", "x" * 200, "/abs"])
def test_dataset_version_is_a_name_not_a_path(version: str) -> None:
    if version == "":
        policy.check_dataset_version(None, "conf")
        return
    with pytest.raises(SpecError, match=r"spec\.dataset_version: got .* may not hold '/'"):
        policy.check_dataset_version(version, "asset_event")


def test_spec_path_must_stay_in_spec_dirs(tmp_path: Path) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "a.yaml").write_text("name: a\n")
    (specs / "link.yaml").symlink_to("/etc/hostname")
    assert policy.check_spec_path(str(specs / "a.yaml"), [str(specs)]) == (specs / "a.yaml").resolve()
    for requested in ("/etc/passwd", str(specs / ".." / "specs" / ".." / "x.yaml"), str(specs / "link.yaml")):
        with pytest.raises(SpecError, match=r"spec\.spec_path: got .*not a spec file"):
            policy.check_spec_path(requested, [str(specs)])


# --------------------------------------------------------------------------------------------------
# The property test: walk the attribute graph of the allowed packages


@cache
def _root_modules() -> tuple[str, ...]:
    """Every importable public module of the allowed packages (sklearn, scipy.stats), plus numpy."""
    import scipy.stats
    import sklearn

    names = {"sklearn", "scipy.stats", "numpy"}
    for package in (sklearn, scipy.stats):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if any(part.startswith("_") or part in ("tests", "conftest") for part in info.name.split(".")):
                continue
            try:
                importlib.import_module(info.name)
            except Exception:
                continue
            names.add(info.name)
    return tuple(sorted(names))


_NAMES: dict[int, tuple[Any, tuple[str, ...]]] = {}


def _names(obj: Any) -> tuple[str, ...]:
    """dir(obj), cached by identity (the object is kept alive with its entry, so ids are not reused)."""
    entry = _NAMES.get(id(obj))
    if entry is None or entry[0] is not obj:
        try:
            names = tuple(sorted(n for n in dir(obj) if isinstance(n, str)))
        except Exception:
            names = ()
        entry = _NAMES[id(obj)] = (obj, names)
    return entry[1]


_ADVERSARIAL = ("os", "system", "platform", "sys", "np", "load", "__class__", "__globals__", "_joblib", "eval", "mro")


@st.composite
def dotted_paths(draw: st.DrawFn) -> str:
    """A dotted path that follows real attributes (and, now and then, an adversarial name) from a module."""
    root = draw(st.sampled_from(_root_modules()))
    obj: Any = sys.modules[root]
    parts = [root]
    for _ in range(draw(st.integers(1, 4))):
        names = _names(obj)
        if not names:
            break
        name = draw(st.one_of(st.sampled_from(names), st.sampled_from(_ADVERSARIAL)) if draw(st.booleans()) else
                    st.sampled_from(names))  # fmt: skip
        parts.append(name)
        try:
            obj = inspect.getattr_static(obj, name)
        except AttributeError:
            break
    return ".".join(parts)


def _within_policy(obj: Any, role: str) -> bool:
    """The policy's promise, stated independently of its code."""
    from sklearn.base import BaseEstimator
    from sklearn.gaussian_process.kernels import Kernel
    from sklearn.model_selection import BaseCrossValidator, BaseShuffleSplit

    if inspect.ismodule(obj) or inspect.isbuiltin(obj):
        return False
    module = obj.__module__ if isinstance(obj, type) or inspect.isroutine(obj) else type(obj).__module__
    if not (module.startswith("sklearn.") or module.startswith("scipy.stats.")):
        return False
    if isinstance(obj, type):
        estimator_like = all(hasattr(obj, m) for m in ("fit", "get_params", "set_params"))
        splitter = issubclass(obj, BaseCrossValidator | BaseShuffleSplit) or hasattr(obj, "get_n_splits")
        return (
            estimator_like
            or splitter
            or issubclass(obj, Kernel | BaseEstimator)
            or obj.__name__ == ("make_column_selector")
        )
    if type(obj).__name__.endswith("_gen"):  # scipy.stats distribution objects
        return True
    if role == "data":
        return module.startswith("sklearn.datasets.") and obj.__name__.startswith(("load_", "make_"))
    if role == "metric":
        return module.startswith("sklearn.metrics.") and obj.__name__.endswith(policy._METRIC_SUFFIXES)
    return False


_SEEN = {"paths": 0, "allowed": 0}


@settings(max_examples=10_000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(path=dotted_paths(), role=st.sampled_from(["object", "data", "metric"]))
def test_no_generated_path_resolves_outside_the_policy(path: str, role: str) -> None:
    _SEEN["paths"] += 1
    try:
        obj = policy.resolve(path, "estimator._target_", POLICY, role)
    except SpecError:
        return
    _SEEN["allowed"] += 1
    assert _within_policy(obj, role), f"{path} ({role}) resolved to {obj!r}"
    # No part of the path was a module reached as an attribute: every module on the way has the path's name.
    parts = path.split(".")
    for end in range(1, len(parts)):
        prefix = ".".join(parts[:end])
        here = sys.modules.get(prefix)
        if here is None:
            continue
        nxt = getattr(here, parts[end], None)
        if inspect.ismodule(nxt):
            assert nxt.__name__ == f"{prefix}.{parts[end]}", f"{path} passes through module {nxt.__name__}"


def test_the_property_walk_was_not_vacuous() -> None:
    """Runs after the walk (file order): it generated ≥ 10,000 paths and some of them were allowed."""
    if _SEEN["paths"] == 0:
        pytest.skip("run together with test_no_generated_path_resolves_outside_the_policy")
    print(f"property walk: {_SEEN['paths']} paths, {_SEEN['allowed']} allowed")
    assert _SEEN["paths"] >= 10_000 and _SEEN["allowed"] > 0


def test_every_public_attribute_of_the_allowed_modules_is_decided_correctly() -> None:
    """Exhaustive at depth one: every public name of every public sklearn/scipy.stats module, in every role."""
    decided = allowed = 0
    for root in _root_modules():
        module = sys.modules[root]
        for name in _names(module):
            for role in ("object", "data", "metric"):
                decided += 1
                try:
                    obj = policy.resolve(f"{root}.{name}", "x", POLICY, role)
                except SpecError:
                    continue
                allowed += 1
                assert _within_policy(obj, role), f"{root}.{name} ({role}) resolved to {obj!r}"
    print(f"exhaustive depth one: {decided} decisions, {allowed} allowed")
    assert allowed > 100


def test_numpy_is_reachable_only_to_be_refused() -> None:
    with pytest.raises(SpecError, match="not under an allowed prefix"):
        policy.resolve(f"numpy.{np.load.__name__}", "x", POLICY, "data")
