"""``python -m airflow_grid.demo`` (what ``make demo`` runs) under its real ``airflow standalone``.

The demo starts the scheduler itself, triggers grid_search_nightly through REST, waits for it and the grid_refit run
it triggers, and stops everything. Here it runs as a subprocess on a temp AIRFLOW_HOME (``airflow db migrate`` and
the pool with 2 slots first, as ``make demo`` does) over a copy of the repo's ``dags/`` whose nightly spec is a
quick iris grid of the same shape (one evaluate task per candidate, a holdout for the refit). What a person sees:
the UI address and admin login while it runs, two candidates evaluated at once (never more than the pool's slots),
a refit and a champion, and nothing left running. Takes about 2 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from standalone import max_overlap

from airflow_grid.local_airflow import PASSWORDS_FILE, free_port, port_listening

pytestmark = pytest.mark.scheduler

DAGS_DIR = Path(__file__).resolve().parents[1] / "dags"
BIN = Path(sys.executable).parent
POOL_SLOTS = 2
# The nightly DAG's spec file, replaced by 5 iris candidates x 3 folds (digits: 21 x 5).
SPEC: dict[str, Any] = {
    "name": "demo-iris",
    "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
    "holdout": {"test_size": 0.3, "random_state": 0, "stratify": True},
    "estimator": {"_target_": "sklearn.pipeline.Pipeline", "steps": [["clf", {"_target_": "sklearn.svm.SVC"}]]},
    "param_grid": [
        {"clf": [{"_target_": "sklearn.svm.SVC"}], "clf__C": [0.1, 1, 10]},
        {"clf": [{"_target_": "sklearn.linear_model.LogisticRegression", "max_iter": 500}], "clf__C": [0.1, 1]},
    ],
    "cv": 3,
    "scoring": "accuracy",
    "refit": "accuracy",
    "units": "candidate",  # one evaluate task per candidate, as for the digits grid
    "resources": {"cpu": 1, "memory": "1Gi"},
}
N_CANDIDATES = 5


def airflow_cli(env: dict[str, str], *args: str) -> None:
    done = subprocess.run([str(BIN / "airflow"), *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, f"airflow {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def processes_using(path: Path) -> list[int]:
    """Live processes whose environment names ``path`` (the temp AIRFLOW_HOME): what the demo may have left."""
    needle = str(path).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and needle in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the demo once; its exit code, output, JSON report, home and port."""
    root = tmp_path_factory.mktemp("demo")
    home, dags, port = root / "home", root / "dags", free_port()
    shutil.copytree(DAGS_DIR, dags, ignore=shutil.ignore_patterns("__pycache__"))
    (dags / "specs" / "digits_model_family.yaml").write_text(yaml.safe_dump(SPEC, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_"))}
    env.update(
        {"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(dags), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    )
    airflow_cli(env, "db", "migrate")
    airflow_cli(env, "pools", "set", "grid_fits", str(POOL_SLOTS), "airflow-grid candidate fits", "--include-deferred")
    report = root / "report.json"
    argv = ["-m", "airflow_grid.demo", "--dags", str(dags), "--port", str(port), "--report", str(report)]
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=1500, cwd=root)
    output = done.stdout + done.stderr
    print(output)
    return {
        "code": done.returncode,
        "output": output,
        "report": json.loads(report.read_text()) if report.exists() else {},
        "home": home,
        "port": port,
    }


def test_demo_runs_candidates_side_by_side_under_the_pool(demo: dict[str, Any]) -> None:
    assert demo["code"] == 0, demo["output"][-5000:]
    report, output = demo["report"], demo["output"]
    password = json.loads((demo["home"] / PASSWORDS_FILE).read_text())["admin"]
    assert f"Airflow UI: http://localhost:{demo['port']}" in output
    assert f"login: admin / {password}" in output

    rows = report["evaluate"]
    assert len(rows) == N_CANDIDATES and all(r["state"] == "success" for r in rows), rows
    origin = datetime(2000, 1, 1, tzinfo=UTC)
    spans = [(origin + timedelta(seconds=r["start"]), origin + timedelta(seconds=r["end"])) for r in rows]
    assert max_overlap(spans) == report["max_concurrency"]
    assert report["pool"]["slots"] == POOL_SLOTS
    assert 2 <= report["max_concurrency"] <= POOL_SLOTS  # side by side, and never past the pool
    printed = re.search(r"max evaluate tasks running at once: (\d+)", output)
    assert printed and int(printed.group(1)) == report["max_concurrency"]
    assert f"pool grid_fits: {POOL_SLOTS} slots" in output


def test_demo_refits_registers_a_champion_and_leaves_nothing_running(demo: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    assert demo["code"] == 0, demo["output"][-5000:]
    report = demo["report"]
    assert report["state"] == "success" and report["refit_state"] == "success"
    assert report["refit_run_id"] == f"refit__grid_search_nightly__{report['run_id']}"
    uri = f"sqlite:///{demo['home'] / 'mlflow.db'}"  # both: the registry otherwise follows this session's global URI
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = client.get_model_version_by_alias(SPEC["name"], "champion")
    assert str(champion.version) == str(report["champion"]["version"])
    assert "Airflow stopped cleanly" in demo["output"] and report["stopped_cleanly"] is True
    assert processes_using(demo["home"]) == []
    assert not port_listening(demo["port"])
