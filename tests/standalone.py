"""A real ``airflow standalone`` for the scheduler-level tests, and a throwaway PostgreSQL server for it.

The server itself is :mod:`airflow_grid.local_airflow` (``make demo`` runs the same); this module lays it out for a
test: ``run_standalone(root)`` keeps AIRFLOW_HOME (``root/home``), the DAGs (``root/dags``), MLflow and the result
store in a temp ``root`` and unpauses every DAG. ``private_postgres`` gives that server a PostgreSQL of its own
(initdb in a temp dir, loopback, a free port), so a test run never touches a machine's databases.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from airflow_grid import local_airflow
from airflow_grid.local_airflow import (
    BIN,
    TERMINAL,
    Setup,
    cli,
    free_port,
    max_overlap,
    parse_time,
    serve,
    stop,
)

__all__ = [
    "BIN",
    "TERMINAL",
    "Airflow",
    "cli",
    "max_overlap",
    "parse_time",
    "postgres_bindir",
    "private_postgres",
    "run_standalone",
    "stop",
]


class Airflow(local_airflow.Airflow):
    """The server's REST client, plus what the tests read from the server's MLflow."""

    def parent_run(self, study: str, dag_id: str, run_id: str) -> Any:
        """The study's MLflow parent run of one DAG run."""
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
    setup = Setup(
        home=root / "home",
        dags=root / "dags",
        workdir=root,
        mlflow_uri=f"sqlite:///{root / 'mlflow.db'}",
        store=str(root / "store"),
        extra_env=extra_env or {},
    )
    with serve(setup, pool=pool, pool_slots=pool_slots, parallelism=parallelism, database_url=database_url) as server:
        yield Airflow(**vars(server))
