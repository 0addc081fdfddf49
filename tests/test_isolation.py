"""The core runs without Airflow or MLflow, and the provider-info module imports nothing heavy.

Each check imports in a fresh interpreter: the test process itself may already hold any module.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CORE_MODULES = [
    "airflow_grid.spec",
    "airflow_grid.grid",
    "airflow_grid.data",
    "airflow_grid.cv",
    "airflow_grid.results",
    "airflow_grid.store",
    "airflow_grid.worker",
    "airflow_grid.plan",
    "airflow_grid.launch",
    "airflow_grid.limits",
    "airflow_grid.timeouts",
    "airflow_grid.leaderboard",
    "airflow_grid.randomness",
    "airflow_grid.halving",
    "airflow_grid.chains",
    "airflow_grid.prefixes",
    "airflow_grid.pool",
    "airflow_grid.costs",
    "airflow_grid.rerun",
    "airflow_grid.prefix_cache",
]


def loaded_modules(modules: list[str], cwd: Path) -> list[str]:
    """Names in sys.modules after a fresh interpreter imports ``modules``."""
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, check=True)
    names: list[str] = json.loads(completed.stdout)
    return names


def under(names: list[str], roots: set[str]) -> list[str]:
    """Modules that are one of ``roots`` or inside one (``airflow_grid`` is not inside ``airflow``)."""
    return [name for name in names if name.split(".", 1)[0] in roots]


@pytest.mark.parametrize(
    ("modules", "banned"),
    [
        pytest.param(CORE_MODULES, {"airflow", "mlflow"}, id="core-without-airflow-and-mlflow"),
        pytest.param(["airflow_grid.kubernetes.pods"], {"airflow", "mlflow"}, id="pod-helpers-without-airflow"),
        pytest.param(
            ["airflow_grid"], {"airflow", "mlflow", "sklearn", "numpy", "scipy", "pandas", "yaml"}, id="provider-info"
        ),
        # a rerun answered from the store imports neither scikit-learn nor scipy (airflow_grid/rerun.py)
        pytest.param(["airflow_grid.cli"], {"airflow", "mlflow", "sklearn", "scipy", "pandas"}, id="cli-rerun-path"),
        # every task process parses the DAG file: only the tasks that need scikit-learn import it
        pytest.param(["airflow_grid.dag_factory"], {"sklearn", "mlflow", "pandas"}, id="dag-file-without-sklearn"),
    ],
)
def test_imports_stay_light(tmp_path: Path, modules: list[str], banned: set[str]) -> None:
    names = loaded_modules(modules, tmp_path)
    assert set(modules) <= set(names)  # the import really happened
    assert under(names, banned) == []


def test_under_matches_whole_names_only() -> None:
    names = ["airflow_grid", "airflow_grid.spec", "airflow", "airflow.sdk", "mlflowish", "mlflow.sklearn"]
    assert under(names, {"airflow", "mlflow"}) == ["airflow", "airflow.sdk", "mlflow.sklearn"]
