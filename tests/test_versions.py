"""Library versions in plan ids and candidate keys: an upgrade re-plans and recomputes, a mismatched worker refuses.

An upgrade is simulated by patching :func:`airflow_grid.versions.runtime_versions`, which the planner and the
worker both call: the planner sees the "old" libraries, the worker the real ones (or the other way round).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy
import pytest
import scipy
import sklearn

from airflow_grid import versions, worker
from airflow_grid.plan import Plan, make_plan
from airflow_grid.spec import parse_spec
from airflow_grid.store import Store

Doc = Callable[..., dict[str, Any]]
pytestmark = pytest.mark.usefixtures("thread_env")

REAL_RUNTIME_VERSIONS = versions.runtime_versions
REAL_VERSIONS_OF = versions.versions_of


def pretend(monkeypatch: pytest.MonkeyPatch, **changes: str) -> None:
    """Make the planner and the worker see other versions for the named distributions."""

    override = {name.replace("_", "-"): version for name, version in changes.items()}

    def patched(extra_prefixes: Iterable[str] = ()) -> dict[str, str]:
        return {**REAL_RUNTIME_VERSIONS(extra_prefixes), **override}

    def patched_of(names: Iterable[str]) -> dict[str, str]:
        return {**REAL_VERSIONS_OF(names), **override}

    monkeypatch.setattr(versions, "runtime_versions", patched)
    monkeypatch.setattr(versions, "versions_of", patched_of)


def plan_for(document: dict[str, Any], root: str) -> Plan:
    return make_plan(parse_spec(document), Store(root))


def test_runtime_versions_name_core_and_allowlisted_libraries() -> None:
    found = versions.runtime_versions(["sklearn.", "airflow_grid.", "no_such_library_xyz.", "numpy.linalg."])
    assert found["scikit-learn"] == sklearn.__version__
    assert found["numpy"] == numpy.__version__
    assert found["scipy"] == scipy.__version__
    assert found["no_such_library_xyz"] == versions.UNKNOWN
    assert "airflow_grid" in found or "airflow-grid" in found
    assert "sklearn" not in found  # the prefix resolves to its distribution, named once
    assert versions.runtime_versions(["sklearn."]) == versions.runtime_versions([])
    assert versions.versions_of(found) == found  # the worker's view of the same names agrees


def test_plan_records_versions_and_result_format(iris_doc: Doc, store_root: str) -> None:
    document = plan_for(iris_doc(), store_root).document
    assert document["versions"] == versions.runtime_versions(["sklearn."])
    assert document["sklearn_version"] == sklearn.__version__  # the previous field, kept for old readers
    assert document["result_format"] == versions.RESULT_FORMAT
    assert "created" in document


def test_upgrade_gives_a_new_plan_and_new_keys_and_recomputes(
    iris_doc: Doc, store_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pretend(monkeypatch, numpy="1.26.4")  # the "old" environment
    old = plan_for(iris_doc(), store_root)
    assert old.document["versions"]["numpy"] == "1.26.4"
    assert all(not r["from_store"] for r in worker.evaluate_candidates(old.uri, [0, 1, 2])["results"])
    monkeypatch.undo()  # upgraded: the real numpy

    new = plan_for(iris_doc(), store_root)
    assert new.plan_id != old.plan_id
    assert new.document["versions"]["numpy"] == numpy.__version__
    assert not {c["key"] for c in new.candidates} & {c["key"] for c in old.candidates}
    results = worker.evaluate_candidates(new.uri, [0, 1, 2])["results"]
    assert [r["from_store"] for r in results] == [False, False, False]  # nothing served from the old libraries
    assert all(r["versions"] == new.document["versions"] for r in results)


def test_result_format_bump_gives_new_keys(iris_doc: Doc, store_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    before = plan_for(iris_doc(), store_root)
    monkeypatch.setattr(versions, "RESULT_FORMAT", versions.RESULT_FORMAT + 1)
    after = plan_for(iris_doc(), store_root)
    assert after.plan_id != before.plan_id
    assert not {c["key"] for c in after.candidates} & {c["key"] for c in before.candidates}


@pytest.mark.parametrize("command", ["evaluate", "refit"])
def test_worker_refuses_a_plan_naming_other_versions(
    iris_doc: Doc,
    store_root: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    pretend(monkeypatch, scikit_learn="1.0.0", numpy="1.26.4")
    plan = plan_for(iris_doc(), store_root)
    monkeypatch.undo()  # the worker runs the real libraries

    model = tmp_path / "model.joblib"
    argv = ["--plan", plan.uri, "--candidate", "0"] + (["--model", str(model)] if command == "refit" else [])
    assert worker.main([command, *argv]) == worker.EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert error.startswith("airflow-grid worker: bad input: ")
    assert f"plan {plan.plan_id} names numpy 1.26.4, scikit-learn 1.0.0 but this worker runs " in error
    assert f"numpy {numpy.__version__}, scikit-learn {sklearn.__version__}" in error
    assert "fix: re-plan the study with the worker's versions" in error
    assert "scipy" not in error  # only what differs
    assert not (Path(store_root) / "results").exists() and not model.exists()  # nothing fitted or stored
