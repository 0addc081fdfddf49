"""The content-addressed store: atomic writes, missing keys, local directories and other fsspec filesystems."""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

from airflow_grid.store import STORE_ENV, Store, default_root

KEY = "ab" + "0" * 62
RESULT: dict[str, Any] = {"key": KEY, "test_scores": {"score": [0.9, math.nan, 1.0]}, "error": None}


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A store on a local directory, and one on fsspec's in-memory filesystem (not local: no rename)."""
    if request.param == "local":
        yield Store(str(tmp_path / "store"))
        return
    root = f"memory://airflow-grid-test-{uuid.uuid4().hex}"
    store = Store(root)
    yield store
    if store.fs.exists(store._root_path):
        store.fs.rm(store._root_path, recursive=True)


def all_files(store: Store) -> list[str]:
    """Every file under the store root, relative to it (hidden temporary files included)."""
    if not store.fs.exists(store._root_path):
        return []
    found = store.fs.find(store._root_path, withdirs=False)
    return sorted(path.split(store._root_path.rstrip("/") + "/", 1)[1] for path in found)


def test_memory_store_is_not_local(store: Store) -> None:
    assert store.is_local == store.root.startswith("/")


def test_result_round_trip(store: Store) -> None:
    store.put_result(KEY, RESULT)
    result = store.get_result(KEY)
    assert result is not None
    assert result["key"] == KEY
    assert result["test_scores"]["score"][0] == 0.9
    assert math.isnan(result["test_scores"]["score"][1])  # NaN survives JSON
    assert all_files(store) == [f"results/ab/{KEY}.json"]  # nothing but the result: no temporary files left


def test_missing_result_is_none(store: Store) -> None:
    assert store.get_result("cd" + "1" * 62) is None
    store.put_result(KEY, RESULT)
    assert store.get_result("cd" + "1" * 62) is None


def test_layout(store: Store) -> None:
    assert store.result_path(KEY) == f"results/ab/{KEY}.json"
    assert store.plan_dir("p1") == "plans/p1"
    assert store.url("plans/p1") == f"{store.root}/plans/p1"


def test_bytes_and_json(store: Store) -> None:
    store.write_bytes("plans/p1/X.npy", b"\x00\x01")
    store.write_json("plans/p1/plan.json", {"a": [1, 2]})
    assert store.exists("plans/p1/X.npy") and not store.exists("plans/p1/y.npy")
    assert store.read_bytes("plans/p1/X.npy") == b"\x00\x01"
    assert store.read_json("plans/p1/plan.json") == {"a": [1, 2]}


def test_rewrite_replaces_whole_file(store: Store) -> None:
    store.write_bytes("results/x.json", b"x" * 1000)
    store.write_bytes("results/x.json", b"short")
    assert store.read_bytes("results/x.json") == b"short"


def test_local_path_copies_remote_files_once(store: Store, tmp_path: Path) -> None:
    store.write_bytes("plans/p1/folds.npz", b"folds")
    cache = tmp_path / "cache"
    cache.mkdir()
    path = store.local_path("plans/p1/folds.npz", str(cache))
    assert Path(path).read_bytes() == b"folds"
    if store.is_local:
        assert path == str(Path(store.root) / "plans/p1/folds.npz")  # read in place, no copy
    else:
        assert Path(path).parent == cache
    assert store.local_path("plans/p1/folds.npz", str(cache)) == path


def test_failed_local_write_leaves_old_result_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(str(tmp_path / "store"))
    store.put_result(KEY, RESULT)

    def crash(source: str, target: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.put_result(KEY, {**RESULT, "error": "new"})
    monkeypatch.undo()
    kept = store.get_result(KEY)
    assert kept is not None and kept["error"] is None
    assert all_files(store) == [f"results/ab/{KEY}.json"]


def test_reader_never_sees_a_partial_local_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The target path appears only through the final rename, with the whole payload in it."""
    store = Store(str(tmp_path / "store"))
    seen: list[bool] = []
    real_replace = os.replace

    def watch(source: str, target: str) -> None:
        seen.append(os.path.exists(target))
        assert Path(source).read_bytes() == b"payload"
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", watch)
    store.write_bytes("results/cd/key.json", b"payload")
    assert seen == [False]


def test_root_is_normalised(tmp_path: Path) -> None:
    store = Store(str(tmp_path) + "/")
    assert store.root == str(tmp_path)
    assert store.is_local


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({STORE_ENV: "s3://bucket/grid", "AIRFLOW_HOME": "/opt/airflow"}, "s3://bucket/grid", id="env"),
        pytest.param({"AIRFLOW_HOME": "/opt/airflow"}, "/opt/airflow/airflow_grid", id="airflow-home"),
        pytest.param({}, str(Path.home() / "airflow" / "airflow_grid"), id="default"),
    ],
)
def test_default_root(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str) -> None:
    monkeypatch.delenv(STORE_ENV, raising=False)
    monkeypatch.delenv("AIRFLOW_HOME", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert default_root() == expected


def test_memory_filesystem_is_shared_by_url() -> None:
    """Two Store objects on one URL see the same files, as two pods on one bucket do."""
    root = f"memory://airflow-grid-test-{uuid.uuid4().hex}"
    try:
        Store(root).put_result(KEY, RESULT)
        assert Store(root).get_result(KEY) is not None
    finally:
        fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)
