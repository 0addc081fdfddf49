"""The serve worker and the pool ``airflow-grid run`` keeps: start-up once per slot, a dead slot loses one request.

The serve protocol is driven for real (``python -m airflow_grid.worker serve`` on a planned study); the pool is
driven with real serve workers, one of which is replaced by a process that dies, to show that only its request
fails, the others complete, and the replacement slot takes the rest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest

from airflow_grid import launch, pool
from airflow_grid.plan import make_plan
from airflow_grid.spec import parse_spec
from airflow_grid.store import Store

pytestmark = pytest.mark.slow

SPEC = {
    "name": "pool",
    "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
    "estimator": {"_target_": "sklearn.svm.SVC"},
    "param_grid": {"C": [0.1, 1, 10, 100]},
    "cv": 3,
}


@pytest.fixture
def plan_uri(tmp_path: Path) -> str:
    return make_plan(parse_spec(SPEC), Store(str(tmp_path / "store"))).uri


def test_serve_answers_each_request_as_evaluate_would(plan_uri: str, tmp_path: Path) -> None:
    requests = [{"indices": [0, 1]}, {"indices": [9]}, {"indices": [1], "round": 0}]
    command = launch.worker_command("serve", plan_uri, [], out=None, memory_bytes=2**31)
    completed = subprocess.run(
        command, input="".join(json.dumps(r) + "\n" for r in requests), capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    replies = [json.loads(line) for line in completed.stdout.splitlines()]
    assert len(replies) == 3  # nothing but protocol lines on stdout
    assert [r["index"] for r in replies[0]["results"]] == [0, 1]
    assert "out of range" in replies[1]["bad_input"]
    assert replies[2]["results"][0]["from_store"] and replies[2]["results"][0]["index"] == 1
    alone = subprocess.run(
        [*launch.worker_command("evaluate", plan_uri, [1], out=None, memory_bytes=2**31)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert json.loads(alone.stdout)["results"][0]["test_scores"] == replies[0]["results"][1]["test_scores"]


def test_a_dead_slot_loses_only_its_request(plan_uri: str, tmp_path: Path) -> None:
    started: list[list[str]] = []

    def start(command: list[str], env: dict[str, str], log: IO[str]) -> subprocess.Popen[str]:
        started.append(command)
        if len(started) == 1:  # the first slot dies on its first request, as an out-of-memory exit would
            command = [
                sys.executable,
                "-c",
                "import sys; sys.stdin.readline(); print('killed', file=sys.stderr); sys.exit(3)",
            ]
        return pool._popen(command, env, log)

    requests = [{"indices": [i], "round": 0} for i in range(4)]
    outcomes = list(pool.run(plan_uri, requests, slots=2, cpu=1, memory_bytes=2**31, scratch=tmp_path, start=start))
    failed = [o for o in outcomes if o.failure is not None]
    assert len(outcomes) == 4 and len(failed) == 1 and "killed" in (failed[0].failure or "")
    done = sorted(o.request["indices"][0] for o in outcomes if o.payload is not None)
    assert len(done) == 3 and failed[0].request["indices"][0] not in done
    assert len(started) == 3  # two slots, and one replacement for the dead one
