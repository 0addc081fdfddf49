"""A real ``airflow standalone`` on this machine, started and stopped by the caller, and a REST client for it.

``make demo`` and the scheduler-level tests both need what production has - scheduler, LocalExecutor, pools,
dag-processor, triggerer and API server - without any service installed. :func:`serve` starts
``airflow standalone`` in its own session over an AIRFLOW_HOME and DAGs folder the caller chooses, logs in as the
admin it generates, unpauses the chosen DAGs, and at the end stops the whole process group and checks that no
process or port is left. No ``import airflow`` here: this only starts ``airflow`` processes and talks REST.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

BIN = Path(sys.executable).parent
TERMINAL = {"success", "failed"}
PASSWORDS_FILE = "simple_auth_manager_passwords.json.generated"
HEALTH_COMPONENTS = ("metadatabase", "scheduler", "dag_processor", "triggerer")
MARKER_ENV = "AIRFLOW_GRID_TEST_MARKER"  # tags every process the server starts, to find them at teardown

# SQLite allows one writer: under load the scheduler can hold the lock past pysqlite's 5 s default and a concurrent
# writer then fails with "database is locked". The server waits up to 60 s instead (AIRFLOW__DATABASE__
# SQL_ALCHEMY_CONNECT_ARGS names this constant).
SQLITE_CONNECT_ARGS = {"timeout": 60}


# --- processes and ports --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def port_or_free(preferred: int) -> int:
    """``preferred`` when nothing can be bound on it yet, else any free port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", preferred))
        except OSError:
            return free_port()
    return preferred


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


# --- the REST client ------------------------------------------------------------------------------------------------


@dataclass
class Airflow:
    """A running ``airflow standalone`` and a REST client logged in as its generated admin."""

    root: Path  # the server's working directory: standalone.log is here
    env: dict[str, str]
    api: httpx.Client
    mlflow_uri: str
    log: Path
    backend: str  # the metadata DB: "sqlite" or "postgresql"
    home: Path = Path()  # AIRFLOW_HOME
    url: str = ""  # the UI and API address

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

    def find_run(self, dag_id: str, run_id: str) -> dict[str, Any] | None:
        """The run, or None while it does not exist (yet: another DAG's task triggers it)."""
        response = self.api.get(f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")
        if response.status_code == 404:
            return None
        assert response.status_code == 200, f"GET run {dag_id}/{run_id}: {response.status_code} {response.text}"
        return dict(response.json())

    def task_instances(self, dag_id: str, run_id: str, **params: Any) -> list[dict[str, Any]]:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances"
        return list(self.get(path, limit=100, **params)["task_instances"])

    def xcom(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1, key: str = "return_value") -> Any:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/xcomEntries/{key}"
        value = self.get(path, map_index=map_index)["value"]
        return json.loads(value) if isinstance(value, str) else value

    def wait_for_run(
        self,
        dag_id: str,
        run_id: str,
        timeout: float = 480,
        *,
        may_not_exist_yet: bool = False,
        on_poll: Callable[[dict[str, Any] | None], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the run is terminal; ``on_poll`` sees each poll's run (None while it does not exist)."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.find_run(dag_id, run_id) if may_not_exist_yet else self.dag_run(dag_id, run_id)
            if on_poll is not None:
                on_poll(run)
            if run is not None and run["state"] in TERMINAL:
                if run["state"] != "success":
                    self.explain(dag_id, run_id)
                return run
            if time.monotonic() > deadline:
                if run is not None:
                    self.explain(dag_id, run_id)
                raise AssertionError(f"{dag_id}/{run_id} still {run and run['state']} after {timeout:.0f}s")
            time.sleep(1)

    def explain(self, dag_id: str, run_id: str) -> None:
        """On a failure: the task states, the failed tasks' logs and the end of the server's output."""
        for ti in self.task_instances(dag_id, run_id):
            print(f"  {ti['task_id']}[{ti['map_index']}] {ti['state']}")
        logs = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
        for path in sorted(logs.rglob("*.log")) if logs.exists() else []:
            text = path.read_text(errors="replace")
            if '"level":"error"' in text or "Traceback" in text or "ERROR" in text:
                print(f"--- {path.relative_to(logs)}\n{text[-4000:]}")
        print("--- standalone output (tail)\n" + self.log.read_text(errors="replace")[-4000:])


# --- the server -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """Where the server keeps its state and what it serves; the caller decides (tests: temp dirs; demo: .airflow)."""

    home: Path  # AIRFLOW_HOME: metadata DB (SQLite by default), logs, the generated admin password
    dags: Path
    workdir: Path  # the server's working directory and standalone.log
    mlflow_uri: str
    store: str | None = None  # None: the default, $AIRFLOW_HOME/airflow_grid
    unpause: Sequence[str] | None = None  # None: every DAG
    api_port: int | None = None  # None: a free port
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Ports:
    api: int
    worker_logs: int
    trigger_logs: int

    def listening(self) -> dict[str, int]:
        return {name: port for name, port in vars(self).items() if port_listening(port)}


def server_env(setup: Setup, ports: Ports, marker: str, parallelism: int, database_url: str | None) -> dict[str, str]:
    """The server's environment: none of this process's Airflow, MLflow or thread settings, only the setup's."""
    from airflow_grid.cv import THREAD_ENV_VARS  # here: Airflow imports this module for SQLITE_CONNECT_ARGS

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_")) and k not in THREAD_ENV_VARS}
    base = f"http://localhost:{ports.api}"
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # standalone starts its components as `airflow ...`
            "PYTHONUNBUFFERED": "1",
            "AIRFLOW_HOME": str(setup.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(setup.dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",  # frees a worker slot ~1 s after its task, not ~5 s
            "AIRFLOW__API__PORT": str(ports.api),
            "AIRFLOW__API__BASE_URL": base,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(ports.worker_logs),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(ports.trigger_logs),
            "MLFLOW_TRACKING_URI": setup.mlflow_uri,
            MARKER_ENV: marker,
        }
    )
    if setup.store:
        env["AIRFLOW_GRID_STORE"] = setup.store
    if database_url:
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = database_url
    else:
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS"] = f"{__name__}.SQLITE_CONNECT_ARGS"
    env.update(setup.extra_env)
    return env


def prepare(env: dict[str, str], pool: str, pool_slots: int | None) -> None:
    """Migrate the metadata DB, set the pool (``pool_slots`` None: it must exist already) and parse the DAGs."""
    cli(env, "db", "migrate")
    if pool_slots is None:
        found = subprocess.run([str(BIN / "airflow"), "pools", "get", pool], capture_output=True, env=env, timeout=300)
        assert found.returncode == 0, f"no pool {pool!r}: airflow pools set {pool} SLOTS 'airflow-grid candidate fits'"
    else:
        cli(env, "pools", "set", pool, str(pool_slots), "airflow-grid candidate fits")
    cli(env, "dags", "reserialize")


def wait_healthy(process: subprocess.Popen[bytes], api: httpx.Client, log: Path, timeout: float = 240) -> None:
    """Until scheduler, dag-processor, triggerer and metadata DB report healthy (40-70 s on 2 cores)."""
    deadline = time.monotonic() + timeout
    health: dict[str, Any] = {}
    while True:
        assert process.poll() is None, "airflow standalone exited:\n" + log.read_text()[-4000:]
        try:
            response = api.get("/api/v2/monitor/health")
            health = response.json() if response.status_code == 200 else {}
        except httpx.HTTPError:
            health = {}
        if health and all((health.get(c) or {}).get("status") == "healthy" for c in HEALTH_COMPONENTS):
            return
        assert time.monotonic() < deadline, f"not healthy after {timeout:.0f}s: {health}\n{log.read_text()[-4000:]}"
        time.sleep(1)


def admin_password(home: Path) -> str:
    """The password ``airflow standalone`` generated for the simple auth manager's ``admin`` (kept across runs)."""
    return str(json.loads((home / PASSWORDS_FILE).read_text())["admin"])


def login(api: httpx.Client, home: Path) -> None:
    token = api.post("/auth/token", json={"username": "admin", "password": admin_password(home)})
    assert token.status_code in (200, 201), token.text
    api.headers["Authorization"] = f"Bearer {token.json()['access_token']}"


def unpause(server: Airflow, dag_ids: Sequence[str] | None) -> list[str]:
    """Unpause ``dag_ids`` (None: every DAG the server knows); returns them."""
    known = sorted(d["dag_id"] for d in server.get("/api/v2/dags", limit=100)["dags"])
    chosen = known if dag_ids is None else sorted(dag_ids)
    assert set(chosen) <= set(known), f"DAGs {sorted(set(chosen) - set(known))} not found in {known}"
    for dag_id in chosen:
        response = server.api.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False})
        assert response.status_code == 200 and response.json()["is_paused"] is False, response.text
    return chosen


def start(setup: Setup, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
    """``airflow standalone`` in its own session (its own process group, which :func:`stop` ends)."""
    setup.workdir.mkdir(parents=True, exist_ok=True)
    log = setup.workdir / "standalone.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(BIN / "airflow"), "standalone"],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=setup.workdir,
            start_new_session=True,
        )
    return process, log


class LeftRunning(AssertionError):
    """The server did not stop cleanly: a process or port of it is still there."""


def shut_down(process: subprocess.Popen[bytes], marker: str, ports: Ports) -> None:
    """Stop everything, then prove it: no process and no port of the server left."""
    steps = stop(process, marker)
    left = live_processes(process.pid, marker)
    busy = ports.listening()
    print(f"\nteardown: {'; '.join(steps)}; processes left: {left}; ports still listening: {busy}", flush=True)
    if left or busy:
        raise LeftRunning(f"processes left running: {left}; ports still listening: {busy}")


@contextlib.contextmanager
def serve(
    setup: Setup, *, pool: str, pool_slots: int | None, parallelism: int, database_url: str | None = None
) -> Iterator[Airflow]:
    """``airflow standalone`` (LocalExecutor) over ``setup``, healthy, logged in, chosen DAGs unpaused.

    ``database_url`` None: SQLite in AIRFLOW_HOME (what ``airflow standalone`` does by default). On exit, also on an
    exception or Ctrl-C, the whole process group is stopped and checked gone.
    """
    started = time.monotonic()
    ports = Ports(setup.api_port or free_port(), free_port(), free_port())
    marker = f"airflow-grid-standalone-{uuid.uuid4().hex}"
    env = server_env(setup, ports, marker, parallelism, database_url)
    backend = database_url.split(":", 1)[0].split("+")[0] if database_url else "sqlite"
    prepare(env, pool, pool_slots)
    process, log = start(setup, env)
    url = f"http://localhost:{ports.api}"
    api = httpx.Client(base_url=url, timeout=30)
    try:
        wait_healthy(process, api, log)
        healthy_after = time.monotonic() - started
        login(api, setup.home)
        server = Airflow(setup.workdir, env, api, setup.mlflow_uri, log, backend, setup.home, url)
        dag_ids = unpause(server, setup.unpause)
        slots = server.get(f"/api/v2/pools/{pool}")["slots"]
        assert pool_slots is None or slots == pool_slots, f"pool {pool} has {slots} slots, not {pool_slots}"
        print(
            f"\nairflow standalone on {backend} healthy after {healthy_after:.1f}s (setup included) on "
            f":{ports.api}; DAGs {dag_ids} unpaused; pool {pool} = {slots} slots; parallelism {parallelism}",
            flush=True,
        )
        yield server
    finally:
        api.close()
        shut_down(process, marker, ports)


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
