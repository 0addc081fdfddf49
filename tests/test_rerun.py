"""A rerun with nothing changed is answered from the store without planning; anything that could change the plan
or a result makes it plan again (airflow_grid/rerun.py through ``airflow-grid run``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from airflow_grid import cli, versions

Doc = Callable[..., dict[str, Any]]
ANSWERED = "nothing changed since plan"
pytestmark = pytest.mark.usefixtures("thread_env")


def write_spec(tmp_path: Path, document: dict[str, Any]) -> Path:
    path = tmp_path / f"{document['name']}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def run(root: Path, spec: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> str:
    command = [sys.executable, "-m", "airflow_grid.cli", "--store", str(root), "run", str(spec), "--out", str(out)]
    done = subprocess.run([*command, *extra], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def fitted(output: str) -> int:
    line = next(line for line in output.splitlines() if line.startswith("evaluated "))
    return int(line.split(": ")[1].split(" fitted")[0])


def test_unchanged_rerun_is_answered_with_the_same_files(iris_doc: Doc, tmp_path: Path) -> None:
    spec, root = write_spec(tmp_path, iris_doc()), tmp_path / "store"
    first = run(root, spec, tmp_path / "first", "--no-refit")
    assert ANSWERED not in first and fitted(first) == 3
    again = run(root, spec, tmp_path / "again", "--no-refit")
    assert ANSWERED in again and fitted(again) == 0
    for name in ("cv_results.json", "best.json"):  # byte for byte what the full run wrote
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "first" / name).read_bytes()
    assert first.splitlines()[-5:] == again.splitlines()[-5:]  # the same leaderboard
    refit = run(root, spec, tmp_path / "refit")  # answered, and the winner is still refitted when asked
    assert ANSWERED in refit and (tmp_path / "refit" / "model.joblib").is_file()


def test_a_changed_data_file_is_planned_again(iris_doc: Doc, tmp_path: Path) -> None:
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    data = tmp_path / "iris.npz"
    np.savez(data, X=X, y=y)
    spec, root = write_spec(tmp_path, iris_doc(data={"path": str(data), "format": "npz"})), tmp_path / "store"
    run(root, spec, tmp_path / "first", "--no-refit")
    assert ANSWERED in run(root, spec, tmp_path / "same", "--no-refit")
    X[0, 0] += 0.5  # one value of 600
    np.savez(data, X=X, y=y)
    changed = run(root, spec, tmp_path / "changed", "--no-refit")
    assert ANSWERED not in changed and fitted(changed) == 3


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"holdout": {"test_size": 0.3}}, id="unseeded-holdout"),
        pytest.param({"cv": {"_target_": "sklearn.model_selection.KFold", "n_splits": 3, "shuffle": True}}, id="cv"),
        pytest.param(
            {"data": {"_target_": "sklearn.datasets.make_classification", "n_samples": 120}}, id="unseeded-loader"
        ),
    ],
)
def test_inputs_that_draw_are_never_answered(iris_doc: Doc, tmp_path: Path, fields: dict[str, Any]) -> None:
    spec, root = write_spec(tmp_path, iris_doc(**fields)), tmp_path / "store"
    run(root, spec, tmp_path / "first", "--no-refit")
    assert ANSWERED not in run(root, spec, tmp_path / "again", "--no-refit")


def test_a_damaged_result_or_snapshot_is_planned_again(iris_doc: Doc, tmp_path: Path) -> None:
    spec, root = write_spec(tmp_path, iris_doc()), tmp_path / "store"
    run(root, spec, tmp_path / "first", "--no-refit")
    [victim, *_] = sorted((root / "results").glob("*/*.json"))
    victim.write_bytes(victim.read_bytes()[:25])
    healed = run(root, spec, tmp_path / "healed", "--no-refit")
    assert ANSWERED not in healed and fitted(healed) == 1
    [plan] = (root / "plans").iterdir()
    snapshot = plan / json.loads((plan / "plan.json").read_text())["files"]["X"].rsplit("/", 1)[-1]
    snapshot.write_bytes(snapshot.read_bytes()[:-8])
    replanned = run(root, spec, tmp_path / "replanned", "--no-refit")
    assert ANSWERED not in replanned and fitted(replanned) == 0  # the plan heals; the results stand
    assert ANSWERED in run(root, spec, tmp_path / "answered", "--no-refit")


def test_another_policy_or_library_version_is_planned_again(
    iris_doc: Doc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec, root = write_spec(tmp_path, iris_doc()), tmp_path / "store"
    run(root, spec, tmp_path / "first", "--no-refit")
    env = {**os.environ, "AIRFLOW_GRID_ALLOWED_TARGETS": "mypackage."}
    assert ANSWERED not in run(root, spec, tmp_path / "policy", "--no-refit", env=env)

    real = versions.versions_of
    monkeypatch.setattr(versions, "versions_of", lambda names: {**real(names), "scikit-learn": "0.0.1"})
    assert cli.main(["--store", str(root), "run", str(spec), "--out", str(tmp_path / "upgraded"), "--no-refit"]) == 0
    assert ANSWERED not in capsys.readouterr().out


def test_halving_is_left_to_the_planner(iris_doc: Doc, tmp_path: Path) -> None:
    document = iris_doc(
        search={
            "strategy": "halving_grid",
            "factor": 2,
            "resource": "n_samples",
            "min_resources": 30,
            "random_state": 0,
        }
    )
    spec, root = write_spec(tmp_path, document), tmp_path / "store"
    run(root, spec, tmp_path / "first", "--no-refit")
    assert ANSWERED not in run(root, spec, tmp_path / "again", "--no-refit")
