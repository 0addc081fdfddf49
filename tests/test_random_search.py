"""search: {strategy: random}: validation, ParameterSampler's candidates, the budget guard, the policy, overrides.

Cell-by-cell equivalence with RandomizedSearchCV through ``airflow-grid run`` is in tests/test_equivalence.py.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import scipy.stats
import yaml
from sklearn.model_selection import ParameterSampler

from airflow_grid import grid
from airflow_grid.overrides import spec_document
from airflow_grid.spec import SpecError, load_spec_file, parse_spec

Doc = Callable[..., dict[str, Any]]
SPECS_DIR = Path(__file__).resolve().parent.parent / "dags" / "specs"
LOGUNIFORM = {"_target_": "scipy.stats.loguniform", "a": 0.001, "b": 1000}
RANDINT = {"_target_": "scipy.stats.randint", "low": 1, "high": 20}


def says(path: str, *parts: str) -> str:
    """A `match=` pattern: the message starts with the field path, then shows each part in order."""
    return re.escape(f"spec.{path}: ") + "".join(".*" + re.escape(part) for part in parts)


def random_doc(iris_doc: Doc, distributions: Any, **search: Any) -> dict[str, Any]:
    document = iris_doc(search={"strategy": "random", "n_iter": 5, "random_state": 0, **search})
    del document["param_grid"]
    document["param_distributions"] = distributions
    return document


# --------------------------------------------------------------------------------------------------
# Validation


BAD_RANDOM = [
    pytest.param(
        {"n_iter": "ten"}, {"clf__C": [1]}, says("search.n_iter", "'ten'", "positive integer"), id="n-iter-str"
    ),
    pytest.param({"n_iter": 0}, {"clf__C": [1]}, says("search.n_iter", "got 0", "positive integer"), id="n-iter-0"),
    pytest.param({"n_iter": True}, {"clf__C": [1]}, says("search.n_iter", "True"), id="n-iter-bool"),
    pytest.param(
        {"random_state": None},
        {"clf__C": [1]},
        says("search.random_state", "is missing", "reproduced", "give an integer seed"),
        id="random-state-missing",
    ),
    pytest.param({"random_state": 1.5}, {"clf__C": [1]}, says("search.random_state", "1.5"), id="random-state-float"),
    pytest.param({"random_state": -1}, {"clf__C": [1]}, says("search.random_state", "-1", "[0, "), id="seed-negative"),
    pytest.param({"seed": 1}, {"clf__C": [1]}, says("search.seed", "unknown key", "n_iter, random_state"), id="seed"),
    pytest.param({}, {}, says("param_distributions", "empty mapping", "{clf__C: {_target_"), id="empty-mapping"),
    pytest.param({}, [], says("param_distributions", "got []", "scipy.stats"), id="empty-list"),
    pytest.param({}, [{}], says("param_distributions[0]", "empty mapping"), id="empty-mapping-in-list"),
    pytest.param({}, {"clf__C": []}, says("param_distributions.clf__C", "empty list"), id="empty-values"),
    pytest.param({}, {"clf__C": 0.1}, says("param_distributions.clf__C", "0.1", "[0.1]"), id="bare-value"),
    pytest.param({}, [{"clf__C": [1]}, 3], says("param_distributions[1]", "got 3", "mapping"), id="list-item"),
    pytest.param(
        {},
        {"clf__C": {"_target_": "sklearn.svm.SVC"}},
        says("param_distributions.clf__C._target_", "sklearn.svm.SVC", "not a distribution", "scipy.stats"),
        id="target-not-a-distribution",
    ),
    pytest.param(
        {},
        {"clf__C": {"_target_": "scipy.stats.no_such_distribution"}},
        says("param_distributions.clf__C._target_", "no_such_distribution"),
        id="target-missing",
    ),
    pytest.param({}, {"clf__C": {"_target_": "os.system"}}, says("param_distributions.clf__C._target_", "os"), id="os"),
    pytest.param(
        {},
        {"clf__C": {"_target_": "scipy.stats.loguniform", "a": {"_target_": "builtins.eval", "source": "1"}}},
        says("param_distributions.clf__C.a._target_", "builtins"),
        id="nested-eval",
    ),
    pytest.param(
        {},
        [{"clf": [{"_target_": "sklearn.utils.fixes.np.load", "file": "/etc/passwd"}]}],
        says("param_distributions[0].clf[0]._target_"),
        id="reexport-in-list",
    ),
]


@pytest.mark.parametrize(("search", "distributions", "match"), BAD_RANDOM)
def test_bad_random_search_names_the_field(iris_doc: Doc, search: Any, distributions: Any, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        parse_spec(random_doc(iris_doc, distributions, **search))


def test_random_search_refuses_param_grid(iris_doc: Doc) -> None:
    document = random_doc(iris_doc, {"clf__C": [1]})
    document["param_grid"] = {"clf__C": [1]}
    with pytest.raises(
        SpecError, match=says("param_grid", "not used by search strategy random", "param_distributions")
    ):
        parse_spec(document)


def test_grid_search_refuses_param_distributions(iris_doc: Doc) -> None:
    with pytest.raises(SpecError, match=says("param_distributions", "strategy grid", "strategy: random")):
        parse_spec(iris_doc(param_distributions={"clf__C": LOGUNIFORM}))
    with pytest.raises(SpecError, match=says("param_distributions", "strategy grid")):
        parse_spec(iris_doc(search={"strategy": "grid"}, param_distributions={"clf__C": [1]}))


def test_random_search_requires_param_distributions(iris_doc: Doc) -> None:
    document = random_doc(iris_doc, None)
    del document["param_distributions"]
    with pytest.raises(SpecError, match=says("param_distributions", "is missing", "scipy.stats")):
        parse_spec(document)


@pytest.mark.parametrize(
    ("search", "match"),
    [
        ({"strategy": "bayes"}, says("search.strategy", "'bayes'", "grid, random")),
        ({"strategy": "grid", "n_iter": 3}, says("search.n_iter", "strategy grid", "no other keys")),
        ("random", says("search", "'random'", "strategy: random")),
    ],
)
def test_bad_search(iris_doc: Doc, search: Any, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        parse_spec(iris_doc(search=search))


def test_defaults_and_canonical_form(iris_doc: Doc) -> None:
    document = random_doc(iris_doc, {"clf__C": LOGUNIFORM})
    del document["search"]["n_iter"]
    spec = parse_spec(document)
    assert spec.strategy == "random"
    assert spec.search == {"strategy": "random", "n_iter": 10, "random_state": 0}  # RandomizedSearchCV's default
    assert spec.raw["search"] == spec.search and "param_grid" not in spec.raw
    assert parse_spec(spec.raw) == spec  # the plan re-parses the canonical form
    grid_spec = parse_spec(iris_doc())
    assert grid_spec.strategy == "grid" and "search" not in grid_spec.raw  # grid plans keep their fingerprints
    assert parse_spec(iris_doc(search={"strategy": "grid"})).param_grid == grid_spec.param_grid


# --------------------------------------------------------------------------------------------------
# Candidates: exactly ParameterSampler's


def _sampled(spec_distributions: Any, sklearn_distributions: Any, iris_doc: Doc, n_iter: int = 8) -> None:
    spec = parse_spec(random_doc(iris_doc, spec_distributions, n_iter=n_iter, random_state=7))
    candidates = grid.expand(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = list(ParameterSampler(sklearn_distributions, n_iter, random_state=7))
    assert [c.index for c in candidates] == list(range(len(expected)))
    assert [c.params for c in candidates] == expected  # values and order; numpy scalars compare equal to Python
    assert [list(c.params) for c in candidates] == [list(p) for p in expected]  # key order, as sklearn's
    for candidate in candidates:
        assert all(not type(v).__module__.startswith("numpy") for v in candidate.params.values())
        json.dumps(candidate.params, allow_nan=False)  # JSON-ready
    assert grid.count_candidates(spec) == len(candidates)


def test_continuous_and_integer_distributions_sample_as_parameter_sampler(iris_doc: Doc) -> None:
    _sampled(
        {"clf__C": LOGUNIFORM, "clf__degree": RANDINT, "clf__kernel": ["rbf", "poly"]},
        {
            "clf__C": scipy.stats.loguniform(0.001, 1000),
            "clf__degree": scipy.stats.randint(1, 20),
            "clf__kernel": ["rbf", "poly"],
        },
        iris_doc,
    )


def test_lists_only_sample_without_replacement_and_cap_at_the_grid(iris_doc: Doc) -> None:
    lists = {"clf__C": [0.1, 1, 10], "clf__kernel": ["rbf", "linear"]}
    _sampled(lists, lists, iris_doc, n_iter=4)
    _sampled({"clf__C": [0.1, 1, 10]}, {"clf__C": [0.1, 1, 10]}, iris_doc, n_iter=50)  # 3 < n_iter: 3 candidates


def test_list_of_mappings_keeps_object_specs_json_ready(iris_doc: Doc) -> None:
    knn = {"_target_": "sklearn.neighbors.KNeighborsClassifier"}
    spec_side = [{"clf": [knn], "clf__n_neighbors": RANDINT}, {"clf__C": LOGUNIFORM}]
    spec = parse_spec(random_doc(iris_doc, spec_side, n_iter=12, random_state=7))
    candidates = grid.expand(spec)
    expected = list(
        ParameterSampler(
            [
                {"clf": ["KNN"], "clf__n_neighbors": scipy.stats.randint(1, 20)},
                {"clf__C": scipy.stats.loguniform(0.001, 1000)},
            ],
            12,
            random_state=7,
        )
    )
    assert [{k: ("KNN" if v == knn else v) for k, v in c.params.items()} for c in candidates] == expected
    assert {c.label.split()[0] for c in candidates if "clf" in c.params} == {"clf=KNeighborsClassifier"}
    assert any("clf" in c.params for c in candidates) and any("clf__C" in c.params for c in candidates)
    grid.check_candidates(spec, candidates)  # every sampled candidate builds and validates


def test_bad_sampled_value_names_the_mapping(iris_doc: Doc) -> None:
    spec = parse_spec(random_doc(iris_doc, [{"clf__C": [1.0]}, {"clf__degree": [-3]}], n_iter=2, random_state=0))
    with pytest.raises(SpecError, match=re.escape("spec.param_distributions[1].clf__degree: candidate")):
        grid.check_candidates(spec, grid.expand(spec))


def test_budget_guard_counts_before_sampling(iris_doc: Doc, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grid, "sample", lambda spec: pytest.fail("sampled before the budget guard"))
    spec = parse_spec({**random_doc(iris_doc, {"clf__C": LOGUNIFORM}, n_iter=2000), "limits": {"max_fits": 5000}})
    assert grid.count_candidates(spec) == 2000
    with pytest.raises(SpecError, match=says("limits.max_fits", "2,000 candidates x 3 folds", "lower search.n_iter")):
        grid.check_budget(spec, grid.count_candidates(spec), grid.min_splits(spec))
    lists = parse_spec(random_doc(iris_doc, [{"clf__C": [1, 2, 3]}, {"clf__kernel": ["rbf", "poly"]}], n_iter=2000))
    assert grid.count_candidates(lists) == 5  # all lists: min(n_iter, grid size), as ParameterSampler


# --------------------------------------------------------------------------------------------------
# The example spec, overrides


def test_example_spec_plans_eight_candidates() -> None:
    spec = parse_spec(load_spec_file(SPECS_DIR / "digits_random_search.yaml"))
    assert spec.strategy == "random" and grid.count_candidates(spec) == 8
    candidates = grid.expand(spec)
    assert len({json.dumps(c.params, sort_keys=True) for c in candidates}) == 8
    grid.check_candidates(spec, candidates)


def test_conf_overrides_switch_the_search_space(tmp_path: Path, iris_doc: Doc) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(iris_doc()))
    conf = {
        "search": {"strategy": "random", "n_iter": 3, "random_state": 1},
        "param_distributions": {"clf__C": LOGUNIFORM},
    }
    document, applied = spec_document(str(path), conf)
    assert applied == ["search", "param_distributions"]
    assert "param_grid" not in document  # the file's space is replaced, not merged into a conflict
    assert len(grid.expand(parse_spec(document))) == 3

    random_path = tmp_path / "random.yaml"
    random_path.write_text(yaml.safe_dump(parse_spec(document).raw))
    back, _ = spec_document(str(random_path), {"search": {"strategy": "grid"}, "param_grid": {"clf__C": [1, 2]}})
    assert "param_distributions" not in back and len(grid.expand(parse_spec(back))) == 2
    both, _ = spec_document(str(path), {"param_grid": {"clf__C": [1]}, "param_distributions": {"clf__C": [1]}})
    with pytest.raises(SpecError, match=says("param_distributions", "mutually exclusive")):
        parse_spec(both)
