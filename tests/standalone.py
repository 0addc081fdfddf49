"""A real ``airflow standalone`` for the scheduler-level tests, and a throwaway PostgreSQL server for it.

``run_standalone`` starts scheduler + LocalExecutor + API server + dag-processor + triggerer in a temp
AIRFLOW_HOME on SQLite or on a given database URL, creates the pool, reserializes the DAGs folder, unpauses every
DAG through REST, and at the end stops the whole process group and checks that no process or port is left.
``private_postgres`` gives that server a PostgreSQL of its own (initdb in a temp dir, loopback, a free port), so a
test run never touches a machine's databases.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from airflow_grid.cv import THREAD_ENV_VARS

BIN = Path(sys.executable).parent
TERMINAL = {"success", "failed"}


# --- processes and ports --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def live_processes(pgid: int, marker: str) -> list[int]:
    """What the server started and is still alive: its process group (LocalExecutor workers rename themselves, so
    their environment no longer shows the marker) plus anything carrying ``marker`` in its environment (the worker
    processes SubprocessHook starts in their own sessions). Zombies are dead and excluded."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            state, _, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if state != "Z" and (int(pgrp) == pgid or marker.encode() in environ):
            pids.append(int(entry.name))
    return pids


def describe(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = "?"
    return f"{pid} {command[:100]}"


@dataclass
class Airflow:
    """A running ``airflow standalone`` and a REST client logged in as its generated admin."""

    root: Path
    env: dict[str, str]
    api: httpx.Client
    mlflow_uri: str
    log: Path
    backend: str  # the metadata DB: "sqlite" or "postgresql"

    # REST helpers
    def get(self, path: str, **params: Any) -> Any:
        response = self.api.get(path, params=params)
        assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text[:2000]}"
        return response.json()

    def trigger(self, dag_id: str, run_id: str, conf: dict[str, Any]) -> httpx.Response:
        """What the UI's trigger form sends (the ``logical_date`` key is required, null for a manual run)."""
        return self.api.post(
            f"/api/v2/dags/{dag_id}/dagRuns", json={"dag_run_id": run_id, "logical_date": None, "conf": conf}
        )

    def dag_runs(self, dag_id: str, **params: Any) -> list[dict[str, Any]]:
        return list(self.get(f"/api/v2/dags/{dag_id}/dagRuns", limit=100, **params)["dag_runs"])

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return dict(self.get(f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}"))

    def task_instances(self, dag_id: str, run_id: str, **params: Any) -> list[dict[str, Any]]:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances"
        return list(self.get(path, limit=100, **params)["task_instances"])

    def xcom(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1, key: str = "return_value") -> Any:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/xcomEntries/{key}"
        value = self.get(path, map_index=map_index)["value"]
        return json.loads(value) if isinstance(value, str) else value

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 480) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            run = self.dag_run(dag_id, run_id)
            if run["state"] in TERMINAL:
                if run["state"] != "success":
                    self.explain(dag_id, run_id)
                return run
            if time.monotonic() > deadline:
                self.explain(dag_id, run_id)
                raise AssertionError(f"{dag_id}/{run_id} still {run['state']} after {timeout:.0f}s")
            time.sleep(1)

    def explain(self, dag_id: str, run_id: str) -> None:
        """On a failure: the task states, the failed tasks' logs and the end of the server's output."""
        for ti in self.task_instances(dag_id, run_id):
            print(f"  {ti['task_id']}[{ti['map_index']}] {ti['state']}")
        logs = self.root / "home" / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
        for path in sorted(logs.rglob("*.log")) if logs.exists() else []:
            text = path.read_text(errors="replace")
            if '"level":"error"' in text or "Traceback" in text or "ERROR" in text:
                print(f"--- {path.relative_to(logs)}\n{text[-4000:]}")
        print("--- standalone output (tail)\n" + self.log.read_text(errors="replace")[-4000:])

    # MLflow
    def parent_run(self, study: str, dag_id: str, run_id: str) -> Any:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.mlflow_uri)
        experiment = client.get_experiment_by_name(study)
        assert experiment is not None, f"no MLflow experiment {study!r}"
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string=(
                f"tags.`airflow_grid.dag_id` = '{dag_id}' and tags.`airflow_grid.run_id` = '{run_id}' "
                "and tags.`airflow_grid.role` = 'parent'"
            ),
        )
        assert len(runs) == 1, f"{len(runs)} MLflow parent runs for {dag_id}/{run_id}"
        return runs[0]


def cli(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    completed = subprocess.run([str(BIN / "airflow"), *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert completed.returncode == 0, (
        f"airflow {' '.join(args)} exited {completed.returncode}:\n{completed.stdout[-3000:]}\n"
        f"{completed.stderr[-3000:]}"
    )
    return completed.stdout + completed.stderr


def stop(process: subprocess.Popen[bytes], marker: str) -> list[str]:
    """Stop the server and everything it started, by process group; returns what it took.

    Ctrl-C to the standalone parent, which sends each component one SIGTERM (a SIGINT to the whole group races
    with that second signal: the scheduler then abandons its executor shutdown, hangs joining its LocalExecutor
    workers, and the workers - which ignore SIGINT and SIGTERM - are orphaned); then SIGTERM to the parent, which
    stays up after its components exit; then SIGTERM and SIGKILL to whatever is left in the group.
    """
    steps = []
    pgid = process.pid  # start_new_session: the parent leads its own process group
    started = time.monotonic()

    def components() -> set[int]:
        return set(live_processes(pgid, marker)) - {process.pid}

    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        steps.append("SIGINT to the standalone parent")
    deadline = time.monotonic() + 20
    while components() and time.monotonic() < deadline:
        time.sleep(0.5)
    steps.append(f"components {'still up' if components() else 'gone'} after {time.monotonic() - started:.1f}s")
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        steps.append("SIGTERM to the standalone parent")
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = live_processes(pgid, marker)
        if not left:
            break
        steps.append(f"{sig.name} to {len(left)} leftover process(es) {[describe(pid) for pid in left]}")
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(3)
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)
    steps.append(f"stopped in {time.monotonic() - started:.1f}s")
    return steps


# --- PostgreSQL -----------------------------------------------------------------------------------------------------


def postgres_bindir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` live: on PATH, or Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


@contextlib.contextmanager
def private_postgres(bindir: Path) -> Iterator[str]:
    """A throwaway PostgreSQL on 127.0.0.1 (trust auth, fsync off: test data only); yields its SQLAlchemy URL.

    PostgreSQL refuses to run as root, so as root (CI) the server runs as the ``postgres`` user Debian's package
    creates, in a temp dir handed to it.
    """
    workdir = Path(tempfile.mkdtemp(prefix="airflow-grid-postgres-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = workdir / "data", free_port()

    def run(*args: str) -> None:
        done = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"

    started = False
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "airflow", "-A", "trust", "-E", "UTF8", "--no-sync")
        options = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(workdir / "server.log"), "-w", "start")
        started = True
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "airflow", "airflow")
        yield f"postgresql+psycopg2://airflow@127.0.0.1:{port}/airflow"
    finally:
        if started:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(workdir, ignore_errors=True)


# --- the server -----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def run_standalone(
    root: Path,
    *,
    pool: str,
    pool_slots: int,
    parallelism: int,
    database_url: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Airflow]:
    """``airflow standalone`` over the DAGs in ``root/dags``, with AIRFLOW_HOME, MLflow and result store in ``root``.

    ``database_url`` None: SQLite in AIRFLOW_HOME (what ``airflow standalone`` does by default).
    """
    started = time.monotonic()
    ports = {"api": free_port(), "worker_logs": free_port(), "trigger_logs": free_port()}
    marker = f"airflow-grid-scheduler-test-{uuid.uuid4().hex}"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW", "MLFLOW_")) and k not in THREAD_ENV_VARS  # nothing of this session's
    }
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # standalone starts its components as `airflow ...`
            "PYTHONUNBUFFERED": "1",
            "AIRFLOW_HOME": str(root / "home"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(root / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",  # frees a worker slot ~1 s after its task, not ~5 s
            "AIRFLOW__API__PORT": str(ports["api"]),
            "AIRFLOW__API__BASE_URL": f"http://localhost:{ports['api']}",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{ports['api']}/execution/",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(ports["worker_logs"]),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(ports["trigger_logs"]),
            "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "AIRFLOW_GRID_STORE": str(root / "store"),
            "AIRFLOW_GRID_TEST_MARKER": marker,
        }
    )
    if database_url:
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = database_url
    else:
        # SQLite allows one writer: under CI load the scheduler can hold the lock past pysqlite's 5 s default and a
        # concurrent writer then fails with "database is locked". Wait up to 60 s instead.
        (root / "airflow_grid_test_sqlite.py").write_text('CONNECT_ARGS = {"timeout": 60}\n')
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS"] = "airflow_grid_test_sqlite.CONNECT_ARGS"
    env.update(extra_env or {})
    backend = database_url.split(":", 1)[0].split("+")[0] if database_url else "sqlite"
    cli(env, "db", "migrate")
    cli(env, "pools", "set", pool, str(pool_slots), "airflow-grid candidate fits (scheduler tests)")
    cli(env, "dags", "reserialize")
    log = root / "standalone.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(BIN / "airflow"), "standalone"],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
            start_new_session=True,
        )
    base = f"http://localhost:{ports['api']}"
    api = httpx.Client(base_url=base, timeout=30)
    try:
        health: dict[str, Any] = {}
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, "airflow standalone exited:\n" + log.read_text()[-4000:]
            try:
                response = api.get("/api/v2/monitor/health")
                health = response.json() if response.status_code == 200 else {}
            except httpx.HTTPError:
                health = {}
            components = ("metadatabase", "scheduler", "dag_processor", "triggerer")
            if health and all((health.get(c) or {}).get("status") == "healthy" for c in components):
                break
            assert time.monotonic() < deadline, f"not healthy after 240s: {health}\n{log.read_text()[-4000:]}"
            time.sleep(1)
        healthy_after = time.monotonic() - started
        passwords = json.loads((root / "home" / "simple_auth_manager_passwords.json.generated").read_text())
        token = api.post("/auth/token", json={"username": "admin", "password": passwords["admin"]})
        assert token.status_code in (200, 201), token.text
        api.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
        server = Airflow(root, env, api, env["MLFLOW_TRACKING_URI"], log, backend)
        dag_ids = sorted(d["dag_id"] for d in server.get("/api/v2/dags", limit=100)["dags"])
        for dag_id in dag_ids:
            response = api.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False})
            assert response.status_code == 200 and response.json()["is_paused"] is False, response.text
        slots = server.get(f"/api/v2/pools/{pool}")["slots"]
        assert slots == pool_slots
        print(
            f"\nairflow standalone on {backend} healthy after {healthy_after:.1f}s (setup included) on "
            f":{ports['api']}; DAGs {dag_ids} unpaused; pool {pool} = {slots} slots; parallelism {parallelism}"
        )
        yield server
    finally:
        api.close()
        steps = stop(process, marker)
        left = live_processes(process.pid, marker)
        busy = {name: port for name, port in ports.items() if port_listening(port)}
        print(f"\nteardown: {'; '.join(steps)}; processes left: {left}; ports still listening: {busy}")
        assert not left, f"processes left running: {left}"
        assert not busy, f"ports still listening: {busy}"


# --- reading what happened ------------------------------------------------------------------------------------------


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """The most intervals open at one instant (an interval ending when another starts does not overlap it)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, delta in events:
        running += delta
        most = max(most, running)
    return most
