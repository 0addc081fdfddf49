"""`python -m airflow_grid.demo`: run grid_search_nightly and its refit end to end on the embedded default.

Expects ``airflow db migrate`` and the pool to exist (``make demo`` does both). Runs the DAGs with ``dag.test()``
(SQLite, tasks in-process one at a time, local backend, MLflow sqlite store) and prints the winner, its scores,
where the MLflow run and the registered model are, and how to open both UIs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from airflow_grid import tracking


def load_dag_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parent_run(dag_id: str, run_id: str) -> Any:
    client = tracking.client()
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`{tracking.TAG_DAG_ID}` = '{dag_id}' and tags.`{tracking.TAG_RUN_ID}` = '{run_id}'",
    )
    return next(r for r in runs if r.data.tags.get(tracking.TAG_ROLE) == "parent")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dags", default=str(Path(__file__).resolve().parents[1] / "dags"))
    args = parser.parse_args(argv)
    dags = Path(args.dags)
    started = time.perf_counter()
    nightly = load_dag_module(dags / "grid_search_nightly.py").dag
    print(f"Running {nightly.dag_id} with dag.test() (tasks one at a time; logs below) ...", flush=True)
    search_run = nightly.test()
    if search_run.state != "success":
        print(f"{nightly.dag_id} ended {search_run.state}: see the task logs above.", file=sys.stderr)
        return 1
    parent = parent_run(nightly.dag_id, search_run.run_id)
    refit = load_dag_module(dags / "grid_refit.py").dag
    refit_run = refit.test(run_conf={"parent_run_id": parent.info.run_id})
    if refit_run.state != "success":
        print(f"{refit.dag_id} ended {refit_run.state}: see the task logs above.", file=sys.stderr)
        return 1
    client = tracking.client()
    parent = client.get_run(parent.info.run_id)
    study = client.get_experiment(parent.info.experiment_id).name
    champion = client.get_model_version_by_alias(study, "champion")
    challenger = client.get_model_version_by_alias(study, "challenger")
    home = tracking.airflow_home()
    best = {k.removeprefix("best_"): v for k, v in parent.data.params.items() if k.startswith("best_")}
    print("\n" + "=" * 100)
    print(f"Study {study}: winner {best}")
    print(f"  mean CV {parent.data.tags.get(tracking.TAG_REFIT_METRIC)}: {parent.data.metrics['best_cv_score']:.4f}")
    print(f"  holdout score of the refitted winner: {challenger.tags.get('holdout_score')}")
    print(f"  registered model {study} v{challenger.version} (challenger); champion is v{champion.version}")
    print(f"  MLflow parent run {parent.info.run_id}; artifacts at {parent.info.artifact_uri}")
    print(f"  model: models:/{study}@champion -> {champion.source}")
    print(f"  took {time.perf_counter() - started:.0f}s")
    print("Open the UIs:")
    print(f"  MLflow:  .venv/bin/mlflow ui --backend-store-uri {tracking.tracking_uri()} --port 5000")
    print(f"  Airflow: AIRFLOW_HOME={home} AIRFLOW__CORE__DAGS_FOLDER={dags} .venv/bin/airflow standalone  (:8080)")
    print("=" * 100)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    sys.exit(main())
