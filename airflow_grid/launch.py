"""The one place that builds the worker's command line and environment, for every path that runs a candidate.

The local evaluate operator, the refit operator, ``airflow-grid run`` and the evaluate pods all start
``python -m airflow_grid.worker`` through these functions, so none of them can forget the memory budget or the
thread caps: ``memory_bytes`` is a required keyword (a pod passes ``None`` because it carries the budget in
:data:`MEMORY_ENV`, which a retry may raise). Imports neither Airflow nor MLflow.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Literal

from airflow_grid.cv import budget, thread_env

WORKER_MODULE = "airflow_grid.worker"
# The worker's memory budget in bytes when --memory-limit is absent (pods: the container's limit, raised on retry).
MEMORY_ENV = "AIRFLOW_GRID_MEMORY_BYTES"

Action = Literal["evaluate", "refit", "serve"]


def worker_arguments(
    action: Action,
    plan_uri: str,
    candidates: int | Sequence[int],
    *,
    out: str | None,
    memory_bytes: int | None,
    model: str | None = None,
    round_: int = 0,
) -> list[str]:
    """The worker's arguments (no interpreter): what a pod puts in ``args`` and a local path after ``-m``.

    ``round_`` is the successive-halving round of the candidates (omitted when 0, the only round of the others).
    """
    indices = [candidates] if isinstance(candidates, int) else list(candidates)
    if action == "serve":  # the candidates come as requests on stdin (see airflow_grid.worker.serve)
        if indices or out is not None or model is not None:
            raise ValueError("worker serve takes no candidates, out or model: they come as requests on stdin.")
        indices_given: list[int] = []
    elif not indices:
        raise ValueError(f"worker {action}: no candidate index given.")
    else:
        indices_given = indices
    if action == "refit" and (len(indices) != 1 or model is None):
        raise ValueError(f"worker refit takes one candidate and a model path, got {indices} and model={model!r}.")
    arguments: list[str] = [action, "--plan", plan_uri]
    for index in indices_given:
        arguments += ["--candidate", str(int(index))]
    if round_:
        arguments += ["--round", str(int(round_))]
    if model is not None:
        arguments += ["--model", model]
    if out is not None:
        arguments += ["--out", out]
    if memory_bytes is not None:
        arguments += ["--memory-limit", str(int(memory_bytes))]
    return arguments


def worker_command(
    action: Action,
    plan_uri: str,
    candidates: int | Sequence[int],
    *,
    out: str | None,
    memory_bytes: int,
    python: str | None = None,
    model: str | None = None,
    round_: int = 0,
) -> list[str]:
    """The full command of a local worker process; the memory budget is always passed."""
    arguments = worker_arguments(
        action, plan_uri, candidates, out=out, memory_bytes=memory_bytes, model=model, round_=round_
    )
    return [python or sys.executable, "-m", WORKER_MODULE, *arguments]


def worker_env(cpu: float, base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base_env`` (default: this process's) with native thread pools capped to the CPU budget.

    A stale :data:`MEMORY_ENV` is dropped: a local worker gets its budget on the command line only.
    """
    _, threads = budget(cpu, 1)
    env = {k: v for k, v in (os.environ if base_env is None else base_env).items() if k != MEMORY_ENV}
    return {**env, **thread_env(threads)}
