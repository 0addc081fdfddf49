"""A costly pipeline prefix fitted in one task is read back by the other tasks of the search (units: candidate),
with the scores of fitting it again; cheap or damaged prefixes are fitted (airflow_grid/prefix_cache.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse
from sklearn.base import clone

from airflow_grid import cv, grid, prefix_cache, rerun, retention, worker
from airflow_grid.plan import make_plan
from airflow_grid.spec import parse_spec
from airflow_grid.store import Store

pytestmark = pytest.mark.usefixtures("thread_env")

# SelectFromModel(RandomForest(200)) costs a few tenths of a second per fold and yields 569 x k arrays: worth keeping.
SPEC: dict[str, Any] = {
    "name": "prefix-cache",
    "data": {"_target_": "sklearn.datasets.load_breast_cancer", "return_X_y": True},
    "estimator": {
        "_target_": "sklearn.pipeline.Pipeline",
        "steps": [
            ["scale", {"_target_": "sklearn.preprocessing.StandardScaler"}],
            [
                "select",
                {
                    "_target_": "sklearn.feature_selection.SelectFromModel",
                    "estimator": {
                        "_target_": "sklearn.ensemble.RandomForestClassifier",
                        "n_estimators": 200,
                        "random_state": 0,
                    },
                },
            ],
            ["clf", {"_target_": "sklearn.linear_model.LogisticRegression", "max_iter": 500}],
        ],
    },
    "param_grid": {"clf__C": [0.1, 1, 10]},
    "cv": 3,
    "scoring": ["accuracy", "roc_auc"],
    "refit": "accuracy",
    "return_train_score": True,
    "units": "candidate",
}


def _without_times(result: dict[str, Any]) -> str:
    skip = ("_time", "elapsed_s", "peak_rss_bytes", "error", "shared_prefix")  # timings and how it was computed
    kept = {k: v for k, v in result.items() if not k.endswith(skip)}
    return json.dumps(kept, sort_keys=True)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often a fold's prefix arrays were read back and kept (folds run in-process: 1 CPU)."""
    calls = {"hit": 0, "miss": 0, "kept": 0}
    get, put = prefix_cache.PrefixCache.get, prefix_cache.PrefixCache.put

    def counting_get(self: Any, fold: int) -> Any:
        found = get(self, fold)
        calls["hit" if found is not None else "miss"] += 1
        return found

    def counting_put(self: Any, *args: Any) -> bool:
        kept = put(self, *args)
        calls["kept"] += int(kept)
        return kept

    monkeypatch.setattr(prefix_cache.PrefixCache, "get", counting_get)
    monkeypatch.setattr(prefix_cache.PrefixCache, "put", counting_put)
    return calls


def test_other_tasks_read_the_prefix_and_score_as_refitting(tmp_path: Path, counted: dict[str, int]) -> None:
    spec = parse_spec(SPEC)
    plan = make_plan(spec, Store(str(tmp_path / "store")))
    results = [worker.evaluate_candidates(plan.uri, [index])["results"][0] for index in range(3)]  # 3 tasks
    assert counted == {"hit": 6, "miss": 3, "kept": 3}  # the first task fitted and kept 3 folds; the others read
    assert len(list((tmp_path / "store" / prefix_cache.PREFIX_DIR).rglob("fold*.npz"))) == 3

    # The same candidates fitted as whole pipelines, each fold anew, in this process.
    from airflow_grid import data

    X, y = (
        data.read_table(str(tmp_path / "store" / plan.file("X"))),
        data.read_table(str(tmp_path / "store" / plan.file("y"))),
    )
    folds = data.read_folds(str(tmp_path / "store" / plan.file("folds")))
    for index, result in enumerate(results):
        estimator = grid.build_estimator(spec, plan.row(0, index)["params"])
        alone = cv.evaluate(
            clone(estimator), X, y, folds, scoring=["accuracy", "roc_auc"], metric_names=["accuracy", "roc_auc"],
            error_score=np.nan, return_train_score=True, cpu=1,
        )  # fmt: skip
        assert result["test_scores"] == alone["test_scores"] and result["train_scores"] == alone["train_scores"]


def test_a_damaged_prefix_file_is_refitted(
    tmp_path: Path, counted: dict[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    plan = make_plan(parse_spec(SPEC), Store(str(tmp_path / "store")))
    first = worker.evaluate_candidates(plan.uri, [0])["results"][0]
    [victim, *_] = sorted((tmp_path / "store" / prefix_cache.PREFIX_DIR).rglob("fold*.npz"))
    victim.write_bytes(victim.read_bytes()[:-16])
    with caplog.at_level(logging.WARNING):
        second = worker.evaluate_candidates(plan.uri, [1])["results"][0]
    assert "is damaged" in caplog.text and counted["hit"] == 2  # two folds read, the damaged one fitted again
    fresh = make_plan(parse_spec({**SPEC, "units": "shared"}), Store(str(tmp_path / "fresh")))  # no cache at all
    again = worker.evaluate_candidates(fresh.uri, [1])["results"][0]
    assert first["params"] != second["params"] and _without_times(second) == _without_times(again)


def test_cheap_or_sparse_arrays_are_not_kept(tmp_path: Path) -> None:
    cache = prefix_cache.PrefixCache(Store(str(tmp_path)), "ab" + "0" * 62)
    big = np.zeros((100_000, 50))
    assert not cache.put(0, big, big, None, seconds=0.01)  # 80 MB to read back for a 10 ms fit
    assert not cache.put(0, scipy.sparse.csr_matrix(big[:10]), big[:10], None, seconds=60.0)
    assert cache.put(0, big[:100], big[:50], None, seconds=1.0)
    fitted, to_test, to_train = cache.get(0) or (None, None, None)
    assert np.array_equal(fitted, big[:100]) and np.array_equal(to_test, big[:50]) and to_train is None


def test_the_key_names_what_decides_the_arrays(tmp_path: Path) -> None:
    spec = parse_spec(SPEC)
    document = make_plan(spec, Store(str(tmp_path / "store"))).document
    row = {"params": {"clf__C": 1}, "folds": "folds"}

    def key(doc: dict[str, Any] = document, params: dict[str, Any] | None = None, train: bool = True) -> str:
        return prefix_cache.prefix_key(spec, doc, {**row, "params": params or row["params"]}, "clf", train)

    assert key() == key(params={"clf__C": 10})  # the final step's parameters do not change the prefix
    assert key() != key(params={"clf__C": 1, "select__threshold": "median"})
    assert key() != key(train=False)
    for field, value in (("data_fingerprint", "x"), ("folds_hash", "y"), ("versions", {"scikit-learn": "0"})):
        assert key() != key({**document, field: value}), field


def test_gc_deletes_old_caches(tmp_path: Path) -> None:
    assert set(retention.CACHE_DIRS) == {prefix_cache.PREFIX_DIR, rerun.LOOKUP_DIR}
    store = Store(str(tmp_path))
    store.write_bytes(f"{prefix_cache.PREFIX_DIR}/ab/abc/fold0.npz", b"x")
    report = retention.collect(store, keep_plans=3, max_age=3600, in_use_window=60, now=1e12)
    assert [(e.kind, e.delete) for e in report.entries] == [("cache", True)]
