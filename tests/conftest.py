"""Shared fixtures: small iris specs and plans that run in well under a second."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_grid.cv import THREAD_ENV_VARS

pytest_plugins = ["k8s_lab"]  # the lab cluster's fixtures: cluster, worker_image

# Isolate every test session from the machine's ~/airflow, MLflow and result store. This must happen before
# anything imports airflow, which reads AIRFLOW_HOME once at import time.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="airflow-grid-tests-"))
os.environ["AIRFLOW_HOME"] = str(_SESSION_HOME / "airflow")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(Path(__file__).resolve().parents[1] / "dags")
os.environ["AIRFLOW_GRID_STORE"] = str(_SESSION_HOME / "store")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("AIRFLOW_GRID_ALLOWED_TARGETS", None)

IRIS: dict[str, Any] = {
    "name": "iris-test",
    "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
    "estimator": {
        "_target_": "sklearn.pipeline.Pipeline",
        "steps": [["clf", {"_target_": "sklearn.svm.SVC"}]],
    },
    "param_grid": {"clf__C": [0.1, 1, 10]},
    "cv": 3,
    "scoring": "accuracy",
}


@pytest.fixture
def iris_doc() -> Callable[..., dict[str, Any]]:
    """A valid iris spec document (3 candidates x 3 folds); keyword arguments replace top-level fields."""

    def make(**fields: Any) -> dict[str, Any]:
        return {**copy.deepcopy(IRIS), **fields}

    return make


@pytest.fixture
def store_root(tmp_path: Path) -> str:
    return str(tmp_path / "store")


@pytest.fixture
def thread_env() -> Iterator[None]:
    """cv.evaluate caps BLAS pools through os.environ; restore it so in-process runs do not leak into others."""
    saved = {name: os.environ.get(name) for name in THREAD_ENV_VARS}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """The session's metadata DB (AIRFLOW_HOME above, SQLite) migrated once, with the grid pool."""
    for args in (["db", "migrate"], ["pools", "set", "grid_fits", "2", "airflow-grid candidate fits (tests)"]):
        done = subprocess.run(
            [str(Path(sys.executable).parent / "airflow"), *args], capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"airflow {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
